//! `mmio_transport`: a sequence of guest register reads and writes to one virtio-mmio
//! slot ([`MmioTransport`]) in front of a real virtio-blk device whose worker runs on
//! its own thread, as in the VMM; plus guest memory writes, so queues set up by the
//! sequence can point at real rings.
//!
//! Input ops (one byte each, then operands):
//! - 0: read: u16 offset (< 0x200), u8 length selector (1, 2, 4, 8);
//! - 1: write: u16 offset, u8 length selector, u32 value (little-endian, truncated);
//! - 2: write 8 bytes into guest memory at u16 offset;
//! - 3: a well-behaved 4-byte write from a short table of registers (so sequences that
//!   reach DRIVER_OK are easy to find): u8 register index, u32 value.
//!
//! Invariants after every access: the identification registers never change; FEATURES_OK
//! is only ever set with the acked features a subset of the offered ones and including
//! VERSION_1; the queues are with the worker only while DRIVER_OK is set; a Status write
//! of 0 leaves the device reset (status 0, no features, not activated) once the worker
//! confirms; nothing panics or hangs.

use std::sync::Arc;

use mvm_devices::bus::BusDevice;
use mvm_devices::virtio::block::Block;
use mvm_devices::virtio::mmio::{
    MmioTransport, MMIO_MAGIC_VALUE, MMIO_VENDOR_ID, MMIO_VERSION, REG_DEVICE_FEATURES_SEL,
    REG_DEVICE_ID, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK,
    REG_MAGIC_VALUE, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY,
    REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS, REG_VENDOR_ID, REG_VERSION,
};
use mvm_devices::virtio::worker::{self, WorkerLoop};
use mvm_devices::virtio::{
    feature, Interrupt, VirtioDevice, DEVICE_STATUS_DRIVER_OK, DEVICE_STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;
use crate::memfd;
use crate::virtio_queue_blk::{disk_image, guest_memory};

/// Registers op 3 writes, in the order a driver programs them.
pub const FRIENDLY_REGISTERS: [u64; 15] = [
    REG_STATUS,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_ACK,
];

fn read_u32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mem = guest_memory();
    let sectors = 8;
    let (front, block_worker) = Block::with_file(
        memfd(&disk_image(sectors)),
        sectors,
        false,
        "fuzz-mmio".to_owned(),
    );
    let offered = front.avail_features();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .with_event_hook(Arc::new(|_| {}));
    let (handle, inbox) = worker::channel().expect("worker channel");
    let mut transport = MmioTransport::new(Box::new(front), handle, irq.clone(), mem.clone())
        .expect("transport for a valid device");
    let notifiers = transport.queue_notifiers().expect("notifiers");
    let thread = worker::spawn(
        "fuzz-blk",
        WorkerLoop::new(block_worker, inbox, notifiers, irq),
        || Ok(()),
    )
    .expect("worker thread");

    let mut input = Input::new(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 4 {
            0 => {
                let offset = u64::from(input.u16() % 0x200);
                let mut buf = vec![0u8; 1 << (input.u8() % 4)];
                transport.read(offset, &mut buf);
            }
            1 => {
                let offset = u64::from(input.u16() % 0x200);
                let len = 1usize << (input.u8() % 4);
                let value = u64::from(input.u32()).to_le_bytes();
                transport.write(offset, &value[..len]);
                if offset == REG_STATUS && len == 4 && value[..4] == [0; 4] {
                    check_reset(&mut transport);
                }
            }
            2 => {
                let at = u64::from(input.u16());
                let bytes = input.u64().to_le_bytes();
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            _ => {
                let reg = FRIENDLY_REGISTERS[usize::from(input.u8()) % FRIENDLY_REGISTERS.len()];
                let value = input.u32();
                transport.write(reg, &value.to_le_bytes());
                if reg == REG_STATUS && value == 0 {
                    check_reset(&mut transport);
                }
            }
        }
        check(&mut transport, offered);
    }
    drop(transport);
    let _ = thread.join().expect("worker thread panicked");
}

fn check_reset(t: &mut MmioTransport) {
    if !t.is_activated() {
        assert_eq!(t.status(), 0, "status after a reset");
        assert_eq!(t.acked_features(), 0, "features survived a reset");
    }
}

fn check(t: &mut MmioTransport, offered: u64) {
    assert_eq!(read_u32(t, REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(read_u32(t, REG_VERSION), MMIO_VERSION);
    assert_eq!(read_u32(t, REG_DEVICE_ID), VIRTIO_ID_BLOCK);
    assert_eq!(read_u32(t, REG_VENDOR_ID), MMIO_VENDOR_ID);
    let status = t.status();
    if status & DEVICE_STATUS_FEATURES_OK != 0 {
        let acked = t.acked_features();
        assert_eq!(
            acked & !offered,
            0,
            "FEATURES_OK with unoffered features {acked:#x}"
        );
        assert_ne!(
            acked & feature(VIRTIO_F_VERSION_1),
            0,
            "FEATURES_OK without VERSION_1"
        );
    }
    if t.is_activated() {
        assert_ne!(
            status & DEVICE_STATUS_DRIVER_OK,
            0,
            "queues with the worker before DRIVER_OK"
        );
    }
    if status & DEVICE_STATUS_DRIVER_OK != 0 {
        assert_ne!(
            status & DEVICE_STATUS_FEATURES_OK,
            0,
            "DRIVER_OK without FEATURES_OK"
        );
    }
}
