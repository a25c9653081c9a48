//! The boot GDT and the segments the vCPU is loaded with.
//!
//! Four descriptors: null, a 64-bit code segment, a data segment, and a TSS
//! (KVM insists on a usable task register when entering long mode).

use kvm_bindings::kvm_segment;

/// Descriptor flags (access byte in bits 0..8, flags nibble in bits 12..16):
/// present, ring 0, code, execute/read, accessed; long mode, 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Present, ring 0, data, read/write, accessed; 32-bit, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;
/// Present, 64-bit TSS (busy).
pub const TSS_FLAGS: u16 = 0x808b;

/// GDT index of the code segment (selector 0x08).
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment (selector 0x10).
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS (selector 0x18).
pub const TSS_INDEX: u16 = 3;

/// Encodes one 8-byte segment descriptor.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT, in table order.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn bit(entry: u64, n: u32) -> u8 {
    u8::from((entry >> n) & 1 == 1)
}

/// The `kvm_segment` a segment register holds after loading descriptor
/// `entry` with selector index `index`.
pub fn segment_from_descriptor(index: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = bit(entry, 55) == 1;
    // 20-bit limit scaled by 4 KiB granularity fits in 32 bits.
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index.saturating_mul(8),
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present: bit(entry, 47),
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or(0),
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        unusable: u8::from(bit(entry, 47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_architectural_encoding() {
        // Well-known values for flat segments.
        assert_eq!(descriptor(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(
            descriptor(0x8093, 0x1234_5678, 0xabcde),
            0x128a_9334_5678_bcde
        );
    }

    #[test]
    fn code_segment_decodes_as_64_bit_ring_0() {
        let gdt = boot_gdt();
        let cs = segment_from_descriptor(CODE_INDEX, gdt[1]);
        assert_eq!(cs.selector, 0x08);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.dpl, cs.s, cs.g),
            (1, 0, 1, 0, 1, 1)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);

        let ds = segment_from_descriptor(DATA_INDEX, gdt[2]);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment_from_descriptor(TSS_INDEX, gdt[3]);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));

        let base = segment_from_descriptor(1, descriptor(0x8093, 0x1234_5678, 0xabcde));
        assert_eq!(base.base, 0x1234_5678);
        assert_eq!(base.limit, 0xabcd_efff); // G=1 scales by 4 KiB
    }
}
