//! The index of a snapshot's memory file, shared by `mvm-vmm` (which writes and checks
//! it) and `mvm` (which checks a fork's shared file once, `runtime/src/backend/snapshot_seal.rs`):
//! which [`CHUNK`]s hold data and each one's SHA-256, every other chunk zeros. The
//! manifest names the memory by the index's digest.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::measure::Sha256Digest;

/// How much is copied, hashed and written at a time: one entry of the index.
pub const CHUNK: usize = 1 << 20;

/// Which chunks of a memory file hold data, and each one's SHA-256; every other chunk is
/// zeros. Kept in the state file, which the seal covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryIndex {
    /// [`CHUNK`], as the file was written.
    pub chunk_bytes: u64,
    /// The chunks that are not all zeros, by index, ascending.
    pub data: Vec<(u64, Sha256Digest)>,
}

impl MemoryIndex {
    /// The index's own digest: SHA-256 over each entry's index (little-endian u64) and
    /// chunk digest, in order, after the chunk size. The manifest names the memory by it.
    pub fn digest(&self) -> Sha256Digest {
        let mut h = Sha256::new();
        h.update(self.chunk_bytes.to_le_bytes());
        for (index, digest) in &self.data {
            h.update(index.to_le_bytes());
            h.update(digest.as_bytes());
        }
        Sha256Digest(h.finalize().into())
    }
}

/// The index of the `len` bytes `reader` gives, as `mvm-vmm` writes one: a chunk of
/// zeros is not in it, every other chunk is, with its SHA-256. The same content always
/// gives the same index, so its [`MemoryIndex::digest`] checks a whole file.
pub fn index_of(reader: &mut impl Read, len: u64) -> std::io::Result<MemoryIndex> {
    let mut index = MemoryIndex {
        chunk_bytes: CHUNK as u64,
        data: Vec::new(),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    let mut chunk = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        let bytes = buf
            .get_mut(..n)
            .ok_or_else(|| std::io::Error::other("chunk larger than its buffer"))?;
        reader.read_exact(bytes)?;
        if bytes.iter().any(|&b| b != 0) {
            index.data.push((chunk, Sha256Digest::of(bytes)));
        }
        at += n as u64;
        chunk += 1;
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_index_names_its_data_chunks_and_changes_with_one_byte() {
        let mut file = vec![0u8; 2 * CHUNK + 100];
        file[CHUNK + 5] = 1;
        file[2 * CHUNK + 99] = 2;
        let index = index_of(&mut &file[..], file.len() as u64).unwrap();
        let chunks: Vec<u64> = index.data.iter().map(|(i, _)| *i).collect();
        assert_eq!(chunks, [1, 2]);
        assert_eq!(index.data[1].1, Sha256Digest::of(&file[2 * CHUNK..]));
        file[7] = 3;
        let other = index_of(&mut &file[..], file.len() as u64).unwrap();
        assert_ne!(other.digest(), index.digest());
        assert!(index_of(&mut &file[..10], file.len() as u64).is_err());
    }
}
