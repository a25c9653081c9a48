//! What wakes the vsock device thread and what it does then.
//!
//! - TX queue kick: parse each guest packet and hand it to the muxer, then deliver
//!   whatever the guest is owed.
//! - RX queue kick: the guest gave receive buffers; deliver what is owed.
//! - event queue kick: deliver a pending TRANSPORT_RESET.
//! - the muxer's epoll fd: host sockets have news; handle it, then deliver.
//!
//! A device reset drops every connection (host sockets close) and owes the guest a
//! TRANSPORT_RESET event once the driver brings the device back. After a restore's,
//! RX waits until the guest has handled it ([`super::reset_ack`]).

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{QueueOwnedT, QueueT, Writer};

use super::muxer::Muxer;
use super::packet::{parse_tx_packet, read_tx_chain, rx_payload_capacity, write_rx_packet};
use super::reset_ack::PendingAck;
use super::{
    EVENT_QUEUE, MAX_PKT_DATA, NUM_QUEUES, RX_QUEUE, TX_QUEUE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VSOCK_EVENT_SIZE, VSOCK_HDR_SIZE,
};
use crate::virtio::worker::{QueueWorker, WORKER_TOKEN_BASE};
use crate::virtio::{next_chain, Activation, Interrupt, QueuePosition};

use super::metrics::{VsockCounts, VsockMetrics};

/// Epoll token of the muxer's epoll fd in the device loop.
pub const MUXER_TOKEN: u32 = WORKER_TOKEN_BASE;

const NAME: &str = "virtio-vsock";

/// The device-thread half of the vsock device.
#[derive(Debug)]
pub struct VsockWorker {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Activation>,
    transport_reset_pending: bool,
    /// A TRANSPORT_RESET the guest has not handled yet: nothing goes out on RX.
    reset_ack: Option<PendingAck>,
    /// The pending TRANSPORT_RESET is a restore's: wait for the guest to handle it
    /// before RX. (After the driver's own reset it has no connection a late reset
    /// could close, and a driver need not refill its event queue.)
    ack_pending_reset: bool,
    tx_bytes: Vec<u8>,
    rx_bytes: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl VsockWorker {
    pub(crate) fn new(guest_cid: u64, muxer: Muxer, metrics: Arc<VsockMetrics>) -> Self {
        VsockWorker {
            guest_cid,
            muxer,
            active: None,
            transport_reset_pending: false,
            reset_ack: None,
            ack_pending_reset: false,
            tx_bytes: Vec::new(),
            rx_bytes: vec![0u8; MAX_PKT_DATA as usize],
            metrics,
        }
    }

    /// The host side (for tests and metrics).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// The host side, for tests that tune it.
    #[cfg(test)]
    pub(crate) fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// The counters, now.
    pub fn stats(&self) -> VsockCounts {
        self.metrics.counts()
    }

    /// The counters, shared (for the boot report).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Ends every connection and tells the guest so with a TRANSPORT_RESET event
    /// (as after a snapshot restore). Delivered now if the device is active and the
    /// guest has an event buffer, else as soon as it does.
    pub fn transport_reset(&mut self, interrupt: &Interrupt) {
        self.muxer.reset();
        self.transport_reset_pending = true;
        self.ack_pending_reset = true;
        self.deliver_event(interrupt);
    }

    /// Handles host socket news and delivers what the guest is owed.
    pub fn on_host_events(&mut self, interrupt: &Interrupt) {
        self.muxer.process_host_events();
        self.deliver_rx(interrupt);
    }

    /// Takes every packet the guest queued on TX, then delivers what it is owed.
    pub fn on_tx(&mut self, interrupt: &Interrupt) {
        if interrupt.needs_reset() {
            // The guest broke the queue protocol; nothing moves until it resets.
            return;
        }
        let Some(act) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = act.queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mem = &act.mem;
        let mut used = false;
        loop {
            // Guest kicks are pointless while the device is draining the ring anyway.
            if let Err(e) = queue.disable_notification(mem) {
                interrupt.mark_needs_reset(NAME, &format!("TX notification flags: {e}"));
                return;
            }
            let next = match next_chain(queue, mem) {
                Ok(next) => next,
                Err(e) => {
                    interrupt.mark_needs_reset(NAME, &format!("TX {e}"));
                    return;
                }
            };
            let Some(chain) = next else {
                // Ask for a kick on the next packet; with EVENT_IDX this also tells
                // whether one slipped in meanwhile.
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        interrupt.mark_needs_reset(NAME, &format!("TX notification flags: {e}"));
                        return;
                    }
                }
            };
            let head = chain.head_index();
            match read_tx_chain(mem, chain, &mut self.tx_bytes) {
                Ok(()) => {
                    let parsed = parse_tx_packet(&self.tx_bytes, self.guest_cid);
                    self.muxer.on_guest_packet(&self.tx_bytes, parsed);
                }
                Err(e) => {
                    VsockMetrics::add(&self.metrics.tx_unreadable, 1);
                    tracing::debug!(error = %e, "vsock: unreadable TX chain dropped");
                }
            }
            VsockMetrics::add(&self.metrics.tx_packets, 1);
            if let Err(e) = queue.add_used(mem, head, 0) {
                interrupt.mark_needs_reset(NAME, &format!("TX used ring: {e}"));
                return;
            }
            used = true;
        }
        if used {
            interrupt.signal_used_or_anyway(NAME, queue, mem);
        }
        // Guest packets may have opened credit, answered requests or asked for RSTs.
        self.muxer.process_host_events();
        self.deliver_rx(interrupt);
    }

    /// The guest added event buffers: deliver a pending TRANSPORT_RESET into one, and,
    /// since a refill after a reset is the guest saying it handled it, deliver what
    /// waited for that.
    pub fn on_event_queue(&mut self, interrupt: &Interrupt) {
        self.deliver_event(interrupt);
        self.deliver_rx(interrupt);
    }

    /// Whether the last TRANSPORT_RESET has been handled by the guest (or there is none).
    fn reset_acknowledged(&mut self) -> bool {
        let Some(pending) = self.reset_ack else {
            return true;
        };
        let done = self
            .active
            .as_ref()
            .and_then(|act| {
                act.queues
                    .get(EVENT_QUEUE)
                    .map(|q| pending.done(q, &act.mem))
            })
            .unwrap_or(true);
        if done {
            self.reset_ack = None;
        }
        done
    }

    /// Fills the guest's RX buffers with what it is owed, until either runs out.
    pub fn deliver_rx(&mut self, interrupt: &Interrupt) {
        if interrupt.needs_reset() {
            // The guest broke the queue protocol; nothing moves until it resets.
            return;
        }
        if !self.reset_acknowledged() {
            return;
        }
        let Some(act) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = act.queues.get_mut(RX_QUEUE) else {
            return;
        };
        let mem = &act.mem;
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let next = match next_chain(queue, mem) {
                Ok(next) => next,
                Err(e) => {
                    interrupt.mark_needs_reset(NAME, &format!("RX {e}"));
                    return;
                }
            };
            let Some(chain) = next else {
                // Out of receive buffers with something to deliver: ask for a kick
                // when the guest adds some (with EVENT_IDX, a stale avail_event
                // would otherwise mean no kick at all).
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        interrupt.mark_needs_reset(NAME, &format!("RX notification flags: {e}"));
                        return;
                    }
                }
            };
            let head = chain.head_index();
            let mut writer = match Writer::<()>::new(mem, chain) {
                Ok(w) => w,
                Err(e) => {
                    interrupt.mark_needs_reset(NAME, &format!("RX descriptor chain: {e}"));
                    return;
                }
            };
            let room = writer.available_bytes();
            let mut written = 0u32;
            if room < VSOCK_HDR_SIZE {
                VsockMetrics::add(&self.metrics.rx_buffers_too_small, 1);
            } else {
                let cap = rx_payload_capacity(room);
                let Some(buf) = self.rx_bytes.get_mut(..cap) else {
                    queue.go_to_previous_position();
                    break;
                };
                let Some(hdr) = self.muxer.next_rx(buf) else {
                    // Nothing after all (a host read would block): keep the buffer.
                    queue.go_to_previous_position();
                    break;
                };
                let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
                let data = buf.get(..len).unwrap_or_default();
                match write_rx_packet(&mut writer, &hdr, data) {
                    Ok(n) => written = n,
                    Err(e) => {
                        interrupt.mark_needs_reset(NAME, &format!("RX buffer write: {e}"));
                        return;
                    }
                }
                VsockMetrics::add(&self.metrics.rx_packets, 1);
            }
            if let Err(e) = queue.add_used(mem, head, written) {
                interrupt.mark_needs_reset(NAME, &format!("RX used ring: {e}"));
                return;
            }
            used = true;
        }
        if used {
            interrupt.signal_used_or_anyway(NAME, queue, mem);
        }
    }

    fn deliver_event(&mut self, interrupt: &Interrupt) {
        if interrupt.needs_reset() {
            // The guest broke the queue protocol; nothing moves until it resets.
            return;
        }
        if !self.transport_reset_pending {
            return;
        }
        let Some(act) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = act.queues.get_mut(EVENT_QUEUE) else {
            return;
        };
        let mem = &act.mem;
        let chain = match next_chain(queue, mem) {
            Ok(Some(chain)) => chain,
            // No event buffer yet: ask for a kick when there is one.
            Ok(None) => match queue.enable_notification(mem) {
                Ok(true) => match next_chain(queue, mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => return,
                    Err(e) => {
                        interrupt.mark_needs_reset(NAME, &format!("event {e}"));
                        return;
                    }
                },
                _ => return,
            },
            Err(e) => {
                interrupt.mark_needs_reset(NAME, &format!("event {e}"));
                return;
            }
        };
        let head = chain.head_index();
        let written = match Writer::<()>::new(mem, chain) {
            Ok(mut w) if w.available_bytes() >= VSOCK_EVENT_SIZE => {
                use std::io::Write;
                match w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    Ok(()) => {
                        self.transport_reset_pending = false;
                        VsockMetrics::add(&self.metrics.transport_resets, 1);
                        u32::try_from(VSOCK_EVENT_SIZE).unwrap_or(0)
                    }
                    Err(_) => 0,
                }
            }
            _ => 0,
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            interrupt.mark_needs_reset(NAME, &format!("event used ring: {e}"));
            return;
        }
        if written > 0 && std::mem::take(&mut self.ack_pending_reset) {
            match PendingAck::start(queue, mem) {
                Ok(pending) => self.reset_ack = Some(pending),
                Err(e) => {
                    interrupt.mark_needs_reset(NAME, &e);
                    return;
                }
            }
        }
        interrupt.signal_used_or_anyway(NAME, queue, mem);
    }
}

impl QueueWorker for VsockWorker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn init(&mut self, ops: &mut EventOps) {
        let ev = Events::with_data_raw(self.muxer.epoll_fd(), MUXER_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            tracing::error!(error = ?e, "vsock: cannot watch the host sockets");
        }
    }

    fn activate(&mut self, activation: Activation, interrupt: &Interrupt, _ops: &mut EventOps) {
        self.activate_queues(activation, interrupt);
    }

    fn process_queue(&mut self, index: usize, interrupt: &Interrupt, _ops: &mut EventOps) {
        match index {
            RX_QUEUE => self.deliver_rx(interrupt),
            TX_QUEUE => self.on_tx(interrupt),
            EVENT_QUEUE => self.on_event_queue(interrupt),
            _ => {}
        }
    }

    fn reset(&mut self, _ops: &mut EventOps) {
        self.reset_queues();
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueuePosition::of).collect())
            .unwrap_or_default()
    }

    /// The guest's connections were to a VMM that is gone: a TRANSPORT_RESET event makes
    /// its driver drop them (listening sockets stay, so the agent is reachable again).
    fn after_restore(&mut self, interrupt: &Interrupt, _ops: &mut EventOps) {
        self.transport_reset(interrupt);
    }

    fn process_event(&mut self, events: Events, interrupt: &Interrupt, _ops: &mut EventOps) {
        if events.data() == MUXER_TOKEN {
            self.on_host_events(interrupt);
        }
    }
}

impl VsockWorker {
    /// The driver set DRIVER_OK: take the queues and deliver what is owed.
    pub fn activate_queues(&mut self, activation: Activation, interrupt: &Interrupt) {
        if activation.queues.len() != NUM_QUEUES {
            interrupt.mark_needs_reset(
                NAME,
                &format!(
                    "activated with {} queues, vsock has {NUM_QUEUES}",
                    activation.queues.len()
                ),
            );
            return;
        }
        self.active = Some(activation);
        self.deliver_event(interrupt);
        self.muxer.process_host_events();
        self.deliver_rx(interrupt);
    }

    /// The device was reset: drop the queues and every connection; the listener stays.
    pub fn reset_queues(&mut self) {
        let was_active = self.active.take().is_some();
        self.reset_ack = None;
        self.ack_pending_reset = false;
        self.muxer.reset();
        // The guest driver forgets its sockets on reset; should the device come
        // back, tell it so explicitly.
        self.transport_reset_pending = was_active;
    }
}
