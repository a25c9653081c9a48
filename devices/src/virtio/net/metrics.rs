//! Counters of one network device, shared between its worker thread and whoever reports
//! them. Per-destination drop counts live in the worker's
//! [`EgressFilter`](super::EgressFilter).

use std::sync::atomic::{AtomicU64, Ordering};

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
}
