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
use std::time::{Duration, Instant};

use support::vmm;

/// The tiny kernel's path, as an argument.
fn tiny_vmlinux(dir: &Path) -> String {
    support::tiny_vmlinux(dir).to_str().unwrap().to_string()
}

fn run_vmm(dir: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    run_vmm_env(dir, extra, &[])
}

/// [`run_vmm`] with `env` set (and `MVM_ALLOW_MEM_OVERCOMMIT` only when `env` sets it).
fn run_vmm_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Output, serde_json::Value) {
    let report = dir.join("report.json");
    let out = vmm()
        .env_remove("MVM_ALLOW_MEM_OVERCOMMIT")
        .envs(env.iter().copied())
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

/// 1 TiB on a host that has less available: refused before the kernel is even read,
/// naming the value and what the host has, with the bad-arguments status.
#[test]
fn memory_the_host_cannot_back_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let wall = Instant::now();
    let (out, report) = run_vmm(dir.path(), &["--kernel", &k, "--mem-mib", "1048576"]);
    let wall = wall.elapsed();
    assert_refused(
        &out,
        &report,
        "--mem-mib 1048576: 1048576 MiB of memory needed, but this host has ",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let available: u64 = stderr
        .split("this host has ")
        .nth(1)
        .and_then(|rest| rest.split(" MiB available").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no available MiB in: {stderr}"));
    assert!(available < 1_048_576, "{stderr}");
    assert!(stderr.contains("MVM_ALLOW_MEM_OVERCOMMIT=1"), "{stderr}");
    // Within a second of the VMM's start by its own clock (the wall time adds the
    // process start-up of a debug build on a loaded machine, so it is bounded loosely).
    let exit_us = report["exit"].as_u64().unwrap();
    assert!(exit_us < 1_000_000, "refused {exit_us} us after start");
    assert!(wall < Duration::from_secs(10), "{wall:?}");
}

/// `MVM_ALLOW_MEM_OVERCOMMIT=1` lifts the host bound, not the hard ceiling.
#[test]
fn overcommit_stops_at_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_vmlinux(dir.path());
    let (out, report) = run_vmm_env(
        dir.path(),
        &["--kernel", &k, "--mem-mib", "1048577"],
        &[("MVM_ALLOW_MEM_OVERCOMMIT", "1")],
    );
    assert_refused(
        &out,
        &report,
        "--mem-mib 1048577: 1048577 MiB of guest memory requested: must be between 1 and 1048576 MiB",
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
