//! A read lease on a verified disk's image, so that a block verified once need
//! not be hashed again (dm-verity's `check_at_most_once`) for as long as no
//! host process can have changed the file since.
//!
//! `fcntl(F_SETLEASE, F_RDLCK)` succeeds only while nobody has the file open
//! for writing (nor mapped shared and writable). From then on, any `open` for
//! writing or `truncate` of it, by any host process, first *breaks* the lease:
//! the kernel signals this process (SIGIO) and holds the writer back, in
//! `open`, until the lease is released or `/proc/sys/fs/lease-break-time`
//! (45 s by default) has passed. This process never releases it, so every
//! write lands at least that long after the signal, and the handler has by
//! then set [`revoked`]. The verifier looks at that flag after it has read a
//! block and before it trusts the block's mark: a read that saw the flag clear
//! read bytes that were there before any writer got in; after, every read is
//! hashed again, as without the lease. See `docs/verified-boot.md`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Set (for good) when a lease on any verified image breaks.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Why a lease could not be taken; reads are then hashed every time.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The SIGIO handler could not be installed.
    #[error("cannot install the lease-break handler: {0}")]
    Handler(std::io::Error),
    /// `F_SETLEASE` refused: the file is open for writing somewhere
    /// (`EAGAIN`), the filesystem has no leases (`EINVAL`), leases are off
    /// (`fs.leases-enable = 0`), or this process may not lease it (`EACCES`).
    #[error("cannot take a read lease on the image: {0}")]
    Lease(std::io::Error),
}

extern "C" fn on_lease_break(_: libc::c_int) {
    // Only an atomic store: async-signal-safe, and no syscall (the device
    // threads' seccomp filters allow rt_sigreturn and little else).
    BROKEN.store(true, Ordering::SeqCst);
}

fn install_handler() -> Result<(), std::io::Error> {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let errno = *INSTALLED.get_or_init(|| {
        // SAFETY: the handler only stores to an atomic. SA_RESTART keeps the
        // threads' blocking calls from failing with EINTR when it runs on them.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_lease_break as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGIO, &action, std::ptr::null_mut())
        };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        }
    });
    match errno {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// Takes a read lease on `image` (opened read-only) and returns the flag that
/// a break of any such lease sets. The lease lasts as long as the open file;
/// it is never released early (see the module's text).
pub fn take_read_lease(image: &File) -> Result<&'static AtomicBool, LeaseError> {
    install_handler().map_err(LeaseError::Handler)?;
    // SAFETY: F_SETLEASE takes an int argument; the fd is open for the call.
    let rc = unsafe { libc::fcntl(image.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if rc != 0 {
        return Err(LeaseError::Lease(std::io::Error::last_os_error()));
    }
    Ok(&BROKEN)
}

/// Records a lease break seen another way (the VMM's signal thread, which
/// takes SIGIO with `sigwait` once every thread blocks it), or a lease whose
/// breaks can no longer reach this process.
pub fn note_break() {
    BROKEN.store(true, Ordering::SeqCst);
}

/// Sends the breaks of `image`'s lease to this process: after a fork (the
/// jail's), they would still go to the process that took the lease.
pub fn signal_this_process(image: &File) -> Result<(), std::io::Error> {
    // SAFETY: F_SETOWN takes a pid argument; the fd is open for the call.
    let rc = unsafe { libc::fcntl(image.as_raw_fd(), libc::F_SETOWN, libc::getpid()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a lease has broken in this process.
pub fn revoked() -> bool {
    BROKEN.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_writer_breaks_the_lease_before_it_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        // A file open for writing cannot be leased.
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let image = File::open(&path).unwrap();
        assert!(matches!(take_read_lease(&image), Err(LeaseError::Lease(_))));
        drop(writer);

        let flag = take_read_lease(&image).unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        let opened = std::sync::Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let path = path.clone();
            let opened = std::sync::Arc::clone(&opened);
            move || {
                let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                opened.store(true, Ordering::SeqCst);
                drop(file);
            }
        });
        let start = Instant::now();
        while !revoked() {
            assert!(start.elapsed() < Duration::from_secs(10), "no lease break");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The writer is still held back: the flag came first.
        assert!(!opened.load(Ordering::SeqCst));
        // Releasing the lease lets the writer in (the VMM never does).
        // SAFETY: F_SETLEASE takes an int argument; the fd is open.
        let released = unsafe { libc::fcntl(image.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        assert_eq!(released, 0);
        writer.join().unwrap();
        assert!(opened.load(Ordering::SeqCst));
    }
}
