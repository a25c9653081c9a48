//! `--restore DIR`: the VM made again from a sealed snapshot instead of booted.
//!
//! The same order as a boot, with the snapshot in the kernel's place: the keys read, the
//! plan verified (signature and window; not its nonce, which the boot that made the
//! snapshot spent), then every check of the snapshot ([`crate::snapshot::bundle::open`]:
//! the seal, the VMM build, the plan, the epoch, this host's CPU, the layout, both files'
//! digests), all before the jail and before a byte of guest memory is mapped. A
//! `snapshot_restored` event (the digests, the epoch) is written before the guest's
//! first instruction, as `boot_verified` is for a boot. Then the jail, the memory mapped
//! `MAP_PRIVATE`, the VM's and each vCPU's state set, and the same vCPU threads, filters
//! and supervision as a boot ([`super::HostSide`]).

use std::sync::Arc;

use serde_json::Map;

use linux_loader::cmdline::Cmdline;

use super::{Held, HostSide, Stop};
use crate::boot_report::{BootTimeline, Phase};
use crate::cli::Args;
use crate::config::ConsoleTarget;
use crate::devices::{DeviceContext, OpenDevices};
use crate::error::BootError;
use crate::event_log::EventLog;
use crate::exit::ExitReason;
use crate::snapshot::bundle::{self, SnapshotFiles};
use crate::snapshot::manifest::{Expect, PlanBinding};
use crate::snapshot::{cpu, SnapshotError};
use crate::snapshot_taking::SnapshotTarget;
use crate::vcpu::Vcpu;
use crate::verified_boot::{self, BootPlan, Refusal};

fn refused(plan_id: Option<&str>, refusal: Refusal) -> Stop {
    Stop::Refused {
        plan_id: plan_id.map(str::to_owned),
        refusal: Box::new(refusal),
    }
}

fn snapshot_refusal(e: SnapshotError) -> Refusal {
    match e {
        SnapshotError::Refused { reason, detail } => Refusal::Snapshot { reason, detail },
        other => Refusal::Snapshot {
            reason: "snapshot_format",
            detail: other.to_string(),
        },
    }
}

/// Checks, jails, restores and supervises; how the VM ended, or why it never ran.
/// `held` gets the plan id as soon as the plan verifies, and the vsock socket's guard.
pub fn restore_and_supervise(
    args: &Args,
    dir: &std::path::Path,
    timeline: &Arc<BootTimeline>,
    events: &EventLog,
    held: &mut Held,
) -> Result<ExitReason, Stop> {
    if args.verify.trust.is_empty() {
        return Err(Stop::Invalid(
            "--restore needs --trust PUBKEY: the key that sealed the snapshot".into(),
        ));
    }
    let trusted = verified_boot::read_trusted(&args.verify.trust).map_err(|r| refused(None, r))?;
    let boot_plan = match (&args.verify.plan, args.verify.dev) {
        (Some(path), _) => Some(
            verified_boot::verify_plan_for_restore(args, path, &trusted, timeline)
                .map_err(|r| refused(None, r))?,
        ),
        (None, true) => {
            eprintln!(
                "mvm-vmm: WARNING: --dev: restoring a snapshot of a development boot; \
                 nothing it holds was verified when it booted."
            );
            None
        }
        (None, false) => return Err(refused(None, Refusal::NoPlan)),
    };
    let plan = boot_plan.as_ref().map(|p| PlanBinding {
        id: p.plan_id().to_owned(),
        digest: p.verified.digest,
    });
    let plan_id = plan.as_ref().map(|p| p.id.clone());
    held.plan_id.clone_from(&plan_id);

    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Stop::Failed(format!("opening /dev/kvm failed: {e}")))?;
    let host_cpuid = crate::arch::x86_64::cpuid::offered(&kvm)
        .map_err(|e| Stop::Failed(format!("KVM_GET_SUPPORTED_CPUID failed: {e}")))?;
    drop(kvm);
    let pins = boot_plan.as_ref().map(|p| {
        let plan = p.plan();
        (
            &plan.artifacts,
            plan.resources.vcpus,
            u64::from(plan.resources.memory_mib) << 20,
        )
    });
    let expect = Expect {
        trusted: &trusted,
        plan: plan.as_ref(),
        pins,
        min_epoch: args.restore_min_epoch.unwrap_or(0),
        host_cpuid: &host_cpuid,
    };
    let opened =
        bundle::open(dir, &expect).map_err(|e| refused(plan_id.as_deref(), snapshot_refusal(e)))?;
    // A warm start's snapshot (bound to artifacts, not to a plan) is restored under a
    // fresh plan: held to a boot's window and nonce, before anything is mapped.
    if opened.manifest.artifacts.is_some() {
        if let (Some(path), Some(p)) = (&args.verify.plan, &boot_plan) {
            verified_boot::spend_fresh_plan(args, path, &trusted, p.verified.digest)
                .map_err(|r| refused(plan_id.as_deref(), r))?;
        }
    }

    // The devices, from the same arguments as the boot's: the snapshot's in the same order.
    let mut devices = crate::devices::open(&args.devices, boot_plan.as_ref().map(BootPlan::plan))
        .map_err(|e| Stop::Invalid(e.to_string()))?;
    let given: Vec<&str> = devices.names();
    let saved: Vec<&str> = opened
        .state
        .devices
        .virtio
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    if given != saved {
        return Err(refused(
            plan_id.as_deref(),
            Refusal::Snapshot {
                reason: "device_mismatch",
                detail: format!(
                    "the snapshot's virtio devices are {saved:?}, the command line gives {given:?}"
                ),
            },
        ));
    }
    verified_boot::attach_verity(boot_plan, &mut devices.disks, events);
    timeline.mark(Phase::ArtifactsMeasured);
    let manifest = &opened.manifest;
    let mut f = Map::new();
    f.insert(
        "memory_sha256".into(),
        manifest.memory.sha256.to_string().into(),
    );
    f.insert(
        "state_sha256".into(),
        manifest.state.sha256.to_string().into(),
    );
    f.insert("epoch".into(), manifest.epoch.into());
    f.insert("vmm_build".into(), manifest.vmm_build.clone().into());
    f.insert("vcpus".into(), manifest.vcpus.into());
    f.insert("mem_bytes".into(), manifest.mem_bytes.into());
    // "hashed": every chunk read and compared; "unchanged": the file the VMM wrote,
    // untouched since by its sealed identity (docs/snapshots.md).
    f.insert(
        "memory_check".into(),
        if opened.memory_hashed {
            "hashed"
        } else {
            "unchanged"
        }
        .into(),
    );
    f.insert("devices".into(), saved.clone().into());
    events.emit("snapshot_restored", plan_id.as_deref(), f);

    let console = crate::config::console_target(args.console_log.as_deref())
        .map_err(|e| Stop::Invalid(e.to_string()))?;
    // A snapshot of this VM in turn: files made now, as for a boot.
    let snapshot = match &args.snapshot_dir {
        None => None,
        Some(d) => Some(SnapshotTarget {
            files: SnapshotFiles::create_in(d)
                .map_err(|e| Stop::Invalid(format!("--snapshot-dir {}: {e}", d.display())))?,
            plan: plan.clone(),
            artifacts: None,
            epoch: args.snapshot_epoch.unwrap_or(0),
            continue_after: args.snapshot_continue,
        }),
    };
    held._vsock_socket = devices.vsock_socket.take();
    let jail = super::jail_plan(args, &devices, manifest.vcpus, manifest.mem_bytes, 0);
    let state = crate::jail::start(&args.jail, &jail).map_err(|e| Stop::Failed(e.to_string()))?;
    for disk in &devices.disks {
        disk.claim_lease_signals();
    }
    crate::snapshot::memory::claim_lease_signals(&opened.memory)
        .map_err(|e| Stop::Failed(format!("the memory file's lease: {e}")))?;
    if let Some(target) = &snapshot {
        target
            .files
            .claim_lease_signals()
            .map_err(|e| Stop::Failed(format!("the next snapshot's memory file lease: {e}")))?;
    }
    super::report_jail(timeline, state);
    devices.report_metrics(timeline);
    restore_vm(opened, devices, console, snapshot, timeline).map_err(Stop::VmFailed)
}

/// Maps the memory, sets the VM's and each vCPU's state, attaches the devices with their
/// state, and runs the vCPUs.
fn restore_vm(
    opened: bundle::Opened,
    devices: OpenDevices,
    console: ConsoleTarget,
    snapshot: Option<SnapshotTarget>,
    timeline: &Arc<BootTimeline>,
) -> Result<ExitReason, BootError> {
    let snapshot_err = |e: SnapshotError| BootError::BootState(format!("restoring: {e}"));
    let vm = bundle::restore_vm(&opened).map_err(snapshot_err)?;
    timeline.mark(Phase::VmCreated);
    // The vCPUs' state first, every device's after: a device interrupts as soon as it
    // gets its state back (COM1 raises a pending interrupt in `from_state`, a virtio
    // transport raises its saved InterruptStatus, vsock's worker sends its
    // TRANSPORT_RESET), and an interrupt raised before `KVM_SET_LAPIC` is lost (no vCPU
    // to deliver it to yet, or its IRR overwritten). With EVENT_IDX the device then
    // waits for a driver that never heard of the used buffer.
    let mut vcpus = Vec::with_capacity(opened.state.vcpus.len());
    for state in &opened.state.vcpus {
        let vcpu = Vcpu::new(vm.fd(), state.index)?;
        cpu::restore(vcpu.fd(), state).map_err(snapshot_err)?;
        vcpus.push(vcpu);
    }
    let mut host = HostSide::start(&vm, console, timeline, opened.state.devices.serial.as_ref())?;
    // The guest's command line is in its memory already; the devices' parameters go
    // nowhere.
    let mut unused = Cmdline::new(crate::layout::CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::BootState(format!("command line: {e}")))?;
    devices.attach(&mut DeviceContext {
        vm: vm.fd(),
        memory: vm.memory(),
        devices: &mut host.devices,
        cmdline: &mut unused,
    })?;
    for (slot, saved) in host
        .devices
        .virtio_slots()
        .iter()
        .zip(&opened.state.devices.virtio)
    {
        if slot.name != saved.name || slot.base != saved.mmio_base {
            return Err(BootError::BootState(format!(
                "restoring: {} at {:#x} where the snapshot has {} at {:#x}",
                slot.name, slot.base, saved.name, saved.mmio_base
            )));
        }
        slot.transport
            .lock()
            .map_err(|_| BootError::BootState(format!("{}: transport lock poisoned", slot.name)))?
            .restore(&saved.transport)
            .map_err(|e| BootError::BootState(format!("restoring {e}")))?;
    }
    timeline.mark(Phase::VcpusReady);
    let given_cpu = opened.manifest.cpu.clone();
    host.run_vcpus(vm, vcpus, timeline, snapshot, given_cpu)
}
