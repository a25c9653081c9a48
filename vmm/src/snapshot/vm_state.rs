//! The VM-wide state KVM emulates in the kernel: both PICs, the IOAPIC, the PIT and
//! the KVM clock the guest reads through kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// The in-kernel devices' state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The primary 8259.
    pub pic_master: kvm_irqchip,
    /// The secondary 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC's redirection table and registers.
    pub ioapic: kvm_irqchip,
    /// The 8254's three channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest nanoseconds).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the VM's in-kernel state; every vCPU must be paused.
pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Writes `state` into a VM whose irqchip and PIT exist and whose vCPUs have not run.
/// The clock goes on from where it stopped: a restored guest sees no jump in its
/// monotonic time (wall-clock time is the guest agent's to correct).
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(SnapshotError::Format {
                what: "irqchip",
                why: format!("chip {} where {id} belongs", chip.chip_id),
            });
        }
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value is given back; the flags KVM reported (TSC stable, realtime)
    // describe the host it was read on.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
