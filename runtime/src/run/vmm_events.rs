//! The VMM's events file read back, and the records that close a run.
//!
//! The VMM hands its events back as a file (`mvm-vmm --events`).
//! [`read_vmm_events_from`] reads its whole lines from where the last read
//! ended and gives each event the run's VM id and admitted plan id (one line
//! is parsed by [`crate::audit::vmm_events`]). When the run is over,
//! [`closing_events`] puts the VMM's later events, `exec_exited` and
//! `vm_exited` in the order they happened: the VMM's `vm_exited`, or one
//! saying why the VM ended ([`vm_ended`]: `vm_process_died` with the status
//! or signal, `boot_refused`, `stopped_by_mvm`). `ended_status` classifies how
//! the workload ended for `exec_exited`, and `measured` checks the VMM's
//! `boot_verified` against the plan before a receipt states it.

use std::io::Read;
use std::path::Path;

use mvm_loader::plan::envelope::SignedPlan;

use super::exit;
use crate::audit::vmm_events::vmm_event;
use crate::audit::{self, AuditEvent, EventKind};
use crate::backend::{RunError, RunOutcome};
use crate::receipt::Measurements;

/// The most of a VMM events file read back.
const MAX_EVENTS_FILE: u64 = 16 << 20;

/// How a run ended, as far as the audit log is concerned.
pub(super) fn ended_status(
    result: &Result<RunOutcome, RunError>,
) -> Option<(i32, Option<&'static str>)> {
    match result {
        Ok(outcome) => Some((exit::for_status(&outcome.status), None)),
        Err(RunError::Timeout(_)) => Some((exit::TIMEOUT, Some("timed_out"))),
        Err(RunError::Interrupted) => Some((exit::INTERRUPTED, Some("interrupted"))),
        Err(RunError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Some((exit::BROKEN_PIPE, Some("output_closed")))
        }
        Err(_) => None,
    }
}

/// Reads the VMM's events file (what is there: a VMM that died mid-run still
/// wrote some) and turns each line into an event for `vm_id` and `plan_id`.
/// A line without a plan id gets the admitted one: the supervisor knows which
/// plan it handed this VMM even when the VMM refused it before trusting it.
pub fn read_vmm_events(path: &Path, plan_id: &str, vm_id: &str) -> Vec<AuditEvent> {
    read_vmm_events_from(path, 0, false, plan_id, vm_id).0
}

/// [`read_vmm_events`] from byte `offset` on; also returns the offset after
/// what was read (where the next read starts). While the VMM runs
/// (`running`), a last line without its newline is being written and is left
/// for the next read.
pub fn read_vmm_events_from(
    path: &Path,
    offset: u64,
    running: bool,
    plan_id: &str,
    vm_id: &str,
) -> (Vec<AuditEvent>, u64) {
    use std::io::{Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let read = file.seek(SeekFrom::Start(offset)).and_then(|_| {
            file.take(MAX_EVENTS_FILE.saturating_sub(offset))
                .read_to_end(&mut bytes)
        });
        if let Err(e) = read {
            tracing::warn!("VMM events {}: {e}", path.display());
        }
    }
    if running {
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(whole);
    }
    let whole = bytes.len();
    let next = offset.saturating_add(u64::try_from(whole).unwrap_or(u64::MAX));
    let text = String::from_utf8_lossy(&bytes);
    let events = text
        .lines()
        .filter_map(|line| {
            let event = vmm_event(line, vm_id);
            if event.is_none() {
                tracing::warn!(
                    line = %crate::terminal::escape_controls(&line.chars().take(200).collect::<String>()),
                    "VMM event not recorded"
                );
            }
            event
        })
        .map(|mut event| {
            if event.plan_id.as_deref().is_none_or(str::is_empty) {
                event.plan_id = Some(plan_id.to_owned());
            }
            event
        })
        .collect();
    (events, next)
}

/// The `vm_exited` mvm writes when the VMM reported none: why the VM ended,
/// as far as `mvm` can tell from how the run ended. `vmm_reported` says
/// whether the VMM wrote any event (it writes `boot_verified` or
/// `boot_refused` before a guest runs): without one, a run that failed for
/// another reason never had a VM (`not_started`).
pub fn vm_ended(
    result: &Result<RunOutcome, RunError>,
    vmm_reported: bool,
    plan_id: &str,
    vm_id: &str,
) -> AuditEvent {
    match result {
        Err(RunError::VmmDied { exit, .. }) => {
            let status = exit.and_then(|e| e.code).unwrap_or(-1);
            let event = AuditEvent::vm_exited(plan_id, vm_id, "vm_process_died", status);
            match exit.and_then(|e| e.signal) {
                Some(signal) => event.field("signal", signal),
                None => event,
            }
        }
        Err(RunError::BootRefused { status, .. }) => {
            AuditEvent::vm_exited(plan_id, vm_id, "boot_refused", *status)
        }
        Ok(_) => AuditEvent::vm_exited(plan_id, vm_id, "stopped_by_mvm", -1),
        Err(e) if !vmm_reported => AuditEvent::vm_exited(plan_id, vm_id, "not_started", -1)
            .field("cause", exit::error_kind(e)),
        Err(e) => AuditEvent::vm_exited(plan_id, vm_id, "stopped_by_mvm", -1)
            .field("cause", exit::error_kind(e)),
    }
}

/// The records that close a run, in the order they happened: the VMM's later
/// events, with `exec_exited` before the VMM's `vm_exited`; when the VMM
/// reported no exit, `exec_exited` and then `fallback`.
pub fn closing_events(
    vmm: Vec<AuditEvent>,
    exec_exited: Option<AuditEvent>,
    fallback: AuditEvent,
) -> Vec<AuditEvent> {
    let mut exited = exec_exited;
    let mut saw_exit = false;
    let mut out = Vec::new();
    for event in vmm {
        if event.kind == EventKind::VmExited && !saw_exit {
            saw_exit = true;
            out.extend(exited.take());
        }
        out.push(event);
    }
    out.extend(exited);
    if !saw_exit {
        out.push(fallback);
    }
    out
}

/// The measurements the VMM reported in `boot_verified`, checked against the
/// plan it was given: a receipt states what was measured, and they must agree.
pub(super) fn measured(events: &[AuditEvent], signed: &SignedPlan) -> Result<Measurements, String> {
    let boot = events
        .iter()
        .find(|e| e.kind == EventKind::BootVerified)
        .ok_or("the VMM reported no verified boot")?;
    let want = Measurements::of_plan(&signed.plan);
    let text = |name: &str| match boot.fields.get(name) {
        Some(audit::FieldValue::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let check = |name: &str, pinned: Option<String>| {
        if text(name) == pinned {
            Ok(())
        } else {
            Err(format!(
                "boot_verified {name} {:?} differs from the plan's {:?}",
                text(name),
                pinned
            ))
        }
    };
    check("kernel", Some(want.kernel.to_string()))?;
    check("initramfs", want.initramfs.map(|d| d.to_string()))?;
    check("cmdline", Some(want.cmdline.to_string()))?;
    check("plan_digest", Some(signed.digest.to_string()))?;
    for (name, root) in &want.disks {
        check(&format!("disk_{name}_root_hash"), Some(root.to_string()))?;
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::FieldValue;
    use crate::backend::{Tier, Timings, WorkloadStatus};
    use mvm_loader::measure::Sha256Digest;

    fn events(kinds: &[EventKind]) -> Vec<AuditEvent> {
        kinds
            .iter()
            .map(|k| AuditEvent::new(*k).plan("p").vm("v"))
            .collect()
    }

    fn kinds(events: &[AuditEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn closing_records_are_in_the_order_they_happened() {
        let exited = AuditEvent::exec_exited(
            "p",
            "v",
            0,
            (Sha256Digest::of(b""), 0),
            (Sha256Digest::of(b""), 0),
        );
        let fallback = AuditEvent::vm_exited("p", "v", "stopped_by_mvm", -1);
        // The VMM's own exit comes after the workload's.
        let out = closing_events(
            events(&[EventKind::DeviceError, EventKind::VmExited]),
            Some(exited.clone()),
            fallback.clone(),
        );
        assert_eq!(
            kinds(&out),
            [
                EventKind::DeviceError,
                EventKind::ExecExited,
                EventKind::VmExited
            ]
        );
        assert!(!out.last().unwrap().fields.contains_key("cause"));
        // No exit from the VMM: mvm's, after the workload's.
        let out = closing_events(Vec::new(), Some(exited), fallback.clone());
        assert_eq!(kinds(&out), [EventKind::ExecExited, EventKind::VmExited]);
        assert_eq!(
            out.last().unwrap().fields["reason"],
            FieldValue::from("stopped_by_mvm")
        );
        // A refused boot: the refusal, and the VM's end.
        let out = closing_events(events(&[EventKind::BootRefused]), None, fallback);
        assert_eq!(kinds(&out), [EventKind::BootRefused, EventKind::VmExited]);
    }

    #[test]
    fn a_vm_that_died_is_recorded_with_its_signal_or_status() {
        let killed: Result<RunOutcome, RunError> = Err(RunError::VmmDied {
            reason: "x".into(),
            log: String::new(),
            exit: Some(crate::backend::ProcessEnd {
                code: None,
                signal: Some(9),
            }),
        });
        let e = vm_ended(&killed, true, "p", "v");
        assert_eq!(e.kind, EventKind::VmExited);
        assert_eq!(e.fields["reason"], FieldValue::from("vm_process_died"));
        assert_eq!(e.fields["signal"], FieldValue::from(9));
        assert_eq!(e.fields["status"], FieldValue::from(-1));
        let exited: Result<RunOutcome, RunError> = Err(RunError::VmmDied {
            reason: "x".into(),
            log: String::new(),
            exit: Some(crate::backend::ProcessEnd {
                code: Some(1),
                signal: None,
            }),
        });
        let e = vm_ended(&exited, true, "p", "v");
        assert_eq!(e.fields["status"], FieldValue::from(1));
        assert!(!e.fields.contains_key("signal"));
        let e = vm_ended(&Err(RunError::Interrupted), true, "p", "v");
        assert_eq!(e.fields["reason"], FieldValue::from("stopped_by_mvm"));
        assert_eq!(e.fields["cause"], FieldValue::from("interrupted"));
        assert!(e.validate().is_ok());
        // Stopped before the VMM said anything: there was no VM.
        let e = vm_ended(&Err(RunError::Interrupted), false, "p", "v");
        assert_eq!(e.fields["reason"], FieldValue::from("not_started"));
        let missing = Err(RunError::Missing("no mvm-vmm".into()));
        let e = vm_ended(&missing, false, "p", "v");
        assert_eq!(e.fields["cause"], FieldValue::from("missing"));
    }

    #[test]
    fn vmm_events_are_read_in_whole_lines_from_where_the_last_read_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let boot = r#"{"event":"boot_verified","plan_id":"p","fields":{"kernel":"sha256:00"}}"#;
        let exit = r#"{"event":"vm_exit","plan_id":"p","fields":{"reason":"poweroff","status":0}}"#;
        // The VMM is halfway through its second line.
        std::fs::write(&path, format!("{boot}\n{}", &exit[..10])).unwrap();
        let (first, at) = read_vmm_events_from(&path, 0, true, "p", "v");
        assert_eq!(kinds(&first), [EventKind::BootVerified]);
        assert_eq!(at, u64::try_from(boot.len() + 1).unwrap());
        // Ended, its last line without a newline: read all the same.
        std::fs::write(&path, format!("{boot}\n{exit}")).unwrap();
        let (rest, end) = read_vmm_events_from(&path, at, false, "p", "v");
        assert_eq!(kinds(&rest), [EventKind::VmExited]);
        assert_eq!(end, std::fs::metadata(&path).unwrap().len());
        assert!(read_vmm_events_from(&path, end, false, "p", "v")
            .0
            .is_empty());
    }

    #[test]
    fn vmm_events_get_the_vm_and_the_admitted_plan_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"event":"boot_refused","fields":{"reason":"untrusted_key","detail":"no trusted signature","status":10}}"#,
                "\n",
                "garbage\n",
                r#"{"event":"vm_exit","plan_id":"plan-x","fields":{"reason":"poweroff","status":0}}"#,
                "\n"
            ),
        )
        .unwrap();
        let out = read_vmm_events(&path, "plan-1", "vm-1");
        assert_eq!(kinds(&out), [EventKind::BootRefused, EventKind::VmExited]);
        assert_eq!(out[0].plan_id.as_deref(), Some("plan-1"));
        assert_eq!(out[0].vm_id.as_deref(), Some("vm-1"));
        // An id the VMM gave is kept (and would show a mismatch in the log).
        assert_eq!(out[1].plan_id.as_deref(), Some("plan-x"));
        assert!(read_vmm_events(&dir.path().join("none"), "p", "v").is_empty());
    }

    #[test]
    fn a_run_ending_is_classified_for_the_log() {
        let ok: Result<RunOutcome, RunError> = Ok(RunOutcome {
            status: WorkloadStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            },
            timings: Timings::default(),
            tier: Tier::Kvm,
            boot_report: None,
            plan_id: None,
            vmm_memory: None,
        });
        assert_eq!(ended_status(&ok), Some((3, None)));
        let t = Err(RunError::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(ended_status(&t), Some((exit::TIMEOUT, Some("timed_out"))));
        let refused = Err(RunError::BootRefused {
            reason: "expired".into(),
            status: 15,
            detail: String::new(),
        });
        assert_eq!(ended_status(&refused), None);
    }
}
