//! The guest-physical memory map of an mvm x86_64 VM, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (unused)
//! 0x0000_0500  boot GDT            (BOOT_GDT_START)
//! 0x0000_0520  boot IDT            (BOOT_IDT_START)
//! 0x0000_7000  zero page           (ZERO_PAGE_START, struct boot_params)
//! 0x0000_8ff0  boot stack top      (BOOT_STACK_POINTER)
//! 0x0000_9000  PML4 / PDPT / PD    (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (CMDLINE_START, CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  MP table            (MPTABLE_START; not RAM in the e820 map)
//! 0x0010_0000  kernel, then RAM up to min(memory, MMIO_HOLE_START)
//!              initramfs at the top of that low RAM
//! 0xc000_0000  32-bit MMIO hole    (MMIO_HOLE_START .. 4 GiB)
//!   0xd000_0000  virtio-mmio slots, 4 KiB each, GSI 5.. (VIRTIO_MMIO_BASE)
//!   0xfec0_0000  IOAPIC
//!   0xfee0_0000  LAPIC
//!   0xfffb_c000  KVM identity-map page, then the 3-page KVM TSS
//! 0x1_0000_0000 RAM above 4 GiB, for memory beyond MMIO_HOLE_START
//! ```
//!
//! Port I/O: COM1 0x3f8 (IRQ 4), i8042 0x60/0x64, guest-signal port 0x600
//! (see `mvm_devices::legacy`).

use vm_memory::GuestAddress;

/// Boot GDT (4 entries: null, code, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty: interrupts stay off until the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`), pointed to by `rsi` at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (and frame pointer) of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages = 1 GiB identity map).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line, including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// The MP floating pointer and configuration table (Linux scans the last KiB
/// of base memory for it).
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the kernel may start: the first byte above the legacy 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: no RAM from here to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address past 32 bits; RAM beyond the hole resumes here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot (announced as `4K` on the command line).
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// GSI (IOAPIC pin) of the first slot; slot `n` uses `VIRTIO_MMIO_FIRST_GSI + n`.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// Last usable GSI: the KVM IOAPIC has 24 pins.
pub const VIRTIO_MMIO_LAST_GSI: u32 = 23;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOT_COUNT: u32 = VIRTIO_MMIO_LAST_GSI - VIRTIO_MMIO_FIRST_GSI + 1;

/// IOAPIC MMIO base (emulated in KVM).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base (emulated in KVM).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC pins (GSIs 0..=23).
pub const IOAPIC_PINS: u32 = 24;
/// KVM's identity-map page (needed by VMX for real mode; harmless on SVM).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's 3-page TSS region (VMX), right after the identity-map page.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Most memory a VM may have: `mvm_loader::limits::MAX_MEMORY_MIB` (the one limit the
/// runtime admits against), in bytes.
pub const MAX_MEMORY_BYTES: u64 = mvm_loader::limits::MAX_MEMORY_MIB << 20;

// The fixed regions of the hole must not collide; checked at compile time.
const _: () = {
    assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START);
    assert!(
        VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOT_COUNT as u64 * VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START
    );
    assert!(LAPIC_START < KVM_IDENTITY_MAP_START);
    assert!(KVM_IDENTITY_MAP_START + 0x1000 == KVM_TSS_START);
    assert!(KVM_TSS_START + 0x3000 < FIRST_ADDR_PAST_32BITS);
    assert!(VIRTIO_MMIO_LAST_GSI < IOAPIC_PINS);
};

/// One past the last byte of RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

/// The RAM ranges for `mem_bytes` of guest memory: from 0 up to the hole,
/// and the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = low_ram_end(mem_bytes);
    let mut ranges = Vec::with_capacity(2);
    if low > 0 {
        ranges.push((GuestAddress(0), low));
    }
    let high = mem_bytes.saturating_sub(MMIO_HOLE_START);
    if high > 0 {
        ranges.push((GuestAddress(FIRST_ADDR_PAST_32BITS), high));
    }
    ranges
}

/// Guest-physical base of virtio-mmio slot `index`, if it exists.
pub fn virtio_mmio_slot_base(index: u32) -> Option<u64> {
    if index >= VIRTIO_MMIO_SLOT_COUNT {
        return None;
    }
    VIRTIO_MMIO_BASE.checked_add(u64::from(index).checked_mul(VIRTIO_MMIO_SLOT_SIZE)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(1 << 32), (4 << 30) - MMIO_HOLE_START)
            ]
        );
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn fixed_regions_do_not_overlap() {
        let pts = [
            BOOT_GDT_START,
            BOOT_IDT_START,
            ZERO_PAGE_START,
            BOOT_STACK_POINTER,
            PML4_START,
            PDPTE_START,
            PDE_START,
            CMDLINE_START,
            MPTABLE_START,
            HIMEM_START,
        ];
        assert!(pts.windows(2).all(|w| w[0] < w[1]), "{pts:x?}");
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        // Slots, IOAPIC, LAPIC and the KVM pages all sit inside the hole.
        let last_slot = virtio_mmio_slot_base(VIRTIO_MMIO_SLOT_COUNT - 1).unwrap();
        assert!(last_slot + VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START);
    }

    #[test]
    fn slot_addresses() {
        assert_eq!(virtio_mmio_slot_base(0), Some(0xd000_0000));
        assert_eq!(virtio_mmio_slot_base(2), Some(0xd000_2000));
        assert_eq!(virtio_mmio_slot_base(VIRTIO_MMIO_SLOT_COUNT), None);
    }
}
