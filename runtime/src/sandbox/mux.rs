//! The supervisor's side of a sandbox: one connection to the guest agent,
//! shared by every client of the sandbox's control socket.
//!
//! Clients speak the agent protocol itself (so the agent crate's client is the
//! sandbox's client): a hello, then requests under ids of their own choosing.
//! The multiplexer gives each request a fresh id on the agent connection (never
//! reused, so a late frame of a finished request cannot reach another), passes
//! frames both ways, and on the way notes what the request did: an exec's
//! command digest before the agent hears of it, its output's digests and its
//! status before the client hears of the end; each file's path, size and
//! digest. Those notes go to the run's journal (the audit log) through the
//! serving thread, in order with the run's other records.
//!
//! What the multiplexer decides itself: every write is atomic in the guest
//! (whole or absent), transfers stop at [`MAX_TRANSFER`] bytes, a client that
//! goes away has its requests cancelled in the guest, a `shutdown` from a
//! client stops the sandbox (its VM powers off when the session ends), and
//! the TTL ends the session.

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mvm_agent::protocol::{
    read_frame, write_frame, ErrorCode, ErrorReply, Frame, Hello, Message, ReadError,
    CONNECTION_REQUEST_ID, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use mvm_loader::measure::Sha256Digest;
use sha2::{Digest, Sha256};

use crate::backend::session::{Digested, SessionSnapshots};
use crate::backend::{
    interrupt, RunError, RunJournal, SessionEvent, SessionServer, VmProbe, WorkloadStatus,
};

/// The largest file a transfer moves, either way.
pub const MAX_TRANSFER: u64 = 1 << 30;
/// The most clients connected at once.
const MAX_CLIENTS: usize = 64;
/// How long a client has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for its record to be appended.
const RECORD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the serving thread looks at the TTL, signals and the VM.
const TICK: Duration = Duration::from_millis(50);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error_reply(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorReply {
        code,
        message: message.into(),
    })
}

/// A running digest and byte count.
#[derive(Default)]
struct Tally {
    hash: Sha256,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, data: &[u8]) {
        self.hash.update(data);
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
    }

    fn done(self) -> Digested {
        (Sha256Digest(self.hash.finalize().into()), self.bytes)
    }
}

/// What a request is, for its records.
enum Kind {
    /// A request with nothing to record: a ping, a directory made or listed
    /// (the files copied with them are recorded one by one).
    Plain,
    Exec {
        stdout: Tally,
        stderr: Tally,
    },
    Write {
        path: String,
        data: Tally,
    },
    Read {
        path: String,
        data: Tally,
    },
    Forward {
        port: u16,
        up: Tally,
        down: Tally,
    },
}

/// A request in flight on the agent connection.
struct Route {
    client: Arc<Client>,
    client_id: u32,
    kind: Kind,
    /// Its client went away or it was cut off: frames are dropped until its end.
    detached: bool,
}

/// One client connection.
struct Client {
    id: u64,
    writer: Mutex<UnixStream>,
}

impl Client {
    fn send(&self, request_id: u32, message: &Message) -> bool {
        write_frame(&mut *lock(&self.writer), request_id, message).is_ok()
    }
}

/// What the threads tell the serving thread.
enum Note {
    /// Append this; answer whether it is on disk.
    Record(SessionEvent, Option<SyncSender<bool>>),
    /// A client asked the sandbox to stop.
    Stop,
    /// A client asked the sandbox to pause (snapshot to disk).
    Pause,
    /// The agent connection ended.
    AgentClosed(String),
    /// The last client left a sandbox that lives only as long as its clients.
    Abandoned,
}

/// What the threads share.
struct Hub {
    agent: Mutex<UnixStream>,
    /// Agent-side id to route.
    routes: Mutex<HashMap<u32, Route>>,
    /// (client, client id) to agent-side id, for the client's later frames.
    by_client: Mutex<HashMap<(u64, u32), u32>>,
    next_agent_id: AtomicU32,
    notes: Sender<Note>,
    clients: AtomicUsize,
    agent_hello: Hello,
    closing: AtomicBool,
    limit: u64,
    /// The guest ports the plan forwards: the only ones a client may connect to.
    ports: Vec<u16>,
    /// Whether the session ends when its last client leaves.
    ends_with_clients: bool,
    /// Whether a client may pause the sandbox (its VM can be snapshotted).
    pausable: bool,
    /// Environment every exec gets unless it sets the variable itself.
    exec_env: Vec<(String, String)>,
}

impl Hub {
    fn to_agent(&self, id: u32, message: &Message) -> bool {
        write_frame(&mut *lock(&self.agent), id, message).is_ok()
    }

    /// Appends a record through the serving thread and waits until it is on disk.
    fn record(&self, event: SessionEvent) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.notes.send(Note::Record(event, Some(tx))).is_err() {
            return false;
        }
        rx.recv_timeout(RECORD_TIMEOUT).unwrap_or(false)
    }

    /// Cancels agent-side request `id` (protocol 1.1) and detaches it. A write
    /// ends here (the agent drops it without a word, leaving nothing in the
    /// guest); a process's exit and a read's end still come from the agent.
    fn cancel(&self, id: u32, why: &str) {
        let mut routes = lock(&self.routes);
        let is_write = routes.get_mut(&id).is_some_and(|route| {
            route.detached = true;
            matches!(route.kind, Kind::Write { .. })
        });
        let ended = if is_write { routes.remove(&id) } else { None };
        drop(routes);
        self.to_agent(
            id,
            &error_reply(ErrorCode::BadRequest, format!("cancelled: {why}")),
        );
        if let Some(Route {
            client,
            client_id,
            kind: Kind::Write { path, data },
            ..
        }) = ended
        {
            lock(&self.by_client).remove(&(client.id, client_id));
            self.record(SessionEvent::FileWritten {
                request: u64::from(id),
                path,
                data: data.done(),
                complete: false,
            });
        }
    }

    /// A fresh agent-side id (never 0, never reused while the session lives).
    fn fresh_id(&self) -> u32 {
        loop {
            let id = self.next_agent_id.fetch_add(1, Ordering::Relaxed);
            if id != CONNECTION_REQUEST_ID {
                return id;
            }
        }
    }
}

/// Serves a sandbox's control socket on its session.
pub struct Mux {
    socket: PathBuf,
    ttl: Duration,
    on_ready: Box<dyn FnMut(Instant) + Send>,
    ended: Option<&'static str>,
    limit: u64,
    ports: Vec<u16>,
    ends_with_clients: bool,
    pausable: bool,
    snapshots: Option<SessionSnapshots>,
    exec_env: Vec<(String, String)>,
}

/// How long a sandbox that ends with its clients waits for its first one.
const FIRST_CLIENT_WAIT: Duration = Duration::from_secs(60);

impl Mux {
    /// A multiplexer that listens on `socket`, ends the session after `ttl`,
    /// and calls `on_ready` (with the TTL's end) once clients can connect.
    pub fn new(socket: PathBuf, ttl: Duration, on_ready: Box<dyn FnMut(Instant) + Send>) -> Self {
        Self {
            socket,
            ttl,
            on_ready,
            ended: None,
            limit: MAX_TRANSFER,
            ports: Vec::new(),
            ends_with_clients: false,
            pausable: false,
            snapshots: None,
            exec_env: Vec::new(),
        }
    }

    /// Environment every exec gets unless its request sets the variable (a sandbox's
    /// placeholders and the trust variables of secret substitution).
    pub fn with_exec_env(mut self, env: Vec<(String, String)>) -> Self {
        self.exec_env = env;
        self
    }

    /// Gives the session snapshots (the backend starts the VM with them): a client may
    /// then pause the sandbox, the session ending with `pause` and the backend
    /// snapshotting the VM instead of powering it off; and with
    /// [`SessionSnapshots::restore`] the VM starts from one.
    pub fn with_snapshots(mut self, snapshots: SessionSnapshots) -> Self {
        self.pausable = true;
        self.snapshots = Some(snapshots);
        self
    }

    /// Ends the session (`abandoned`) when its last client disconnects, or when
    /// none has connected [`FIRST_CLIENT_WAIT`] after it was ready: a sandbox
    /// that lives only for the program that made it (`mvm run -it`), even if
    /// that program is killed.
    pub fn ends_with_clients(mut self) -> Self {
        self.ends_with_clients = true;
        self
    }

    /// Lets clients connect to these guest ports (the plan's forwards), and no others.
    pub fn forwarded_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// Moves at most `bytes` per file transfer instead of [`MAX_TRANSFER`].
    pub fn transfer_limit(mut self, bytes: u64) -> Self {
        self.limit = bytes;
        self
    }

    /// Why the session ended (`stop`, `pause`, `ttl`, `signal`, `vm_exited`,
    /// `abandoned`), once it has.
    pub fn ended_because(&self) -> Option<&'static str> {
        self.ended
    }
}

/// The hello exchange with the agent, bounded in time.
fn agent_hello(agent: &mut UnixStream) -> Result<Hello, RunError> {
    let failed = |why: String| RunError::Agent(format!("session hello: {why}"));
    agent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| failed(e.to_string()))?;
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        software: format!("mvm-sandbox/{}", env!("CARGO_PKG_VERSION")),
    };
    write_frame(agent, CONNECTION_REQUEST_ID, &Message::Hello(hello))
        .map_err(|e| failed(e.to_string()))?;
    let answer = match read_frame(agent) {
        Ok(Some(Frame {
            message: Message::Hello(h),
            ..
        })) => h,
        Ok(Some(Frame {
            message: Message::Error(e),
            ..
        })) => return Err(failed(format!("{:?}: {}", e.code, e.message))),
        Ok(other) => return Err(failed(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(failed(e.to_string())),
    };
    agent
        .set_read_timeout(None)
        .map_err(|e| failed(e.to_string()))?;
    Ok(answer)
}

impl SessionServer for Mux {
    fn snapshots(&self) -> Option<&SessionSnapshots> {
        self.snapshots.as_ref()
    }

    fn pause_requested(&self) -> bool {
        self.ended == Some("pause")
    }

    fn serve(
        &mut self,
        mut agent: UnixStream,
        journal: &mut dyn RunJournal,
        vm: &mut dyn VmProbe,
    ) -> Result<WorkloadStatus, RunError> {
        let agent_hello = agent_hello(&mut agent)?;
        let _ = std::fs::remove_file(&self.socket);
        let (_dir, bind_path) = super::state::socket_path(&self.socket)
            .map_err(RunError::io(format!("opening {}", self.socket.display())))?;
        let listener = UnixListener::bind(&bind_path).map_err(RunError::io(format!(
            "listening on {}",
            self.socket.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(RunError::io("control socket"))?;
        let (notes_tx, notes) = mpsc::channel();
        let hub = Arc::new(Hub {
            agent: Mutex::new(
                agent
                    .try_clone()
                    .map_err(RunError::io("agent connection"))?,
            ),
            routes: Mutex::new(HashMap::new()),
            by_client: Mutex::new(HashMap::new()),
            next_agent_id: AtomicU32::new(1),
            notes: notes_tx,
            clients: AtomicUsize::new(0),
            agent_hello,
            closing: AtomicBool::new(false),
            limit: self.limit,
            ports: self.ports.clone(),
            ends_with_clients: self.ends_with_clients,
            pausable: self.pausable,
            exec_env: self.exec_env.clone(),
        });
        spawn_agent_reader(agent, Arc::clone(&hub)).map_err(RunError::io("agent reader"))?;
        let deadline = Instant::now() + self.ttl;
        (self.on_ready)(deadline);
        let reason = serve_loop(&listener, &hub, &notes, journal, vm, deadline);
        self.ended = Some(reason);
        hub.closing.store(true, Ordering::SeqCst);
        drop(listener);
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!(reason, "session ending");
        journal.session_event(&SessionEvent::Stopping {
            reason: reason.to_owned(),
        })?;
        // Late records (an exit racing the stop) still go in, before the run's end.
        while let Ok(note) = notes.try_recv() {
            if let Note::Record(event, ack) = note {
                let ok = journal.session_event(&event).is_ok();
                if let Some(ack) = ack {
                    let _ = ack.send(ok);
                }
            }
        }
        Ok(match reason {
            "ttl" => WorkloadStatus {
                code: None,
                signal: None,
                timed_out: true,
            },
            "vm_exited" => {
                return Err(RunError::Agent(
                    "the sandbox's VM ended under its session".into(),
                ))
            }
            _ => WorkloadStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
            },
        })
    }
}

/// Accepts clients and appends records until the session ends; returns why.
fn serve_loop(
    listener: &UnixListener,
    hub: &Arc<Hub>,
    notes: &Receiver<Note>,
    journal: &mut dyn RunJournal,
    vm: &mut dyn VmProbe,
    deadline: Instant,
) -> &'static str {
    let mut next_client = 1u64;
    let ready = Instant::now();
    loop {
        while let Ok((stream, _)) = listener.accept() {
            let id = next_client;
            next_client = next_client.wrapping_add(1);
            spawn_client(stream, id, Arc::clone(hub));
        }
        match notes.recv_timeout(TICK) {
            Ok(Note::Record(event, ack)) => {
                let result = journal.session_event(&event);
                if let Err(e) = &result {
                    tracing::error!("session record: {e}");
                }
                if let Some(ack) = ack {
                    let _ = ack.send(result.is_ok());
                }
            }
            Ok(Note::Stop) => return "stop",
            Ok(Note::Pause) => return "pause",
            Ok(Note::Abandoned) => return "abandoned",
            Ok(Note::AgentClosed(why)) => {
                tracing::warn!("agent connection ended: {why}");
                return "vm_exited";
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return "ttl";
        }
        if hub.ends_with_clients && next_client == 1 && ready.elapsed() > FIRST_CLIENT_WAIT {
            return "abandoned";
        }
        if interrupt::requested() {
            return "signal";
        }
        if let Some(why) = vm.ended() {
            tracing::warn!("{why}");
            return "vm_exited";
        }
        for observed in vm.observed() {
            if let Err(e) = journal.substitution_observed(&observed) {
                tracing::error!("egress proxy record: {e}");
            }
        }
    }
}

fn spawn_agent_reader(mut agent: UnixStream, hub: Arc<Hub>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("agent-reader".into())
        .spawn(move || {
            let why = loop {
                match read_frame(&mut agent) {
                    Ok(Some(frame)) => route_from_agent(&hub, frame),
                    Ok(None) => break "closed".to_owned(),
                    Err(ReadError::Io(e)) => break e.to_string(),
                    Err(ReadError::Decode(e)) => break format!("bad frame: {e}"),
                }
            };
            let _ = hub.notes.send(Note::AgentClosed(why));
        })
        .map(drop)
}

/// Passes one frame from the agent to its client, noting what it says.
fn route_from_agent(hub: &Hub, frame: Frame) {
    let id = frame.request_id;
    if id == CONNECTION_REQUEST_ID {
        tracing::warn!("agent: connection-level {:?}", frame.message.frame_type());
        return;
    }
    let ends = matches!(
        frame.message,
        Message::Exit(_)
            | Message::FileDone(_)
            | Message::Error(_)
            | Message::Ready(_)
            | Message::DataEnd
    );
    let mut routes = lock(&hub.routes);
    let Some(route) = routes.get_mut(&id) else {
        // A late frame of a request already ended (a read cancelled mid-way).
        return;
    };
    let mut cut = None;
    match (&mut route.kind, &frame.message) {
        (Kind::Exec { stdout, .. }, Message::Stdout(data)) => stdout.add(data),
        (Kind::Exec { stderr, .. }, Message::Stderr(data)) => stderr.add(data),
        (Kind::Forward { down, .. }, Message::Data(data)) => down.add(data),
        (Kind::Read { data: tally, .. }, Message::FileData(data)) => {
            tally.add(data);
            if tally.bytes > hub.limit && !route.detached {
                cut = Some(format!(
                    "the file is larger than the transfer limit of {} bytes",
                    hub.limit
                ));
            }
        }
        _ => {}
    }
    if let Some(why) = cut {
        route
            .client
            .send(route.client_id, &error_reply(ErrorCode::Limit, why.clone()));
        route.detached = true;
        drop(routes);
        hub.cancel(id, &why);
        return;
    }
    if !ends {
        if !route.detached && !route.client.send(route.client_id, &frame.message) {
            route.detached = true;
            drop(routes);
            hub.cancel(id, "the client went away");
        }
        return;
    }
    let Some(route) = routes.remove(&id) else {
        return;
    };
    drop(routes);
    lock(&hub.by_client).remove(&(route.client.id, route.client_id));
    if let (Kind::Write { .. }, Message::Error(_)) = (&route.kind, &frame.message) {
        // A refused write waits in the agent for an end frame that the client's
        // later frames (now dropped here) would have brought: clear it.
        hub.to_agent(
            id,
            &error_reply(ErrorCode::BadRequest, "cancelled: the write failed"),
        );
    }
    let error = match &frame.message {
        Message::Error(e) => Some(format!("{:?}: {}", e.code, e.message)),
        _ => None,
    };
    let event = match route.kind {
        Kind::Plain => None,
        Kind::Exec { stdout, stderr } => Some(SessionEvent::ExecExited {
            request: u64::from(id),
            status: match &frame.message {
                Message::Exit(status) => Some(status.shell_code()),
                _ => None,
            },
            stdout: stdout.done(),
            stderr: stderr.done(),
            error,
        }),
        Kind::Write { path, data } => Some(SessionEvent::FileWritten {
            request: u64::from(id),
            path,
            data: data.done(),
            complete: matches!(frame.message, Message::FileDone(_)) && !route.detached,
        }),
        Kind::Read { path, data } => Some(SessionEvent::FileRead {
            request: u64::from(id),
            path,
            data: data.done(),
            complete: matches!(frame.message, Message::FileDone(_)) && !route.detached,
        }),
        Kind::Forward { port, up, down } => Some(SessionEvent::ForwardClosed {
            request: u64::from(id),
            port,
            to_guest: up.bytes,
            from_guest: down.bytes,
            error,
        }),
    };
    // The end is on disk before the client hears of it.
    let recorded = event.is_none_or(|e| hub.record(e));
    if route.detached {
        return;
    }
    if recorded {
        route.client.send(route.client_id, &frame.message);
    } else {
        route.client.send(
            route.client_id,
            &error_reply(
                ErrorCode::Io,
                "the request ended but its record could not be written to the audit log",
            ),
        );
    }
}

fn spawn_client(stream: UnixStream, id: u64, hub: Arc<Hub>) {
    let _ = stream.set_nonblocking(false);
    if hub.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        hub.clients.fetch_sub(1, Ordering::SeqCst);
        let mut stream = stream;
        let _ = write_frame(
            &mut stream,
            CONNECTION_REQUEST_ID,
            &error_reply(
                ErrorCode::Limit,
                format!("the sandbox serves at most {MAX_CLIENTS} clients at once"),
            ),
        );
        return;
    }
    let spawned = std::thread::Builder::new()
        .name(format!("client-{id}"))
        .spawn({
            let hub = Arc::clone(&hub);
            move || {
                serve_client(stream, id, &hub);
                if hub.clients.fetch_sub(1, Ordering::SeqCst) == 1 && hub.ends_with_clients {
                    let _ = hub.notes.send(Note::Abandoned);
                }
            }
        });
    if let Err(e) = spawned {
        hub.clients.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("cannot start a client thread: {e}");
    }
}

/// Reads the client's hello and answers with the agent's version.
fn client_hello(reader: &mut UnixStream, client: &Client, hub: &Hub) -> bool {
    let _ = reader.set_read_timeout(Some(HELLO_TIMEOUT));
    let refuse = |code, message: String| {
        client.send(CONNECTION_REQUEST_ID, &error_reply(code, message));
        false
    };
    match read_frame(reader) {
        Ok(Some(Frame {
            message: Message::Hello(hello),
            ..
        })) if hello.major == PROTOCOL_MAJOR => {}
        Ok(Some(Frame {
            message: Message::Hello(hello),
            ..
        })) => {
            return refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client speaks protocol {}.{}; this sandbox speaks {PROTOCOL_MAJOR}",
                    hello.major, hello.minor
                ),
            )
        }
        Ok(Some(frame)) => {
            return refuse(
                ErrorCode::UnexpectedFrame,
                format!(
                    "expected a hello frame first, got {:?}",
                    frame.message.frame_type()
                ),
            )
        }
        Ok(None) => return false,
        Err(e) => return refuse(ErrorCode::Malformed, e.to_string()),
    }
    let _ = reader.set_read_timeout(None);
    client.send(
        CONNECTION_REQUEST_ID,
        &Message::Hello(Hello {
            major: hub.agent_hello.major,
            minor: hub.agent_hello.minor,
            software: format!(
                "mvm-sandbox/{} ({})",
                env!("CARGO_PKG_VERSION"),
                hub.agent_hello.software
            ),
        }),
    )
}

/// Serves one client until it goes away; then cancels what it left running.
fn serve_client(mut reader: UnixStream, id: u64, hub: &Arc<Hub>) {
    let Ok(writer) = reader.try_clone() else {
        return;
    };
    let client = Arc::new(Client {
        id,
        writer: Mutex::new(writer),
    });
    if client_hello(&mut reader, &client, hub) {
        loop {
            if hub.closing.load(Ordering::SeqCst) {
                break;
            }
            match read_frame(&mut reader) {
                Ok(Some(frame)) => {
                    if !route_from_client(hub, &client, frame) {
                        break;
                    }
                }
                Ok(None) | Err(ReadError::Io(_)) => break,
                Err(ReadError::Decode(e)) => {
                    client.send(
                        CONNECTION_REQUEST_ID,
                        &error_reply(ErrorCode::Malformed, e.to_string()),
                    );
                    break;
                }
            }
        }
    }
    // Its requests do not outlive it: processes are killed, writes dropped.
    let left: Vec<u32> = lock(&hub.by_client)
        .iter()
        .filter(|((c, _), _)| *c == id)
        .map(|(_, agent_id)| *agent_id)
        .collect();
    for agent_id in left {
        hub.cancel(agent_id, "the client went away");
    }
    let _ = reader.shutdown(std::net::Shutdown::Both);
}

/// Starts a request: a fresh agent-side id and its route.
fn start(hub: &Hub, client: &Arc<Client>, client_id: u32, kind: Kind) -> Option<u32> {
    if client_id == CONNECTION_REQUEST_ID {
        client.send(
            client_id,
            &error_reply(ErrorCode::BadRequest, "request id 0 is the connection's"),
        );
        return None;
    }
    let mut by_client = lock(&hub.by_client);
    if by_client.contains_key(&(client.id, client_id)) {
        client.send(
            client_id,
            &error_reply(
                ErrorCode::RequestIdInUse,
                format!("request id {client_id} is already in flight"),
            ),
        );
        return None;
    }
    let agent_id = hub.fresh_id();
    by_client.insert((client.id, client_id), agent_id);
    lock(&hub.routes).insert(
        agent_id,
        Route {
            client: Arc::clone(client),
            client_id,
            kind,
            detached: false,
        },
    );
    Some(agent_id)
}

/// Forgets a request that never reached the agent.
fn abandon(hub: &Hub, client: &Client, client_id: u32, agent_id: u32) {
    lock(&hub.routes).remove(&agent_id);
    lock(&hub.by_client).remove(&(client.id, client_id));
}

/// Acts on one frame from a client. Returns false when the connection must close.
fn route_from_client(hub: &Hub, client: &Arc<Client>, frame: Frame) -> bool {
    let cid = frame.request_id;
    match frame.message {
        Message::Ping => {
            if let Some(aid) = start(hub, client, cid, Kind::Plain) {
                hub.to_agent(aid, &Message::Ping);
            }
        }
        message @ (Message::MakeDir(_) | Message::ListDir(_)) => {
            if let Some(aid) = start(hub, client, cid, Kind::Plain) {
                hub.to_agent(aid, &message);
            }
        }
        Message::Exec(mut request) => {
            for (name, value) in &hub.exec_env {
                request
                    .env
                    .entry(name.clone())
                    .or_insert_with(|| value.clone());
            }
            let argv = request.argv.clone();
            let kind = Kind::Exec {
                stdout: Tally::default(),
                stderr: Tally::default(),
            };
            if let Some(aid) = start(hub, client, cid, kind) {
                // Written ahead: the command's record is on disk before it starts.
                let event = SessionEvent::ExecStarted {
                    request: u64::from(aid),
                    argv,
                };
                if !hub.record(event) {
                    abandon(hub, client, cid, aid);
                    client.send(
                        cid,
                        &error_reply(
                            ErrorCode::Io,
                            "not started: its record could not be written to the audit log",
                        ),
                    );
                } else {
                    hub.to_agent(aid, &Message::Exec(request));
                }
            }
        }
        Message::WriteFile(mut request) => {
            // Whole or absent, whatever the client asked (appends excepted).
            request.atomic = !request.append;
            let kind = Kind::Write {
                path: request.path.clone(),
                data: Tally::default(),
            };
            if let Some(aid) = start(hub, client, cid, kind) {
                hub.to_agent(aid, &Message::WriteFile(request));
            }
        }
        Message::ReadFile(request) => {
            let kind = Kind::Read {
                path: request.path.clone(),
                data: Tally::default(),
            };
            if let Some(aid) = start(hub, client, cid, kind) {
                hub.to_agent(aid, &Message::ReadFile(request));
            }
        }
        Message::Connect(request) => {
            if !hub.ports.contains(&request.port) {
                client.send(
                    cid,
                    &error_reply(
                        ErrorCode::PermissionDenied,
                        format!(
                            "guest port {} is not forwarded by this sandbox's plan (forwarded: {:?})",
                            request.port, hub.ports
                        ),
                    ),
                );
                return true;
            }
            let kind = Kind::Forward {
                port: request.port,
                up: Tally::default(),
                down: Tally::default(),
            };
            if let Some(aid) = start(hub, client, cid, kind) {
                hub.record(SessionEvent::ForwardOpened {
                    request: u64::from(aid),
                    port: request.port,
                });
                hub.to_agent(aid, &Message::Connect(request));
            }
        }
        Message::Data(data) => {
            let Some(aid) = lock(&hub.by_client).get(&(client.id, cid)).copied() else {
                return true;
            };
            let mut pass = false;
            if let Some(route) = lock(&hub.routes).get_mut(&aid) {
                if let Kind::Forward { up, .. } = &mut route.kind {
                    up.add(&data);
                    pass = !route.detached;
                }
            }
            if pass {
                hub.to_agent(aid, &Message::Data(data));
            }
        }
        Message::FileData(data) => {
            let Some(aid) = lock(&hub.by_client).get(&(client.id, cid)).copied() else {
                // The rest of a write already ended (refused, cut at the limit).
                return true;
            };
            let mut over = false;
            let mut pass = false;
            if let Some(route) = lock(&hub.routes).get_mut(&aid) {
                if let Kind::Write { data: tally, .. } = &mut route.kind {
                    tally.add(&data);
                    over = tally.bytes > hub.limit && !route.detached;
                    pass = !route.detached && !over;
                }
            }
            if over {
                let why = format!(
                    "the file is larger than the transfer limit of {} bytes",
                    hub.limit
                );
                client.send(cid, &error_reply(ErrorCode::Limit, why.clone()));
                hub.cancel(aid, &why);
            } else if pass {
                hub.to_agent(aid, &Message::FileData(data));
            }
        }
        message @ (Message::FileEnd
        | Message::DataEnd
        | Message::Stdin(_)
        | Message::StdinClose
        | Message::Signal(_)
        | Message::Resize(_)
        | Message::Error(_)) => {
            let Some(aid) = lock(&hub.by_client).get(&(client.id, cid)).copied() else {
                // Stdin or a signal racing the end of its process is normal.
                return true;
            };
            let detached = lock(&hub.routes).get(&aid).is_none_or(|r| r.detached);
            if !detached {
                if let Message::Error(_) = message {
                    hub.cancel(aid, "the client cancelled it");
                } else {
                    hub.to_agent(aid, &message);
                }
            }
        }
        Message::Shutdown(_) => {
            client.send(cid, &Message::ShutdownAck);
            let _ = hub.notes.send(Note::Stop);
        }
        Message::Pause => {
            if hub.pausable {
                client.send(cid, &Message::ShutdownAck);
                let _ = hub.notes.send(Note::Pause);
            } else {
                client.send(
                    cid,
                    &error_reply(
                        ErrorCode::BadRequest,
                        "this sandbox cannot be paused: pausing needs the kvm backend (on the emulated tier the VMM lives inside a test host that ends with the run)",
                    ),
                );
            }
        }
        // The guest's RNG, identity and clock are the supervisor's to set after a
        // restore, never a client's.
        Message::Reseed(_) => {
            client.send(
                cid,
                &error_reply(
                    ErrorCode::PermissionDenied,
                    "a sandbox's reseed is its supervisor's, after a restore; clients do not send it",
                ),
            );
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
            client.send(
                CONNECTION_REQUEST_ID,
                &error_reply(
                    ErrorCode::UnexpectedFrame,
                    format!("a client does not send {:?} frames", other.frame_type()),
                ),
            );
            return false;
        }
    }
    true
}
