//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns how many CPUs it has, where the IOAPIC is, and how ISA IRQs reach it.
//!
//! Layout written at [`layout::MPTABLE_START`]: the 16-byte floating pointer
//! (`_MP_`), then the configuration table (`PCMP`) header and its entries: one
//! processor per vCPU (APIC id = index), one ISA bus, one IOAPIC (id = vCPU
//! count), an I/O interrupt entry per IOAPIC pin (ISA IRQ n -> pin n, which is
//! also how the virtio-mmio GSIs reach the guest), and the two local
//! interrupt entries (ExtINT on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Floating pointer signature.
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// MP specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Entry type: processor.
const MP_PROCESSOR: u8 = 0;
/// Entry type: bus.
const MP_BUS: u8 = 1;
/// Entry type: IOAPIC.
const MP_IOAPIC: u8 = 2;
/// Entry type: I/O interrupt assignment.
const MP_INTSRC: u8 = 3;
/// Entry type: local interrupt assignment.
const MP_LINTSRC: u8 = 4;
/// Interrupt type: vectored interrupt.
const MP_INT: u8 = 0;
/// Interrupt type: NMI.
const MP_NMI: u8 = 1;
/// Interrupt type: ExtINT (8259 PIC).
const MP_EXTINT: u8 = 3;
/// Processor flags: enabled.
const CPU_ENABLED: u8 = 1;
/// Processor flags: bootstrap processor.
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC version reported (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version reported (as KVM's IOAPIC).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6.
const CPU_STEPPING: u32 = 0x600;
/// Feature flags: FPU and on-chip APIC.
const CPU_FEATURE_APIC_FPU: u32 = (1 << 9) | 1;
/// Destination APIC id meaning "all local APICs".
const ALL_APICS: u8 = 0xff;

/// Size of the floating pointer structure.
const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
const MPC_HEADER_SIZE: usize = 44;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs to number with 8-bit APIC ids next to the IOAPIC.
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    /// Zero vCPUs.
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
    /// The table would run past the end of base memory.
    #[error("the MP table of {0} bytes does not fit below 0xa0000")]
    TooLarge(usize),
    /// Writing to guest memory failed.
    #[error("writing the MP table at {addr:#x} failed: {source}")]
    Write {
        /// Where.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Builds the table for `cpus` vCPUs, as it will sit at `base`.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURE_APIC_FPU.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    // The IOAPIC sits below 4 GiB by construction.
    entries.extend_from_slice(
        &u32::try_from(layout::IOAPIC_START)
            .unwrap_or(0)
            .to_le_bytes(),
    );
    count += 1;
    for pin in 0..layout::IOAPIC_PINS {
        let pin = u8::try_from(pin).unwrap_or(u8::MAX);
        // type, irqtype, irqflag (u16: conforms to bus), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, ALL_APICS, 1]);
    count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    let total = MPF_SIZE + table_len;
    let fits = base
        .checked_add(u64::try_from(total).unwrap_or(u64::MAX))
        .is_some_and(|end| end <= 0xa_0000);
    if !fits {
        return Err(MpTableError::TooLarge(total));
    }
    let table_addr = u32::try_from(base + 16).map_err(|_| MpTableError::TooLarge(total))?;
    let table_len16 = u16::try_from(table_len).map_err(|_| MpTableError::TooLarge(total))?;

    let mut out = Vec::with_capacity(total);
    // Floating pointer.
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    let c = checksum(&out);
    if let Some(slot) = out.get_mut(10) {
        *slot = c;
    }
    // Configuration table header.
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&table_len16.to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0]);
    table.extend_from_slice(b"MVM     ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(
        &u32::try_from(layout::LAPIC_START)
            .unwrap_or(0)
            .to_le_bytes(),
    );
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    let c = checksum(&table);
    if let Some(slot) = table.get_mut(7) {
        *slot = c;
    }
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let addr = layout::MPTABLE_START;
    let bytes = build(addr, cpus)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| MpTableError::Write { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let t = build(layout::MPTABLE_START, 2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), layout::MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap());
        assert_eq!(usize::from(len), table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_bsp_first() {
        for cpus in [1u8, 2, 32] {
            let t = build(layout::MPTABLE_START, cpus).unwrap();
            let table = &t[16..];
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            let entries = &table[44..];
            for id in 0..usize::from(cpus) {
                let e = &entries[id * 20..id * 20 + 20];
                assert_eq!(e[0], MP_PROCESSOR);
                assert_eq!(usize::from(e[1]), id);
                assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, id == 0);
            }
            let ioapic = &entries[usize::from(cpus) * 20 + 8..];
            assert_eq!(ioapic[0], MP_IOAPIC);
            assert_eq!(ioapic[1], cpus);
        }
    }

    #[test]
    fn refuses_impossible_tables() {
        assert!(matches!(
            build(layout::MPTABLE_START, 0),
            Err(MpTableError::NoCpus)
        ));
        assert!(matches!(
            build(layout::MPTABLE_START, 255),
            Err(MpTableError::TooManyCpus(255))
        ));
        assert!(matches!(build(0x9ff00, 32), Err(MpTableError::TooLarge(_))));
    }
}
