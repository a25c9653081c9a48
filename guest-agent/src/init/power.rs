//! Ending the guest: stop workloads, sync, then ask the VMM to power off.

use std::time::Duration;

use super::guest_signal;

/// How long to wait for the VMM to act on the power-off signal before resetting instead.
const POWEROFF_GRACE: Duration = Duration::from_secs(1);

/// Kills every other process, syncs, and powers off (or reboots). Never returns.
///
/// The guest kernel has no ACPI, so `reboot(RB_POWER_OFF)` would only halt: power-off is a
/// guest signal to the VMM. If the VMM is still running us after a grace period, the
/// agent resets the machine (`reboot=k` makes that an i8042 reset, on which the VMM exits).
pub fn power_off(reboot: bool) -> ! {
    // SAFETY: kill(-1, SIGKILL) from PID 1 signals every process except PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync() has no arguments and cannot fail.
    unsafe { libc::sync() };
    if !reboot {
        if let Err(e) = guest_signal::send(guest_signal::POWEROFF_REQUESTED) {
            tracing::warn!("power-off signal: {e}");
        }
        std::thread::sleep(POWEROFF_GRACE);
    }
    // SAFETY: reboot(RB_AUTOBOOT) takes a plain integer; filesystems are synced above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    tracing::error!("reboot failed: {}", std::io::Error::last_os_error());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
