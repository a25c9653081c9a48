//! What `mvm-vmm` checks before a boot, checked here before a container starts
//! ([`crate::backend::plan_check`]: the plan's signature, window and nonce), and then
//! what the container tier adds: that the plan lets the container tier run it, and the
//! image's kernel, initramfs and command line against its pins.

use std::path::Path;

use mvm_loader::measure::{self, Sha256Digest};
use mvm_loader::plan::Tier as PlanTier;
use serde_json::{Map, Value};

use crate::backend::plan_check::{self, read_limited, Refusal};
use crate::backend::{PlanFiles, RunError};
use crate::image::StoredImage;

/// The largest initramfs a container unpacks.
const MAX_INITRAMFS: u64 = 512 << 20;

/// Checks `plan` and measures `image` against it; on success writes `boot_verified`
/// and returns the initramfs's bytes (the tree the container runs), which were
/// measured. Without a plan (`--dev`) nothing is checked or written.
pub(super) fn verify(plan: Option<&PlanFiles>, image: &StoredImage) -> Result<Vec<u8>, RunError> {
    let Some(files) = plan else {
        return read_limited(&image.initramfs_path(), MAX_INITRAMFS, "initramfs")
            .map_err(|r| RunError::Missing(r.detail));
    };
    plan_check::conclude(files, |plan_id| check(files, image, plan_id))
}

fn check(
    files: &PlanFiles,
    image: &StoredImage,
    plan_id: &mut Option<String>,
) -> Result<(Vec<u8>, Map<String, Value>), Refusal> {
    let verified = plan_check::signed_plan(files, plan_id)?;
    let plan = &verified.plan;
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
