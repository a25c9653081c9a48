//! Every device the VMM gives a guest, one module each, and the one generic way a virtio
//! device gets onto the bus.
//!
//! A device module owns the whole of its wiring: its command-line value (parsing), its
//! check against the signed plan, opening its backend before the jail (so a missing file
//! never creates a VM), attaching it, and the seccomp role its thread installs. The device
//! itself (registers, queues, the guest-facing parser) lives in `mvm_devices`.
//!
//! Every virtio device (blk, vsock, net) goes through [`attach_virtio_device`]: the slot
//! (irqfd, ioeventfds), the audited interrupt, the worker channel, the MMIO transport on
//! the bus, the `virtio_mmio.device=` entry on the command line, and the device thread,
//! which installs its own seccomp filter before it touches guest data.

pub mod blk;
pub mod legacy;
pub mod net;
pub mod vsock;

use std::sync::{Arc, Mutex};

use mvm_devices::virtio::mmio::MmioTransport;
use mvm_devices::virtio::worker::{self, QueueWorker, WorkerLoop};
use mvm_devices::virtio::{Interrupt, VirtioDevice};

use kvm_ioctls::VmFd;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestMemoryMmap;

use crate::device_manager::{DeviceManager, MmioSlot};
use crate::error::BootError;
use crate::seccomp::ThreadRole;

/// What device-attaching code gets: the VM, its memory, the device manager
/// and the command line (to which virtio-mmio devices append themselves).
pub struct DeviceContext<'a> {
    /// The VM fd (irqfds, ioeventfds).
    pub vm: &'a VmFd,
    /// Guest memory.
    pub memory: &'a GuestMemoryMmap,
    /// Buses and slots.
    pub devices: &'a mut DeviceManager,
    /// The kernel command line being built.
    pub cmdline: &'a mut Cmdline,
}

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
    let interrupt = crate::event_log::audited(Interrupt::new(res.interrupt));
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
