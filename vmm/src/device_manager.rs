//! Where devices are attached: the port-I/O and MMIO buses, the virtio-mmio
//! slot allocator, and the KVM plumbing (irqfd, ioeventfd) that connects a
//! device's interrupts and queue notifications to the guest without a trip
//! through a vCPU thread.
//!
//! # Attaching a virtio-mmio device
//!
//! ```ignore
//! // 1. Reserve a slot: an address, a GSI, an irqfd on that GSI, and one
//! //    ioeventfd per queue on the slot's QueueNotify register.
//! let res = devices.prepare_virtio_mmio(vm.fd(), num_queues)?;
//! // 2. Build the device with those eventfds: it signals `res.interrupt` to
//! //    raise its interrupt; its thread waits on `res.queue_notify[i]`, which
//! //    KVM signals when the guest writes `i` to QueueNotify.
//! let dev = Arc::new(Mutex::new(MyMmioDevice::new(res.interrupt.try_clone()?, ...)));
//! // 3. Put it on the MMIO bus and announce it on the kernel command line
//! //    (`virtio_mmio.device=4K@0xd0000000:5`).
//! devices.attach_virtio_mmio(&res.slot, dev, &mut cmdline)?;
//! ```
//!
//! Slots are 4 KiB at [`layout::VIRTIO_MMIO_BASE`] + n * 4 KiB with GSI
//! [`layout::VIRTIO_MMIO_FIRST_GSI`] + n, for n below
//! [`layout::VIRTIO_MMIO_SLOT_COUNT`]. The GSIs are IOAPIC pins routed as ISA
//! (edge, active high) by the MP table, which matches irqfd's edge semantics.

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use std::sync::{Arc, Mutex};

use mvm_devices::bus::{Bus, BusError, SharedBusDevice};
use mvm_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout;

/// Offset of the virtio-mmio `QueueNotify` register (virtio 1.2, 4.2.2).
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// All virtio-mmio slots are taken.
    #[error("no free virtio-mmio slot: all {0} are in use")]
    NoFreeSlot(u32),
    /// The bus refused the range.
    #[error("placing a device on the {bus} bus failed: {source}")]
    Bus {
        /// `pio` or `mmio`.
        bus: &'static str,
        /// Why.
        source: BusError,
    },
    /// Creating an eventfd failed.
    #[error("creating an eventfd failed: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{what} for {addr:#x} (GSI {gsi}) failed: {source}")]
    Kvm {
        /// `KVM_IRQFD` or `KVM_IOEVENTFD`.
        what: &'static str,
        /// Slot base.
        addr: u64,
        /// Slot GSI.
        gsi: u32,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The command line has no room for the device.
    #[error("adding {param} to the kernel command line failed: {source}")]
    Cmdline {
        /// The parameter.
        param: String,
        /// Why.
        source: linux_loader::cmdline::Error,
    },
}

/// One virtio-mmio slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Slot index.
    pub index: u32,
    /// Guest-physical base.
    pub base: u64,
    /// Size (always [`layout::VIRTIO_MMIO_SLOT_SIZE`]).
    pub len: u64,
    /// GSI (IOAPIC pin) of the slot's interrupt.
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel parameter announcing a virtio-mmio device in this slot.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.gsi
        )
    }

    /// The address of the slot's `QueueNotify` register.
    pub fn queue_notify_addr(&self) -> u64 {
        self.base + VIRTIO_MMIO_QUEUE_NOTIFY
    }
}

/// What a virtio-mmio device needs from the VMM, already wired into KVM.
#[derive(Debug)]
pub struct VirtioMmioResources {
    /// The slot.
    pub slot: MmioSlot,
    /// Signal this to raise the slot's interrupt (an irqfd on `slot.gsi`).
    pub interrupt: EventFd,
    /// `queue_notify[i]` is signalled when the guest writes `i` to QueueNotify.
    pub queue_notify: Vec<EventFd>,
}

/// A virtio-mmio device's transport, kept beside the bus for snapshots.
#[derive(Debug, Clone)]
pub struct VirtioSlot {
    /// The device's name (`virtio-blk`).
    pub name: &'static str,
    /// The slot's guest-physical base.
    pub base: u64,
    /// The transport (also on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The buses and the slot allocator.
#[derive(Debug, Default)]
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    next_slot: u32,
    virtio: Vec<VirtioSlot>,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The port-I/O bus.
    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    /// Places a device on the port-I/O bus at `[base, base + len)`.
    pub fn attach_pio(
        &mut self,
        device: SharedBusDevice,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceManagerError> {
        self.pio
            .insert(device, base, len)
            .map_err(|source| DeviceManagerError::Bus { bus: "pio", source })
    }

    /// Places a device on the MMIO bus at `[base, base + len)`.
    pub fn attach_mmio(
        &mut self,
        device: SharedBusDevice,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceManagerError> {
        self.mmio
            .insert(device, base, len)
            .map_err(|source| DeviceManagerError::Bus {
                bus: "mmio",
                source,
            })
    }

    /// Takes the next free virtio-mmio slot.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, DeviceManagerError> {
        let index = self.next_slot;
        let base = layout::virtio_mmio_slot_base(index).ok_or(DeviceManagerError::NoFreeSlot(
            layout::VIRTIO_MMIO_SLOT_COUNT,
        ))?;
        self.next_slot += 1;
        Ok(MmioSlot {
            index,
            base,
            len: layout::VIRTIO_MMIO_SLOT_SIZE,
            gsi: layout::VIRTIO_MMIO_FIRST_GSI + index,
        })
    }

    /// Allocates a slot and wires its interrupt (irqfd) and `num_queues`
    /// queue notifications (ioeventfds with datamatch = queue index) in KVM.
    pub fn prepare_virtio_mmio(
        &mut self,
        vm: &VmFd,
        num_queues: u16,
    ) -> Result<VirtioMmioResources, DeviceManagerError> {
        let slot = self.allocate_mmio_slot()?;
        let kvm_err = |what, source| DeviceManagerError::Kvm {
            what,
            addr: slot.base,
            gsi: slot.gsi,
            source,
        };
        let interrupt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&interrupt, slot.gsi)
            .map_err(|e| kvm_err("KVM_IRQFD", e))?;
        let mut queue_notify = Vec::with_capacity(usize::from(num_queues));
        for queue in 0..num_queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(slot.queue_notify_addr()),
                u32::from(queue),
            )
            .map_err(|e| kvm_err("KVM_IOEVENTFD", e))?;
            queue_notify.push(evt);
        }
        Ok(VirtioMmioResources {
            slot,
            interrupt,
            queue_notify,
        })
    }

    /// Puts a virtio-mmio device in `slot` on the MMIO bus and appends
    /// `virtio_mmio.device=4K@ADDR:GSI` to `cmdline`.
    pub fn attach_virtio_mmio(
        &mut self,
        slot: &MmioSlot,
        device: SharedBusDevice,
        cmdline: &mut Cmdline,
    ) -> Result<(), DeviceManagerError> {
        self.attach_mmio(device, slot.base, slot.len)?;
        append_virtio_mmio_param(cmdline, slot)
    }

    /// Keeps a virtio-mmio transport attached with [`DeviceManager::attach_virtio_mmio`]
    /// for snapshots, in attach order.
    pub fn keep_virtio_slot(&mut self, slot: VirtioSlot) {
        self.virtio.push(slot);
    }

    /// The virtio-mmio devices, in the order they were attached.
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.virtio
    }
}

/// Appends the slot's `virtio_mmio.device=` parameter to `cmdline`.
pub fn append_virtio_mmio_param(
    cmdline: &mut Cmdline,
    slot: &MmioSlot,
) -> Result<(), DeviceManagerError> {
    let param = slot.cmdline_param();
    cmdline
        .insert_str(&param)
        .map_err(|source| DeviceManagerError::Cmdline { param, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Nothing;
    impl BusDevice for Nothing {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn slots_are_consecutive_until_the_gsis_run_out() {
        let mut dm = DeviceManager::new();
        let a = dm.allocate_mmio_slot().unwrap();
        let b = dm.allocate_mmio_slot().unwrap();
        assert_eq!((a.base, a.gsi), (0xd000_0000, 5));
        assert_eq!((b.base, b.gsi), (0xd000_1000, 6));
        for _ in 2..layout::VIRTIO_MMIO_SLOT_COUNT {
            dm.allocate_mmio_slot().unwrap();
        }
        assert!(matches!(
            dm.allocate_mmio_slot(),
            Err(DeviceManagerError::NoFreeSlot(19))
        ));
    }

    #[test]
    fn cmdline_announces_the_slot() {
        let mut dm = DeviceManager::new();
        let slot = dm.allocate_mmio_slot().unwrap();
        let mut cmdline = Cmdline::try_from("console=ttyS0", 2048).unwrap();
        dm.attach_virtio_mmio(&slot, Arc::new(Mutex::new(Nothing)), &mut cmdline)
            .unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(dm.mmio_bus().len(), 1);
        // The same slot twice is a bus overlap, not a silent double mapping.
        assert!(dm
            .attach_virtio_mmio(&slot, Arc::new(Mutex::new(Nothing)), &mut cmdline)
            .is_err());
    }

    #[test]
    fn kvm_wiring_when_kvm_is_present() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: KVM wiring not exercised");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mut dm = DeviceManager::new();
        let res = dm.prepare_virtio_mmio(&vm, 2).unwrap();
        assert_eq!(res.queue_notify.len(), 2);
        assert_eq!(res.slot.queue_notify_addr(), 0xd000_0050);
    }
}
