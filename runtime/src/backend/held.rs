//! A child process that holds a run's workload where no `mvm-vmm` does (a container's
//! init, `vfkit`): its exit seen once and kept, the tail of its log for errors, killed
//! and reaped on drop. The [`Holder`] the agent's exec loop watches.

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use mvm_agent::ClientError;

use super::agent_exec::Holder;
use super::session::VmProbe;
use super::RunError;

/// The most of the log shown in an error.
const LOG_TAIL: usize = 16 << 10;

/// The process, named for errors (`the container's init`, `vfkit`).
#[derive(Debug)]
pub(crate) struct HeldProcess {
    child: Child,
    log: PathBuf,
    what: &'static str,
    exited: Option<ExitStatus>,
}

impl HeldProcess {
    /// `child`, whose output goes to `log`.
    pub(crate) fn new(child: Child, log: PathBuf, what: &'static str) -> Self {
        Self {
            child,
            log,
            what,
            exited: None,
        }
    }

    /// Its pid.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited (kept: asked again, the same).
    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The last 16 KiB of its log.
    pub(crate) fn log_tail(&self) -> String {
        let Ok(bytes) = std::fs::read(&self.log) else {
            return String::new();
        };
        let from = bytes.len().saturating_sub(LOG_TAIL);
        String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
    }

    /// The run's error for its exit with `status`.
    pub(crate) fn died(&self, status: ExitStatus) -> RunError {
        RunError::VmmDied {
            reason: format!("{} exited ({status})", self.what),
            log: self.log_tail(),
            exit: Some(status.into()),
        }
    }

    /// Waits up to `grace` for it to exit, then kills it.
    pub(crate) fn wait_or_kill(&mut self, grace: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + grace;
        while self.try_exit().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.try_exit().is_none() {
            Holder::kill(self);
        }
        self.exited
    }
}

impl Holder for HeldProcess {
    fn ended(&mut self) -> Option<RunError> {
        let status = self.try_exit()?;
        Some(self.died(status))
    }

    fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    fn agent_error(&mut self, e: &ClientError) -> RunError {
        // A process that ended explains a broken connection better than the connection.
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if let Some(status) = self.try_exit() {
                return self.died(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        RunError::Agent(e.to_string())
    }
}

impl VmProbe for HeldProcess {
    fn ended(&mut self) -> Option<String> {
        self.try_exit()
            .map(|status| format!("{} exited ({status})", self.what))
    }
}

impl Drop for HeldProcess {
    fn drop(&mut self) {
        Holder::kill(self);
    }
}
