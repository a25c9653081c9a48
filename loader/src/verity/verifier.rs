//! Per-block verification against a pinned root hash: what the virtio-blk
//! device calls on every read of a verified disk.
//!
//! Hash blocks are read from the tree file on demand and checked up the tree
//! until a block already verified (or the root) vouches for them. Verified hash
//! blocks are kept in a bounded cache, so a sequential read mostly hashes the
//! data block and nothing else. The tree file is untrusted: a block in the
//! cache is only ever one whose hash matched its parent, and the cache holds the
//! bytes that were hashed (the tree file is not re-read while a block is cached).
//!
//! Data blocks are hashed on every read, in runs of up to [`READ_CHUNK_BYTES`]
//! read with one `pread`. dm-verity's `check_at_most_once` exists as a
//! default-off option ([`VerityVerifier::set_check_at_most_once`]) that weakens
//! this; `docs/verified-boot.md` says what it gives up.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::superblock::{Superblock, SUPERBLOCK_SIZE};
use super::{salted_hash, Geometry, VerityError, VerityParams, DIGEST_SIZE};

/// Hash blocks kept by default: 1024 x 4 KiB = 4 MiB, enough for the whole
/// upper tree of a 4 GiB image plus a window of level-0 blocks.
pub const DEFAULT_CACHE_BLOCKS: usize = 1024;

/// Most data bytes read (and hashed) in one pass: one `pread` into the
/// verifier's buffer, which therefore never grows past this (plus one block).
pub const READ_CHUNK_BYTES: u64 = 1 << 20;

/// A verified hash block and, in at-most-once mode, which of the data blocks
/// it vouches for have verified since it was cached (one bit per digest slot).
struct Entry {
    block: Box<[u8]>,
    marks: Box<[u64]>,
}

/// A bounded cache of verified hash blocks, evicted oldest first. Its memory is
/// at most `capacity` x (hash block + one bit per digest in it).
struct BlockCache {
    blocks: HashMap<u64, Entry>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl BlockCache {
    fn new(capacity: usize) -> Self {
        Self {
            blocks: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: u64) -> Option<&[u8]> {
        self.blocks.get(&key).map(|e| &*e.block)
    }

    fn is_marked(&self, key: u64, slot: u64) -> bool {
        let word = usize::try_from(slot / 64).ok();
        self.blocks
            .get(&key)
            .and_then(|e| e.marks.get(word?))
            .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }

    fn mark(&mut self, key: u64, slot: u64) {
        let Some(entry) = self.blocks.get_mut(&key) else {
            return;
        };
        let Some(word) = usize::try_from(slot / 64)
            .ok()
            .and_then(|w| entry.marks.get_mut(w))
        else {
            return;
        };
        *word |= 1u64 << (slot % 64);
    }

    fn insert(&mut self, key: u64, block: Box<[u8]>) {
        if self.blocks.contains_key(&key) {
            return;
        }
        while self.blocks.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.blocks.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(key);
        let marks = vec![0u64; (block.len() / DIGEST_SIZE).div_ceil(64)].into_boxed_slice();
        self.blocks.insert(key, Entry { block, marks });
    }

    fn clear(&mut self) {
        self.blocks.clear();
        self.order.clear();
    }
}

/// Verifies data blocks of one image against its tree and pinned root hash.
pub struct VerityVerifier {
    params: VerityParams,
    geometry: Geometry,
    tree: File,
    /// Byte offset of the first hash block in the tree file.
    tree_offset: u64,
    cache: BlockCache,
    /// dm-verity's `check_at_most_once`: a data block that verified is not
    /// hashed again while the level-0 hash block vouching for it stays cached.
    /// Off by default (every read hashes every block); see
    /// [`VerityVerifier::set_check_at_most_once`].
    at_most_once: bool,
    /// When set, `at_most_once` holds only while this stays false (see
    /// [`VerityVerifier::check_at_most_once_until`]).
    revoked: Option<&'static AtomicBool>,
    /// The data blocks of one read, as read and hashed; at most
    /// [`READ_CHUNK_BYTES`] (or one data block, if larger).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for VerityVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerityVerifier")
            .field("params", &self.params)
            .field("tree_offset", &self.tree_offset)
            .field("cached_blocks", &self.cache.blocks.len())
            .finish()
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> VerityError + '_ {
    move |source| VerityError::Io {
        what: what.to_owned(),
        source,
    }
}

impl VerityVerifier {
    /// Opens the tree file at `tree_path` for an image pinned by `params`.
    pub fn open(tree_path: &Path, params: &VerityParams) -> Result<Self, VerityError> {
        let tree = File::open(tree_path).map_err(|source| VerityError::Io {
            what: format!("open tree {}", tree_path.display()),
            source,
        })?;
        Self::from_file(tree, params, DEFAULT_CACHE_BLOCKS)
    }

    /// Uses an already open tree file (say, one opened before a seccomp filter
    /// went on), caching at most `cache_blocks` verified hash blocks.
    /// A superblock, if present, must agree with `params`.
    pub fn from_file(
        tree: File,
        params: &VerityParams,
        cache_blocks: usize,
    ) -> Result<Self, VerityError> {
        let geometry = Geometry::new(params)?;
        // The end, not the metadata: a tree may be a block device (the emulated tier
        // hands the test host's `/dev/vdX` through).
        let len = std::io::Seek::seek(&mut &tree, std::io::SeekFrom::End(0))
            .map_err(io("find the tree's size"))?;
        let mut head = [0u8; SUPERBLOCK_SIZE];
        let mut tree_offset = 0;
        if len >= SUPERBLOCK_SIZE as u64 {
            tree.read_exact_at(&mut head, 0)
                .map_err(io("read tree file header"))?;
            if Superblock::present(&head) {
                Superblock::decode(&head)?.check_matches(params, &geometry)?;
                // The superblock area is rounded up to a whole hash block.
                tree_offset = u64::from(geometry.hash_block_size);
            }
        }
        let needed = geometry
            .tree_bytes()
            .and_then(|b| b.checked_add(tree_offset))
            .ok_or_else(|| VerityError::Params("tree size overflows".to_owned()))?;
        if len < needed {
            return Err(VerityError::TreeTooShort { len, needed });
        }
        Ok(Self {
            params: params.clone(),
            geometry,
            tree,
            tree_offset,
            cache: BlockCache::new(cache_blocks),
            at_most_once: false,
            revoked: None,
            scratch: Vec::new(),
        })
    }

    /// The pinned parameters.
    pub fn params(&self) -> &VerityParams {
        &self.params
    }

    /// Size of the verified image in bytes.
    pub fn data_size(&self) -> u64 {
        self.params.data_size
    }

    /// Drops every cached hash block (the next reads re-verify from the root).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Turns dm-verity's `check_at_most_once` on or off (off by default).
    ///
    /// On, a data block that verified is not hashed again while the level-0 hash
    /// block that vouches for it is cached; the marks live in that cache entry
    /// and go when it is evicted, so the memory bound is unchanged. **This
    /// weakens the per-read guarantee**: the bytes are still read from the image
    /// file every time, so a host-side write to the image after a block verified
    /// is served to the guest unverified until the mark is evicted. See
    /// `docs/verified-boot.md`.
    pub fn set_check_at_most_once(&mut self, on: bool) {
        self.at_most_once = on;
    }

    /// Turns `check_at_most_once` on for as long as `revoked` stays false, and
    /// off for good once it is set: every later read hashes every block again.
    /// The flag is looked at after a block's bytes were read and before its
    /// mark is trusted, so a caller that sets it before the image can change
    /// (the VMM's read lease on the image: `mvm_devices::virtio::block::lease`)
    /// keeps every byte handed out either verified now or unchanged since it
    /// verified.
    pub fn check_at_most_once_until(&mut self, revoked: &'static AtomicBool) {
        self.at_most_once = true;
        self.revoked = Some(revoked);
    }

    /// Whether a verified block is trusted without hashing it again right now.
    fn trusts_marks(&self) -> bool {
        self.at_most_once && !self.revoked.is_some_and(|r| r.load(Ordering::SeqCst))
    }

    /// Checks `data` (exactly one data block) as block number `index`.
    pub fn verify_block(&mut self, index: u64, data: &[u8]) -> Result<(), VerityError> {
        if index >= self.geometry.data_blocks
            || data.len() != usize::try_from(self.geometry.data_block_size).unwrap_or(0)
        {
            return Err(VerityError::OutOfRange {
                offset: index.saturating_mul(u64::from(self.geometry.data_block_size)),
                len: data.len() as u64,
                data_size: self.params.data_size,
            });
        }
        let bits = self.geometry.fanout_bits;
        let slot = index & fanout_mask(bits);
        let mark_key = if self.trusts_marks() && self.geometry.levels() > 0 {
            let key = self.cache_key(0, index >> bits)?;
            if self.cache.is_marked(key, slot) {
                return Ok(());
            }
            Some(key)
        } else {
            None
        };
        let computed = salted_hash(&self.params.salt.0, data);
        let expected = if self.geometry.levels() == 0 {
            self.params.root_hash.0
        } else {
            let block = self.verified_hash_block(0, index >> bits)?;
            digest_at(block, slot)
                .ok_or_else(|| VerityError::Params("digest outside hash block".to_owned()))?
        };
        if computed != expected {
            return Err(VerityError::DataBlock {
                block: index,
                expected: hex::encode(expected),
                computed: hex::encode(computed),
            });
        }
        if let Some(key) = mark_key {
            self.cache.mark(key, slot);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of `image`, verifying every data
    /// block the range touches before copying any of it into `buf`'s range.
    /// On error `buf` may hold verified blocks before the failing one.
    pub fn read_verified(
        &mut self,
        image: &File,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VerityError> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.params.data_size);
        let Some(end) = end else {
            return Err(VerityError::OutOfRange {
                offset,
                len,
                data_size: self.params.data_size,
            });
        };
        let mut pos = offset;
        while pos < end {
            let (first, count) = self.chunk_for(pos, end);
            let block_start = first * u64::from(self.geometry.data_block_size);
            let verified = self.read_blocks_verified(image, first, count)?;
            let from = usize::try_from(pos - block_start).unwrap_or(usize::MAX);
            let avail = verified.len().saturating_sub(from);
            let take = usize::try_from(end - pos).unwrap_or(usize::MAX).min(avail);
            let dst_at = usize::try_from(pos - offset).unwrap_or(usize::MAX);
            let src = verified.get(from..from.saturating_add(take));
            let dst = buf.get_mut(dst_at..dst_at.saturating_add(take));
            match (src, dst) {
                (Some(s), Some(d)) if take > 0 => d.copy_from_slice(s),
                _ => return Err(VerityError::Params("read range arithmetic".to_owned())),
            }
            pos += take as u64;
        }
        Ok(())
    }

    /// The run of data blocks (first, count) to read for the bytes from `pos`
    /// to `end`, at most [`READ_CHUNK_BYTES`] worth: what one call of
    /// [`VerityVerifier::read_blocks_verified`] should be asked for.
    /// `pos < end <= data_size` is the caller's to check.
    pub fn chunk_for(&self, pos: u64, end: u64) -> (u64, u64) {
        let dbs = u64::from(self.geometry.data_block_size);
        let first = pos / dbs;
        let last = end.saturating_sub(1) / dbs;
        let max = (READ_CHUNK_BYTES / dbs).max(1);
        (first, (last.saturating_sub(first) + 1).min(max))
    }

    /// Reads data blocks `first..first + count` of `image` in one `pread`,
    /// hashes every one of them against the tree, and returns those bytes (the
    /// very bytes that were hashed, held in the verifier's buffer). Every call
    /// hashes every block: nothing about data blocks is remembered between
    /// calls. At most [`READ_CHUNK_BYTES`] per call (see [`Self::chunk_for`]).
    pub fn read_blocks_verified(
        &mut self,
        image: &File,
        first: u64,
        count: u64,
    ) -> Result<&[u8], VerityError> {
        let dbs = u64::from(self.geometry.data_block_size);
        let out_of_range = VerityError::OutOfRange {
            offset: first.saturating_mul(dbs),
            len: count.saturating_mul(dbs),
            data_size: self.params.data_size,
        };
        let bytes = count
            .checked_mul(dbs)
            .filter(|&b| b <= READ_CHUNK_BYTES.max(dbs));
        let in_range = first
            .checked_add(count)
            .is_some_and(|e| e <= self.geometry.data_blocks);
        let (Some(bytes), true, true) = (bytes, in_range, count > 0) else {
            return Err(out_of_range);
        };
        let bytes = usize::try_from(bytes).map_err(|_| out_of_range)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(bytes, 0);
        let result = (|| {
            let data = scratch
                .get_mut(..bytes)
                .ok_or_else(|| VerityError::Params("read buffer".to_owned()))?;
            image
                .read_exact_at(data, first * dbs)
                .map_err(io("read image"))?;
            let block_len = usize::try_from(dbs).unwrap_or(usize::MAX);
            for (i, block) in (first..).zip(data.chunks_exact(block_len)) {
                self.verify_block(i, block)?;
            }
            Ok(())
        })();
        self.scratch = scratch;
        result?;
        self.scratch
            .get(..bytes)
            .ok_or_else(|| VerityError::Params("read buffer".to_owned()))
    }

    /// Hash blocks currently cached (never more than the capacity given to
    /// [`VerityVerifier::from_file`]).
    pub fn cached_blocks(&self) -> usize {
        self.cache.blocks.len()
    }

    /// Returns hash block `index` of `level`, verified up to a cached block or
    /// the root.
    fn verified_hash_block(&mut self, level: usize, index: u64) -> Result<&[u8], VerityError> {
        let bits = self.geometry.fanout_bits;
        // Walk up to the first cached ancestor (or past the top level).
        let mut path = Vec::new();
        let (mut l, mut i) = (level, index);
        while l < self.geometry.levels() {
            let key = self.cache_key(l, i)?;
            if self.cache.get(key).is_some() {
                break;
            }
            path.push((l, i, key));
            l += 1;
            i >>= bits;
        }
        // Verify downwards: each block against the digest its parent holds.
        for &(l, i, key) in path.iter().rev() {
            let block = self.read_hash_block(key)?;
            let expected = if l + 1 == self.geometry.levels() {
                if i != 0 {
                    return Err(VerityError::HashBlock { level: l, index: i });
                }
                self.params.root_hash.0
            } else {
                let parent_key = self.cache_key(l + 1, i >> bits)?;
                let parent = self.cache.get(parent_key).ok_or(VerityError::HashBlock {
                    level: l + 1,
                    index: i >> bits,
                })?;
                digest_at(parent, i & fanout_mask(bits))
                    .ok_or(VerityError::HashBlock { level: l, index: i })?
            };
            if salted_hash(&self.params.salt.0, &block) != expected {
                return Err(VerityError::HashBlock { level: l, index: i });
            }
            self.cache.insert(key, block);
        }
        let key = self.cache_key(level, index)?;
        self.cache
            .get(key)
            .ok_or(VerityError::HashBlock { level, index })
    }

    /// Absolute hash block number (from the tree start) of `index` in `level`.
    fn cache_key(&self, level: usize, index: u64) -> Result<u64, VerityError> {
        let start = self.geometry.level_start.get(level);
        let blocks = self.geometry.level_blocks.get(level);
        match (start, blocks) {
            (Some(&s), Some(&n)) if index < n => Ok(s + index),
            _ => Err(VerityError::HashBlock { level, index }),
        }
    }

    fn read_hash_block(&self, key: u64) -> Result<Box<[u8]>, VerityError> {
        let hbs = u64::from(self.geometry.hash_block_size);
        let mut block = vec![0u8; usize::try_from(hbs).unwrap_or(0)].into_boxed_slice();
        let at = key
            .checked_mul(hbs)
            .and_then(|o| o.checked_add(self.tree_offset))
            .ok_or_else(|| VerityError::Params("hash block offset overflows".to_owned()))?;
        self.tree
            .read_exact_at(&mut block, at)
            .map_err(io("read tree block"))?;
        Ok(block)
    }
}

fn fanout_mask(bits: u32) -> u64 {
    (1u64 << bits) - 1
}

fn digest_at(block: &[u8], slot: u64) -> Option<[u8; DIGEST_SIZE]> {
    let at = usize::try_from(slot).ok()?.checked_mul(DIGEST_SIZE)?;
    block.get(at..at + DIGEST_SIZE)?.try_into().ok()
}
