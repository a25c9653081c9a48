//! The network device's front: its MAC, features and config space.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::event_handler::NetWorker;
use super::metrics::NetMetrics;
use super::policy::{EgressFilter, EgressRules};
use super::tap::{FrameBackend, Tap, TapError};
use super::{
    NUM_QUEUES, QUEUE_MAX_SIZE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use crate::virtio::{
    feature, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the config space exposed: `mac[6]` and `status` (`struct virtio_net_config` up
/// to `status`).
const CONFIG_SPACE_SIZE: usize = 8;

/// A MAC address, written `02:00:00:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The bytes.
    #[must_use]
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    /// Six hex pairs separated by colons; a unicast address (the multicast bit clear).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NetError::BadMac(s.chars().take(32).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 {
            return Err(err());
        }
        Ok(Self(out))
    }
}

/// One network device as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface to open.
    pub tap: String,
    /// The guest's MAC address (also the only source MAC the policy passes).
    pub mac: MacAddr,
    /// The egress policy.
    pub rules: EgressRules,
}

/// Why a network device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address that does not parse or is multicast.
    #[error("MAC address {0:?} must be six hex pairs (aa:bb:cc:dd:ee:ff), unicast")]
    BadMac(String),
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The virtio-net front a transport talks to.
#[derive(Debug)]
pub struct Net {
    mac: MacAddr,
    features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; NUM_QUEUES],
}

impl Net {
    /// Opens the tap and returns the front and the worker that owns it. The first drop
    /// per destination is reported through the worker's [`crate::virtio::Interrupt`] hook
    /// as a [`crate::virtio::DeviceEvent::EgressDenied`].
    pub fn open(config: &NetConfig) -> Result<(Net, NetWorker<Tap>), NetError> {
        let tap = Tap::open(&config.tap)?;
        Ok(Self::with_backend(config, tap))
    }

    /// The front and worker over an already open backend.
    pub fn with_backend<B: FrameBackend>(config: &NetConfig, backend: B) -> (Net, NetWorker<B>) {
        let features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            // TX offloads: every tap opened with IFF_VNET_HDR takes them on write
            // (the kernel checksums and segments); the header is the device's own.
            | feature(VIRTIO_NET_F_CSUM)
            | feature(VIRTIO_NET_F_HOST_TSO4)
            | feature(VIRTIO_NET_F_HOST_TSO6);
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        let (mac, status) = config_space.split_at_mut(6);
        mac.copy_from_slice(&config.mac.0);
        status.copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        let filter = EgressFilter::new(config.rules.clone());
        let worker = NetWorker::new(backend, filter, Arc::new(NetMetrics::default()));
        let front = Net {
            mac: config.mac,
            features,
            config_space,
            queue_sizes: [QUEUE_MAX_SIZE; NUM_QUEUES],
        };
        (front, worker)
    }

    /// The guest's MAC.
    #[must_use]
    pub fn mac(&self) -> MacAddr {
        self.mac
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "02:ab:00:00:00:0f".parse().unwrap();
        assert_eq!(mac.0, [2, 0xab, 0, 0, 0, 0x0f]);
        assert_eq!(mac.to_string(), "02:ab:00:00:00:0f");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:0g",
            "2:00:00:00:00:00",
            "01:00:5e:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }
}
