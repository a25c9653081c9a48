//! The vsock device as the transport sees it: its type, features, queues and the
//! config space holding the guest CID.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::event_handler::VsockWorker;
use super::metrics::VsockMetrics;
use super::muxer::{Muxer, MuxerError};
use super::{MIN_GUEST_CID, NUM_QUEUES, QUEUE_MAX_SIZE, VMADDR_CID_ANY, VSOCK_CONFIG_SIZE};
use crate::virtio::{
    feature, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// How a vsock device is set up (`--vsock cid=N,uds=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The VM's Unix socket; guest connections to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The CID is reserved or out of the 32-bit range Linux uses.
    #[error("vsock guest cid {0} is invalid: must be between {MIN_GUEST_CID} and {max}", max = VMADDR_CID_ANY - 1)]
    Cid(u64),
    /// The host side could not start.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

/// The transport-facing half of the vsock device (lives on the vCPU thread).
#[derive(Debug, Clone)]
pub struct Vsock {
    guest_cid: u64,
    queue_sizes: [u16; NUM_QUEUES],
}

impl Vsock {
    /// Creates the device: the front for the transport and the worker for the
    /// device thread. The VM's socket is listening when this returns.
    pub fn new(config: &VsockConfig) -> Result<(Vsock, VsockWorker), VsockError> {
        let cid = config.guest_cid;
        if !(MIN_GUEST_CID..VMADDR_CID_ANY).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(cid, &config.uds_path, Arc::clone(&metrics))?;
        Ok((
            Vsock {
                guest_cid: cid,
                queue_sizes: [QUEUE_MAX_SIZE; NUM_QUEUES],
            },
            VsockWorker::new(cid, muxer, metrics),
        ))
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        // EVENT_IDX: far fewer kicks and interrupts on bulk transfers.
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config: [u8; VSOCK_CONFIG_SIZE] = self.guest_cid.to_le_bytes();
        crate::virtio::read_config_space(&config, offset, data);
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_reserved_cids() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, VMADDR_CID_ANY, u64::MAX] {
            let cfg = VsockConfig {
                guest_cid: cid,
                uds_path: dir.path().join("v.sock"),
            };
            assert!(matches!(Vsock::new(&cfg), Err(VsockError::Cid(c)) if c == cid));
        }
    }

    #[test]
    fn config_space_holds_the_cid_and_reads_zero_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = VsockConfig {
            guest_cid: 0x0102_0304,
            uds_path: dir.path().join("v.sock"),
        };
        let (dev, _worker) = Vsock::new(&cfg).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_ne!(dev.avail_features() & feature(VIRTIO_F_VERSION_1), 0);
        let mut all = [0xffu8; 8];
        dev.read_config(0, &mut all);
        assert_eq!(u64::from_le_bytes(all), 0x0102_0304);
        let mut hi = [0xffu8; 4];
        dev.read_config(4, &mut hi);
        assert_eq!(hi, [0, 0, 0, 0]);
        let mut lo = [0u8; 2];
        dev.read_config(0, &mut lo);
        assert_eq!(lo, [4, 3]);
        let mut past = [0xffu8; 4];
        dev.read_config(6, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
    }

    #[test]
    fn socket_path_in_use_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        std::fs::write(&path, b"").unwrap();
        let cfg = VsockConfig {
            guest_cid: 3,
            uds_path: path,
        };
        let err = Vsock::new(&cfg).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
