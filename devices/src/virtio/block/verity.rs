//! Verified reads for a read-only disk that the plan pins with a dm-verity root hash.
//!
//! Every guest read goes through [`VerityVerifier::read_blocks_verified`]: each data block the
//! read touches is hashed and checked against the tree (and the tree up to the pinned
//! root) before any of its bytes reach guest memory; with the image leased
//! ([`VerifyMode::OnceWhileLeased`], [`super::lease`]) a block that verified is trusted on
//! later reads until a host process opens the image for writing. A block that does not verify is an
//! I/O error for that request (`VIRTIO_BLK_S_IOERR`) and a [`VerityFailure`] report;
//! the device keeps serving the other blocks. There is no whole-disk hash at boot and no
//! window between checking a block and handing it over: the bytes copied to the guest are
//! the bytes that were hashed.

use std::fs::File;

use mvm_loader::verity::{VerityError, VerityVerifier};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::virtio::GuestMemoryMmap;

/// What the device reports when a read does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityFailure {
    /// Byte offset of the guest's read.
    pub offset: u64,
    /// Length of the guest's read in bytes.
    pub len: u64,
    /// The data block that failed, when the failure is a data block's.
    pub block: Option<u64>,
    /// The verifier's message (block, expected and computed digests).
    pub error: String,
}

/// How a pinned disk's reads are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyMode {
    /// Each data block is hashed the first time it is read and trusted after
    /// (while its hash block is cached), for as long as the image's read lease
    /// holds ([`super::lease`]); every read is hashed again once it breaks.
    OnceWhileLeased,
    /// Every read hashes every block it touches; why the image could not be leased.
    EveryRead(String),
}

impl VerifyMode {
    /// A short name for logs and events: `once_while_leased` or `every_read`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::OnceWhileLeased => "once_while_leased",
            Self::EveryRead(_) => "every_read",
        }
    }
}

/// Called on the device thread for each failed read (the VMM writes an event).
pub type FailureSink = Box<dyn FnMut(&VerityFailure) + Send>;

/// A read-only disk's verifier and where its failures go.
pub struct VerifiedDisk {
    verifier: VerityVerifier,
    on_failure: FailureSink,
    failures: u64,
}

impl std::fmt::Debug for VerifiedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedDisk")
            .field("verifier", &self.verifier)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl VerifiedDisk {
    /// Reads through `verifier`; each failed read is passed to `on_failure`.
    pub fn new(verifier: VerityVerifier, on_failure: FailureSink) -> Self {
        Self {
            verifier,
            on_failure,
            failures: 0,
        }
    }

    /// Hashes a data block once and trusts it afterwards (while its hash block is
    /// cached) until `revoked` is set: what a read lease on the image
    /// ([`super::lease`]) makes safe.
    pub fn verify_once_until(&mut self, revoked: &'static std::sync::atomic::AtomicBool) {
        self.verifier.check_at_most_once_until(revoked);
    }

    /// Reads that failed verification so far.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Size of the verified data in bytes.
    #[must_use]
    pub fn data_size(&self) -> u64 {
        self.verifier.data_size()
    }

    /// Fills the guest's `segments` with the verified bytes of `image` from `offset` on.
    /// The request's data blocks are read and hashed in runs of up to
    /// [`mvm_loader::verity::READ_CHUNK_BYTES`] (one `pread` per run, into the verifier's
    /// buffer, which is all the memory a read needs), and each run's verified bytes are
    /// copied straight into the segments they belong to. No byte reaches guest memory
    /// before the whole run holding it has verified.
    pub fn read_into_guest(
        &mut self,
        image: &File,
        offset: u64,
        segments: &[(GuestAddress, u32)],
        mem: &GuestMemoryMmap,
    ) -> std::io::Result<()> {
        let total: u64 = segments.iter().map(|&(_, len)| u64::from(len)).sum();
        if let Err(e) = Self::scatter(&mut self.verifier, image, offset, total, segments, mem) {
            if let ScatterError::Verity(e) = e {
                self.failures = self.failures.saturating_add(1);
                let block = match &e {
                    VerityError::DataBlock { block, .. } => Some(*block),
                    _ => None,
                };
                let failure = VerityFailure {
                    offset,
                    len: total,
                    block,
                    error: e.to_string(),
                };
                tracing::warn!(offset, len = total, error = %e, "virtio-blk: verity check failed");
                (self.on_failure)(&failure);
                return Err(std::io::Error::other(e));
            }
            return Err(std::io::Error::other(e));
        }
        Ok(())
    }

    fn scatter(
        verifier: &mut VerityVerifier,
        image: &File,
        offset: u64,
        total: u64,
        segments: &[(GuestAddress, u32)],
        mem: &GuestMemoryMmap,
    ) -> Result<(), ScatterError> {
        let end = offset
            .checked_add(total)
            .filter(|&e| e <= verifier.data_size())
            .ok_or(ScatterError::Verity(VerityError::OutOfRange {
                offset,
                len: total,
                data_size: verifier.data_size(),
            }))?;
        let block_size = u64::from(verifier.params().data_block_size);
        let mut segs = segments.iter();
        // The current segment and how much of it is filled.
        let mut seg: Option<(GuestAddress, u64)> = None;
        let mut seg_done = 0u64;
        let mut pos = offset;
        while pos < end {
            let (first, count) = verifier.chunk_for(pos, end);
            let chunk_start = first.saturating_mul(block_size);
            let verified = verifier
                .read_blocks_verified(image, first, count)
                .map_err(ScatterError::Verity)?;
            let chunk_end = chunk_start.saturating_add(verified.len() as u64).min(end);
            while pos < chunk_end {
                let (addr, seg_len) = match seg {
                    Some(s) if seg_done < s.1 => s,
                    _ => {
                        let &(addr, len) = segs.next().ok_or(ScatterError::Arithmetic)?;
                        seg = Some((addr, u64::from(len)));
                        seg_done = 0;
                        continue;
                    }
                };
                let take = (seg_len - seg_done).min(chunk_end - pos);
                let from =
                    usize::try_from(pos - chunk_start).map_err(|_| ScatterError::Arithmetic)?;
                let take_usize = usize::try_from(take).map_err(|_| ScatterError::Arithmetic)?;
                let src = verified
                    .get(from..from.saturating_add(take_usize))
                    .ok_or(ScatterError::Arithmetic)?;
                let dst = addr.checked_add(seg_done).ok_or(ScatterError::Arithmetic)?;
                mem.write_slice(src, dst)
                    .map_err(|e| ScatterError::Memory(e.to_string()))?;
                seg_done += take;
                pos += take;
            }
        }
        Ok(())
    }
}

/// Why [`VerifiedDisk::scatter`] stopped: only a `Verity` error is a failed check.
#[derive(Debug, thiserror::Error)]
enum ScatterError {
    #[error(transparent)]
    Verity(VerityError),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("verified read: segment arithmetic")]
    Arithmetic,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_loader::verity::{build_tree, BuildOptions, Salt};
    use std::sync::{Arc, Mutex};

    /// The image's byte at `i`.
    fn byte_at(i: usize) -> u8 {
        u8::try_from(i * 7 % 251).unwrap()
    }

    fn image_and_tree(dir: &std::path::Path, blocks: usize) -> (File, VerityVerifier) {
        let image_path = dir.join("disk.img");
        let data: Vec<u8> = (0..blocks * 4096).map(byte_at).collect();
        std::fs::write(&image_path, &data).unwrap();
        let tree_path = dir.join("disk.img.verity");
        let params = build_tree(
            &image_path,
            &tree_path,
            &BuildOptions::new(Salt(vec![0xab; 32])),
        )
        .unwrap();
        let verifier = VerityVerifier::open(&tree_path, &params).unwrap();
        (
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image_path)
                .unwrap(),
            verifier,
        )
    }

    #[test]
    fn good_blocks_reach_the_guest_and_a_changed_block_is_an_error_and_a_report() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (image, verifier) = image_and_tree(dir.path(), 8);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let mut disk = VerifiedDisk::new(
            verifier,
            Box::new(move |f: &VerityFailure| sink.lock().unwrap().push(f.clone())),
        );
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Two segments straddling a block boundary.
        let segs = [(GuestAddress(0x1000), 3000), (GuestAddress(0x8000), 2000)];
        disk.read_into_guest(&image, 4096 + 1000, &segs, &mem)
            .unwrap();
        let mut got = vec![0u8; 3000];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        let want: Vec<u8> = (5096..8096).map(byte_at).collect();
        assert_eq!(got, want);
        let mut got = vec![0u8; 2000];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        let want: Vec<u8> = (8096..10096).map(byte_at).collect();
        assert_eq!(got, want);
        assert_eq!(disk.failures(), 0);

        // One byte of block 5 changes after the tree was built.
        image
            .write_all_at(&[0xff ^ byte_at(5 * 4096 + 9)], 5 * 4096 + 9)
            .unwrap();
        let err = disk
            .read_into_guest(&image, 5 * 4096, &[(GuestAddress(0x2000), 4096)], &mem)
            .unwrap_err();
        assert!(err.to_string().contains("data block 5"), "{err}");
        let reports = seen.lock().unwrap().clone();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].block, Some(5));
        assert_eq!(reports[0].offset, 5 * 4096);
        assert_eq!(disk.failures(), 1);
        // The neighbours still read.
        disk.read_into_guest(&image, 4 * 4096, &[(GuestAddress(0x2000), 4096)], &mem)
            .unwrap();
        disk.read_into_guest(&image, 6 * 4096, &[(GuestAddress(0x2000), 8192)], &mem)
            .unwrap();
        // A read past the data is refused, not served from beyond the tree.
        assert!(disk
            .read_into_guest(&image, 8 * 4096, &[(GuestAddress(0x2000), 512)], &mem)
            .is_err());
    }

    #[test]
    fn a_read_larger_than_a_chunk_lands_in_the_right_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (image, verifier) = image_and_tree(dir.path(), 300);
        let mut disk = VerifiedDisk::new(verifier, Box::new(|_| {}));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        // 512 B, 1 MiB + 512 B, 3 KiB: runs and segments end in different places.
        let segs = [
            (GuestAddress(0x1000), 512),
            (GuestAddress(0x10_0000), (1 << 20) + 512),
            (GuestAddress(0x30_0000), 3072),
        ];
        let offset = 3 * 4096 + 1024;
        disk.read_into_guest(&image, offset, &segs, &mem).unwrap();
        let mut at = usize::try_from(offset).unwrap();
        for (addr, len) in segs {
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, addr).unwrap();
            let want: Vec<u8> = (at..at + len as usize).map(byte_at).collect();
            assert!(got == want, "segment at {addr:?}");
            at += len as usize;
        }
        assert_eq!(disk.failures(), 0);
    }
}
