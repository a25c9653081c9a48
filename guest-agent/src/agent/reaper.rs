//! The one place that waits for child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest (or in its container's PID
//! namespace; with `--container` outside one it is a child subreaper, to the same effect)
//! and must reap them, but a blanket `waitpid(-1)` would steal the statuses that exec
//! requests wait for. The reaper peeks at
//! the next exited child without reaping it (`waitid(WNOWAIT)`), then, under the same lock
//! that spawning holds until the new child is registered, reaps it and hands the status to
//! its waiter, if it has one. A child that `Command::spawn` reaps itself (its exec failed)
//! is never seen as an orphan, because the spawn holds the lock throughout.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It called exit with this code.
    Exited(i32),
    /// This signal killed it.
    Signaled(i32),
}

#[derive(Default)]
struct State {
    /// Registered children: where their status goes, and whether their process group
    /// dies with them.
    waiters: HashMap<i32, (Sender<ChildExit>, bool)>,
    /// Bumped on every spawn, so the reaper does not sleep through a new child.
    generation: u64,
}

/// Reaps children and delivers exec statuses. One per agent process.
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self {
            state: Mutex::new(State::default()),
            spawned: Condvar::new(),
        });
        let worker = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".to_owned())
            .spawn(move || worker.run())?;
        Ok(reaper)
    }

    /// Spawns `command` and registers the child so its status comes to the receiver.
    ///
    /// With `kill_group`, the child must lead its own process group (it calls `setsid`),
    /// and when it exits the rest of its group is killed before it is reaped: while the
    /// leader is a zombie its pid cannot be reused, so the kill cannot hit a stranger.
    pub fn spawn(
        &self,
        command: &mut Command,
        kill_group: bool,
    ) -> io::Result<(Child, Receiver<ChildExit>)> {
        let mut state = lock(&self.state);
        let child = command.spawn()?;
        let pid = i32::try_from(child.id())
            .map_err(|_| io::Error::other(format!("child pid {} out of range", child.id())))?;
        let (tx, rx) = mpsc::channel();
        state.waiters.insert(pid, (tx, kill_group));
        state.generation = state.generation.wrapping_add(1);
        drop(state);
        self.spawned.notify_all();
        Ok((child, rx))
    }

    fn run(&self) {
        loop {
            let generation = lock(&self.state).generation;
            match peek_exited_child() {
                Ok(pid) => self.reap(pid),
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let state = lock(&self.state);
                    if state.generation == generation {
                        // No children: sleep until a spawn (or, as PID 1, poll for orphans
                        // of processes we did not start, which cannot exist without a spawn).
                        let _ = self
                            .spawned
                            .wait_timeout(state, Duration::from_secs(1))
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("reaper: waitid failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn reap(&self, pid: i32) {
        let mut state = lock(&self.state);
        if state
            .waiters
            .get(&pid)
            .is_some_and(|(_, kill_group)| *kill_group)
        {
            // SAFETY: killpg takes plain integers; `pid` is an unreaped child leading its
            // own group, so the group id is ours to signal.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
        let Some(exit) = reap_pid(pid) else {
            // Already reaped by Command::spawn after a failed exec.
            return;
        };
        match state.waiters.remove(&pid) {
            Some((waiter, _)) => {
                let _ = waiter.send(exit);
            }
            None => tracing::debug!("reaped orphan {pid}: {exit:?}"),
        }
    }
}

/// Blocks until some child has exited and returns its pid, leaving it a zombie.
fn peek_exited_child() -> io::Result<i32> {
    // SAFETY: siginfo_t is plain data for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call; P_ALL ignores
    // the id argument.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded with WEXITED, so the kernel filled in the SIGCHLD fields,
    // which si_pid reads.
    Ok(unsafe { info.si_pid() })
}

/// Reaps `pid` if it is still waitable.
fn reap_pid(pid: i32) -> Option<ChildExit> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        if rc == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(ChildExit::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ChildExit::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}
