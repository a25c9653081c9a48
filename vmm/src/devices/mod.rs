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

use mvm_devices::virtio::block::{BlockError, DiskConfig};
use mvm_devices::virtio::vsock::{VsockConfig, VsockError};
use mvm_loader::plan::Plan;

use crate::boot_report::BootTimeline;
use crate::device_manager::{DeviceManager, MmioSlot, VirtioSlot};
use crate::error::{BootError, PlanDisagreement};
use mvm_seccomp::Role;

/// Every device thread's seccomp role (`--print-seccomp`, the filter tests).
pub const ROLES: [Role; 4] = [
    legacy::CONSOLE_INPUT_ROLE,
    blk::ROLE,
    vsock::ROLE,
    net::ROLE,
];

/// Every role of this VMM's threads: the core ones (main, signals, vCPUs), then each
/// device's, as `--print-seccomp` lists them.
pub fn all_roles() -> Vec<Role> {
    mvm_seccomp::roles::CORE.into_iter().chain(ROLES).collect()
}

/// Every device's flag, flattened into [`crate::cli::Args`].
#[derive(Debug, Default, clap::Args)]
pub struct DeviceArgs {
    /// A virtio-blk disk backed by FILE, read-only or read-write, with an optional id
    /// (`/sys/block/vdX/serial`). Repeatable: /dev/vda, /dev/vdb, ... in order.
    #[arg(
        long = "disk",
        value_name = "path=FILE,ro|rw[,id=ID]",
        value_parser = blk::parse_disk_arg
    )]
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock device for guest CID N; host processes reach it through the Unix
    /// socket PATH (`CONNECT <port>`), guest connections to host port P go to `PATH_P`.
    #[arg(
        long = "vsock",
        value_name = "cid=N,uds=PATH",
        value_parser = vsock::parse_vsock_value
    )]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on the host tap NAME with guest MAC MAC. Frames the guest sends
    /// pass only where the policy FILE allows (nothing passes without one).
    #[arg(
        long = "net",
        value_name = "tap=NAME,mac=MAC[,policy=FILE]",
        value_parser = net::parse_net_value
    )]
    pub net: Option<net::NetArg>,
}

/// Why a device's backend did not open (before any VM exists).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A `--disk` file.
    #[error(transparent)]
    Blk(#[from] BlockError),
    /// The `--vsock` socket.
    #[error("--vsock: {0}")]
    Vsock(#[from] VsockError),
    /// The `--net` policy or tap.
    #[error(transparent)]
    Net(#[from] net::NetArgError),
}

/// Every device on the command line, its backend open, not yet attached.
#[derive(Debug)]
pub struct OpenDevices {
    /// The disks, in `--disk` order (verified boot adds the pinned ones' verifiers).
    pub disks: Vec<blk::OpenDisk>,
    /// The vsock device, its socket listening.
    pub vsock: Option<vsock::OpenVsock>,
    /// Removes the vsock socket file when dropped.
    pub vsock_socket: Option<vsock::SocketFileGuard>,
    /// The net device, its tap open.
    pub net: Option<net::OpenNet>,
}

impl OpenDevices {
    /// The virtio devices there are, by kind (`virtio-blk` once per disk).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.disks.iter().map(|_| "virtio-blk").collect();
        if self.vsock.is_some() {
            names.push("virtio-vsock");
        }
        if self.net.is_some() {
            names.push("virtio-net");
        }
        names
    }
}

/// Each device's flag against the signed plan's section (vsock, net). The disks are
/// matched to the plan's pinned disks, with their dm-verity trees, by verified boot.
pub fn check_plan(args: &DeviceArgs, plan: &Plan) -> Result<(), PlanDisagreement> {
    vsock::check_plan(args.vsock.as_ref(), plan.devices.vsock.as_ref())?;
    net::check_plan(args.net.as_ref(), plan.devices.net.as_ref())
}

/// Opens every device's backend, in order: disks, vsock, net. `plan` is the verified
/// plan, if any (the net device takes its egress rules from it).
pub fn open(args: &DeviceArgs, plan: Option<&Plan>) -> Result<OpenDevices, OpenError> {
    let disks = blk::open_disks(&args.disks)?;
    let (vsock, vsock_socket) = match args.vsock.as_ref().map(vsock::open_vsock).transpose()? {
        Some((open, guard)) => (Some(open), Some(guard)),
        None => (None, None),
    };
    let signed_net = plan.and_then(|p| p.devices.net.as_ref());
    let net = args
        .net
        .as_ref()
        .map(|n| net::open_net(n, signed_net))
        .transpose()?;
    Ok(OpenDevices {
        disks,
        vsock,
        vsock_socket,
        net,
    })
}

impl OpenDevices {
    /// The most device threads this VM runs (for the jail's thread limit): one per disk,
    /// and one each for vsock and net, counted whether or not they are on.
    pub fn max_threads(&self) -> u64 {
        u64::try_from(self.disks.len())
            .unwrap_or(u64::MAX)
            .saturating_add(2)
    }

    /// Where each device's counters go in the boot report.
    pub fn report_metrics(&self, timeline: &BootTimeline) {
        if let Some(n) = self.net.as_ref() {
            timeline.set_net_metrics(n.metrics());
        }
        if let Some(v) = self.vsock.as_ref() {
            timeline.set_vsock_metrics(v.metrics());
        }
    }

    /// Attaches every virtio device in order: disks (`/dev/vda`, ...), vsock, net. The
    /// vsock socket's guard stays with the caller (returned), which removes the file
    /// when the VMM is done.
    pub fn attach(self, ctx: &mut DeviceContext<'_>) -> Result<(), BootError> {
        blk::attach_disks(ctx, self.disks)?;
        if let Some(v) = self.vsock {
            vsock::attach_vsock(ctx, v)?;
        }
        if let Some(n) = self.net {
            net::attach_net(ctx, n)?;
        }
        Ok(())
    }
}

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
    /// The seccomp role the thread installs (the device module's `ROLE`).
    pub role: Role,
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
    let DeviceThread {
        name: thread_name,
        role,
        label,
    } = thread;
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
    let device_name = transport.device_name();
    let transport = Arc::new(Mutex::new(transport));
    ctx.devices
        .attach_virtio_mmio(&res.slot, transport.clone(), ctx.cmdline)?;
    ctx.devices.keep_virtio_slot(VirtioSlot {
        name: device_name,
        base: res.slot.base,
        transport,
    });
    let hook = crate::seccomp::device_hook(role, thread_name.clone());
    let joiner = worker::spawn(
        &thread_name,
        WorkerLoop::new(backend, inbox, notifiers, interrupt),
        hook,
    )
    .map_err(|e| BootError::BootState(format!("{label}: {e}")))?;
    drop(joiner);
    Ok(res.slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::Mode;

    #[test]
    fn every_role_compiles_passes_the_lint_and_has_its_own_name() {
        let all = all_roles();
        for (i, role) in all.iter().enumerate() {
            for mode in [Mode::Log, Mode::Enforce] {
                let p = mvm_seccomp::compile(role, mode).unwrap();
                assert!(p.len() > 10, "{role}: {} instructions", p.len());
            }
            assert_eq!(mvm_seccomp::lint::problems(role), Vec::<String>::new());
            assert!(
                all.iter().skip(i + 1).all(|r| r.name != role.name),
                "{role} twice"
            );
        }
        let names: Vec<&str> = all.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "main",
                "signals",
                "vcpu",
                "console-input",
                "blk",
                "vsock",
                "net"
            ]
        );
    }

    #[test]
    fn only_the_vsock_thread_may_open_a_socket_and_only_af_unix() {
        for role in all_roles() {
            let socket = role
                .allowed()
                .into_iter()
                .find(|a| a.nr == libc::SYS_socket);
            match socket {
                None => assert_ne!(role.name, "vsock"),
                Some(a) => {
                    assert_eq!(role.name, "vsock");
                    let only = a.only.unwrap();
                    assert_eq!((only.index, only.values), (0, vec![(1, "AF_UNIX")]));
                }
            }
        }
    }

    #[test]
    fn print_seccomp_lists_every_role_with_its_count() {
        let text = mvm_seccomp::describe(&all_roles());
        for role in all_roles() {
            let head = format!("{}: {} syscalls", role.name, role.allowed().len());
            assert!(text.contains(&head), "{head} missing:\n{text}");
        }
        assert!(
            text.contains("FIONBIO") && text.contains("KVM_RUN"),
            "{text}"
        );
    }
}
