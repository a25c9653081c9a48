//! The memory file as the VMM wrote it: held alone while it is written (a write lease
//! from its making), its identity read once written (boot, device, inode, length, change
//! time) and sealed, so a restore that finds the same file need not hash it again
//! (`docs/snapshots.md`).

use std::fs::File;

pub use mvm_loader::file_identity::{
    boot_id, identity, unchanged_since_written, wait_past, FileIdentity,
};

use super::memory::{route_breaks, set_lease};

/// The real-time signal a break of the write lease on a memory file being written sends
/// (`SIGRTMIN + 2`): another process opened it while this VMM held it.
pub fn write_lease_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// Set when a memory file's write lease broke: the snapshot then carries no
/// [`FileIdentity`], and its restores hash the file.
static OPENED_ELSEWHERE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that another process opened the memory file this VMM is to write.
pub fn note_opened_elsewhere() {
    OPENED_ELSEWHERE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether another process opened the memory file since its write lease was taken.
pub fn opened_elsewhere() -> bool {
    OPENED_ELSEWHERE.load(std::sync::atomic::Ordering::SeqCst)
}

extern "C" fn on_write_lease_break(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    note_opened_elsewhere();
}

/// Until the VMM's signal thread takes [`write_lease_signal`] with `sigwait` (once every
/// thread blocks it), a break is noted by this handler: the signal's default action would
/// end the process.
fn install_write_lease_handler() -> std::io::Result<()> {
    // SAFETY: the handler only stores to an atomic; SA_RESTART keeps a blocking call
    // that it interrupts from failing with EINTR.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_write_lease_break as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(write_lease_signal(), &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends the breaks of a write lease on the memory file ([`write_lease`]) to this
/// process as [`write_lease_signal`], noted by a handler until the signal thread takes
/// them (after the jail's fork, the owner is claimed again: [`super::memory::claim_lease_signals`]).
pub fn route_write_lease_breaks(file: &File) -> std::io::Result<()> {
    install_write_lease_handler()?;
    route_breaks(file, write_lease_signal())
}

/// Takes a write lease on the (new, empty) memory file when it is made: granted only
/// while no other process has the file open, and from then until this VMM closes it, any
/// other `open` of it is held back (up to `/proc/sys/fs/lease-break-time`, 45 s by
/// default) and reported ([`route_write_lease_breaks`]). So nothing but this VMM writes it
/// while it holds the lease, and once it lets go, any write sets a change time past the
/// one sealed. The cost: a host process that opens a running VM's (still empty) snapshot
/// memory file waits out the break time, and that snapshot's restores hash it. Taking it
/// only while the snapshot is written would spare that wait, but the jailed VMM runs as
/// another user than the file's owner, and only the owner may take a lease.
pub fn write_lease(file: &File) -> std::io::Result<()> {
    set_lease(file, libc::F_WRLCK)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_write_lease_is_refused_while_another_fd_is_open_and_noted_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = File::create(&path).unwrap();
        route_write_lease_breaks(&f).unwrap();
        let other = File::open(&path).unwrap();
        assert!(write_lease(&f).is_err(), "leased with another fd open");
        drop(other);
        write_lease(&f).unwrap();
        assert!(!opened_elsewhere());
        // Another opener is held back until the lease goes, and the break is noted.
        let opener = std::thread::spawn(move || File::open(&path).map(drop));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !opened_elsewhere() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(opened_elsewhere(), "the lease break was not noted");
        assert!(
            !opener.is_finished(),
            "the opener got in while the lease was held"
        );
        drop(f);
        opener.join().unwrap().unwrap();
    }
}
