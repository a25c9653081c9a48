//! Snapshots: a paused VM's whole state to a directory, sealed, and a VM made again
//! from it.
//!
//! A snapshot directory holds three files:
//!
//! - [`MEMORY_FILE`]: guest RAM, region after region ([`memory`]), sparse where zero;
//! - [`STATE_FILE`]: every vCPU's registers, XSAVE, MSRs, LAPIC and events ([`cpu`]), and
//!   the in-kernel PICs, IOAPIC, PIT and clock ([`vm_state`]), as JSON;
//! - [`SEALED_FILE`]: the [`manifest::Manifest`] (what the snapshot is bound to: the
//!   plan, the VMM build, the CPU features, the epoch; and the two files' lengths and
//!   SHA-256) in a DSSE envelope signed by a key the host trusts. The VMM writes the
//!   manifest unsigned ([`UNSIGNED_FILE`]); the runtime, which holds the key, seals it.
//!
//! [`bundle::open`] checks the seal, the bindings and both files' digests before
//! anything is mapped; [`bundle::restore_vm`] then builds the VM and its vCPUs with that
//! state, ready for their first `KVM_RUN`. `docs/snapshots.md` says what is and is not
//! in a snapshot.

pub mod bundle;
pub mod cpu;
pub mod manifest;
pub mod memory;
pub mod vm_state;
pub mod written;

use serde::{Deserialize, Serialize};

/// Guest RAM.
pub const MEMORY_FILE: &str = "memory";
/// vCPU and VM state.
pub const STATE_FILE: &str = "state.json";
/// The manifest as the VMM wrote it, before it is sealed.
pub const UNSIGNED_FILE: &str = "manifest.json";
/// The sealed manifest.
pub const SEALED_FILE: &str = "snapshot.dsse.json";

/// The machine state in [`STATE_FILE`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// Each vCPU's, in index order.
    pub vcpus: Vec<cpu::VcpuState>,
    /// The in-kernel devices'.
    pub vm: vm_state::VmState,
    /// The VMM's own devices'.
    pub devices: DevicesState,
}

/// The state of the devices the VMM emulates itself.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    /// COM1's registers and receive FIFO (`None`: a VM without one, as in tests).
    pub serial: Option<mvm_devices::legacy::serial::UartState>,
    /// Each virtio-mmio device, in the order they were attached (their slots).
    pub virtio: Vec<VirtioSlotState>,
}

/// One virtio-mmio device.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioSlotState {
    /// The device's name (`virtio-blk`, `virtio-vsock`, `virtio-net`).
    pub name: String,
    /// Its slot's guest-physical base.
    pub mmio_base: u64,
    /// Its transport's registers and queues.
    pub transport: mvm_devices::virtio::mmio::TransportState,
}

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A VM-wide KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A vCPU ioctl failed.
    #[error("vcpu {index}: {what} failed: {source}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a snapshot file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// State that cannot be represented (a bug, or a host limit).
    #[error("{what}: {why}")]
    Format {
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The snapshot may not be restored here: its seal, a binding or a digest fails.
    #[error("snapshot refused ({reason}): {detail}")]
    Refused {
        /// A stable reason, for the audit record: `snapshot_unsigned`, `snapshot_format`,
        /// `vmm_mismatch`, `plan_mismatch`, `rollback`, `cpu_mismatch`, `state_mismatch`,
        /// `memory_mismatch`, `memory_unleased`.
        reason: &'static str,
        /// What was found.
        detail: String,
    },
    /// Creating the VM or its vCPUs failed.
    #[error("{0}")]
    Build(String),
}

impl SnapshotError {
    /// A refusal with `reason`.
    pub fn refused(reason: &'static str, detail: String) -> Self {
        Self::Refused { reason, detail }
    }

    /// The refusal's reason, if it is one.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            Self::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}
