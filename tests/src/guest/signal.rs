//! Signals from the guest to the VMM through the debug I/O port.
//!
//! A byte written to port [`PORT`] is a signal (see docs/guest-signals.md,
//! owned by the VMM): [`INIT_REACHED`] when PID 1 starts, [`POWER_OFF`] to
//! end the VM with a poweroff. The guest kernel has no ACPI, so this port is
//! how a test guest powers off.

/// The debug signal port.
pub const PORT: u16 = 0x0600;
/// "Guest init reached": PID 1 is running.
pub const INIT_REACHED: u8 = 0x01;
/// "Power off": the guest asks the VMM to end with a poweroff.
pub const POWER_OFF: u8 = 0x03;

use super::GuestError;

/// Writes `value` to [`PORT`]. Needs `CAP_SYS_RAWIO` (PID 1 has it).
#[cfg(target_arch = "x86_64")]
pub fn send(value: u8) -> Result<(), GuestError> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap for
    // one port; it touches no memory of ours.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(PORT), 1, 1) };
    if rc != 0 {
        return Err(GuestError::last_os(format!("ioperm port {PORT:#x}")));
    }
    // SAFETY: access to PORT was granted just above, so `out` does not fault;
    // it writes one byte to an I/O port and reads or writes no memory.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") PORT,
            in("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Port I/O exists only on x86.
#[cfg(not(target_arch = "x86_64"))]
pub fn send(_value: u8) -> Result<(), GuestError> {
    Err(GuestError::Check("port I/O signals need x86_64".into()))
}
