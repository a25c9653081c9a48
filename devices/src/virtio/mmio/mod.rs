//! The virtio-mmio transport, version 2 ("modern") registers only.
//!
//! One [`MmioTransport`] sits in a 4 KiB slot of the MMIO hole and is announced to the guest
//! on the kernel command line (`virtio_mmio.device=4K@ADDR:GSI`). It runs on the vCPU thread
//! as a [`crate::bus::BusDevice`]: the guest's register accesses negotiate features, set up
//! queues and walk the status state machine; at DRIVER_OK the queues move to the device's
//! worker thread. Register offsets mirror `linux/virtio_mmio.h` (VIRTIO 1.2, 4.2.2).

#[cfg(test)]
mod tests;
mod transport;

pub use transport::{MmioTransport, QueueState, TransportError, TransportState};

/// `MagicValue` (R): 0x74726976, "virt" in little-endian ASCII.
pub const REG_MAGIC_VALUE: u64 = 0x000;
/// `Version` (R): 2 for the modern interface.
pub const REG_VERSION: u64 = 0x004;
/// `DeviceID` (R): the virtio device type.
pub const REG_DEVICE_ID: u64 = 0x008;
/// `VendorID` (R).
pub const REG_VENDOR_ID: u64 = 0x00c;
/// `DeviceFeatures` (R): 32 feature bits selected by `DeviceFeaturesSel`.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// `DeviceFeaturesSel` (W).
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// `DriverFeatures` (W): 32 accepted feature bits selected by `DriverFeaturesSel`.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// `DriverFeaturesSel` (W).
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// `QueueSel` (W): the queue the `Queue*` registers refer to.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// `QueueNumMax` (R): the selected queue's maximum size, 0 if it does not exist.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// `QueueNum` (W): the selected queue's size.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// `QueueReady` (RW).
pub const REG_QUEUE_READY: u64 = 0x044;
/// `QueueNotify` (W): the value is the queue index. The VMM normally registers an
/// ioeventfd here so the write never reaches the transport.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// `InterruptStatus` (R).
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// `InterruptACK` (W).
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// `Status` (RW): the device status byte; writing 0 resets the device.
pub const REG_STATUS: u64 = 0x070;
/// `QueueDescLow` (W).
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// `QueueDescHigh` (W).
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// `QueueDriverLow` (W): the available ring.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// `QueueDriverHigh` (W).
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// `QueueDeviceLow` (W): the used ring.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// `QueueDeviceHigh` (W).
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// `SHMSel` (W): shared memory regions, which no mvm device has.
pub const REG_SHM_SEL: u64 = 0x0ac;
/// `SHMLenLow` (R): all ones means "no such region".
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
/// `SHMLenHigh` (R).
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
/// `SHMBaseLow` (R).
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
/// `SHMBaseHigh` (R).
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
/// `ConfigGeneration` (R): changes whenever the config space changes.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific config space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt".
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest: "mvm\0" is as good as any, nothing in Linux reads it.
pub const MMIO_VENDOR_ID: u32 = 0x006d_766d;
/// Size of one virtio-mmio slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
