//! Register state for the 64-bit entry: identity page tables, long mode,
//! flat segments, `rip` at the kernel entry and `rsi` at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt;
use crate::layout;

/// CR0.PE: protected mode.
const X86_CR0_PE: u64 = 1 << 0;
/// CR0.PG: paging.
const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// Page table entry: present + writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry for a 2 MiB page: present + writable + page size.
const PDE_2M_PAGE: u64 = 0x83;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;
/// x87 control word after FNINIT.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("writing the {what} at {addr:#x} into guest memory failed: {source}")]
pub struct BootMemoryError {
    /// Which structure.
    pub what: &'static str,
    /// Where.
    pub addr: u64,
    /// The memory error.
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

fn write_u64(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: u64,
) -> Result<(), BootMemoryError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootMemoryError { what, addr, source })
}

/// Writes the GDT, an empty IDT and identity page tables for the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootMemoryError> {
    for (i, entry) in gdt::boot_gdt().iter().enumerate() {
        let addr = layout::BOOT_GDT_START + 8 * u64::try_from(i).unwrap_or(0);
        write_u64(mem, "boot GDT", addr, *entry)?;
    }
    write_u64(mem, "boot IDT", layout::BOOT_IDT_START, 0)?;
    write_u64(
        mem,
        "PML4",
        layout::PML4_START,
        layout::PDPTE_START | PTE_PRESENT_RW,
    )?;
    write_u64(
        mem,
        "PDPT",
        layout::PDPTE_START,
        layout::PDE_START | PTE_PRESENT_RW,
    )?;
    for i in 0..512u64 {
        write_u64(
            mem,
            "page directory",
            layout::PDE_START + i * 8,
            (i << 21) | PDE_2M_PAGE,
        )?;
    }
    Ok(())
}

/// Special registers for long mode with the boot GDT; `base` is what KVM
/// reported for the vCPU (CR0 bits like ET are kept).
pub fn long_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *base;
    let table = gdt::boot_gdt();
    let code = gdt::segment_from_descriptor(gdt::CODE_INDEX, table[1]);
    let data = gdt::segment_from_descriptor(gdt::DATA_INDEX, table[2]);
    let tss = gdt::segment_from_descriptor(gdt::TSS_INDEX, table[3]);

    sregs.gdt.base = layout::BOOT_GDT_START;
    // 4 descriptors of 8 bytes; the limit is inclusive.
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 8 - 1;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry.
pub fn entry_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state after reset.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// A readable dump of a vCPU's registers, for fatal exits.
pub fn format_registers(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let r = regs;
    let s = sregs;
    let seg = |name: &str, x: &SegmentView| {
        format!(
            "{name}={:#06x} base={:#x} limit={:#x} type={:#x} l={} db={} dpl={} present={}",
            x.0, x.1, x.2, x.3, x.4, x.5, x.6, x.7
        )
    };
    let view = |x: &kvm_bindings::kvm_segment| -> SegmentView {
        (
            x.selector, x.base, x.limit, x.type_, x.l, x.db, x.dpl, x.present,
        )
    };
    [
        format!(
            "rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#x}",
            r.rip, r.rsp, r.rbp, r.rflags
        ),
        format!(
            "rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            r.rax, r.rbx, r.rcx, r.rdx
        ),
        format!(
            "rsi={:#018x} rdi={:#018x} r8 ={:#018x} r9 ={:#018x}",
            r.rsi, r.rdi, r.r8, r.r9
        ),
        format!(
            "r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x}",
            r.r10, r.r11, r.r12, r.r13
        ),
        format!("r14={:#018x} r15={:#018x}", r.r14, r.r15),
        format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} cr8={:#x} efer={:#x} apic_base={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base
        ),
        seg("cs", &view(&s.cs)),
        seg("ss", &view(&s.ss)),
        seg("ds", &view(&s.ds)),
        seg("tr", &view(&s.tr)),
        format!(
            "gdt base={:#x} limit={:#x}  idt base={:#x} limit={:#x}",
            s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
        ),
    ]
    .join("\n")
}

/// selector, base, limit, type, l, db, dpl, present.
type SegmentView = (u16, u64, u32, u8, u8, u8, u8, u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START)).unwrap();
        assert_eq!(pdpt, layout::PDE_START | 3);
        let pde_last: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 511 * 8))
            .unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        let code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(&kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.tr.selector, 0x18);
    }

    #[test]
    fn entry_regs_point_at_kernel_and_zero_page() {
        let r = entry_regs(GuestAddress(0x100_0000));
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, layout::ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
        let dump = format_registers(&r, &long_mode_sregs(&kvm_sregs::default()));
        assert!(dump.contains("rip=0x0000000001000000"), "{dump}");
        assert!(dump.contains("cr3=0x9000"), "{dump}");
    }
}
