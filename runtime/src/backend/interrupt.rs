//! Ctrl-C and SIGTERM become a flag the run loops poll, so a run stops its
//! workload and its VM in order instead of dying with children left behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
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
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe, and replaces no handler that Rust code relies on.
        unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Asks for a stop, as a signal would (for tests and internal deadlines).
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}
