//! virtio devices and the virtio-mmio transport they sit behind.
//!
//! A virtio device here is split in two halves that live on different threads:
//!
//! - the **front** ([`VirtioDevice`]) is what the transport asks on the vCPU thread while the
//!   guest programs registers: device type, offered features, queue maximum sizes, and the
//!   device-specific config space. It never touches a queue or a backend, so a register
//!   access never waits on device I/O;
//! - the **worker** ([`worker::QueueWorker`]) owns the backend (a file, a socket) and, once
//!   the driver sets DRIVER_OK, the queues. It runs on its own thread, created before the
//!   guest runs (so it can install its own seccomp filter), inside an `event-manager` loop
//!   ([`worker::WorkerLoop`]). Queue notifications reach it as ioeventfds (the VMM registers
//!   each queue's [`EventFd`] with `KVM_IOEVENTFD` on the QueueNotify register), and its
//!   interrupts leave as an irqfd ([`Interrupt`]).
//!
//! The transport hands the queues to the worker at activation through a
//! [`worker::WorkerHandle`] (a channel plus a wake-up eventfd) and takes them back at reset.
//!
//! Wiring one device, as the VMM does it:
//!
//! ```text
//! let interrupt = Interrupt::new(irqfd)?;                // irqfd: registered with KVM_IRQFD
//! let (handle, inbox) = worker::channel()?;
//! let transport = MmioTransport::new(Box::new(front), handle, interrupt.clone(), mem)?;
//! let notifiers = transport.queue_notifiers()?;          // KVM_IOEVENTFD each, datamatch = index
//! worker::spawn("blk0", WorkerLoop::new(worker, inbox, notifiers, interrupt), install_seccomp)?;
//! ```

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Device status bit: the guest noticed the device (`VIRTIO_CONFIG_S_ACKNOWLEDGE`,
/// linux/virtio_config.h).
pub const DEVICE_STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status bit: the guest has a driver for it (`VIRTIO_CONFIG_S_DRIVER`).
pub const DEVICE_STATUS_DRIVER: u32 = 2;
/// Device status bit: the driver is ready to drive the device (`VIRTIO_CONFIG_S_DRIVER_OK`).
pub const DEVICE_STATUS_DRIVER_OK: u32 = 4;
/// Device status bit: feature negotiation is complete (`VIRTIO_CONFIG_S_FEATURES_OK`).
pub const DEVICE_STATUS_FEATURES_OK: u32 = 8;
/// Device status bit: the device hit an error it cannot recover from without a reset
/// (`VIRTIO_CONFIG_S_NEEDS_RESET`).
pub const DEVICE_STATUS_NEEDS_RESET: u32 = 64;
/// Device status bit: the driver gave up on the device (`VIRTIO_CONFIG_S_FAILED`).
pub const DEVICE_STATUS_FAILED: u32 = 128;

/// Feature bit: the device speaks virtio 1.x, not legacy (`VIRTIO_F_VERSION_1`,
/// linux/virtio_config.h).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: used/avail event index suppression (`VIRTIO_RING_F_EVENT_IDX`,
/// linux/virtio_ring.h).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device type of a network card (`VIRTIO_ID_NET`, linux/virtio_ids.h).
pub const VIRTIO_ID_NET: u32 = 1;
/// Device type of a block device (`VIRTIO_ID_BLOCK`, linux/virtio_ids.h).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Device type of a vsock device (`VIRTIO_ID_VSOCK`, linux/virtio_ids.h).
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// InterruptStatus bit: the device used a buffer in some queue (`VIRTIO_MMIO_INT_VRING`,
/// linux/virtio_mmio.h).
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or status) of the device changed
/// (`VIRTIO_MMIO_INT_CONFIG`, linux/virtio_mmio.h).
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// The feature bit `bit` as a mask.
#[must_use]
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// The next available descriptor chain of `queue`, or why its available ring cannot be
/// trusted. Devices use this instead of `Queue::pop_descriptor_chain`, which logs and
/// returns `None` when the driver's available index is more than the queue size ahead of
/// the device: the "anything new?" check that follows (`enable_notification`) then keeps
/// answering yes and the device thread spins forever on a hostile guest's ring (found by
/// the hostile e2e suite on vsock). On `Err` the caller marks the device NEEDS_RESET.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, String> {
    let mut iter = queue
        .iter(mem)
        .map_err(|e| format!("available ring: {e}"))?;
    Ok(iter.next())
}

/// Reads `data.len()` bytes of a device's config space `space` at `offset`; bytes past
/// its end read as zero. Every device's [`VirtioDevice::read_config`] is this.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start
            .checked_add(i)
            .and_then(|at| space.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// What a virtio device exposes to its transport, on the vCPU thread.
///
/// Implementations are small and never block: everything that does I/O lives in the
/// device's [`worker::QueueWorker`] on its own thread.
pub trait VirtioDevice: Send {
    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The features the device offers. The transport adds nothing: a device that works with
    /// a modern driver includes [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;

    /// The maximum size of each queue; its length is the number of queues. Each size must be
    /// a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device-specific config space at `offset`. Bytes past
    /// the end of the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space. Devices whose config space is read-only
    /// return an error, which the transport logs; the guest sees nothing change.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigWriteError> {
        let _ = data;
        Err(ConfigWriteError::ReadOnly { offset })
    }

    /// A short name for logs and audit events ("virtio-blk").
    fn name(&self) -> &'static str;
}

/// Why a write to a device's config space was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigWriteError {
    /// The config space is read-only.
    #[error("config space is read-only (write at offset {offset:#x})")]
    ReadOnly {
        /// Offset of the refused write inside the config space.
        offset: u64,
    },
}

/// What the worker receives when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues, in order, already validated against `mem` by the transport, with
    /// EVENT_IDX set as negotiated.
    pub queues: Vec<Queue>,
    /// The features the driver accepted (a subset of the offered ones).
    pub acked_features: u64,
}

/// Where a queue stands: the next available-ring entry the device will take, and the
/// next used-ring entry it will fill. With the guest's memory and the ring addresses,
/// that is all of a split queue's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePosition {
    /// `next_avail`.
    pub next_avail: u16,
    /// `next_used`.
    pub next_used: u16,
}

impl QueuePosition {
    /// `queue`'s position.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// Something a device noticed that the audit log should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The device stopped processing because the guest broke the protocol; it stays
    /// stopped until the driver resets it.
    NeedsReset {
        /// Device name ("virtio-blk").
        device: &'static str,
        /// Why, naming the offending value.
        reason: String,
    },
    /// The network device dropped a frame the egress policy does not allow, the first
    /// time for this destination (later drops to it are only counted).
    EgressDenied {
        /// Device name ("virtio-net").
        device: &'static str,
        /// Where the frame was going ("192.0.2.7:443/tcp").
        destination: String,
        /// Why it was dropped.
        reason: String,
    },
}

/// Where [`DeviceEvent`]s go (the audit log, once it exists). Called on whatever thread
/// noticed the event; must not block.
pub type DeviceEventHook = Arc<dyn Fn(&DeviceEvent) + Send + Sync>;

/// The device's interrupt line: an irqfd plus the InterruptStatus bits and the
/// NEEDS_RESET flag that the transport reports to the guest.
///
/// Cloned into the transport (vCPU thread) and the worker (device thread); all state is
/// atomic.
#[derive(Clone)]
pub struct Interrupt {
    irqfd: Arc<EventFd>,
    status: Arc<AtomicU32>,
    needs_reset: Arc<AtomicBool>,
    hook: Option<DeviceEventHook>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// An interrupt line that signals `irqfd` (registered by the VMM with `KVM_IRQFD`).
    #[must_use]
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd: Arc::new(irqfd),
            status: Arc::new(AtomicU32::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            hook: None,
        }
    }

    /// Sends [`DeviceEvent`]s to `hook` as well as to the log.
    #[must_use]
    pub fn with_event_hook(mut self, hook: DeviceEventHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver that `queue` has used buffers, unless it asked not to be told
    /// (`VRING_AVAIL_F_NO_INTERRUPT`, or the used event with `VIRTIO_F_EVENT_IDX`). A
    /// failed irqfd write is logged for `device`. Errs when the driver's request cannot
    /// be read from guest memory: the caller chooses (interrupt anyway, or NEEDS_RESET).
    pub fn signal_used(
        &self,
        device: &'static str,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(), virtio_queue::Error> {
        if queue.needs_notification(mem)? {
            self.signal_used_or_log(device);
        }
        Ok(())
    }

    /// [`Self::signal_used`], interrupting when the driver's request cannot be read: a
    /// spurious interrupt is the safe side.
    pub fn signal_used_or_anyway(
        &self,
        device: &'static str,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) {
        if self.signal_used(device, queue, mem).is_err() {
            self.signal_used_or_log(device);
        }
    }

    fn signal_used_or_log(&self, device: &'static str) {
        if let Err(e) = self.signal_used_queue() {
            tracing::warn!(device, error = %e, "cannot signal used buffers");
        }
    }

    /// Tells the driver that the config space (or the device status) changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The InterruptStatus register.
    #[must_use]
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// A restored device's InterruptStatus: the bits set again, and the interrupt sent
    /// again (a virtio driver takes a spurious one in its stride; a lost one would stall
    /// it).
    pub fn restore_status(&self, bits: u32) -> std::io::Result<()> {
        if bits == 0 {
            return Ok(());
        }
        self.raise(bits)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Marks the device NEEDS_RESET because the guest broke the protocol. Logs the reason
    /// and reports a [`DeviceEvent`] the first time only (until [`Interrupt::clear`]), so a
    /// guest cannot flood the log, then raises a config-change interrupt as the spec asks.
    pub fn mark_needs_reset(&self, device: &'static str, reason: &str) {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(device, reason, "guest error: device needs reset");
        if let Some(hook) = &self.hook {
            hook(&DeviceEvent::NeedsReset {
                device,
                reason: reason.to_owned(),
            });
        }
        if let Err(e) = self.signal_config_change() {
            tracing::warn!(device, error = %e, "cannot signal the irqfd");
        }
    }

    /// Reports an event other than NEEDS_RESET (which [`Interrupt::mark_needs_reset`]
    /// reports itself) to the hook, if any. Must not block; callers rate-limit.
    pub fn report(&self, event: &DeviceEvent) {
        if let Some(hook) = &self.hook {
            hook(event);
        }
    }

    /// Whether the device is waiting for a reset.
    #[must_use]
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Device reset: no pending interrupt, no NEEDS_RESET.
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn needs_reset_is_reported_once_until_cleared() {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let irq = Interrupt::new(irqfd.try_clone().unwrap())
            .with_event_hook(Arc::new(move |e| sink.lock().unwrap().push(e.clone())));
        irq.mark_needs_reset("test", "first");
        irq.mark_needs_reset("test", "second");
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irqfd.read().unwrap(), 1);
        assert_eq!(seen.lock().unwrap().len(), 1);
        irq.clear();
        assert!(!irq.needs_reset());
        assert_eq!(irq.status(), 0);
        irq.mark_needs_reset("test", "third");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn acknowledge_clears_only_the_given_bits() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue().unwrap();
        irq.signal_config_change().unwrap();
        irq.acknowledge(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }
}
