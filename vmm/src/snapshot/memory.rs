//! Guest memory to a file and back.
//!
//! Saving writes each RAM region in guest-address order, one after the other, hashing
//! as it goes; a megabyte that is all zeros is left as a hole (the file is sparse, and
//! reads back as zeros). Restoring maps the file's ranges `MAP_PRIVATE`: nothing is read
//! until the guest touches a page, and every VM restored from one file shares the pages
//! it has not written to (a write copies the page into that VM alone; the file never
//! changes).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use mvm_loader::measure::Sha256Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::SnapshotError;

/// How much is copied, hashed and written at a time.
const CHUNK: usize = 1 << 20;

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
/// layout and the SHA-256 of the file's whole contents. The vCPUs must be paused.
pub fn save(
    memory: &GuestMemoryMmap,
    file: &mut File,
) -> Result<(Vec<RegionLayout>, Sha256Digest), SnapshotError> {
    let mut hasher = Sha256::new();
    let mut layout = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let len = region.len();
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
            hasher.update(&*chunk);
            if chunk.iter().all(|&b| b == 0) {
                // n <= CHUNK (1 MiB): it fits an i64.
                file.seek(SeekFrom::Current(i64::try_from(n).unwrap_or(i64::MAX)))
                    .map_err(io("writing the memory file"))?;
            } else {
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
    Ok((layout, Sha256Digest(hasher.finalize().into())))
}

/// The SHA-256 of everything in `file` from its start, and its length.
pub fn digest(file: &mut File) -> Result<(Sha256Digest, u64), SnapshotError> {
    file.seek(SeekFrom::Start(0))
        .map_err(io("reading the memory file"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("reading the memory file"))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
        total += n as u64;
    }
    Ok((Sha256Digest(hasher.finalize().into()), total))
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
