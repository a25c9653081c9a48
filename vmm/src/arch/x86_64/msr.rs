//! MSR values at boot: syscall MSRs cleared, TSC at 0, fast strings on, MTRRs
//! enabled with write-back as the default type.

use kvm_bindings::{kvm_msr_entry, Msrs};

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `MSR_IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `MSR_IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `MSR_IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `MSR_MTRRdefType`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `MSR_STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `MSR_LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `MSR_CSTAR`.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `MSR_SYSCALL_MASK`.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `MSR_KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `MISC_ENABLE.FAST_STRING`.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MTRRdefType.E` (MTRRs enabled).
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The boot MSRs as (index, value) pairs.
pub fn boot_msr_values() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The boot MSRs in the form `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_msr_entry> = boot_msr_values()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_mtrrs_write_back() {
        let msrs = boot_msrs().unwrap();
        let def = msrs
            .as_slice()
            .iter()
            .find(|e| e.index == MSR_MTRR_DEF_TYPE)
            .unwrap();
        assert_eq!(def.data, 0x806);
        assert_eq!(msrs.as_slice().len(), boot_msr_values().len());
        let lstar = msrs
            .as_slice()
            .iter()
            .find(|e| e.index == MSR_LSTAR)
            .unwrap();
        assert_eq!(lstar.data, 0);
    }
}
