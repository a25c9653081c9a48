//! The VMM's audit events: `--events FILE`, one JSON object per line, appended with
//! `O_APPEND`, for the supervisor's signed audit log (the VMM holds no audit key).
//!
//! Who writes what: verified boot writes `boot_verified` and `boot_refused`; the boot
//! path writes `vm_exit`; every virtio device's [`DeviceEvent`]s (needs_reset, the first
//! egress drop per destination) arrive through the interrupt hook [`audited`] installs,
//! as `device_error` and `egress_dropped`; a pinned disk's failed block arrives as
//! `verity_failure`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mvm_devices::virtio::{DeviceEvent, DeviceEventHook, Interrupt};
use mvm_loader::plan::UtcTime;
use serde_json::{json, Map, Value};

/// The `--events` file: one JSON object per line, appended with `O_APPEND`.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    file: Option<Arc<Mutex<File>>>,
}

impl EventLog {
    /// Opens (creating, mode 0600) the events file, if one was asked for.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = path
            .map(|p| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
            })
            .transpose()?;
        Ok(Self {
            file: file.map(|f| Arc::new(Mutex::new(f))),
        })
    }

    /// Appends `{"time", "event", "plan_id"?, "fields"}` as one line (one write).
    pub fn emit(&self, event: &str, plan_id: Option<&str>, fields: Map<String, Value>) {
        let Some(file) = &self.file else {
            return;
        };
        let mut record = json!({
            "time": UtcTime::now().to_string(),
            "event": event,
            "fields": Value::Object(fields),
        });
        if let (Some(id), Some(obj)) = (plan_id, record.as_object_mut()) {
            obj.insert("plan_id".into(), Value::from(id));
        }
        let mut line = record.to_string().into_bytes();
        line.push(b'\n');
        let written = file
            .lock()
            .map_err(|_| std::io::Error::other("events file lock poisoned"))
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = written {
            tracing::error!(error = %e, event, "cannot write to the events file");
        }
    }

    /// `vm_exit` with the boot report's exit reason and the status.
    pub fn vm_exit(&self, plan_id: Option<&str>, reason: &str, status: i32) {
        let mut f = Map::new();
        f.insert("reason".into(), reason.into());
        f.insert("status".into(), status.into());
        self.emit("vm_exit", plan_id, f);
    }
}

/// Where device events go: set once by `run_cli` when `--events` is given.
static DEVICE_EVENTS: std::sync::OnceLock<EventLog> = std::sync::OnceLock::new();

/// Sends every device's [`DeviceEvent`]s (needs_reset, the first egress drop per
/// destination) to `events` as `device_error` / `egress_dropped` lines. Call once,
/// before devices are attached.
pub fn route_device_events(events: &EventLog) {
    let _ = DEVICE_EVENTS.set(events.clone());
}

/// `interrupt` with the device-event hook, when [`route_device_events`] was called.
pub fn audited(interrupt: Interrupt) -> Interrupt {
    let Some(events) = DEVICE_EVENTS.get() else {
        return interrupt;
    };
    let events = events.clone();
    let hook: DeviceEventHook = Arc::new(move |event: &DeviceEvent| {
        let mut f = Map::new();
        let kind = match event {
            DeviceEvent::NeedsReset { device, reason } => {
                f.insert("device".into(), (*device).into());
                f.insert("detail".into(), format!("needs_reset: {reason}").into());
                "device_error"
            }
            DeviceEvent::EgressDenied {
                device,
                destination,
                reason,
            } => {
                f.insert("device".into(), (*device).into());
                f.insert("destination".into(), destination.clone().into());
                f.insert("detail".into(), reason.clone().into());
                "egress_dropped"
            }
        };
        events.emit(kind, None, f);
    });
    interrupt.with_event_hook(hook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_without_a_file_go_nowhere() {
        let log = EventLog::open(None).unwrap();
        log.vm_exit(None, "poweroff", 0);
    }
}
