//! Building a hash tree for an image (the image builder's side).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::Path;

use super::superblock::Superblock;
use super::{salted_hash, Geometry, RootHash, Salt, VerityError, VerityParams, DEFAULT_BLOCK_SIZE};

/// How to lay out a new tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Salt (veritysetup's default is 32 random bytes; pass yours for
    /// reproducible trees).
    pub salt: Salt,
    /// Data block size, normally 4096.
    pub data_block_size: u32,
    /// Hash block size, normally 4096.
    pub hash_block_size: u32,
    /// Write the 512-byte verity superblock (padded to one hash block) before
    /// the tree, as `veritysetup format` does without `--no-superblock`.
    pub superblock: bool,
}

impl BuildOptions {
    /// 4096-byte blocks, no superblock.
    pub fn new(salt: Salt) -> Self {
        Self {
            salt,
            data_block_size: DEFAULT_BLOCK_SIZE,
            hash_block_size: DEFAULT_BLOCK_SIZE,
            superblock: false,
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> VerityError {
    move |source| VerityError::Io { what, source }
}

/// Packs digests into zero-padded hash blocks of `hash_block_size`.
fn pack_level(
    digests: &[[u8; 32]],
    hash_block_size: usize,
    blocks: u64,
) -> Result<Vec<u8>, VerityError> {
    let total = usize::try_from(blocks)
        .ok()
        .and_then(|n| n.checked_mul(hash_block_size))
        .filter(|&t| t / 32 >= digests.len())
        .ok_or_else(|| {
            VerityError::Params(format!(
                "a level of {blocks} hash blocks does not fit in memory"
            ))
        })?;
    let mut out = vec![0u8; total];
    // Digests never straddle hash blocks: 32 divides the power-of-two block size.
    for (digest, slot) in digests.iter().zip(out.chunks_exact_mut(32)) {
        slot.copy_from_slice(digest);
    }
    Ok(out)
}

/// Builds the tree of the image at `image` and writes it to `tree_out`
/// (created or truncated). Returns the parameters a plan pins.
pub fn build_tree(
    image: &Path,
    tree_out: &Path,
    options: &BuildOptions,
) -> Result<VerityParams, VerityError> {
    let file = File::open(image).map_err(io(format!("open image {}", image.display())))?;
    let data_size = file
        .metadata()
        .map_err(io(format!("stat image {}", image.display())))?
        .len();
    let mut params = VerityParams {
        root_hash: RootHash([0; 32]),
        salt: options.salt.clone(),
        data_block_size: options.data_block_size,
        hash_block_size: options.hash_block_size,
        data_size,
    };
    let geometry = Geometry::new(&params)?;
    let salt = options.salt.0.as_slice();
    let hbs = usize::try_from(geometry.hash_block_size)
        .map_err(|_| VerityError::Params("hash block size".to_owned()))?;
    let dbs = usize::try_from(geometry.data_block_size)
        .map_err(|_| VerityError::Params("data block size".to_owned()))?;

    // Level 0 from the image, streamed one data block at a time.
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut block = vec![0u8; dbs];
    let mut data_digests = Vec::new();
    for index in 0..geometry.data_blocks {
        reader
            .read_exact(&mut block)
            .map_err(io(format!("read image block {index}")))?;
        data_digests.push(salted_hash(salt, &block));
    }

    let mut levels: Vec<Vec<u8>> = Vec::with_capacity(geometry.levels());
    let root = if geometry.levels() == 0 {
        data_digests.first().copied().unwrap_or([0; 32])
    } else {
        let mut below = data_digests;
        for &blocks in &geometry.level_blocks {
            let level = pack_level(&below, hbs, blocks)?;
            below = level
                .chunks_exact(hbs)
                .map(|b| salted_hash(salt, b))
                .collect();
            levels.push(level);
        }
        below.first().copied().unwrap_or([0; 32])
    };
    params.root_hash = RootHash(root);

    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tree_out)
        .map_err(io(format!("create tree {}", tree_out.display())))?;
    if options.superblock {
        let sb = Superblock::for_params(&params, &geometry).encode(hbs);
        out.write_all(&sb)
            .map_err(io(format!("write superblock to {}", tree_out.display())))?;
    }
    for level in levels.iter().rev() {
        out.write_all(level)
            .map_err(io(format!("write tree {}", tree_out.display())))?;
    }
    out.sync_all()
        .map_err(io(format!("sync tree {}", tree_out.display())))?;
    Ok(params)
}
