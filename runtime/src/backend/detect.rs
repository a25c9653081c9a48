//! Which backend this host can honestly give, and why.
//!
//! The facts are gathered from the host ([`HostFacts::probe`]) and judged by a
//! pure function ([`judge`]), so the rules are tested on fake `/proc/cpuinfo`
//! text and fake module lists.

use std::path::{Path, PathBuf};

use super::locate::{find_in_path, is_executable};
use super::Tier;

/// What the host offers, as read from `/proc`, `/sys` and `/dev`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/proc/cpuinfo` has the `vmx` (Intel VT-x) flag.
    pub cpu_vmx: bool,
    /// `/proc/cpuinfo` has the `svm` (AMD-V) flag.
    pub cpu_svm: bool,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/dev/kvm` can be opened read-write by this user.
    pub dev_kvm_rw: bool,
    /// KVM-related modules present under `/sys/module` (`kvm`, `kvm_intel`,
    /// `kvm_amd`, `kvm_pvm`).
    pub kvm_modules: Vec<String>,
    /// The `qemu-system-x86_64` the emulated tier would use, if found.
    pub qemu: Option<PathBuf>,
    /// This process runs as root.
    pub root: bool,
    /// What an ordinary user lacks for the container tier's id maps (the helpers, or
    /// its subordinate ids; `backend::idmap`); `None` when nothing is.
    pub container_ids_missing: Option<String>,
    /// `/proc/sys/user/max_user_namespaces` (0: user namespaces are off).
    pub max_user_namespaces: Option<u64>,
    /// The `vfkit` the vz tier would use (looked for on macOS only).
    pub vfkit: VfkitFact,
}

/// What `vfkit` this host has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum VfkitFact {
    /// Not looked for: not a macOS host (or facts made by hand).
    #[default]
    NotLooked,
    /// Found, and a version the vz backend takes.
    Usable(PathBuf),
    /// Missing or unusable, and why.
    Unusable(String),
}

impl VfkitFact {
    /// Looks for `vfkit` and asks its version (on macOS; elsewhere [`Self::NotLooked`]).
    fn probe() -> Self {
        if cfg!(not(target_os = "macos")) {
            return Self::NotLooked;
        }
        let checked = super::vz::vfkit::locate()
            .and_then(|path| super::vz::vfkit::check_version(&path).map(|_| path));
        match checked {
            Ok(path) => Self::Usable(path),
            Err(e) => Self::Unusable(e.to_string()),
        }
    }
}

/// The cpuinfo flags of the first processor, as a word list.
fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default()
}

/// The modules KVM may be served by.
const KVM_MODULES: [&str; 4] = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"];

impl HostFacts {
    /// Reads the facts from the running host.
    pub fn probe() -> Self {
        Self::probe_at(Path::new("/"))
    }

    /// Reads the facts under `root` (for tests: a fake `/proc`, `/sys`, `/dev`).
    pub fn probe_at(root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        let flags = cpu_flags(&cpuinfo);
        let dev_kvm_path = root.join("dev/kvm");
        let dev_kvm = dev_kvm_path.exists();
        let dev_kvm_rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev_kvm_path)
            .is_ok();
        let kvm_modules = KVM_MODULES
            .iter()
            .filter(|m| root.join("sys/module").join(m).exists())
            .map(|m| (*m).to_owned())
            .collect();
        let qemu = std::env::var_os("MVM_QEMU")
            .map(PathBuf::from)
            .filter(|p| is_executable(p))
            .or_else(|| find_in_path("qemu-system-x86_64"));
        let max_user_namespaces =
            std::fs::read_to_string(root.join("proc/sys/user/max_user_namespaces"))
                .ok()
                .and_then(|v| v.trim().parse().ok());
        Self {
            root: nix::unistd::geteuid().is_root(),
            container_ids_missing: super::idmap::IdMap::for_this_process().err(),
            max_user_namespaces,
            cpu_vmx: flags.contains(&"vmx"),
            cpu_svm: flags.contains(&"svm"),
            dev_kvm,
            dev_kvm_rw,
            kvm_modules,
            qemu,
            vfkit: VfkitFact::probe(),
        }
    }

    fn has_module(&self, name: &str) -> bool {
        self.kvm_modules.iter().any(|m| m == name)
    }
}

/// Whether a tier is usable here, with the reason either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierVerdict {
    /// The tier judged.
    pub tier: Tier,
    /// Usable on this host.
    pub usable: bool,
    /// One line saying why.
    pub reason: String,
}

/// The judgement on every tier, best first, and the one chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// One verdict per tier, best tier first.
    pub verdicts: Vec<TierVerdict>,
    /// The best usable tier, if any.
    pub chosen: Option<Tier>,
}

impl Detection {
    /// The verdict for `tier`.
    pub fn verdict(&self, tier: Tier) -> Option<&TierVerdict> {
        self.verdicts.iter().find(|v| v.tier == tier)
    }
}

/// Judges the KVM tier: hardware virtualization in the CPU flags, a `/dev/kvm`
/// this user can open, and that `/dev/kvm` not served by `kvm_pvm` (a
/// software hypervisor that cannot run a standard Linux guest).
fn judge_kvm(facts: &HostFacts) -> TierVerdict {
    let (usable, reason) = if facts.has_module("kvm_pvm") {
        (
            false,
            "/dev/kvm is served by kvm_pvm (a software hypervisor that cannot run a standard Linux guest)".to_owned(),
        )
    } else if !facts.cpu_vmx && !facts.cpu_svm {
        (
            false,
            "the CPU flags in /proc/cpuinfo have neither vmx nor svm (no hardware virtualization)"
                .to_owned(),
        )
    } else if !facts.dev_kvm {
        (
            false,
            "the CPU has hardware virtualization but /dev/kvm is missing (load kvm_intel or kvm_amd)".to_owned(),
        )
    } else if !facts.dev_kvm_rw {
        (
            false,
            "/dev/kvm exists but this user cannot open it read-write (join the kvm group)"
                .to_owned(),
        )
    } else {
        let ext = if facts.cpu_vmx { "vmx" } else { "svm" };
        let module = ["kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| facts.has_module(m))
            .unwrap_or("kvm");
        (
            true,
            format!("hardware virtualization ({ext}) through /dev/kvm ({module})"),
        )
    };
    TierVerdict {
        tier: Tier::Kvm,
        usable,
        reason,
    }
}

/// Judges the emulated tier: it needs QEMU; the test host and static
/// binaries it also needs are checked when a run starts (they are built on
/// demand), so here only QEMU decides.
fn judge_emulated(facts: &HostFacts) -> TierVerdict {
    let (usable, reason) = match &facts.qemu {
        Some(qemu) => (
            true,
            format!(
                "{} (TCG, emulated AMD SVM) runs mvm-vmm inside the test host: slow, and the outer wall is QEMU's emulator",
                qemu.display()
            ),
        ),
        None => (
            false,
            "qemu-system-x86_64 not found on PATH (Debian package qemu-system-x86; or set MVM_QEMU)"
                .to_owned(),
        ),
    };
    TierVerdict {
        tier: Tier::Emulated,
        usable,
        reason,
    }
}

/// Judges the container tier: user namespaces turned on and, for an ordinary user,
/// the id-map helpers and its subordinate ids. It is never chosen on its own: only
/// `--backend container` asks for it.
fn judge_container(facts: &HostFacts) -> TierVerdict {
    let (usable, reason) = if let Some(missing) = &facts.container_ids_missing {
        (false, missing.clone())
    } else if facts.max_user_namespaces == Some(0) {
        (
            false,
            "user namespaces are turned off (sysctl user.max_user_namespaces = 0)".to_owned(),
        )
    } else {
        (
            true,
            "namespaces and a seccomp filter, sharing this host's kernel: only with --backend container, and only where the policy's minimum tier is container".to_owned(),
        )
    };
    TierVerdict {
        tier: Tier::Container,
        usable,
        reason,
    }
}

/// Judges the vz tier: macOS with a usable `vfkit`.
fn judge_vz(facts: &HostFacts) -> TierVerdict {
    let (usable, reason) = if cfg!(not(target_os = "macos")) {
        (
            false,
            "Apple's Virtualization.framework: macOS hosts only".to_owned(),
        )
    } else {
        match &facts.vfkit {
            VfkitFact::Usable(path) => (
                true,
                format!(
                    "{}: Virtualization.framework, files measured by mvm before hand-off; never run on a Mac by mvm's tests",
                    path.display()
                ),
            ),
            VfkitFact::Unusable(why) => (false, why.clone()),
            VfkitFact::NotLooked => (false, "vfkit was not looked for".to_owned()),
        }
    };
    TierVerdict {
        tier: Tier::Vz,
        usable,
        reason,
    }
}

/// Judges every tier and picks the best usable one (never the container tier, which
/// has to be asked for).
pub fn judge(facts: &HostFacts) -> Detection {
    let mut verdicts = vec![
        judge_kvm(facts),
        judge_vz(facts),
        judge_emulated(facts),
        judge_container(facts),
    ];
    if cfg!(not(target_os = "linux")) {
        for verdict in verdicts.iter_mut().filter(|v| v.tier != Tier::Vz) {
            verdict.usable = false;
            verdict.reason = "built for Linux hosts only".to_owned();
        }
    }
    let chosen = verdicts
        .iter()
        .find(|v| v.usable && v.tier != Tier::Container)
        .map(|v| v.tier);
    Detection { verdicts, chosen }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr vmx ept\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n";
    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm npt\n";
    const NONE: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme hypervisor\n";

    fn fake_root(cpuinfo: &str, dev_kvm: bool, modules: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        std::fs::write(dir.path().join("proc/cpuinfo"), cpuinfo).unwrap();
        if dev_kvm {
            std::fs::write(dir.path().join("dev/kvm"), b"").unwrap();
        }
        for m in modules {
            std::fs::create_dir_all(dir.path().join("sys/module").join(m)).unwrap();
        }
        dir
    }

    fn facts(cpuinfo: &str, dev_kvm: bool, modules: &[&str], qemu: bool) -> HostFacts {
        let root = fake_root(cpuinfo, dev_kvm, modules);
        let mut f = HostFacts::probe_at(root.path());
        f.qemu = qemu.then(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
        f
    }

    #[test]
    fn the_container_tier_is_judged_but_never_chosen() {
        let mut f = facts(NONE, false, &[], false);
        f.root = true;
        f.container_ids_missing = None;
        f.max_user_namespaces = Some(1000);
        let d = judge(&f);
        assert!(d.verdict(Tier::Container).unwrap().usable);
        assert_eq!(d.chosen, None, "usable, but only when asked for");
        f.max_user_namespaces = Some(0);
        let off = judge(&f);
        let verdict = off.verdict(Tier::Container).unwrap();
        assert!(!verdict.usable && verdict.reason.contains("max_user_namespaces"));
        f.root = false;
        f.max_user_namespaces = None;
        f.container_ids_missing = Some("user alice has no range of 65535 subordinate ids".into());
        let user = judge(&f);
        let verdict = user.verdict(Tier::Container).unwrap();
        assert!(!verdict.usable && verdict.reason.contains("subordinate ids"));
        f.container_ids_missing = None;
        assert!(judge(&f).verdict(Tier::Container).unwrap().usable);
    }

    #[test]
    fn flags_come_from_the_flags_line() {
        assert!(cpu_flags(INTEL).contains(&"vmx"));
        assert!(!cpu_flags(NONE).contains(&"vmx"));
        assert!(cpu_flags("garbage without colons").is_empty());
    }

    #[test]
    fn hardware_kvm_is_chosen_first() {
        let d = judge(&facts(INTEL, true, &["kvm", "kvm_intel"], true));
        assert_eq!(d.chosen, Some(Tier::Kvm));
        assert!(d.verdict(Tier::Kvm).unwrap().reason.contains("vmx"));
        assert!(d.verdict(Tier::Kvm).unwrap().reason.contains("kvm_intel"));
        let d = judge(&facts(AMD, true, &["kvm", "kvm_amd"], false));
        assert_eq!(d.chosen, Some(Tier::Kvm));
    }

    #[test]
    fn kvm_pvm_is_not_hardware_kvm() {
        // The machines here: /dev/kvm from kvm_pvm, no vmx/svm.
        let d = judge(&facts(NONE, true, &["kvm", "kvm_pvm"], true));
        assert_eq!(d.chosen, Some(Tier::Emulated));
        let kvm = d.verdict(Tier::Kvm).unwrap();
        assert!(!kvm.usable);
        assert!(kvm.reason.contains("kvm_pvm"), "{}", kvm.reason);
        // Even a CPU flag does not make kvm_pvm hardware KVM.
        let d = judge(&facts(INTEL, true, &["kvm_pvm"], false));
        assert_eq!(d.chosen, None);
    }

    #[test]
    fn missing_pieces_are_named() {
        let d = judge(&facts(NONE, false, &[], false));
        assert_eq!(d.chosen, None);
        assert!(d
            .verdict(Tier::Kvm)
            .unwrap()
            .reason
            .contains("neither vmx nor svm"));
        assert!(d
            .verdict(Tier::Emulated)
            .unwrap()
            .reason
            .contains("qemu-system-x86_64"));
        let d = judge(&facts(AMD, false, &[], false));
        assert!(d
            .verdict(Tier::Kvm)
            .unwrap()
            .reason
            .contains("/dev/kvm is missing"));
    }
}
