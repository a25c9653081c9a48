//! What wakes the network device thread and what it does then.
//!
//! - TX queue kick: read each frame the guest queued, judge it with the egress filter,
//!   and write what passes to the tap (with a header the device wrote, not the guest's).
//! - RX queue kick: the guest gave receive buffers; if frames were waiting for them,
//!   resume reading the tap.
//! - the tap is readable (edge-triggered): move frames into guest buffers until the tap is
//!   empty or the guest has no buffers left. At most one frame waits in the device; the
//!   rest stay in the tap's own bounded queue, so nothing buffers without bound.

use std::io::{self, Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::frame::ETH_HLEN;
use super::metrics::NetMetrics;
use super::offload::{tap_header, TxOffloads};
use super::policy::{Decision, DenyReason, EgressFilter};
use super::tap::FrameBackend;
use super::{
    MAX_BUFFER_SIZE, NUM_QUEUES, QUEUE_MAX_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_OFF_NUM_BUFFERS, VNET_HDR_SIZE,
};
use crate::virtio::worker::{QueueWorker, WORKER_TOKEN_BASE};
use crate::virtio::{
    feature, next_chain, Activation, DeviceEvent, GuestMemoryMmap, Interrupt, QueuePosition,
};

/// Epoll token of the tap fd in the device loop.
pub const TAP_TOKEN: u32 = WORKER_TOKEN_BASE;

const NAME: &str = "virtio-net";

/// The queues and memory while the driver is live.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    mergeable: bool,
    offloads: TxOffloads,
}

/// What became of the frame waiting for guest buffers.
enum Delivery {
    Delivered,
    /// The guest's buffers ran out at available-ring index `seen`; none were consumed.
    NoBuffers {
        seen: u16,
    },
    Dropped,
}

/// Attempts per wake-up to deliver a frame after more buffers showed up while asking for
/// a kick. Bounds the loop when a guest keeps offering too little room (or a broken ring).
const RX_RETRIES: u32 = 4;

/// Owns the tap, the egress filter and, between activation and reset, the queues.
pub struct NetWorker<B> {
    backend: B,
    filter: EgressFilter,
    metrics: Arc<NetMetrics>,
    active: Option<Active>,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    /// Length (virtio header included) of the frame in `rx_buf` waiting for buffers.
    rx_pending: Option<usize>,
    /// The tap may hold frames we stopped reading for want of guest buffers.
    rx_deferred: bool,
}

impl<B> std::fmt::Debug for NetWorker<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("active", &self.active.is_some())
            .field("rx_pending", &self.rx_pending)
            .field("rx_deferred", &self.rx_deferred)
            .finish_non_exhaustive()
    }
}

fn count(counter: &std::sync::atomic::AtomicU64) {
    NetMetrics::add(counter, 1);
}

impl<B: FrameBackend> NetWorker<B> {
    pub(crate) fn new(backend: B, filter: EgressFilter, metrics: Arc<NetMetrics>) -> Self {
        Self {
            backend,
            filter,
            metrics,
            active: None,
            tx_buf: vec![0u8; MAX_BUFFER_SIZE],
            rx_buf: vec![0u8; MAX_BUFFER_SIZE],
            rx_pending: None,
            rx_deferred: false,
        }
    }

    /// The device's counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<NetMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The egress filter, with its per-destination drop counts.
    #[must_use]
    pub fn filter(&self) -> &EgressFilter {
        &self.filter
    }

    /// The host end.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The driver set DRIVER_OK: take the queues, then serve what is waiting.
    pub fn attach(&mut self, activation: Activation, interrupt: &Interrupt) {
        let Activation {
            mem,
            queues,
            acked_features,
        } = activation;
        if queues.len() != NUM_QUEUES {
            interrupt.mark_needs_reset(
                NAME,
                &format!(
                    "activated with {} queues, virtio-net has {NUM_QUEUES}",
                    queues.len()
                ),
            );
            return;
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return;
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            mergeable: acked_features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            offloads: TxOffloads {
                csum: acked_features & feature(VIRTIO_NET_F_CSUM) != 0,
                tso4: acked_features & feature(VIRTIO_NET_F_HOST_TSO4) != 0,
                tso6: acked_features & feature(VIRTIO_NET_F_HOST_TSO6) != 0,
            },
        });
        // Frames may have arrived on the tap while the device was down.
        self.rx_deferred = true;
        self.process_tx(interrupt);
        self.process_rx(interrupt);
    }

    /// The device was reset: drop the queues and any frame waiting for them.
    pub fn detach(&mut self) {
        self.active = None;
        self.rx_pending = None;
        self.rx_deferred = false;
    }

    fn needs_reset(&mut self, interrupt: &Interrupt, reason: &str) {
        count(&self.metrics.needs_reset);
        interrupt.mark_needs_reset(NAME, reason);
    }

    /// Judges and sends every frame the guest queued, then signals the guest if it asked.
    pub fn process_tx(&mut self, interrupt: &Interrupt) {
        match self.drain_tx(interrupt) {
            Ok(true) => {
                if let Some(act) = self.active.as_mut() {
                    interrupt.signal_used_or_anyway(NAME, &mut act.tx, &act.mem);
                }
            }
            Ok(false) => {}
            Err(reason) => self.needs_reset(interrupt, &reason),
        }
    }

    /// Returns whether any buffer was used.
    fn drain_tx(&mut self, interrupt: &Interrupt) -> Result<bool, String> {
        let mut used = false;
        loop {
            let Some(act) = self.active.as_mut() else {
                return Ok(used);
            };
            act.tx
                .disable_notification(&act.mem)
                .map_err(|e| format!("TX: cannot disable notifications: {e}"))?;
            while let Some(chain) =
                next_chain(&mut act.tx, &act.mem).map_err(|e| format!("TX {e}"))?
            {
                let head = chain.head_index();
                let mut reader = Reader::<()>::new(&act.mem, chain)
                    .map_err(|e| format!("TX descriptor chain {head}: {e}"))?;
                let len = reader.available_bytes();
                if (VNET_HDR_SIZE + ETH_HLEN..=MAX_BUFFER_SIZE).contains(&len) {
                    let buf = self.tx_buf.get_mut(..len).unwrap_or_default();
                    reader
                        .read_exact(buf)
                        .map_err(|e| format!("TX descriptor chain {head}: {e}"))?;
                    Self::send(
                        buf,
                        act.offloads,
                        &mut self.filter,
                        &mut self.backend,
                        &self.metrics,
                        interrupt,
                    );
                } else {
                    count(&self.metrics.tx_bad_length);
                    tracing::debug!(device = NAME, len, "TX chain of impossible length dropped");
                }
                act.tx
                    .add_used(&act.mem, head, 0)
                    .map_err(|e| format!("TX used ring: {e}"))?;
                used = true;
            }
            let more = act
                .tx
                .enable_notification(&act.mem)
                .map_err(|e| format!("TX: cannot enable notifications: {e}"))?;
            if !more {
                return Ok(used);
            }
        }
    }

    /// Judges one frame (virtio header first) and writes it to the tap if it passes.
    fn send(
        buf: &mut [u8],
        offloads: TxOffloads,
        filter: &mut EgressFilter,
        backend: &mut B,
        metrics: &NetMetrics,
        interrupt: &Interrupt,
    ) {
        let (hdr, frame) = buf.split_at_mut(VNET_HDR_SIZE);
        match filter.check(frame) {
            Decision::Pass => {
                // The tap gets the device's own header, built from the parsed frame.
                match tap_header(hdr, frame, offloads) {
                    Ok(ours) => hdr.copy_from_slice(&ours),
                    Err(e) => {
                        count(&metrics.tx_bad_offload);
                        tracing::debug!(device = NAME, error = %e, "TX offload request refused");
                        return;
                    }
                }
                let frame_len = u64::try_from(frame.len()).unwrap_or(u64::MAX);
                match backend.write_frame(buf) {
                    Ok(_) => {
                        count(&metrics.tx_frames);
                        NetMetrics::add(&metrics.tx_bytes, frame_len);
                    }
                    Err(e) => {
                        count(&metrics.tx_tap_errors);
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::debug!(device = NAME, error = %e, "tap write failed");
                        }
                    }
                }
            }
            Decision::Drop {
                reason,
                destination,
                first,
            } => {
                count(&metrics.tx_denied);
                if matches!(reason, DenyReason::Malformed(_)) {
                    count(&metrics.tx_malformed);
                }
                if first {
                    tracing::warn!(device = NAME, %destination, %reason, "egress denied (first drop to this destination)");
                    interrupt.report(&DeviceEvent::EgressDenied {
                        device: NAME,
                        destination: destination.to_string(),
                        reason: reason.to_string(),
                    });
                }
            }
        }
    }

    /// Moves frames from the tap into the guest's buffers while both have some.
    pub fn process_rx(&mut self, interrupt: &Interrupt) {
        if self.active.is_none() {
            return;
        }
        let mut used = false;
        let mut retries = 0u32;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= VNET_HDR_SIZE => n,
                    Ok(_) => {
                        count(&self.metrics.rx_tap_errors);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_deferred = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        count(&self.metrics.rx_tap_errors);
                        tracing::warn!(device = NAME, error = %e, "tap read failed");
                        // Try again on the next wake-up rather than spin on an error.
                        self.rx_deferred = true;
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            match self.deliver(len) {
                Ok(Delivery::Delivered) => {
                    self.rx_pending = None;
                    used = true;
                }
                Ok(Delivery::Dropped) => self.rx_pending = None,
                Ok(Delivery::NoBuffers { seen }) => {
                    self.rx_deferred = true;
                    retries = retries.saturating_add(1);
                    match self.rx_ask_for_kick(seen) {
                        Ok(true) if retries < RX_RETRIES => continue,
                        Ok(_) => break,
                        Err(reason) => return self.needs_reset(interrupt, &reason),
                    }
                }
                Err(reason) => return self.needs_reset(interrupt, &reason),
            }
        }
        if used {
            if let Some(act) = self.active.as_mut() {
                interrupt.signal_used_or_anyway(NAME, &mut act.rx, &act.mem);
            }
        }
    }

    /// Asks the guest to kick RX when it adds buffers past ring index `seen` (where they
    /// ran out); true if some arrived meanwhile. With EVENT_IDX the kick threshold is the
    /// ring position, so it is set at `seen`, not at the unconsumed buffers before it.
    fn rx_ask_for_kick(&mut self, seen: u16) -> Result<bool, String> {
        let Some(act) = self.active.as_mut() else {
            return Ok(false);
        };
        let resume = act.rx.next_avail();
        act.rx.set_next_avail(seen);
        let more = act.rx.enable_notification(&act.mem);
        act.rx.set_next_avail(resume);
        more.map_err(|e| format!("RX: cannot enable notifications: {e}"))
    }

    /// Writes the frame in `rx_buf[..len]` into one guest buffer, or several when
    /// MRG_RXBUF was negotiated, with a header of the device's own.
    fn deliver(&mut self, len: usize) -> Result<Delivery, String> {
        let Some(act) = self.active.as_mut() else {
            return Ok(Delivery::Dropped);
        };
        let start = act.rx.next_avail();
        let mut writers: Vec<(u16, Writer<'_, ()>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            if !act.mergeable && !writers.is_empty() {
                break;
            }
            if writers.len() >= usize::from(QUEUE_MAX_SIZE) {
                break;
            }
            let Some(chain) = next_chain(&mut act.rx, &act.mem).map_err(|e| format!("RX {e}"))?
            else {
                let seen = act.rx.next_avail();
                act.rx.set_next_avail(start);
                return Ok(Delivery::NoBuffers { seen });
            };
            let head = chain.head_index();
            let writer = Writer::<()>::new(&act.mem, chain)
                .map_err(|e| format!("RX descriptor chain {head}: {e}"))?;
            room = room.saturating_add(writer.available_bytes());
            writers.push((head, writer));
        }
        if room < len {
            // Too big for one buffer without MRG_RXBUF, or for the whole queue: drop it
            // and keep the buffers for the next frame.
            act.rx.set_next_avail(start);
            count(&self.metrics.rx_too_big);
            return Ok(Delivery::Dropped);
        }
        let num_buffers = u16::try_from(writers.len()).unwrap_or(u16::MAX);
        let frame = self.rx_buf.get_mut(..len).unwrap_or_default();
        let (hdr, _) = frame.split_at_mut(VNET_HDR_SIZE);
        hdr.fill(0);
        if let Some(field) = hdr.get_mut(VNET_HDR_OFF_NUM_BUFFERS..VNET_HDR_OFF_NUM_BUFFERS + 2) {
            field.copy_from_slice(&num_buffers.to_le_bytes());
        }
        let mut rest: &[u8] = frame;
        let mut used = Vec::with_capacity(writers.len());
        for (head, mut writer) in writers {
            let (now, later) = rest.split_at(rest.len().min(writer.available_bytes()));
            writer
                .write_all(now)
                .map_err(|e| format!("RX descriptor chain {head}: {e}"))?;
            used.push((head, u32::try_from(now.len()).unwrap_or(u32::MAX)));
            rest = later;
        }
        for (head, written) in used {
            act.rx
                .add_used(&act.mem, head, written)
                .map_err(|e| format!("RX used ring: {e}"))?;
        }
        count(&self.metrics.rx_frames);
        NetMetrics::add(
            &self.metrics.rx_bytes,
            u64::try_from(len.saturating_sub(VNET_HDR_SIZE)).unwrap_or(u64::MAX),
        );
        Ok(Delivery::Delivered)
    }

    pub(crate) fn on_rx_kick(&mut self, interrupt: &Interrupt) {
        if self.rx_deferred || self.rx_pending.is_some() {
            self.process_rx(interrupt);
        }
    }
}

impl<B: FrameBackend + 'static> QueueWorker for NetWorker<B> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data_raw(
            self.backend.as_raw_fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(events) {
            tracing::error!(device = NAME, error = ?e, "cannot watch the tap");
        }
    }

    fn activate(&mut self, activation: Activation, interrupt: &Interrupt, _ops: &mut EventOps) {
        self.attach(activation, interrupt);
    }

    fn process_queue(&mut self, index: usize, interrupt: &Interrupt, _ops: &mut EventOps) {
        match index {
            RX_QUEUE => self.on_rx_kick(interrupt),
            TX_QUEUE => self.process_tx(interrupt),
            _ => {}
        }
    }

    fn reset(&mut self, _ops: &mut EventOps) {
        self.detach();
    }

    /// A frame read from the tap and waiting for guest buffers is not part of it: it is
    /// lost with the VMM, as a frame on a wire can be.
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .iter()
            .flat_map(|a| [QueuePosition::of(&a.rx), QueuePosition::of(&a.tx)])
            .collect()
    }

    fn process_event(&mut self, events: Events, interrupt: &Interrupt, _ops: &mut EventOps) {
        if events.data() != TAP_TOKEN {
            return;
        }
        if interrupt.needs_reset() {
            // Edge-triggered: remember the tap has news for when the device is back.
            self.rx_deferred = true;
            return;
        }
        if self.active.is_some() {
            self.process_rx(interrupt);
        } else {
            self.rx_deferred = true;
        }
    }
}
