//! A file as the kernel knows it: which boot, which file (device and inode), how long,
//! and when its inode last changed. A snapshot's memory file is sealed with its identity
//! once written (by `mvm-vmm`) or once hashed again (by `mvm`, after a fork links it), so
//! that a restore finding the same file unchanged need not hash it again
//! (`docs/snapshots.md`). Linux's: the identity is `fstat`'s and the boot's id `/proc`'s.

use std::fs::File;
use std::io::Read;

use serde::{Deserialize, Serialize};

/// The memory file as the kernel knows it when it was written: which boot, which file
/// (device and inode), how long, and when its inode last changed. Sealed in the manifest,
/// so a restore can tell the file has not been written since the VMM wrote it, and skip
/// hashing it again ([`unchanged_since_written`]; `docs/snapshots.md` gives the argument).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// `/proc/sys/kernel/random/boot_id` of the boot that wrote it.
    pub boot_id: String,
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub bytes: u64,
    /// `st_ctime`, seconds.
    pub ctime_sec: i64,
    /// `st_ctime`, nanoseconds.
    pub ctime_nsec: i64,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), read before the jail; `None` where
/// it cannot be read, and then no memory file is taken as unchanged.
pub fn boot_id() -> Option<String> {
    let mut text = String::new();
    File::open("/proc/sys/kernel/random/boot_id")
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    let id = text.trim();
    (id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| id.to_owned())
}

/// `fstat` of `file` as a [`FileIdentity`] of boot `boot_id`. (The `fstat` system call
/// itself, not glibc's, which is `newfstatat` with an empty path: the snapshot thread's
/// filter allows `fstat`, which names no path.)
pub fn identity(file: &File, boot_id: &str) -> std::io::Result<FileIdentity> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat fills the stat buffer, which is as large as the kernel's x86_64
    // `struct stat` (libc::stat is that struct), for an fd this File owns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fstat,
            std::os::fd::AsRawFd::as_raw_fd(file),
            st.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it wrote the whole buffer (and it started zeroed).
    let st = unsafe { st.assume_init() };
    Ok(FileIdentity {
        boot_id: boot_id.to_owned(),
        dev: st.st_dev,
        ino: st.st_ino,
        bytes: u64::try_from(st.st_size).unwrap_or(0),
        ctime_sec: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec,
    })
}

/// Whether `file` is, by [`identity`], the one `sealed` describes: the same boot, device,
/// inode, length and change time. A write by any process, through any fd or mapping,
/// a truncation, a `chmod`, a new hard link: each sets the change time to the current
/// time, which is past the sealed one ([`wait_past`]).
pub fn unchanged_since_written(file: &File, sealed: &FileIdentity, boot_id: Option<&str>) -> bool {
    boot_id.is_some_and(|id| identity(file, id).is_ok_and(|now| now == *sealed))
}

/// The coarse real-time clock, which stamps inode change times (`current_time()`).
fn coarse_now() -> Option<(i64, i64)> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec passed to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (rc == 0).then_some((ts.tv_sec, ts.tv_nsec))
}

/// Waits (at most 100 ms) until the clock that stamps change times has passed
/// `identity`'s, so any later change of the file gets a later stamp; false if it did not.
pub fn wait_past(identity: &FileIdentity) -> bool {
    let stamp = (identity.ctime_sec, identity.ctime_nsec);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    loop {
        match coarse_now() {
            Some(now) if now > stamp => return true,
            None => return false,
            Some(_) => {}
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    fn boot() -> String {
        boot_id().expect("this boot's id")
    }

    #[test]
    fn a_write_in_place_changes_the_identity_and_a_read_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let written = identity(&f, &boot()).unwrap();
        assert_eq!(written.bytes, 8192);
        assert!(wait_past(&written));
        let reader = File::open(&path).unwrap();
        let mut byte = [0u8; 1];
        reader.read_exact_at(&mut byte, 100).unwrap();
        assert!(unchanged_since_written(&reader, &written, Some(&boot())));
        // Another boot, or no boot id: never taken as unchanged.
        assert!(!unchanged_since_written(
            &reader,
            &written,
            Some("another-boot")
        ));
        assert!(!unchanged_since_written(&reader, &written, None));
        // One byte written in place, the modification time put back: the change time moved.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[8], 4096)
            .unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(!unchanged_since_written(&reader, &written, Some(&boot())));
        // A copy is another file.
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy).unwrap();
        let again = identity(&File::open(&path).unwrap(), &boot()).unwrap();
        assert!(!unchanged_since_written(
            &File::open(&copy).unwrap(),
            &again,
            Some(&boot())
        ));
    }
}
