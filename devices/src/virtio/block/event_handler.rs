//! The block worker: on the device thread, it drains the request queue, parses each chain
//! and executes the valid ones against the backing file.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::metrics::BlockMetrics;
use super::request::{self, DiskLimits, ParseError, Request, RequestKind};
use super::verity::VerifyMode;
use super::*;
use crate::virtio::worker::QueueWorker;
use crate::virtio::{Activation, GuestMemoryMmap, Interrupt, QueuePosition};

const NAME: &str = "virtio-blk";

/// Longest chain collected before it is called unterminated. A well-formed request has
/// at most `SEG_MAX + 2` descriptors and the queue is not larger than this.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// The queue and memory while the driver is live.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// Owns the backing file and, between activation and reset, the request queue.
#[derive(Debug)]
pub struct BlockWorker {
    file: File,
    limits: DiskLimits,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    metrics: Arc<BlockMetrics>,
    active: Option<Active>,
    chain: Vec<Descriptor>,
    refusal_logged: bool,
    /// Set for a read-only disk the plan pins: its reads are verified (`verity.rs`).
    verity: Option<super::verity::VerifiedDisk>,
    /// The image holds a read lease (`lease.rs`).
    leased: bool,
}

impl BlockWorker {
    pub(crate) fn new(
        file: File,
        limits: DiskLimits,
        id: [u8; VIRTIO_BLK_ID_BYTES],
        metrics: Arc<BlockMetrics>,
    ) -> Self {
        Self {
            file,
            limits,
            id,
            metrics,
            active: None,
            chain: Vec::with_capacity(MAX_CHAIN),
            refusal_logged: false,
            verity: None,
            leased: false,
        }
    }

    /// Verifies every read of this (read-only) disk against a dm-verity tree.
    ///
    /// A read-only image that can be leased ([`super::lease`]) is verified once
    /// per block while the lease holds; otherwise every read hashes every block.
    /// Returns which, and why not the first.
    pub fn set_verity(&mut self, mut disk: super::verity::VerifiedDisk) -> VerifyMode {
        let mode = if self.limits.read_only {
            match super::lease::take_read_lease(&self.file) {
                Ok(revoked) => {
                    disk.verify_once_until(revoked);
                    self.leased = true;
                    VerifyMode::OnceWhileLeased
                }
                Err(e) => VerifyMode::EveryRead(e.to_string()),
            }
        } else {
            VerifyMode::EveryRead("the disk is writable".into())
        };
        self.verity = Some(disk);
        mode
    }

    /// After a fork: sends the breaks of this disk's lease, if it has one, to
    /// this process. If that fails, blocks are no longer trusted once verified.
    pub fn claim_lease_signals(&self) {
        if !self.leased {
            return;
        }
        if let Err(e) = super::lease::signal_this_process(&self.file) {
            tracing::warn!("virtio-blk: lease breaks cannot reach this process ({e}); every read is hashed from now on");
            super::lease::note_break();
        }
    }

    #[cfg(test)]
    pub(crate) fn set_limits_for_test(&mut self, seg_max: u32, size_max: u32) {
        self.limits.seg_max = seg_max;
        self.limits.size_max = size_max;
    }

    /// The device's counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Takes the queue at DRIVER_OK.
    pub fn attach(&mut self, activation: Activation, interrupt: &Interrupt) {
        let Activation { mem, queues, .. } = activation;
        let mut queues = queues.into_iter();
        match (queues.next(), queues.next()) {
            (Some(queue), None) => self.active = Some(Active { mem, queue }),
            _ => interrupt.mark_needs_reset(NAME, "activated without exactly one queue"),
        }
    }

    /// Gives the queue back at reset.
    pub fn detach(&mut self) {
        self.active = None;
        self.refusal_logged = false;
    }

    /// Serves every request available in the queue, then signals the guest if it asked.
    pub fn process_requests(&mut self, interrupt: &Interrupt) {
        if let Err(reason) = self.drain_queue() {
            BlockMetrics::add(&self.metrics.needs_reset, 1);
            interrupt.mark_needs_reset(NAME, &reason);
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Err(e) = interrupt.signal_used(NAME, &mut active.queue, &active.mem) {
            interrupt.mark_needs_reset(NAME, &format!("used event unreadable: {e}"));
        }
    }

    fn drain_queue(&mut self) -> Result<(), String> {
        loop {
            {
                let Some(active) = self.active.as_mut() else {
                    return Ok(());
                };
                active
                    .queue
                    .disable_notification(&active.mem)
                    .map_err(|e| format!("cannot disable notifications: {e}"))?;
            }
            while let Some((head, truncated)) = self.pop_into_chain()? {
                self.serve(head, truncated)?;
            }
            let Some(active) = self.active.as_mut() else {
                return Ok(());
            };
            let more = active
                .queue
                .enable_notification(&active.mem)
                .map_err(|e| format!("cannot enable notifications: {e}"))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Pops the next chain into `self.chain`; returns its head and whether it was cut short.
    fn pop_into_chain(&mut self) -> Result<Option<(u16, bool)>, String> {
        let Some(active) = self.active.as_mut() else {
            return Ok(None);
        };
        let mut iter = active
            .queue
            .iter(&active.mem)
            .map_err(|e| format!("available ring: {e}"))?;
        let Some(chain) = iter.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        self.chain.clear();
        let mut ends = true;
        for desc in chain {
            if self.chain.len() >= MAX_CHAIN {
                ends = false;
                break;
            }
            ends = !desc.has_next();
            self.chain.push(desc);
        }
        Ok(Some((head, !ends)))
    }

    fn serve(&mut self, head: u16, truncated: bool) -> Result<(), String> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let (status_addr, status, used_len) = match request::parse(
            head,
            &self.chain,
            truncated,
            &mem,
            &self.limits,
        ) {
            Ok(request) => {
                let status_addr = request.status;
                match self.execute(&request, &mem) {
                    Ok(written) => (status_addr, VIRTIO_BLK_S_OK, written.saturating_add(1)),
                    Err(e) => {
                        BlockMetrics::add(&self.metrics.io_errors, 1);
                        tracing::warn!(device = NAME, error = %e, kind = ?request.kind, "host I/O failed");
                        (status_addr, VIRTIO_BLK_S_IOERR, 1)
                    }
                }
            }
            Err(ParseError::Request { status, error }) => {
                BlockMetrics::add(&self.metrics.refused, 1);
                if self.refusal_logged {
                    tracing::debug!(device = NAME, reason = %error, "request refused");
                } else {
                    self.refusal_logged = true;
                    tracing::warn!(device = NAME, reason = %error, "request refused (further refusals at debug level)");
                }
                (status, error.status(), 1)
            }
            Err(ParseError::Chain(e)) => return Err(e.to_string()),
        };
        mem.write_obj(status, status_addr)
            .map_err(|e| format!("status byte at {:#x}: {e}", status_addr.0))?;
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        active
            .queue
            .add_used(&mem, head, used_len)
            .map_err(|e| format!("used ring: {e}"))
    }

    /// Does a validated request. Returns the bytes written into guest buffers.
    fn execute(&mut self, request: &Request, mem: &GuestMemoryMmap) -> std::io::Result<u32> {
        match request.kind {
            RequestKind::Read { offset, len } => {
                if let Some(verity) = self.verity.as_mut() {
                    verity.read_into_guest(&self.file, offset, &request.segments, mem)?;
                } else {
                    self.file.seek(SeekFrom::Start(offset))?;
                    for &(addr, seg_len) in &request.segments {
                        mem.read_exact_volatile_from(addr, &mut self.file, usize_of(seg_len))
                            .map_err(std::io::Error::other)?;
                    }
                }
                BlockMetrics::add(&self.metrics.reads, 1);
                BlockMetrics::add(&self.metrics.read_bytes, u64::from(len));
                Ok(len)
            }
            RequestKind::Write { offset, len } => {
                self.file.seek(SeekFrom::Start(offset))?;
                for &(addr, seg_len) in &request.segments {
                    mem.write_all_volatile_to(addr, &mut self.file, usize_of(seg_len))
                        .map_err(std::io::Error::other)?;
                }
                BlockMetrics::add(&self.metrics.writes, 1);
                BlockMetrics::add(&self.metrics.write_bytes, u64::from(len));
                Ok(0)
            }
            RequestKind::Flush => {
                self.file.sync_data()?;
                BlockMetrics::add(&self.metrics.flushes, 1);
                Ok(0)
            }
            RequestKind::GetId => {
                let written = write_id(&self.id, &request.segments, mem)?;
                BlockMetrics::add(&self.metrics.get_ids, 1);
                Ok(written)
            }
        }
    }
}

fn usize_of(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// Copies the id into the guest's buffers, as much as fits.
fn write_id(
    id: &[u8; VIRTIO_BLK_ID_BYTES],
    segments: &[(GuestAddress, u32)],
    mem: &GuestMemoryMmap,
) -> std::io::Result<u32> {
    let mut rest: &[u8] = id;
    let mut written = 0u32;
    for &(addr, len) in segments {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(rest.len().min(usize_of(len)));
        mem.write_slice(now, addr).map_err(std::io::Error::other)?;
        written = written.saturating_add(u32::try_from(now.len()).unwrap_or(u32::MAX));
        rest = later;
    }
    Ok(written)
}

impl QueueWorker for BlockWorker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn activate(&mut self, activation: Activation, interrupt: &Interrupt, _ops: &mut EventOps) {
        self.attach(activation, interrupt);
    }

    fn process_queue(&mut self, _index: usize, interrupt: &Interrupt, _ops: &mut EventOps) {
        self.process_requests(interrupt);
    }

    fn reset(&mut self, _ops: &mut EventOps) {
        self.detach();
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .iter()
            .map(|a| QueuePosition::of(&a.queue))
            .collect()
    }
}
