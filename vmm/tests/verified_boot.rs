//! Verified-boot refusals through the real binary, without KVM: every refusal happens
//! before a VM exists, so these run on any host. (The same matrix with a real guest is
//! `scripts/e2e verify`.) The boot report's phase order is checked on a real boot of
//! the tiny kernel, with a plan and with `--dev`, on this machine's /dev/kvm.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{require_kvm, tiny_vmlinux, vmm};

use ed25519_dalek::SigningKey;
use mvm_loader::dsse::format_public_key;
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::sign_plan;
use mvm_loader::plan::{Plan, UtcTime};

const CMDLINE: &str = "console=ttyS0 quiet";

fn plan_for(kernel: &Path, nonce: &str) -> Plan {
    support::test_plan(kernel, CMDLINE, nonce)
}

struct Run {
    out: Output,
    report: serde_json::Value,
    events: Vec<serde_json::Value>,
}

fn run(dir: &Path, envelope: &Path, kernel: &Path, cmdline: &str) -> Run {
    run_with(dir, envelope, kernel, cmdline, &[])
}

/// The `mvm-vmm` command of [`run`]: a plan trusted by key 1, events and a boot report in `dir`.
fn signed_command(dir: &Path, envelope: &Path, kernel: &Path, cmdline: &str) -> Command {
    let key = SigningKey::from_bytes(&[1; 32]);
    let trust = dir.join("admission.pub");
    std::fs::write(&trust, format_public_key(&key.verifying_key())).unwrap();
    let mut cmd = vmm();
    cmd.arg("--plan")
        .arg(envelope)
        .arg("--trust")
        .arg(&trust)
        .arg("--replay-store")
        .arg(dir.join("replay"))
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--kernel")
        .arg(kernel)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--boot-report")
        .arg(dir.join("report.json"));
    cmd
}

/// [`run`] with `extra` arguments.
fn run_with(dir: &Path, envelope: &Path, kernel: &Path, cmdline: &str, extra: &[&str]) -> Run {
    let report = dir.join("report.json");
    let events = dir.join("events.jsonl");
    let _ = std::fs::remove_file(&events);
    let out = signed_command(dir, envelope, kernel, cmdline)
        .args(extra)
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

/// An explicit `--mem-mib` or `--vcpus` that disagrees with the signed plan is a plan
/// refusal naming both values, audited; one that agrees boots (up to the VM: the
/// refusal tests stop before it, so agreement is checked by reaching `vm_created`
/// in `phases_are_in_order_for_signed_and_dev_boots`).
#[test]
fn an_explicit_value_that_disagrees_with_the_plan_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = tiny_vmlinux(d);
    for (nonce, flag, value, want) in [
        (
            "c1",
            "--mem-mib",
            "128",
            "--mem-mib 128 disagrees with the signed plan's memory_mib 64",
        ),
        (
            "c2",
            "--vcpus",
            "2",
            "--vcpus 2 disagrees with the signed plan's vcpus 1",
        ),
    ] {
        let env = write_signed(d, plan_for(&k, &nonce.repeat(16)), 1);
        let r = run_with(d, &env, &k, CMDLINE, &[flag, value]);
        assert_refused(&r, 19, "plan_mismatch");
        let stderr = String::from_utf8_lossy(&r.out.stderr);
        assert!(stderr.contains(want), "{stderr}");
        assert_eq!(r.events[0]["plan_id"], "vmm-test");
        assert_eq!(r.events[0]["fields"]["detail"], want);
        assert!(r.report["plan_verified"].is_u64());
        assert!(r.report["artifacts_measured"].is_null());
    }
}

/// Starts `cmd` (the tiny kernel, `--no-jail`), stops it with SIGTERM once its vCPU
/// exists, and returns the boot report.
fn boot_then_stop(mut cmd: Command, dir: &Path) -> serde_json::Value {
    require_kvm();
    let child = cmd
        .arg("--no-jail")
        .env_remove("MVM_SECCOMP")
        .env_remove("MVM_ALLOW_MEM_OVERCOMMIT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let has_vcpu = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .any(|p| p.display().to_string() == "anon_inode:kvm-vcpu:0")
            })
            .unwrap_or(false)
    };
    while !has_vcpu() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let vCPU 0 enter KVM_RUN (the signal thread is up before any vCPU exists).
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling the child this test spawned and has not reaped.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// The phases that happened, in the report's field order, are non-decreasing.
fn assert_phases_in_order(report: &serde_json::Value, want_plan_phases: bool) {
    let phases = [
        "args_parsed",
        "plan_verified",
        "artifacts_measured",
        "kernel_loaded",
        "vm_created",
        "first_kvm_run",
        "exit",
    ];
    for always in ["args_parsed", "kernel_loaded", "vm_created", "exit"] {
        assert!(report[always].is_u64(), "{always} missing: {report}");
    }
    for plan_phase in ["plan_verified", "artifacts_measured"] {
        assert_eq!(report[plan_phase].is_u64(), want_plan_phases, "{report}");
    }
    let happened: Vec<(&str, u64)> = phases
        .iter()
        .filter_map(|p| report[*p].as_u64().map(|t| (*p, t)))
        .collect();
    for pair in happened.windows(2) {
        let ((a, ta), (b, tb)) = (pair[0], pair[1]);
        assert!(ta <= tb, "{a} ({ta} us) after {b} ({tb} us): {report}");
    }
}

#[test]
fn phases_are_in_order_for_signed_and_dev_boots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = tiny_vmlinux(d);

    // Signed, with the plan's memory given explicitly (it agrees) and vCPUs left out.
    let env = write_signed(d, plan_for(&k, &"d1".repeat(16)), 1);
    let mut cmd = signed_command(d, &env, &k, CMDLINE);
    cmd.args(["--mem-mib", "64"]);
    let report = boot_then_stop(cmd, d);
    assert_eq!(report["exit_reason"], "host_signal", "{report}");
    assert_phases_in_order(&report, true);

    // --dev.
    let mut cmd = vmm();
    cmd.arg("--dev")
        .arg("--kernel")
        .arg(&k)
        .arg("--cmdline")
        .arg(CMDLINE)
        .arg("--boot-report")
        .arg(d.join("report.json"));
    let report = boot_then_stop(cmd, d);
    assert_phases_in_order(&report, false);
}
