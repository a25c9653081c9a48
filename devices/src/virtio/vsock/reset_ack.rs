//! Knowing when the guest has acted on a TRANSPORT_RESET.
//!
//! After a snapshot restore the device sends TRANSPORT_RESET so that the guest drops
//! its connections to the VMM that is gone. Linux handles the event in a work item of
//! its own, apart from the one that handles received packets; if a host `CONNECT`
//! reaches the guest first, the guest answers it, and then the reset closes that new
//! connection too, without a word to the host (no RST): the host holds an open
//! connection nobody serves. So after the reset nothing is delivered on the RX queue
//! until the guest has handled the event, which it shows by giving the event buffer
//! back: after handling an event, Linux's driver refills the event queue and kicks it.
//! The avail index moving past where it was when the reset was delivered is the
//! acknowledgement. A guest that never refills is waited for at most
//! [`RESET_ACK_WAIT`], checked whenever anything else happens.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The longest RX is held for a guest that does not give its event buffer back.
pub const RESET_ACK_WAIT: Duration = Duration::from_secs(2);

/// Bytes of the used ring's header (flags, idx) and of one used element.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

/// A TRANSPORT_RESET delivered and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct PendingAck {
    /// The event queue's avail index when the reset was delivered.
    avail_at: Wrapping<u16>,
    /// When it was delivered.
    since: Instant,
}

impl PendingAck {
    /// Starts waiting on `queue` (the event queue, the reset just put in its used ring):
    /// makes sure the guest's next refill kicks the device, then notes where the avail
    /// index stands.
    pub fn start(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Self, String> {
        let avail_at = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| format!("event avail index: {e}"))?;
        if queue.event_idx_enabled() {
            // The driver kicks when its avail index passes avail_event: set it to the
            // index now, so that the very next buffer it adds kicks. (The queue's own
            // enable_notification would use the device's next_avail, which trails the
            // driver's index while the driver has spare event buffers posted.)
            let addr = GuestAddress(queue.used_ring())
                .0
                .checked_add(USED_HEADER + USED_ELEMENT * u64::from(queue.size()))
                .ok_or("event used ring address overflows")?;
            mem.store(avail_at.0.to_le(), GuestAddress(addr), Ordering::Release)
                .map_err(|e| format!("event avail_event: {e}"))?;
        } else {
            queue
                .enable_notification(mem)
                .map_err(|e| format!("event notification flags: {e}"))?;
        }
        fence(Ordering::SeqCst);
        Ok(Self {
            avail_at,
            since: Instant::now(),
        })
    }

    /// Whether the guest has acknowledged the reset (or been waited for long enough).
    pub fn done(&self, queue: &Queue, mem: &GuestMemoryMmap) -> bool {
        let moved = queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|now| now != self.avail_at);
        if moved {
            return true;
        }
        if self.since.elapsed() >= RESET_ACK_WAIT {
            tracing::debug!(
                "vsock: the guest did not give its event buffer back within {RESET_ACK_WAIT:?} of a TRANSPORT_RESET; delivering anyway"
            );
            return true;
        }
        false
    }
}
