//! The VMM's error types that cross module boundaries: what stops a boot while the VM
//! is being built ([`BootError`]), and a flag that disagrees with the signed plan
//! ([`PlanDisagreement`]). They live here, below every module that returns them, so that
//! device modules and the boot path never import each other for an error type.

use std::io;

use crate::device_manager::DeviceManagerError;
use crate::vcpu::VcpuError;
use crate::vm::VmError;
use mvm_loader::kernel;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Creating the VM or its memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel or initramfs.
    #[error("kernel {path}: {source}")]
    Kernel {
        /// Kernel path.
        path: String,
        /// Why.
        source: kernel::KernelError,
    },
    /// Attaching devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// Configuring a vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Writing boot structures.
    #[error("{0}")]
    BootState(String),
    /// Verified boot refused the loaded images (the refusal itself is reported by the
    /// caller that checked them).
    #[error("the loaded kernel or initramfs is not what the plan pins")]
    Refused,
    /// A KVM ioctl outside the VM and vCPU setup.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Host resources (eventfds, threads, signal masks).
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// A value given on the command line that the signed plan pins to another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {given} disagrees with the signed plan's {field} {plan}")]
pub struct PlanDisagreement {
    /// The flag (`--mem-mib`), or what was counted (`the read-only --disk count`).
    pub flag: &'static str,
    /// Its value.
    pub given: String,
    /// The plan's field (`memory_mib`, `devices.vsock.guest_cid`).
    pub field: &'static str,
    /// The plan's value.
    pub plan: String,
}

/// `BootError::Host` for `what`, as a `map_err` argument.
pub fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> BootError {
    move |source| BootError::Host { what, source }
}
