//! dm-verity hash trees (format version 1, sha256), compatible with Linux
//! dm-verity and `veritysetup`: the tree lives in a file beside the image, with
//! or without the 512-byte verity superblock in front of it.
//!
//! Layout. Each data block is hashed as `sha256(salt || block)`; the digests
//! are packed into hash blocks (zero-padded at the end), those are hashed the
//! same way into the next level, until one hash block remains, whose hash is
//! the root. In the file the levels are stored top (nearest the root) first.
//! An image of exactly one data block has no hash blocks: its root is the hash
//! of that block.
//!
//! [`build`] makes a tree for an image; [`VerityVerifier`] checks one data
//! block on demand against the root hash the plan pins, which is what the
//! virtio-blk device calls on every read of a verified disk.

mod build;
mod superblock;
mod verifier;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use build::{build_tree, BuildOptions};
pub use verifier::{VerityVerifier, DEFAULT_CACHE_BLOCKS, READ_CHUNK_BYTES};

/// dm-verity hash format version 1 ("normal": salt before the data).
pub const VERITY_HASH_TYPE: u32 = 1;
/// Suffix of the dm-verity tree file beside a pinned disk image (`IMAGE.verity`).
pub const TREE_SUFFIX: &str = ".verity";
/// The only hash algorithm supported.
pub const VERITY_ALGORITHM: &str = "sha256";
/// Size of one sha256 digest in a hash block.
pub const DIGEST_SIZE: usize = 32;
/// The usual block size for data and hash blocks.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest and largest block sizes dm-verity accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted (the kernel's limit is the page size).
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Longest salt the superblock can hold.
pub const MAX_SALT_BYTES: usize = 256;

/// The dm-verity root hash (32 bytes); plain lowercase hex in JSON, as
/// `veritysetup` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootHash(pub [u8; DIGEST_SIZE]);

/// The salt; lowercase hex in JSON (empty string for no salt).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Salt(pub Vec<u8>);

impl fmt::Display for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn decode_lower_hex(s: &str, max: usize) -> Result<Vec<u8>, String> {
    if s.len() > max * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("expected at most {max} bytes of lowercase hex"));
    }
    hex::decode(s).map_err(|e| e.to_string())
}

impl std::str::FromStr for RootHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_lower_hex(s, DIGEST_SIZE)?;
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| "root hash must be 32 bytes of lowercase hex".to_owned())
    }
}

impl std::str::FromStr for Salt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_lower_hex(s, MAX_SALT_BYTES).map(Self)
    }
}

impl Serialize for RootHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RootHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Salt {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Salt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a plan pins about one verified disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityParams {
    /// The root of the hash tree.
    pub root_hash: RootHash,
    /// Salt prepended to every hashed block.
    pub salt: Salt,
    /// Data block size in bytes (a power of two, 512..=65536; normally 4096).
    pub data_block_size: u32,
    /// Hash block size in bytes (a power of two, 512..=65536; normally 4096).
    pub hash_block_size: u32,
    /// Size of the data (the image) in bytes: a non-zero multiple of the data
    /// block size.
    pub data_size: u64,
}

/// Errors from building or checking a dm-verity tree.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// Parameters that no valid tree has.
    #[error("verity parameters: {0}")]
    Params(String),
    /// Reading or writing a file.
    #[error("verity: {what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The tree file is shorter than the geometry requires.
    #[error("verity tree file is {len} bytes, the tree needs {needed}")]
    TreeTooShort {
        /// Its length.
        len: u64,
        /// The length required.
        needed: u64,
    },
    /// A superblock that contradicts the plan's parameters.
    #[error("verity superblock: {0}")]
    Superblock(String),
    /// A data block whose hash is not the one the tree records.
    #[error("verity: data block {block} does not match its hash (expected {expected}, computed {computed})")]
    DataBlock {
        /// Index of the data block.
        block: u64,
        /// Hex digest recorded in the tree.
        expected: String,
        /// Hex digest of the bytes read.
        computed: String,
    },
    /// A hash block (or the root) that does not match the level above.
    #[error("verity: hash block {index} of level {level} does not match the level above (tree file corrupt or replaced)")]
    HashBlock {
        /// Level (0 = the one hashing data blocks).
        level: usize,
        /// Index of the block within its level.
        index: u64,
    },
    /// A read outside the data.
    #[error(
        "verity: read of {len} bytes at offset {offset} is outside the {data_size}-byte image"
    )]
    OutOfRange {
        /// Read offset.
        offset: u64,
        /// Read length.
        len: u64,
        /// Image size.
        data_size: u64,
    },
}

impl VerityParams {
    /// Checks sizes and alignment.
    pub fn validate(&self) -> Result<(), VerityError> {
        Geometry::new(self).map(|_| ())
    }

    /// Number of data blocks.
    pub fn data_blocks(&self) -> u64 {
        self.data_size / u64::from(self.data_block_size.max(1))
    }
}

fn block_size_ok(size: u32) -> bool {
    size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size)
}

/// The shape of a tree: how many levels, and where each starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    /// log2(digests per hash block).
    pub fanout_bits: u32,
    /// Blocks in each level, level 0 (hashing data) first.
    pub level_blocks: Vec<u64>,
    /// First hash block of each level, relative to the start of the tree.
    pub level_start: Vec<u64>,
    /// Hash blocks in the whole tree.
    pub total_blocks: u64,
}

impl Geometry {
    pub fn new(p: &VerityParams) -> Result<Self, VerityError> {
        let bad = |s: String| Err(VerityError::Params(s));
        if !block_size_ok(p.data_block_size) {
            return bad(format!(
                "data block size {} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}",
                p.data_block_size
            ));
        }
        if !block_size_ok(p.hash_block_size) {
            return bad(format!(
                "hash block size {} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}",
                p.hash_block_size
            ));
        }
        if p.salt.0.len() > MAX_SALT_BYTES {
            return bad(format!(
                "salt is {} bytes; at most {MAX_SALT_BYTES}",
                p.salt.0.len()
            ));
        }
        let dbs = u64::from(p.data_block_size);
        if p.data_size == 0 || p.data_size % dbs != 0 {
            return bad(format!(
                "data size {} is not a non-zero multiple of the data block size {dbs}",
                p.data_size
            ));
        }
        let data_blocks = p.data_size / dbs;
        let fanout = p.hash_block_size / 32; // DIGEST_SIZE, a power of two
        let fanout_bits = fanout.trailing_zeros();
        // Levels: the fewest such that one top block covers every data block.
        let mut levels = 0u32;
        while fanout_bits * levels < 64
            && (data_blocks - 1)
                .checked_shr(fanout_bits * levels)
                .unwrap_or(0)
                != 0
        {
            levels += 1;
        }
        let mut level_blocks = Vec::new();
        for level in 0..levels {
            let shift = fanout_bits * (level + 1);
            let covered = 1u64.checked_shl(shift).filter(|_| shift < 64);
            let blocks = match covered {
                Some(c) => data_blocks.div_ceil(c),
                None => 1,
            };
            level_blocks.push(blocks);
        }
        // Stored top level first.
        let mut level_start = vec![0u64; level_blocks.len()];
        let mut pos = 0u64;
        for (start, blocks) in level_start.iter_mut().zip(&level_blocks).rev() {
            *start = pos;
            pos = pos
                .checked_add(*blocks)
                .ok_or_else(|| VerityError::Params("tree size overflows".to_owned()))?;
        }
        Ok(Self {
            data_block_size: p.data_block_size,
            hash_block_size: p.hash_block_size,
            data_blocks,
            fanout_bits,
            level_blocks,
            level_start,
            total_blocks: pos,
        })
    }

    pub fn levels(&self) -> usize {
        self.level_blocks.len()
    }

    /// Bytes of the tree (without superblock).
    pub fn tree_bytes(&self) -> Option<u64> {
        self.total_blocks
            .checked_mul(u64::from(self.hash_block_size))
    }
}

/// `sha256(salt || block)`.
pub(crate) fn salted_hash(salt: &[u8], block: &[u8]) -> [u8; DIGEST_SIZE] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

#[cfg(test)]
mod tests;
