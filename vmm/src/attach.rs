//! Putting one virtio device on the next virtio-mmio slot and starting its thread.
//!
//! Every virtio device (blk, vsock, net) goes through [`attach_virtio_device`]: the slot
//! (irqfd, ioeventfds), the audited interrupt, the worker channel, the MMIO transport on
//! the bus, the `virtio_mmio.device=` entry on the command line, and the device thread,
//! which installs its own seccomp filter before it touches guest data. The per-device
//! modules only open their backends and say what to log.

use std::sync::{Arc, Mutex};

use mvm_devices::virtio::mmio::MmioTransport;
use mvm_devices::virtio::worker::{self, QueueWorker, WorkerLoop};
use mvm_devices::virtio::{Interrupt, VirtioDevice};

use crate::boot::{BootError, DeviceContext};
use crate::device_manager::MmioSlot;
use crate::seccomp::ThreadRole;

/// How one device is named and confined.
#[derive(Debug, Clone)]
pub struct DeviceThread {
    /// The device thread's name (`virtio-blk0`, `virtio-vsock`); seccomp reports name it.
    pub name: String,
    /// The seccomp role the thread installs.
    pub role: ThreadRole,
    /// What a failure message starts with (`disk /x.img`, `vsock`).
    pub label: String,
}

/// Attaches `front` (the transport's half) on the next virtio-mmio slot and starts
/// `backend` (the device thread's half) on its own thread. Returns the slot, for logs.
///
/// The thread is not joined: it ends with the process, or when the transport (and with it
/// the worker handle) is dropped.
pub fn attach_virtio_device<D, W>(
    ctx: &mut DeviceContext<'_>,
    front: D,
    backend: W,
    thread: DeviceThread,
) -> Result<MmioSlot, BootError>
where
    D: VirtioDevice + 'static,
    W: QueueWorker + 'static,
{
    let DeviceThread { name, role, label } = thread;
    let queues = u16::try_from(front.queue_max_sizes().len())
        .map_err(|_| BootError::BootState(format!("{label}: too many queues")))?;
    let res = ctx.devices.prepare_virtio_mmio(ctx.vm, queues)?;
    let host = |what| move |source| BootError::Host { what, source };
    let interrupt = crate::verified_boot::audited(Interrupt::new(res.interrupt));
    let (handle, inbox) = worker::channel().map_err(host("virtio worker channel"))?;
    let notifiers = res
        .queue_notify
        .iter()
        .map(|fd| fd.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(host("virtio queue notifiers"))?;
    let transport = MmioTransport::with_notifiers(
        Box::new(front),
        handle,
        interrupt.clone(),
        ctx.memory.clone(),
        res.queue_notify,
    )
    .map_err(|e| BootError::BootState(format!("{label}: {e}")))?;
    ctx.devices
        .attach_virtio_mmio(&res.slot, Arc::new(Mutex::new(transport)), ctx.cmdline)?;
    let hook = crate::seccomp::device_hook(role, name.clone());
    let joiner = worker::spawn(
        &name,
        WorkerLoop::new(backend, inbox, notifiers, interrupt),
        hook,
    )
    .map_err(|e| BootError::BootState(format!("{label}: {e}")))?;
    drop(joiner);
    Ok(res.slot)
}
