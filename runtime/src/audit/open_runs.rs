//! Runs in progress, so that a run whose `mvm` was killed (SIGKILL, OOM, a
//! power cut) is closed in the log by the next command instead of staying
//! open forever.
//!
//! Admission writes a marker, `<data dir>/open-runs/<plan id>.json` (plan id,
//! VM id, `mvm`'s pid, that process's start time and the boot id), before it
//! appends `plan_admitted`; the run removes it once its last record
//! (`vm_exited`) is appended. Every command that opens the host's audit log
//! (`mvm run`, `mvm audit show`, `mvm audit verify`) first calls
//! [`close_abandoned`]: a marker whose process is gone (no such pid, a zombie,
//! another process under a reused pid, or an earlier boot) gets a
//! `run_abandoned` record and is removed. A marker is claimed by renaming it
//! before anything is appended, and a rename succeeds for one process only, so
//! two commands never close the same run twice. The run directories the dead
//! `mvm` left (`mvm-<pid>-<n>` in the run directory base) are removed then too,
//! unless its pid already belongs to another live process.
//!
//! The marker lives beside the log it belongs to (not in the run directory,
//! which may be a tmpfs cleared at logout, and which another `MVM_RUN_DIR`
//! would not see). Because it is written before `plan_admitted`, a `mvm`
//! killed between the two leaves a `run_abandoned` whose plan has no
//! `plan_admitted`: the run is never lost, at worst reported without its
//! admission.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{AuditError, AuditEvent, AuditLog, EventKind};

/// The markers' directory in the data directory.
pub const OPEN_RUNS_DIR: &str = "open-runs";
/// Largest marker read.
const MAX_MARKER_BYTES: u64 = 4096;
/// The suffix of a marker being closed, followed by the closer's pid.
const CLOSING: &str = ".closing-";

/// What a marker says about its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMarker {
    /// The admitted plan.
    pub plan_id: String,
    /// The VM id `mvm` chose.
    pub vm_id: String,
    /// The `mvm` process that runs it.
    pub pid: u32,
    /// That process's start time (clock ticks after boot, `/proc/PID/stat`
    /// field 22), so a reused pid is not taken for it.
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started.
    pub boot_id: String,
}

/// Why a run was judged abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// Its `mvm` is not running any more.
    MvmGone,
    /// The host rebooted since it started.
    HostRebooted,
}

impl Abandoned {
    fn reason(self) -> &'static str {
        match self {
            Self::MvmGone => "mvm_gone",
            Self::HostRebooted => "host_rebooted",
        }
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// This boot's id, or empty where the kernel does not say.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A process's state letter and start time from `/proc/PID/stat`, or `None`
/// when there is no such process.
fn process_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses, so the
/// fields are counted from its last `)`. STATE is field 3, starttime field 22.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = stat.get(stat.rfind(')')?.checked_add(1)?..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether the marker's process is the one that wrote it and still runs.
fn judge(marker: &RunMarker, current_boot: &str) -> Option<Abandoned> {
    if !marker.boot_id.is_empty() && !current_boot.is_empty() && marker.boot_id != current_boot {
        return Some(Abandoned::HostRebooted);
    }
    match process_state(marker.pid) {
        Some((state, start)) if state != 'Z' && start == marker.start_ticks => None,
        _ => Some(Abandoned::MvmGone),
    }
}

/// The marker of a run in progress; [`OpenRun::close`] removes it.
#[derive(Debug)]
pub struct OpenRun {
    path: PathBuf,
}

impl OpenRun {
    /// Writes the marker for `plan_id` / `vm_id`, run by this process, under
    /// `data_dir`.
    pub fn create(data_dir: &Path, plan_id: &str, vm_id: &str) -> Result<Self, AuditError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = data_dir.join(OPEN_RUNS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir, "create directory"))?;
        let pid = std::process::id();
        let marker = RunMarker {
            plan_id: plan_id.to_owned(),
            vm_id: vm_id.to_owned(),
            pid,
            start_ticks: process_state(pid).map_or(0, |(_, start)| start),
            boot_id: boot_id(),
        };
        let stem = file_stem(plan_id);
        let path = dir.join(format!("{stem}.json"));
        let text = serde_json::to_vec(&marker).map_err(|e| AuditError::Event(e.to_string()))?;
        // Written aside and renamed: a sweep in another process never reads half a marker.
        let partial = dir.join(format!("{stem}.partial-{pid}"));
        std::fs::write(&partial, text).map_err(io(&partial, "write run marker"))?;
        std::fs::rename(&partial, &path).map_err(io(&path, "write run marker"))?;
        Ok(Self { path })
    }

    /// The run's records are all appended: it is no longer open.
    pub fn close(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing the run marker {}: {e}", self.path.display());
        }
    }
}

/// A plan id as a file name (admission's ids are `plan-<hex>`; anything else
/// is reduced to what is safe in a path).
fn file_stem(plan_id: &str) -> String {
    plan_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn read_marker(path: &Path) -> Option<RunMarker> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_MARKER_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A run the sweep closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedRun {
    /// Its marker.
    pub marker: RunMarker,
    /// Why it was judged abandoned.
    pub why: Abandoned,
    /// The `run_abandoned` record's seq.
    pub seq: u64,
}

/// Appends `run_abandoned` for every open run under `data_dir` whose `mvm` is
/// gone, and removes its marker. Markers of live runs are left alone.
pub fn close_abandoned(log: &AuditLog, data_dir: &Path) -> Result<Vec<ClosedRun>, AuditError> {
    let dir = data_dir.join(OPEN_RUNS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir, "list open runs")(e)),
    };
    let current_boot = boot_id();
    let me = std::process::id();
    let mut closed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // A marker another command began to close: retaken only if that command died.
        if let Some((stem, closer)) = name.split_once(CLOSING) {
            let closer_alive = closer
                .parse::<u32>()
                .ok()
                .and_then(process_state)
                .is_some_and(|(state, _)| state != 'Z');
            if closer_alive || !stem.ends_with(".json") {
                continue;
            }
        } else if !name.ends_with(".json") {
            continue;
        }
        let Some(marker) = read_marker(&path) else {
            tracing::warn!("run marker {} does not parse; left alone", path.display());
            continue;
        };
        let Some(why) = judge(&marker, &current_boot) else {
            continue;
        };
        let stem = name.split_once(CLOSING).map_or(name.as_str(), |(s, _)| s);
        let claimed = dir.join(format!("{stem}{CLOSING}{me}"));
        if std::fs::rename(&path, &claimed).is_err() {
            continue; // another command claimed it first
        }
        let event =
            AuditEvent::run_abandoned(&marker.plan_id, &marker.vm_id, marker.pid, why.reason());
        let seq = log.append(event)?;
        if let Err(e) = std::fs::remove_file(&claimed) {
            tracing::warn!("removing {}: {e}", claimed.display());
        }
        // Its run directories, unless the pid now belongs to a live process
        // (a reused pid's directories are that process's).
        if process_state(marker.pid).is_none_or(|(state, _)| state == 'Z') {
            let base = crate::backend::scratch::base_dir();
            crate::backend::scratch::remove_left_by(&base, marker.pid);
        }
        closed.push(ClosedRun { marker, why, seq });
    }
    Ok(closed)
}

impl AuditEvent {
    /// A run whose `mvm` died before closing it; `reason` is `mvm_gone` or
    /// `host_rebooted`.
    pub fn run_abandoned(plan_id: &str, vm_id: &str, pid: u32, reason: &str) -> Self {
        Self::new(EventKind::RunAbandoned)
            .plan(plan_id)
            .vm(vm_id)
            .field("pid", pid)
            .field("reason", reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn log(dir: &Path) -> (AuditLog, SigningKey) {
        let key = SigningKey::from_bytes(&[4; 32]);
        (AuditLog::new(dir.join("audit.jsonl"), key.clone()), key)
    }

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let stat =
            "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 987_654)));
        assert_eq!(parse_stat("1 (x) Z"), None);
        let (state, start) = process_state(std::process::id()).unwrap();
        assert_ne!(state, 'Z');
        assert!(start > 0);
    }

    #[test]
    fn a_live_run_is_left_open_and_a_dead_one_is_closed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, key) = log(dir.path());
        let live = OpenRun::create(dir.path(), "plan-live", "vm-live").unwrap();
        assert!(close_abandoned(&log, dir.path()).unwrap().is_empty());

        // A run whose mvm exited: a child that is reaped before the sweep.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = process_state(pid).map_or(1, |(_, s)| s);
        child.wait().unwrap();
        let dead = RunMarker {
            plan_id: "plan-dead".into(),
            vm_id: "vm-dead".into(),
            pid,
            start_ticks: start,
            boot_id: boot_id(),
        };
        let markers = dir.path().join(OPEN_RUNS_DIR);
        std::fs::write(
            markers.join("plan-dead.json"),
            serde_json::to_vec(&dead).unwrap(),
        )
        .unwrap();
        // This process under another start time: a reused pid, so gone too.
        let reused = RunMarker {
            plan_id: "plan-reused".into(),
            vm_id: "vm-reused".into(),
            pid: std::process::id(),
            start_ticks: 1,
            boot_id: boot_id(),
        };
        std::fs::write(
            markers.join("plan-reused.json"),
            serde_json::to_vec(&reused).unwrap(),
        )
        .unwrap();
        let rebooted = RunMarker {
            boot_id: "another-boot".into(),
            plan_id: "plan-old".into(),
            ..reused.clone()
        };
        std::fs::write(
            markers.join("plan-old.json"),
            serde_json::to_vec(&rebooted).unwrap(),
        )
        .unwrap();

        let mut closed = close_abandoned(&log, dir.path()).unwrap();
        closed.sort_by(|a, b| a.marker.plan_id.cmp(&b.marker.plan_id));
        let got: Vec<(&str, Abandoned)> = closed
            .iter()
            .map(|c| (c.marker.plan_id.as_str(), c.why))
            .collect();
        assert_eq!(
            got,
            [
                ("plan-dead", Abandoned::MvmGone),
                ("plan-old", Abandoned::HostRebooted),
                ("plan-reused", Abandoned::MvmGone)
            ]
        );
        assert!(
            close_abandoned(&log, dir.path()).unwrap().is_empty(),
            "once"
        );
        let records = crate::audit::read_records(log.path(), None).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r.event == EventKind::RunAbandoned));
        let dead_record = records
            .iter()
            .find(|r| r.plan_id.as_deref() == Some("plan-dead"))
            .unwrap();
        assert_eq!(dead_record.vm_id.as_deref(), Some("vm-dead"));
        assert_eq!(
            dead_record.fields["reason"],
            crate::audit::FieldValue::from("mvm_gone")
        );
        crate::audit::verify_log(log.path(), &key.verifying_key()).unwrap();

        live.close();
        let left: Vec<_> = std::fs::read_dir(&markers).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_claim_left_by_a_dead_closer_is_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = log(dir.path());
        let markers = dir.path().join(OPEN_RUNS_DIR);
        std::fs::create_dir_all(&markers).unwrap();
        let marker = RunMarker {
            plan_id: "plan-x".into(),
            vm_id: "vm-x".into(),
            pid: u32::MAX - 1,
            start_ticks: 5,
            boot_id: boot_id(),
        };
        let text = serde_json::to_vec(&marker).unwrap();
        // Claimed by a closer that no longer runs, and one by this (live) process.
        std::fs::write(
            markers.join(format!("plan-x.json{CLOSING}{}", u32::MAX - 2)),
            &text,
        )
        .unwrap();
        std::fs::write(
            markers.join(format!("plan-y.json{CLOSING}{}", std::process::id())),
            &text,
        )
        .unwrap();
        let closed = close_abandoned(&log, dir.path()).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].marker.plan_id, "plan-x");
        assert!(markers
            .join(format!("plan-y.json{CLOSING}{}", std::process::id()))
            .exists());
    }
}
