//! The supervisor's side of a snapshot: on SIGUSR2, pause every vCPU, then every virtio
//! device's thread (each finishes the request it is serving and reports its queues'
//! positions), read the serial port's and the VM's state, write the snapshot into the
//! files made at start, and end the VM (or, with `--snapshot-continue`, resume it).
//!
//! A request the VMM cannot honour (no `--snapshot-dir`, a vCPU or device that does not
//! pause, a write that fails) is logged and the VM runs on, everything resumed: a
//! snapshot is never half-taken into a VM that then stops.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use crate::device_manager::DeviceManager;
use crate::devices::legacy::SharedSerial;
use crate::exit::ExitReason;
use crate::snapshot::bundle::{self, Binding, SnapshotFiles};
use crate::snapshot::cpu::VcpuState;
use crate::snapshot::manifest::{CpuRequirement, PlanBinding};
use crate::snapshot::{vm_state, DevicesState, MachineState, VirtioSlotState};
use crate::vcpu::{PauseGate, VmEvent, KICK_SIGNAL_OFFSET};
use crate::vm::Vm;

/// How long the vCPUs get to reach the pause gate.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device thread gets to finish its request and pause (a disk write may be in
/// an fdatasync).
const DEVICE_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a vCPU that has not paused is kicked again.
const KICK_EVERY: Duration = Duration::from_millis(10);

/// Where and under what a snapshot is written.
#[derive(Debug)]
pub struct SnapshotTarget {
    /// The files, created at start.
    pub files: SnapshotFiles,
    /// The plan that booted the VM, if any.
    pub plan: Option<PlanBinding>,
    /// Bind the snapshot to these measured artifacts instead of the plan.
    pub artifacts: Option<mvm_loader::plan::Artifacts>,
    /// `--snapshot-epoch`.
    pub epoch: u64,
    /// `--snapshot-continue`: resume the VM once the snapshot is written.
    pub continue_after: bool,
}

/// What the supervisor lends to a snapshot.
pub struct Supervisor<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// The vCPUs' pause gate.
    pub pause: &'a PauseGate,
    /// The vCPU threads, by index.
    pub threads: &'a [JoinHandle<()>],
    /// The supervisor's event channel.
    pub events: &'a Receiver<VmEvent>,
    /// The buses' devices: the virtio transports.
    pub devices: &'a DeviceManager,
    /// COM1.
    pub serial: &'a SharedSerial,
}

/// How a pause ended when it did not pause every vCPU.
enum NotPaused {
    /// The VM ended meanwhile.
    Ended(ExitReason),
    /// A vCPU could not pause or read its state.
    Failed(String),
}

impl Supervisor<'_> {
    /// Answers one snapshot request; `Some` ends the VM with that reason.
    pub fn on_request(
        &self,
        target: &mut Option<SnapshotTarget>,
        cpu: &CpuRequirement,
    ) -> Option<ExitReason> {
        if target.is_none() {
            tracing::warn!("SIGUSR2: a snapshot was asked for, but there is no --snapshot-dir (or one was already used); the VM runs on");
            return None;
        }
        let started = Instant::now();
        let vcpus = match self.pause_all() {
            Ok(v) => v,
            Err(NotPaused::Ended(reason)) => return Some(reason),
            Err(NotPaused::Failed(why)) => {
                tracing::error!("snapshot failed: {why}; the VM runs on");
                self.pause.resume();
                return None;
            }
        };
        let devices = match self.pause_devices() {
            Ok(d) => d,
            Err(why) => {
                tracing::error!("snapshot failed: {why}; the VM runs on");
                self.pause.resume();
                return None;
            }
        };
        let paused = started.elapsed();
        let target = target.take()?;
        let continue_after = target.continue_after;
        let written = vm_state::save(self.vm.fd()).and_then(|vm| {
            bundle::write(
                target.files,
                self.vm,
                &MachineState { vcpus, vm, devices },
                Binding {
                    plan: target.plan,
                    artifacts: target.artifacts,
                    epoch: target.epoch,
                    cpu: cpu.clone(),
                },
            )
        });
        match written {
            Ok(manifest) => {
                tracing::info!(
                    paused_us = paused.as_micros(),
                    total_us = started.elapsed().as_micros(),
                    memory_sha256 = %manifest.memory.sha256,
                    continue_after,
                    "snapshot written"
                );
                if continue_after {
                    // The files hold a copy: the VM may change its memory again.
                    self.resume_devices(self.devices.virtio_slots().len());
                    self.pause.resume();
                    None
                } else {
                    Some(ExitReason::Snapshotted)
                }
            }
            Err(e) => {
                tracing::error!("snapshot failed: {e}; the VM runs on (the snapshot files are incomplete: no manifest)");
                self.resume_devices(self.devices.virtio_slots().len());
                self.pause.resume();
                None
            }
        }
    }

    /// Pauses each virtio device's thread in slot order and reads the serial port; on a
    /// failure the ones already paused are resumed.
    fn pause_devices(&self) -> Result<DevicesState, String> {
        let mut virtio = Vec::with_capacity(self.devices.virtio_slots().len());
        for (i, slot) in self.devices.virtio_slots().iter().enumerate() {
            let paused = slot
                .transport
                .lock()
                .map_err(|_| format!("{}: its transport lock is poisoned", slot.name))
                .and_then(|mut t| t.pause(DEVICE_PAUSE_TIMEOUT));
            match paused {
                Ok(transport) => virtio.push(VirtioSlotState {
                    name: slot.name.to_owned(),
                    mmio_base: slot.base,
                    transport,
                }),
                Err(why) => {
                    self.resume_devices(i);
                    return Err(why);
                }
            }
        }
        let serial = self
            .serial
            .lock()
            .map(|s| s.state())
            .map_err(|_| "the serial port's lock is poisoned".to_owned());
        match serial {
            Ok(serial) => Ok(DevicesState {
                serial: Some(serial),
                virtio,
            }),
            Err(why) => {
                self.resume_devices(virtio.len());
                Err(why)
            }
        }
    }

    /// Resumes the first `n` virtio devices' threads.
    fn resume_devices(&self, n: usize) {
        for slot in self.devices.virtio_slots().iter().take(n) {
            if let Ok(t) = slot.transport.lock() {
                t.resume();
            }
        }
    }

    /// Raises the gate and kicks every vCPU out of `KVM_RUN` until each has reported its
    /// state.
    fn pause_all(&self) -> Result<Vec<VcpuState>, NotPaused> {
        self.pause.request();
        let signal = vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET;
        let mut states: Vec<Option<VcpuState>> = self.threads.iter().map(|_| None).collect();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while states.iter().any(Option::is_none) {
            for (thread, state) in self.threads.iter().zip(&states) {
                if state.is_none() {
                    // A thread that already ended cannot be kicked; its exit event follows.
                    let _ = thread.kill(signal);
                }
            }
            match self.events.recv_timeout(KICK_EVERY) {
                Ok(VmEvent::Paused { vcpu, state }) => {
                    let slot = states.get_mut(usize::from(vcpu)).ok_or_else(|| {
                        NotPaused::Failed(format!("vcpu {vcpu} is not one of this VM's"))
                    })?;
                    *slot =
                        Some(*state.map_err(|e| NotPaused::Failed(format!("vcpu {vcpu}: {e}")))?);
                }
                Ok(VmEvent::Exit(reason)) => return Err(NotPaused::Ended(reason)),
                Ok(VmEvent::SnapshotRequested) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(NotPaused::Ended(ExitReason::VmmError(
                        "every vCPU thread ended while pausing".into(),
                    )))
                }
            }
            if Instant::now() > deadline && states.iter().any(Option::is_none) {
                return Err(NotPaused::Failed(format!(
                    "a vCPU did not pause within {} s",
                    PAUSE_TIMEOUT.as_secs()
                )));
            }
        }
        Ok(states.into_iter().flatten().collect())
    }
}
