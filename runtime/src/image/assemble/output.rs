//! What the builder VM leaves on its output disk, read back as hostile: an EROFS
//! superblock must say how long the image is, the length must fit the disk, and
//! only those bytes are copied out. The host never mounts or parses the
//! filesystem further; it computes the dm-verity tree over the bytes, and the
//! guest kernel that later mounts them is behind the VM's wall and the tree.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use mvm_loader::verity::{build_tree, BuildOptions, Salt, VerityParams};
use sha2::{Digest, Sha256};

use super::AssembleError;

/// Where the EROFS superblock starts.
const SUPERBLOCK_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`, little-endian at the superblock's start.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// The only block size accepted (the guest's page size).
const BLOCK_BITS: u8 = 12;

fn bad(reason: impl Into<String>) -> AssembleError {
    AssembleError::BadOutput {
        reason: reason.into(),
    }
}

/// The length of the EROFS image at the start of `disk`, checked against the disk.
pub fn erofs_len(disk: &Path) -> Result<u64, AssembleError> {
    let mut file = std::fs::File::open(disk).map_err(|source| AssembleError::Io {
        path: disk.to_owned(),
        source,
    })?;
    let disk_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut sb = [0u8; 64];
    file.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))
        .and_then(|_| file.read_exact(&mut sb))
        .map_err(|_| bad("the output disk is too short for a filesystem"))?;
    let u32_at = |at: usize| {
        sb.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes)
    };
    if u32_at(0) != EROFS_MAGIC {
        return Err(bad(format!(
            "no EROFS filesystem on the output disk (magic {:#010x})",
            u32_at(0)
        )));
    }
    let bits = sb.get(12).copied().unwrap_or(0);
    if bits != BLOCK_BITS {
        return Err(bad(format!("block size 2^{bits}, expected 2^{BLOCK_BITS}")));
    }
    let blocks = u64::from(u32_at(36));
    let len = blocks << BLOCK_BITS;
    if blocks < 2 || len > disk_len {
        return Err(bad(format!(
            "the superblock claims {blocks} blocks ({len} bytes) on a {disk_len}-byte disk"
        )));
    }
    Ok(len)
}

/// Copies the first `len` bytes of `disk` to `dest` and builds its dm-verity tree
/// (`dest.verity`), salted from `lock_sha256` so that equal locks give equal trees.
pub fn extract(
    disk: &Path,
    len: u64,
    dest: &Path,
    lock_sha256: &str,
) -> Result<VerityParams, AssembleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AssembleError::Io { path, source }
    };
    let src = std::fs::File::open(disk).map_err(io(disk))?;
    let mut out = std::fs::File::create(dest).map_err(io(dest))?;
    let copied = std::io::copy(&mut src.take(len), &mut out).map_err(io(dest))?;
    if copied != len {
        return Err(bad(format!(
            "the output disk ended after {copied} of {len} bytes"
        )));
    }
    out.flush().map_err(io(dest))?;
    let mut salt = Sha256::new();
    salt.update(b"mvm rootfs salt ");
    salt.update(lock_sha256.as_bytes());
    let mut tree = dest.to_owned().into_os_string();
    tree.push(mvm_loader::verity::TREE_SUFFIX);
    build_tree(
        dest,
        Path::new(&tree),
        &BuildOptions::new(Salt(salt.finalize().to_vec())),
    )
    .map_err(|e| AssembleError::Tool {
        tool: "dm-verity tree",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with(sb: &[u8], len: usize) -> tempfile::NamedTempFile {
        let mut bytes = vec![0u8; len];
        bytes[1024..1024 + sb.len()].copy_from_slice(sb);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    fn superblock(blocks: u32, bits: u8) -> Vec<u8> {
        let mut sb = vec![0u8; 64];
        sb[0..4].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        sb[12] = bits;
        sb[36..40].copy_from_slice(&blocks.to_le_bytes());
        sb
    }

    #[test]
    fn a_plausible_superblock_gives_the_length() {
        let f = disk_with(&superblock(4, 12), 8 * 4096);
        assert_eq!(erofs_len(f.path()).unwrap(), 4 * 4096);
    }

    #[test]
    fn garbage_and_lies_are_refused() {
        let garbage = disk_with(b"this is not a filesystem", 8 * 4096);
        assert!(erofs_len(garbage.path())
            .unwrap_err()
            .to_string()
            .contains("no EROFS"));
        let too_long = disk_with(&superblock(100, 12), 8 * 4096);
        assert!(erofs_len(too_long.path())
            .unwrap_err()
            .to_string()
            .contains("claims"));
        let odd_block = disk_with(&superblock(4, 9), 8 * 4096);
        assert!(erofs_len(odd_block.path()).is_err());
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(erofs_len(empty.path()).is_err());
    }
}
