//! virtio-blk: a guest disk backed by a host file.
//!
//! The front ([`Block`], `device.rs`) answers the transport with features and the config
//! space (capacity, limits); the worker ([`BlockWorker`], `event_handler.rs`) owns the file
//! and the request queue on the device's own thread. Every request is parsed and validated
//! (`request.rs`, no I/O) before anything touches the file. Constants mirror
//! `linux/virtio_blk.h` (VIRTIO 1.2, 5.2).

mod device;
mod event_handler;
pub mod lease;
mod metrics;
pub mod request;
pub mod verity;

#[cfg(test)]
mod tests;

pub use device::{disk_len, validate_id, Block, BlockError, DiskConfig};
pub use event_handler::BlockWorker;
pub use metrics::BlockMetrics;

/// Feature: `size_max` in the config space bounds each data segment (`VIRTIO_BLK_F_SIZE_MAX`).
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature: `seg_max` in the config space bounds the data segments per request
/// (`VIRTIO_BLK_F_SEG_MAX`).
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature: the disk is read-only (`VIRTIO_BLK_F_RO`).
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: the device understands FLUSH (`VIRTIO_BLK_F_FLUSH`).
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request type: read from the disk into the guest (`VIRTIO_BLK_T_IN`).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write guest data to the disk (`VIRTIO_BLK_T_OUT`).
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make earlier writes durable (`VIRTIO_BLK_T_FLUSH`).
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: return the device id string (`VIRTIO_BLK_T_GET_ID`).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status: success (`VIRTIO_BLK_S_OK`).
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error, also for refused requests (`VIRTIO_BLK_S_IOERR`).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unknown request type (`VIRTIO_BLK_S_UNSUPP`).
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the id string GET_ID returns, NUL-padded (`VIRTIO_BLK_ID_BYTES`).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// virtio-blk addresses the disk in 512-byte sectors whatever the host block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header (`struct virtio_blk_outhdr`): type, reserved, sector.
pub const REQUEST_HEADER_SIZE: u32 = 16;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request offered as `seg_max`.
pub const SEG_MAX: u32 = 128;
/// Largest data segment offered as `size_max`.
pub const SIZE_MAX: u32 = 1 << 20;
