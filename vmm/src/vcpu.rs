//! vCPUs: creation, boot configuration, and the `KVM_RUN` loop each vCPU
//! thread runs.
//!
//! Port I/O and MMIO exits are dispatched synchronously to the buses. An
//! access no device claims reads as all-ones and writes are dropped (what a PC
//! does for an empty port). Everything that ends the VM is reported to the
//! supervisor as a [`VmEvent`]; the loop then returns. Fatal exits carry the
//! vCPU's registers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{
    CpuId, KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use mvm_devices::bus::Bus;
use vm_memory::GuestAddress;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::boot_report::{BootTimeline, Phase};
use crate::exit::ExitReason;
use crate::snapshot::cpu::{self as cpu_state, VcpuState};

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

    /// Asks the supervisor for a snapshot (SIGUSR2).
    pub fn request_snapshot(&self) {
        let _ = self.events.send(VmEvent::SnapshotRequested);
    }

    /// Ends the VM with `reason` (the first reason wins).
    pub fn stop(&self, reason: ExitReason) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            let _ = self.events.send(VmEvent::Exit(reason));
        }
    }
}

/// What vCPU threads and devices tell the supervisor.
#[derive(Debug)]
pub enum VmEvent {
    /// The VM is over.
    Exit(ExitReason),
    /// The host asked for a snapshot (SIGUSR2).
    SnapshotRequested,
    /// A vCPU stopped at a [`PauseGate`] request; its state, or why it could not be
    /// read. It waits at the gate until [`PauseGate::resume`] or the VM's end.
    Paused {
        /// The vCPU's index.
        vcpu: u8,
        /// Its state (boxed: the XSAVE area alone is 4 KiB).
        state: Result<Box<VcpuState>, String>,
    },
}

/// The real-time signal that knocks a vCPU thread out of `KVM_RUN` (offset from
/// `SIGRTMIN`). Its handler does nothing: the point is `KVM_RUN` returning `EINTR`.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's (empty) handler, once per process, before vCPU threads
/// start.
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    let signal = vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET;
    vmm_sys_util::signal::register_signal_handler(signal, on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Where vCPUs stop for a snapshot. The supervisor raises it ([`PauseGate::request`])
/// and kicks each vCPU thread out of `KVM_RUN`; a vCPU that sees it completes the port or
/// MMIO access it was in, reads its own state, reports [`VmEvent::Paused`], and waits
/// here until [`PauseGate::resume`] (it runs on) or the VM's stop flag (it returns).
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    /// Bumped by every resume; a waiter leaves when it changes.
    generation: Mutex<u64>,
    changed: Condvar,
}

impl PauseGate {
    /// Asks every vCPU to pause at its next exit from `KVM_RUN`.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// True while a pause is asked for.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Lets every paused vCPU run on.
    pub fn resume(&self) {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        self.requested.store(false, Ordering::Release);
        *generation = generation.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Wakes every waiter so it can see the VM's stop flag.
    pub fn wake_for_stop(&self) {
        let _guard = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Blocks until a resume or `stop`; true to run on.
    fn wait(&self, stop: &AtomicBool) -> bool {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let at = *generation;
        while *generation == at && !stop.load(Ordering::Acquire) {
            generation = self
                .changed
                .wait(generation)
                .unwrap_or_else(|p| p.into_inner());
        }
        !stop.load(Ordering::Acquire)
    }
}

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vcpu {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// CPUID could not be built.
    #[error("vcpu {index}: {source}")]
    Cpuid {
        /// vCPU index.
        index: u8,
        /// Why.
        source: cpuid::CpuidError,
    },
    /// KVM accepted fewer MSRs than given.
    #[error(
        "vcpu {index}: KVM_SET_MSRS set {set} of {total} MSRs; first refused: {first_refused:#x}"
    )]
    Msrs {
        /// vCPU index.
        index: u8,
        /// How many KVM took.
        set: usize,
        /// How many were given.
        total: usize,
        /// Index of the first MSR KVM refused.
        first_refused: u32,
    },
    /// Building the MSR list failed.
    #[error("vcpu {index}: building the MSR list failed: {detail}")]
    MsrList {
        /// vCPU index.
        index: u8,
        /// Why.
        detail: String,
    },
    /// LAPIC register access out of range (cannot happen with KVM's page).
    #[error("vcpu {index}: {source}")]
    Lapic {
        /// vCPU index.
        index: u8,
        /// Why.
        source: interrupts::LapicRegisterError,
    },
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// What a running vCPU needs from the VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Where to report the end of the VM.
    pub events: Sender<VmEvent>,
    /// Boot timeline (vCPU 0 records the first `KVM_RUN`).
    pub timeline: Arc<BootTimeline>,
    /// Set when the VM is ending: every vCPU loop returns at its next exit.
    pub stop: Arc<AtomicBool>,
    /// Where vCPUs stop for a snapshot.
    pub pause: Arc<PauseGate>,
    /// The MSRs a paused vCPU saves ([`cpu_state::saveable_msrs`]).
    pub saveable_msrs: Arc<[u32]>,
}

/// What one exit asks the loop to do next.
enum Next {
    Continue,
    End(ExitReason),
    Fatal { kind: &'static str, detail: String },
}

impl Vcpu {
    /// Creates vCPU `index` (its APIC id).
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self { index, fd })
    }

    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU handle.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID (from `supported`, for this vCPU of `count`), MSRs, FPU,
    /// LAPIC LINT pins, and the long-mode registers entering at `entry`.
    pub fn configure(
        &self,
        supported: &CpuId,
        count: u8,
        entry: GuestAddress,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let cpuid = cpuid::filter_cpuid(supported, index, count)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;

        let msrs = msr::boot_msrs().map_err(|e| VcpuError::MsrList {
            index,
            detail: format!("{e:?}"),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        let total = msrs.as_slice().len();
        if set != total {
            let first_refused = msrs.as_slice().get(set).map_or(0, |e| e.index);
            return Err(VcpuError::Msrs {
                index,
                set,
                total,
                first_refused,
            });
        }

        self.fd
            .set_fpu(&regs::reset_fpu())
            .map_err(self.kvm_err("KVM_SET_FPU"))?;
        let sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&regs::long_mode_sregs(&sregs))
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::entry_regs(entry))
            .map_err(self.kvm_err("KVM_SET_REGS"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        interrupts::set_lint(&mut lapic).map_err(|source| VcpuError::Lapic { index, source })?;
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// The registers, formatted for a fatal-exit report.
    pub fn dump_registers(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => regs::format_registers(&r, &s),
            (Err(e), _) | (_, Err(e)) => format!("(registers unavailable: {e})"),
        }
    }

    /// Runs the vCPU until the VM ends; reports how it ended on `ctx.events`
    /// (unless another thread already stopped the VM).
    pub fn run(mut self, ctx: &VcpuContext) {
        let index = self.index;
        let reason = loop {
            if ctx.stop.load(Ordering::Acquire) {
                return;
            }
            if ctx.pause.is_requested() {
                if !self.pause(ctx) {
                    return;
                }
                continue;
            }
            if index == 0 {
                ctx.timeline.mark(Phase::FirstKvmRun);
            }
            match self.run_once(ctx) {
                Next::Continue => {}
                Next::End(reason) => break reason,
                Next::Fatal { kind, detail } => {
                    break ExitReason::VcpuFatal {
                        vcpu: index,
                        kind,
                        detail,
                        registers: self.dump_registers(),
                    }
                }
            }
        };
        if !ctx.stop.swap(true, Ordering::AcqRel) {
            // The supervisor may be gone already; nothing else to tell.
            let _ = ctx.events.send(VmEvent::Exit(reason));
        }
    }

    /// Stops here for a snapshot: finishes the access the last exit was in (a `KVM_RUN`
    /// with `immediate_exit` set completes it and returns at once), reads the state,
    /// reports it, and waits at the gate. False when the VM ended meanwhile.
    fn pause(&mut self, ctx: &VcpuContext) -> bool {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing the last exit before pausing: {e}")),
            Ok(exit) => Err(format!(
                "KVM_RUN with immediate_exit returned an exit ({exit:?})"
            )),
        };
        self.fd.set_kvm_immediate_exit(0);
        let state = completed.and_then(|()| {
            cpu_state::save(&self.fd, self.index, &ctx.saveable_msrs)
                .map(Box::new)
                .map_err(|e| e.to_string())
        });
        if ctx
            .events
            .send(VmEvent::Paused {
                vcpu: self.index,
                state,
            })
            .is_err()
        {
            return false;
        }
        ctx.pause.wait(&ctx.stop)
    }

    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return "internal error".to_string();
        }
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
        // `internal` member of the exit union; reading plain integers from it
        // is sound.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = usize::try_from(internal.ndata)
            .unwrap_or(0)
            .min(internal.data.len());
        let data: Vec<String> = internal
            .data
            .iter()
            .take(n)
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "KVM_EXIT_INTERNAL_ERROR suberror {} data [{}]",
            internal.suberror,
            data.join(", ")
        )
    }

    fn run_once(&mut self, ctx: &VcpuContext) -> Next {
        let index = self.index;
        let next = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if ctx.pio.read(u64::from(port), data).is_err() {
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    if let Err(e) = ctx.pio.write(u64::from(port), data) {
                        tracing::trace!("vcpu {index}: port write dropped: {e}");
                    }
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if ctx.mmio.read(addr, data).is_err() {
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if let Err(e) = ctx.mmio.write(addr, data) {
                        tracing::debug!("vcpu {index}: MMIO write dropped: {e}");
                    }
                    Next::Continue
                }
                VcpuExit::Shutdown => Next::End(ExitReason::TripleFault { vcpu: index }),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        Next::End(ExitReason::SystemEvent { vcpu: index, kind })
                    }
                    KVM_SYSTEM_EVENT_CRASH => Next::Fatal {
                        kind: "unhandled_exit",
                        detail: "KVM_SYSTEM_EVENT_CRASH".to_string(),
                    },
                    other => Next::Fatal {
                        kind: "unhandled_exit",
                        detail: format!("KVM_EXIT_SYSTEM_EVENT type {other}"),
                    },
                },
                VcpuExit::InternalError => Next::Fatal {
                    kind: "internal_error",
                    detail: String::new(),
                },
                VcpuExit::FailEntry(reason, cpu) => Next::Fatal {
                    kind: "fail_entry",
                    detail: format!(
                        "KVM_EXIT_FAIL_ENTRY hardware_entry_failure_reason {reason:#x} on host cpu {cpu}"
                    ),
                },
                other => Next::Fatal {
                    kind: "unhandled_exit",
                    detail: format!("{other:?}"),
                },
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => return Next::End(ExitReason::VmmError(format!("vcpu {index}: KVM_RUN failed: {e}"))),
        };
        match next {
            Next::Fatal {
                kind: "internal_error",
                ..
            } => Next::Fatal {
                kind: "internal_error",
                detail: self.internal_error_detail(),
            },
            n => n,
        }
    }
}
