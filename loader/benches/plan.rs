//! What verified boot costs the VMM before a VM exists: plan verification
//! (envelope parse, ed25519, plan parse and validation, window) and measuring
//! a kernel-sized artifact. Run: `cargo bench -p mvm-loader --bench plan`.

// Benchmark set-up is test code: a failure should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use mvm_loader::dsse::TrustedKeys;
use mvm_loader::measure::{sha256, MeasuredArtifact};
use mvm_loader::plan::envelope::{sign_plan, verify_plan};
use mvm_loader::plan::{
    Artifacts, Devices, GuestPolicy, Plan, Resources, Tier, UtcTime, VsockDevice, CLOCK_SKEW,
    SCHEMA_VERSION,
};

fn plan() -> Plan {
    Plan {
        schema_version: SCHEMA_VERSION,
        plan_id: "plan-bench".to_owned(),
        not_before: "2026-11-29T00:00:00Z".parse().unwrap(),
        not_after: "2026-11-29T00:05:00Z".parse().unwrap(),
        nonce: "ab".repeat(32),
        artifacts: Artifacts {
            kernel: sha256(b"k"),
            initramfs: Some(sha256(b"i")),
            cmdline: sha256(b"c"),
            disks: Vec::new(),
        },
        resources: Resources {
            vcpus: 1,
            memory_mib: 256,
            timeout_secs: 600,
        },
        devices: Devices {
            vsock: Some(VsockDevice::new(3)),
            scratch_disks: Vec::new(),
            net: None,
        },
        guest: GuestPolicy {
            uid: 1000,
            gid: 1000,
            max_processes: 256,
            max_open_files: 1024,
            max_file_size_mib: 1024,
        },
        secrets: Vec::new(),
        substitution: None,
        required_tier: Tier::Emulated,
    }
}

fn bench(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut trusted = TrustedKeys::new();
    trusted.add(key.verifying_key());
    let envelope = sign_plan(plan(), &key).unwrap().envelope.to_json();
    let now: UtcTime = "2026-11-29T00:01:00Z".parse().unwrap();
    c.bench_function("verify_plan", |b| {
        b.iter(|| verify_plan(black_box(&envelope), &trusted, now, CLOCK_SKEW).unwrap())
    });

    // A 16 MiB "kernel" (the size of the tinyconfig vmlinux) read and hashed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinux");
    std::fs::write(&path, vec![0x5au8; 16 << 20]).unwrap();
    let mut group = c.benchmark_group("measure");
    group.throughput(Throughput::Bytes(16 << 20));
    group.sample_size(20);
    group.bench_function("read_and_hash_16MiB", |b| {
        b.iter(|| {
            MeasuredArtifact::read("kernel", &path, 64 << 20)
                .unwrap()
                .digest()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
