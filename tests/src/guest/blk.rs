//! The `blk-*` modes: what the guest does with its virtio-blk disks.
//!
//! - `blk-root`: booted from a read-only ext4 root (`root=/dev/vda ro`); prints a file of
//!   that root, the disk's serial (`/sys/block/vda/serial`), and tries to write the raw
//!   disk, which must fail.
//! - `blk-write`: writes [`PATTERN_BYTES`] of [`pattern`] to the start of `/dev/<dev>`
//!   (`mvm.blk.dev=`, default `vda`), fsyncs, powers off; the host reads the bytes back.
//! - `blk-reread`: booted as `blk-root`; reads [`ROOT_FILE`] from the disk (O_DIRECT,
//!   past the page cache) every 100 ms and says what it got: its first text, then a
//!   change, an error, or after [`REREAD_SECS`] that nothing changed.
//! - `blk-parallel`: one thread per CPU, each pinned, writes and reads back its own region
//!   of `/dev/vda` at the same time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use super::{Ending, Guest, GuestError};

/// The file `blk-root` prints, and what `scripts/build-blk-images` puts in it (keep the
/// two in step).
pub const ROOT_FILE: &str = "/etc/mvm-blk.txt";
/// The content of [`ROOT_FILE`] (without the trailing newline).
pub const ROOT_FILE_TEXT: &str = "hello from a read-only ext4 root on virtio-blk";
/// Bytes `blk-write` writes.
pub const PATTERN_BYTES: usize = 8 << 20;
/// Seed of the bytes `blk-write` writes.
pub const WRITE_SEED: u8 = 0x5b;
/// Bytes each `blk-parallel` thread writes and reads back.
pub const PARALLEL_REGION: usize = 1 << 20;
/// Seed of thread `t`'s region in `blk-parallel` is `PARALLEL_SEED + t`.
pub const PARALLEL_SEED: u8 = 0x60;
/// Threads (and CPUs) `blk-parallel` uses.
pub const PARALLEL_THREADS: usize = 2;

/// Line prefixes the cases look for.
pub const SAY_FILE: &str = "blk-root: file=";
/// `blk-serial: <dev>=<serial>`.
pub const SAY_SERIAL: &str = "blk-serial: ";
/// The read-only write attempt failed as it must.
pub const SAY_RO_REFUSED: &str = "blk-ro-write: refused";
/// The read-only write attempt succeeded: a failure.
pub const SAY_RO_ALLOWED: &str = "blk-ro-write: ALLOWED";
/// `blk-write` finished.
pub const SAY_WRITTEN: &str = "blk-write: written and synced";
/// `blk-reread`'s first read: `blk-reread: first=<text>`.
pub const SAY_REREAD_FIRST: &str = "blk-reread: first=";
/// A later read returned other bytes: the guest saw a change.
pub const SAY_REREAD_CHANGED: &str = "blk-reread: CHANGED=";
/// A later read failed.
pub const SAY_REREAD_ERROR: &str = "blk-reread: error";
/// Nothing changed within [`REREAD_SECS`].
pub const SAY_REREAD_SAME: &str = "blk-reread: unchanged";
/// How long `blk-reread` keeps reading.
pub const REREAD_SECS: u64 = 90;
/// `blk-parallel` finished and every byte read back matched.
pub const SAY_PARALLEL_OK: &str = "blk-parallel: ok";

const CHUNK: usize = 1 << 20;
/// Buffer alignment O_DIRECT needs (a page covers any logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Byte at `offset` of the stream with `seed`: position-dependent and different per seed,
/// so misplaced, stale or missing sectors show. Each aligned 8-byte word is one multiply,
/// cheap enough for a debug-built init under an emulated CPU.
pub fn pattern(seed: u8, offset: u64) -> u8 {
    let word = pattern_word(seed, offset / 8).to_le_bytes();
    word.get(usize::try_from(offset % 8).unwrap_or(0))
        .copied()
        .unwrap_or(0)
}

fn pattern_word(seed: u8, word_index: u64) -> u64 {
    word_index
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(seed).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Fills `buf` with the pattern starting at `offset`.
pub fn fill_pattern(seed: u8, offset: u64, buf: &mut [u8]) {
    if offset % 8 == 0 {
        let tail_at = offset + (buf.len() - buf.len() % 8) as u64;
        let mut words = buf.chunks_exact_mut(8);
        for (index, w) in (offset / 8..).zip(&mut words) {
            w.copy_from_slice(&pattern_word(seed, index).to_le_bytes());
        }
        for (i, b) in (tail_at..).zip(words.into_remainder().iter_mut()) {
            *b = pattern(seed, i);
        }
    } else {
        for (i, b) in (offset..).zip(buf.iter_mut()) {
            *b = pattern(seed, i);
        }
    }
}

/// The first offset in `buf` (which holds stream bytes from `offset`) that does not match.
pub fn first_mismatch(seed: u8, offset: u64, buf: &[u8]) -> Option<u64> {
    (offset..)
        .zip(buf.iter())
        .find(|(i, b)| pattern(seed, *i) != **b)
        .map(|(i, _)| i)
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Sys { what, source }
}

fn mount_sysfs() -> Result<(), GuestError> {
    use nix::mount::{mount, MsFlags};
    match mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(GuestError::Sys {
            what: "mount sysfs on /sys".into(),
            source: e.into(),
        }),
    }
}

/// `blk-root`.
pub fn root(guest: &Guest) -> Result<Ending, GuestError> {
    let text = std::fs::read_to_string(ROOT_FILE).map_err(sys(format!("read {ROOT_FILE}")))?;
    guest.console.say(&format!("{SAY_FILE}{}", text.trim_end()));
    mount_sysfs()?;
    let serial = std::fs::read_to_string("/sys/block/vda/serial")
        .map_err(sys("read /sys/block/vda/serial"))?;
    guest
        .console
        .say(&format!("{SAY_SERIAL}vda={}", serial.trim_end()));
    let attempt = OpenOptions::new()
        .write(true)
        .open("/dev/vda")
        .and_then(|mut f| {
            f.write_all(&[0xee; 512])?;
            f.sync_all()
        });
    match attempt {
        Err(e) => guest.console.say(&format!("{SAY_RO_REFUSED} ({e})")),
        Ok(()) => guest.console.say(SAY_RO_ALLOWED),
    }
    Ok(Ending::PowerOff)
}

/// One read of [`ROOT_FILE`] from the disk itself (O_DIRECT into an aligned buffer).
fn read_direct() -> std::io::Result<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(ROOT_FILE)?;
    // An aligned window of a larger allocation, as blk-parallel's.
    let mut raw = vec![0u8; 2 * DIRECT_ALIGN];
    let at = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = raw
        .get_mut(at..at + DIRECT_ALIGN)
        .ok_or_else(|| std::io::Error::other("no aligned buffer"))?;
    let n = file.read(aligned)?;
    Ok(
        String::from_utf8_lossy(aligned.get(..n).unwrap_or_default())
            .trim_end()
            .to_owned(),
    )
}

/// `blk-reread`.
pub fn reread(guest: &Guest) -> Result<Ending, GuestError> {
    let first = read_direct().map_err(sys(format!("read {ROOT_FILE} (O_DIRECT)")))?;
    guest.console.say(&format!("{SAY_REREAD_FIRST}{first}"));
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(REREAD_SECS) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        match read_direct() {
            Ok(text) if text == first => {}
            Ok(text) => {
                guest.console.say(&format!("{SAY_REREAD_CHANGED}{text}"));
                return Ok(Ending::PowerOff);
            }
            Err(e) => {
                guest.console.say(&format!("{SAY_REREAD_ERROR} ({e})"));
                return Ok(Ending::PowerOff);
            }
        }
    }
    guest.console.say(SAY_REREAD_SAME);
    Ok(Ending::PowerOff)
}

/// `blk-write`.
pub fn write(guest: &Guest) -> Result<Ending, GuestError> {
    let dev = format!("/dev/{}", guest.param("mvm.blk.dev").unwrap_or("vda"));
    let mut disk = OpenOptions::new()
        .write(true)
        .open(&dev)
        .map_err(sys(format!("open {dev} for writing")))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0usize;
    while at < PATTERN_BYTES {
        let n = CHUNK.min(PATTERN_BYTES - at);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        fill_pattern(WRITE_SEED, at as u64, chunk);
        disk.write_all(chunk)
            .map_err(sys(format!("write {dev} at {at}")))?;
        at += n;
    }
    guest.console.say("blk-write: written, syncing");
    disk.sync_all().map_err(sys(format!("fsync {dev}")))?;
    guest
        .console
        .say(&format!("{SAY_WRITTEN} ({PATTERN_BYTES} bytes to {dev})"));
    Ok(Ending::PowerOff)
}

/// One `blk-parallel` thread: pin to `cpu`, write its region, fsync, read it back from
/// the disk (O_DIRECT) and compare. Returns the CPU it ran on.
fn parallel_worker(cpu: usize) -> Result<usize, String> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("cpu set {cpu}: {e}"))?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("pin to cpu {cpu}: {e}"))?;
    let seed = PARALLEL_SEED.wrapping_add(u8::try_from(cpu).unwrap_or(u8::MAX));
    let base = (cpu * PARALLEL_REGION) as u64;
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vda")
        .map_err(|e| format!("open /dev/vda: {e}"))?;
    let mut buf = vec![0u8; PARALLEL_REGION];
    fill_pattern(seed, 0, &mut buf);
    disk.seek(SeekFrom::Start(base))
        .map_err(|e| format!("seek: {e}"))?;
    disk.write_all(&buf)
        .map_err(|e| format!("cpu {cpu} write: {e}"))?;
    disk.sync_data()
        .map_err(|e| format!("cpu {cpu} fsync: {e}"))?;
    super::Console.say(&format!(
        "blk-parallel: cpu {cpu} wrote and synced its region"
    ));
    // Read back with O_DIRECT, past the page cache, so the bytes come from the disk. The
    // buffer must be aligned: take an aligned window of a larger allocation.
    let mut raw = vec![0u8; PARALLEL_REGION + DIRECT_ALIGN];
    let at = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = raw
        .get_mut(at..at + PARALLEL_REGION)
        .ok_or_else(|| format!("cpu {cpu}: no aligned buffer"))?;
    let mut direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/vda")
        .map_err(|e| format!("open /dev/vda O_DIRECT: {e}"))?;
    direct
        .seek(SeekFrom::Start(base))
        .map_err(|e| format!("seek: {e}"))?;
    direct
        .read_exact(aligned)
        .map_err(|e| format!("cpu {cpu} direct read: {e}"))?;
    buf.copy_from_slice(aligned);
    if let Some(bad) = first_mismatch(seed, 0, &buf) {
        return Err(format!(
            "cpu {cpu}: byte {bad} of its region reads back wrong"
        ));
    }
    nix::sched::sched_getcpu().map_err(|e| format!("sched_getcpu: {e}"))
}

/// `blk-parallel`.
pub fn parallel(guest: &Guest) -> Result<Ending, GuestError> {
    let threads: Vec<_> = (0..PARALLEL_THREADS)
        .map(|cpu| std::thread::spawn(move || parallel_worker(cpu)))
        .collect();
    let mut cpus = Vec::new();
    for t in threads {
        let ran_on = t
            .join()
            .map_err(|_| GuestError::Check("a blk-parallel thread panicked".into()))
            .and_then(|r| r.map_err(GuestError::Check));
        cpus.push(ran_on?);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.len() != PARALLEL_THREADS {
        return Err(GuestError::Check(format!(
            "threads ran on cpus {cpus:?}, not {PARALLEL_THREADS} distinct ones"
        )));
    }
    guest
        .console
        .say(&format!("{SAY_PARALLEL_OK} cpus={cpus:?}"));
    Ok(Ending::PowerOff)
}

/// Reads the first `len` bytes of `path`.
pub fn read_prefix(path: &std::path::Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_by_seed_and_position_and_mismatch_finds_the_byte() {
        let mut a = vec![0u8; 4096];
        fill_pattern(1, 0, &mut a);
        let mut b = vec![0u8; 4096];
        fill_pattern(2, 0, &mut b);
        assert_ne!(a, b);
        let mut c = vec![0u8; 4096];
        fill_pattern(1, 512, &mut c);
        assert_ne!(a, c);
        assert_eq!(first_mismatch(1, 0, &a), None);
        a[1000] ^= 1;
        assert_eq!(first_mismatch(1, 0, &a), Some(1000));
        // The word fast path and the byte path agree, at any offset.
        for offset in [0u64, 3, 8, 4093] {
            let mut fast = vec![0u8; 1000];
            fill_pattern(9, offset, &mut fast);
            let slow: Vec<u8> = (offset..offset + 1000).map(|i| pattern(9, i)).collect();
            assert_eq!(fast, slow, "offset {offset}");
        }
        // Not degenerate: most byte values occur.
        let mut seen = [false; 256];
        for x in &b {
            seen[usize::from(*x)] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 200);
    }
}
