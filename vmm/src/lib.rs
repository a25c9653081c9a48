//! `mvm-vmm`: KVM setup, memory layout, vCPU threads, x86_64 boot state, device
//! wiring, event loops and the jail.
//!
//! The boot path, top to bottom (each module takes names only from modules below it;
//! the workspace's `tests/tests/module_graph.rs` holds that): [`cli`] parses the arguments; [`verified_boot`]
//! checks the signed plan; [`config`] resolves the arguments and the plan into one
//! validated [`config::VmConfig`] before anything touches KVM; [`boot::run`] creates the
//! [`vm::Vm`] (KVM VM, in-kernel IOAPIC/LAPIC/PIT, guest memory laid out by
//! [`layout`]), wires the legacy devices and the virtio-mmio devices ([`devices`]: one
//! module per device, each virtio one through [`devices::attach_virtio_device`] and
//! [`device_manager`]), loads the kernel, writes the x86_64 boot state
//! ([`arch::x86_64`]), starts one thread per [`vcpu`], and supervises until the guest
//! ends; with `--restore`, `boot::restore` makes the VM from a sealed [`snapshot`]
//! instead, and [`snapshot_taking`] writes one on SIGUSR2. [`boot_report`] records when each phase happened; [`event_log`] writes the
//! audit events; [`logger`] writes the diagnostic log to stderr; [`error`] holds the error types that cross modules.
//! `docs/architecture.md` draws the whole of it.

pub mod arch;
pub mod boot;
pub mod boot_report;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod error;
pub mod event_log;
pub mod exit;
pub mod image;
pub mod jail;
pub mod layout;
pub mod logger;
pub mod seccomp;
pub mod snapshot;
pub mod snapshot_taking;
pub mod vcpu;
pub mod verified_boot;
pub mod vm;
