//! The host side of the protocol: a client that multiplexes requests over one connection.
//!
//! A reader thread routes every frame from the agent to the request it belongs to, so
//! several requests may be in flight at once. Each request's queue is bounded: a consumer
//! that stops reading eventually stalls the reader (and so the whole connection), which is
//! the flow control that keeps a flooding guest from growing host memory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::protocol::{
    read_frame, write_frame, DirEntry, ErrorReply, ExecRequest, ExecSignal, ExitStatus, FileDone,
    Hello, ListDirRequest, MakeDirRequest, Message, ReadError, ReadFileRequest, ReadyInfo,
    ReseedRequest, Reseeded, ShutdownRequest, WriteError, WriteFileRequest, CONNECTION_REQUEST_ID,
    DATA_CHUNK, MAX_DIR_ENTRIES, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use crate::transport::Duplex;

/// Frames buffered per request before the reader thread waits for its consumer.
const REQUEST_QUEUE: usize = 64;
/// Default cap on [`Client::read_file`].
pub const DEFAULT_READ_LIMIT: u64 = 256 << 20;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Writing to the connection failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Reading from the connection failed or the agent sent a bad frame.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The agent answered the request (or the connection) with an error.
    #[error("agent error ({:?}): {}", .0.code, .0.message)]
    Agent(ErrorReply),
    /// The connection ended before the answer arrived.
    #[error("connection to the agent closed{}", .0.as_ref().map(|r| format!(": {:?}: {}", r.code, r.message)).unwrap_or_default())]
    Closed(Option<ErrorReply>),
    /// The agent sent a frame that does not belong in this exchange.
    #[error("unexpected {0} frame from the agent")]
    Unexpected(String),
    /// No answer within the time allowed.
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// A file is larger than the caller allowed.
    #[error("file {path:?} exceeds the read limit of {limit} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The connection could not be set up.
    #[error("connection setup: {0}")]
    Setup(#[from] std::io::Error),
    /// The caller's source or destination of a file transfer failed.
    #[error("{0}")]
    Source(std::io::Error),
}

struct Inner {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<HashMap<u32, SyncSender<Message>>>,
    /// Set when the connection ends: the agent's connection-level error, if any.
    closed: Mutex<Option<Option<ErrorReply>>>,
    next_id: AtomicU32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Sends `data` as `frame` messages of at most [`DATA_CHUNK`] bytes each.
    fn send_chunked(
        &self,
        id: u32,
        data: &[u8],
        frame: fn(Vec<u8>) -> Message,
    ) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.send(id, &frame(chunk.to_vec()))?;
        }
        Ok(())
    }

    fn send(&self, id: u32, message: &Message) -> Result<(), ClientError> {
        let mut writer = lock(&self.writer);
        write_frame(&mut *writer, id, message)?;
        Ok(())
    }

    /// Registers a new request and returns its id and answer queue.
    fn register(&self) -> Result<(u32, Receiver<Message>), ClientError> {
        if let Some(reason) = lock(&self.closed).clone() {
            return Err(ClientError::Closed(reason));
        }
        let (tx, rx) = mpsc::sync_channel(REQUEST_QUEUE);
        let mut pending = lock(&self.pending);
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != CONNECTION_REQUEST_ID && !pending.contains_key(&id) {
                break id;
            }
        };
        pending.insert(id, tx);
        Ok((id, rx))
    }

    fn forget(&self, id: u32) {
        lock(&self.pending).remove(&id);
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(lock(&self.closed).clone().flatten())
    }

    fn recv(
        &self,
        rx: &Receiver<Message>,
        timeout: Option<Duration>,
    ) -> Result<Message, ClientError> {
        match timeout {
            None => rx.recv().map_err(|_| self.closed_error()),
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => ClientError::Timeout(t),
                RecvTimeoutError::Disconnected => self.closed_error(),
            }),
        }
    }
}

/// Whether a message ends its request.
fn is_final(message: &Message) -> bool {
    matches!(
        message,
        Message::Error(_)
            | Message::Ready(_)
            | Message::Exit(_)
            | Message::FileDone(_)
            | Message::ShutdownAck
    )
}

fn route(inner: &Inner, mut reader: impl std::io::Read) {
    let reason = loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => {
                if frame.request_id == CONNECTION_REQUEST_ID {
                    if let Message::Error(reply) = frame.message {
                        break Some(reply);
                    }
                    continue;
                }
                let last = is_final(&frame.message);
                let sender = if last {
                    lock(&inner.pending).remove(&frame.request_id)
                } else {
                    lock(&inner.pending).get(&frame.request_id).cloned()
                };
                if let Some(sender) = sender {
                    if sender.send(frame.message).is_err() {
                        // The caller stopped listening to this request.
                        inner.forget(frame.request_id);
                    }
                }
            }
            Ok(None) => break None,
            Err(e) => {
                tracing::debug!("agent connection: {e}");
                break None;
            }
        }
    };
    *lock(&inner.closed) = Some(reason);
    // Dropping the senders wakes every waiter with "closed".
    lock(&inner.pending).clear();
}

/// A connection to the agent.
pub struct Client {
    inner: Arc<Inner>,
    agent_hello: Hello,
    closer: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("agent", &self.agent_hello)
            .finish()
    }
}

/// What a caller gives a process as stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stdin {
    /// Nothing (end of file at once).
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// Bytes the caller writes through [`Exec::write_stdin`], until [`Exec::close_stdin`].
    Stream,
}

/// One thing a running process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// It wrote to stdout.
    Stdout(Vec<u8>),
    /// It wrote to stderr.
    Stderr(Vec<u8>),
    /// It ended; no further events follow.
    Exit(ExitStatus),
}

/// Everything a finished process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

/// Writes a running process's stdin; can be moved to another thread.
#[derive(Clone)]
pub struct ExecStdin {
    inner: Arc<Inner>,
    id: u32,
}

impl ExecStdin {
    /// Sends bytes to the process's stdin, in frames of at most [`DATA_CHUNK`] bytes.
    pub fn write(&self, data: &[u8]) -> Result<(), ClientError> {
        self.inner.send_chunked(self.id, data, Message::Stdin)
    }

    /// Ends the process's stdin.
    pub fn close(&self) -> Result<(), ClientError> {
        self.inner.send(self.id, &Message::StdinClose)
    }
}

/// A process running in the guest.
pub struct Exec {
    inner: Arc<Inner>,
    id: u32,
    events: Receiver<Message>,
    done: bool,
}

impl Exec {
    /// The request id (for logs).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends bytes to the process's stdin (only with [`Stdin::Stream`]).
    ///
    /// This blocks when the process does not read its stdin. A caller that sends much
    /// stdin should do so from another thread ([`Exec::stdin`]) while reading events here,
    /// or a process that writes as much as it reads (`cat`) stalls both directions.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        self.stdin().write(data)
    }

    /// Ends the process's stdin.
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.stdin().close()
    }

    /// A handle that writes this process's stdin from any thread.
    pub fn stdin(&self) -> ExecStdin {
        ExecStdin {
            inner: Arc::clone(&self.inner),
            id: self.id,
        }
    }

    /// Sends a signal to the process's group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.inner
            .send(self.id, &Message::Signal(ExecSignal { signal }))
    }

    /// Changes the size of the process's terminal (one asked for with `tty`).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.inner.send(
            self.id,
            &Message::Resize(crate::protocol::TtySize { rows, cols }),
        )
    }

    /// Waits for the next event; `Ok(None)` after the exit event.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        self.next_event_within(None)
    }

    /// Like [`Exec::next_event`], giving up after `timeout` (so a caller can also watch for
    /// Ctrl-C). A timeout loses nothing: the event is still there on the next call.
    pub fn next_event_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExecEvent>, ClientError> {
        self.next_event_within(Some(timeout))
    }

    fn next_event_within(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let message = self.inner.recv(&self.events, timeout)?;
        match message {
            Message::Stdout(data) => Ok(Some(ExecEvent::Stdout(data))),
            Message::Stderr(data) => Ok(Some(ExecEvent::Stderr(data))),
            Message::Exit(status) => {
                self.done = true;
                Ok(Some(ExecEvent::Exit(status)))
            }
            Message::Error(reply) => {
                self.done = true;
                Err(ClientError::Agent(reply))
            }
            other => {
                self.done = true;
                Err(ClientError::Unexpected(format!("{:?}", other.frame_type())))
            }
        }
    }

    /// Collects all output until the process ends.
    pub fn wait_output(mut self) -> Result<ExecOutput, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event()? {
                Some(ExecEvent::Stdout(data)) => stdout.extend_from_slice(&data),
                Some(ExecEvent::Stderr(data)) => stderr.extend_from_slice(&data),
                Some(ExecEvent::Exit(status)) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
                None => return Err(ClientError::Unexpected("end of events".to_owned())),
            }
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if !self.done {
            self.inner.forget(self.id);
        }
    }
}

/// A TCP connection to a guest port, open (protocol 1.1).
pub struct Tunnel {
    inner: Arc<Inner>,
    id: u32,
    incoming: Receiver<Message>,
    done: bool,
}

/// Sends bytes into a [`Tunnel`]; can be moved to another thread.
#[derive(Clone)]
pub struct TunnelWriter {
    inner: Arc<Inner>,
    id: u32,
}

impl TunnelWriter {
    /// Sends bytes to the guest program, in frames of at most [`DATA_CHUNK`] bytes.
    pub fn write(&self, data: &[u8]) -> Result<(), ClientError> {
        self.inner.send_chunked(self.id, data, Message::Data)
    }

    /// Ends this direction (the guest program reads end of file).
    pub fn close(&self) -> Result<(), ClientError> {
        self.inner.send(self.id, &Message::DataEnd)
    }

    /// Cuts the connection both ways.
    pub fn cancel(&self) -> Result<(), ClientError> {
        let reply = ErrorReply {
            code: crate::protocol::ErrorCode::BadRequest,
            message: "cancelled: the connection closed".to_owned(),
        };
        self.inner.send(self.id, &Message::Error(reply))
    }
}

impl Tunnel {
    /// A handle that sends bytes from any thread.
    pub fn writer(&self) -> TunnelWriter {
        TunnelWriter {
            inner: Arc::clone(&self.inner),
            id: self.id,
        }
    }

    /// The next bytes from the guest program; `Ok(None)` once it closed its side.
    pub fn read(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match self.inner.recv(&self.incoming, None)? {
            Message::Data(data) => Ok(Some(data)),
            Message::DataEnd => {
                self.done = true;
                Ok(None)
            }
            Message::Error(reply) => {
                self.done = true;
                Err(ClientError::Agent(reply))
            }
            other => {
                self.done = true;
                Err(ClientError::Unexpected(format!("{:?}", other.frame_type())))
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.writer().cancel();
            self.inner.forget(self.id);
        }
    }
}

impl Client {
    /// Opens a TCP connection to `127.0.0.1:port` in the guest (protocol 1.1).
    pub fn connect_port(&self, port: u16) -> Result<Tunnel, ClientError> {
        let (id, incoming) = self.inner.register()?;
        let mut tunnel = Tunnel {
            inner: Arc::clone(&self.inner),
            id,
            incoming,
            done: false,
        };
        self.inner.send(
            id,
            &Message::Connect(crate::protocol::ConnectRequest { port }),
        )?;
        match self
            .inner
            .recv(&tunnel.incoming, Some(Duration::from_secs(30)))?
        {
            Message::Connected => Ok(tunnel),
            Message::Error(reply) => {
                tunnel.done = true;
                self.inner.forget(id);
                Err(ClientError::Agent(reply))
            }
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Takes over a connected stream, exchanges hellos, and starts the reader thread.
    ///
    /// Fails with [`ClientError::Agent`] if the agent refuses this client's version.
    pub fn connect<S: Duplex>(stream: S) -> Result<Self, ClientError> {
        Self::connect_with_timeout(stream, None)
    }

    /// Like [`Client::connect`], failing if the agent's hello takes longer than `timeout`.
    pub fn connect_with_timeout<S: Duplex>(
        stream: S,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let mut reader = stream.try_clone()?;
        let closer_stream = stream.try_clone()?;
        let mut writer = stream;
        write_frame(
            &mut writer,
            CONNECTION_REQUEST_ID,
            &Message::Hello(Hello {
                major: PROTOCOL_MAJOR,
                minor: PROTOCOL_MINOR,
                software: format!("mvm-agent-client {}", env!("CARGO_PKG_VERSION")),
            }),
        )?;
        // The handshake is read on a helper thread so that it can time out on any stream.
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("agent-hello".to_owned())
            .spawn(move || {
                let result = read_frame(&mut reader);
                let _ = tx.send((result, reader));
            })?;
        let received = match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|_| {
                let _ = closer_stream.shutdown_both();
                ClientError::Timeout(t)
            })?,
            None => rx.recv().map_err(|_| ClientError::Closed(None))?,
        };
        let (result, reader) = received;
        let agent_hello = match result? {
            Some(frame) => match frame.message {
                Message::Hello(hello) => hello,
                Message::Error(reply) => return Err(ClientError::Agent(reply)),
                other => return Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
            },
            None => return Err(ClientError::Closed(None)),
        };
        if agent_hello.major != PROTOCOL_MAJOR {
            let _ = closer_stream.shutdown_both();
            return Err(ClientError::Unexpected(format!(
                "hello with protocol {}.{} (this client speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR})",
                agent_hello.major, agent_hello.minor
            )));
        }
        let inner = Arc::new(Inner {
            writer: Mutex::new(Box::new(writer)),
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            next_id: AtomicU32::new(1),
        });
        let router = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("agent-reader".to_owned())
            .spawn(move || route(&router, reader))?;
        let closer_stream = Mutex::new(closer_stream);
        Ok(Self {
            inner,
            agent_hello,
            closer: Box::new(move || {
                let _ = lock(&closer_stream).shutdown_both();
            }),
        })
    }

    /// The agent's hello: its protocol version and software.
    pub fn hello(&self) -> &Hello {
        &self.agent_hello
    }

    fn simple_request(
        &self,
        message: &Message,
        timeout: Option<Duration>,
    ) -> Result<Message, ClientError> {
        let (id, rx) = self.inner.register()?;
        if let Err(e) = self.inner.send(id, message) {
            self.inner.forget(id);
            return Err(e);
        }
        let answer = self.inner.recv(&rx, timeout);
        self.inner.forget(id);
        match answer? {
            Message::Error(reply) => Err(ClientError::Agent(reply)),
            other => Ok(other),
        }
    }

    /// Asks the agent whether it is ready, and how long it has been up.
    pub fn ping(&self) -> Result<ReadyInfo, ClientError> {
        self.ping_timeout(None)
    }

    /// Like [`Client::ping`], failing after `timeout` if there is no answer.
    pub fn ping_timeout(&self, timeout: Option<Duration>) -> Result<ReadyInfo, ClientError> {
        match self.simple_request(&Message::Ping, timeout)? {
            Message::Ready(info) => Ok(info),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Starts a process. Its output arrives through the returned [`Exec`].
    ///
    /// The `stdin` flag of `request` is set from `stdin`.
    pub fn exec(&self, request: &ExecRequest, stdin: Stdin) -> Result<Exec, ClientError> {
        let mut request = request.clone();
        request.stdin = stdin != Stdin::Null;
        let (id, events) = self.inner.register()?;
        let exec = Exec {
            inner: Arc::clone(&self.inner),
            id,
            events,
            done: false,
        };
        self.inner.send(id, &Message::Exec(request))?;
        if let Stdin::Bytes(data) = stdin {
            // From a thread, so the caller can read output while stdin is still going in.
            let writer = exec.stdin();
            std::thread::Builder::new()
                .name(format!("agent-stdin-{id}"))
                .spawn(move || {
                    // A failure here also ends the request's events, which report it.
                    if let Err(e) = writer.write(&data).and_then(|()| writer.close()) {
                        tracing::debug!("exec {id}: stdin: {e}");
                    }
                })?;
        }
        Ok(exec)
    }

    /// Writes `data` to a file in the guest, creating or truncating it with `mode`.
    pub fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<FileDone, ClientError> {
        self.write_file_with(
            &WriteFileRequest {
                path: path.to_owned(),
                mode,
                uid: None,
                gid: None,
                append: false,
                atomic: false,
            },
            data,
        )
    }

    /// Writes a file with every option of the request (owner, append).
    pub fn write_file_with(
        &self,
        request: &WriteFileRequest,
        mut data: &[u8],
    ) -> Result<FileDone, ClientError> {
        self.write_file_from(request, &mut data)
    }

    /// Writes a file whose contents are read from `source` as they go: memory stays at
    /// one chunk whatever the size. A read error from `source` cancels the write in the
    /// guest (protocol 1.1; an atomic write then leaves nothing) and is returned as
    /// [`ClientError::Source`].
    pub fn write_file_from(
        &self,
        request: &WriteFileRequest,
        source: &mut dyn Read,
    ) -> Result<FileDone, ClientError> {
        let (id, rx) = self.inner.register()?;
        let mut early = None;
        let mut buf = vec![0u8; DATA_CHUNK];
        let sent = (|| {
            self.inner.send(id, &Message::WriteFile(request.clone()))?;
            loop {
                // The agent answers early only to refuse: stop sending data then.
                if let Ok(answer) = rx.try_recv() {
                    early = Some(answer);
                    break;
                }
                let n = match source.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.cancel(id, &format!("the source failed: {e}"));
                        return Err(ClientError::Source(e));
                    }
                };
                let chunk = buf.get(..n).unwrap_or_default().to_vec();
                self.inner.send(id, &Message::FileData(chunk))?;
            }
            self.inner.send(id, &Message::FileEnd)
        })();
        if let Err(e @ ClientError::Source(_)) = sent {
            self.inner.forget(id);
            return Err(e);
        }
        // An error may arrive before all data is sent; it is the better answer.
        let answer = match (early, sent) {
            (Some(answer), _) => Ok(answer),
            (None, Ok(())) => self.inner.recv(&rx, None),
            (None, Err(e)) => rx.try_recv().map_err(|_| e),
        };
        self.inner.forget(id);
        match answer? {
            Message::FileDone(done) => Ok(done),
            Message::Error(reply) => Err(ClientError::Agent(reply)),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Cancels request `id` in the agent (protocol 1.1: an error frame from the client).
    fn cancel(&self, id: u32, why: &str) {
        let reply = ErrorReply {
            code: crate::protocol::ErrorCode::BadRequest,
            message: format!("cancelled: {why}"),
        };
        if let Err(e) = self.inner.send(id, &Message::Error(reply)) {
            tracing::debug!("request {id}: cannot cancel: {e}");
        }
    }

    /// Reads a whole file from the guest (at most [`DEFAULT_READ_LIMIT`] bytes).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_limited(path, DEFAULT_READ_LIMIT)
    }

    /// Reads a whole file from the guest, failing if it exceeds `limit` bytes.
    pub fn read_file_limited(&self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut contents = Vec::new();
        self.read_file_to(path, limit, &mut contents)?;
        Ok(contents)
    }

    /// Streams a file from the guest into `sink` as it arrives, failing (and cancelling
    /// the read) once it exceeds `limit` bytes or `sink` fails. Returns its size. What
    /// reached `sink` before a failure is the caller's to discard.
    pub fn read_file_to(
        &self,
        path: &str,
        limit: u64,
        sink: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let (id, rx) = self.inner.register()?;
        let result = (|| {
            self.inner.send(
                id,
                &Message::ReadFile(ReadFileRequest {
                    path: path.to_owned(),
                }),
            )?;
            let mut total: u64 = 0;
            loop {
                match self.inner.recv(&rx, None)? {
                    Message::FileData(data) => {
                        total = total.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                        if total > limit {
                            self.cancel(id, "over the read limit");
                            return Err(ClientError::TooLarge {
                                path: path.to_owned(),
                                limit,
                            });
                        }
                        if let Err(e) = sink.write_all(&data) {
                            self.cancel(id, "the destination failed");
                            return Err(ClientError::Source(e));
                        }
                    }
                    Message::FileDone(_) => return Ok(total),
                    Message::Error(reply) => return Err(ClientError::Agent(reply)),
                    other => {
                        return Err(ClientError::Unexpected(format!("{:?}", other.frame_type())))
                    }
                }
            }
        })();
        self.inner.forget(id);
        result
    }

    /// Makes one directory in the guest (protocol 1.1); one already there is fine.
    pub fn make_dir(&self, request: &MakeDirRequest) -> Result<(), ClientError> {
        let (id, rx) = self.inner.register()?;
        let answer = self
            .inner
            .send(id, &Message::MakeDir(request.clone()))
            .and_then(|()| self.inner.recv(&rx, None));
        self.inner.forget(id);
        match answer? {
            Message::FileDone(_) => Ok(()),
            Message::Error(reply) => Err(ClientError::Agent(reply)),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Lists one directory in the guest (protocol 1.1): its entries as they are,
    /// symbolic links not followed. At most [`MAX_DIR_ENTRIES`] entries.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let (id, rx) = self.inner.register()?;
        let result = (|| {
            self.inner.send(
                id,
                &Message::ListDir(ListDirRequest {
                    path: path.to_owned(),
                }),
            )?;
            let mut all = Vec::new();
            loop {
                match self.inner.recv(&rx, None)? {
                    Message::DirEntries(batch) => {
                        all.extend(batch.entries);
                        if all.len() > MAX_DIR_ENTRIES {
                            self.cancel(id, "too many entries");
                            return Err(ClientError::Unexpected(format!(
                                "{path:?}: more than {MAX_DIR_ENTRIES} entries"
                            )));
                        }
                    }
                    Message::FileDone(_) => return Ok(all),
                    Message::Error(reply) => return Err(ClientError::Agent(reply)),
                    other => {
                        return Err(ClientError::Unexpected(format!("{:?}", other.frame_type())))
                    }
                }
            }
        })();
        self.inner.forget(id);
        result
    }

    /// After a restore, before anything else runs in the guest (protocol 1.2): gives
    /// the guest kernel's RNG fresh entropy, the VM its new identity and the host's
    /// clock. An agent older than 1.2 is refused here, before anything is sent.
    pub fn reseed(&self, request: &ReseedRequest) -> Result<Reseeded, ClientError> {
        let hello = &self.agent_hello;
        if (hello.major, hello.minor) < (1, 2) {
            return Err(ClientError::Unexpected(format!(
                "{} speaks protocol {}.{}; a reseed needs 1.2",
                hello.software, hello.major, hello.minor
            )));
        }
        match self.simple_request(&Message::Reseed(request.clone()), None)? {
            Message::Reseeded(done) => Ok(done),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Asks a sandbox's supervisor (on its control socket) to snapshot the VM to disk and
    /// end the session (protocol 1.2). Returns once it has agreed; the snapshot is written
    /// after the connection ends. An agent refuses it.
    pub fn pause(&self) -> Result<(), ClientError> {
        match self.simple_request(&Message::Pause, None)? {
            Message::ShutdownAck => Ok(()),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }

    /// Asks the agent to sync and power the guest off. Returns once the agent acknowledged;
    /// the connection then ends.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        match self.simple_request(&Message::Shutdown(ShutdownRequest::default()), None)? {
            Message::ShutdownAck => Ok(()),
            other => Err(ClientError::Unexpected(format!("{:?}", other.frame_type()))),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        (self.closer)();
    }
}
