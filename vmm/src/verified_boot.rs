//! Verified boot: `--plan ENVELOPE --trust PUBKEY...`, checked before any VM exists.
//!
//! Order, each step only if the one before passed: the envelope's signature by a
//! trusted key; the plan (schema, unknown fields, rules); its validity window against
//! the host clock with [`CLOCK_SKEW`] either side; its nonce against the host's replay
//! store (which survives restarts); the disks on the command line against the plan's;
//! then [`crate::config::resolve`] settles the other flags the plan pins (vCPUs, memory,
//! vsock, net) and reads the kernel and initramfs; then measurement: those bytes, read
//! once, are hashed and compared, and the same bytes are loaded (no window between
//! measuring and loading); the command line given with `--cmdline` is compared
//! exactly, before the VMM appends its `virtio_mmio.device=` entries (so the plan pins
//! what the user asked for, not the VMM's slot layout).
//! Read-only disks are not hashed at boot: each is pinned by a dm-verity root hash and
//! its reads are verified on the device thread (`mvm_devices::virtio::block::verity`):
//! each block hashed when first read, and again on every read unless a read lease on
//! the image proves no host process can have written it since (`block::lease`).
//!
//! Every refusal has a stable reason name and its own exit status ([`Refusal::status`],
//! listed in `--help` by `exit::EXIT_STATUS_HELP`), is written to the boot report's `exit_reason`, and is written
//! as a `boot_refused` event ([`boot_refused`]) through [`crate::event_log`].
//!
//! `--dev` boots whatever `--kernel/--initrd/--cmdline/--disk` say with nothing
//! verified, and says so loudly.

use std::fs::File;
use std::path::{Path, PathBuf};

use mvm_devices::virtio::block::verity::{VerifiedDisk, VerifyMode, VerityFailure};
use mvm_loader::dsse::TrustedKeys;
use mvm_loader::measure::{self, MeasureError, Sha256Digest};
use mvm_loader::plan::envelope::{verify_plan_for_boot, PlanVerifyError, VerifiedPlan};
use mvm_loader::plan::{PinnedDisk, UtcTime, CLOCK_SKEW};
use mvm_loader::replay::ReplayStore;
use mvm_loader::verity::{VerityVerifier, DEFAULT_CACHE_BLOCKS};
use serde_json::Map;

use crate::boot_report::{BootTimeline, Phase};
use crate::cli::Args;
use crate::config::VmConfig;
use crate::devices::blk::OpenDisk;
use crate::error::PlanDisagreement;
use crate::event_log::EventLog;

/// Largest envelope file read.
const MAX_ENVELOPE_FILE: u64 = 256 * 1024;
/// Largest trusted-key file read.
const MAX_KEY_FILE: u64 = 4096;
/// File name of the replay store under the data directory.
const REPLAY_STORE_NAME: &str = "replay-nonces";
/// Suffix of the dm-verity tree file beside a pinned disk image.
pub const VERITY_TREE_SUFFIX: &str = mvm_loader::verity::TREE_SUFFIX;

/// Exit status: the plan is not signed by a trusted key.
pub const STATUS_UNTRUSTED_KEY: i32 = 10;
/// Exit status: a trusted key's signature does not verify (plan edited after signing).
pub const STATUS_BAD_SIGNATURE: i32 = 11;
/// Exit status: the envelope is malformed, or the plan breaks a schema rule.
pub const STATUS_INVALID_PLAN: i32 = 12;
/// Exit status: the plan has a field this schema does not know.
pub const STATUS_UNKNOWN_FIELD: i32 = 13;
/// Exit status: the plan's schema version is newer than this VMM's.
pub const STATUS_NEWER_SCHEMA: i32 = 14;
/// Exit status: the plan expired.
pub const STATUS_EXPIRED: i32 = 15;
/// Exit status: the plan is not valid yet.
pub const STATUS_NOT_YET_VALID: i32 = 16;
/// Exit status: the plan's nonce was used before on this host.
pub const STATUS_REPLAY: i32 = 17;
/// Exit status: the replay store cannot be read or written (fails closed).
pub const STATUS_REPLAY_STORE: i32 = 18;
/// Exit status: the command line's resources or devices differ from the plan's.
pub const STATUS_PLAN_MISMATCH: i32 = 19;
/// Exit status: the kernel's digest differs from the plan's.
pub const STATUS_KERNEL_MISMATCH: i32 = 20;
/// Exit status: the initramfs's digest differs from the plan's (or one is missing).
pub const STATUS_INITRAMFS_MISMATCH: i32 = 21;
/// Exit status: the command line's digest differs from the plan's.
pub const STATUS_CMDLINE_MISMATCH: i32 = 22;
/// Exit status: a pinned disk's image or tree does not fit its plan entry.
pub const STATUS_DISK_MISMATCH: i32 = 23;
/// Exit status: `--plan` or `--trust` cannot be read.
pub const STATUS_PLAN_UNREADABLE: i32 = 24;
/// `--restore`: the snapshot's seal, a binding or a digest refused it.
pub const STATUS_SNAPSHOT_REFUSED: i32 = 25;

/// Where the replay store lives when `--replay-store` is not given.
pub fn default_replay_store() -> PathBuf {
    let env_dir = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env_dir("MVM_DATA_DIR") {
        return dir.join(REPLAY_STORE_NAME);
    }
    if let Some(dir) = env_dir("XDG_DATA_HOME") {
        return dir.join("mvm").join(REPLAY_STORE_NAME);
    }
    if let Some(home) = env_dir("HOME") {
        return home.join(".local/share/mvm").join(REPLAY_STORE_NAME);
    }
    PathBuf::from("/var/lib/mvm").join(REPLAY_STORE_NAME)
}

/// Why a boot was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Neither `--plan` nor `--dev`.
    #[error("refusing to boot without a signed plan: give --plan ENVELOPE --trust PUBKEY (or --dev to boot unverified)")]
    NoPlan,
    /// `--plan` without any `--trust`.
    #[error("--plan needs at least one --trust PUBKEY")]
    NoTrust,
    /// A file named by `--plan` or `--trust` cannot be used.
    #[error("{what} {}: {why}", path.display())]
    Unreadable {
        /// Which argument.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Signature, plan, window or nonce.
    #[error("{0}")]
    Plan(#[from] PlanVerifyError),
    /// A resource or device on the command line that disagrees with the plan.
    #[error("{disagreement}")]
    Mismatch {
        /// The (verified) plan's id, for the event.
        plan_id: String,
        /// The flag, the plan's field and both values.
        disagreement: PlanDisagreement,
    },
    /// A measured artifact differs from the plan.
    #[error("{0}")]
    Measure(MeasureError),
    /// The plan pins an initramfs and none was given, or the reverse.
    #[error("initramfs: plan {plan}, command line {given}")]
    InitramfsPresence {
        /// What the plan says.
        plan: String,
        /// What was given.
        given: String,
    },
    /// A snapshot (`--restore`) that may not be restored here: its seal, a binding or a
    /// digest (`mvm_vmm::snapshot`'s reasons).
    #[error("snapshot: {detail}")]
    Snapshot {
        /// The snapshot's reason (`memory_mismatch`, `rollback`, ...).
        reason: &'static str,
        /// What was found.
        detail: String,
    },
    /// A pinned disk's image or tree.
    #[error("disk {name} ({}): {why}", path.display())]
    Disk {
        /// The (verified) plan's id, for the event.
        plan_id: String,
        /// The plan's disk name.
        name: String,
        /// The image.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl Refusal {
    /// The stable short name (boot report `exit_reason`, events).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPlan | Self::NoTrust => "no_plan",
            Self::Unreadable { .. } => "plan_unreadable",
            Self::Plan(e) => e.reason(),
            Self::Mismatch { .. } => "plan_mismatch",
            Self::Measure(MeasureError::Mismatch { artifact, .. }) => match artifact.as_str() {
                "kernel" => "kernel_mismatch",
                "initramfs" => "initramfs_mismatch",
                "cmdline" => "cmdline_mismatch",
                _ => "artifact_mismatch",
            },
            Self::Measure(_) => "artifact_unreadable",
            Self::InitramfsPresence { .. } => "initramfs_mismatch",
            Self::Disk { .. } => "disk_mismatch",
            Self::Snapshot { reason, .. } => reason,
        }
    }

    /// The id of the plan refused, when its signature had already verified (an
    /// unverified id is never repeated as if it were true).
    pub fn plan_id(&self) -> Option<&str> {
        match self {
            Self::Mismatch { plan_id, .. } | Self::Disk { plan_id, .. } => Some(plan_id),
            _ => None,
        }
    }

    /// The process exit status for this refusal.
    pub fn status(&self) -> i32 {
        if let Self::Snapshot { .. } = self {
            return STATUS_SNAPSHOT_REFUSED;
        }
        match self.reason() {
            "untrusted_key" => STATUS_UNTRUSTED_KEY,
            "bad_signature" => STATUS_BAD_SIGNATURE,
            "unknown_field" => STATUS_UNKNOWN_FIELD,
            "newer_schema" => STATUS_NEWER_SCHEMA,
            "expired" => STATUS_EXPIRED,
            "not_yet_valid" => STATUS_NOT_YET_VALID,
            "replay" => STATUS_REPLAY,
            "replay_store" => STATUS_REPLAY_STORE,
            "plan_mismatch" => STATUS_PLAN_MISMATCH,
            "kernel_mismatch" => STATUS_KERNEL_MISMATCH,
            "initramfs_mismatch" => STATUS_INITRAMFS_MISMATCH,
            "cmdline_mismatch" => STATUS_CMDLINE_MISMATCH,
            "disk_mismatch" => STATUS_DISK_MISMATCH,
            "plan_unreadable" | "artifact_unreadable" => STATUS_PLAN_UNREADABLE,
            "no_plan" => crate::exit::STATUS_BAD_ARGUMENTS,
            _ => STATUS_INVALID_PLAN,
        }
    }
}

/// Writes `boot_refused` to `events` with the reason, the message and the exit status.
pub fn boot_refused(events: &EventLog, plan_id: Option<&str>, refusal: &Refusal) {
    let plan_id = plan_id.or_else(|| refusal.plan_id());
    let mut f = Map::new();
    f.insert("reason".into(), refusal.reason().into());
    f.insert("detail".into(), refusal.to_string().into());
    f.insert("status".into(), refusal.status().into());
    events.emit("boot_refused", plan_id, f);
}

/// A plan that passed signature, window and nonce checks, and what measurement found.
#[derive(Debug)]
pub struct BootPlan {
    /// The verified plan.
    pub verified: VerifiedPlan,
    /// Open pinned disks, in `--disk` order of the read-only disks.
    pinned: Vec<(PinnedDisk, PathBuf, VerityVerifier)>,
}

impl BootPlan {
    /// The plan id, for events.
    pub fn plan_id(&self) -> &str {
        &self.verified.plan.plan_id
    }

    /// The verified plan's contents.
    pub fn plan(&self) -> &mvm_loader::plan::Plan {
        &self.verified.plan
    }
}

fn read_limited(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, Refusal> {
    let err = |why: String| Refusal::Unreadable {
        what,
        path: path.to_path_buf(),
        why,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, limit + 1), &mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(err(format!("larger than {limit} bytes")));
    }
    Ok(bytes)
}

/// The public keys in the `--trust` files.
pub fn read_trusted(files: &[PathBuf]) -> Result<TrustedKeys, Refusal> {
    let mut trusted = TrustedKeys::new();
    for key in files {
        let text = read_limited("--trust", key, MAX_KEY_FILE)?;
        let text = String::from_utf8(text).map_err(|_| Refusal::Unreadable {
            what: "--trust",
            path: key.clone(),
            why: "not UTF-8 text".into(),
        })?;
        trusted
            .add_public_key_file(&text)
            .map_err(|e| Refusal::Unreadable {
                what: "--trust",
                path: key.clone(),
                why: e.to_string(),
            })?;
    }
    Ok(trusted)
}

/// A plan for a restore: the signature by a trusted key and the plan, but not its window
/// or nonce, which bound admission to the boot that made the snapshot (a restore may come
/// hours later; the snapshot's seal and epoch bound it instead,
/// `mvm_loader::plan::envelope::verify_plan_for_restore`); then the devices on the command line against it, as
/// for a boot (vsock, net, the disks with their trees). Its id and payload digest are
/// what the snapshot's seal must name.
pub fn verify_plan_for_restore(
    args: &Args,
    plan_path: &Path,
    trusted: &TrustedKeys,
    timeline: &BootTimeline,
) -> Result<BootPlan, Refusal> {
    let envelope = read_limited("--plan", plan_path, MAX_ENVELOPE_FILE)?;
    let verified = mvm_loader::plan::envelope::verify_plan_for_restore(&envelope, trusted)?;
    timeline.mark(Phase::PlanVerified);
    let plan_id = verified.plan.plan_id.clone();
    crate::devices::check_plan(&args.devices, &verified.plan).map_err(|disagreement| {
        Refusal::Mismatch {
            plan_id,
            disagreement,
        }
    })?;
    pin_disks(args, verified)
}

/// Step 1 (before the kernel is read): signature, plan, window, nonce; then the disks
/// on the command line against the plan's, each pinned one with its dm-verity tree.
/// With `--dev`, warns and returns `None`. The other flags the plan pins are settled by
/// [`crate::config::resolve`].
pub fn verify_plan(args: &Args, timeline: &BootTimeline) -> Result<Option<BootPlan>, Refusal> {
    let Some(plan_path) = args.verify.plan.clone() else {
        if args.verify.dev {
            eprintln!(
                "mvm-vmm: WARNING: --dev: NOTHING IS VERIFIED. No signed plan; the kernel, \
                 initramfs, command line and disks are booted as given. Never use this for \
                 untrusted work."
            );
            return Ok(None);
        }
        return Err(Refusal::NoPlan);
    };
    if args.verify.trust.is_empty() {
        return Err(Refusal::NoTrust);
    }
    let envelope = read_limited("--plan", &plan_path, MAX_ENVELOPE_FILE)?;
    let trusted = read_trusted(&args.verify.trust)?;
    let store = replay_store(args);
    let verified = verify_plan_for_boot(&envelope, &trusted, UtcTime::now(), CLOCK_SKEW, &store)?;
    timeline.mark(Phase::PlanVerified);
    pin_disks(args, verified).map(Some)
}

/// The host's replay store: `--replay-store`, else the default; its directory made.
fn replay_store(args: &Args) -> ReplayStore {
    let store_path = args
        .verify
        .replay_store
        .clone()
        .unwrap_or_else(default_replay_store);
    if let Some(dir) = store_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The store's own checks report a directory that cannot be created.
        let _ = std::fs::create_dir_all(dir);
    }
    ReplayStore::new(store_path, CLOCK_SKEW)
}

/// A snapshot bound to measured artifacts (a warm start's, taken once per image) is
/// restored under a fresh plan, admitted for this run: so that plan is held to what a
/// boot's is, its window open and its nonce unspent (and spent now), and it must be the
/// very plan already verified for the restore (`digest`).
pub fn spend_fresh_plan(
    args: &Args,
    plan_path: &Path,
    trusted: &TrustedKeys,
    digest: Sha256Digest,
) -> Result<(), Refusal> {
    let envelope = read_limited("--plan", plan_path, MAX_ENVELOPE_FILE)?;
    let verified = verify_plan_for_boot(
        &envelope,
        trusted,
        UtcTime::now(),
        CLOCK_SKEW,
        &replay_store(args),
    )?;
    if verified.digest != digest {
        return Err(Refusal::Unreadable {
            what: "--plan",
            path: plan_path.to_owned(),
            why: "the plan file changed while it was being verified".to_owned(),
        });
    }
    Ok(())
}

/// The disks on the command line against the verified plan's: the read-only ones are its
/// pinned disks in order, each opened with its dm-verity tree; the writable ones its
/// scratch disks in order, of the plan's sizes.
fn pin_disks(args: &Args, verified: VerifiedPlan) -> Result<BootPlan, Refusal> {
    let plan = &verified.plan;
    let plan_id = plan.plan_id.clone();
    let mismatch = |flag, given: usize, field, plan: usize| Refusal::Mismatch {
        plan_id: plan_id.clone(),
        disagreement: PlanDisagreement {
            flag,
            given: given.to_string(),
            field,
            plan: plan.to_string(),
        },
    };

    // Disks: the read-only ones are the plan's pinned disks in order, the writable ones
    // its scratch disks in order.
    let (ro, rw): (Vec<_>, Vec<_>) = args.devices.disks.iter().partition(|d| d.read_only);
    if ro.len() != plan.artifacts.disks.len() {
        return Err(mismatch(
            "the read-only --disk count",
            ro.len(),
            "artifacts.disks count",
            plan.artifacts.disks.len(),
        ));
    }
    if rw.len() != plan.devices.scratch_disks.len() {
        return Err(mismatch(
            "the read-write --disk count",
            rw.len(),
            "devices.scratch_disks count",
            plan.devices.scratch_disks.len(),
        ));
    }
    for (disk, scratch) in rw.iter().zip(&plan.devices.scratch_disks) {
        let want = u64::from(scratch.size_mib) << 20;
        let len = mvm_devices::virtio::block::disk_len(&disk.path).unwrap_or(0);
        if len != want {
            return Err(Refusal::Disk {
                plan_id: plan_id.clone(),
                name: scratch.name.clone(),
                path: disk.path.clone(),
                why: format!("scratch disk is {len} bytes, the plan says {want}"),
            });
        }
    }
    let mut pinned = Vec::with_capacity(ro.len());
    for (disk, pin) in ro.iter().zip(&plan.artifacts.disks) {
        let disk_err = |why: String| Refusal::Disk {
            plan_id: plan_id.clone(),
            name: pin.name.clone(),
            path: disk.path.clone(),
            why,
        };
        let len = mvm_devices::virtio::block::disk_len(&disk.path)
            .map_err(|e| disk_err(format!("the image: {e}")))?;
        if len != pin.verity.data_size {
            return Err(disk_err(format!(
                "image is {len} bytes, the plan's verity data size is {}",
                pin.verity.data_size
            )));
        }
        let mut tree_path = disk.path.clone().into_os_string();
        tree_path.push(VERITY_TREE_SUFFIX);
        let tree_path = PathBuf::from(tree_path);
        let tree = File::open(&tree_path)
            .map_err(|e| disk_err(format!("cannot open tree {}: {e}", tree_path.display())))?;
        let verifier = VerityVerifier::from_file(tree, &pin.verity, DEFAULT_CACHE_BLOCKS)
            .map_err(|e| disk_err(format!("tree {}: {e}", tree_path.display())))?;
        pinned.push((pin.clone(), disk.path.clone(), verifier));
    }
    Ok(BootPlan { verified, pinned })
}

/// Step 2, before the jail: the command line against the plan, and an initramfs given
/// exactly when the plan pins one. The kernel and initramfs are measured as they are
/// loaded ([`crate::config::VmConfig::hash_images`]); the returned [`PendingMeasurement`]
/// compares their digests with the plan's once they are in guest memory, before the
/// first guest instruction, and only then writes `boot_verified`.
pub fn measure(plan: &BootPlan, config: &mut VmConfig) -> Result<PendingMeasurement, Refusal> {
    let artifacts = &plan.verified.plan.artifacts;
    match (&artifacts.initramfs, config.initrd.as_mut()) {
        (Some(_), Some(_)) | (None, None) => {}
        (want, given) => {
            let given = match given {
                None => "none".to_owned(),
                Some(image) => {
                    let len = image.len();
                    let digest = image.sha256().map_err(|source| {
                        Refusal::Measure(MeasureError::Read {
                            artifact: "initramfs".into(),
                            path: config.initrd_path.clone().unwrap_or_default(),
                            source,
                        })
                    })?;
                    format!("{digest} ({len} bytes)")
                }
            };
            return Err(Refusal::InitramfsPresence {
                plan: want.map_or("none".into(), |d| d.to_string()),
                given,
            });
        }
    }
    measure::verify_cmdline(&config.cmdline, &artifacts.cmdline).map_err(Refusal::Measure)?;
    config.hash_images = true;

    let mut f = Map::new();
    f.insert("kernel".into(), artifacts.kernel.to_string().into());
    if let Some(i) = &artifacts.initramfs {
        f.insert("initramfs".into(), i.to_string().into());
    }
    f.insert("cmdline".into(), artifacts.cmdline.to_string().into());
    for (pin, _, _) in &plan.pinned {
        f.insert(
            format!("disk_{}_root_hash", pin.name),
            pin.verity.root_hash.to_string().into(),
        );
    }
    f.insert(
        "plan_digest".into(),
        plan.verified.digest.to_string().into(),
    );
    f.insert("keyid".into(), plan.verified.keyid.to_string().into());
    Ok(PendingMeasurement {
        plan_id: plan.plan_id().to_owned(),
        kernel: artifacts.kernel,
        initramfs: artifacts.initramfs,
        boot_verified: f,
    })
}

/// The digests of the kernel and initramfs as they were loaded (hashed in the same pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedDigests {
    /// The kernel file's sha256.
    pub kernel: Sha256Digest,
    /// The initramfs file's sha256, if one was loaded.
    pub initramfs: Option<Sha256Digest>,
}

/// The last step of verified boot, waiting for the images to be in guest memory.
#[derive(Debug)]
pub struct PendingMeasurement {
    plan_id: String,
    kernel: Sha256Digest,
    initramfs: Option<Sha256Digest>,
    boot_verified: Map<String, serde_json::Value>,
}

impl PendingMeasurement {
    /// Compares what was loaded with the plan's pins: on a match marks
    /// `artifacts_measured` and writes `boot_verified` (with every digest); else the
    /// refusal, and nothing has run.
    pub fn complete(
        self,
        loaded: &LoadedDigests,
        timeline: &BootTimeline,
        events: &EventLog,
    ) -> Result<(), Refusal> {
        let check = |artifact: &str, expected: Sha256Digest, measured: Sha256Digest| {
            if expected == measured {
                Ok(())
            } else {
                Err(Refusal::Measure(MeasureError::Mismatch {
                    artifact: artifact.to_owned(),
                    expected,
                    measured,
                }))
            }
        };
        check("kernel", self.kernel, loaded.kernel)?;
        match (self.initramfs, loaded.initramfs) {
            (Some(want), Some(got)) => check("initramfs", want, got)?,
            (None, None) => {}
            // `measure` refused a presence mismatch before the jail.
            (want, got) => {
                return Err(Refusal::InitramfsPresence {
                    plan: want.map_or("none".into(), |d| d.to_string()),
                    given: got.map_or("none".into(), |d| d.to_string()),
                })
            }
        }
        timeline.mark(Phase::ArtifactsMeasured);
        events.emit("boot_verified", Some(&self.plan_id), self.boot_verified);
        Ok(())
    }
}

/// Puts each pinned disk's verifier on its (read-only) disk's worker, in order, with
/// failures written as `verity_failure` events.
pub fn attach_verity(plan: Option<BootPlan>, disks: &mut [OpenDisk], events: &EventLog) {
    let Some(plan) = plan else {
        return;
    };
    let plan_id = plan.plan_id().to_owned();
    let mut pinned = plan.pinned.into_iter();
    for disk in disks.iter_mut().filter(|d| d.read_only()) {
        let Some((pin, path, verifier)) = pinned.next() else {
            return;
        };
        let events = events.clone();
        let plan_id = plan_id.clone();
        let name = pin.name.clone();
        let failures = events.clone();
        let failure_plan = plan_id.clone();
        let failure_disk = name.clone();
        let mode = disk.worker_mut().set_verity(VerifiedDisk::new(
            verifier,
            Box::new(move |failure: &VerityFailure| {
                let mut f = Map::new();
                f.insert("disk".into(), failure_disk.clone().into());
                if let Some(block) = failure.block {
                    f.insert("block".into(), block.into());
                }
                f.insert("offset".into(), failure.offset.into());
                f.insert("len".into(), failure.len.into());
                f.insert("detail".into(), failure.error.clone().into());
                failures.emit("verity_failure", Some(&failure_plan), f);
            }),
        ));
        // Which guarantee this disk's reads get, in the log and the events file.
        let mut f = Map::new();
        f.insert("disk".into(), name.clone().into());
        f.insert("mode".into(), mode.name().into());
        match &mode {
            VerifyMode::OnceWhileLeased => tracing::info!(
                disk = %name, image = %path.display(),
                "reads verified against the plan's dm-verity root: each block hashed when first read, and on every read once a host process opens the image for writing (read lease)"
            ),
            VerifyMode::EveryRead(why) => {
                tracing::info!(
                    disk = %name, image = %path.display(),
                    "every read is verified against the plan's dm-verity root (no read lease: {why})"
                );
                f.insert("why".into(), why.clone().into());
            }
        }
        events.emit("disk_verification", Some(&plan_id), f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::Value;

    #[test]
    fn every_refusal_class_has_its_own_status() {
        let statuses = [
            STATUS_UNTRUSTED_KEY,
            STATUS_BAD_SIGNATURE,
            STATUS_INVALID_PLAN,
            STATUS_UNKNOWN_FIELD,
            STATUS_NEWER_SCHEMA,
            STATUS_EXPIRED,
            STATUS_NOT_YET_VALID,
            STATUS_REPLAY,
            STATUS_REPLAY_STORE,
            STATUS_PLAN_MISMATCH,
            STATUS_KERNEL_MISMATCH,
            STATUS_INITRAMFS_MISMATCH,
            STATUS_CMDLINE_MISMATCH,
            STATUS_DISK_MISMATCH,
            STATUS_PLAN_UNREADABLE,
        ];
        for (i, s) in statuses.iter().enumerate() {
            assert!(!statuses[i + 1..].contains(s), "status {s} repeated");
            assert!(
                ![0, 1, 2, 3].contains(s),
                "status {s} clashes with the VMM's"
            );
            assert!(
                crate::exit::EXIT_STATUS_HELP.contains(&format!("  {s} ")),
                "{s} not in --help"
            );
        }
        let m = Refusal::Measure(MeasureError::Mismatch {
            artifact: "kernel".into(),
            expected: measure::sha256(b"a"),
            measured: measure::sha256(b"b"),
        });
        assert_eq!(m.status(), STATUS_KERNEL_MISMATCH);
        assert!(m.to_string().contains(&measure::sha256(b"a").to_string()));
        assert!(m.to_string().contains(&measure::sha256(b"b").to_string()));
    }

    #[test]
    fn no_plan_without_dev_is_refused_and_dev_is_allowed() {
        let t = BootTimeline::new(std::time::Instant::now());
        let a = Args::try_parse_from(["mvm-vmm", "--kernel", "/k"]).unwrap();
        assert!(matches!(verify_plan(&a, &t), Err(Refusal::NoPlan)));
        let a = Args::try_parse_from(["mvm-vmm", "--kernel", "/k", "--dev"]).unwrap();
        assert!(verify_plan(&a, &t).unwrap().is_none());
        assert!(
            Args::try_parse_from(["mvm-vmm", "--kernel", "/k", "--dev", "--plan", "/p"]).is_err()
        );
        let trust_only = Args::try_parse_from(["mvm-vmm", "--kernel", "/k", "--trust", "/p"]);
        assert!(trust_only.unwrap().check().is_err());
    }

    #[test]
    fn events_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(Some(&path)).unwrap();
        boot_refused(&log, Some("plan-1"), &Refusal::NoTrust);
        log.vm_exit(None, "poweroff", 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "boot_refused");
        assert_eq!(lines[0]["plan_id"], "plan-1");
        assert_eq!(lines[0]["fields"]["reason"], "no_plan");
        assert_eq!(lines[1]["fields"]["status"], 0);
        assert!(lines[1].get("plan_id").is_none());
    }

    #[test]
    fn a_refusal_after_the_signature_names_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(Some(&path)).unwrap();
        let mismatch = Refusal::Mismatch {
            plan_id: "plan-7".into(),
            disagreement: PlanDisagreement {
                flag: "--vcpus",
                given: "2".into(),
                field: "vcpus",
                plan: "1".into(),
            },
        };
        assert_eq!(mismatch.plan_id(), Some("plan-7"));
        assert_eq!(Refusal::NoTrust.plan_id(), None);
        boot_refused(&log, None, &mismatch);
        let line: Value =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(line["plan_id"], "plan-7");
        assert_eq!(line["fields"]["reason"], "plan_mismatch");
        assert_eq!(
            line["fields"]["detail"],
            "--vcpus 2 disagrees with the signed plan's vcpus 1"
        );
        assert_eq!(line["fields"]["status"], STATUS_PLAN_MISMATCH);
    }
}
