//! The VMM's events (`mvm-vmm --events FILE`, JSON lines) turned into signed
//! audit records: the VMM holds no audit key, its supervisor appends for it.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{AuditError, AuditEvent, AuditLog, EventKind};

/// Largest VMM events file read (lines beyond it are not appended).
const MAX_EVENTS_FILE: u64 = 16 << 20;

/// Why the VMM's events could not all be appended.
#[derive(Debug, thiserror::Error)]
pub enum VmmEventsError {
    /// The events file cannot be read.
    #[error("VMM events {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Appending to the audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Converts one line the VMM wrote into an audit event, or `None` for a line that is
/// not an event this log records. The VMM is not trusted to name the VM: `vm_id` comes
/// from the supervisor.
pub fn vmm_event(line: &str, vm_id: &str) -> Option<AuditEvent> {
    let v: Value = serde_json::from_str(line).ok()?;
    let plan_id = v.get("plan_id").and_then(Value::as_str);
    let fields = v.get("fields").and_then(Value::as_object)?;
    let text = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or("");
    let event = match v.get("event").and_then(Value::as_str)? {
        kind @ ("boot_verified" | "snapshot_restored") => {
            let mut e = AuditEvent::new(if kind == "boot_verified" {
                EventKind::BootVerified
            } else {
                EventKind::SnapshotRestored
            })
            .vm(vm_id);
            if let Some(id) = plan_id {
                e = e.plan(id);
            }
            for (name, value) in fields {
                if let Some(s) = value.as_str() {
                    e = e.field(name, s);
                } else if let Some(n) = value.as_u64() {
                    e = e.field(name, n);
                }
            }
            e
        }
        "boot_refused" => AuditEvent::boot_refused(plan_id, vm_id, text("reason"), text("detail")),
        "verity_failure" => AuditEvent::verity_failure(
            plan_id.unwrap_or(""),
            vm_id,
            text("disk"),
            fields
                .get("block")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX),
            text("detail"),
        ),
        kind @ ("device_error" | "egress_dropped") => {
            let mut e = AuditEvent::new(if kind == "device_error" {
                EventKind::DeviceError
            } else {
                EventKind::EgressDropped
            })
            .vm(vm_id)
            .field("device", text("device"))
            .field("detail", text("detail"));
            if let Some(dest) = fields.get("destination").and_then(Value::as_str) {
                e = e.field("destination", dest);
            }
            if let Some(id) = plan_id {
                e = e.plan(id);
            }
            e
        }
        "disk_verification" => {
            let mut e = AuditEvent::new(EventKind::DiskVerification)
                .vm(vm_id)
                .field("disk", text("disk"))
                .field("mode", text("mode"));
            if !text("why").is_empty() {
                e = e.field("why", text("why"));
            }
            if let Some(id) = plan_id {
                e = e.plan(id);
            }
            e
        }
        "vm_exit" => AuditEvent::vm_exited(
            plan_id.unwrap_or(""),
            vm_id,
            text("reason"),
            fields
                .get("status")
                .and_then(Value::as_i64)
                .and_then(|s| i32::try_from(s).ok())
                .unwrap_or(-1),
        ),
        _ => return None,
    };
    // An event the log would refuse (bad field names from a hostile VMM) is dropped
    // here rather than failing the whole append.
    event.validate().ok().map(|()| event)
}

/// Appends every event in the VMM's events file to `log`, tagged with `vm_id`.
/// Returns the sequence numbers written.
pub fn append_vmm_events(
    log: &AuditLog,
    events_file: &Path,
    vm_id: &str,
) -> Result<Vec<u64>, VmmEventsError> {
    let read_err = |source| VmmEventsError::Read {
        path: events_file.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(events_file).map_err(read_err)?;
    let mut seqs = Vec::new();
    for line in std::io::BufReader::new(file.take(MAX_EVENTS_FILE)).lines() {
        let line = line.map_err(read_err)?;
        match vmm_event(&line, vm_id) {
            Some(event) => seqs.push(log.append(event)?),
            None => {
                tracing::warn!(line = %line.chars().take(200).collect::<String>(), "VMM event not recorded")
            }
        }
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit;
    use ed25519_dalek::SigningKey;

    #[test]
    fn vmm_events_become_audit_records_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        std::fs::write(
            &events,
            concat!(
                r#"{"time":"2026-11-29T00:00:00Z","event":"boot_verified","plan_id":"p1","fields":{"kernel":"sha256:00","cmdline":"sha256:11","disk_root_root_hash":"ab"}}"#, "\n",
                r#"{"time":"2026-11-29T00:00:01Z","event":"verity_failure","plan_id":"p1","fields":{"disk":"root","block":7,"offset":28672,"len":4096,"detail":"data block 7"}}"#, "\n",
                r#"{"time":"2026-11-29T00:00:02Z","event":"vm_exit","plan_id":"p1","fields":{"reason":"poweroff","status":0}}"#, "\n",
                "not json\n",
                r#"{"event":"device_error","fields":{"device":"virtio-blk","detail":"needs_reset: bad queue size 3"}}"#, "\n",
                r#"{"event":"boot_refused","fields":{"reason":"kernel_mismatch","detail":"kernel digest mismatch","status":20}}"#, "\n",
            ),
        )
        .unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let log_path = dir.path().join("audit.jsonl");
        let log = AuditLog::new(&log_path, key.clone());
        let seqs = append_vmm_events(&log, &events, "vm-1").unwrap();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        audit::verify_log(&log_path, &key.verifying_key()).unwrap();
        let records = audit::read_records(&log_path, Some("vm-1")).unwrap();
        let kinds: Vec<String> = records.iter().map(|r| r.event.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "boot_verified",
                "verity_failure",
                "vm_exited",
                "device_error",
                "boot_refused"
            ]
        );
        let shown = records[1].to_string();
        assert!(
            shown.contains("block=7") || shown.contains("block"),
            "{shown}"
        );
        assert_eq!(records[0].plan_id.as_deref(), Some("p1"));
        assert!(records[4].plan_id.is_none());
    }
}
