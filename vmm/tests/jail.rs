//! The jail, on a running `mvm-vmm --jail` on this machine's /dev/kvm (a tiny ELF whose entry
//! is `hlt`): what `/proc/PID` says about the jailed process. Run as root (the namespaces and
//! the uid change need it); fails, rather than skips, when /dev/kvm is missing.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} missing in {status}"))
}

#[test]
fn a_jailed_vmm_has_no_capabilities_no_new_privs_its_own_root_and_only_its_fds() {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    // The jail uid writes the boot report here (by path, at exit): it must get through.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let kernel = tiny_vmlinux(dir.path());
    let child = Command::new(env!("CARGO_BIN_EXE_mvm-vmm"))
        .arg("--dev")
        .arg("--jail")
        .arg("--jail-dir")
        .arg(dir.path().join("jails"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.path().join("v.sock").display()))
        .arg("--boot-report")
        .arg(dir.path().join("report.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let fds: Vec<String> = std::fs::read_dir(proc_dir.join("fd"))
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    let root_entries: Vec<String> = std::fs::read_dir(proc_dir.join("root"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: signalling the child we spawned and have not yet reaped.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "stderr: {stderr}");

    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    assert_eq!(status_field(&status, "Seccomp:"), "2", "{status}");
    if root {
        assert_eq!(status_field(&status, "CapEff:"), "0000000000000000");
        assert_eq!(status_field(&status, "CapPrm:"), "0000000000000000");
        assert_eq!(status_field(&status, "CapBnd:"), "0000000000000000");
        let uid = status_field(&status, "Uid:");
        assert!(uid.split_whitespace().all(|u| u == "65534"), "Uid: {uid}");
        // The per-VM root: /dev (kvm only) and the kept directory of the socket and report.
        let mut entries = root_entries.clone();
        entries.sort();
        assert_eq!(entries, ["dev", "tmp"], "root holds {root_entries:?}");
    }
    for fd in &fds {
        let expected = fd == "/dev/null"
            || fd == "/dev/kvm"
            || fd.starts_with("pipe:")
            || fd.starts_with("socket:")
            || fd.starts_with("anon_inode:");
        assert!(expected, "unexpected fd {fd} in {fds:?}");
    }
    assert!(fds.iter().any(|f| f == "anon_inode:kvm-vcpu:0"), "{fds:?}");
    let report = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    assert!(report.contains("host_signal"), "{report}");
}
