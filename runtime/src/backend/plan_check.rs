//! What `mvm-vmm` checks before a boot, for the tiers where no `mvm-vmm` runs and the
//! runtime checks instead (`container`, `vz`): the plan's signature by a trusted key, its
//! window and its nonce (recorded in the host's replay store). Each tier adds its own
//! checks and measurements; the result goes to the run's events file as
//! `boot_verified` (or `boot_refused`), the lines `mvm-vmm` writes, so the audit log and
//! the receipt read these starts as they read a VM's boot.

use std::path::Path;

use mvm_loader::dsse::TrustedKeys;
use mvm_loader::plan::envelope::{verify_plan_for_boot, VerifiedPlan};
use mvm_loader::plan::{UtcTime, CLOCK_SKEW};
use mvm_loader::replay::ReplayStore;
use serde_json::{json, Map, Value};

use super::{PlanFiles, RunError};

/// The largest plan envelope or key file read.
const MAX_SMALL_FILE: u64 = 1 << 20;

/// Why nothing was started, named as `mvm-vmm` names its refusals.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
}

impl Refusal {
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The file at `path`, refused when larger than `limit` bytes.
pub(crate) fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Refusal> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Refusal::new("unreadable", format!("{what} {}: {e}", path.display())))?;
    if meta.len() > limit {
        return Err(Refusal::new(
            "unreadable",
            format!("{what} {}: larger than {limit} bytes", path.display()),
        ));
    }
    std::fs::read(path)
        .map_err(|e| Refusal::new("unreadable", format!("{what} {}: {e}", path.display())))
}

/// The plan of `files`, its signature checked against the trusted key, its window
/// against now and its nonce spent in the replay store; `plan_id` is set as soon as the
/// plan is known (a refusal after that names it).
pub(crate) fn signed_plan(
    files: &PlanFiles,
    plan_id: &mut Option<String>,
) -> Result<VerifiedPlan, Refusal> {
    let envelope = read_limited(&files.envelope, MAX_SMALL_FILE, "plan")?;
    let key = read_limited(&files.trust, MAX_SMALL_FILE, "trusted key")?;
    let key =
        String::from_utf8(key).map_err(|_| Refusal::new("unreadable", "trusted key: not UTF-8"))?;
    let mut trusted = TrustedKeys::new();
    trusted
        .add_public_key_file(&key)
        .map_err(|e| Refusal::new("unreadable", format!("trusted key: {e}")))?;
    let replay = ReplayStore::new(&files.replay_store, CLOCK_SKEW);
    let verified = verify_plan_for_boot(&envelope, &trusted, UtcTime::now(), CLOCK_SKEW, &replay)
        .map_err(|e| Refusal::new(e.reason(), e.to_string()))?;
    *plan_id = Some(verified.plan.plan_id.clone());
    Ok(verified)
}

/// Runs a tier's `check` and writes its verdict to the events file: `boot_verified`
/// with the fields it returned, or `boot_refused` with the reason (and the run's error).
pub(crate) fn conclude<T>(
    files: &PlanFiles,
    check: impl FnOnce(&mut Option<String>) -> Result<(T, Map<String, Value>), Refusal>,
) -> Result<T, RunError> {
    let mut plan_id = None;
    match check(&mut plan_id) {
        Ok((checked, fields)) => {
            emit(&files.events, "boot_verified", plan_id.as_deref(), fields)?;
            Ok(checked)
        }
        Err(refusal) => {
            let mut fields = Map::new();
            fields.insert("reason".into(), refusal.reason.into());
            fields.insert("detail".into(), refusal.detail.clone().into());
            fields.insert("status".into(), 0.into());
            emit(&files.events, "boot_refused", plan_id.as_deref(), fields)?;
            Err(RunError::BootRefused {
                reason: refusal.reason.to_owned(),
                status: 0,
                detail: refusal.detail,
            })
        }
    }
}

/// Appends one event line as `mvm-vmm` writes them.
fn emit(
    events: &Path,
    event: &str,
    plan_id: Option<&str>,
    fields: Map<String, Value>,
) -> Result<(), RunError> {
    use std::io::Write;
    let mut record = json!({
        "time": UtcTime::now().to_string(),
        "event": event,
        "fields": fields,
    });
    if let (Some(id), Some(map)) = (plan_id, record.as_object_mut()) {
        map.insert("plan_id".into(), id.into());
    }
    let mut line = record.to_string();
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(events)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(RunError::io(format!("writing {}", events.display())))
}
