//! virtio-vsock: stream sockets between the guest and host processes.
//!
//! The guest sees a virtio-vsock device (RX, TX and event queues, its CID in
//! config space). The host end is one Unix socket per VM, compatible with
//! Firecracker's hybrid vsock: a host process connects to `uds` and writes
//! `CONNECT <port>\n` to reach a guest listener, and a guest connection to the
//! host CID on port P is forwarded to a host process listening on `<uds>_<P>`.
//!
//! Layout: [`packet`] parses what the guest hands over and builds what it
//! receives; [`connection`] is the per-connection state machine with credit
//! flow control; [`unix`] handles the host-side Unix sockets; `muxer` ties
//! connections to host sockets; `device` and `event_handler` drive the queues;
//! `metrics` counts what the device did. The parsers a guest or a host process
//! feeds (`packet`, `connection`, `unix`) are public for the fuzz targets; the rest
//! is reached through the re-exports below.

pub mod connection;
mod device;
mod event_handler;
mod metrics;
mod muxer;
pub mod packet;
mod reset_ack;
pub mod unix;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockConfig, VsockError};
pub use event_handler::VsockWorker;
pub use metrics::{VsockCounts, VsockMetrics};
pub use muxer::{Muxer, MuxerError};

/// Index of the RX queue (device to guest packets).
pub const RX_QUEUE: usize = 0;
/// Index of the TX queue (guest to device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport events such as TRANSPORT_RESET).
pub const EVENT_QUEUE: usize = 2;
/// Number of queues a vsock device has.
pub const NUM_QUEUES: usize = 3;
/// Largest size of each queue that the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// CID of the hypervisor (`VMADDR_CID_HYPERVISOR` in `include/uapi/linux/vm_sockets.h`).
pub const VMADDR_CID_HYPERVISOR: u64 = 0;
/// CID of the local loopback (`VMADDR_CID_LOCAL` in `include/uapi/linux/vm_sockets.h`).
pub const VMADDR_CID_LOCAL: u64 = 1;
/// CID of the host (`VMADDR_CID_HOST` in `include/uapi/linux/vm_sockets.h`): the only
/// destination this device forwards to.
pub const VMADDR_CID_HOST: u64 = 2;
/// The smallest CID a guest may have; 0, 1 and 2 are reserved (`include/uapi/linux/vm_sockets.h`).
pub const MIN_GUEST_CID: u64 = 3;
/// `VMADDR_CID_ANY` (`include/uapi/linux/vm_sockets.h`); never a valid guest CID.
pub const VMADDR_CID_ANY: u64 = 0xffff_ffff;

/// Size of `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`), which is packed.
pub const VSOCK_HDR_SIZE: usize = 44;
/// Offset of `src_cid` (le64) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_SRC_CID: usize = 0;
/// Offset of `dst_cid` (le64) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_DST_CID: usize = 8;
/// Offset of `src_port` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_SRC_PORT: usize = 16;
/// Offset of `dst_port` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_DST_PORT: usize = 20;
/// Offset of `len` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_LEN: usize = 24;
/// Offset of `type` (le16) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_TYPE: usize = 28;
/// Offset of `op` (le16) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_OP: usize = 30;
/// Offset of `flags` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_FLAGS: usize = 32;
/// Offset of `buf_alloc` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_BUF_ALLOC: usize = 36;
/// Offset of `fwd_cnt` (le32) in `struct virtio_vsock_hdr` (`include/uapi/linux/virtio_vsock.h`).
pub const HDR_OFF_FWD_CNT: usize = 40;

/// `VIRTIO_VSOCK_TYPE_STREAM` (`include/uapi/linux/virtio_vsock.h`): the only type offered.
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET` (`include/uapi/linux/virtio_vsock.h`): not negotiated here.
pub const VIRTIO_VSOCK_TYPE_SEQPACKET: u16 = 2;

/// `VIRTIO_VSOCK_OP_INVALID` (`include/uapi/linux/virtio_vsock.h`).
pub const VIRTIO_VSOCK_OP_INVALID: u16 = 0;
/// `VIRTIO_VSOCK_OP_REQUEST` (`include/uapi/linux/virtio_vsock.h`): connect.
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE` (`include/uapi/linux/virtio_vsock.h`): connection accepted.
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST` (`include/uapi/linux/virtio_vsock.h`): connection refused or reset.
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN` (`include/uapi/linux/virtio_vsock.h`): half or full close.
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW` (`include/uapi/linux/virtio_vsock.h`): stream data.
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE` (`include/uapi/linux/virtio_vsock.h`): credit announcement.
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST` (`include/uapi/linux/virtio_vsock.h`): ask for credit.
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV` (`include/uapi/linux/virtio_vsock.h`): sender will receive no more.
pub const VIRTIO_VSOCK_SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND` (`include/uapi/linux/virtio_vsock.h`): sender will send no more.
pub const VIRTIO_VSOCK_SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (`include/uapi/linux/virtio_vsock.h`): all
/// connections are gone (sent on device reset).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event` (`include/uapi/linux/virtio_vsock.h`): one le32 id.
pub const VSOCK_EVENT_SIZE: usize = 4;
/// Size of `struct virtio_vsock_config` (`include/uapi/linux/virtio_vsock.h`): one le64 guest CID.
pub const VSOCK_CONFIG_SIZE: usize = 8;

/// Largest payload of one packet, in either direction. Linux never sends more than
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (64 KiB, `include/linux/virtio_vsock.h`); anything
/// larger from the guest is malformed.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Receive buffer each connection offers the guest (its `buf_alloc`): the most
/// guest-to-host bytes the device holds for one connection when the host reader is slow.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Most connections (including host sockets still sending their `CONNECT` line)
/// one device tracks at a time. With [`CONN_BUF_ALLOC`] this bounds what a guest can
/// make the device buffer to 64 MiB, and only while host readers are slow.
pub const MAX_CONNECTIONS: usize = 256;
