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

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A valid ELF header with one PT_LOAD at 16 MiB whose first byte is `hlt`.
fn tiny_vmlinux(dir: &Path) -> PathBuf {
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
    p
}

/// Boots the tiny kernel with a disk and a vsock device, `env` set; SIGTERM after
/// `grace` if it is still running.
fn run_vmm(dir: &Path, env: &[(&str, &str)], grace: Duration) -> Output {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    let kernel = tiny_vmlinux(dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"));
    cmd.arg("--dev")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("path={},ro", disk.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--boot-report")
        .arg(dir.join("report.json"))
        .env_remove("MVM_SECCOMP")
        .env_remove("MVM_TEST_SECCOMP_VIOLATE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(grace);
        // SAFETY: signalling a pid we spawned; if it already exited and was reaped the
        // kill fails harmlessly (the test process does not spawn others meanwhile).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    });
    let out = child.wait_with_output().unwrap();
    drop(killer);
    out
}

#[test]
fn print_seccomp_lists_every_role_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
        .arg("--print-seccomp")
        .output()
        .unwrap();
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
