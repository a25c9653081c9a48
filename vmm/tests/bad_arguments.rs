//! `mvm-vmm` refuses bad arguments before creating a VM: non-zero exit, a
//! message naming the argument, and a boot report without `vm_created`.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::process::{Command, Output};

fn run_vmm(dir: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let report = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
        .args(extra)
        // Argument checks of the unverified mode (verified boot has its own tests).
        .arg("--dev")
        .arg("--boot-report")
        .arg(&report)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (out, json)
}

/// A valid ELF header with one PT_LOAD at 16 MiB.
fn tiny_vmlinux(dir: &Path) -> String {
    let mut f = vec![0u8; 120];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    f[64..68].copy_from_slice(&1u32.to_le_bytes());
    f[72..80].copy_from_slice(&120u64.to_le_bytes());
    f[88..96].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[96..104].copy_from_slice(&1u64.to_le_bytes());
    f[104..112].copy_from_slice(&0x20_0000u64.to_le_bytes());
    f.push(0xf4);
    let p = dir.join("vmlinux");
    std::fs::write(&p, f).unwrap();
    p.to_str().unwrap().to_string()
}

fn assert_refused(out: &Output, report: &serde_json::Value, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(report["vm_created"].is_null(), "{report}");
    assert!(report["kernel_loaded"].is_null(), "{report}");
    assert_eq!(report["exit_reason"], "invalid_arguments");
}

#[test]
fn nonexistent_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = run_vmm(dir.path(), &["--kernel", "/nonexistent/vmlinux"]);
    assert_refused(&out, &report, "--kernel /nonexistent/vmlinux");
}

#[test]
fn zero_byte_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("empty");
    std::fs::write(&k, b"").unwrap();
    let (out, report) = run_vmm(dir.path(), &["--kernel", k.to_str().unwrap()]);
    assert_refused(&out, &report, "empty (0 bytes)");
}

#[test]
fn not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("script");
    std::fs::write(&k, b"#!/bin/sh\nexit 0\n").unwrap();
    let (out, report) = run_vmm(dir.path(), &["--kernel", k.to_str().unwrap()]);
    assert_refused(&out, &report, "neither an ELF vmlinux nor a bzImage");
}

#[test]
fn zero_vcpus() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let (out, report) = run_vmm(dir.path(), &["--kernel", &k, "--vcpus", "0"]);
    assert_refused(&out, &report, "--vcpus 0");
}

#[test]
fn too_many_vcpus() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let (out, report) = run_vmm(dir.path(), &["--kernel", &k, "--vcpus", "33"]);
    assert_refused(&out, &report, "--vcpus 33");
}

#[test]
fn one_mib_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let (out, report) = run_vmm(dir.path(), &["--kernel", &k, "--mem-mib", "1"]);
    assert_refused(
        &out,
        &report,
        "--mem-mib 1: 1 MiB is too small for the kernel",
    );
}

#[test]
fn help_documents_exit_statuses() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("fatal vCPU exit"), "{help}");
}

#[test]
fn unparseable_arguments_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
        .args(["--kernel", "x", "--vcpus", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
}
