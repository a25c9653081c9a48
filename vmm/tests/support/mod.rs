//! What the `mvm-vmm` binary tests share: the binary, a tiny kernel, /dev/kvm.
//!
//! Each test crate uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A `Command` for the `mvm-vmm` binary under test.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
}

/// Fails (rather than skips) without /dev/kvm.
pub fn require_kvm() {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
}

/// Whether the tests run as root (namespaces, uid change and cgroups need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Writes `dir/vmlinux`: a valid ELF header with one PT_LOAD at 16 MiB whose first byte
/// is `hlt` (enough for every thread and filter to come up, even on a software KVM).
pub fn tiny_vmlinux(dir: &Path) -> PathBuf {
    payload_vmlinux(dir, &[0xf4])
}

/// Writes `dir/vmlinux`: an ELF whose one PT_LOAD puts `code` at 16 MiB, its entry (the
/// VMM enters it in 64-bit mode with the boot page tables).
pub fn payload_vmlinux(dir: &Path, code: &[u8]) -> PathBuf {
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
    f[96..104].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[104..112].copy_from_slice(&0x20_0000u64.to_le_bytes());
    f.extend_from_slice(code);
    let p = dir.join("vmlinux");
    std::fs::write(&p, f).unwrap();
    p
}

/// Sends `signal` to `pid` after `grace`, from a thread (the caller waits for the child).
pub fn signal_after(pid: u32, signal: i32, grace: Duration) -> std::thread::JoinHandle<()> {
    let pid = i32::try_from(pid).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        // SAFETY: signalling a pid the test spawned; if it already exited and was reaped
        // the kill fails harmlessly (the test process does not spawn others meanwhile).
        unsafe { libc::kill(pid, signal) };
    })
}

/// A plan for `kernel` (no initramfs) with `cmdline`, 1 vCPU, 64 MiB, no devices, valid
/// from a minute ago for ten minutes, with `nonce`.
pub fn test_plan(kernel: &Path, cmdline: &str, nonce: &str) -> mvm_loader::plan::Plan {
    use mvm_loader::measure::Sha256Digest;
    use mvm_loader::plan::{
        Artifacts, Devices, GuestPolicy, Plan, Resources, Tier, UtcTime, SCHEMA_VERSION,
    };
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
            cmdline: Sha256Digest::of(cmdline.as_bytes()),
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
        substitution: None,
        required_tier: Tier::Hardware,
    }
}
