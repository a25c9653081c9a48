//! What `mvm-vmm` checks before a boot, checked here before a container starts: the
//! plan's signature by a trusted key, its window and its nonce (recorded in the host's
//! replay store), that it lets the container tier run it, and the image's kernel,
//! initramfs and command line against its pins. The result goes to the run's events
//! file as `boot_verified` (or `boot_refused`), the lines `mvm-vmm` writes, so the
//! audit log and the receipt read a container's start as they read a VM's.

use std::path::Path;

use mvm_loader::dsse::TrustedKeys;
use mvm_loader::measure::{self, Sha256Digest};
use mvm_loader::plan::envelope::verify_plan_for_boot;
use mvm_loader::plan::{Tier as PlanTier, UtcTime, CLOCK_SKEW};
use mvm_loader::replay::ReplayStore;
use serde_json::{json, Map, Value};

use crate::backend::{PlanFiles, RunError};
use crate::image::StoredImage;

/// The largest plan envelope or key file read.
const MAX_SMALL_FILE: u64 = 1 << 20;
/// The largest initramfs a container unpacks.
const MAX_INITRAMFS: u64 = 512 << 20;

/// Why the container was not started, as `mvm-vmm`'s refusals are named.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Refusal> {
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

/// Checks `plan` and measures `image` against it; on success writes `boot_verified`
/// and returns the initramfs's bytes (the tree the container runs), which were
/// measured. Without a plan (`--dev`) nothing is checked or written.
pub(super) fn verify(plan: Option<&PlanFiles>, image: &StoredImage) -> Result<Vec<u8>, RunError> {
    let initramfs_path = image.initramfs_path();
    let Some(files) = plan else {
        return read_limited(&initramfs_path, MAX_INITRAMFS, "initramfs")
            .map_err(|r| RunError::Missing(r.detail));
    };
    let mut plan_id = None;
    match check(files, image, &mut plan_id) {
        Ok((initramfs, fields)) => {
            emit(&files.events, "boot_verified", plan_id.as_deref(), fields)?;
            Ok(initramfs)
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

fn check(
    files: &PlanFiles,
    image: &StoredImage,
    plan_id: &mut Option<String>,
) -> Result<(Vec<u8>, Map<String, Value>), Refusal> {
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
    let plan = &verified.plan;
    *plan_id = Some(plan.plan_id.clone());
    if plan.required_tier != PlanTier::Container {
        return Err(Refusal::new(
            "tier",
            format!(
                "the plan requires the {} tier or stronger; a container is weaker",
                plan.required_tier
            ),
        ));
    }
    if !plan.artifacts.disks.is_empty() || !plan.devices.scratch_disks.is_empty() {
        return Err(Refusal::new(
            "devices",
            "the plan pins disks: the container tier runs an image's initramfs tree only (an image with a root filesystem, or --disk, needs a VM tier)",
        ));
    }
    if plan.devices.net.is_some() {
        return Err(Refusal::new(
            "devices",
            "the plan gives the guest a network: the container tier has none",
        ));
    }
    let artifacts = &plan.artifacts;
    let measured = |what: &str, path: &Path, limit: u64, want: &Sha256Digest| {
        let bytes = read_limited(path, limit, what)?;
        let got = measure::sha256(&bytes);
        if &got == want {
            Ok(bytes)
        } else {
            Err(Refusal::new(
                "measurement",
                format!("{what}: sha256 {got} differs from the plan's {want}"),
            ))
        }
    };
    // The kernel is never booted here, but the plan pins it: an image whose kernel
    // changed is not the image admitted.
    measured(
        "kernel",
        &image.kernel_path(),
        MAX_INITRAMFS,
        &artifacts.kernel,
    )?;
    let Some(want) = &artifacts.initramfs else {
        return Err(Refusal::new(
            "initramfs_presence",
            "the plan pins no initramfs: the container tier runs the initramfs's tree",
        ));
    };
    let initramfs = measured("initramfs", &image.initramfs_path(), MAX_INITRAMFS, want)?;
    measure::verify_cmdline(&image.manifest.cmdline, &artifacts.cmdline)
        .map_err(|e| Refusal::new("measurement", e.to_string()))?;
    let mut fields = Map::new();
    fields.insert("kernel".into(), artifacts.kernel.to_string().into());
    fields.insert("initramfs".into(), want.to_string().into());
    fields.insert("cmdline".into(), artifacts.cmdline.to_string().into());
    fields.insert("plan_digest".into(), verified.digest.to_string().into());
    fields.insert("keyid".into(), verified.keyid.to_string().into());
    fields.insert("tier".into(), "container".into());
    Ok((initramfs, fields))
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
