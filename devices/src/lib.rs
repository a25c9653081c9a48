//! The mvm device model.
//!
//! Everything a guest can touch lives here: the port/MMIO bus that vCPU exits are
//! dispatched to, the legacy serial port and i8042 reset line, and the virtio
//! devices (block, net, vsock) behind the virtio-mmio transport. Devices are
//! state machines driven by register accesses and queue notifications; the
//! threads and event loops that drive them are set up by `mvm-vmm`.

pub mod bus;
pub mod legacy;
pub mod thread;
pub mod virtio;
