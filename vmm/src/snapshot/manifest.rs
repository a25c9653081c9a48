//! The sealed part of a snapshot: what it is bound to and the digests of its two
//! files, signed (DSSE, like the plan) by a key the host trusts. Restore checks all
//! of it before it maps a byte of guest memory or creates a vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use mvm_loader::dsse::{Envelope, TrustedKeys};
use mvm_loader::measure::Sha256Digest;
use serde::{Deserialize, Serialize};

use super::memory::RegionLayout;
use super::SnapshotError;

/// The DSSE payload type of a snapshot manifest.
pub const PAYLOAD_TYPE: &str = mvm_loader::plan::SNAPSHOT_PAYLOAD_TYPE;

/// The manifest's format; a snapshot of another format is refused.
pub const FORMAT: u32 = 2;

/// The VMM build a snapshot is bound to: its state layout is this build's.
pub const VMM_BUILD: &str = concat!("mvm-vmm ", env!("CARGO_PKG_VERSION"), " snapshot-v2");

/// What a snapshot is bound to and what its files hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// [`VMM_BUILD`] of the VMM that took it.
    pub vmm_build: String,
    /// The plan that booted the VM (its id and the digest of its signed payload);
    /// `None` for a development boot, or when the snapshot is bound to `artifacts`.
    pub plan: Option<PlanBinding>,
    /// Instead of one plan: the measured artifacts the VM booted from (kernel,
    /// initramfs, command line, pinned disks). Such a snapshot (a warm start's, taken
    /// once per image) restores under any fresh plan that pins exactly these, the VM's
    /// vCPUs and memory, whose window is open and whose nonce is unspent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<mvm_loader::plan::Artifacts>,
    /// The sandbox's epoch when the snapshot was taken; a restore is refused when the
    /// sandbox has moved past it (a snapshot replayed after a newer one was taken).
    pub epoch: u64,
    /// The CPU the guest was given: its vendor and feature words. A host that lacks
    /// one of those features cannot restore it.
    pub cpu: CpuRequirement,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// The memory file.
    pub memory: FileDigest,
    /// The memory file as the kernel knew it once written, when the VMM held it alone
    /// throughout (a write lease): a restore in the same boot that finds the same file
    /// unchanged need not hash it again. `None`: every restore hashes it.
    pub memory_file: Option<super::written::FileIdentity>,
    /// The RAM regions' places in the memory file.
    pub layout: Vec<RegionLayout>,
    /// The machine-state file.
    pub state: FileDigest,
}

/// The plan a snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBinding {
    /// The plan's id.
    pub id: String,
    /// SHA-256 of the plan's signed payload bytes.
    pub digest: Sha256Digest,
}

/// A file's length and SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Bytes.
    pub bytes: u64,
    /// SHA-256 of all of them.
    pub sha256: Sha256Digest,
}

/// One CPUID feature word the guest was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureWord {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// The bits the guest saw set.
    pub bits: u32,
}

/// The CPU a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuRequirement {
    /// The CPUID vendor string (`AuthenticAMD`, `GenuineIntel`).
    pub vendor: String,
    /// The feature words.
    pub features: Vec<FeatureWord>,
}

/// The (leaf, subleaf, register) words that list features rather than topology or
/// sizes: leaf 1, leaf 7.0, XSAVE's 0xd.1, and the extended leaf 0x80000001.
const FEATURE_WORDS: [(u32, u32, &str); 8] = [
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xd, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

/// Leaf 1 ECX bit 31: "running under a hypervisor", set by KVM, never a requirement.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

fn word(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, register: &str) -> u32 {
    let Some(e) = entries
        .iter()
        .find(|e| e.function == leaf && (e.index == subleaf || leaf == 0x1 || leaf == 0x8000_0001))
    else {
        return 0;
    };
    match register {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return String::new();
    };
    let mut bytes = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl CpuRequirement {
    /// What the guest's CPUID (vCPU 0's) asks of a host.
    pub fn of_guest(cpuid: &[kvm_cpuid_entry2]) -> Self {
        Self {
            vendor: vendor(cpuid),
            features: FEATURE_WORDS
                .iter()
                .map(|&(leaf, subleaf, register)| {
                    let mut bits = word(cpuid, leaf, subleaf, register);
                    if (leaf, register) == (0x1, "ecx") {
                        bits &= !LEAF1_ECX_HYPERVISOR;
                    }
                    FeatureWord {
                        leaf,
                        subleaf,
                        register: register.to_owned(),
                        bits,
                    }
                })
                .collect(),
        }
    }

    /// Refuses when this host (its KVM's supported CPUID, as the VMM offers it) is of
    /// another vendor or lacks a feature bit the guest was given.
    pub fn check_host(&self, supported: &CpuId) -> Result<(), SnapshotError> {
        let host = supported.as_slice();
        let host_vendor = vendor(host);
        if host_vendor != self.vendor {
            return Err(SnapshotError::refused(
                "cpu_mismatch",
                format!(
                    "the snapshot's CPU is {:?}, this host's {host_vendor:?}",
                    self.vendor
                ),
            ));
        }
        for f in &self.features {
            let have = word(host, f.leaf, f.subleaf, &f.register);
            let missing = f.bits & !have;
            if missing != 0 {
                return Err(SnapshotError::refused(
                    "cpu_mismatch",
                    format!(
                        "this host lacks CPUID leaf {:#x}.{} {} bits {missing:#010x}, which the snapshot's guest was given",
                        f.leaf, f.subleaf, f.register
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What the restoring side expects of a snapshot.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// Keys trusted to seal snapshots.
    pub trusted: &'a TrustedKeys,
    /// The plan the restore is admitted under (`None`: a development restore, which
    /// only a development snapshot passes).
    pub plan: Option<&'a PlanBinding>,
    /// What that plan pins, and its vCPUs and memory (for an artifact-bound snapshot).
    pub pins: Option<(&'a mvm_loader::plan::Artifacts, u8, u64)>,
    /// The sandbox's current epoch: a snapshot older than this is a rollback.
    pub min_epoch: u64,
    /// This host's supported CPUID, as the VMM would offer it to a guest.
    pub host_cpuid: &'a CpuId,
}

/// Verifies a sealed manifest (the bytes of [`super::UNSIGNED_FILE`] signed as
/// [`PAYLOAD_TYPE`]) and everything it is bound to except its files' bytes
/// (the caller hashes those next, before using them).
pub fn open(envelope_json: &[u8], expect: &Expect<'_>) -> Result<Manifest, SnapshotError> {
    let envelope = Envelope::from_json(envelope_json)
        .map_err(|e| SnapshotError::refused("snapshot_unsigned", e.to_string()))?;
    let verified = envelope
        .verify(PAYLOAD_TYPE, expect.trusted)
        .map_err(|e| SnapshotError::refused("snapshot_unsigned", e.to_string()))?;
    let manifest: Manifest = serde_json::from_slice(&verified.payload)
        .map_err(|e| SnapshotError::refused("snapshot_format", format!("manifest: {e}")))?;
    if manifest.format != FORMAT || manifest.vmm_build != VMM_BUILD {
        return Err(SnapshotError::refused(
            "vmm_mismatch",
            format!(
                "the snapshot is format {} from {:?}; this VMM reads format {FORMAT} from {VMM_BUILD:?}",
                manifest.format, manifest.vmm_build
            ),
        ));
    }
    match (&manifest.plan, &manifest.artifacts) {
        (Some(_), Some(_)) => {
            return Err(SnapshotError::refused(
                "snapshot_format",
                "the manifest binds both a plan and artifacts".to_owned(),
            ))
        }
        (None, Some(bound)) => match expect.pins {
            Some((artifacts, vcpus, mem_bytes))
                if artifacts == bound && vcpus == manifest.vcpus && mem_bytes == manifest.mem_bytes => {}
            Some((artifacts, vcpus, mem_bytes)) => {
                return Err(SnapshotError::refused(
                    "plan_mismatch",
                    format!(
                        "the snapshot was taken of kernel {}, command line {}, {} vCPUs and {} bytes; the restore's plan pins kernel {}, command line {}, {vcpus} vCPUs and {mem_bytes} bytes (or other initramfs or disks)",
                        bound.kernel, bound.cmdline, manifest.vcpus, manifest.mem_bytes, artifacts.kernel, artifacts.cmdline
                    ),
                ))
            }
            None => {
                return Err(SnapshotError::refused(
                    "plan_mismatch",
                    "the snapshot is bound to measured artifacts; a restore without a plan (development) is refused".to_owned(),
                ))
            }
        },
        (have, None) => {
            if have.as_ref() != expect.plan {
                let name = |p: Option<&PlanBinding>| {
                    p.map_or("no plan (development)".to_owned(), |p| {
                        format!("plan {:?} ({})", p.id, p.digest)
                    })
                };
                return Err(SnapshotError::refused(
                    "plan_mismatch",
                    format!(
                        "the snapshot was taken under {}, the restore is admitted under {}",
                        name(have.as_ref()),
                        name(expect.plan)
                    ),
                ));
            }
        }
    }
    if manifest.epoch < expect.min_epoch {
        return Err(SnapshotError::refused(
            "rollback",
            format!(
                "the snapshot is of epoch {}, the sandbox is at epoch {}: a newer snapshot replaced it",
                manifest.epoch, expect.min_epoch
            ),
        ));
    }
    manifest.cpu.check_host(expect.host_cpuid)?;
    let regions_bytes: u64 = manifest.layout.iter().map(|r| r.len).sum();
    if manifest.vcpus == 0
        || regions_bytes != manifest.mem_bytes
        || manifest.memory.bytes != manifest.mem_bytes
    {
        return Err(SnapshotError::refused(
            "snapshot_format",
            "the manifest's vCPUs, memory size and layout do not agree".to_owned(),
        ));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// Leaf 0 with `name`, leaf 1 with `ecx`/`edx`, leaf 7.0 with `ebx`.
    fn cpu(name: &[u8; 12], ecx1: u32, edx1: u32, ebx7: u32) -> Vec<kvm_cpuid_entry2> {
        let r = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&name[i..i + 4]);
            u32::from_le_bytes(b)
        };
        vec![
            entry(0, 0, r(0), r(8), r(4)),
            entry(1, 0, 0, ecx1, edx1),
            entry(7, 0, ebx7, 0, 0),
        ]
    }

    #[test]
    fn a_host_with_every_feature_passes_and_one_without_one_is_named() {
        let guest = CpuRequirement::of_guest(&cpu(b"AuthenticAMD", 0x0000_0201, 0x10, 0x8));
        assert_eq!(guest.vendor, "AuthenticAMD");
        let host = CpuId::from_entries(&cpu(b"AuthenticAMD", 0x0000_0a01, 0x30, 0x18)).unwrap();
        guest.check_host(&host).unwrap();
        let lacking = CpuId::from_entries(&cpu(b"AuthenticAMD", 0x0000_0a01, 0x30, 0x10)).unwrap();
        let e = guest.check_host(&lacking).unwrap_err();
        assert_eq!(e.refusal_reason(), Some("cpu_mismatch"));
        assert!(
            e.to_string().contains("leaf 0x7.0 ebx bits 0x00000008"),
            "{e}"
        );
        let intel = CpuId::from_entries(&cpu(b"GenuineIntel", !0, !0, !0)).unwrap();
        let e = guest.check_host(&intel).unwrap_err();
        assert!(e.to_string().contains("GenuineIntel"), "{e}");
    }

    #[test]
    fn the_hypervisor_bit_is_never_a_requirement() {
        let guest = CpuRequirement::of_guest(&cpu(b"AuthenticAMD", LEAF1_ECX_HYPERVISOR | 1, 0, 0));
        let host = CpuId::from_entries(&cpu(b"AuthenticAMD", 1, 0, 0)).unwrap();
        guest.check_host(&host).unwrap();
    }
}
