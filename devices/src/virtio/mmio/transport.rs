//! The register state machine of one virtio-mmio slot.

use std::io;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::worker::WorkerHandle;
use crate::virtio::{
    feature, Activation, GuestMemoryMmap, Interrupt, QueuePosition, VirtioDevice,
    DEVICE_STATUS_ACKNOWLEDGE, DEVICE_STATUS_DRIVER, DEVICE_STATUS_DRIVER_OK, DEVICE_STATUS_FAILED,
    DEVICE_STATUS_FEATURES_OK, DEVICE_STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// How long a reset waits for the device thread to give the queues back. A worker stuck
/// longer (in a slow fdatasync) is asked again on the guest's next Status read.
const RESET_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device declared a queue size the virtio spec does not allow.
    #[error("{device}: queue {index} maximum size {size} is not a power of two in 1..=32768")]
    InvalidQueueMax {
        /// Device name.
        device: &'static str,
        /// Queue index.
        index: usize,
        /// The declared size.
        size: u16,
    },
    /// The device declared more queues than the transport can address.
    #[error("{device}: {count} queues is more than a transport supports")]
    TooManyQueues {
        /// Device name.
        device: &'static str,
        /// Number of queues declared.
        count: usize,
    },
    /// The VMM passed a notifier count different from the queue count.
    #[error("{device}: {queues} queues but {notifiers} queue notifiers")]
    NotifierCount {
        /// Device name.
        device: &'static str,
        /// Queues the device has.
        queues: usize,
        /// Notifiers passed.
        notifiers: usize,
    },
    /// An eventfd could not be created or cloned.
    #[error("queue notifier eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// A transport's registers and queues, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// The device's virtio type (a restore into another kind of device is refused).
    pub device_type: u32,
    /// Device status, as the driver set it.
    pub status: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device had marked itself NEEDS_RESET.
    pub needs_reset: bool,
    /// Each queue's configuration and, while the driver is live, its position.
    pub queues: Vec<QueueState>,
}

/// One queue, as a snapshot keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub driver: u64,
    /// Used (device) ring address.
    pub device: u64,
    /// QueueReady.
    pub ready: bool,
    /// Where the device stands in it; `Some` exactly when the device was live.
    pub position: Option<QueuePosition>,
}

/// What the driver wrote about one queue, before the queue is built at QueueReady.
#[derive(Debug, Default, Clone, Copy)]
struct QueueConfig {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    ready: bool,
}

/// A device's queue sizes must be powers of two in 1..=32768, and few enough to index.
fn check_queue_sizes(device: &dyn VirtioDevice) -> Result<(), TransportError> {
    let name = device.name();
    let queue_max = device.queue_max_sizes();
    if u32::try_from(queue_max.len()).is_err() || queue_max.len() >= usize::from(u16::MAX) {
        return Err(TransportError::TooManyQueues {
            device: name,
            count: queue_max.len(),
        });
    }
    for (index, &size) in queue_max.iter().enumerate() {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(TransportError::InvalidQueueMax {
                device: name,
                index,
                size,
            });
        }
    }
    Ok(())
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & 0xffff_ffff_0000_0000) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio-mmio slot: the registers a guest sees, in front of a [`VirtioDevice`] and the
/// [`WorkerHandle`] of its device thread.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    worker: WorkerHandle,
    interrupt: Interrupt,
    mem: GuestMemoryMmap,
    notifiers: Vec<EventFd>,
    queue_max: Vec<u16>,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    reset_pending: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, whose queues go to the worker behind `worker` at DRIVER_OK.
    /// One notifier eventfd per queue is created here; see [`MmioTransport::queue_notifiers`].
    pub fn new(
        device: Box<dyn VirtioDevice>,
        worker: WorkerHandle,
        interrupt: Interrupt,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        check_queue_sizes(device.as_ref())?;
        let queue_max = device.queue_max_sizes();
        let notifiers = queue_max
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(TransportError::EventFd)?;
        Self::with_notifiers(device, worker, interrupt, mem, notifiers)
    }

    /// Like [`MmioTransport::new`], with notifier eventfds the VMM already registered with
    /// `KVM_IOEVENTFD` (one per queue, in order).
    pub fn with_notifiers(
        device: Box<dyn VirtioDevice>,
        worker: WorkerHandle,
        interrupt: Interrupt,
        mem: GuestMemoryMmap,
        notifiers: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        check_queue_sizes(device.as_ref())?;
        let name = device.name();
        let queue_max = device.queue_max_sizes().to_vec();
        if notifiers.len() != queue_max.len() {
            return Err(TransportError::NotifierCount {
                device: name,
                queues: queue_max.len(),
                notifiers: notifiers.len(),
            });
        }
        Ok(Self {
            queues: vec![QueueConfig::default(); queue_max.len()],
            device,
            worker,
            interrupt,
            mem,
            notifiers,
            queue_max,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            reset_pending: false,
        })
    }

    /// Clones of the per-queue notifier eventfds, in queue order: the VMM registers each
    /// with `KVM_IOEVENTFD` at [`REG_QUEUE_NOTIFY`] (4 bytes, datamatch = queue index) and
    /// hands another set of clones to the device's worker loop.
    /// The device's name (`virtio-blk`).
    #[must_use]
    pub fn device_name(&self) -> &'static str {
        self.device.name()
    }

    pub fn queue_notifiers(&self) -> io::Result<Vec<EventFd>> {
        self.notifiers.iter().map(EventFd::try_clone).collect()
    }

    /// The device's interrupt line.
    #[must_use]
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device status as the guest reads it.
    #[must_use]
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | DEVICE_STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The features the driver accepted.
    #[must_use]
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the queues are with the worker.
    #[must_use]
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn guest_error(&self, reason: &str) {
        self.interrupt.mark_needs_reset(self.device.name(), reason);
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn selected_queue_max(&self) -> u16 {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|sel| self.queue_max.get(sel))
            .copied()
            .unwrap_or(0)
    }

    /// Pauses the device thread (it finishes what it is doing first) and returns the
    /// transport's state with each live queue's position. The vCPUs must be paused, so no
    /// register changes meanwhile. On an error nothing is paused.
    pub fn pause(&mut self, timeout: Duration) -> Result<TransportState, String> {
        let name = self.device.name();
        if self.reset_pending {
            return Err(format!("{name}: a reset is still pending"));
        }
        let positions = if self.activated {
            let positions = self
                .worker
                .pause(timeout)
                .map_err(|e| format!("{name}: {e}"))?;
            if positions.len() != self.queues.len() {
                let _ = self.worker.resume();
                return Err(format!(
                    "{name}: the device thread holds {} queues of {}",
                    positions.len(),
                    self.queues.len()
                ));
            }
            positions.into_iter().map(Some).collect()
        } else {
            vec![None; self.queues.len()]
        };
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: self
                .queues
                .iter()
                .zip(positions)
                .map(|(q, position)| QueueState {
                    size: q.size,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    ready: q.ready,
                    position,
                })
                .collect(),
        })
    }

    /// Lets a device thread paused by [`MmioTransport::pause`] go on.
    pub fn resume(&self) {
        if self.activated {
            if let Err(e) = self.worker.resume() {
                tracing::warn!(device = self.device.name(), error = %e, "resume");
            }
        }
    }

    /// Puts a snapshot's `state` into this fresh transport (its device built from the
    /// same arguments, its thread running) before any vCPU runs. A live driver's queues
    /// go to the device thread at their saved positions, followed by what a restore asks
    /// of the device (vsock: a TRANSPORT_RESET event). `state` came from a verified
    /// snapshot, but is checked as guest input would be: a queue past its maximum, a
    /// feature never offered, a ring outside memory are errors.
    ///
    /// It interrupts (a saved InterruptStatus is raised again, and the device thread may
    /// interrupt as soon as it has its queues), so the vCPUs must already hold their
    /// restored state: an interrupt raised before `KVM_SET_LAPIC` is lost.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let name = self.device.name();
        if self.status != 0 || self.activated {
            return Err(format!("{name}: restore into a transport already in use"));
        }
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "{name}: the snapshot's device here is of virtio type {}, this one {}",
                state.device_type,
                self.device.device_type()
            ));
        }
        if state.queues.len() != self.queue_max.len() {
            return Err(format!(
                "{name}: the snapshot has {} queues, the device {}",
                state.queues.len(),
                self.queue_max.len()
            ));
        }
        if state.acked_features & !self.device.avail_features() != 0 {
            return Err(format!(
                "{name}: the snapshot's driver accepted features {:#x} this device does not offer",
                state.acked_features & !self.device.avail_features()
            ));
        }
        for (i, (q, &max)) in state.queues.iter().zip(&self.queue_max).enumerate() {
            if q.size > max || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(format!("{name}: queue {i} size {} (maximum {max})", q.size));
            }
        }
        self.queues = state
            .queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                ready: q.ready,
            })
            .collect();
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.config_generation = state.config_generation;
        if state.needs_reset {
            self.interrupt
                .mark_needs_reset(name, "it needed a reset when the snapshot was taken");
        } else if state.status & DEVICE_STATUS_DRIVER_OK != 0 {
            let mut queues = Vec::with_capacity(state.queues.len());
            for (index, q) in state.queues.iter().enumerate() {
                let sel = u32::try_from(index).unwrap_or(u32::MAX);
                let config = self.queues.get(index).copied().unwrap_or_default();
                let mut queue = self.build_queue(sel, &config)?;
                let position = q
                    .position
                    .ok_or_else(|| format!("{name}: live queue {index} without a position"))?;
                queue.set_next_avail(position.next_avail);
                queue.set_next_used(position.next_used);
                queues.push(queue);
            }
            self.worker
                .activate_restored(Activation {
                    mem: self.mem.clone(),
                    queues,
                    acked_features: self.acked_features,
                })
                .map_err(|e| format!("{name}: {e}"))?;
            self.activated = true;
        }
        self.interrupt
            .restore_status(state.interrupt_status)
            .map_err(|e| format!("{name}: raising its interrupt: {e}"))
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_sel {
                    0 => u32::try_from(features & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(features >> 32).unwrap_or(0),
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => u32::from(self.selected_queue_max()),
            REG_QUEUE_READY => u32::from(self.selected_queue().is_some_and(|q| q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => {
                if self.reset_pending {
                    self.reset();
                }
                self.status()
            }
            REG_CONFIG_GENERATION => self.config_generation,
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            _ => {
                tracing::debug!(
                    device = self.device.name(),
                    offset,
                    "read of a write-only or unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn may_negotiate_features(&self) -> bool {
        self.status & DEVICE_STATUS_DRIVER != 0
            && self.status & (DEVICE_STATUS_FEATURES_OK | DEVICE_STATUS_FAILED) == 0
    }

    fn may_set_up_queues(&self) -> bool {
        self.status & DEVICE_STATUS_FEATURES_OK != 0
            && self.status & (DEVICE_STATUS_DRIVER_OK | DEVICE_STATUS_FAILED) == 0
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_field(offset, value),
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => self.guest_error(&format!(
                "write of {value:#x} to read-only or unknown register {offset:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.may_negotiate_features() {
            self.guest_error(&format!(
                "DriverFeatures written in status {:#x}",
                self.status
            ));
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.acked_features, value),
            1 => set_high(&mut self.acked_features, value),
            // Feature words past 63 are all zero; accepting any of them is refused at
            // FEATURES_OK.
            sel if value != 0 => self.guest_error(&format!(
                "DriverFeatures word {sel} accepts {value:#x}, but no feature past bit 63 is offered"
            )),
            _ => {}
        }
    }

    fn write_queue_field(&mut self, offset: u64, value: u32) {
        if !self.may_set_up_queues() {
            self.guest_error(&format!(
                "queue register {offset:#x} written in status {:#x}",
                self.status
            ));
            return;
        }
        let sel = self.queue_sel;
        let max = self.selected_queue_max();
        let Some(queue) = self.selected_queue() else {
            self.guest_error(&format!(
                "queue register {offset:#x} written for queue {sel}, which does not exist"
            ));
            return;
        };
        if queue.ready {
            self.guest_error(&format!(
                "queue {sel} register {offset:#x} written while the queue is ready"
            ));
            return;
        }
        match offset {
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size.is_power_of_two() && size <= max => {
                    queue.size = size;
                }
                _ => self.guest_error(&format!(
                    "queue {sel} size {value} is not a power of two in 1..={max}"
                )),
            },
            REG_QUEUE_DESC_LOW => set_low(&mut queue.desc, value),
            REG_QUEUE_DESC_HIGH => set_high(&mut queue.desc, value),
            REG_QUEUE_DRIVER_LOW => set_low(&mut queue.driver, value),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut queue.driver, value),
            REG_QUEUE_DEVICE_LOW => set_low(&mut queue.device, value),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut queue.device, value),
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let sel = self.queue_sel;
        if value == 0 {
            // Linux clears QueueReady when it tears queues down, also after a reset;
            // harmless unless the queue is live with the worker.
            if self.status & DEVICE_STATUS_DRIVER_OK != 0 {
                self.guest_error(&format!("queue {sel} disabled after DRIVER_OK"));
            } else if let Some(queue) = self.selected_queue() {
                queue.ready = false;
            }
            return;
        }
        if value != 1 || !self.may_set_up_queues() {
            self.guest_error(&format!(
                "QueueReady {value} written for queue {sel} in status {:#x}",
                self.status
            ));
            return;
        }
        let Some(config) = self.selected_queue().map(|q| *q) else {
            self.guest_error(&format!(
                "QueueReady written for queue {sel}, which does not exist"
            ));
            return;
        };
        match self.build_queue(sel, &config) {
            Ok(_) => {
                if let Some(queue) = self.selected_queue() {
                    queue.ready = true;
                }
            }
            Err(reason) => self.guest_error(&reason),
        }
    }

    /// Builds and validates queue `sel` from what the driver wrote: size, alignment, and
    /// every ring inside guest memory.
    fn build_queue(&self, sel: u32, config: &QueueConfig) -> Result<Queue, String> {
        let max = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queue_max.get(i))
            .copied()
            .unwrap_or(0);
        let mut queue = Queue::new(max).map_err(|e| format!("queue {sel}: {e}"))?;
        if config.size == 0 {
            return Err(format!("queue {sel} made ready without a size"));
        }
        queue
            .try_set_size(config.size)
            .map_err(|e| format!("queue {sel} size {}: {e}", config.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .map_err(|e| format!("queue {sel} descriptor table {:#x}: {e}", config.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(config.driver))
            .map_err(|e| format!("queue {sel} available ring {:#x}: {e}", config.driver))?;
        queue
            .try_set_used_ring_address(GuestAddress(config.device))
            .map_err(|e| format!("queue {sel} used ring {:#x}: {e}", config.device))?;
        queue.set_event_idx(self.acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            return Err(format!(
                "queue {sel} rings outside guest memory: size {} desc {:#x} avail {:#x} used {:#x}",
                config.size, config.desc, config.driver, config.device
            ));
        }
        Ok(queue)
    }

    fn notify(&mut self, value: u32) {
        // Normally an ioeventfd catches this write in KVM; without one, forward it.
        if self.status & DEVICE_STATUS_DRIVER_OK == 0 {
            self.guest_error(&format!("queue {value} notified before DRIVER_OK"));
            return;
        }
        let notifier = usize::try_from(value)
            .ok()
            .and_then(|i| self.notifiers.get(i));
        match notifier {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    tracing::warn!(device = self.device.name(), error = %e, "queue notify");
                }
            }
            None => self.guest_error(&format!("notify of queue {value}, which does not exist")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.guest_error(&format!(
                "status {value:#x} clears bits of {old:#x} without a reset"
            ));
            return;
        }
        let added = value & !old;
        if added & DEVICE_STATUS_FAILED != 0 {
            tracing::info!(device = self.device.name(), "driver set FAILED");
            self.status |= DEVICE_STATUS_FAILED;
            return;
        }
        let expected_before = match added {
            DEVICE_STATUS_ACKNOWLEDGE => 0,
            DEVICE_STATUS_DRIVER => DEVICE_STATUS_ACKNOWLEDGE,
            DEVICE_STATUS_FEATURES_OK => DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER,
            DEVICE_STATUS_DRIVER_OK => {
                DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK
            }
            0 => return,
            _ => u32::MAX,
        };
        if old != expected_before {
            self.guest_error(&format!("status transition {old:#x} -> {value:#x}"));
            return;
        }
        match added {
            DEVICE_STATUS_FEATURES_OK => self.features_ok(),
            DEVICE_STATUS_DRIVER_OK => self.driver_ok(),
            _ => self.status = value,
        }
    }

    fn features_ok(&mut self) {
        let offered = self.device.avail_features();
        let acked = self.acked_features;
        if acked & !offered != 0 {
            // Not setting FEATURES_OK is how the device refuses (VIRTIO 1.2, 3.1.1).
            tracing::warn!(
                device = self.device.name(),
                acked,
                offered,
                "driver accepted features that were not offered"
            );
            return;
        }
        if acked & feature(VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!(
                device = self.device.name(),
                "driver did not accept VIRTIO_F_VERSION_1"
            );
            return;
        }
        self.status |= DEVICE_STATUS_FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        if self.interrupt.needs_reset() {
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, config) in self.queues.iter().enumerate() {
            let sel = u32::try_from(index).unwrap_or(u32::MAX);
            if !config.ready {
                self.guest_error(&format!("DRIVER_OK with queue {index} not ready"));
                return;
            }
            match self.build_queue(sel, config) {
                Ok(queue) => queues.push(queue),
                Err(reason) => {
                    self.guest_error(&reason);
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
        };
        match self.worker.activate(activation) {
            Ok(()) => {
                self.activated = true;
                self.status |= DEVICE_STATUS_DRIVER_OK;
            }
            Err(e) => {
                tracing::error!(device = self.device.name(), error = %e, "cannot activate");
                self.status |= DEVICE_STATUS_FAILED;
                self.guest_error(&format!("device thread unavailable: {e}"));
            }
        }
    }

    fn reset(&mut self) {
        if self.activated || self.reset_pending {
            match self.worker.reset(RESET_TIMEOUT) {
                Ok(()) => self.reset_pending = false,
                Err(e) => {
                    tracing::warn!(device = self.device.name(), error = %e, "reset not confirmed yet");
                    // Status stays non-zero, so the driver keeps polling and we ask again.
                    self.reset_pending = true;
                    return;
                }
            }
        }
        self.activated = false;
        self.queues = vec![QueueConfig::default(); self.queue_max.len()];
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if let Some(config_offset) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
                self.device.read_config(config_offset, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                device = self.device.name(),
                offset,
                len = data.len(),
                "register read that is not 4 aligned bytes"
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let config_offset = offset.saturating_sub(CONFIG_SPACE_OFFSET);
            match self.device.write_config(config_offset, data) {
                Ok(()) => self.config_generation = self.config_generation.wrapping_add(1),
                Err(e) => self.guest_error(&format!("config write refused: {e}")),
            }
            return;
        }
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => u32::from_le_bytes(bytes),
            _ => {
                self.guest_error(&format!(
                    "register write of {} bytes at {offset:#x}",
                    data.len()
                ));
                return;
            }
        };
        self.write_register(offset, value);
    }
}
