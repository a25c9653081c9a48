//! TCP connections to guest ports, opened for the host (a sandbox's port
//! forwards): `127.0.0.1:PORT` in the guest, its bytes relayed as data frames.
//!
//! A writer thread drains the host's bytes into the socket through a small
//! queue (a guest program that stops reading stalls only its own connection's
//! frames, as a process's stdin does); a reader thread sends what the guest
//! program writes, then a data-end frame, which ends the request.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use super::reply::{reply, Responder};
use crate::protocol::{ConnectRequest, ErrorCode, ErrorReply, Message, DATA_CHUNK};

/// Chunks of host bytes queued per connection.
const QUEUE: usize = 4;
/// How long a guest port may take to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection in flight: where the host's bytes go, and how to cut it.
pub(super) struct Control {
    /// The writer thread's queue; `None` once the host ended its direction.
    pub(super) to_guest: Option<SyncSender<Vec<u8>>>,
    stream: TcpStream,
}

impl Control {
    /// Cuts the connection both ways; the reader then ends the request.
    pub(super) fn cancel(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Connects to the guest port a request names and starts the writer thread.
/// The caller registers the returned control, answers `Connected`, then calls
/// [`relay_to_host`] with the stream.
pub(super) fn open(request: &ConnectRequest) -> Result<(Control, TcpStream), ErrorReply> {
    let port = request.port;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            ErrorCode::NotFound
        } else {
            ErrorCode::Io
        };
        reply(code, format!("cannot connect to guest port {port}: {e}"))
    })?;
    let io = |e: std::io::Error| reply(ErrorCode::Io, format!("guest port {port}: {e}"));
    let mut writer = stream.try_clone().map_err(io)?;
    let reader = stream.try_clone().map_err(io)?;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    std::thread::Builder::new()
        .name(format!("tcp-in-{port}"))
        .spawn(move || {
            for chunk in rx {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
            // The host ended its direction.
            let _ = writer.shutdown(Shutdown::Write);
        })
        .map_err(io)?;
    Ok((
        Control {
            to_guest: Some(tx),
            stream,
        },
        reader,
    ))
}

/// Sends what the guest program writes as data frames, then a data-end frame;
/// the request is then over.
pub(super) fn relay_to_host<R: Responder>(mut stream: TcpStream, shared: Arc<R>, id: u32) {
    let worker = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name(format!("tcp-out-{id}"))
        .spawn(move || {
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = buf.get(..n).unwrap_or_default().to_vec();
                        if !worker.send(id, &Message::Data(data)) {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown(Shutdown::Both);
            worker.finish(id);
            worker.send(id, &Message::DataEnd);
        });
    if let Err(e) = spawned {
        shared.finish(id);
        shared.send_error(
            id,
            reply(ErrorCode::Io, format!("cannot start a relay: {e}")),
        );
    }
}
