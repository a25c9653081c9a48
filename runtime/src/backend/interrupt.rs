//! Ctrl-C, SIGTERM and SIGHUP become a count the run loops poll, so a run
//! stops in order instead of dying with children left behind.
//!
//! Before the workload starts (boot, agent handshake), any of them stops the
//! run at once. Once it runs, [`Forwarder`] decides: the first signal is passed
//! on to the workload's process group (through the guest agent), which may
//! clean up and exit with a status of its own, and `mvm` exits with that
//! status; a second signal, or [`GRACE`] passing without an exit, kills the VM
//! (exit 130).

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a workload has to exit after its signal before the VM is killed.
pub const GRACE: Duration = Duration::from_secs(5);

static COUNT: AtomicU32 = AtomicU32::new(0);
static LAST: AtomicI32 = AtomicI32::new(libc::SIGINT);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only lock-free atomic stores: async-signal-safe.
    deliver(signal);
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn install() -> std::io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe,
        // and replaces no handler that Rust code relies on.
        unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Records `signal` as if it had arrived: the handler's body, and how the
/// test host's `mvm` receives the signals the outer `mvm` forwards to it.
pub fn deliver(signal: i32) {
    LAST.store(signal, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    COUNT.load(Ordering::SeqCst) > 0
}

/// Asks for a stop, as SIGTERM would (for tests and internal deadlines).
pub fn request() {
    deliver(libc::SIGTERM);
}

/// How many stop signals arrived, and the last one.
fn received() -> (u32, i32) {
    (COUNT.load(Ordering::SeqCst), LAST.load(Ordering::SeqCst))
}

/// What a run loop does about the signals received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing new.
    None,
    /// Pass this signal to the workload (the first one), and keep going.
    Forward(i32),
    /// Kill the VM now: a second signal, or the grace period passed.
    Kill,
}

/// The run loop's view of the signals while the workload runs.
#[derive(Debug, Default)]
pub struct Forwarder {
    seen: u32,
    deadline: Option<Instant>,
}

impl Forwarder {
    /// A forwarder that starts from the signals received so far: any of them
    /// (which arrived before the workload started) is treated as new.
    pub fn new() -> Self {
        Self::default()
    }

    /// What to do now.
    pub fn poll(&mut self) -> Action {
        let (count, last) = received();
        self.poll_at(count, last, Instant::now(), GRACE)
    }

    /// [`Self::poll`] with another grace period (the emulated tier's host
    /// side waits for the test host's own).
    pub fn poll_with(&mut self, grace: Duration) -> Action {
        let (count, last) = received();
        self.poll_at(count, last, Instant::now(), grace)
    }

    /// [`Self::poll`] with the signal count, the last signal, the time and
    /// the grace period given.
    pub fn poll_at(&mut self, count: u32, last: i32, now: Instant, grace: Duration) -> Action {
        if count > self.seen {
            let first = self.seen == 0;
            self.seen = count;
            if first && count == 1 {
                self.deadline = Some(now + grace);
                return Action::Forward(last);
            }
            return Action::Kill;
        }
        match self.deadline {
            Some(deadline) if now >= deadline => Action::Kill,
            _ => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_is_forwarded_and_the_second_kills() {
        let t = Instant::now();
        let grace = Duration::from_secs(5);
        let mut f = Forwarder::new();
        assert_eq!(f.poll_at(0, libc::SIGINT, t, grace), Action::None);
        assert_eq!(
            f.poll_at(1, libc::SIGTERM, t, grace),
            Action::Forward(libc::SIGTERM)
        );
        assert_eq!(f.poll_at(1, libc::SIGTERM, t, grace), Action::None);
        assert_eq!(
            f.poll_at(2, libc::SIGINT, t + Duration::from_secs(1), grace),
            Action::Kill
        );
    }

    #[test]
    fn the_grace_period_ends_in_a_kill() {
        let t = Instant::now();
        let grace = Duration::from_secs(5);
        let mut f = Forwarder::new();
        assert_eq!(
            f.poll_at(1, libc::SIGINT, t, grace),
            Action::Forward(libc::SIGINT)
        );
        assert_eq!(
            f.poll_at(1, libc::SIGINT, t + Duration::from_secs(4), grace),
            Action::None
        );
        assert_eq!(f.poll_at(1, libc::SIGINT, t + grace, grace), Action::Kill);
    }

    #[test]
    fn two_signals_before_the_first_poll_kill_at_once() {
        let t = Instant::now();
        let mut f = Forwarder::new();
        assert_eq!(f.poll_at(2, libc::SIGINT, t, GRACE), Action::Kill);
    }
}
