//! Counters of one network device, shared between its worker thread and whoever reports
//! them. Per-destination drop counts live in the worker's
//! [`EgressFilter`](super::EgressFilter).

use std::sync::atomic::{AtomicU64, Ordering};

/// The counters' values at one moment (the boot report's `net`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NetCounts {
    /// See [`NetMetrics::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetMetrics::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`NetMetrics::tx_denied`].
    pub tx_denied: u64,
    /// See [`NetMetrics::tx_malformed`].
    pub tx_malformed: u64,
    /// See [`NetMetrics::tx_bad_length`].
    pub tx_bad_length: u64,
    /// See [`NetMetrics::tx_bad_offload`].
    pub tx_bad_offload: u64,
    /// See [`NetMetrics::tx_tap_errors`].
    pub tx_tap_errors: u64,
    /// See [`NetMetrics::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetMetrics::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`NetMetrics::rx_too_big`].
    pub rx_too_big: u64,
    /// See [`NetMetrics::rx_tap_errors`].
    pub rx_tap_errors: u64,
    /// See [`NetMetrics::needs_reset`].
    pub needs_reset: u64,
}

/// What one virtio-net device did. Updated by the worker with relaxed atomics.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames from the guest that the policy passed and the tap took.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Frames from the guest that the policy dropped (malformed ones included).
    pub tx_denied: AtomicU64,
    /// Frames from the guest that did not parse.
    pub tx_malformed: AtomicU64,
    /// TX chains too short for a virtio header or longer than the largest frame.
    pub tx_bad_length: AtomicU64,
    /// Passed frames whose offload request (checksum, TSO) was refused, dropped.
    pub tx_bad_offload: AtomicU64,
    /// Passed frames the tap refused (full, or an error).
    pub tx_tap_errors: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames from the tap that did not fit the guest's buffers, dropped.
    pub rx_too_big: AtomicU64,
    /// Tap reads that failed with something other than "nothing waiting".
    pub rx_tap_errors: AtomicU64,
    /// Broken chains or rings that put the device into NEEDS_RESET.
    pub needs_reset: AtomicU64,
}

impl NetMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's current value.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every counter, now.
    #[must_use]
    pub fn counts(&self) -> NetCounts {
        let g = Self::get;
        NetCounts {
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            tx_denied: g(&self.tx_denied),
            tx_malformed: g(&self.tx_malformed),
            tx_bad_length: g(&self.tx_bad_length),
            tx_bad_offload: g(&self.tx_bad_offload),
            tx_tap_errors: g(&self.tx_tap_errors),
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            rx_too_big: g(&self.rx_too_big),
            rx_tap_errors: g(&self.rx_tap_errors),
            needs_reset: g(&self.needs_reset),
        }
    }
}
