//! The per-thread seccomp filters, through the `mvm-vmm` binary on this machine's /dev/kvm.
//!
//! `mvm-vmm --dev` creates every thread (signals, vcpu0, console-in, one per device, main)
//! and installs their filters before the guest gets far, even on a software KVM that never
//! gets a Linux guest to userspace; a tiny ELF whose entry is `hlt` is enough.
//!
//! The violation tests need the `test-hooks` feature:
//! `cargo test -p mvm-vmm --features test-hooks --test seccomp`. They fail, rather than
//! skip, when /dev/kvm is missing.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use support::{require_kvm, signal_after, tiny_vmlinux, vmm};

/// Boots the tiny kernel with a disk and a vsock device, `env` set; SIGTERM after
/// `grace` if it is still running.
fn run_vmm(dir: &Path, env: &[(&str, &str)], grace: Duration) -> Output {
    run_vmm_with(dir, &[], env, grace)
}

/// [`run_vmm`] with `extra` arguments (another device).
fn run_vmm_with(dir: &Path, extra: &[&str], env: &[(&str, &str)], grace: Duration) -> Output {
    require_kvm();
    let kernel = tiny_vmlinux(dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = vmm();
    cmd.arg("--dev")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("path={},ro", disk.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--boot-report")
        .arg(dir.join("report.json"))
        .args(extra)
        .env_remove("MVM_SECCOMP")
        .env_remove("MVM_TEST_SECCOMP_VIOLATE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let killer = signal_after(child.id(), libc::SIGTERM, grace);
    let out = child.wait_with_output().unwrap();
    drop(killer);
    out
}

#[test]
fn print_seccomp_lists_every_role_by_name() {
    let out = vmm().arg("--print-seccomp").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for role in [
        "main:",
        "signals:",
        "vcpu:",
        "console-input:",
        "blk:",
        "vsock:",
        "net:",
    ] {
        assert!(text.contains(role), "{role} missing in:\n{text}");
    }
    assert!(text.contains("KVM_RUN") && text.contains("epoll_wait"));
}

#[test]
fn with_filters_on_a_vm_runs_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_vmm(dir.path(), &[], Duration::from_secs(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 128 + SIGTERM: the signal thread turned SIGTERM into a VM exit; no filter tripped.
    assert_eq!(out.status.code(), Some(143), "stderr: {stderr}");
    assert!(!stderr.contains("seccomp"), "stderr: {stderr}");
    // The main thread wrote the report and removed the socket under its filter.
    let report = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    assert!(report.contains("host_signal"), "{report}");
    assert!(!dir.path().join("v.sock").exists());
}

#[cfg(feature = "test-hooks")]
#[test]
fn each_role_dies_on_a_syscall_outside_its_filter_and_the_report_names_the_thread() {
    for (role, thread) in [
        ("main", "main"),
        ("signals", "signals"),
        ("vcpu", "vcpu0"),
        ("console-input", "console-in"),
        ("blk", "virtio-blk0"),
        ("vsock", "virtio-vsock"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = run_vmm(
            dir.path(),
            &[("MVM_TEST_SECCOMP_VIOLATE", role)],
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(mvm_seccomp::STATUS_SECCOMP_VIOLATION),
            "{role}: {stderr}"
        );
        let want = format!("seccomp: thread {thread} made syscall 95 (umask) outside its filter");
        assert!(stderr.contains(&want), "{role}: {stderr}");
    }
}

/// The net thread needs a tap: root and /dev/net/tun (the VMM creates a throwaway tap
/// that goes away with its fd). Elsewhere the test says why it did nothing.
#[cfg(feature = "test-hooks")]
#[test]
fn the_net_thread_dies_on_a_syscall_outside_its_filter_and_the_report_names_it() {
    // A missing prerequisite is a failure, never a quiet pass (scripts/test runs as root).
    assert!(
        support::is_root(),
        "the net role's violation test needs root (a tap device)"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the net role's violation test needs /dev/net/tun"
    );
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("mvmsc{}", std::process::id());
    let net = format!("tap={tap},mac=02:00:00:00:5e:01");
    let out = run_vmm_with(
        dir.path(),
        &["--net", &net],
        &[("MVM_TEST_SECCOMP_VIOLATE", "net")],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(mvm_seccomp::STATUS_SECCOMP_VIOLATION),
        "{stderr}"
    );
    assert!(
        stderr.contains("seccomp: thread virtio-net made syscall 95 (umask) outside its filter"),
        "{stderr}"
    );
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "the throwaway tap {tap} outlived the VMM"
    );
}

#[cfg(feature = "test-hooks")]
#[test]
fn with_filters_off_the_hook_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_vmm(
        dir.path(),
        &[("MVM_SECCOMP", "off"), ("MVM_TEST_SECCOMP_VIOLATE", "vcpu")],
        Duration::from_secs(2),
    );
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
