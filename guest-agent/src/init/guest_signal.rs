//! Boot progress signals to the VMM: one byte written to an I/O port the VMM watches.
//!
//! The VMM timestamps each value in its boot report (see `docs/guest-signals.md`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether signals are written at all (off when PID 1 runs in a host pid namespace for
/// tests, where the port belongs to the host's own machine).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns guest signals into no-ops for the rest of the process.
pub fn disable() {
    ENABLED.store(false, Ordering::SeqCst);
}

/// The I/O port the VMM listens on for guest signals.
pub const GUEST_SIGNAL_PORT: u16 = 0x0600;
/// PID 1 started running.
pub const INIT_REACHED: u8 = 0x01;
/// The agent listens for connections.
pub const AGENT_LISTENING: u8 = 0x02;
/// The guest asks to be powered off (the kernel has no ACPI to do it).
pub const POWEROFF_REQUESTED: u8 = 0x03;

/// Writes `value` to the guest signal port. Needs root (CAP_SYS_RAWIO); x86_64 only.
#[cfg(target_arch = "x86_64")]
pub fn send(value: u8) -> io::Result<()> {
    if !ENABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    // I/O permissions are per thread, so they are granted right here, before the write.
    // SAFETY: ioperm takes plain integers and only changes this thread's I/O bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(GUEST_SIGNAL_PORT), 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ioperm above granted this thread access to exactly this port, so `out`
    // cannot fault; it touches no memory and no Rust-visible state.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") GUEST_SIGNAL_PORT,
            in("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Guest signals exist only on x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub fn send(_value: u8) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
