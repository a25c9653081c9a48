//! Where `mvm-vmm` puts the per-thread seccomp filters of `mvm-seccomp` on.
//!
//! The mode comes from `MVM_SECCOMP` (`on`, `log`, `off`), read once by [`init`] on the
//! main thread, which also installs the SIGSYS handler. Each thread then calls [`enter`]
//! with its role as the first thing it does, before it touches guest data; the main thread
//! calls it last, right before it starts supervising. A thread whose filter cannot go on
//! ends the process: no thread runs unfiltered when filters were asked for.

use std::sync::OnceLock;

pub use mvm_seccomp::{roles, Mode, Role, STATUS_SECCOMP_VIOLATION};

/// Environment variable that selects the mode.
pub const MODE_ENV: &str = "MVM_SECCOMP";

/// The mode when `MVM_SECCOMP` is unset.
pub const DEFAULT_MODE: Mode = Mode::Enforce;

static MODE: OnceLock<Mode> = OnceLock::new();

/// Reads the mode and installs the SIGSYS handler. Call once, on the main thread, before
/// any other thread is spawned.
pub fn init() -> Result<Mode, mvm_seccomp::SeccompError> {
    let mode = match std::env::var(MODE_ENV) {
        Ok(v) => Mode::parse(&v)?,
        Err(_) => DEFAULT_MODE,
    };
    if mode != Mode::Off {
        mvm_seccomp::sigsys::install_handler()?;
    }
    if mode != Mode::Enforce {
        tracing::warn!(
            ?mode,
            "seccomp filters are not enforced ({MODE_ENV}); development only"
        );
    }
    let _ = MODE.set(mode);
    Ok(mode)
}

/// Installs `role`'s filter on the calling thread, named `thread` in a violation report.
/// Before [`init`] (unit tests that drive boot pieces directly) this does nothing.
pub fn enter(role: &Role, thread: &str) {
    let Some(mode) = MODE.get().copied() else {
        return;
    };
    if let Err(e) = mvm_seccomp::install(role, thread, mode) {
        eprintln!("mvm-vmm: {e}");
        std::process::exit(crate::exit::STATUS_VMM_ERROR);
    }
}

/// A device thread's `before_run` hook for `mvm_devices::virtio::worker::spawn`.
pub fn device_hook(
    role: Role,
    thread: String,
) -> impl FnOnce() -> Result<(), String> + Send + 'static {
    move || {
        enter(&role, &thread);
        Ok(())
    }
}
