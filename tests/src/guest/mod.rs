//! `mvm-test-init`, the static PID 1 of test guests: what it prints, how it
//! signals the VMM, and how it picks what to do.
//!
//! It reads its mode from `mvm.test=<mode>` on the kernel command line
//! (`/proc/cmdline`), signals "init reached" on the debug port, prints
//! [`MARKER`], runs the mode (see [`modes`]), and ends the way the mode says
//! (poweroff, reboot, panic, or hang). Cases in `crate::cases` assert on the
//! lines it prints, so those lines are constants here.

pub mod blk;
pub mod hostile;
pub mod init;
pub mod modes;
pub mod signal;
pub mod snapshot;
pub mod vsock;

use std::io::Write;

/// The kernel command line parameter that selects the mode.
pub const MODE_PARAM: &str = "mvm.test";
/// The line every test guest prints once its userspace runs.
pub const MARKER: &str = "mvm-test-init: guest userspace reached";
/// Prefix of every line the init prints.
pub const PREFIX: &str = "mvm-test-init:";

/// What the init does after its mode has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Signal poweroff to the VMM (debug port), then `reboot(POWER_OFF)`.
    PowerOff,
    /// `reboot(RESTART)`: the kernel resets through i8042 or a triple fault.
    Reboot,
    /// PID 1 exits, which panics the kernel (`panic=-1` then reboots).
    Panic,
    /// Sleep forever: for cases that test timeouts and kills.
    Hang,
}

/// Errors of the guest init, printed on the console.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: std::io::Error,
    },
    /// The mode on the command line is not one this init knows.
    #[error("unknown mode {0:?} (known: {1})")]
    UnknownMode(String, String),
    /// The mode ran and found something wrong.
    #[error("{0}")]
    Check(String),
}

impl GuestError {
    /// A failed system call: `what` plus the current errno.
    pub fn last_os(what: impl Into<String>) -> Self {
        Self::Sys {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// The value of `key=` in a kernel command line, if present (last wins,
/// as for the kernel's own parameters).
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// Where the init writes: its stdout, which the kernel opened on
/// `/dev/console` (the initramfs carries that node).
#[derive(Debug, Default)]
pub struct Console;

impl Console {
    /// Prints `mvm-test-init: <text>` as one line. Write errors are ignored:
    /// there is nowhere else to report them.
    pub fn say(&self, text: &str) {
        self.line(&format!("{PREFIX} {text}"));
    }

    /// Prints `line` as is.
    pub fn line(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Waits until the UART has sent everything printed so far. The VMM ends the VM at the
    /// poweroff signal; with two vCPUs the serial port may still be draining on the other
    /// one, and the last lines would be lost.
    pub fn drain(&self) {
        let _ = nix::sys::termios::tcdrain(std::io::stdout());
    }
}

/// What a mode gets: the console and the kernel command line.
#[derive(Debug)]
pub struct Guest {
    /// The console.
    pub console: Console,
    /// `/proc/cmdline`, trimmed.
    pub cmdline: String,
}

impl Guest {
    /// The value of `key=` on the kernel command line.
    pub fn param(&self, key: &str) -> Option<&str> {
        param(&self.cmdline, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_finds_value_and_last_wins() {
        let c = "console=ttyS0 quiet mvm.test=marker panic=-1 mvm.test=nproc";
        assert_eq!(param(c, "mvm.test"), Some("nproc"));
        assert_eq!(param(c, "panic"), Some("-1"));
        assert_eq!(param(c, "quiet"), None);
        assert_eq!(param(c, "mvm"), None);
        assert_eq!(param("", "mvm.test"), None);
    }

    #[test]
    fn param_value_may_hold_equals() {
        assert_eq!(param("a=b=c", "a"), Some("b=c"));
    }
}
