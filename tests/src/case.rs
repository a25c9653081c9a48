//! What a case is, what it may use, and how it fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::vm::VmLaunch;

/// Why a case failed: one line a human can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Failure {
    /// The reason, naming the thing checked and the value seen.
    pub reason: String,
    /// Evidence to print under the FAIL line (console or stderr tail).
    pub detail: String,
}

impl Failure {
    /// A failure with a reason and no further evidence.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            detail: String::new(),
        }
    }

    /// Adds evidence printed under the FAIL line.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// The result of a case.
pub type CaseResult = Result<(), Failure>;

/// Fails with `reason()` unless `condition` holds.
pub fn check(condition: bool, reason: impl FnOnce() -> String) -> CaseResult {
    if condition {
        Ok(())
    } else {
        Err(Failure::new(reason()))
    }
}

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Beside a real KVM: inside the test host, or directly on a machine with
    /// hardware virtualization.
    Kvm,
    /// On the machine the user has, whatever it is: these cases drive `mvm`
    /// through the tier that machine gives (`emulated` on a host without
    /// hardware virtualization, `kvm` on one with it), as a user would.
    UserHost,
}

/// The time limit a case gets unless it names its own.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(300);

/// One end-to-end case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// `<area>/<what>`, e.g. `boot/elf-1cpu`; what patterns match against.
    pub name: &'static str,
    /// Whether the case needs a usable KVM. Such a case never skips: no KVM
    /// is a failure.
    pub needs_kvm: bool,
    /// Where the case runs.
    pub place: Place,
    /// How long the case may take; past it the runner kills the case's
    /// processes, reports `FAIL name (timed out after N s)` and goes on.
    pub limit: Duration,
    /// The case body.
    pub run: fn(&Context) -> CaseResult,
}

impl Case {
    /// A case that boots guests: it needs KVM and fails without one.
    pub const fn kvm(name: &'static str, run: fn(&Context) -> CaseResult) -> Self {
        Self {
            name,
            needs_kvm: true,
            place: Place::Kvm,
            limit: DEFAULT_LIMIT,
            run,
        }
    }

    /// A case that only runs host processes (no KVM needed), beside the
    /// KVM cases.
    pub const fn host(name: &'static str, run: fn(&Context) -> CaseResult) -> Self {
        Self {
            name,
            needs_kvm: false,
            place: Place::Kvm,
            limit: DEFAULT_LIMIT,
            run,
        }
    }

    /// A case that runs `mvm` on the user's machine through the tier it
    /// gives (see [`Place::UserHost`]).
    pub const fn user_host(name: &'static str, run: fn(&Context) -> CaseResult) -> Self {
        Self {
            name,
            needs_kvm: false,
            place: Place::UserHost,
            limit: DEFAULT_LIMIT,
            run,
        }
    }

    /// The same case with its own time limit.
    #[must_use]
    pub const fn limit_secs(mut self, secs: u64) -> Self {
        self.limit = Duration::from_secs(secs);
        self
    }
}

/// What a case may use: the built artifacts and a scratch directory.
#[derive(Debug, Clone)]
pub struct Context {
    /// Directory holding `mvm-vmm`, the guest kernels and initramfs images.
    pub artifacts: PathBuf,
    /// A fresh directory for this case's outputs (console logs, reports).
    pub work: PathBuf,
}

/// The guest kernel as an ELF vmlinux (PVH entry, no decompression).
pub const KERNEL_ELF: &str = "vmlinux";
/// The guest kernel as a bzImage.
pub const KERNEL_BZIMAGE: &str = "bzImage";
/// The initramfs whose `/init` is `mvm-test-init`.
pub const INITRAMFS_TEST: &str = "initramfs-test.cpio";
/// The VMM binary.
pub const VMM: &str = "mvm-vmm";
/// The HTTPS client the secret substitution cases pipe into their guests.
pub const HTTPS_GET: &str = "mvm-https-get";

/// How long a guest boot may take before a case calls it hung. Generous: under
/// the QEMU-TCG test host, with another process keeping one core busy, a quiet
/// 1-vCPU boot takes 1.4-2.5 s and a 2-vCPU one 2.5 s (2026-12-05; 12-35 s and
/// 43 s before the fixes in docs/boot-time.md), but a slower machine or a
/// regression should fail on what it shows, not on this limit.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Context {
    /// The path of artifact `name`, or a failure naming it when it is absent.
    pub fn artifact(&self, name: &str) -> Result<PathBuf, Failure> {
        let path = self.artifacts.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Failure::new(format!(
                "artifact {} missing (scripts/e2e builds it)",
                path.display()
            )))
        }
    }

    /// A VM launch through `mvm-vmm` with `kernel` and the test initramfs,
    /// 1 vCPU, 128 MiB, and a quiet command line running `mvm-test-init`
    /// in `mode`; outputs go to this case's work directory.
    pub fn test_guest(&self, kernel: &str, mode: &str) -> Result<VmLaunch, Failure> {
        Ok(
            VmLaunch::new(self.artifact(VMM)?, self.artifact(kernel)?, &self.work)
                .initrd(self.artifact(INITRAMFS_TEST)?)
                .cmdline(&test_cmdline(mode)),
        )
    }

    /// Where a case writes file `name`.
    pub fn work_file(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

/// The guest command line for `mvm-test-init` in `mode`: serial console,
/// `quiet` (each console line costs 15-20 ms under TCG), a panic reboots at
/// once, and reboot goes through the i8042 reset line.
pub fn test_cmdline(mode: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 reboot=k {}={mode}",
        crate::guest::MODE_PARAM
    )
}

/// Reads at most `limit` bytes of `path` as text (lossy), so a guest that
/// floods its console cannot make the runner allocate without bound.
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last `lines` lines of `text`, each prefixed for display under a FAIL.
pub fn tail(label: &str, text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    for line in all.get(start..).unwrap_or_default() {
        out.push_str("    ");
        out.push_str(label);
        out.push_str("| ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_passes_and_fails() {
        assert!(check(true, || "x".into()).is_ok());
        assert_eq!(check(false, || "bad".into()).unwrap_err().reason, "bad");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let t = tail("console", "a\nb\r\nc\n", 2);
        assert_eq!(t, "    console| b\n    console| c\n");
    }

    #[test]
    fn cmdline_carries_mode() {
        let c = test_cmdline("nproc");
        assert!(c.contains("mvm.test=nproc"));
        assert!(c.contains("quiet"));
        assert!(c.contains("panic=-1"));
    }

    #[test]
    fn read_bounded_stops_at_limit() {
        let dir = std::env::temp_dir().join(format!("mvm-tests-rb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big");
        std::fs::write(&f, vec![b'x'; 10_000]).unwrap();
        assert_eq!(read_bounded(&f, 100).unwrap().len(), 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
