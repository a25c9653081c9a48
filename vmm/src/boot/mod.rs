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

mod restore;

use std::io::{self, Write};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use nix::sys::signal::{SigSet, Signal};
use vm_memory::GuestAddress;

use crate::arch::x86_64::{cpuid, mptable, regs, zero_page};
use crate::boot_report::{BootTimeline, Phase};
use crate::cli::Args;
use crate::config::{self, ConfigError, ConsoleTarget, HostLimits, VmConfig};
use crate::device_manager::DeviceManager;
use crate::devices::{self, legacy, vsock, DeviceContext, OpenDevices};
use crate::error::{host_err, BootError};
use crate::event_log::{self, EventLog};
use crate::exit::{ExitReason, STATUS_BAD_ARGUMENTS, STATUS_VMM_ERROR};
use crate::image::Image;
use crate::layout;
use crate::snapshot::bundle::SnapshotFiles;
use crate::snapshot::manifest::{CpuRequirement, PlanBinding};
use crate::snapshot_taking::SnapshotTarget;
use crate::vcpu::{PauseGate, Vcpu, VcpuContext, VmEvent, VmStopper};
use crate::verified_boot::{self, BootPlan, LoadedDigests, PendingMeasurement, Refusal};
use crate::vm::{self, Vm};

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and so in every thread it
/// spawns afterwards) and turns them into a VM exit on a dedicated thread; SIGUSR2
/// becomes a snapshot request.
/// SIGIO, a verified disk's read lease breaking, is taken there too and only
/// noted (`mvm_devices::virtio::block::lease`): no vCPU or device thread is
/// interrupted by it. The memory lease's signal (a restored VM's memory file opened for
/// writing, [`crate::snapshot::memory::lease`]) ends the VM: pages it has not read yet
/// could change under it. The write lease's signal (the memory file a snapshot is to be
/// written to, opened by another process, [`crate::snapshot::written::write_lease`]) is
/// only noted: that snapshot's restores hash the file whole.
fn spawn_signal_waiter(stopper: VmStopper) -> Result<(), BootError> {
    let memory_lease = crate::snapshot::memory::lease_signal();
    let written_lease = crate::snapshot::written::write_lease_signal();
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGIO,
        Signal::SIGUSR2,
    ] {
        set.add(sig);
    }
    let mut raw: libc::sigset_t = *set.as_ref();
    // SAFETY: `raw` is an initialised sigset_t; sigaddset only sets a bit of it, and the
    // real-time signal number comes from glibc's SIGRTMIN.
    unsafe {
        libc::sigaddset(&mut raw, memory_lease);
        libc::sigaddset(&mut raw, written_lease);
    }
    // SAFETY: `raw` is a valid set built above; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(host_err("blocking host signals")(
            io::Error::from_raw_os_error(rc),
        ));
    }
    mvm_devices::thread::builder("signals")
        .spawn(move || {
            crate::seccomp::enter(&crate::seccomp::roles::SIGNALS, "signals");
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `raw` is the valid set blocked above; `sig` is written on success.
                if unsafe { libc::sigwait(&raw, &mut sig) } != 0 {
                    return;
                }
                if sig == memory_lease {
                    stopper.stop(ExitReason::VmmError(
                        "a host process opened the snapshot's memory file for writing: the VM is stopped, \
                         since pages it has not read yet could change under it"
                            .into(),
                    ));
                    return;
                }
                if sig == written_lease {
                    crate::snapshot::written::note_opened_elsewhere();
                    tracing::warn!("a host process opened the memory file a snapshot is to be written to: that snapshot's restores will hash it whole");
                    continue;
                }
                match Signal::try_from(sig) {
                    Ok(Signal::SIGUSR2) => stopper.request_snapshot(),
                    Ok(Signal::SIGIO) => {
                        mvm_devices::virtio::block::lease::note_break();
                        tracing::warn!("a host process opened a verified disk image for writing: every read is hashed from now on");
                    }
                    Ok(sig) => {
                        stopper.stop(ExitReason::HostSignal(sig as i32));
                        return;
                    }
                    Err(_) => {}
                }
            }
        })
        .map(drop)
        .map_err(host_err("spawning the signal thread"))
}

/// Boots `config` and supervises the VM until it ends. `loaded` gets the images'
/// digests once they are in guest memory (hashed as they were loaded, when
/// `config.hash_images`), before any VM exists: verified boot's last check, whose error
/// ends the boot there. `attach_devices` runs after the legacy devices are on the bus
/// and before the command line is written: that is where virtio-mmio devices are added.
/// `snapshot`: where SIGUSR2 writes the VM (none: SIGUSR2 is noted and ignored).
pub fn run(
    mut config: VmConfig,
    snapshot: Option<SnapshotTarget>,
    timeline: Arc<BootTimeline>,
    loaded: impl FnOnce(Option<&LoadedDigests>) -> Result<(), BootError>,
    attach_devices: impl FnOnce(&mut DeviceContext<'_>) -> Result<(), BootError>,
) -> Result<ExitReason, BootError> {
    let kernel_err = |source| BootError::Kernel {
        path: config.kernel_path.display().to_string(),
        source,
    };

    // Memory and kernel first: no VM exists until the kernel is in place.
    let memory = vm::create_guest_memory(config.mem_bytes)?;
    let highmem = GuestAddress(layout::HIMEM_START);
    let (kernel, kernel_digest) = if config.hash_images {
        let (kernel, digest) = config
            .kernel
            .load_kernel_hashed(&memory, highmem)
            .map_err(kernel_err)?;
        (kernel, Some(digest))
    } else {
        let kernel = config
            .kernel
            .load_kernel(&memory, &config.kernel_info, highmem)
            .map_err(kernel_err)?;
        (kernel, None)
    };
    let ceiling = layout::low_ram_end(config.mem_bytes);
    let (initrd, initrd_digest) = match config.initrd.as_mut() {
        None => (None, None),
        Some(image) => {
            let (addr, digest) = if config.hash_images {
                let (addr, digest) = image
                    .load_initrd_hashed(&memory, kernel.end, ceiling)
                    .map_err(kernel_err)?;
                (addr, Some(digest))
            } else {
                let addr = image
                    .load_initrd(&memory, kernel.end, ceiling)
                    .map_err(kernel_err)?;
                (addr, None)
            };
            let location = zero_page::InitrdLocation {
                addr: addr.0,
                size: image.len(),
            };
            (Some(location), digest)
        }
    };
    let digests = kernel_digest.map(|kernel| LoadedDigests {
        kernel,
        initramfs: initrd_digest,
    });
    loaded(digests.as_ref())?;
    timeline.mark(Phase::KernelLoaded);
    // The images are in guest memory now; their open files are closed here.
    drop(config.kernel);
    drop(config.initrd.take());
    let loaded = kernel;

    let vm = Vm::new(memory)?;
    timeline.mark(Phase::VmCreated);

    let mut host = HostSide::start(&vm, config.console, &timeline, None)?;

    let mut cmdline = Cmdline::try_from(&config.cmdline, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::BootState(format!("kernel command line: {e}")))?;
    attach_devices(&mut DeviceContext {
        vm: vm.fd(),
        memory: vm.memory(),
        devices: &mut host.devices,
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

    let supported = cpuid::offered(vm.kvm()).map_err(|source| BootError::Kvm {
        what: "KVM_GET_SUPPORTED_CPUID",
        source,
    })?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(vm.fd(), index)?;
        vcpu.configure(&supported, config.vcpus, loaded.entry)?;
        vcpus.push(vcpu);
    }
    timeline.mark(Phase::VcpusReady);
    // What a snapshot binds the guest's CPU to: the CPUID vCPU 0 was given.
    let given_cpu = cpuid::filter_cpuid(&supported, 0, config.vcpus)
        .map(|c| CpuRequirement::of_guest(c.as_slice()))
        .map_err(|e| BootError::BootState(e.to_string()))?;
    host.run_vcpus(vm, vcpus, &timeline, snapshot, given_cpu)
}

/// The host side of a VM, made before any vCPU runs, for a boot and a restore alike: the
/// event channel, the stop flag and the signal thread, the console, and the legacy devices
/// on the bus.
pub struct HostSide {
    events_tx: mpsc::Sender<VmEvent>,
    events_rx: mpsc::Receiver<VmEvent>,
    stop: Arc<AtomicBool>,
    /// The buses; virtio devices are added to them during a boot.
    pub devices: DeviceManager,
    serial: legacy::SharedSerial,
}

impl HostSide {
    /// Starts the signal thread and puts the serial port, i8042 and guest-signal port on
    /// the bus, the serial port writing to `console`.
    pub fn start(
        vm: &Vm,
        console: ConsoleTarget,
        timeline: &Arc<BootTimeline>,
        serial_state: Option<&mvm_devices::legacy::serial::UartState>,
    ) -> Result<Self, BootError> {
        let (events_tx, events_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = VmStopper::new(events_tx.clone(), stop.clone());
        spawn_signal_waiter(stopper.clone())?;
        let console: Box<dyn Write + Send> = match console {
            ConsoleTarget::Stdout => Box::new(io::stdout()),
            ConsoleTarget::File(f) => Box::new(f),
        };
        let mut devices = DeviceManager::new();
        let serial = legacy::attach_legacy_devices(
            vm.fd(),
            &mut devices,
            console,
            timeline,
            &stopper,
            serial_state,
        )?;
        Ok(Self {
            events_tx,
            events_rx,
            stop,
            devices,
            serial,
        })
    }

    /// Starts a thread per vCPU (each under its filter), the console input, puts the main
    /// thread's filter on, and supervises until the VM ends: the first exit event ends it;
    /// a snapshot request (SIGUSR2) pauses it, writes it to `snapshot`, and ends it.
    /// `given_cpu` is what a snapshot binds the guest's CPU to.
    pub fn run_vcpus(
        self,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        timeline: &Arc<BootTimeline>,
        mut snapshot: Option<SnapshotTarget>,
        given_cpu: CpuRequirement,
    ) -> Result<ExitReason, BootError> {
        let Self {
            events_tx,
            events_rx,
            stop,
            devices,
            serial,
        } = self;
        let pause = Arc::new(PauseGate::default());
        let ctx = VcpuContext {
            pio: devices.pio_bus().clone(),
            mmio: devices.mmio_bus().clone(),
            events: events_tx,
            timeline: timeline.clone(),
            stop: stop.clone(),
            pause: pause.clone(),
            saveable_msrs: crate::snapshot::cpu::saveable_msrs(vm.kvm())
                .map_err(|e| BootError::BootState(e.to_string()))?
                .into(),
        };
        if snapshot.is_some() {
            crate::vcpu::install_kick_handler()
                .map_err(host_err("installing the vCPU kick handler"))?;
        }
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let ctx = ctx.clone();
            let name = format!("vcpu{}", vcpu.index());
            let handle = mvm_devices::thread::builder(name.clone())
                .spawn(move || {
                    crate::seccomp::enter(&crate::seccomp::roles::VCPU, &name);
                    vcpu.run(&ctx)
                })
                .map_err(host_err("spawning a vCPU thread"))?;
            threads.push(handle);
        }
        legacy::spawn_console_input(serial.clone())?;
        drop(ctx);
        // Every other thread is running under its own filter; the main thread's goes on last.
        crate::seccomp::enter(&crate::seccomp::roles::MAIN, "main");

        // `vm` stays alive until the process exits, so vCPU threads never run on a
        // closed VM.
        let supervisor = crate::snapshot_taking::Supervisor {
            vm: &vm,
            pause: &pause,
            threads: &threads,
            events: &events_rx,
            devices: &devices,
            serial: &serial,
        };
        let reason = loop {
            match events_rx.recv() {
                Ok(VmEvent::Exit(reason)) => break reason,
                Ok(VmEvent::SnapshotRequested) => {
                    if let Some(reason) = supervisor.on_request(&mut snapshot, &given_cpu) {
                        break reason;
                    }
                }
                // A pause nobody is waiting for (a request already answered).
                Ok(VmEvent::Paused { .. }) => {}
                Err(_) => {
                    break ExitReason::VmmError(
                        "every vCPU thread ended without an exit reason".into(),
                    )
                }
            }
        };
        pause.wake_for_stop();
        std::mem::forget(vm);
        Ok(reason)
    }
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
    /// The VMM itself failed before the VM (the jail): `vmm_error`, status 1.
    Failed(String),
    /// Building or running the VM failed: `vmm_error`, status 1, and a `vm_exit` event.
    VmFailed(BootError),
}

/// Everything ready before the jail: the configuration read (and, with a plan,
/// measured) and every device's backend open.
#[derive(Debug)]
pub struct Prepared {
    /// The VM to boot.
    pub config: VmConfig,
    /// The verified plan's id; `None` with `--dev`.
    pub plan_id: Option<String>,
    /// The verified plan's id and payload digest, which a snapshot is bound to.
    pub plan_binding: Option<PlanBinding>,
    /// What the verified plan pins (for an artifact-bound snapshot).
    pub artifacts: Option<mvm_loader::plan::Artifacts>,
    /// Every device's backend open; pinned disks with their verifiers.
    pub devices: OpenDevices,
    /// Verified boot's last check, once the images are loaded (hashed); `None` with
    /// `--dev`.
    pub measurement: Option<PendingMeasurement>,
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
    let plan_binding = plan.as_ref().map(|p| PlanBinding {
        id: p.plan_id().to_owned(),
        digest: p.verified.digest,
    });
    let artifacts = plan.as_ref().map(|p| p.plan().artifacts.clone());
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
    let measurement = match &plan {
        Some(p) => Some(verified_boot::measure(p, &mut config).map_err(refused)?),
        None => None,
    };
    let mut devices = devices::open(&args.devices, plan.as_ref().map(BootPlan::plan))
        .map_err(|e| Stop::Invalid(e.to_string()))?;
    verified_boot::attach_verity(plan, &mut devices.disks, events);
    Ok(Prepared {
        config,
        plan_id,
        plan_binding,
        artifacts,
        devices,
        measurement,
    })
}

/// The whole `mvm-vmm` command: validate, boot, supervise, report. Returns the
/// process exit status; the caller exits with it. `timeline` has `args_parsed` marked
/// (by `main`, as clap returns).
///
/// Every step is a `Result`; the first [`Stop`], or the VM's end, is reported here and
/// nowhere else: the boot report, one line on stderr, a `boot_refused` or `vm_exit` event.
pub fn run_cli(args: Args, timeline: Arc<BootTimeline>) -> i32 {
    if let Err(e) = args.check() {
        eprintln!("mvm-vmm: {e}");
        return STATUS_BAD_ARGUMENTS;
    }
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
    let events = match crate::seccomp::init()
        .map_err(|e| e.to_string())
        .and_then(|_| {
            EventLog::open(args.verify.events.as_deref()).map_err(|e| format!("--events: {e}"))
        }) {
        Ok(events) => events,
        Err(e) => {
            eprintln!("mvm-vmm: {e}");
            return STATUS_BAD_ARGUMENTS;
        }
    };
    event_log::route_device_events(&events);
    let mut held = Held::default();
    let ended = boot_and_supervise(&args, &timeline, &events, &mut held);
    let (reason, message, status) = match &ended {
        Ok(exit) => {
            let _ = io::stdout().flush();
            (exit.code_name(), exit.message(), exit.status())
        }
        Err(Stop::Refused { plan_id, refusal }) => {
            verified_boot::boot_refused(&events, plan_id.as_deref(), refusal);
            (
                refusal.reason(),
                format!("mvm-vmm: boot refused ({}): {refusal}", refusal.reason()),
                refusal.status(),
            )
        }
        Err(Stop::Invalid(e)) => (
            "invalid_arguments",
            format!("mvm-vmm: {e}"),
            STATUS_BAD_ARGUMENTS,
        ),
        Err(Stop::Failed(e)) => ("vmm_error", format!("mvm-vmm: {e}"), STATUS_VMM_ERROR),
        Err(Stop::VmFailed(e)) => ("vmm_error", format!("mvm-vmm: {e}"), STATUS_VMM_ERROR),
    };
    timeline.set_exit(reason);
    write_report(&timeline);
    eprintln!("{message}");
    // A VM that was built (or failed while being built) ends with `vm_exit`; a boot
    // stopped before that has said why already (`boot_refused`, or stderr).
    if matches!(ended, Ok(_) | Err(Stop::VmFailed(_))) {
        let exit_reason = timeline.report().exit_reason.unwrap_or_default();
        events.vm_exit(held.plan_id.as_deref(), &exit_reason, status);
    }
    status
}

/// What outlives the boot until [`run_cli`] returns: the plan id (for `vm_exit`) and the
/// vsock socket file's guard (the file goes when the VMM is done with it).
#[derive(Default)]
struct Held {
    plan_id: Option<String>,
    _vsock_socket: Option<vsock::SocketFileGuard>,
}

/// Prepares, jails, boots and supervises; returns how the VM ended, or the [`Stop`] that
/// kept it from running. `plan_id` is set as soon as the plan verifies.
fn boot_and_supervise(
    args: &Args,
    timeline: &Arc<BootTimeline>,
    events: &EventLog,
    held: &mut Held,
) -> Result<ExitReason, Stop> {
    if let Some(dir) = &args.restore {
        return restore::restore_and_supervise(args, dir, timeline, events, held);
    }
    let Prepared {
        config,
        plan_id,
        plan_binding,
        artifacts,
        mut devices,
        measurement,
    } = prepare(args, timeline, events, &HostLimits::of_this_host())?;
    // The snapshot's files are made now: no thread may open a file once the filters are on.
    let snapshot = match &args.snapshot_dir {
        None => None,
        Some(dir) => Some(SnapshotTarget {
            files: SnapshotFiles::create_in(dir)
                .map_err(|e| Stop::Invalid(format!("--snapshot-dir {}: {e}", dir.display())))?,
            // A warm start's snapshot is bound to what was measured, not to this plan.
            plan: plan_binding.filter(|_| !args.snapshot_bind_artifacts),
            artifacts: artifacts.filter(|_| args.snapshot_bind_artifacts),
            epoch: args.snapshot_epoch.unwrap_or(0),
            continue_after: args.snapshot_continue,
        }),
    };
    held.plan_id = plan_id.clone();
    held._vsock_socket = devices.vsock_socket.take();
    // Jail call site: every file is open; the VMM is still one thread.
    let image_bytes = config
        .kernel
        .len()
        .saturating_add(config.initrd.as_ref().map_or(0, Image::len));
    let jail = jail_plan(args, &devices, config.vcpus, config.mem_bytes, image_bytes);
    let state = crate::jail::start(&args.jail, &jail).map_err(|e| Stop::Failed(e.to_string()))?;
    tracing::debug!(?state, "jail entered");
    // The jail forked: a verified disk's lease breaks must reach this process, and so
    // must the snapshot memory file's.
    for disk in &devices.disks {
        disk.claim_lease_signals();
    }
    if let Some(target) = &snapshot {
        target
            .files
            .claim_lease_signals()
            .map_err(|e| Stop::Failed(format!("the snapshot memory file's lease: {e}")))?;
    }
    report_jail(timeline, state);
    devices.report_metrics(timeline);
    // A refusal at the last check of verified boot (the loaded images' digests) is kept
    // here and reported as a refusal, not as a VM failure.
    let mut refusal = None;
    let checked = |digests: Option<&LoadedDigests>| -> Result<(), BootError> {
        let (Some(pending), Some(digests)) = (measurement, digests) else {
            return Ok(());
        };
        pending.complete(digests, timeline, events).map_err(|r| {
            refusal = Some(r);
            BootError::Refused
        })
    };
    let ended = run(config, snapshot, timeline.clone(), checked, move |ctx| {
        devices.attach(ctx)
    });
    match (ended, refusal) {
        (_, Some(refusal)) => Err(Stop::Refused {
            plan_id,
            refusal: Box::new(refusal),
        }),
        (ended, None) => ended.map_err(Stop::VmFailed),
    }
}

/// What the jail needs to know of this VM: the vsock socket's directory (guest-initiated
/// connections go to `<uds>_<port>` by path) and file, the net device, and the limits.
fn jail_plan(
    args: &Args,
    devices: &OpenDevices,
    vcpus: u8,
    mem_bytes: u64,
    image_bytes: u64,
) -> crate::jail::JailPlan {
    crate::jail::JailPlan {
        keep_dirs: args
            .devices
            .vsock
            .as_ref()
            .and_then(|v| crate::jail::parent_dir(&v.uds_path))
            .into_iter()
            .collect(),
        cleanup_files: args
            .devices
            .vsock
            .iter()
            .map(|v| v.uds_path.clone())
            .collect(),
        has_net: devices.net.is_some(),
        // main, signals, console-in, one per vCPU and per device.
        threads: u64::from(vcpus)
            .saturating_add(3)
            .saturating_add(devices.max_threads()),
        vcpus: u64::from(vcpus),
        mem_bytes,
        image_bytes,
    }
}

/// Puts the jail the VMM entered into the boot report.
fn report_jail(timeline: &BootTimeline, state: crate::jail::JailState) {
    if let Some(kind) = state.kind {
        timeline.set_jail(crate::boot_report::JailReport {
            kind: kind.name(),
            uid: state.uid,
            gid: state.gid,
            pid_namespace: true,
            cgroup: state.cgroup.map(|c| c.display().to_string()),
        });
    }
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
    use mvm_loader::measure::Sha256Digest;
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
        let mut p = prepare(&args, &timeline, &log, &HOST).unwrap();
        assert_eq!((p.config.vcpus, p.config.mem_bytes), (2, 256 << 20));
        assert_eq!(p.plan_id.as_deref(), Some("config-test"));
        assert!(p.config.hash_images);
        // The images are measured as they are loaded: not yet.
        let r = timeline.report();
        assert!(
            r.plan_verified.is_some() && r.artifacts_measured.is_none(),
            "{r:?}"
        );
        assert!(!std::fs::read_to_string(&events)
            .unwrap_or_default()
            .contains("boot_verified"));
        // Loaded hashed, the digest matches: artifacts_measured, then boot_verified.
        let memory = crate::vm::create_guest_memory(p.config.mem_bytes).unwrap();
        let (_, digest) = p
            .config
            .kernel
            .load_kernel_hashed(&memory, GuestAddress(layout::HIMEM_START))
            .unwrap();
        assert_eq!(digest, Sha256Digest::of(&std::fs::read(&k).unwrap()));
        let loaded = LoadedDigests {
            kernel: digest,
            initramfs: None,
        };
        p.measurement
            .take()
            .unwrap()
            .complete(&loaded, &timeline, &log)
            .unwrap();
        assert!(timeline.report().artifacts_measured.is_some());
        assert!(std::fs::read_to_string(&events)
            .unwrap()
            .contains("boot_verified"));
        assert_phases_in_order(&timeline);

        // Bytes that are not the plan's (a file changed after the header check): the
        // kernel_mismatch refusal, and no boot_verified.
        let plan = sign("a3");
        let a = argv(&plan, &[]);
        let (args, timeline) = parsed(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let p = prepare(&args, &timeline, &log, &HOST).unwrap();
        let other = LoadedDigests {
            kernel: Sha256Digest::of(b"another kernel"),
            initramfs: None,
        };
        let refusal = p
            .measurement
            .unwrap()
            .complete(&other, &timeline, &log)
            .unwrap_err();
        assert_eq!(refusal.reason(), "kernel_mismatch");
        assert!(timeline.report().artifacts_measured.is_none());

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
}
