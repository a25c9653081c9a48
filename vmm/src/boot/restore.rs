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

use super::{HostSide, Stop};
use crate::boot_report::{BootTimeline, Phase};
use crate::cli::Args;
use crate::config::ConsoleTarget;
use crate::error::BootError;
use crate::event_log::EventLog;
use crate::exit::ExitReason;
use crate::snapshot::bundle::{self, SnapshotFiles};
use crate::snapshot::manifest::{Expect, PlanBinding};
use crate::snapshot::{cpu, SnapshotError};
use crate::snapshot_taking::SnapshotTarget;
use crate::vcpu::Vcpu;
use crate::verified_boot::{self, Refusal};

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
/// `plan_id` is set as soon as the plan verifies.
pub fn restore_and_supervise(
    args: &Args,
    dir: &std::path::Path,
    timeline: &Arc<BootTimeline>,
    events: &EventLog,
    plan_id_out: &mut Option<String>,
) -> Result<ExitReason, Stop> {
    if args.verify.trust.is_empty() {
        return Err(Stop::Invalid(
            "--restore needs --trust PUBKEY: the key that sealed the snapshot".into(),
        ));
    }
    let trusted = verified_boot::read_trusted(&args.verify.trust).map_err(|r| refused(None, r))?;
    let plan = match (&args.verify.plan, args.verify.dev) {
        (Some(path), _) => {
            let verified = verified_boot::verify_plan_for_restore(path, &trusted, timeline)
                .map_err(|r| refused(None, r))?;
            Some(PlanBinding {
                id: verified.plan.plan_id.clone(),
                digest: verified.digest,
            })
        }
        (None, true) => {
            eprintln!(
                "mvm-vmm: WARNING: --dev: restoring a snapshot of a development boot; \
                 nothing it holds was verified when it booted."
            );
            None
        }
        (None, false) => return Err(refused(None, Refusal::NoPlan)),
    };
    let plan_id = plan.as_ref().map(|p| p.id.clone());
    plan_id_out.clone_from(&plan_id);

    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Stop::Failed(format!("opening /dev/kvm failed: {e}")))?;
    let host_cpuid = crate::arch::x86_64::cpuid::offered(&kvm)
        .map_err(|e| Stop::Failed(format!("KVM_GET_SUPPORTED_CPUID failed: {e}")))?;
    drop(kvm);
    let expect = Expect {
        trusted: &trusted,
        plan: plan.as_ref(),
        min_epoch: args.restore_min_epoch,
        host_cpuid: &host_cpuid,
    };
    let opened =
        bundle::open(dir, &expect).map_err(|e| refused(plan_id.as_deref(), snapshot_refusal(e)))?;
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
            epoch: args.snapshot_epoch,
            virtio_devices: Vec::new(),
        }),
    };
    let jail = crate::jail::JailPlan {
        keep_dirs: Vec::new(),
        cleanup_files: Vec::new(),
        has_net: false,
        // main, signals, console-in, one per vCPU.
        threads: u64::from(manifest.vcpus).saturating_add(3),
        vcpus: u64::from(manifest.vcpus),
        mem_bytes: manifest.mem_bytes,
        image_bytes: 0,
    };
    let state = crate::jail::start(&args.jail, &jail).map_err(|e| Stop::Failed(e.to_string()))?;
    super::report_jail(timeline, state);
    restore_vm(opened, console, snapshot, timeline).map_err(Stop::VmFailed)
}

/// Maps the memory, sets the VM's and each vCPU's state, and runs it.
fn restore_vm(
    opened: bundle::Opened,
    console: ConsoleTarget,
    snapshot: Option<SnapshotTarget>,
    timeline: &Arc<BootTimeline>,
) -> Result<ExitReason, BootError> {
    let snapshot_err = |e: SnapshotError| BootError::BootState(format!("restoring: {e}"));
    let vm = bundle::restore_vm(&opened).map_err(snapshot_err)?;
    timeline.mark(Phase::VmCreated);
    let host = HostSide::start(&vm, console, timeline)?;
    let mut vcpus = Vec::with_capacity(opened.state.vcpus.len());
    for state in &opened.state.vcpus {
        let vcpu = Vcpu::new(vm.fd(), state.index)?;
        cpu::restore(vcpu.fd(), state).map_err(snapshot_err)?;
        vcpus.push(vcpu);
    }
    timeline.mark(Phase::VcpusReady);
    let given_cpu = opened.manifest.cpu.clone();
    host.run_vcpus(vm, vcpus, timeline, snapshot, given_cpu)
}
