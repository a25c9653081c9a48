//! Counters of one block device, shared between its worker thread and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// What one virtio-blk device did. Updated by the worker with relaxed atomics.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Completed GET_ID requests.
    pub get_ids: AtomicU64,
    /// Requests refused by the parser (answered IOERR or UNSUPP).
    pub refused: AtomicU64,
    /// Requests that failed on the host file (answered IOERR).
    pub io_errors: AtomicU64,
    /// Broken chains or queues that put the device into NEEDS_RESET.
    pub needs_reset: AtomicU64,
}

impl BlockMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's current value.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
