use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::superblock::Superblock;
use super::*;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

struct Image {
    _dir: tempfile::TempDir,
    data: PathBuf,
    tree: PathBuf,
}

fn image(blocks: usize, block_size: usize, seed: u64) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("disk.img");
    fs::write(&data, pseudo_random(blocks * block_size, seed)).unwrap();
    let tree = dir.path().join("disk.img.verity");
    Image {
        _dir: dir,
        data,
        tree,
    }
}

fn salt() -> Salt {
    Salt(vec![0xa5, 0x5a, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06])
}

/// Runs `veritysetup format` and returns (root hash, tree bytes).
fn veritysetup_format(
    data: &Path,
    salt: &Salt,
    hash_block_size: u32,
    superblock: bool,
) -> (String, Vec<u8>) {
    let out_tree = data.with_extension("veritysetup");
    File::create(&out_tree).unwrap();
    let mut cmd = Command::new("veritysetup");
    cmd.arg("format")
        .arg(format!("--salt={salt}"))
        .arg(format!("--hash-block-size={hash_block_size}"))
        .arg("--data-block-size=4096");
    if !superblock {
        cmd.arg("--no-superblock");
    }
    let out = cmd
        .arg(data)
        .arg(&out_tree)
        .output()
        .expect("veritysetup (package cryptsetup-bin) is needed for this test");
    assert!(
        out.status.success(),
        "veritysetup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let root = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .unwrap()
        .trim()
        .to_owned();
    (root, fs::read(out_tree).unwrap())
}

#[test]
fn root_hash_and_tree_match_veritysetup_without_superblock() {
    // 1 block (no hash blocks), 3 (one level), 129 (two levels, partial
    // blocks), and with 512-byte hash blocks 300 blocks (three levels).
    for (blocks, hbs) in [(1usize, 4096u32), (3, 4096), (129, 4096), (300, 512)] {
        let img = image(blocks, 4096, blocks as u64);
        let mut opts = BuildOptions::new(salt());
        opts.hash_block_size = hbs;
        let params = build_tree(&img.data, &img.tree, &opts).unwrap();
        let (root, tree) = veritysetup_format(&img.data, &salt(), hbs, false);
        assert_eq!(
            params.root_hash.to_string(),
            root,
            "{blocks} blocks, hash block {hbs}"
        );
        assert_eq!(
            fs::read(&img.tree).unwrap(),
            tree,
            "tree bytes, {blocks} blocks"
        );
    }
}

#[test]
fn superblock_tree_matches_veritysetup_and_veritysetup_verifies_ours() {
    let img = image(200, 4096, 42);
    let mut opts = BuildOptions::new(salt());
    opts.superblock = true;
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let (root, theirs) = veritysetup_format(&img.data, &salt(), 4096, true);
    assert_eq!(params.root_hash.to_string(), root);
    let ours = fs::read(&img.tree).unwrap();
    assert_eq!(ours.len(), theirs.len());
    // Same superblock apart from the UUID (theirs is random), same tree.
    let (a, b) = (
        Superblock::decode(&ours).unwrap(),
        Superblock::decode(&theirs).unwrap(),
    );
    assert_eq!(
        Superblock { uuid: [0; 16], ..a },
        Superblock { uuid: [0; 16], ..b }
    );
    assert_eq!(ours[4096..], theirs[4096..]);
    // veritysetup checks our tree file (with our superblock) against the data.
    let out = Command::new("veritysetup")
        .arg("verify")
        .arg(&img.data)
        .arg(&img.tree)
        .arg(params.root_hash.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "veritysetup verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And our verifier reads theirs.
    fs::write(&img.tree, &theirs).unwrap();
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    let data = fs::read(&img.data).unwrap();
    for (i, block) in data.chunks(4096).enumerate() {
        v.verify_block(i as u64, block).unwrap();
    }
}

#[test]
fn every_block_verifies_and_a_changed_block_does_not() {
    for blocks in [1usize, 3, 129, 300] {
        let img = image(blocks, 4096, 7 + blocks as u64);
        let params = build_tree(&img.data, &img.tree, &BuildOptions::new(salt())).unwrap();
        let data = fs::read(&img.data).unwrap();
        let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
        for (i, block) in data.chunks(4096).enumerate() {
            v.verify_block(i as u64, block).unwrap();
        }
        let last = blocks - 1;
        let mut bad = data[last * 4096..].to_vec();
        bad[100] ^= 1;
        v.clear_cache();
        let err = v.verify_block(last as u64, &bad).unwrap_err();
        assert!(matches!(err, VerityError::DataBlock { block, .. } if block == last as u64));
    }
}

#[test]
fn read_verified_serves_unaligned_ranges_and_fails_only_on_the_bad_block() {
    let img = image(300, 4096, 99);
    let params = build_tree(&img.data, &img.tree, &BuildOptions::new(salt())).unwrap();
    let data = fs::read(&img.data).unwrap();
    // Flip one byte of block 150 on disk, after the tree was built.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.data)
        .unwrap();
    f.write_all_at(&[data[150 * 4096 + 7] ^ 0xff], 150 * 4096 + 7)
        .unwrap();
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    let mut buf = vec![0u8; 10_000];
    v.read_verified(&f, 4096 * 10 + 123, &mut buf).unwrap();
    assert_eq!(buf, data[4096 * 10 + 123..4096 * 10 + 123 + 10_000]);
    let mut one = [0u8; 512];
    let err = v.read_verified(&f, 150 * 4096 + 512, &mut one).unwrap_err();
    assert!(
        matches!(err, VerityError::DataBlock { block: 150, .. }),
        "{err}"
    );
    v.read_verified(&f, 151 * 4096, &mut one).unwrap();
    assert_eq!(one[..], data[151 * 4096..151 * 4096 + 512]);
    let err = v.read_verified(&f, 300 * 4096 - 100, &mut one).unwrap_err();
    assert!(matches!(err, VerityError::OutOfRange { .. }));
    let err = v.read_verified(&f, u64::MAX - 10, &mut one).unwrap_err();
    assert!(matches!(err, VerityError::OutOfRange { .. }));
}

#[test]
fn a_tampered_tree_is_caught_at_the_level_that_changed() {
    let img = image(300, 4096, 5);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512; // three levels
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let data = fs::read(&img.data).unwrap();
    let g = Geometry::new(&params).unwrap();
    assert_eq!(g.levels(), 3);
    // Change the level-0 hash block covering data block 0, keeping the digest
    // of block 0 itself intact (so only the tree walk can notice).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.tree)
        .unwrap();
    let at = g.level_start[0] * 512 + 511;
    f.write_all_at(&[0x55], at).unwrap();
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    let err = v.verify_block(0, &data[..4096]).unwrap_err();
    assert!(
        matches!(err, VerityError::HashBlock { level: 0, index: 0 }),
        "{err}"
    );
    // A block under a different level-0 block is unaffected.
    v.verify_block(299, &data[299 * 4096..]).unwrap();
}

#[test]
fn wrong_root_hash_fails_every_block() {
    let img = image(3, 4096, 11);
    let mut params = build_tree(&img.data, &img.tree, &BuildOptions::new(salt())).unwrap();
    params.root_hash.0[0] ^= 1;
    let data = fs::read(&img.data).unwrap();
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    assert!(matches!(
        v.verify_block(1, &data[4096..8192]),
        Err(VerityError::HashBlock { level: 0, .. })
    ));
}

#[test]
fn a_tiny_cache_still_verifies_correctly() {
    let img = image(300, 4096, 13);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512;
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let data = fs::read(&img.data).unwrap();
    let mut v = VerityVerifier::from_file(File::open(&img.tree).unwrap(), &params, 1).unwrap();
    for i in [0usize, 299, 17, 150, 0, 298] {
        v.verify_block(i as u64, &data[i * 4096..(i + 1) * 4096])
            .unwrap();
    }
}

#[test]
fn bad_params_and_short_trees_are_refused() {
    let img = image(129, 4096, 3);
    let params = build_tree(&img.data, &img.tree, &BuildOptions::new(salt())).unwrap();
    let tree = fs::read(&img.tree).unwrap();
    fs::write(&img.tree, &tree[..tree.len() - 1]).unwrap();
    assert!(matches!(
        VerityVerifier::open(&img.tree, &params),
        Err(VerityError::TreeTooShort { .. })
    ));
    for edit in [
        |p: &mut VerityParams| p.data_block_size = 3000,
        |p: &mut VerityParams| p.hash_block_size = 256,
        |p: &mut VerityParams| p.data_size = 4097,
        |p: &mut VerityParams| p.data_size = 0,
        |p: &mut VerityParams| p.salt = Salt(vec![0; 257]),
    ] {
        let mut p = params.clone();
        edit(&mut p);
        assert!(matches!(p.validate(), Err(VerityError::Params(_))), "{p:?}");
    }
    // An image whose size is not a whole number of blocks cannot be built.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    fs::write(&odd, vec![0u8; 5000]).unwrap();
    assert!(build_tree(&odd, &dir.path().join("t"), &BuildOptions::new(salt())).is_err());
}

#[test]
fn superblock_that_contradicts_the_plan_is_refused() {
    let img = image(10, 4096, 21);
    let mut opts = BuildOptions::new(salt());
    opts.superblock = true;
    let mut params = build_tree(&img.data, &img.tree, &opts).unwrap();
    params.salt = Salt(vec![1, 2, 3]);
    let err = VerityVerifier::open(&img.tree, &params).unwrap_err();
    assert!(
        matches!(err, VerityError::Superblock(ref m) if m.contains("salt")),
        "{err}"
    );
}

#[test]
fn trees_are_reproducible() {
    let img = image(50, 4096, 8);
    let mut opts = BuildOptions::new(salt());
    opts.superblock = true;
    let a = build_tree(&img.data, &img.tree, &opts).unwrap();
    let first = fs::read(&img.tree).unwrap();
    let b = build_tree(&img.data, &img.tree, &opts).unwrap();
    assert_eq!(a, b);
    assert_eq!(first, fs::read(&img.tree).unwrap());
}

#[test]
fn params_serialise_as_veritysetup_prints_them() {
    let p = VerityParams {
        root_hash: RootHash([0xab; 32]),
        salt: Salt(vec![1, 2]),
        data_block_size: 4096,
        hash_block_size: 4096,
        data_size: 8192,
    };
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["root_hash"], "ab".repeat(32));
    assert_eq!(json["salt"], "0102");
    let back: VerityParams = serde_json::from_value(json).unwrap();
    assert_eq!(back, p);
    assert!("AB".repeat(32).parse::<RootHash>().is_err());
    assert!("ab".parse::<RootHash>().is_err());
}

/// Writes `byte ^ 0xff` over the byte at `at` of `path`.
fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}

#[test]
fn a_flipped_data_byte_fails_even_with_its_neighbours_and_hash_block_cached() {
    let img = image(300, 4096, 31);
    let params = build_tree(&img.data, &img.tree, &BuildOptions::new(salt())).unwrap();
    let f = File::open(&img.data).unwrap();
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    // Every block verifies once, block 100 included: its hash block and its
    // neighbours are now all cached.
    let mut all = vec![0u8; 300 * 4096];
    v.read_verified(&f, 0, &mut all).unwrap();
    assert!(v.cached_blocks() > 0);
    // The host changes block 100 after it verified: every read still sees it.
    flip(&img.data, 100 * 4096 + 17);
    for _ in 0..2 {
        let mut one = vec![0u8; 4096];
        let err = v.read_verified(&f, 100 * 4096, &mut one).unwrap_err();
        assert!(
            matches!(err, VerityError::DataBlock { block: 100, .. }),
            "{err}"
        );
        // A run through it fails too, and its neighbours still read.
        let mut run = vec![0u8; 8 * 4096];
        assert!(v.read_verified(&f, 96 * 4096, &mut run).is_err());
        v.read_verified(&f, 99 * 4096, &mut one).unwrap();
        v.read_verified(&f, 101 * 4096, &mut one).unwrap();
    }
}

#[test]
fn at_most_once_skips_verified_blocks_and_says_so() {
    // The documented trade-off of the (default-off) option, pinned by a test:
    // a block that verified before the host changed it is served unverified;
    // one that had not verified yet still fails; eviction brings the check back.
    let img = image(300, 4096, 37);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512; // 16 data blocks per level-0 hash block
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let f = File::open(&img.data).unwrap();
    let mut v = VerityVerifier::from_file(File::open(&img.tree).unwrap(), &params, 64).unwrap();
    v.set_check_at_most_once(true);
    let mut one = vec![0u8; 4096];
    v.read_verified(&f, 40 * 4096, &mut one).unwrap();
    flip(&img.data, 40 * 4096 + 3);
    flip(&img.data, 41 * 4096 + 3);
    // Block 40 verified before the write: served without a check.
    v.read_verified(&f, 40 * 4096, &mut one).unwrap();
    // Block 41 shares the hash block but never verified: refused.
    assert!(matches!(
        v.read_verified(&f, 41 * 4096, &mut one),
        Err(VerityError::DataBlock { block: 41, .. })
    ));
    // Dropping the cache drops the marks.
    v.clear_cache();
    assert!(matches!(
        v.read_verified(&f, 40 * 4096, &mut one),
        Err(VerityError::DataBlock { block: 40, .. })
    ));
    // Off (the default), nothing is skipped.
    let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
    assert!(v.read_verified(&f, 40 * 4096, &mut one).is_err());
}

#[test]
fn at_most_once_ends_for_good_when_its_flag_is_set() {
    // The VMM's mode: marks are trusted only until the lease-break flag is set;
    // from then on a block changed after it verified is caught again.
    let img = image(300, 4096, 43);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512;
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let f = File::open(&img.data).unwrap();
    let flag: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let mut v = VerityVerifier::from_file(File::open(&img.tree).unwrap(), &params, 64).unwrap();
    v.check_at_most_once_until(flag);
    let mut one = vec![0u8; 4096];
    v.read_verified(&f, 7 * 4096, &mut one).unwrap();
    flip(&img.data, 7 * 4096 + 100);
    // While the flag is clear, the mark stands (what the lease makes safe).
    v.read_verified(&f, 7 * 4096, &mut one).unwrap();
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        v.read_verified(&f, 7 * 4096, &mut one),
        Err(VerityError::DataBlock { block: 7, .. })
    ));
    // Blocks that did not change still read, hashed each time.
    v.read_verified(&f, 8 * 4096, &mut one).unwrap();
    v.read_verified(&f, 8 * 4096, &mut one).unwrap();
}

#[test]
fn a_flipped_tree_byte_is_detected() {
    let img = image(300, 4096, 41);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512;
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let geometry = Geometry::new(&params).unwrap();
    let f = File::open(&img.data).unwrap();
    // Level 0's block 3 (data blocks 48..64) and the top block.
    let level0 = (geometry.level_start[0] + 3) * 512 + 40;
    let top = 5;
    for (at, at_most_once) in [(level0, false), (level0, true), (top, false)] {
        let _ = build_tree(&img.data, &img.tree, &opts).unwrap();
        flip(&img.tree, at);
        let mut v = VerityVerifier::open(&img.tree, &params).unwrap();
        v.set_check_at_most_once(at_most_once);
        let mut one = vec![0u8; 4096];
        let err = v.read_verified(&f, 50 * 4096, &mut one).unwrap_err();
        assert!(matches!(err, VerityError::HashBlock { .. }), "{err}");
        // Nothing under a bad hash block ever reads, on any later try.
        assert!(v.read_verified(&f, 50 * 4096, &mut one).is_err());
    }
}

#[test]
fn the_cache_stays_within_its_bound_when_the_guest_reads_everywhere() {
    let img = image(1000, 4096, 43);
    let mut opts = BuildOptions::new(salt());
    opts.hash_block_size = 512; // 63 + 4 + 1 hash blocks
    let params = build_tree(&img.data, &img.tree, &opts).unwrap();
    let data = fs::read(&img.data).unwrap();
    let f = File::open(&img.data).unwrap();
    for at_most_once in [false, true] {
        let mut v = VerityVerifier::from_file(File::open(&img.tree).unwrap(), &params, 5).unwrap();
        v.set_check_at_most_once(at_most_once);
        let mut x = 7u64;
        for round in 0..3000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let block = if round < 1000 {
                round
            } else {
                (x >> 33) % 1000
            };
            let mut one = vec![0u8; 4096];
            v.read_verified(&f, block * 4096, &mut one).unwrap();
            let at = usize::try_from(block).unwrap() * 4096;
            assert_eq!(one, data[at..at + 4096]);
            assert!(v.cached_blocks() <= 5, "{} cached", v.cached_blocks());
        }
        // One read bigger than a chunk: read and hashed in bounded runs.
        let mut all = vec![0u8; 1000 * 4096];
        v.read_verified(&f, 0, &mut all).unwrap();
        assert_eq!(all, data);
        assert!(v.cached_blocks() <= 5);
    }
}
