//! Counters of one vsock device, shared between its worker thread (the queues and the
//! muxer) and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// What one virtio-vsock device did. Updated on the device thread with relaxed atomics.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Packets taken from the guest.
    pub tx_packets: AtomicU64,
    /// TX chains that could not be read (addresses outside guest memory).
    pub tx_unreadable: AtomicU64,
    /// RX buffers too small for a header, returned empty.
    pub rx_buffers_too_small: AtomicU64,
    /// TRANSPORT_RESET events delivered.
    pub transport_resets: AtomicU64,
    /// Guest packets dropped as malformed or spoofed.
    pub dropped_packets: AtomicU64,
    /// RSTs sent for packets that matched no connection or were refused.
    pub rst_sent: AtomicU64,
    /// Host or guest connections refused because of the connection limit.
    pub refused_over_limit: AtomicU64,
    /// Host `CONNECT`s the guest did not answer in time.
    pub connect_timeouts: AtomicU64,
}

/// The counters' values at one moment (the boot report's `vsock`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VsockCounts {
    /// See [`VsockMetrics::rx_packets`].
    pub rx_packets: u64,
    /// See [`VsockMetrics::tx_packets`].
    pub tx_packets: u64,
    /// See [`VsockMetrics::tx_unreadable`].
    pub tx_unreadable: u64,
    /// See [`VsockMetrics::rx_buffers_too_small`].
    pub rx_buffers_too_small: u64,
    /// See [`VsockMetrics::transport_resets`].
    pub transport_resets: u64,
    /// See [`VsockMetrics::dropped_packets`].
    pub dropped_packets: u64,
    /// See [`VsockMetrics::rst_sent`].
    pub rst_sent: u64,
    /// See [`VsockMetrics::refused_over_limit`].
    pub refused_over_limit: u64,
    /// See [`VsockMetrics::connect_timeouts`].
    pub connect_timeouts: u64,
}

impl VsockMetrics {
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
    pub fn counts(&self) -> VsockCounts {
        let g = Self::get;
        VsockCounts {
            rx_packets: g(&self.rx_packets),
            tx_packets: g(&self.tx_packets),
            tx_unreadable: g(&self.tx_unreadable),
            rx_buffers_too_small: g(&self.rx_buffers_too_small),
            transport_resets: g(&self.transport_resets),
            dropped_packets: g(&self.dropped_packets),
            rst_sent: g(&self.rst_sent),
            refused_over_limit: g(&self.refused_over_limit),
            connect_timeouts: g(&self.connect_timeouts),
        }
    }
}
