//! `verity_tree`: the dm-verity tree reader and per-block verifier with a hostile tree
//! file, hostile image bytes and (in one mode) hostile parameters.
//!
//! The harness builds a genuine image and its tree once (with and without the verity
//! superblock), so the root hash pins the genuine data. Input byte 0 picks the mode:
//! - 0: the genuine tree with byte patches (`u16 offset, u8 xor` pairs) from the input;
//! - 1: the tree file is the rest of the input, verbatim;
//! - 2: parameters and tree from the input (block sizes, salt, sizes, root).
//!
//! Invariants: with the pinned root, a data block verifies only if it is the genuine
//! block (a hostile tree can refuse good data, never vouch for bad data); a verified
//! read returns exactly the genuine bytes; nothing panics or allocates past one block.

use std::sync::OnceLock;

use mvm_loader::verity::{build_tree, BuildOptions, RootHash, Salt, VerityParams, VerityVerifier};

use crate::input::Input;
use crate::memfd;

/// Data and hash block size of the genuine tree: small, so the tree has two levels.
pub const BLOCK: u32 = 512;
/// Data blocks in the genuine image: 40 blocks at 16 digests per hash block is two levels.
pub const DATA_BLOCKS: u64 = 40;

/// The genuine image, its parameters, and its tree without and with a superblock.
pub struct Genuine {
    /// Image bytes.
    pub image: Vec<u8>,
    /// What a plan would pin.
    pub params: VerityParams,
    /// Tree file without a superblock.
    pub tree: Vec<u8>,
    /// Tree file with the superblock in front.
    pub tree_sb: Vec<u8>,
}

/// Builds (once) the genuine image and trees, through the loader's own builder.
pub fn genuine() -> &'static Genuine {
    static CELL: OnceLock<Genuine> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvm-fuzz-verity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image: Vec<u8> = (0..DATA_BLOCKS * u64::from(BLOCK))
            .map(|i| (i % 251) as u8 ^ (i / 512) as u8)
            .collect();
        let image_path = dir.join("image");
        std::fs::write(&image_path, &image).expect("write image");
        let mut options = BuildOptions::new(Salt(b"mvm-fuzz".to_vec()));
        options.data_block_size = BLOCK;
        options.hash_block_size = BLOCK;
        let tree_path = dir.join("tree");
        let params = build_tree(&image_path, &tree_path, &options).expect("build tree");
        let tree = std::fs::read(&tree_path).expect("read tree");
        options.superblock = true;
        let params_sb = build_tree(&image_path, &tree_path, &options).expect("build tree");
        assert_eq!(params, params_sb);
        let tree_sb = std::fs::read(&tree_path).expect("read tree");
        let _ = std::fs::remove_dir_all(&dir);
        Genuine {
            image,
            params,
            tree,
            tree_sb,
        }
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let g = genuine();
    let mut input = Input::new(data);
    let mode = input.u8();
    let superblock = mode & 0x80 != 0;
    match mode & 0x7f {
        0 => {
            let mut tree = if superblock {
                g.tree_sb.clone()
            } else {
                g.tree.clone()
            };
            let patches = usize::from(input.u8() % 16);
            let mut intact = true;
            for _ in 0..patches {
                let at = usize::from(input.u16()) % tree.len();
                let xor = input.u8();
                tree[at] ^= xor;
                intact &= xor == 0;
            }
            if input.bool() {
                let cut = usize::from(input.u16());
                intact &= cut >= tree.len();
                tree.truncate(cut);
            }
            check_pinned(g, &tree, intact, &mut input);
        }
        1 => {
            let tree_len = usize::from(input.u16());
            let tree = input.take(tree_len).to_vec();
            check_pinned(g, &tree, false, &mut input);
        }
        _ => hostile_params(&mut input),
    }
}

/// The genuine root and data against `tree`.
/// `intact`: the tree is the genuine one, so genuine data must verify.
fn check_pinned(g: &Genuine, tree: &[u8], intact: bool, input: &mut Input<'_>) {
    let opened = VerityVerifier::from_file(memfd(tree), &g.params, 4);
    assert!(!intact || opened.is_ok(), "the genuine tree does not open");
    let Ok(mut verifier) = opened else {
        return;
    };
    let bs = BLOCK as usize;
    let queries = usize::from(input.u8() % 8) + 1;
    for _ in 0..queries {
        let index = u64::from(input.u8()) % (DATA_BLOCKS + 2);
        let flip = input.u16();
        let start = usize::try_from(index).unwrap_or(0) * bs;
        let mut block = g
            .image
            .get(start..start + bs)
            .map_or_else(|| vec![0u8; bs], <[u8]>::to_vec);
        let genuine = index < DATA_BLOCKS && flip == 0;
        if flip != 0 {
            block[usize::from(flip) % bs] ^= (flip >> 8) as u8 | 1;
        }
        let verdict = verifier.verify_block(index, &block);
        if genuine {
            assert!(
                !intact || verdict.is_ok(),
                "genuine block {index} refused: {verdict:?}"
            );
        } else {
            assert!(
                verdict.is_err(),
                "block {index} with a flipped byte verified"
            );
        }
        if input.bool() {
            verifier.clear_cache();
        }
    }

    // A verified read of a tampered image returns genuine bytes or fails.
    let mut image = g.image.clone();
    let at = usize::from(input.u16()) % image.len();
    let xor = input.u8();
    image[at] ^= xor;
    let offset = u64::from(input.u16()) % (g.image.len() as u64 + 1024);
    let len = usize::from(input.u16() % 4096);
    let mut buf = vec![0u8; len];
    if verifier
        .read_verified(&memfd(&image), offset, &mut buf)
        .is_ok()
    {
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        assert_eq!(
            Some(buf.as_slice()),
            g.image.get(from..from + len),
            "a verified read returned bytes that are not the genuine image"
        );
    }
}

/// Hostile parameters and tree: only "no panic, bounded work" can be asserted, plus
/// that a block which verifies hashes to what the tree (or root) says.
fn hostile_params(input: &mut Input<'_>) {
    let sizes = [0u32, 256, 512, 1024, 4096, 65536, 131_072, 4097];
    let data_block_size = sizes[usize::from(input.u8() % 8)];
    let hash_block_size = sizes[usize::from(input.u8() % 8)];
    let salt_len = usize::from(input.u16() % 300);
    let salt = Salt(input.take(salt_len).to_vec());
    let mut root = [0u8; 32];
    root.copy_from_slice(&{
        let mut r = input.take(32).to_vec();
        r.resize(32, 0);
        r
    });
    let data_size = input.u64();
    let params = VerityParams {
        root_hash: RootHash(root),
        salt,
        data_block_size,
        hash_block_size,
        data_size,
    };
    let tree_len = usize::from(input.u16());
    let tree = input.take(tree_len).to_vec();
    let Ok(mut verifier) = VerityVerifier::from_file(memfd(&tree), &params, 2) else {
        return;
    };
    let block = input.rest().to_vec();
    let index = u64::from(block.first().copied().unwrap_or(0));
    let mut data = block;
    data.resize(data_block_size as usize, 0);
    let _ = verifier.verify_block(index, &data);
}
