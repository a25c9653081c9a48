//! Per-block verification against a pinned root hash: what the virtio-blk
//! device calls on every read of a verified disk.
//!
//! Hash blocks are read from the tree file on demand and checked up the tree
//! until a block already verified (or the root) vouches for them. Verified hash
//! blocks are kept in a bounded cache, so a sequential read mostly hashes the
//! data block and nothing else. The tree file is untrusted: a block in the
//! cache is only ever one whose hash matched its parent.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::superblock::{Superblock, SUPERBLOCK_SIZE};
use super::{salted_hash, Geometry, VerityError, VerityParams, DIGEST_SIZE};

/// Hash blocks kept by default: 1024 x 4 KiB = 4 MiB, enough for the whole
/// upper tree of a 4 GiB image plus a window of level-0 blocks.
pub const DEFAULT_CACHE_BLOCKS: usize = 1024;

/// A bounded cache of verified hash blocks, evicted oldest first.
struct BlockCache {
    blocks: HashMap<u64, Box<[u8]>>,
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
        self.blocks.get(&key).map(|b| &**b)
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
        self.blocks.insert(key, block);
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
    /// Scratch buffer of one data block for [`VerityVerifier::read_verified`].
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
        let len = tree.metadata().map_err(io("stat tree file"))?.len();
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
        let scratch_len = usize::try_from(geometry.data_block_size)
            .map_err(|_| VerityError::Params("data block size".to_owned()))?;
        Ok(Self {
            params: params.clone(),
            geometry,
            tree,
            tree_offset,
            cache: BlockCache::new(cache_blocks),
            scratch: vec![0; scratch_len],
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
        let computed = salted_hash(&self.params.salt.0, data);
        let expected = if self.geometry.levels() == 0 {
            self.params.root_hash.0
        } else {
            let bits = self.geometry.fanout_bits;
            let block = self.verified_hash_block(0, index >> bits)?;
            digest_at(block, index & fanout_mask(bits))
                .ok_or_else(|| VerityError::Params("digest outside hash block".to_owned()))?
        };
        if computed != expected {
            return Err(VerityError::DataBlock {
                block: index,
                expected: hex::encode(expected),
                computed: hex::encode(computed),
            });
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
        let dbs = u64::from(self.geometry.data_block_size);
        let mut pos = offset;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            while pos < end {
                let index = pos / dbs;
                let block_start = index * dbs;
                image
                    .read_exact_at(&mut scratch, block_start)
                    .map_err(io("read image"))?;
                self.verify_block(index, &scratch)?;
                let from = usize::try_from(pos - block_start).unwrap_or(0);
                let take = usize::try_from((end - pos).min(dbs - (pos - block_start))).unwrap_or(0);
                let dst_at = usize::try_from(pos - offset).unwrap_or(0);
                let src = scratch.get(from..from + take);
                let dst = buf.get_mut(dst_at..dst_at + take);
                match (src, dst) {
                    (Some(s), Some(d)) => d.copy_from_slice(s),
                    _ => return Err(VerityError::Params("read range arithmetic".to_owned())),
                }
                pos += take as u64;
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
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
