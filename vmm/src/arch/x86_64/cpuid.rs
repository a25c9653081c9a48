//! CPUID for each vCPU: what `KVM_GET_SUPPORTED_CPUID` offers, with the
//! topology rewritten so the guest sees `count` single-threaded cores in one
//! package and vCPU `n` has APIC id `n`.
//!
//! Both vendors' topology leaves are kept consistent: leaf 0x1 (initial APIC
//! id, logical count, HTT), 0x4 (Intel cache sharing), 0xB/0x1F (extended
//! topology, regenerated from scratch: the host's values describe the host),
//! and on AMD 0x8000_0008 (core count), 0x8000_001D (cache sharing) and
//! 0x8000_001E (extended APIC id). AMD's TOPOEXT bit is cleared so Linux takes
//! the core count from 0x8000_0008 and the APIC ids from 0xB rather than from
//! compute-unit fields we would have to invent.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm};

/// Leaf 0x1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 ECX: the local APIC timer has TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x6 ECX: energy performance bias (not virtualised).
const LEAF6_ECX_EPB: u32 = 1 << 3;
/// Leaf 0x8000_0001 ECX: CmpLegacy (multi-core package).
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0x8000_0001 ECX: TOPOEXT.
const AMD_ECX_TOPOEXT: u32 = 1 << 22;
/// Extended topology level type: SMT.
const LEVEL_TYPE_SMT: u32 = 1;
/// Extended topology level type: core.
const LEVEL_TYPE_CORE: u32 = 2;

/// The CPU vendor KVM reports (the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD` (and Hygon's `HygonGenuine`, which follows AMD).
    Amd,
    /// Anything else: only vendor-neutral leaves are rewritten.
    Other,
}

/// Errors building a vCPU's CPUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// vCPU count outside 1..=255 or id not below it.
    #[error("vCPU {id} of {count} is not a valid topology")]
    BadTopology {
        /// vCPU index.
        id: u8,
        /// vCPU count.
        count: u8,
    },
    /// KVM's CPUID has no leaf 0.
    #[error("the supported CPUID from KVM has no leaf 0")]
    NoLeaf0,
    /// Too many entries for `KVM_SET_CPUID2`.
    #[error("filtered CPUID has {0} entries, more than KVM accepts")]
    TooManyEntries(usize),
}

/// Which vendor leaf 0 names.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<CpuVendor> {
    let leaf0 = entries.iter().find(|e| e.function == 0)?;
    let mut name = [0u8; 12];
    for (chunk, reg) in name.chunks_mut(4).zip([leaf0.ebx, leaf0.edx, leaf0.ecx]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    Some(match &name {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    })
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u8::BITS - (n - 1).leading_zeros(),
    }
}

/// Rewrites the cache-sharing field (EAX bits 14..26) of a leaf 0x4 or
/// 0x8000_001D entry: L1/L2 are per core, L3 is shared by all vCPUs.
fn cache_sharing(eax: u32, count: u8) -> u32 {
    let level = (eax >> 5) & 0x7;
    let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
    (eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14)
}

fn topology_leaf(function: u32, index: u32, apic_id: u8, count: u8) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        0 => (0, 1, (LEVEL_TYPE_SMT << 8) | index),
        1 => (
            id_bits(count),
            u32::from(count),
            (LEVEL_TYPE_CORE << 8) | index,
        ),
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: u32::from(apic_id),
        ..Default::default()
    }
}

/// Adds the TSC-deadline timer (leaf 0x1 ECX bit 24) to KVM's supported CPUID.
///
/// KVM emulates it in the in-kernel local APIC whenever it reports
/// `KVM_CAP_TSC_DEADLINE_TIMER`, but leaves the bit out of `KVM_GET_SUPPORTED_CPUID`
/// for the VMM to set (the KVM API documentation says so). Without it Linux keeps the
/// PIT as its clock event device: it checks the IO-APIC timer route at boot
/// (`check_timer`, busy-waiting on PIT ticks) and takes a PIT interrupt every tick, each
/// one a VM exit. With it the guest programs one-shot deadlines on its local APIC and
/// never starts the PIT.
pub fn offer_tsc_deadline(supported: &mut CpuId) {
    for e in supported.as_mut_slice() {
        if e.function == 0x1 {
            e.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
    }
}

/// The CPUID this host's KVM can give a guest, as the VMM offers it: KVM's supported
/// CPUID with the TSC-deadline timer added where KVM emulates it. Boot filters each
/// vCPU's CPUID from this; a snapshot's restore checks the guest's against it.
pub fn offered(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    let mut supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        offer_tsc_deadline(&mut supported);
    }
    Ok(supported)
}

/// The CPUID for vCPU `id` of `count`, from KVM's supported CPUID.
pub fn filter_cpuid(supported: &CpuId, id: u8, count: u8) -> Result<CpuId, CpuidError> {
    if count == 0 || id >= count {
        return Err(CpuidError::BadTopology { id, count });
    }
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let vendor = vendor(&entries).ok_or(CpuidError::NoLeaf0)?;
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let amd = vendor == CpuVendor::Amd;
    let apic = u32::from(id);
    let n = u32::from(count);

    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    for e in &mut entries {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (n << 16) | (apic << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if vendor != CpuVendor::Amd => {
                // Cores per package - 1 in bits 26..32.
                e.eax = (cache_sharing(e.eax, count) & 0x03ff_ffff) | (((n - 1) & 0x3f) << 26);
            }
            0x6 => e.ecx &= !LEAF6_ECX_EPB,
            0x8000_0001 if amd => {
                e.ecx &= !AMD_ECX_TOPOEXT;
                if count > 1 {
                    e.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if amd => {
                // NC (bits 0..8) = cores - 1; ApicIdSize (bits 12..16).
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (n - 1);
            }
            0x8000_001d if amd => e.eax = cache_sharing(e.eax, count),
            0x8000_001e if amd => {
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    for function in [0xb, 0x1f] {
        if max_basic >= function {
            for index in 0..3 {
                entries.push(topology_leaf(function, index, id, count));
            }
        }
    }
    let len = entries.len();
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let r = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        leaf(0, 0, max, r(0), r(8), r(4))
    }

    fn host(name: &[u8; 12]) -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(name, 0x1f),
            leaf(1, 0, 0x800f12, 0x0310_0800, 0, 0),
            leaf(4, 0, 0x121, 0, 0, 0),
            leaf(4, 3, 0x163, 0, 0, 0),
            leaf(6, 0, 0, 0, 0x9, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0x8000_0001, 0, 0, 0, AMD_ECX_TOPOEXT, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            leaf(0x8000_001e, 0, 9, 0x100, 3, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn tsc_deadline_is_offered_on_leaf_1_only() {
        let mut c = host(b"AuthenticAMD");
        offer_tsc_deadline(&mut c);
        assert_eq!(
            get(&c, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE,
            LEAF1_ECX_TSC_DEADLINE
        );
        let filtered = filter_cpuid(&c, 0, 1).unwrap();
        assert_eq!(
            get(&filtered, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE,
            LEAF1_ECX_TSC_DEADLINE
        );
        for e in c.as_slice().iter().filter(|e| e.function != 1) {
            assert_eq!(e.ecx & LEAF1_ECX_TSC_DEADLINE, 0, "leaf {:#x}", e.function);
        }
    }

    #[test]
    fn vendors_are_recognised() {
        assert_eq!(
            vendor(host(b"GenuineIntel").as_slice()),
            Some(CpuVendor::Intel)
        );
        assert_eq!(
            vendor(host(b"AuthenticAMD").as_slice()),
            Some(CpuVendor::Amd)
        );
        assert_eq!(
            vendor(host(b"SomethingNew").as_slice()),
            Some(CpuVendor::Other)
        );
        assert_eq!(vendor(&[]), None);
    }

    #[test]
    fn leaf1_carries_the_apic_id_and_count() {
        let c = filter_cpuid(&host(b"GenuineIntel"), 3, 4).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(get(&c, 6, 0).ecx & LEAF6_ECX_EPB, 0);

        let single = filter_cpuid(&host(b"GenuineIntel"), 0, 1).unwrap();
        assert_eq!(get(&single, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_is_regenerated_for_both_vendors() {
        for name in [b"GenuineIntel", b"AuthenticAMD"] {
            let c = filter_cpuid(&host(name), 2, 3).unwrap();
            let smt = get(&c, 0xb, 0);
            let core = get(&c, 0xb, 1);
            let end = get(&c, 0xb, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
            assert_eq!(end.ecx >> 8, 0);
            assert_eq!(get(&c, 0x1f, 1).ebx, 3);
            assert_eq!(
                c.as_slice().iter().filter(|e| e.function == 0xb).count(),
                3,
                "host's 0xB entries replaced"
            );
        }
    }

    #[test]
    fn intel_cache_leaf_describes_the_package() {
        let c = filter_cpuid(&host(b"GenuineIntel"), 0, 8).unwrap();
        let l1d = get(&c, 4, 0);
        let l3 = get(&c, 4, 3);
        assert_eq!(l1d.eax >> 26, 7);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 7);
        assert_eq!(l3.eax & 0x1f, 0x3, "cache type kept");
        // Intel leaves untouched by AMD rules.
        assert_eq!(get(&c, 0x8000_0001, 0).ecx, AMD_ECX_TOPOEXT);
    }

    #[test]
    fn amd_core_count_and_no_topoext() {
        let c = filter_cpuid(&host(b"AuthenticAMD"), 1, 2).unwrap();
        let ext = get(&c, 0x8000_0001, 0);
        assert_eq!(ext.ecx & AMD_ECX_TOPOEXT, 0);
        assert_ne!(ext.ecx & AMD_ECX_CMP_LEGACY, 0);
        let l88 = get(&c, 0x8000_0008, 0);
        assert_eq!(l88.ecx & 0xff, 1);
        assert_eq!((l88.ecx >> 12) & 0xf, 1);
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 1);
        // AMD does not use leaf 4 for topology: left as KVM gave it.
        assert_eq!(get(&c, 4, 0).eax, 0x121);
    }

    #[test]
    fn bad_topologies_are_refused() {
        assert!(filter_cpuid(&host(b"GenuineIntel"), 0, 0).is_err());
        assert!(filter_cpuid(&host(b"GenuineIntel"), 4, 4).is_err());
        assert_eq!(
            filter_cpuid(
                &CpuId::from_entries(&[leaf(1, 0, 0, 0, 0, 0)]).unwrap(),
                0,
                1
            ),
            Err(CpuidError::NoLeaf0)
        );
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
