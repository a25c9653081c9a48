//! Guest memory to a file and back.
//!
//! Saving writes each RAM region in guest-address order, one after the other, a
//! [`CHUNK`] at a time: a chunk that is all zeros is left as a hole (the file is sparse,
//! and reads back as zeros), every other chunk is written and its SHA-256 put in the
//! [`MemoryIndex`]. Checking a file against its index hashes only the chunks that hold
//! data; a chunk the index says is zero is skipped where the file has a hole there
//! (`SEEK_DATA`) and otherwise read and compared with zeros. A guest's memory is mostly
//! never touched, so this is a fraction of hashing the whole file (under the test host's
//! emulated CPU, 128 MiB took 1.8 s to hash whole).
//!
//! Restoring maps the file's ranges `MAP_PRIVATE`: nothing is read until the guest
//! touches a page, and every VM restored from one file shares the pages it has not
//! written to (a write copies the page into that VM alone; the file never changes).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use mvm_loader::measure::Sha256Digest;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::SnapshotError;

pub use mvm_loader::snapshot_memory::{MemoryIndex, CHUNK};

/// Where one RAM region lives in guest-physical space and in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of its first byte in the memory file.
    pub file_offset: u64,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// Writes every region of `memory` to `file` (empty, positioned at 0); returns the
/// layout and the index of the chunks that hold data. The vCPUs and devices must be paused.
pub fn save(
    memory: &GuestMemoryMmap,
    file: &mut File,
) -> Result<(Vec<RegionLayout>, MemoryIndex), SnapshotError> {
    let mut index = MemoryIndex {
        chunk_bytes: CHUNK as u64,
        data: Vec::new(),
    };
    let mut layout = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let len = region.len();
        if offset % CHUNK as u64 != 0 {
            return Err(SnapshotError::Format {
                what: "memory",
                why: format!("a region at file offset {offset} is not chunk-aligned"),
            });
        }
        layout.push(RegionLayout {
            guest_addr: start,
            len,
            file_offset: offset,
        });
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = buf.get_mut(..n).ok_or(SnapshotError::Format {
                what: "memory",
                why: "chunk larger than its buffer".into(),
            })?;
            memory
                .read_slice(chunk, GuestAddress(start + done))
                .map_err(|e| SnapshotError::Format {
                    what: "memory",
                    why: format!("reading guest memory at {:#x}: {e}", start + done),
                })?;
            if chunk.iter().all(|&b| b == 0) {
                // n <= CHUNK (1 MiB): it fits an i64.
                file.seek(SeekFrom::Current(i64::try_from(n).unwrap_or(i64::MAX)))
                    .map_err(io("writing the memory file"))?;
            } else {
                index
                    .data
                    .push(((offset + done) / CHUNK as u64, Sha256Digest::of(chunk)));
                file.write_all(chunk)
                    .map_err(io("writing the memory file"))?;
            }
            done += n as u64;
        }
        offset += len;
    }
    // A trailing hole has to be made part of the file.
    file.set_len(offset)
        .map_err(io("writing the memory file"))?;
    file.sync_all().map_err(io("writing the memory file"))?;
    Ok((layout, index))
}

/// Where the next data at or after `at` begins (`SEEK_DATA`); `None` when only a hole
/// follows to the end, or when the file system cannot say (the caller then reads).
fn next_data(file: &File, at: u64) -> Option<u64> {
    let at = i64::try_from(at).ok()?;
    // SAFETY: lseek on an fd this File owns; it only moves the file offset, which every
    // read here sets again with seek.
    let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), at, libc::SEEK_DATA) };
    if r < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // ENXIO: no data past `at`. Anything else: the file system cannot tell.
        return if errno == Some(libc::ENXIO) {
            Some(u64::MAX)
        } else {
            Some(at.unsigned_abs())
        };
    }
    u64::try_from(r).ok()
}

/// Checks `file` against `index` and its expected length; what differs first, if anything.
/// The indexed chunks are hashed on up to [`CHECK_THREADS`] threads (each reads its own
/// chunks with `pread`); the holes are checked on this one.
pub fn check(file: &mut File, index: &MemoryIndex, len: u64) -> Result<(), String> {
    let found = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    if found != len {
        return Err(format!("the file is {found} bytes, the seal says {len}"));
    }
    if index.chunk_bytes != CHUNK as u64 {
        return Err(format!(
            "chunks of {} bytes, this VMM writes {CHUNK}",
            index.chunk_bytes
        ));
    }
    let chunks = len.div_ceil(CHUNK as u64);
    let mut previous = None;
    for &(at, _) in &index.data {
        if previous.is_some_and(|p| at <= p) {
            return Err(format!("the index is out of order at chunk {at}"));
        }
        if at >= chunks {
            return Err(format!("the index names chunk {at}, past the file's end"));
        }
        previous = Some(at);
    }
    check_holes(file, index, len, chunks)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, CHECK_THREADS);
    let file = &*file;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|first| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; CHUNK];
                    for &(i, digest) in index.data.iter().skip(first).step_by(threads) {
                        let start = i * CHUNK as u64;
                        let n = usize::try_from((len - start).min(CHUNK as u64)).unwrap_or(CHUNK);
                        let chunk = buf.get_mut(..n).ok_or("chunk larger than its buffer")?;
                        std::os::unix::fs::FileExt::read_exact_at(file, chunk, start)
                            .map_err(|e| format!("read at {start}: {e}"))?;
                        if Sha256Digest::of(chunk) != digest {
                            return Err(format!(
                                "chunk {i} (at byte {start}) is not the one sealed"
                            ));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| "a memory check thread panicked".to_owned())?
        })
    })
}

/// How many threads hash a memory file's chunks at most.
pub const CHECK_THREADS: usize = 4;

/// Checks that every chunk the index does not name is zeros: a hole, or data that reads
/// as zeros.
fn check_holes(file: &mut File, index: &MemoryIndex, len: u64, chunks: u64) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut entries = index.data.iter().peekable();
    let mut data_at = 0u64;
    for i in 0..chunks {
        if entries.peek().is_some_and(|&&(at, _)| at == i) {
            entries.next();
            continue;
        }
        let start = i * CHUNK as u64;
        let n = usize::try_from((len - start).min(CHUNK as u64)).unwrap_or(CHUNK);
        if data_at < start {
            data_at = next_data(file, start).unwrap_or(start);
        }
        if data_at >= start + n as u64 {
            // A hole: zeros, as the index says.
            continue;
        }
        let chunk = buf.get_mut(..n).ok_or("chunk larger than its buffer")?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| e.to_string())?;
        file.read_exact(chunk)
            .map_err(|e| format!("read at {start}: {e}"))?;
        if chunk.iter().any(|&b| b != 0) {
            return Err(format!(
                "chunk {i} (at byte {start}) was sealed as zeros and is not"
            ));
        }
    }
    Ok(())
}

/// Breaks of `file`'s leases to this process, as `signal`.
pub(super) fn route_breaks(file: &File, signal: i32) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: fcntl on an fd this File owns, with int arguments.
    let steps = unsafe {
        [
            libc::fcntl(fd, F_SETSIG, signal),
            libc::fcntl(fd, libc::F_SETOWN, libc::getpid()),
        ]
    };
    if steps.iter().any(|&rc| rc != 0) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A lease of `kind` on `file`.
pub(super) fn set_lease(file: &File, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd this File owns, with an int argument.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::F_SETLEASE,
            kind,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `F_SETSIG` (`<asm-generic/fcntl.h>`; the libc crate does not name it): which signal
/// the kernel sends for an fd's lease break.
const F_SETSIG: libc::c_int = 10;

/// The real-time signal a break of a memory file's read lease sends (`SIGRTMIN + 1`;
/// `SIGRTMIN` kicks vCPUs).
pub fn lease_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// Takes a read lease on the memory file (opened read-only), its breaks sent to this
/// process as [`lease_signal`]. From then on, a host process that opens the file for
/// writing (or truncates it) is held back in `open` while the VMM is told, and the VMM ends
/// the VM (`boot::spawn_signal_waiter`): a `MAP_PRIVATE` mapping shows the file's later
/// changes in every page the guest has not written, so a writer must never get in while
/// the VM runs. Fails while the file is open for writing anywhere, or where leases are
/// not to be had (`EINVAL`: the file system; `EACCES`: not the file's owner).
pub fn lease(file: &File) -> std::io::Result<()> {
    route_breaks(file, lease_signal())?;
    set_lease(file, libc::F_RDLCK)
}

/// Sends the memory lease's breaks to this process: after the jail's fork they would
/// still go to the process that took it.
pub fn claim_lease_signals(file: &File) -> std::io::Result<()> {
    // SAFETY: F_SETOWN takes a pid; the fd is open for the call.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::F_SETOWN,
            libc::getpid(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Maps `file` as guest memory by `layout`, private and lazily. The caller has checked
/// the file's digest and that `layout` is the one the sealed manifest names.
pub fn map(file: &File, layout: &[RegionLayout]) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let len = usize::try_from(r.len).map_err(|_| SnapshotError::Format {
            what: "memory layout",
            why: format!("a region of {} bytes does not fit this host", r.len),
        })?;
        let fd = file.try_clone().map_err(io("mapping the memory file"))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .build()
            .map_err(|e| SnapshotError::Format {
                what: "memory layout",
                why: format!("mapping {len} bytes at file offset {}: {e}", r.file_offset),
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or(
            SnapshotError::Format {
                what: "memory layout",
                why: format!("a region at {:#x} wraps guest memory", r.guest_addr),
            },
        )?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Format {
        what: "memory layout",
        why: e.to_string(),
    })
}
