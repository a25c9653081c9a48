//! Sandboxes: VMs that stay up across many calls, with no daemon.
//!
//! [`create`] admits a plan (the sandbox's TTL is its timeout), starts the
//! sandbox's own supervisor process (`mvm __sandbox-supervise`, see
//! [`supervisor`]) and returns once the guest agent is ready. The supervisor
//! boots the VM, then serves the sandbox's control socket ([`mux`]): any
//! number of clients, each speaking the guest agent's protocol, share its one
//! agent connection, and each exec, file transfer and the stop go into the
//! audit log with the run's other records. [`connect`] gives a
//! [`SandboxClient`] for exec and file transfers; [`stop`] and [`remove`] end
//! it. State lives in the user's runtime directory ([`state`]).
//!
//! ```no_run
//! use mvm_runtime::sandbox::{self, SandboxOptions};
//! use mvm_agent::protocol::ExecRequest;
//! use mvm_agent::Stdin;
//!
//! let info = sandbox::create(&SandboxOptions::default())?;
//! let sb = sandbox::connect(&info.id)?;
//! sb.write_file("/tmp/hello.txt", 0o644, &mut &b"hi\n"[..])?;
//! let request = ExecRequest {
//!     argv: vec!["cat".into(), "/tmp/hello.txt".into()],
//!     ..ExecRequest::default()
//! };
//! let output = sb.exec(&request, Stdin::Null)?.wait_output()?;
//! assert_eq!(output.stdout, b"hi\n");
//! sandbox::stop(&info.id)?;
//! # Ok::<(), sandbox::SandboxError>(())
//! ```

pub mod copy;
mod fork;
pub mod mux;
pub mod pause;
pub mod ports;
pub mod state;
pub mod supervisor;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm_agent::protocol::{ExecRequest, WriteFileRequest};
use mvm_agent::{Client, ClientError, Exec, Stdin};
use mvm_loader::plan::UtcTime;
use rand_core::{OsRng, RngCore};
use serde::Serialize;

use crate::backend::{locate, RunError, Tier};
pub use copy::CopyStats;
pub use fork::fork;
pub use mux::MAX_TRANSFER;
use state::{process_start, Liveness, Sandbox, SandboxConfig, SandboxState, Status};

/// Why a sandbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox by that id or name.
    #[error("no sandbox {0:?} (`mvm sandbox ls` lists them)")]
    NotFound(String),
    /// An id prefix that matches several.
    #[error("{0:?} matches more than one sandbox; give more of its id")]
    Ambiguous(String),
    /// A name that is not allowed.
    #[error("bad sandbox name {0}")]
    BadName(String),
    /// The name is taken.
    #[error("a sandbox named {name:?} already exists ({id}); choose another name, or `mvm sandbox rm {name}`")]
    NameTaken {
        /// The name.
        name: String,
        /// The sandbox that has it.
        id: String,
    },
    /// The sandbox is not serving requests.
    #[error("sandbox {id} is {state}{}", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NotRunning {
        /// Its id.
        id: String,
        /// `starting`, `stopped`, `failed` or `stale` (its supervisor was killed).
        state: String,
        /// Why, as recorded.
        reason: Option<String>,
    },
    /// `rm` of a running sandbox without `--force`.
    #[error("sandbox {0} is running; `mvm sandbox stop` it first, or rm --force")]
    StillRunning(String),
    /// The sandbox did not start.
    #[error("sandbox {id} did not start: {reason}{}", log_tail(.log))]
    Failed {
        /// Its id.
        id: String,
        /// Why.
        reason: String,
        /// The exit status `mvm run` would give the same failure.
        exit_code: Option<i32>,
        /// The end of its supervisor's log.
        log: String,
    },
    /// A state file that does not parse.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A guest path that is not allowed.
    #[error("guest path {path:?}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A transfer over [`MAX_TRANSFER`].
    #[error("{what} is {size} bytes; a transfer moves at most {MAX_TRANSFER} bytes")]
    TooLarge {
        /// The file.
        what: String,
        /// Its size.
        size: u64,
    },
    /// The sandbox or its agent answered with an error.
    #[error("{0}")]
    Agent(#[from] ClientError),
    /// A host-side file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Finding `mvm` or another piece failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl SandboxError {
    /// The exit status `mvm` gives this error: a sandbox that failed to start as
    /// `mvm run` would for the same failure, anything else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Failed {
                exit_code: Some(code),
                ..
            } => *code,
            _ => 1,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

fn log_tail(log: &str) -> String {
    if log.trim().is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines
        .get(lines.len().saturating_sub(10)..)
        .unwrap_or_default();
    format!(
        "\n--- last lines of the sandbox's log ---\n{}",
        crate::terminal::escape_controls(&tail.join("\n"))
    )
}

/// What a new sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOptions {
    /// The image: a name or a digest (prefix).
    pub image: String,
    /// A name to find it by, unique among this user's sandboxes.
    pub name: Option<String>,
    /// How long it lives before its supervisor stops it.
    pub ttl: Duration,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// The backend; `None` takes the best one this host offers.
    pub backend: Option<Tier>,
    /// Development mode: no admission, nothing verified or audited.
    pub dev: bool,
    /// Stored secrets to put into `/run/secrets/NAME` after the verified boot.
    pub secrets: Vec<String>,
    /// How long `create` waits for the sandbox to be ready.
    pub ready_timeout: Duration,
    /// TCP forwards `(host, guest)`: `127.0.0.1:host` reaches `127.0.0.1:guest` in
    /// the guest (pinned in the plan).
    pub ports: Vec<(u16, u16)>,
    /// Lives only while a client is connected: stopped when the last one
    /// disconnects (or when none connected within a minute of `create`), then
    /// removed by its supervisor. What `mvm run -it` makes, so that a killed
    /// `mvm` leaves no VM behind.
    pub ephemeral: bool,
    /// Its network, as `mvm run`'s `--net`, `--allow` and `--dns` (docs/net.md).
    pub net: crate::net::run::NetFlags,
    /// Stored secrets it sees only as placeholders, substituted on its HTTPS egress to
    /// the hosts each is bound to (docs/secrets.md).
    pub substitutions: Vec<crate::secrets::SubstitutionRequest>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            image: crate::image::DEFAULT_IMAGE.to_owned(),
            name: None,
            ttl: Duration::from_secs(15 * 60),
            cpus: 1,
            mem_mib: 256,
            backend: None,
            dev: false,
            secrets: Vec::new(),
            ready_timeout: Duration::from_secs(300),
            ports: Vec::new(),
            ephemeral: false,
            net: crate::net::run::NetFlags::default(),
            substitutions: Vec::new(),
        }
    }
}

/// A sandbox as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// Its image reference.
    pub image: String,
    /// `starting`, `ready`, `paused`, `stopped`, `failed` or `stale`.
    pub status: String,
    /// The tier it runs on.
    pub tier: Option<Tier>,
    /// When it was created.
    pub created: UtcTime,
    /// When its TTL ends.
    pub expires: Option<UtcTime>,
    /// Why it stopped or failed.
    pub reason: Option<String>,
    /// Its supervisor's pid.
    pub pid: Option<u32>,
}

fn status_word(state: Option<&SandboxState>) -> String {
    match Sandbox::liveness(state) {
        Liveness::Stale => "stale".to_owned(),
        _ => match state.map(|s| s.status) {
            Some(Status::Starting) | None => "starting",
            Some(Status::Ready) => "ready",
            Some(Status::Stopped) => "stopped",
            Some(Status::Failed) => "failed",
            Some(Status::Paused) => "paused",
        }
        .to_owned(),
    }
}

pub(crate) fn info_of(sandbox: &Sandbox) -> Result<SandboxInfo, SandboxError> {
    let config = sandbox.config()?;
    let state = sandbox.state()?;
    Ok(SandboxInfo {
        id: config.id,
        name: config.name,
        image: config.image,
        status: status_word(state.as_ref()),
        tier: state.as_ref().and_then(|s| s.tier),
        created: config.created,
        expires: state.as_ref().and_then(|s| s.expires),
        reason: state.as_ref().and_then(|s| s.reason.clone()),
        pid: state.as_ref().map(|s| s.pid),
    })
}

/// Every sandbox of this user, oldest id order (stale ones included).
pub fn list() -> Vec<SandboxInfo> {
    Sandbox::all_in(&state::root())
        .iter()
        .filter_map(|s| info_of(s).ok())
        .collect()
}

/// One sandbox, by id, id prefix or name.
pub fn info(reference: &str) -> Result<SandboxInfo, SandboxError> {
    info_of(&Sandbox::find_in(&state::root(), reference)?)
}

pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 8];
    OsRng.fill_bytes(&mut bytes);
    format!("sb-{}", hex::encode(bytes))
}

fn read_log(sandbox: &Sandbox) -> String {
    std::fs::read(sandbox.log())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Creates a sandbox and waits until it is ready (or failed). On success its
/// supervisor keeps it alive after this process exits.
pub fn create(options: &SandboxOptions) -> Result<SandboxInfo, SandboxError> {
    if let Some(name) = &options.name {
        state::check_name(name)?;
    }
    locate::mvm_binary()?;
    let config = SandboxConfig {
        id: new_id(),
        name: options.name.clone(),
        image: options.image.clone(),
        backend: options.backend,
        cpus: options.cpus,
        mem_mib: options.mem_mib,
        ttl_secs: options.ttl.as_secs().max(1),
        dev: options.dev,
        secrets: options.secrets.clone(),
        ports: options.ports.clone(),
        ephemeral: options.ephemeral,
        net: options.net.clone(),
        substitutions: options.substitutions.clone(),
        created: UtcTime::now(),
    };
    let root = state::root();
    let sandbox = Sandbox::create_in(&root, &config)?;
    start_supervisor(&sandbox, &config.id, options.ready_timeout, false).inspect_err(|e| {
        if matches!(e, SandboxError::Io { .. }) {
            let _ = sandbox.clone().remove(&root);
        }
    })?;
    info_of(&sandbox)
}

/// Starts `sandbox`'s supervisor (`resume`: from its snapshot), detached in a session of
/// its own, and waits until the sandbox is ready, or failed, or `ready_timeout` passed.
fn start_supervisor(
    sandbox: &Sandbox,
    id: &str,
    ready_timeout: Duration,
    resume: bool,
) -> Result<(), SandboxError> {
    let mvm = locate::mvm_binary()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sandbox.log())
        .map_err(|e| SandboxError::io("creating the sandbox log", e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| SandboxError::io("the sandbox log", e))?;
    let mut command = Command::new(&mvm);
    command
        .arg("__sandbox-supervise")
        .arg(sandbox.dir())
        .args(resume.then_some("--resume"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe and touches no memory of this
    // process: the supervisor leaves the terminal's session and process group,
    // so neither Ctrl-C nor the terminal closing reaches it.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| SandboxError::io(format!("starting {}", mvm.display()), e))?;
    let pid = child.id();
    if sandbox.state()?.is_none() {
        // Until the supervisor writes its own: `ls` sees it starting, not stale.
        sandbox.set_state(&SandboxState::starting(pid))?;
    }
    let start = Instant::now();
    let outcome = loop {
        if let Some(state) = sandbox.state()? {
            match state.status {
                Status::Ready => break Ok(()),
                Status::Failed | Status::Stopped => {
                    break Err(SandboxError::Failed {
                        id: id.to_owned(),
                        reason: state.reason.unwrap_or_else(|| "it stopped".into()),
                        exit_code: state.exit_code,
                        log: String::new(),
                    })
                }
                // A resume's sandbox is paused until its supervisor says otherwise.
                Status::Starting | Status::Paused => {}
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Its last state may have landed between the two looks.
            let last = sandbox.state()?;
            if last.as_ref().is_some_and(|s| {
                matches!(s.status, Status::Ready | Status::Failed | Status::Stopped)
            }) {
                continue;
            }
            break Err(SandboxError::Failed {
                id: id.to_owned(),
                reason: last
                    .and_then(|s| s.reason)
                    .unwrap_or_else(|| format!("its supervisor exited ({status})")),
                exit_code: None,
                log: read_log(sandbox),
            });
        }
        if start.elapsed() > ready_timeout {
            let _ = child.kill();
            break Err(SandboxError::Failed {
                id: id.to_owned(),
                reason: format!("not ready within {:?}; stopped", ready_timeout),
                exit_code: None,
                log: read_log(sandbox),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The supervisor outlives this process; while this one lives, it is reaped
    // here when it exits (no zombie under a long-running program).
    let _ = std::thread::Builder::new()
        .name("sandbox-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    outcome
}

/// How long `pause` waits for the snapshot to be written and sealed.
pub const PAUSE_WAIT: Duration = Duration::from_secs(180);

/// Pauses the ready sandbox `reference` names: its VM is snapshotted to disk and
/// sealed, and no process runs for it until [`resume`]. Waits up to `wait`.
/// Needs the kvm backend.
pub fn pause(reference: &str, wait: Duration) -> Result<SandboxInfo, SandboxError> {
    let sandbox = Sandbox::find_in(&state::root(), reference)?;
    let config = sandbox.config()?;
    if config.has_network() {
        return Err(SandboxError::NotRunning {
            id: config.id,
            state: "not pausable".into(),
            reason: Some(
                "it has a network: its tap, its egress table and any egress proxy (with the run's CA key, in memory only) live with its supervisor and would not come back with a resume".into(),
            ),
        });
    }
    let client = connect(reference)?;
    client.client.pause()?;
    drop(client);
    let start = Instant::now();
    loop {
        let mut state = sandbox.state()?;
        let stale = Sandbox::liveness(state.as_ref()) == Liveness::Stale;
        if stale {
            // The supervisor writes `paused` and then ends: it may have done both between
            // the read above and the liveness check. The state read after its end is its
            // last word.
            state = sandbox.state()?;
        }
        match state.as_ref().map(|s| s.status) {
            Some(Status::Paused) => return info_of(&sandbox),
            Some(Status::Failed | Status::Stopped) => {
                let info = info_of(&sandbox)?;
                return Err(SandboxError::Failed {
                    id: info.id,
                    reason: info.reason.unwrap_or_else(|| "it stopped".into()),
                    exit_code: state.and_then(|s| s.exit_code),
                    log: read_log(&sandbox),
                });
            }
            _ if stale => {
                return Err(SandboxError::NotRunning {
                    id: info_of(&sandbox)?.id,
                    state: "stale".into(),
                    reason: Some("its supervisor ended while pausing".into()),
                });
            }
            _ => {}
        }
        if start.elapsed() > wait {
            return Err(SandboxError::NotRunning {
                id: info_of(&sandbox)?.id,
                state: "still pausing".into(),
                reason: Some(format!("not paused within {wait:?}")),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resumes the paused sandbox `reference` names from its sealed snapshot (admitted and
/// audited as a restore), and waits until it is ready. Its TTL goes on from what was
/// left at the pause; its files and processes are as they were.
pub fn resume(reference: &str, ready_timeout: Duration) -> Result<SandboxInfo, SandboxError> {
    let sandbox = Sandbox::find_in(&state::root(), reference)?;
    let config = sandbox.config()?;
    // One resume at a time: the second finds the first's `starting`.
    let lock = sandbox.lock()?;
    let paused = match sandbox.state()? {
        Some(s) if s.status == Status::Paused => s,
        other => {
            return Err(SandboxError::NotRunning {
                id: config.id,
                state: status_word(other.as_ref()),
                reason: Some("only a paused sandbox resumes".into()),
            })
        }
    };
    // Starting, on this process's word, until the supervisor writes its own.
    let me = std::process::id();
    sandbox.set_state(&SandboxState {
        status: Status::Starting,
        reason: None,
        exit_code: None,
        ..SandboxState {
            epoch: paused.epoch,
            ttl_left_secs: paused.ttl_left_secs,
            tier: paused.tier,
            ..SandboxState::starting(me)
        }
    })?;
    drop(lock);
    if let Err(e) = start_supervisor(&sandbox, &config.id, ready_timeout, true) {
        // Not started at all: still paused, for another try.
        if sandbox
            .state()?
            .is_some_and(|s| s.status == Status::Starting && s.pid == me)
        {
            sandbox.set_state(&paused)?;
        }
        return Err(e);
    }
    info_of(&sandbox)
}

/// Checks a path in the guest: absolute, no `.` or `..` parts, no NUL.
pub fn check_guest_path(path: &str) -> Result<(), SandboxError> {
    let bad = |reason: &str| SandboxError::BadPath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.starts_with('/') {
        return Err(bad("not absolute"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    for part in Path::new(path).components() {
        match part {
            Component::ParentDir => return Err(bad("has a '..' part")),
            Component::CurDir => return Err(bad("has a '.' part")),
            _ => {}
        }
    }
    if path.split('/').any(|p| p == "." || p == "..") {
        return Err(bad("has a '.' or '..' part"));
    }
    Ok(())
}

/// The guest's working directory for sandbox commands: a tmpfs the workload owns.
pub const WORKDIR: &str = "/work";
/// The unprivileged uid and gid that sandbox commands run as and own copied files.
const WORKLOAD_ID: u32 = mvm_agent::protocol::DEFAULT_WORKLOAD_ID;

/// A connection to a running sandbox.
pub struct SandboxClient {
    id: String,
    client: Client,
}

/// Connects to the sandbox `reference` names; it must be ready.
pub fn connect(reference: &str) -> Result<SandboxClient, SandboxError> {
    let sandbox = Sandbox::find_in(&state::root(), reference)?;
    let config = sandbox.config()?;
    let state = sandbox.state()?;
    let word = status_word(state.as_ref());
    if word != "ready" {
        return Err(SandboxError::NotRunning {
            id: config.id,
            state: word,
            reason: state.and_then(|s| s.reason),
        });
    }
    let (_dir, path) = state::socket_path(&sandbox.socket())
        .map_err(|e| SandboxError::io(format!("opening {}", sandbox.dir().display()), e))?;
    let stream = UnixStream::connect(path)
        .map_err(|e| SandboxError::io(format!("connecting to sandbox {}", config.id), e))?;
    let client = Client::connect_with_timeout(stream, Some(Duration::from_secs(10)))?;
    Ok(SandboxClient {
        id: config.id,
        client,
    })
}

impl SandboxClient {
    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts a command in the sandbox; its output streams from the returned [`Exec`].
    /// Several may run at once, from one client or many. Unless the request says
    /// otherwise, it runs in [`WORKDIR`] with `HOME` there, as the unprivileged
    /// workload user. What it starts in the background keeps running after it exits
    /// (until the sandbox stops).
    pub fn exec(&self, request: &ExecRequest, stdin: Stdin) -> Result<Exec, SandboxError> {
        let mut request = request.clone();
        // What a command starts in the background lives on, as in a shell session.
        request.keep_children = true;
        request.cwd.get_or_insert_with(|| WORKDIR.to_owned());
        request
            .env
            .entry("HOME".to_owned())
            .or_insert_with(|| WORKDIR.to_owned());
        Ok(self.client.exec(&request, stdin)?)
    }

    /// Writes `source` to `guest_path` (created with `mode`, owned by the workload user),
    /// atomically: the guest sees the whole file or none of it, also if this process
    /// dies half-way. Returns its size.
    pub fn write_file(
        &self,
        guest_path: &str,
        mode: u32,
        source: &mut dyn Read,
    ) -> Result<u64, SandboxError> {
        check_guest_path(guest_path)?;
        let request = WriteFileRequest {
            path: guest_path.to_owned(),
            mode,
            // The workload's, so that its commands may change what was copied in.
            uid: Some(WORKLOAD_ID),
            gid: Some(WORKLOAD_ID),
            append: false,
            atomic: true,
        };
        let mut limited = source.take(MAX_TRANSFER.saturating_add(1));
        let done = self.client.write_file_from(&request, &mut limited)?;
        Ok(done.size)
    }

    /// Streams the guest file `guest_path` into `sink` (at most [`MAX_TRANSFER`]
    /// bytes). Returns its size.
    pub fn read_file(&self, guest_path: &str, sink: &mut dyn Write) -> Result<u64, SandboxError> {
        check_guest_path(guest_path)?;
        Ok(self.client.read_file_to(guest_path, MAX_TRANSFER, sink)?)
    }

    /// Asks the sandbox to stop; returns once its supervisor acknowledged (the VM
    /// then powers off and the run's records close).
    pub fn stop(&self) -> Result<(), SandboxError> {
        Ok(self.client.shutdown()?)
    }
}

/// Stops the sandbox `reference` names and waits (up to `wait`) until its
/// supervisor recorded the end. A sandbox already stopped is not an error.
pub fn stop_within(reference: &str, wait: Duration) -> Result<SandboxInfo, SandboxError> {
    let sandbox = Sandbox::find_in(&state::root(), reference)?;
    let state = sandbox.state()?;
    if let Some(paused) = state.as_ref().filter(|s| s.status == Status::Paused) {
        // Nothing runs: the snapshot is dropped and the sandbox is stopped.
        let _lock = sandbox.lock()?;
        sandbox.set_state(&SandboxState {
            status: Status::Stopped,
            reason: Some("stop".into()),
            ttl_left_secs: None,
            ..paused.clone()
        })?;
        for dir in [sandbox.snapshot_dir(), sandbox.next_snapshot_dir()] {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(SandboxError::io(format!("removing {}", dir.display()), e));
                }
            }
        }
        return info_of(&sandbox);
    }
    match Sandbox::liveness(state.as_ref()) {
        Liveness::Ended | Liveness::Stale => return info_of(&sandbox),
        Liveness::Live => {}
    }
    match state.as_ref().map(|s| s.status) {
        Some(Status::Ready) => connect(reference)?.stop()?,
        // Still starting: the supervisor stops at SIGTERM (after admission
        // and boot, the way a Ctrl-C stops `mvm run`).
        _ => {
            if let Some(s) = &state {
                terminate(s.pid, s.pid_start, libc::SIGTERM);
            }
        }
    }
    let start = Instant::now();
    loop {
        let state = sandbox.state()?;
        if Sandbox::liveness(state.as_ref()) != Liveness::Live {
            return info_of(&sandbox);
        }
        if start.elapsed() > wait {
            let info = info_of(&sandbox)?;
            return Err(SandboxError::NotRunning {
                id: info.id,
                state: "still stopping".into(),
                reason: Some(format!("not stopped within {wait:?}")),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `wait` until the sandbox `reference` names no longer exists
/// (an ephemeral one, whose supervisor removes it at its end). True if it is gone.
pub fn wait_gone(reference: &str, wait: Duration) -> bool {
    let root = state::root();
    let start = Instant::now();
    loop {
        match Sandbox::find_in(&root, reference) {
            Err(SandboxError::NotFound(_)) => return true,
            _ if start.elapsed() > wait => return false,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// [`stop_within`] two minutes.
pub fn stop(reference: &str) -> Result<SandboxInfo, SandboxError> {
    stop_within(reference, Duration::from_secs(120))
}

/// Signals the supervisor `pid`, if it is still the process that started at `start`.
fn terminate(pid: u32, start: u64, signal: i32) {
    if process_start(pid) != Some(start) {
        return;
    }
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill takes plain integers; `pid` was checked to be the supervisor.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Removes the sandbox `reference` names: its state, socket and log. A running
/// one is refused unless `force`, which stops it first (killing its supervisor,
/// and the VM with it, if it does not stop in time).
pub fn remove(reference: &str, force: bool) -> Result<SandboxInfo, SandboxError> {
    let root = state::root();
    let sandbox = Sandbox::find_in(&root, reference)?;
    let info = info_of(&sandbox)?;
    let state = sandbox.state()?;
    if Sandbox::liveness(state.as_ref()) == Liveness::Live {
        if !force {
            return Err(SandboxError::StillRunning(info.id));
        }
        if stop_within(reference, Duration::from_secs(30)).is_err() {
            if let Some(s) = &state {
                terminate(s.pid, s.pid_start, libc::SIGKILL);
            }
        }
    }
    sandbox.remove(&root)?;
    Ok(info)
}

/// The sandbox's supervisor log (its admission, boot and session, as text).
pub fn logs(reference: &str) -> Result<String, SandboxError> {
    let sandbox = Sandbox::find_in(&state::root(), reference)?;
    Ok(read_log(&sandbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_absolute_and_plain() {
        for good in ["/work/a.py", "/", "/a/b/c", "/a..b"] {
            check_guest_path(good).unwrap();
        }
        for bad in [
            "work/a",
            "/work/../etc/passwd",
            "/a/./b",
            "/a/..",
            "",
            "/a\0b",
        ] {
            assert!(check_guest_path(bad).is_err(), "{bad:?}");
        }
    }
}
