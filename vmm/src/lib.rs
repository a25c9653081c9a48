//! `mvm-vmm`: KVM setup, memory layout, vCPU threads, x86_64 boot state, device
//! wiring, event loops and the jail.
//!
//! The boot path, top to bottom: [`cli`] parses the arguments; [`verified_boot`]
//! checks the signed plan; [`config`] resolves the arguments and the plan into one
//! validated [`config::VmConfig`] before anything touches KVM; [`boot::run`] creates the
//! [`vm::Vm`] (KVM VM, in-kernel IOAPIC/LAPIC/PIT, guest memory laid out by
//! [`layout`]), wires the legacy devices and any virtio-mmio devices through
//! [`device_manager`] (each virtio device through [`attach`]), loads the kernel, writes the x86_64 boot state
//! ([`arch::x86_64`]), starts one thread per [`vcpu`], and supervises until the
//! guest ends. [`boot_report`] records when each phase happened.

pub mod arch;
pub mod attach;
pub mod boot;
pub mod boot_report;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod exit;
pub mod jail;
pub mod layout;
pub mod net;
pub mod seccomp;
pub mod vcpu;
pub mod verified_boot;
pub mod virtio_devices;
pub mod vm;
pub mod vsock;
