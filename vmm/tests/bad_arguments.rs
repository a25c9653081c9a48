//! `mvm-vmm` refuses bad arguments before creating a VM: non-zero exit, a
//! message naming the argument, and a boot report without `vm_created`.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use std::path::Path;
use std::process::Output;

use support::vmm;

/// The tiny kernel's path, as an argument.
fn tiny_vmlinux(dir: &Path) -> String {
    support::tiny_vmlinux(dir).to_str().unwrap().to_string()
}

fn run_vmm(dir: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let report = dir.join("report.json");
    let out = vmm()
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
    let out = vmm().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("fatal vCPU exit"), "{help}");
}

#[test]
fn unparseable_arguments_are_usage_errors() {
    let out = vmm()
        .args(["--kernel", "x", "--vcpus", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
}
