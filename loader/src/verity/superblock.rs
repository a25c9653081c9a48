//! The optional 512-byte dm-verity superblock (cryptsetup's on-disk header),
//! little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | signature `"verity\0\0"` |
//! | 8 | 4 | superblock version (1) |
//! | 12 | 4 | hash type (1) |
//! | 16 | 16 | UUID |
//! | 32 | 32 | algorithm name, NUL-padded (`"sha256"`) |
//! | 64 | 4 | data block size |
//! | 68 | 4 | hash block size |
//! | 72 | 8 | data blocks |
//! | 80 | 2 | salt size |
//! | 82 | 6 | padding |
//! | 88 | 256 | salt, zero-padded |
//! | 344 | 168 | padding |
//!
//! On disk it is padded to one hash block; the tree follows.

use super::{
    Geometry, VerityError, VerityParams, MAX_SALT_BYTES, VERITY_ALGORITHM, VERITY_HASH_TYPE,
};
use crate::bytes::{le_u16, le_u32, le_u64};
use crate::measure::Sha256Digest;

/// `"verity\0\0"`.
pub(crate) const SIGNATURE: [u8; 8] = *b"verity\0\0";
/// Size of the superblock structure.
pub(crate) const SUPERBLOCK_SIZE: usize = 512;
const SUPERBLOCK_VERSION: u32 = 1;

/// The fields mvm reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub uuid: [u8; 16],
    pub hash_type: u32,
    pub algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

impl Superblock {
    /// A superblock for a new tree. The UUID is derived from the root hash so
    /// the same image and salt always give the same tree file.
    pub fn for_params(p: &VerityParams, g: &Geometry) -> Self {
        let seed = Sha256Digest::of(&[b"mvm verity uuid ".as_slice(), &p.root_hash.0].concat());
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(seed.as_bytes().get(..16).unwrap_or(&[0; 16]));
        // RFC 4122 version 4 / variant bits, as tools expect of a UUID.
        if let Some(b) = uuid.get_mut(6) {
            *b = (*b & 0x0f) | 0x40;
        }
        if let Some(b) = uuid.get_mut(8) {
            *b = (*b & 0x3f) | 0x80;
        }
        Self {
            uuid,
            hash_type: VERITY_HASH_TYPE,
            algorithm: VERITY_ALGORITHM.to_owned(),
            data_block_size: g.data_block_size,
            hash_block_size: g.hash_block_size,
            data_blocks: g.data_blocks,
            salt: p.salt.0.clone(),
        }
    }

    /// The superblock padded to `padded_len` bytes (one hash block).
    pub fn encode(&self, padded_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; padded_len.max(SUPERBLOCK_SIZE)];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = b.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, &SIGNATURE);
        put(8, &SUPERBLOCK_VERSION.to_le_bytes());
        put(12, &self.hash_type.to_le_bytes());
        put(16, &self.uuid);
        let algorithm = self.algorithm.as_bytes();
        put(32, algorithm.get(..algorithm.len().min(32)).unwrap_or(b""));
        put(64, &self.data_block_size.to_le_bytes());
        put(68, &self.hash_block_size.to_le_bytes());
        put(72, &self.data_blocks.to_le_bytes());
        let salt = self
            .salt
            .get(..self.salt.len().min(MAX_SALT_BYTES))
            .unwrap_or(b"");
        let salt_len = u16::try_from(salt.len()).unwrap_or(0);
        put(80, &salt_len.to_le_bytes());
        put(88, salt);
        b
    }

    /// True if `bytes` start with the superblock signature.
    pub fn present(bytes: &[u8]) -> bool {
        bytes.get(..8) == Some(SIGNATURE.as_slice())
    }

    /// Parses the first 512 bytes of a tree file.
    pub fn decode(b: &[u8]) -> Result<Self, VerityError> {
        let bad = |s: &str| VerityError::Superblock(s.to_owned());
        if b.len() < SUPERBLOCK_SIZE || !Self::present(b) {
            return Err(bad("no verity signature"));
        }
        let version = le_u32(b, 8).ok_or_else(|| bad("short"))?;
        if version != SUPERBLOCK_VERSION {
            return Err(VerityError::Superblock(format!(
                "version {version} is not 1"
            )));
        }
        let algorithm_raw = b.get(32..64).ok_or_else(|| bad("short"))?;
        let algorithm_len = algorithm_raw.iter().position(|&c| c == 0).unwrap_or(32);
        let algorithm =
            String::from_utf8_lossy(algorithm_raw.get(..algorithm_len).unwrap_or(b"")).into_owned();
        let salt_len = le_u16(b, 80).ok_or_else(|| bad("short"))?;
        let salt_len = usize::from(salt_len);
        if salt_len > MAX_SALT_BYTES {
            return Err(VerityError::Superblock(format!(
                "salt size {salt_len} exceeds {MAX_SALT_BYTES}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(b.get(16..32).ok_or_else(|| bad("short"))?);
        Ok(Self {
            uuid,
            hash_type: le_u32(b, 12).ok_or_else(|| bad("short"))?,
            algorithm,
            data_block_size: le_u32(b, 64).ok_or_else(|| bad("short"))?,
            hash_block_size: le_u32(b, 68).ok_or_else(|| bad("short"))?,
            data_blocks: le_u64(b, 72).ok_or_else(|| bad("short"))?,
            salt: b
                .get(88..88 + salt_len)
                .ok_or_else(|| bad("short"))?
                .to_vec(),
        })
    }

    /// Refuses a superblock that disagrees with what the plan pins.
    pub fn check_matches(&self, p: &VerityParams, g: &Geometry) -> Result<(), VerityError> {
        let mismatch = |field: &str, sb: String, plan: String| {
            Err(VerityError::Superblock(format!(
                "{field} is {sb} in the superblock but {plan} in the plan"
            )))
        };
        if self.hash_type != VERITY_HASH_TYPE {
            return mismatch(
                "hash type",
                self.hash_type.to_string(),
                VERITY_HASH_TYPE.to_string(),
            );
        }
        if self.algorithm != VERITY_ALGORITHM {
            return mismatch(
                "algorithm",
                format!("{:?}", self.algorithm),
                VERITY_ALGORITHM.to_owned(),
            );
        }
        if self.data_block_size != p.data_block_size {
            return mismatch(
                "data block size",
                self.data_block_size.to_string(),
                p.data_block_size.to_string(),
            );
        }
        if self.hash_block_size != p.hash_block_size {
            return mismatch(
                "hash block size",
                self.hash_block_size.to_string(),
                p.hash_block_size.to_string(),
            );
        }
        if self.data_blocks != g.data_blocks {
            return mismatch(
                "data blocks",
                self.data_blocks.to_string(),
                g.data_blocks.to_string(),
            );
        }
        if self.salt != p.salt.0 {
            return mismatch("salt", hex::encode(&self.salt), p.salt.to_string());
        }
        Ok(())
    }
}
