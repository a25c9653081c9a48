//! Per-block dm-verity verification cost, against a plain unverified read of
//! the same blocks. Run: `cargo bench -p mvm-loader --bench verity`.

// Benchmark set-up is test code: a failure should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs::{self, File};
use std::hint::black_box;
use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mvm_loader::verity::{build_tree, BuildOptions, Salt, VerityVerifier};

const BLOCKS: u64 = 4096; // 16 MiB image

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let tree = dir.path().join("disk.img.verity");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..BLOCKS * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    fs::write(&image, &data).unwrap();
    let params = build_tree(&image, &tree, &BuildOptions::new(Salt(vec![7; 32]))).unwrap();
    let file = File::open(&image).unwrap();

    let mut group = c.benchmark_group("read_4k_sequential_16MiB");
    group.throughput(Throughput::Bytes(BLOCKS * 4096));
    group.sample_size(10);

    group.bench_function("unverified", |b| {
        let mut buf = vec![0u8; 4096];
        b.iter(|| {
            for i in 0..BLOCKS {
                file.read_exact_at(&mut buf, i * 4096).unwrap();
                black_box(&buf);
            }
        })
    });

    group.bench_function("verified_warm_cache", |b| {
        let mut v = VerityVerifier::open(&tree, &params).unwrap();
        let mut buf = vec![0u8; 4096];
        b.iter(|| {
            for i in 0..BLOCKS {
                v.read_verified(&file, i * 4096, &mut buf).unwrap();
                black_box(&buf);
            }
        })
    });

    group.bench_function("verified_cold_cache", |b| {
        let mut buf = vec![0u8; 4096];
        b.iter_batched(
            || VerityVerifier::open(&tree, &params).unwrap(),
            |mut v| {
                for i in 0..BLOCKS {
                    v.read_verified(&file, i * 4096, &mut buf).unwrap();
                    black_box(&buf);
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    c.bench_function("verify_block_random_4k", |b| {
        let mut v = VerityVerifier::open(&tree, &params).unwrap();
        let mut i = 0u64;
        b.iter(|| {
            i = (i * 2_654_435_761 + 12_345) % BLOCKS;
            let at = usize::try_from(i * 4096).unwrap();
            v.verify_block(i, &data[at..at + 4096]).unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
