//! x86_64 boot state: what a vCPU and guest memory must hold for Linux's 64-bit
//! boot protocol entry.
//!
//! mvm enters both an ELF vmlinux and a bzImage at their 64-bit entry point with
//! a Linux zero page in `rsi`, rather than PVH: one boot path serves both
//! formats (a bzImage has no PVH entry), and the kernel sees the same
//! `boot_params` (e820, command line, initramfs) either way.
//!
//! - [`gdt`]: the boot GDT and the segment registers built from it.
//! - [`regs`]: general, special and FPU registers; identity page tables.
//! - [`cpuid`]: CPUID filtered from `KVM_GET_SUPPORTED_CPUID`, per vCPU.
//! - [`msr`]: boot-time MSR values.
//! - [`interrupts`]: LAPIC LINT0/LINT1 wiring.
//! - [`mptable`]: the Intel MP table that tells the guest about the vCPUs and
//!   the IOAPIC.
//! - [`zero_page`]: `boot_params`, e820 map and command line.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod zero_page;
