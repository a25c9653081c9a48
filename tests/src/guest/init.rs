//! The PID 1 sequence of `mvm-test-init`.

use super::{modes, signal, Console, Ending, Guest, GuestError, MARKER, MODE_PARAM};

/// Runs the init: signal, mount, marker, mode, ending. Returns only for
/// [`Ending::Panic`] (the caller exits, which panics the kernel).
pub fn run() {
    let console = Console;
    // First, so the boot report's init_reached is when userspace started.
    if let Err(e) = signal::send(signal::INIT_REACHED) {
        console.say(&format!("error: {e}"));
    }
    if let Err(e) = mount_basics() {
        console.say(&format!("error: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let guest = Guest {
        console,
        cmdline: cmdline.trim().to_owned(),
    };
    guest.console.line(MARKER);
    let mode = guest.param(MODE_PARAM).unwrap_or("marker");
    let ending = match modes::find(mode).and_then(|m| (m.run)(&guest)) {
        Ok(ending) => ending,
        Err(e) => {
            guest.console.say(&format!("FAIL mode {mode}: {e}"));
            Ending::PowerOff
        }
    };
    finish(&guest.console, ending);
}

/// /proc for the command line and CPU count, /dev as devtmpfs for modes that
/// open devices. Already-mounted is fine.
fn mount_basics() -> Result<(), GuestError> {
    use nix::mount::{mount, MsFlags};
    for (source, target, fstype) in [("proc", "/proc", "proc"), ("dev", "/dev", "devtmpfs")] {
        let _ = std::fs::create_dir_all(target);
        match mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => {
                return Err(GuestError::Sys {
                    what: format!("mount {fstype} on {target}"),
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

fn finish(console: &Console, ending: Ending) {
    use nix::sys::reboot::{reboot, RebootMode};
    // Nothing written may be left in a buffer when the VM ends: not the disks, not the console.
    nix::unistd::sync();
    console.drain();
    match ending {
        Ending::PowerOff => {
            if let Err(e) = signal::send(signal::POWER_OFF) {
                console.say(&format!("error: {e}"));
            }
            // Only reached if the VMM did not act on the port.
            let _ = reboot(RebootMode::RB_POWER_OFF);
        }
        Ending::Reboot => {
            let _ = reboot(RebootMode::RB_AUTOBOOT);
        }
        Ending::Panic => return,
        Ending::Hang => {}
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
