//! Verified-boot refusals through the real binary, without KVM: every refusal happens
//! before a VM exists, so these run on any host. (The same matrix with a real guest is
//! `scripts/e2e verify`.)

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{tiny_vmlinux, vmm};

use ed25519_dalek::SigningKey;
use mvm_loader::dsse::format_public_key;
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::sign_plan;
use mvm_loader::plan::{
    Artifacts, Devices, GuestPolicy, Plan, Resources, Tier, UtcTime, SCHEMA_VERSION,
};

const CMDLINE: &str = "console=ttyS0 quiet";

fn plan_for(kernel: &Path, nonce: &str) -> Plan {
    let now = UtcTime::now();
    Plan {
        schema_version: SCHEMA_VERSION,
        plan_id: "vmm-test".into(),
        not_before: now.saturating_sub(Duration::from_secs(60)),
        not_after: now.saturating_add(Duration::from_secs(600)),
        nonce: nonce.into(),
        artifacts: Artifacts {
            kernel: Sha256Digest::of(&std::fs::read(kernel).unwrap()),
            initramfs: None,
            cmdline: Sha256Digest::of(CMDLINE.as_bytes()),
            disks: Vec::new(),
        },
        resources: Resources {
            vcpus: 1,
            memory_mib: 64,
            timeout_secs: 60,
        },
        devices: Devices {
            vsock: None,
            scratch_disks: Vec::new(),
            net: None,
        },
        guest: GuestPolicy {
            uid: 1000,
            gid: 1000,
            max_processes: 16,
            max_open_files: 64,
            max_file_size_mib: 16,
        },
        secrets: Vec::new(),
        required_tier: Tier::Hardware,
    }
}

struct Run {
    out: Output,
    report: serde_json::Value,
    events: Vec<serde_json::Value>,
}

fn run(dir: &Path, envelope: &Path, kernel: &Path, cmdline: &str) -> Run {
    let key = SigningKey::from_bytes(&[1; 32]);
    let trust = dir.join("admission.pub");
    std::fs::write(&trust, format_public_key(&key.verifying_key())).unwrap();
    let report = dir.join("report.json");
    let events = dir.join("events.jsonl");
    let _ = std::fs::remove_file(&events);
    let out = vmm()
        .arg("--plan")
        .arg(envelope)
        .arg("--trust")
        .arg(&trust)
        .arg("--replay-store")
        .arg(dir.join("replay"))
        .arg("--events")
        .arg(&events)
        .arg("--kernel")
        .arg(kernel)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--boot-report")
        .arg(&report)
        .output()
        .unwrap();
    Run {
        out,
        report: serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap(),
        events: std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    }
}

fn assert_refused(r: &Run, status: i32, reason: &str) {
    let stderr = String::from_utf8_lossy(&r.out.stderr);
    assert_eq!(r.out.status.code(), Some(status), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("boot refused ({reason})")),
        "{stderr}"
    );
    assert!(r.out.stdout.is_empty());
    assert!(r.report["vm_created"].is_null(), "{}", r.report);
    assert!(r.report["kernel_loaded"].is_null(), "{}", r.report);
    assert_eq!(r.report["exit_reason"], reason);
    assert_eq!(r.events.len(), 1, "{:?}", r.events);
    assert_eq!(r.events[0]["event"], "boot_refused");
    assert_eq!(r.events[0]["fields"]["reason"], reason);
    assert_eq!(r.events[0]["fields"]["status"], status);
}

fn write_signed(dir: &Path, plan: Plan, seed: u8) -> PathBuf {
    let signed = sign_plan(plan, &SigningKey::from_bytes(&[seed; 32])).unwrap();
    let p = dir.join("plan.json");
    std::fs::write(&p, signed.envelope.to_json()).unwrap();
    p
}

#[test]
fn no_plan_and_no_dev_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let out = vmm().arg("--kernel").arg(&k).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a signed plan"));
}

#[test]
fn kernel_cmdline_key_window_and_replay_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = tiny_vmlinux(d);

    // An untrusted signer.
    let env = write_signed(d, plan_for(&k, &"a1".repeat(16)), 2);
    assert_refused(&run(d, &env, &k, CMDLINE), 10, "untrusted_key");

    // Expired.
    let mut p = plan_for(&k, &"a2".repeat(16));
    p.not_before = UtcTime::now().saturating_sub(Duration::from_secs(7200));
    p.not_after = UtcTime::now().saturating_sub(Duration::from_secs(3600));
    assert_refused(&run(d, &write_signed(d, p, 1), &k, CMDLINE), 15, "expired");

    // The command line differs by one character.
    let env = write_signed(d, plan_for(&k, &"a3".repeat(16)), 1);
    let r = run(d, &env, &k, "console=ttyS0 quieT");
    assert_refused(&r, 22, "cmdline_mismatch");
    assert!(String::from_utf8_lossy(&r.out.stderr).contains(&format!(
        "cmdline digest mismatch: plan {}",
        Sha256Digest::of(CMDLINE.as_bytes())
    )));

    // One kernel byte changed after signing: refused, naming both digests...
    let plan = plan_for(&k, &"a4".repeat(16));
    let want = plan.artifacts.kernel;
    let env = write_signed(d, plan, 1);
    let mut bytes = std::fs::read(&k).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // the payload, not a header field
    let bad = d.join("vmlinux.bad");
    std::fs::write(&bad, &bytes).unwrap();
    let r = run(d, &env, &bad, CMDLINE);
    assert_refused(&r, 20, "kernel_mismatch");
    let stderr = String::from_utf8_lossy(&r.out.stderr);
    assert!(
        stderr.contains(&format!(
            "kernel digest mismatch: plan {want}, measured {}",
            Sha256Digest::of(&bytes)
        )),
        "{stderr}"
    );
    assert!(r.report["plan_verified"].is_u64());
    assert!(r.report["artifacts_measured"].is_null());
    // ...and its nonce is spent: the same envelope with the right kernel is a replay.
    assert_refused(&run(d, &env, &k, CMDLINE), 17, "replay");
}

/// The cost of verification and measurement before a VM exists, with a real kernel:
/// `MVM_VERIFY_KERNEL=vmlinux [MVM_VERIFY_INITRD=cpio] cargo test -p mvm-vmm --test
/// verified_boot -- --ignored --nocapture`. The VM is stopped (SIGTERM) once created.
#[test]
#[ignore = "needs MVM_VERIFY_KERNEL and /dev/kvm; prints timings"]
fn time_verification_and_measurement() {
    let kernel = PathBuf::from(std::env::var_os("MVM_VERIFY_KERNEL").expect("MVM_VERIFY_KERNEL"));
    let initrd = std::env::var_os("MVM_VERIFY_INITRD").map(PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut plan = plan_for(&kernel, &"b5".repeat(16));
    plan.resources.memory_mib = 128;
    plan.artifacts.initramfs = initrd
        .as_ref()
        .map(|p| Sha256Digest::of(&std::fs::read(p).unwrap()));
    let env = write_signed(d, plan, 1);
    let key = SigningKey::from_bytes(&[1; 32]);
    let trust = d.join("admission.pub");
    std::fs::write(&trust, format_public_key(&key.verifying_key())).unwrap();
    let report = d.join("report.json");
    let mut cmd = vmm();
    cmd.arg("--plan")
        .arg(&env)
        .arg("--trust")
        .arg(&trust)
        .arg("--replay-store")
        .arg(d.join("replay"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--cmdline")
        .arg(CMDLINE)
        .arg("--mem-mib")
        .arg("128")
        .arg("--console-log")
        .arg(d.join("console"))
        .arg("--boot-report")
        .arg(&report);
    if let Some(i) = &initrd {
        cmd.arg("--initrd").arg(i);
    }
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    println!("status {:?}; boot report: {r}", out.status.code());
    let v = r["plan_verified"].as_u64().unwrap();
    let m = r["artifacts_measured"].as_u64().unwrap();
    println!(
        "plan_verified {v} us after start; artifacts_measured {m} us (+{} us: read, inspect, hash {} bytes)",
        m - v,
        std::fs::metadata(&kernel).unwrap().len()
            + initrd.as_ref().map_or(0, |i| std::fs::metadata(i).unwrap().len())
    );
}
