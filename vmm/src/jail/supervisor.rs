//! The VMM in its own PID namespace: the process the caller started forks once; the child
//! (PID 1 of a new PID namespace) goes on to jail itself and run the VM; the parent stays
//! outside, forwards SIGINT/SIGTERM/SIGHUP (and SIGUSR2, a snapshot request) to it, and when it ends removes what the jailed
//! child no longer can (its socket file, its per-VM root directory, its cgroup) and exits
//! the same way: the same exit code, or the same signal re-raised. `mvm-vmm`'s exit
//! statuses reach the caller unchanged.
//!
//! The parent touches no guest data and runs no device code; it waits in `sigwait`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{
    kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::cgroup::{self, Cgroup};
use super::{io_step, step, JailError};

/// Signals the parent passes on to the VMM: the ones the VMM turns into a clean exit, and
/// SIGUSR2, which asks it for a snapshot.
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR2,
];

/// What the parent removes after the VMM has ended.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Files (the VM's vsock socket, bound before the jail).
    pub files: Vec<PathBuf>,
    /// The per-VM root's mount point on the host.
    pub root_dir: Option<PathBuf>,
    /// The VM's cgroup.
    pub cgroup: Option<Cgroup>,
}

/// In the child: the end of the pipe on which the parent says "go" and which reports its
/// death (end of file) afterwards.
#[derive(Debug)]
pub struct ParentLink(OwnedFd);

impl ParentLink {
    /// After a credential change (which clears it), asks again for SIGKILL when the parent
    /// dies, then checks the parent did not die before that. Closes the link.
    pub fn rearm_death_signal(self) -> Result<(), JailError> {
        set_death_signal()?;
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&self.0),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)
            .map_err(step("poll the parent link"))?;
        if ready > 0 {
            // End of file (or anything): the parent is gone, nobody supervises this VM.
            return Err(step("the supervising parent exited")(nix::Error::ESRCH));
        }
        Ok(())
    }
}

fn set_death_signal() -> Result<(), JailError> {
    // SAFETY: PR_SET_PDEATHSIG with a valid signal number only sets a field of this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(step("PR_SET_PDEATHSIG")(nix::Error::last()));
    }
    Ok(())
}

/// Counts this process's threads: forking is only sound while there is one.
fn thread_count() -> Result<usize, JailError> {
    Ok(std::fs::read_dir("/proc/self/task")
        .map_err(io_step("list /proc/self/task"))?
        .count())
}

/// A handler that does nothing: PID 1 of a namespace receives from outside only the
/// signals it handles, so the forwarded ones get this one (they stay blocked until the
/// VMM's signal thread waits for them, so it never actually runs).
extern "C" fn ignore_signal(_: libc::c_int) {}

/// Forks into a new PID namespace. Returns in the child (with its link to the parent, once
/// the parent has put it in `cleanup.cgroup`); in the parent, supervises and exits the
/// process with the child's status (never returns).
pub fn fork_supervised(cleanup: Cleanup) -> Result<ParentLink, JailError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(step(format!(
            "fork into a PID namespace: {threads} threads exist, expected 1"
        ))(nix::Error::EBUSY));
    }
    unshare(CloneFlags::CLONE_NEWPID).map_err(step("new PID namespace"))?;
    let mut blocked = SigSet::empty();
    for sig in FORWARDED {
        blocked.add(sig);
    }
    blocked.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), Some(&mut old_mask))
        .map_err(step("block signals"))?;
    let (go_read, go_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    // SAFETY: this process has one thread (checked above), so the child starts with a
    // consistent copy of every lock and allocation; both sides go on with ordinary code.
    match unsafe { fork() }.map_err(step("fork"))? {
        ForkResult::Child => {
            drop(go_write);
            child_start(go_read, &old_mask)
        }
        ForkResult::Parent { child } => {
            drop(go_read);
            supervise(child, go_write, cleanup, &blocked)
        }
    }
}

/// The child: dies with the parent, handles the forwarded signals (still blocked), waits
/// for the parent's go.
fn child_start(go_read: OwnedFd, old_mask: &SigSet) -> Result<ParentLink, JailError> {
    set_death_signal()?;
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler is async-signal-safe (it does nothing).
        unsafe { sigaction(sig, &action) }.map_err(step(format!("sigaction {sig}")))?;
    }
    // SIGCHLD as before the fork; the forwarded signals stay blocked for the VMM's signal
    // thread, which waits for them.
    let mut mask = *old_mask;
    for sig in FORWARDED {
        mask.add(sig);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)
        .map_err(step("restore the signal mask"))?;
    let mut byte = [0u8; 1];
    let mut file = std::fs::File::from(go_read);
    match file.read(&mut byte) {
        Ok(1) => Ok(ParentLink(OwnedFd::from(file))),
        Ok(_) => Err(step("the supervising parent exited before the start")(
            nix::Error::ESRCH,
        )),
        Err(e) => Err(io_step("wait for the supervising parent")(e)),
    }
}

/// Closes every fd above stderr except `keep`.
fn close_all_but(keep: i32) {
    let Ok(keep) = u32::try_from(keep) else {
        return;
    };
    for (first, last) in [
        (3, keep.saturating_sub(1)),
        (keep.saturating_add(1), u32::MAX),
    ] {
        if first <= last {
            // SAFETY: close_range only closes descriptors; the parent uses none of them
            // after the fork (they are the VM's: disks, sockets, tap, logs, report).
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        }
    }
}

/// The parent: cgroup, go, forward signals, reap, clean up, exit like the child.
fn supervise(child: Pid, go_write: OwnedFd, mut cleanup: Cleanup, waited: &SigSet) -> ! {
    // The VM's files are the child's: a listening socket or tap held here would outlive it.
    close_all_but(std::os::fd::AsRawFd::as_raw_fd(&go_write));
    if let Some(cg) = &cleanup.cgroup {
        if let Err(e) = cgroup::add_process(cg, child.as_raw()) {
            tracing::warn!("jail: cgroup skipped: moving the VMM into it: {e}");
            cgroup::remove(&cg.dir);
            cleanup.cgroup = None;
        }
    }
    let mut go = std::fs::File::from(go_write);
    // A child that died already shows up as SIGCHLD below.
    let _ = go.write_all(&[1]);
    // `go` stays open: the child sees its end of file when this process dies.
    let status = loop {
        let Ok(sig) = waited.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            continue;
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => break Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break Err(sig),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("jail: waiting for the VMM: {e}");
                break Ok(crate::exit::STATUS_VMM_ERROR);
            }
        }
    };
    drop(go);
    clean_up(&cleanup);
    match status {
        Ok(code) => std::process::exit(code),
        Err(sig) => reraise(sig),
    }
}

fn clean_up(cleanup: &Cleanup) {
    for file in &cleanup.files {
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("jail: removing {}: {e}", file.display()),
        }
    }
    if let Some(root) = &cleanup.root_dir {
        if let Err(e) = std::fs::remove_dir(root) {
            tracing::warn!("jail: removing {}: {e}", root.display());
        }
    }
    if let Some(cg) = &cleanup.cgroup {
        cgroup::report_pressure(&cg.dir);
        cgroup::remove(&cg.dir);
    }
}

/// Ends this process with the signal that ended the child (its default action), so the
/// caller sees the same wait status.
fn reraise(sig: Signal) -> ! {
    // SAFETY: restoring the default action of a signal has no preconditions.
    let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    let mut one = SigSet::empty();
    one.add(sig);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&one), None);
    let _ = nix::sys::signal::raise(sig);
    // A signal whose default action does not end the process.
    std::process::exit(128_i32.saturating_add(sig as i32))
}
