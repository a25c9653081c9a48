//! One client connection: the handshake, then a loop that routes frames to requests.

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::dirs;
use super::exec;
use super::files::{self, WriteSink};
use super::reply::{reply, Responder};
use super::reseed;
use super::tunnel;
use super::{software, Agent, MAX_CONNECTIONS, MAX_REQUESTS_PER_CONNECTION};
use crate::protocol::{
    read_frame, write_frame, DecodeError, DirEntries, ErrorCode, ErrorReply, FileDone, Frame,
    Hello, Message, ReadError, CONNECTION_REQUEST_ID, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use crate::transport::Duplex;

/// A request in flight on a connection.
pub(super) enum Active {
    /// A running process.
    Exec(exec::Control),
    /// A file being written.
    WriteFile(WriteSink),
    /// A file write that failed: its remaining data is dropped until its end frame.
    FailedWrite,
    /// A file being read.
    ReadFile,
    /// A TCP connection to a guest port.
    Tunnel(tunnel::Control),
}

/// What the connection's threads share: the writing half and the requests in flight.
pub(super) struct Shared<S> {
    writer: Mutex<S>,
    active: Mutex<HashMap<u32, Active>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Duplex> Responder for Shared<S> {
    fn send(&self, request_id: u32, message: &Message) -> bool {
        let mut writer = lock(&self.writer);
        match write_frame(&mut *writer, request_id, message) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(
                    "request {request_id}: cannot send {:?}: {e}",
                    message.frame_type()
                );
                false
            }
        }
    }

    fn finish(&self, request_id: u32) {
        self.active().remove(&request_id);
    }
}

impl<S> Shared<S> {
    /// The requests in flight.
    pub(super) fn active(&self) -> MutexGuard<'_, HashMap<u32, Active>> {
        lock(&self.active)
    }
}

fn decode_error_reply(error: &DecodeError) -> ErrorReply {
    let code = match error {
        DecodeError::Oversize { .. } => ErrorCode::Oversize,
        DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        DecodeError::Truncated { .. }
        | DecodeError::Undersize { .. }
        | DecodeError::BadBody { .. } => ErrorCode::Malformed,
    };
    reply(code, error.to_string())
}

/// Tells a connection over the limit why it is closed.
pub(super) fn refuse<S: Duplex>(mut stream: S, count: usize) {
    let message = Message::Error(reply(
        ErrorCode::Limit,
        format!("{count} connections already open; the agent serves at most {MAX_CONNECTIONS}"),
    ));
    let _ = write_frame(&mut stream, CONNECTION_REQUEST_ID, &message);
    let _ = stream.shutdown_both();
}

/// Serves one connection until it ends. Never panics or exits because of the peer.
pub(super) fn serve<S: Duplex>(agent: Arc<Agent>, stream: S) {
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            tracing::warn!("connection: cannot clone stream: {e}");
            return;
        }
    };
    let closer = stream.try_clone();
    let shared = Arc::new(Shared {
        writer: Mutex::new(stream),
        active: Mutex::new(HashMap::new()),
    });
    if handshake(&mut reader, &shared) {
        loop {
            match read_frame(&mut reader) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if !dispatch(&agent, &shared, frame) {
                        break;
                    }
                }
                Err(ReadError::Io(e)) => {
                    tracing::debug!("connection: {e}");
                    break;
                }
                Err(ReadError::Decode(e)) => {
                    tracing::warn!("connection: closing after a bad frame: {e}");
                    shared.send_error(CONNECTION_REQUEST_ID, decode_error_reply(&e));
                    break;
                }
            }
        }
    }
    // The workloads of a closed connection do not outlive it.
    for (_, active) in shared.active().iter() {
        match active {
            Active::Exec(control) => control.kill(),
            Active::Tunnel(control) => control.cancel(),
            _ => {}
        }
    }
    if let Ok(closer) = closer {
        let _ = closer.shutdown_both();
    }
}

/// Reads the client's hello and answers it. Returns whether the connection may continue.
fn handshake<S: Duplex>(reader: &mut S, shared: &Shared<S>) -> bool {
    let frame = match read_frame(reader) {
        Ok(Some(frame)) => frame,
        Ok(None) => return false,
        Err(ReadError::Io(e)) => {
            tracing::debug!("handshake: {e}");
            return false;
        }
        Err(ReadError::Decode(e)) => {
            shared.send_error(CONNECTION_REQUEST_ID, decode_error_reply(&e));
            return false;
        }
    };
    let Message::Hello(hello) = frame.message else {
        shared.send_error(
            CONNECTION_REQUEST_ID,
            reply(
                ErrorCode::UnexpectedFrame,
                format!(
                    "expected a hello frame first, got {:?}",
                    frame.message.frame_type()
                ),
            ),
        );
        return false;
    };
    if hello.major != PROTOCOL_MAJOR {
        shared.send_error(
            CONNECTION_REQUEST_ID,
            reply(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client {:?} speaks protocol {}.{}; this agent speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
                    hello.software, hello.major, hello.minor
                ),
            ),
        );
        return false;
    }
    tracing::debug!(
        "hello from {:?} ({}.{})",
        hello.software,
        hello.major,
        hello.minor
    );
    shared.send(
        CONNECTION_REQUEST_ID,
        &Message::Hello(Hello {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            software: software(),
        }),
    )
}

/// Checks that a new request may use `id`.
fn admit<S>(shared: &Shared<S>, id: u32) -> Result<(), ErrorReply> {
    if id == CONNECTION_REQUEST_ID {
        return Err(reply(
            ErrorCode::BadRequest,
            "request id 0 is reserved for the connection",
        ));
    }
    let active = shared.active();
    if active.contains_key(&id) {
        return Err(reply(
            ErrorCode::RequestIdInUse,
            format!("request id {id} is already in flight"),
        ));
    }
    if active.len() >= MAX_REQUESTS_PER_CONNECTION {
        return Err(reply(
            ErrorCode::Limit,
            format!(
                "{} requests in flight; at most {MAX_REQUESTS_PER_CONNECTION}",
                active.len()
            ),
        ));
    }
    Ok(())
}

fn stdin_sender<S>(shared: &Shared<S>, id: u32) -> Option<SyncSender<Vec<u8>>> {
    match shared.active().get(&id) {
        Some(Active::Exec(control)) => control.stdin.clone(),
        _ => None,
    }
}

/// Cancels request `id`, if it is in flight: a process's group is killed (its exit is
/// still reported), a write is dropped. A read runs to its end (its frames are the
/// client's to ignore).
fn cancel<S>(shared: &Shared<S>, id: u32) {
    let mut active = shared.active();
    match active.get(&id) {
        Some(Active::Exec(control)) => control.kill(),
        Some(Active::WriteFile(_) | Active::FailedWrite) => {
            tracing::info!("request {id}: write cancelled");
            active.remove(&id);
        }
        Some(Active::Tunnel(control)) => control.cancel(),
        Some(Active::ReadFile) | None => {}
    }
}

/// Acts on one frame. Returns false when the connection must close.
fn dispatch<S: Duplex>(agent: &Arc<Agent>, shared: &Arc<Shared<S>>, frame: Frame) -> bool {
    let id = frame.request_id;
    match frame.message {
        Message::Ping => {
            shared.send(id, &Message::Ready(agent.ready_info()));
        }
        Message::Exec(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match exec::spawn(agent, request) {
                Ok(mut running) => {
                    shared.active().insert(id, Active::Exec(running.control()));
                    exec::supervise(running, Arc::clone(shared), id);
                }
                Err(e) => {
                    shared.send_error(id, e);
                }
            }
        }
        Message::Stdin(data) => {
            // Stdin for a process that already ended is dropped: the race is normal.
            if let Some(sender) = stdin_sender(shared, id) {
                let _ = sender.send(data);
            }
        }
        Message::StdinClose => {
            if let Some(Active::Exec(control)) = shared.active().get_mut(&id) {
                control.stdin = None;
            }
        }
        Message::Resize(size) => match shared.active().get(&id) {
            Some(Active::Exec(control)) => control.resize(size),
            _ => tracing::debug!("request {id}: resize for no running process"),
        },
        Message::Signal(signal) => match shared.active().get(&id) {
            Some(Active::Exec(control)) => control.signal(signal.signal),
            _ => tracing::debug!("request {id}: signal for no running process"),
        },
        Message::WriteFile(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match WriteSink::open(&request) {
                Ok(sink) => {
                    shared.active().insert(id, Active::WriteFile(sink));
                }
                Err(e) => {
                    // The data already on its way is dropped quietly until the end frame.
                    shared.active().insert(id, Active::FailedWrite);
                    shared.send_error(id, e);
                }
            }
        }
        Message::FileData(data) => {
            let taken = shared.active().remove(&id);
            match taken {
                Some(Active::WriteFile(mut sink)) => match sink.write(&data) {
                    Ok(()) => {
                        shared.active().insert(id, Active::WriteFile(sink));
                    }
                    Err(e) => {
                        shared.active().insert(id, Active::FailedWrite);
                        shared.send_error(id, e);
                    }
                },
                Some(Active::FailedWrite) => {
                    shared.active().insert(id, Active::FailedWrite);
                }
                Some(other) => {
                    shared.active().insert(id, other);
                    return shared.send_error(
                        id,
                        reply(
                            ErrorCode::UnexpectedFrame,
                            format!("request {id} is not a file write"),
                        ),
                    );
                }
                None => {
                    return shared.send_error(
                        id,
                        reply(
                            ErrorCode::UnexpectedFrame,
                            format!("no file write {id} in flight"),
                        ),
                    );
                }
            }
        }
        Message::FileEnd => {
            let taken = shared.active().remove(&id);
            match taken {
                Some(Active::WriteFile(sink)) => match sink.finish() {
                    Ok(done) => {
                        shared.send(id, &Message::FileDone(done));
                    }
                    Err(e) => {
                        shared.send_error(id, e);
                    }
                },
                Some(Active::FailedWrite) => {}
                Some(other) => {
                    shared.active().insert(id, other);
                    return shared.send_error(
                        id,
                        reply(
                            ErrorCode::UnexpectedFrame,
                            format!("request {id} is not a file write"),
                        ),
                    );
                }
                None => {
                    return shared.send_error(
                        id,
                        reply(
                            ErrorCode::UnexpectedFrame,
                            format!("no file write {id} in flight"),
                        ),
                    );
                }
            }
        }
        Message::ReadFile(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match files::open_for_read(&request) {
                Ok(file) => {
                    shared.active().insert(id, Active::ReadFile);
                    files::stream_file(file, Arc::clone(shared), id);
                }
                Err(e) => {
                    shared.send_error(id, e);
                }
            }
        }
        Message::MakeDir(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match dirs::make_dir(&request) {
                Ok(()) => shared.send(id, &Message::FileDone(FileDone { size: 0 })),
                Err(e) => shared.send_error(id, e),
            };
        }
        Message::ListDir(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match dirs::list_dir(&request) {
                Ok(entries) => {
                    for batch in entries.chunks(dirs::ENTRIES_PER_FRAME) {
                        let frame = Message::DirEntries(DirEntries {
                            entries: batch.to_vec(),
                        });
                        if !shared.send(id, &frame) {
                            return true;
                        }
                    }
                    let size = u64::try_from(entries.len()).unwrap_or(u64::MAX);
                    shared.send(id, &Message::FileDone(FileDone { size }));
                }
                Err(e) => {
                    shared.send_error(id, e);
                }
            }
        }
        Message::Connect(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            match tunnel::open(&request) {
                Ok((control, stream)) => {
                    shared.active().insert(id, Active::Tunnel(control));
                    shared.send(id, &Message::Connected);
                    tunnel::relay_to_host(stream, Arc::clone(shared), id);
                }
                Err(e) => {
                    shared.send_error(id, e);
                }
            }
        }
        Message::Data(data) => {
            let sender = match shared.active().get(&id) {
                Some(Active::Tunnel(control)) => control.to_guest.clone(),
                _ => None,
            };
            // Bytes for a connection the guest already closed are dropped: the race is
            // normal. Sent outside the lock: a full queue waits for the guest program.
            if let Some(sender) = sender {
                let _ = sender.send(data);
            }
        }
        Message::DataEnd => {
            if let Some(Active::Tunnel(control)) = shared.active().get_mut(&id) {
                control.to_guest = None;
            }
        }
        Message::Shutdown(request) => {
            tracing::info!("request {id}: shutdown (reboot: {})", request.reboot);
            shared.send(id, &Message::ShutdownAck);
            agent.power_off(request);
        }
        Message::Pause => {
            shared.send_error(
                id,
                reply(
                    ErrorCode::BadRequest,
                    "pause is a sandbox's, answered by its supervisor; the agent does not pause",
                ),
            );
        }
        Message::Reseed(request) => {
            if let Err(e) = admit(shared, id) {
                return shared.send_error(id, e);
            }
            let answer = if agent.pid1 {
                reseed::apply(&request).map(Message::Reseeded)
            } else {
                Err(reply(
                    ErrorCode::PermissionDenied,
                    "a reseed sets the kernel's RNG, clock and hostname: only the agent \
                     that is the guest's PID 1 does it",
                ))
            };
            match answer {
                Ok(done) => shared.send(id, &done),
                Err(e) => shared.send_error(id, e),
            };
        }
        Message::Error(error) => {
            tracing::debug!(
                "request {id}: client reports {:?}: {}",
                error.code,
                error.message
            );
            // An error frame from the client for a request in flight cancels it
            // (protocol 1.1): a process is killed, a write is dropped (an atomic one
            // leaves nothing), a read stops being routed.
            if id != CONNECTION_REQUEST_ID {
                cancel(shared, id);
            }
        }
        other @ (Message::Hello(_)
        | Message::Ready(_)
        | Message::Stdout(_)
        | Message::Stderr(_)
        | Message::Exit(_)
        | Message::FileDone(_)
        | Message::DirEntries(_)
        | Message::Connected
        | Message::ShutdownAck
        | Message::Reseeded(_)) => {
            shared.send_error(
                CONNECTION_REQUEST_ID,
                reply(
                    ErrorCode::UnexpectedFrame,
                    format!("a client does not send {:?} frames", other.frame_type()),
                ),
            );
            return false;
        }
    }
    true
}
