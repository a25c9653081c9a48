//! Booting and supervising a VM: from a validated [`VmConfig`] to the guest's
//! end.
//!
//! Order matters for the boot report: guest memory is allocated and the kernel
//! loaded (`kernel_loaded`) before the KVM VM is created (`vm_created`), so a
//! kernel that does not load never creates a VM.
//!
//! Threads: the caller's (setup, then supervision), one per vCPU, one that
//! waits for host signals, one that feeds stdin to the serial port. When the
//! VM ends, [`run_cli`] returns the exit status and `main` exits the process,
//! which ends every other thread (they hold no state that needs saving).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VmFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use mvm_devices::legacy::{
    guest_signal, i8042, serial, EventFdTrigger, GuestSignal, GuestSignalDevice, I8042Device,
    SerialDevice,
};
use mvm_loader::kernel;
use nix::sys::signal::{SigSet, Signal};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{mptable, regs, zero_page};
use crate::boot_report::{BootTimeline, Phase};
use crate::cli::Args;
use crate::config::{self, ConfigError, ConsoleTarget, HostLimits, VmConfig};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::exit::{ExitReason, STATUS_BAD_ARGUMENTS, STATUS_VMM_ERROR};
use crate::layout;
use crate::vcpu::{Vcpu, VcpuContext, VcpuError, VmEvent};
use crate::verified_boot::{self, BootPlan, EventLog, Refusal};
use crate::vm::{self, Vm, VmError};

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Creating the VM or its memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel or initramfs.
    #[error("kernel {path}: {source}")]
    Kernel {
        /// Kernel path.
        path: String,
        /// Why.
        source: kernel::KernelError,
    },
    /// Attaching devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// Configuring a vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Writing boot structures.
    #[error("{0}")]
    BootState(String),
    /// A KVM ioctl outside the VM and vCPU setup.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Host resources (eventfds, threads, signal masks).
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
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

/// Sends exits to the supervisor and stops every vCPU loop.
#[derive(Clone)]
pub struct VmStopper {
    events: Sender<VmEvent>,
    stop: Arc<AtomicBool>,
}

impl VmStopper {
    /// A stopper reporting on `events` and raising `stop`.
    pub fn new(events: Sender<VmEvent>, stop: Arc<AtomicBool>) -> Self {
        Self { events, stop }
    }

    /// Ends the VM with `reason` (the first reason wins).
    pub fn stop(&self, reason: ExitReason) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            let _ = self.events.send(VmEvent::Exit(reason));
        }
    }
}

/// The guest-signal port's handler: milestones go to the timeline, poweroff
/// ends the VM.
pub fn guest_signal_handler(
    timeline: Arc<BootTimeline>,
    stopper: VmStopper,
) -> Box<dyn FnMut(GuestSignal) + Send> {
    Box::new(move |signal| match signal {
        GuestSignal::InitReached => timeline.mark(Phase::InitReached),
        GuestSignal::AgentReady => timeline.mark(Phase::AgentReady),
        GuestSignal::PoweroffRequested => stopper.stop(ExitReason::Poweroff),
    })
}

/// The serial console's sink: records the first byte in the timeline, and
/// stops writing (without failing the UART) if the destination breaks.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    timeline: Arc<BootTimeline>,
    broken: bool,
}

impl ConsoleWriter {
    /// Wraps `out`.
    pub fn new(out: Box<dyn Write + Send>, timeline: Arc<BootTimeline>) -> Self {
        Self {
            out,
            timeline,
            broken: false,
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.timeline.mark(Phase::FirstSerialByte);
        }
        if self.broken {
            return Ok(buf.len());
        }
        match self.out.write(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!("guest console output failed, discarding from now on: {e}");
                self.broken = true;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.broken {
            if let Err(e) = self.out.flush() {
                tracing::warn!("guest console flush failed, discarding from now on: {e}");
                self.broken = true;
            }
        }
        Ok(())
    }
}

fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> BootError {
    move |source| BootError::Host { what, source }
}

type SharedSerial = Arc<Mutex<SerialDevice<ConsoleWriter>>>;

/// Puts COM1, the i8042 reset line and the guest-signal port on the PIO bus.
fn attach_legacy_devices(
    vm: &VmFd,
    devices: &mut DeviceManager,
    console: Box<dyn Write + Send>,
    timeline: &Arc<BootTimeline>,
    stopper: &VmStopper,
) -> Result<SharedSerial, BootError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
    vm.register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|source| BootError::Kvm {
            what: "KVM_IRQFD (COM1)",
            source,
        })?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFdTrigger::new(irq),
        ConsoleWriter::new(console, timeline.clone()),
    )));
    devices.attach_pio(
        serial.clone(),
        serial::COM1_PORT_BASE,
        serial::COM1_PORT_LEN,
    )?;

    let reset = stopper.clone();
    let i8042 = I8042Device::new(Box::new(move || reset.stop(ExitReason::ResetI8042)));
    devices.attach_pio(
        Arc::new(Mutex::new(i8042)),
        i8042::I8042_PORT_BASE,
        i8042::I8042_PORT_LEN,
    )?;

    let signals = GuestSignalDevice::new(guest_signal_handler(timeline.clone(), stopper.clone()));
    devices.attach_pio(
        Arc::new(Mutex::new(signals)),
        guest_signal::GUEST_SIGNAL_PORT,
        guest_signal::GUEST_SIGNAL_PORT_LEN,
    )?;
    Ok(serial)
}

/// Feeds the VMM's stdin to the guest's serial port until EOF.
fn spawn_console_input(serial: SharedSerial) -> Result<(), BootError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadRole::ConsoleInput, "console-in");
            let mut stdin = io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = buf.get(..n).unwrap_or_default();
                while !pending.is_empty() {
                    let taken = match serial.lock() {
                        Ok(mut s) => s.enqueue_input(pending),
                        Err(_) => return,
                    };
                    pending = pending.get(taken..).unwrap_or_default();
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(drop)
        .map_err(host_err("spawning the console input thread"))
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and so in every thread it
/// spawns afterwards) and turns them into a VM exit on a dedicated thread.
fn spawn_signal_waiter(stopper: VmStopper) -> Result<(), BootError> {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    set.thread_block()
        .map_err(|e| host_err("blocking host signals")(io::Error::from(e)))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadRole::Signals, "signals");
            if let Ok(sig) = set.wait() {
                stopper.stop(ExitReason::HostSignal(sig as i32));
            }
        })
        .map(drop)
        .map_err(host_err("spawning the signal thread"))
}

/// Boots `config` and supervises the VM until it ends. `attach_devices` runs
/// after the legacy devices are on the bus and before the command line is
/// written: that is where virtio-mmio devices are added.
pub fn run(
    config: VmConfig,
    timeline: Arc<BootTimeline>,
    attach_devices: impl FnOnce(&mut DeviceContext<'_>) -> Result<(), BootError>,
) -> Result<ExitReason, BootError> {
    let kernel_err = |source| BootError::Kernel {
        path: config.kernel_path.display().to_string(),
        source,
    };

    // Memory and kernel first: no VM exists until the kernel is in place.
    let memory = vm::create_guest_memory(config.mem_bytes)?;
    let loaded = kernel::load_kernel(&memory, &config.kernel, GuestAddress(layout::HIMEM_START))
        .map_err(kernel_err)?;
    let initrd = match &config.initrd {
        None => None,
        Some(bytes) => {
            let ceiling = layout::low_ram_end(config.mem_bytes);
            let addr =
                kernel::load_initrd(&memory, bytes, loaded.end, ceiling).map_err(kernel_err)?;
            Some(zero_page::InitrdLocation {
                addr: addr.0,
                size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            })
        }
    };
    timeline.mark(Phase::KernelLoaded);

    let vm = Vm::new(memory)?;
    timeline.mark(Phase::VmCreated);

    let (events_tx, events_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = VmStopper::new(events_tx.clone(), stop.clone());
    spawn_signal_waiter(stopper.clone())?;

    let console: Box<dyn Write + Send> = match config.console {
        ConsoleTarget::Stdout => Box::new(io::stdout()),
        ConsoleTarget::File(f) => Box::new(f),
    };
    let mut devices = DeviceManager::new();
    let serial = attach_legacy_devices(vm.fd(), &mut devices, console, &timeline, &stopper)?;

    let mut cmdline = Cmdline::try_from(&config.cmdline, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::BootState(format!("kernel command line: {e}")))?;
    attach_devices(&mut DeviceContext {
        vm: vm.fd(),
        memory: vm.memory(),
        devices: &mut devices,
        cmdline: &mut cmdline,
    })?;

    let mem = vm.memory();
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| BootError::BootState(format!("writing the command line: {e}")))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| BootError::BootState(format!("kernel command line: {e}")))?;
    let params = zero_page::build(loaded.setup_header, config.mem_bytes, cmdline_len, initrd)
        .map_err(|e| BootError::BootState(e.to_string()))?;
    zero_page::write(mem, &params).map_err(|e| BootError::BootState(e.to_string()))?;
    mptable::write(mem, config.vcpus).map_err(|e| BootError::BootState(e.to_string()))?;
    regs::write_boot_tables(mem).map_err(|e| BootError::BootState(e.to_string()))?;

    let supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| BootError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(vm.fd(), index)?;
        vcpu.configure(&supported, config.vcpus, loaded.entry)?;
        vcpus.push(vcpu);
    }

    let ctx = VcpuContext {
        pio: devices.pio_bus().clone(),
        mmio: devices.mmio_bus().clone(),
        events: events_tx,
        timeline: timeline.clone(),
        stop,
    };
    for vcpu in vcpus {
        let ctx = ctx.clone();
        let name = format!("vcpu{}", vcpu.index());
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadRole::Vcpu, &name);
                vcpu.run(&ctx)
            })
            .map_err(host_err("spawning a vCPU thread"))?;
    }
    spawn_console_input(serial)?;
    drop(ctx);
    // Every other thread is running under its own filter; the main thread's goes on last.
    crate::seccomp::enter(crate::seccomp::ThreadRole::Main, "main");

    // Supervise: the first exit event ends the VM. `vm` stays alive until the
    // process exits, so vCPU threads never run on a closed VM.
    let reason = match events_rx.recv() {
        Ok(VmEvent::Exit(reason)) => reason,
        Err(_) => ExitReason::VmmError("every vCPU thread ended without an exit reason".into()),
    };
    std::mem::forget(vm);
    Ok(reason)
}

/// How the VMM stops before the guest runs; [`run_cli`] reports it once (boot report,
/// stderr, events) and exits with its status.
#[derive(Debug)]
pub enum Stop {
    /// Verified boot refused: a `boot_refused` event, the refusal's own status.
    Refused {
        /// The plan's id, once its signature verified.
        plan_id: Option<String>,
        /// Why (boxed: a refusal carries both digests and the plan's values).
        refusal: Box<Refusal>,
    },
    /// A bad argument, or more than the host allows: `invalid_arguments`, status 2.
    Invalid(String),
    /// The VMM itself failed: `vmm_error`, status 1.
    Failed(String),
}

/// Everything ready before the jail: the configuration read (and, with a plan,
/// measured) and every device's backend open.
#[derive(Debug)]
pub struct Prepared {
    /// The VM to boot.
    pub config: VmConfig,
    /// The verified plan's id; `None` with `--dev`.
    pub plan_id: Option<String>,
    /// The disks, in `--disk` order, pinned ones with their verifiers.
    pub disks: Vec<crate::virtio_devices::OpenDisk>,
    /// The vsock device, its socket listening.
    pub vsock: Option<crate::vsock::OpenVsock>,
    /// Removes the vsock socket file when dropped.
    pub vsock_socket: Option<crate::vsock::SocketFileGuard>,
    /// The net device, its tap open.
    pub net: Option<crate::net::OpenNet>,
}

/// From the parsed command line to a VM ready to create, in boot-report order: the
/// plan verified (`plan_verified`), the configuration resolved against the plan and the
/// host, the artifacts measured (`artifacts_measured`), the devices opened. Nothing
/// here touches KVM.
pub fn prepare(
    args: &Args,
    timeline: &BootTimeline,
    events: &EventLog,
    host: &HostLimits,
) -> Result<Prepared, Stop> {
    let plan = verified_boot::verify_plan(args, timeline).map_err(|refusal| Stop::Refused {
        plan_id: None,
        refusal: Box::new(refusal),
    })?;
    let plan_id = plan.as_ref().map(|p| p.plan_id().to_owned());
    let refused = |refusal| Stop::Refused {
        plan_id: plan_id.clone(),
        refusal: Box::new(refusal),
    };
    let mut config = match config::resolve(args, plan.as_ref().map(BootPlan::plan), host) {
        Ok(c) => c,
        Err(ConfigError::Plan(disagreement)) => {
            return Err(refused(Refusal::Mismatch {
                plan_id: plan_id.clone().unwrap_or_default(),
                disagreement,
            }))
        }
        Err(ConfigError::Arg(e)) => return Err(Stop::Invalid(e.to_string())),
    };
    if let Some(p) = &plan {
        verified_boot::measure(p, &mut config, timeline, events).map_err(refused)?;
    }
    let mut disks =
        crate::virtio_devices::open_disks(&args.disks).map_err(|e| Stop::Invalid(e.to_string()))?;
    let (vsock, vsock_socket) = match args.vsock.as_ref().map(crate::vsock::open_vsock) {
        None => (None, None),
        Some(Ok((open, guard))) => (Some(open), Some(guard)),
        Some(Err(e)) => return Err(Stop::Invalid(format!("--vsock: {e}"))),
    };
    let signed_net = plan.as_ref().and_then(|p| p.plan().devices.net.as_ref());
    let net = args
        .net
        .as_ref()
        .map(|n| crate::net::open_net(n, signed_net))
        .transpose()
        .map_err(|e| Stop::Invalid(e.to_string()))?;
    verified_boot::attach_verity(plan, &mut disks, events);
    Ok(Prepared {
        config,
        plan_id,
        disks,
        vsock,
        vsock_socket,
        net,
    })
}

/// The whole `mvm-vmm` command: validate, boot, supervise, report. Returns the
/// process exit status; the caller exits with it. `timeline` has `args_parsed` marked
/// (by `main`, as clap returns).
pub fn run_cli(args: Args, timeline: Arc<BootTimeline>) -> i32 {
    let report_path = args.boot_report.clone();
    if !args.jail.no_jail {
        crate::jail::close_inherited_fds();
    }
    // Never dropped: the fd closes with the process (in debug builds, dropping a File
    // checks it with fcntl, which the main thread's filter does not allow).
    let report_file = match report_path.as_deref().map(config::check_boot_report) {
        None => None,
        Some(Ok(f)) => Some(std::mem::ManuallyDrop::new(f)),
        Some(Err(e)) => {
            eprintln!("mvm-vmm: {e}");
            return STATUS_BAD_ARGUMENTS;
        }
    };
    let write_report = |timeline: &BootTimeline| {
        if let (Some(path), Some(file)) = (&report_path, &report_file) {
            if let Err(e) = write_report_to(file, timeline) {
                eprintln!("mvm-vmm: writing the boot report {}: {e}", path.display());
            }
        }
    };
    if let Err(e) = crate::seccomp::init() {
        eprintln!("mvm-vmm: {e}");
        return STATUS_BAD_ARGUMENTS;
    }
    let events = match EventLog::open(args.verify.events.as_deref()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mvm-vmm: --events: {e}");
            return STATUS_BAD_ARGUMENTS;
        }
    };
    verified_boot::route_device_events(&events);
    let stop = |stop: Stop| {
        let (reason, message, status) = match &stop {
            Stop::Refused { plan_id, refusal } => {
                events.boot_refused(plan_id.as_deref(), refusal);
                (
                    refusal.reason(),
                    format!("boot refused ({}): {refusal}", refusal.reason()),
                    refusal.status(),
                )
            }
            Stop::Invalid(e) => ("invalid_arguments", e.clone(), STATUS_BAD_ARGUMENTS),
            Stop::Failed(e) => ("vmm_error", e.clone(), STATUS_VMM_ERROR),
        };
        timeline.set_exit(reason);
        write_report(&timeline);
        eprintln!("mvm-vmm: {message}");
        status
    };
    let Prepared {
        config,
        plan_id,
        disks,
        vsock,
        // Removes the VM's socket file when this function returns.
        vsock_socket: _vsock_socket,
        net,
    } = match prepare(&args, &timeline, &events, &HostLimits::of_this_host()) {
        Ok(p) => p,
        Err(s) => return stop(s),
    };
    // Jail call site: every file is open; the VMM is still one thread.
    let jail = crate::jail::JailPlan {
        // Guest-initiated vsock connections go to `<uds>_<port>` by path.
        keep_dirs: args
            .vsock
            .as_ref()
            .and_then(|v| crate::jail::parent_dir(&v.uds_path))
            .into_iter()
            .collect(),
        cleanup_files: args.vsock.iter().map(|v| v.uds_path.clone()).collect(),
        has_net: net.is_some(),
        // main, signals, console-in, one per vCPU and per device.
        threads: u64::from(config.vcpus)
            .saturating_add(3)
            .saturating_add(u64::try_from(disks.len()).unwrap_or(u64::MAX))
            .saturating_add(2),
        vcpus: u64::from(config.vcpus),
        mem_bytes: config.mem_bytes,
        image_bytes: u64::try_from(
            config
                .kernel
                .len()
                .saturating_add(config.initrd.as_ref().map_or(0, Vec::len)),
        )
        .unwrap_or(u64::MAX),
    };
    match crate::jail::start(&args.jail, &jail) {
        Ok(state) => {
            tracing::debug!(?state, "jail entered");
            if state.full {
                timeline.set_jail(crate::boot_report::JailReport {
                    uid: state.uid,
                    gid: state.gid,
                    pid_namespace: true,
                    cgroup: state.cgroup.map(|c| c.display().to_string()),
                });
            }
        }
        Err(e) => return stop(Stop::Failed(e.to_string())),
    }
    if let Some(n) = net.as_ref() {
        timeline.set_net_metrics(n.metrics());
    }
    let status = match run(config, timeline.clone(), move |ctx| {
        crate::virtio_devices::attach_disks(ctx, disks)?;
        vsock.map_or(Ok(()), |v| crate::vsock::attach_vsock(ctx, v))?;
        net.map_or(Ok(()), |n| crate::net::attach_net(ctx, n))
    }) {
        Ok(reason) => {
            timeline.set_exit(reason.code_name());
            write_report(&timeline);
            let _ = io::stdout().flush();
            eprintln!("{}", reason.message());
            reason.status()
        }
        Err(e) => {
            timeline.set_exit("vmm_error");
            write_report(&timeline);
            eprintln!("mvm-vmm: {e}");
            STATUS_VMM_ERROR
        }
    };
    let exit_reason = timeline.report().exit_reason.unwrap_or_default();
    events.vm_exit(plan_id.as_deref(), &exit_reason, status);
    status
}

/// Writes the boot report through the handle created (empty) at start; every way out
/// of [`run_cli`] writes it once. Only `write` is needed, under the main thread's filter.
fn write_report_to(file: &std::fs::File, timeline: &BootTimeline) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(&timeline.report()).map_err(io::Error::other)?;
    json.push(b'\n');
    let mut file = file;
    file.write_all(&json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Instant;

    use crate::config::tests::{elf_file, plan_for};

    const HOST: HostLimits = HostLimits {
        mem_available_mib: Some(4096),
        allow_overcommit: false,
    };

    /// The phases up to the VM's creation that happened, in the report's field order,
    /// must be non-decreasing.
    fn assert_phases_in_order(timeline: &BootTimeline) {
        let r = timeline.report();
        let phases = [
            ("args_parsed", r.args_parsed),
            ("plan_verified", r.plan_verified),
            ("artifacts_measured", r.artifacts_measured),
            ("kernel_loaded", r.kernel_loaded),
            ("vm_created", r.vm_created),
        ];
        let happened: Vec<(&str, u64)> = phases
            .iter()
            .filter_map(|(name, at)| at.map(|t| (*name, t)))
            .collect();
        for pair in happened.windows(2) {
            let [(a, ta), (b, tb)] = pair else { continue };
            assert!(ta <= tb, "{a} ({ta} us) after {b} ({tb} us): {r:?}");
        }
    }

    /// `main`'s part: the timeline, then clap, then the mark.
    fn parsed(argv: &[&str]) -> (Args, BootTimeline) {
        let timeline = BootTimeline::new(Instant::now());
        let args = Args::try_parse_from(argv).unwrap();
        timeline.mark(Phase::ArgsParsed);
        (args, timeline)
    }

    #[test]
    fn a_dev_boot_prepares_with_its_phases_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let k = elf_file(dir.path());
        let (args, timeline) = parsed(&["mvm-vmm", "--dev", "--kernel", k.to_str().unwrap()]);
        let p = prepare(&args, &timeline, &EventLog::default(), &HOST).unwrap();
        assert_eq!((p.config.vcpus, p.config.mem_bytes), (1, 128 << 20));
        assert_eq!(p.plan_id, None);
        let r = timeline.report();
        assert!(
            r.args_parsed.is_some() && r.plan_verified.is_none(),
            "{r:?}"
        );
        assert_phases_in_order(&timeline);
    }

    #[test]
    fn a_signed_boot_prepares_with_its_phases_in_order_and_the_plans_resources() {
        use ed25519_dalek::SigningKey;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let k = elf_file(d);
        let cmdline = "console=ttyS0";
        let key = SigningKey::from_bytes(&[7; 32]);
        let trust = d.join("admission.pub");
        std::fs::write(
            &trust,
            mvm_loader::dsse::format_public_key(&key.verifying_key()),
        )
        .unwrap();
        let sign = |nonce: &str| {
            let mut plan = plan_for(&k, cmdline);
            plan.nonce = nonce.repeat(16);
            let signed = mvm_loader::plan::envelope::sign_plan(plan, &key).unwrap();
            let path = d.join(format!("plan-{nonce}.json"));
            std::fs::write(&path, signed.envelope.to_json()).unwrap();
            path
        };
        let argv = |plan: &std::path::Path, extra: &[&str]| {
            let mut v: Vec<String> = [
                "mvm-vmm",
                "--plan",
                plan.to_str().unwrap(),
                "--trust",
                trust.to_str().unwrap(),
                "--replay-store",
                d.join("replay").to_str().unwrap(),
                "--kernel",
                k.to_str().unwrap(),
                "--cmdline",
                cmdline,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let events = d.join("events.jsonl");
        let log = EventLog::open(Some(&events)).unwrap();

        // Flags left out: the plan's 2 vCPUs and 256 MiB.
        let plan = sign("a1");
        let a = argv(&plan, &[]);
        let (args, timeline) = parsed(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let p = prepare(&args, &timeline, &log, &HOST).unwrap();
        assert_eq!((p.config.vcpus, p.config.mem_bytes), (2, 256 << 20));
        assert_eq!(p.plan_id.as_deref(), Some("config-test"));
        let r = timeline.report();
        assert!(
            r.plan_verified.is_some() && r.artifacts_measured.is_some(),
            "{r:?}"
        );
        assert_phases_in_order(&timeline);

        // An explicit value that disagrees is a plan refusal naming both values.
        let plan = sign("a2");
        let a = argv(&plan, &["--mem-mib", "128"]);
        let (args, timeline) = parsed(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let Err(Stop::Refused { plan_id, refusal }) = prepare(&args, &timeline, &log, &HOST) else {
            panic!("not refused");
        };
        assert_eq!(plan_id.as_deref(), Some("config-test"));
        assert_eq!(refusal.reason(), "plan_mismatch");
        assert_eq!(refusal.status(), verified_boot::STATUS_PLAN_MISMATCH);
        assert_eq!(
            refusal.to_string(),
            "--mem-mib 128 disagrees with the signed plan's memory_mib 256"
        );
        assert!(timeline.report().artifacts_measured.is_none());
    }

    struct FailingSink;
    impl Write for FailingSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn console_writer_marks_the_first_byte_and_survives_a_broken_sink() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let mut w = ConsoleWriter::new(Box::new(FailingSink), timeline.clone());
        w.write_all(&[]).unwrap();
        assert_eq!(timeline.get(Phase::FirstSerialByte), None);
        // A broken console must not fail the UART (and so the guest).
        w.write_all(b"x").unwrap();
        w.flush().unwrap();
        w.write_all(b"y").unwrap();
        assert!(timeline.get(Phase::FirstSerialByte).is_some());
    }

    #[test]
    fn guest_signals_mark_milestones_and_poweroff_stops_once() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut handler = guest_signal_handler(timeline.clone(), VmStopper::new(tx, stop.clone()));
        handler(GuestSignal::InitReached);
        handler(GuestSignal::AgentReady);
        assert!(!stop.load(Ordering::Acquire));
        handler(GuestSignal::PoweroffRequested);
        handler(GuestSignal::PoweroffRequested);
        assert!(stop.load(Ordering::Acquire));
        assert!(timeline.get(Phase::InitReached).is_some());
        assert!(timeline.get(Phase::AgentReady).is_some());
        let events: Vec<VmEvent> = rx.try_iter().collect();
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0], VmEvent::Exit(ExitReason::Poweroff)));
    }
}
