//! What wall each backend puts around a workload, as facts: one row per backend, shown by
//! `mvm doctor` (text and `--json`) and carried in each run's receipt, so whoever checks a
//! receipt knows what kind of wall the run had, not only that it ran.
//!
//! The rows say what this build does on this host: every backend has one, and `built`
//! says whether this build can run it here (`kvm`, `emulated` and `container` on Linux,
//! `vz` on macOS), so that a reader of `mvm doctor` sees the whole table and no row
//! claims more than the code gives.

use serde::{Deserialize, Serialize};

use super::Tier;

/// The facts of one backend's wall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wall {
    /// The backend (`kvm`, `emulated`, `container`, `vz`).
    pub backend: String,
    /// Whether this version of mvm can run it at all (built, whatever this host offers).
    pub built: bool,
    /// Whether the guest runs under hardware virtualization on this host (the emulated
    /// tier's inner VM does, on an emulated CPU).
    pub hardware_virtualized: bool,
    /// What separates the workload from the host kernel, in a few words.
    pub isolation: String,
    /// Who verifies the signed plan and measures kernel, initramfs and command line.
    pub plan_verified_by: String,
    /// Whether read-only disks are verified block by block as they are read (each
    /// block hashed when first read, and on every read once the image could have been
    /// written: docs/verified-boot.md).
    pub disk_blocks_verified: bool,
    /// The jail around the process that runs the VM.
    pub jail: String,
    /// Seccomp filters on that process.
    pub seccomp: String,
    /// Where the egress policy is enforced.
    pub egress_enforced_in: String,
}

/// How the container tier is named wherever it appears.
pub const CONTAINER_LABEL: &str = "container: shares the host kernel (Linux namespaces and a seccomp filter around the image's tree; no VM)";

/// The jail `mvm-vmm` builds when started as root or not (`as_root`).
fn vmm_jail(as_root: bool) -> &'static str {
    if as_root {
        "mvm-vmm (root jail): PID, mount, network and IPC namespaces, per-VM root, unprivileged uid, no capabilities, cgroup, rlimits, no_new_privs"
    } else {
        "mvm-vmm (user-namespace jail): user, PID, mount, network and IPC namespaces, per-VM root, no capabilities, rlimits, no_new_privs; a cgroup only where one is delegated (--cgroup-parent); refuses to start where unprivileged user namespaces are forbidden"
    }
}

/// The wall of `tier` when `mvm` runs as root or not (`as_root`).
pub fn of(tier: Tier, as_root: bool) -> Wall {
    match tier {
        Tier::Kvm => Wall {
            backend: tier.to_string(),
            built: tier.built_here(),
            hardware_virtualized: true,
            isolation: "a KVM virtual machine with its own kernel (mvm-vmm: virtio-mmio blk, net, vsock only)".into(),
            plan_verified_by: "mvm-vmm, before the first guest instruction".into(),
            disk_blocks_verified: true,
            jail: vmm_jail(as_root).into(),
            seccomp: "one filter per mvm-vmm thread (mvm-vmm --print-seccomp)".into(),
            egress_enforced_in: "mvm-vmm's virtio-net device, every frame".into(),
        },
        Tier::Emulated => Wall {
            backend: tier.to_string(),
            built: tier.built_here(),
            hardware_virtualized: false,
            isolation: "a KVM virtual machine inside a QEMU-TCG test host: the outer wall is QEMU's CPU emulator".into(),
            plan_verified_by: "mvm-vmm inside the test host, before the first guest instruction".into(),
            disk_blocks_verified: true,
            jail: format!(
                "inside the test host: {}; the QEMU process on this host: none beyond its own user's rights",
                vmm_jail(true)
            ),
            seccomp: "one filter per mvm-vmm thread inside the test host; none on QEMU".into(),
            egress_enforced_in: "mvm-vmm's virtio-net device inside the test host, every frame".into(),
        },
        Tier::Container => Wall {
            backend: tier.to_string(),
            built: tier.built_here(),
            hardware_virtualized: false,
            isolation: CONTAINER_LABEL.into(),
            plan_verified_by: "mvm, before the container starts (signature, window, nonce; kernel, initramfs and command line measured against the plan; the kernel is never booted)".into(),
            disk_blocks_verified: false,
            jail: if as_root {
                "user, mount, PID, network, IPC, UTS and cgroup namespaces; pivot_root into a tmpfs holding the image's tree; its users mapped onto an unused range of this host's; no_new_privs; rlimits; a cgroup v2 (memory, pids, cpu from --mem and --cpus) where this host has cgroup v2"
            } else {
                "user, mount, PID, network, IPC, UTS and cgroup namespaces; pivot_root into a tmpfs holding the image's tree; its root is the user, its other users the user's subordinate ids (newuidmap); no_new_privs; rlimits; no cgroup (tmpfs sizes bound its files, not its memory)"
            }
            .into(),
            seccomp: "one deny-list filter on every process in it (module loading, kexec, bpf, userfaultfd, keyrings, ptrace, mounts, new namespaces, ...: docs/seccomp.md)".into(),
            egress_enforced_in: "nowhere needed: the network namespace holds only loopback (--net refused)".into(),
        },
        Tier::Vz => Wall {
            backend: tier.to_string(),
            built: tier.built_here(),
            hardware_virtualized: true,
            isolation: format!("{}; mvm's tests have never run it on a Mac", super::vz::LABEL),
            plan_verified_by: "mvm, before hand-off (signature, window, nonce; kernel, initramfs and command line measured on private read-only copies, the only files vfkit is given; no disks in this version)".into(),
            disk_blocks_verified: false,
            jail: "none of mvm's: Apple's hypervisor; vfkit runs as the user".into(),
            seccomp: "none".into(),
            egress_enforced_in: "nowhere needed: the VM has no network device in this version (--net refused)".into(),
        },
    }
}

/// Every backend's wall, built for this host or not, strongest first, for a process
/// running as root or not (`as_root`): what `mvm doctor` and the MCP server's
/// `host_info` show.
pub fn all(as_root: bool) -> Vec<Wall> {
    [Tier::Kvm, Tier::Vz, Tier::Emulated, Tier::Container]
        .into_iter()
        .map(|t| of(t, as_root))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hardware_tier_claims_hardware_and_unbuilt_rows_claim_nothing() {
        assert!(of(Tier::Kvm, true).hardware_virtualized);
        assert!(!of(Tier::Emulated, true).hardware_virtualized);
        let container = of(Tier::Container, true);
        assert!(!container.hardware_virtualized && !container.disk_blocks_verified);
        assert!(container.isolation.contains("shares the host kernel"));
        assert!(of(Tier::Kvm, false).jail.contains("user-namespace jail"));
        assert!(of(Tier::Kvm, true).jail.contains("namespaces"));
        let vz = of(Tier::Vz, false);
        assert!(!vz.disk_blocks_verified && vz.isolation.contains("never run it on a Mac"));
        assert_eq!(vz.built, cfg!(target_os = "macos"));
        let backends: Vec<String> = all(true).into_iter().map(|w| w.backend).collect();
        assert_eq!(backends, ["kvm", "vz", "emulated", "container"]);
        let json = serde_json::to_string(&of(Tier::Emulated, false)).unwrap();
        let back: Wall = serde_json::from_str(&json).unwrap();
        assert_eq!(back, of(Tier::Emulated, false));
    }
}
