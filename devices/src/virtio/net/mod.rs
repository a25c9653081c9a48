//! virtio-net: the guest's network card, backed by a host tap device, with the plan's
//! egress policy enforced inside the device.
//!
//! Every frame the guest sends is parsed ([`frame`], no I/O) and judged ([`policy`], default
//! deny) before it may reach the tap ([`tap`]); what the policy does not allow is dropped,
//! counted per destination, and the first drop per destination is reported as a
//! [`DeviceEvent`](crate::virtio::DeviceEvent). The front ([`Net`], `device.rs`) answers the
//! transport with features and the config space (MAC, link status); the worker
//! ([`NetWorker`], `event_handler.rs`) owns the tap and the RX/TX queues on the device's own
//! thread. TX offloads are offered (checksum, TSO for IPv4 and IPv6: one 64 KiB frame
//! instead of up to 45), and the device never hands the tap a header the guest wrote: it
//! writes its own from the parsed frame ([`offload`]). RX takes no offloads: the tap
//! checksums and segments everything before the device reads it.
//! Constants mirror `linux/virtio_net.h` (VIRTIO 1.2, 5.1).

mod device;
mod event_handler;
pub mod frame;
mod metrics;
pub mod offload;
pub mod policy;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::{MacAddr, Net, NetConfig, NetError};
pub use event_handler::NetWorker;
pub use metrics::{NetCounts, NetMetrics};
pub use policy::{EgressFilter, EgressRules};
pub use tap::{FrameBackend, Tap, TapError};

/// Feature: the device completes TCP/UDP checksums the driver leaves partial
/// (`VIRTIO_NET_F_CSUM`).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature: the device takes TCP-over-IPv4 segments larger than the MTU
/// (`VIRTIO_NET_F_HOST_TSO4`).
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature: the device takes TCP-over-IPv6 segments larger than the MTU
/// (`VIRTIO_NET_F_HOST_TSO6`).
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature: the device has a MAC address in its config space (`VIRTIO_NET_F_MAC`).
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature: the driver may merge several RX buffers for one frame, and says how many in
/// `num_buffers` (`VIRTIO_NET_F_MRG_RXBUF`).
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Feature: the config space has a link `status` field (`VIRTIO_NET_F_STATUS`).
pub const VIRTIO_NET_F_STATUS: u32 = 16;

/// `status` bit: the link is up (`VIRTIO_NET_S_LINK_UP`).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Size of `struct virtio_net_hdr_v1` (`linux/virtio_net.h`): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers. With VIRTIO_F_VERSION_1 every frame
/// carries this header whether or not MRG_RXBUF is negotiated.
pub const VNET_HDR_SIZE: usize = 12;
/// Offset of `num_buffers` (le16) in `struct virtio_net_hdr_v1`.
pub const VNET_HDR_OFF_NUM_BUFFERS: usize = 10;

/// Index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Number of queues: one RX/TX pair (no `VIRTIO_NET_F_MQ`, no control queue).
pub const NUM_QUEUES: usize = 2;
/// Largest size of each queue that the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Largest Ethernet frame (without the virtio header) the device carries either way: a
/// 64 KiB IP packet plus an Ethernet header with one VLAN tag. Nothing larger is read
/// from a guest chain or the tap.
pub const MAX_FRAME_SIZE: usize = 65_535 + 18;
/// Largest buffer the device moves: the virtio header plus [`MAX_FRAME_SIZE`].
pub const MAX_BUFFER_SIZE: usize = VNET_HDR_SIZE + MAX_FRAME_SIZE;
