//! Running one workload process: identity, isolation, streaming, timeout, status.
//!
//! The process leads its own session and process group (`setsid`), has `no_new_privs` and
//! the policy's rlimits, and runs as the policy's unprivileged uid unless the request asks
//! otherwise and the policy allows it. Its group dies with it: when the process exits (or
//! its timeout passes, or its connection closes) the rest of the group is killed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::policy::Limits;
use super::reaper::ChildExit;
use super::reply::{reply, Responder};
use super::Agent;
use crate::protocol::{
    ErrorCode, ErrorReply, ExecRequest, ExitStatus, Message, TtySize, DATA_CHUNK,
};

/// `PATH` for workloads unless the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Stdin frames buffered per process before the connection's reader waits for it (each
/// at most one frame, so a client can pin at most this many MiB per process).
const STDIN_QUEUE: usize = 4;
/// How long output is still collected after the process ended (from processes that left
/// its group and still hold its pipes).
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Pipe buffer size asked for a process's stdin and stdout.
const PIPE_SIZE: usize = 1 << 20;
/// Longest single sleep of the output loop, so exits and timeouts are noticed promptly.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// The connection's handle on a running process.
pub(super) struct Control {
    pgid: i32,
    /// Where stdin chunks go; `None` once stdin is closed.
    pub(super) stdin: Option<SyncSender<Vec<u8>>>,
    /// The pseudo-terminal's master side, when the process has one.
    pty: Option<Arc<File>>,
}

impl Control {
    /// Sends `signal` to the process's group.
    pub(super) fn signal(&self, signal: i32) {
        // SAFETY: killpg takes plain integers; pgid is a group this agent created.
        let rc = unsafe { libc::killpg(self.pgid, signal) };
        if rc != 0 {
            tracing::debug!(
                "killpg({}, {signal}): {}",
                self.pgid,
                io::Error::last_os_error()
            );
        }
    }

    /// Kills the process's group.
    pub(super) fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Changes the size of the process's terminal (the kernel sends it SIGWINCH); a
    /// process without one is left alone.
    pub(super) fn resize(&self, size: TtySize) {
        if let Some(master) = &self.pty {
            if let Err(e) = set_size(master.as_raw_fd(), size) {
                tracing::debug!("resize: {e}");
            }
        }
    }
}

/// Sets a terminal's size.
fn set_size(fd: RawFd, size: TtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize that outlives the call, on an open fd.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &winsize) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new pseudo-terminal of `size`: the master (close-on-exec, so no other process
/// inherits it) and the slave the process gets as its stdin, stdout and stderr.
fn open_pty(size: TtySize) -> io::Result<(File, File)> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    // std opens with O_CLOEXEC; the child gets its copies through dup2.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)?;
    set_size(master.as_raw_fd(), size)?;
    // SAFETY: into_raw_fd hands over sole ownership of an open descriptor.
    let master = unsafe { File::from_raw_fd(master.into_raw_fd()) };
    Ok((master, slave))
}

/// A spawned process, before its supervisor thread takes over.
pub(super) struct Running {
    child: Child,
    exits: Receiver<ChildExit>,
    pgid: i32,
    stdin_tx: Option<SyncSender<Vec<u8>>>,
    stdin_rx: Option<(StdinSink, Receiver<Vec<u8>>)>,
    /// The pseudo-terminal's master side, when the request asked for one.
    pty: Option<Arc<File>>,
    started: Instant,
    timeout: Option<Duration>,
}

/// Where a process's stdin bytes go: its pipe, or its terminal's master side (where
/// the end of stdin is an end-of-file character, as a user's Ctrl-D).
enum StdinSink {
    Pipe(ChildStdin),
    Pty(Arc<File>),
}

impl Running {
    /// The handle the connection keeps. Taking it hands over the only stdin sender.
    pub(super) fn control(&mut self) -> Control {
        Control {
            pgid: self.pgid,
            stdin: self.stdin_tx.take(),
            pty: self.pty.clone(),
        }
    }
}

/// The environment a workload sees: a minimal default, then the request's variables.
fn environment(request: &ExecRequest, home: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), home.to_owned());
    for (key, value) in &request.env {
        env.insert(key.clone(), value.clone());
    }
    env
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the program the way a shell would, so a missing binary is a clear error.
/// A relative path with a slash is relative to the process's working directory.
fn resolve_program(program: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ErrorReply> {
    if program.contains('/') {
        let path = cwd.join(program);
        if is_executable_file(&path) {
            return Ok(path);
        }
        return Err(reply(
            ErrorCode::NotFound,
            format!("program {program:?} does not exist or is not an executable file"),
        ));
    }
    path_var
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| {
            reply(
                ErrorCode::NotFound,
                format!("program {program:?} not found in PATH {path_var:?}"),
            )
        })
}

/// The kernel's `struct sigaction` (x86_64 and arm64 layout), for `rt_sigaction(2)`.
#[repr(C)]
struct KernelSigaction {
    handler: libc::c_ulong,
    flags: libc::c_ulong,
    restorer: libc::c_ulong,
    mask: u64,
}

/// Every signal back to its default action. Ignored signals survive exec, so a workload
/// would otherwise inherit whatever the agent's own parent ignored (and glibc's
/// `posix_spawn` leaves its internal signals 32 and 33 ignored), which the libc wrapper
/// cannot undo: hence the raw system call.
fn default_signal_actions() {
    let default = KernelSigaction {
        handler: 0, // SIG_DFL
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads `default`, a valid kernel sigaction that outlives the
        // call; a null old-action pointer is allowed; 8 is the kernel's sigset size.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default,
                std::ptr::null_mut::<KernelSigaction>(),
                8_usize,
            )
        };
    }
}

/// An empty signal mask. As PID 1 the agent blocks the power signals (SIGINT,
/// SIGTERM, SIGUSR1, SIGUSR2) in every thread, and a mask survives fork and exec: a
/// guest workload was seen starting with them blocked, so `mvm run`'s Ctrl-C (SIGINT
/// through the signal operation) never reached it. Raw system call, as above.
fn empty_signal_mask() -> io::Result<()> {
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads `empty`, a valid 8-byte kernel sigset that outlives
    // the call; a null old-set pointer is allowed; 8 is the kernel's sigset size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut::<u64>(),
            8_usize,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs in the child between fork and exec: only async-signal-safe calls.
fn isolate(limits: Limits, tty: bool) -> io::Result<()> {
    default_signal_actions();
    empty_signal_mask()?;
    // SAFETY: setsid takes no arguments; it makes the child a session and group leader.
    if unsafe { libc::setsid() } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY takes an integer; fd 0 is the pseudo-terminal's slave (std
    // set up stdio before this runs), which becomes the new session's terminal.
    if tty && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for (resource, value) in [
        (libc::RLIMIT_NOFILE, limits.nofile),
        (libc::RLIMIT_NPROC, limits.nproc),
        (libc::RLIMIT_CORE, limits.core),
    ] {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `current` is a valid, writable rlimit that outlives the call.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Only ever lower: without privileges (the uid is already dropped here) a limit
        // cannot rise above its hard limit, which for NPROC depends on guest memory.
        let value = value.min(current.rlim_max);
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn spawn_error(program: &str, error: &io::Error) -> ErrorReply {
    let code = match error.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    reply(code, format!("cannot start {program:?}: {error}"))
}

/// Validates a request against the policy and starts its process.
pub(super) fn spawn(agent: &Agent, request: ExecRequest) -> Result<Running, ErrorReply> {
    let program = request
        .argv
        .first()
        .ok_or_else(|| reply(ErrorCode::BadRequest, "argv is empty"))?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let identity = if euid == 0 {
        let (uid, gid) = agent
            .policy()
            .identity(request.uid, request.gid)
            .map_err(|e| reply(ErrorCode::PermissionDenied, e.to_string()))?;
        Some((uid, gid))
    } else {
        // An unprivileged agent (host-side debugging) can only run workloads as itself.
        if let Some(uid) = request.uid.filter(|uid| *uid != euid) {
            return Err(reply(
                ErrorCode::PermissionDenied,
                format!("the agent runs as uid {euid} and cannot switch to uid {uid}"),
            ));
        }
        None
    };
    let cwd = request.cwd.clone().unwrap_or_else(|| "/".to_owned());
    if !std::fs::metadata(&cwd).is_ok_and(|m| m.is_dir()) {
        return Err(reply(
            ErrorCode::BadCwd,
            format!("working directory {cwd:?} does not exist or is not a directory"),
        ));
    }
    let env = environment(
        &request,
        if identity.is_some_and(|(uid, _)| uid == 0) {
            "/root"
        } else {
            "/tmp"
        },
    );
    let path_var = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let resolved = resolve_program(program, path_var, Path::new(&cwd))?;

    let mut command = Command::new(&resolved);
    command
        .arg0(program)
        .args(request.argv.iter().skip(1))
        .env_clear()
        .envs(&env)
        .current_dir(&cwd);
    let tty = request.tty.is_some();
    let pty = match request.tty {
        Some(size) => {
            let (master, slave) = open_pty(size)
                .map_err(|e| reply(ErrorCode::Io, format!("cannot open a pseudo-terminal: {e}")))?;
            let copy = |f: &File| {
                f.try_clone()
                    .map_err(|e| reply(ErrorCode::Io, format!("pseudo-terminal: {e}")))
            };
            command
                .stdin(copy(&slave)?)
                .stdout(copy(&slave)?)
                .stderr(slave);
            Some(Arc::new(master))
        }
        None => {
            command
                .stdin(if request.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    if let Some((uid, gid)) = identity {
        // std drops supplementary groups (setgroups(0)) when it changes the uid as root.
        command.uid(uid).gid(gid);
    }
    let limits = agent.policy().limits;
    // SAFETY: `isolate` runs between fork and exec and only makes async-signal-safe
    // system calls (rt_sigaction, rt_sigprocmask, setsid, prctl, getrlimit, setrlimit); it allocates nothing and
    // takes no locks.
    unsafe {
        command.pre_exec(move || isolate(limits, tty));
    }
    let (mut child, exits) = agent
        .reaper
        .spawn(&mut command, !request.keep_children)
        .map_err(|e| spawn_error(program, &e))?;
    let pgid = i32::try_from(child.id())
        .map_err(|_| reply(ErrorCode::Io, format!("pid {} out of range", child.id())))?;
    // The slave's copies in `command` close with it: the master then reads EIO
    // once the process and its children have closed theirs.
    drop(command);
    let sink = match (&pty, child.stdin.take()) {
        (Some(master), _) => Some(StdinSink::Pty(Arc::clone(master))),
        (None, Some(pipe)) => {
            grow_pipe(pipe.as_raw_fd());
            Some(StdinSink::Pipe(pipe))
        }
        (None, None) => None,
    };
    let (stdin_tx, stdin_rx) = match sink {
        Some(sink) => {
            let (tx, rx) = mpsc::sync_channel(STDIN_QUEUE);
            (Some(tx), Some((sink, rx)))
        }
        None => (None, None),
    };
    tracing::info!(
        "exec {program:?} pid {pgid} as {:?} (timeout {:?} ms)",
        identity,
        request.timeout_ms
    );
    Ok(Running {
        child,
        exits,
        pgid,
        stdin_tx,
        stdin_rx,
        pty,
        started: Instant::now(),
        timeout: request.timeout_ms.map(Duration::from_millis),
    })
}

/// Starts the threads that feed stdin, stream output and report the exit status.
pub(super) fn supervise<R: Responder>(mut running: Running, shared: Arc<R>, id: u32) {
    if let Some((pipe, chunks)) = running.stdin_rx.take() {
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{id}-stdin"))
            .spawn(move || feed_stdin(pipe, &chunks));
        if let Err(e) = spawned {
            tracing::warn!("exec {id}: no stdin thread ({e}); stdin is closed");
        }
    }
    let pgid = running.pgid;
    let supervisor = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || {
            let status = run_to_exit(running, &*supervisor, id);
            supervisor.finish(id);
            supervisor.send(id, &Message::Exit(status));
        });
    if let Err(e) = spawned {
        // Without a supervisor nobody would stream or time it out: stop it now.
        // SAFETY: killpg takes plain integers; pgid is the group just created.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
        shared.finish(id);
        shared.send_error(
            id,
            reply(ErrorCode::Io, format!("cannot supervise process: {e}")),
        );
    }
}

fn feed_stdin(mut sink: StdinSink, chunks: &Receiver<Vec<u8>>) {
    for chunk in chunks {
        let written = match &mut sink {
            StdinSink::Pipe(pipe) => pipe.write_all(&chunk),
            StdinSink::Pty(master) => (&**master).write_all(&chunk),
        };
        if let Err(e) = written {
            tracing::debug!("stdin: {e}");
            return;
        }
    }
    // The end of stdin: a pipe closes (when `sink` drops); a terminal reads the
    // end-of-file character (Ctrl-D), as when a user types it.
    if let StdinSink::Pty(master) = &sink {
        let _ = (&**master).write_all(&[4]);
    }
}

/// One of the process's outputs: a pipe, or its terminal's master side (stdout and
/// stderr both; EIO there is the end, once every holder of the slave closed it).
enum Pipe {
    Stdout(ChildStdout),
    Stderr(ChildStderr),
    Pty(Arc<File>),
}

impl Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(p) => p.read(buf),
            Self::Stderr(p) => p.read(buf),
            Self::Pty(master) => match (&**master).read(buf) {
                Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
                other => other,
            },
        }
    }
    fn frame(&self, data: Vec<u8>) -> Message {
        match self {
            Self::Stdout(_) | Self::Pty(_) => Message::Stdout(data),
            Self::Stderr(_) => Message::Stderr(data),
        }
    }
}

/// Bigger pipe buffers mean fewer, larger frames for bulk output (best effort).
fn grow_pipe(fd: RawFd) {
    let size = libc::c_int::try_from(PIPE_SIZE).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ on an open pipe fd takes an integer and touches no memory.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) };
}

fn kill_group(pgid: i32) {
    // SAFETY: killpg takes plain integers; pgid is a group this agent created.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Streams output until the pipes close, enforcing the timeout, and returns the status.
fn run_to_exit<R: Responder>(mut running: Running, shared: &R, id: u32) -> ExitStatus {
    let mut pipes: Vec<Pipe> = Vec::with_capacity(2);
    if let Some(p) = running.child.stdout.take() {
        grow_pipe(p.as_raw_fd());
        pipes.push(Pipe::Stdout(p));
    }
    if let Some(p) = running.child.stderr.take() {
        pipes.push(Pipe::Stderr(p));
    }
    if let Some(master) = running.pty.take() {
        pipes.push(Pipe::Pty(master));
    }
    // A timeout too large to represent is no timeout (and must not panic the agent).
    let deadline = running.timeout.and_then(|t| running.started.checked_add(t));
    let mut exit: Option<ChildExit> = None;
    let mut timed_out = false;
    let mut drain_until: Option<Instant> = None;
    let mut connected = true;
    let mut buf = vec![0u8; DATA_CHUNK];

    while !pipes.is_empty() {
        if exit.is_none() {
            match running.exits.try_recv() {
                Ok(e) => {
                    exit = Some(e);
                    drain_until = Instant::now().checked_add(DRAIN_GRACE);
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let now = Instant::now();
        if exit.is_none() && !timed_out && deadline.is_some_and(|d| now >= d) {
            tracing::info!("exec {id}: timeout passed, killing group {}", running.pgid);
            timed_out = true;
            kill_group(running.pgid);
        }
        if drain_until.is_some_and(|d| now >= d) {
            break;
        }
        let mut wait = POLL_SLICE;
        for limit in [deadline.filter(|_| !timed_out), drain_until]
            .into_iter()
            .flatten()
        {
            wait = wait.min(limit.saturating_duration_since(now));
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO);
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = pipes
                .iter()
                .map(|p| {
                    let fd = match p {
                        Pipe::Stdout(s) => s.as_fd(),
                        Pipe::Stderr(s) => s.as_fd(),
                        Pipe::Pty(master) => master.as_fd(),
                    };
                    PollFd::new(fd, PollFlags::POLLIN)
                })
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) => fds
                    .iter()
                    .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("exec {id}: poll: {e}");
                    break;
                }
            }
        };
        let mut index = 0;
        let mut flags = ready.into_iter();
        pipes.retain_mut(|pipe| {
            index += 1;
            if !flags.next().unwrap_or(false) {
                return true;
            }
            match pipe.read(&mut buf) {
                Ok(0) => false,
                Ok(n) => {
                    if connected {
                        let data = buf.get(..n).unwrap_or_default().to_vec();
                        connected = shared.send(id, &pipe.frame(data));
                    }
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
                Err(e) => {
                    tracing::debug!("exec {id}: pipe {index}: {e}");
                    false
                }
            }
        });
    }
    drop(pipes);

    let exit = match exit {
        Some(exit) => exit,
        None => loop {
            let wait = match deadline.filter(|_| !timed_out) {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            match running.exits.recv_timeout(wait) {
                Ok(exit) => break exit,
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some() && !timed_out {
                        tracing::info!("exec {id}: timeout passed, killing group {}", running.pgid);
                        timed_out = true;
                        kill_group(running.pgid);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break ChildExit::Signaled(libc::SIGKILL);
                }
            }
        },
    };
    let duration_ms = millis(running.started.elapsed());
    let (code, signal) = match exit {
        ChildExit::Exited(code) => (Some(code), None),
        ChildExit::Signaled(signal) => (None, Some(signal)),
    };
    tracing::info!("exec {id}: ended {exit:?} after {duration_ms} ms (timed out: {timed_out})");
    ExitStatus {
        code,
        signal,
        timed_out,
        duration_ms,
    }
}
