//! Warm starts: `mvm run` from a snapshot of the image's booted, agent-ready VM instead
//! of a boot.
//!
//! The snapshot is taken once per image, VMM build and VM size (the key), by the first
//! eligible run: its VMM is started with `--snapshot-dir --snapshot-continue
//! --snapshot-bind-artifacts`, and once the agent answers (before the command starts)
//! SIGUSR2 writes the snapshot while the VM goes on to run the command. The snapshot is
//! bound to the measured artifacts, not to that run's plan, and sealed with the host's
//! admission key. Every later run is admitted as any run is (a fresh plan, signed, its
//! nonce spent by the VMM) and starts `mvm-vmm --restore` under that plan; the VMM checks
//! the seal, that the plan pins exactly the snapshot's artifacts, vCPUs and memory, the
//! CPU and every file, before the guest runs; the agent is then reseeded (entropy, id,
//! clock) before the command starts.
//!
//! Eligible: the kvm tier, an admitted run (a plan), no secrets (they would be in the
//! snapshot's memory), no network device, no disk but the image's root, no receipt
//! asked for (its measurements are a boot's), the policy's `[snapshots] warm_start`
//! (off by default), and not `mvm run --cold`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::Plan;

use super::{snapshot_seal, RunSpec};
use crate::image::StoredImage;

/// What a run does about warm starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warm {
    /// Start from the sealed snapshot in this directory.
    Restore(PathBuf),
    /// Boot, and take the image's snapshot into `tmp` once the agent answers; then
    /// seal it and rename it to `dir`.
    Take {
        /// Where the VMM writes it.
        tmp: PathBuf,
        /// Where it is kept.
        dir: PathBuf,
    },
    /// Boot, and take the image's snapshot into this directory once the agent answers,
    /// left unsealed: a test host's, for its host to carry out and seal
    /// (`emulated::warm`).
    TakeUnsealed(PathBuf),
}

/// Where a run's warm start comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmSource {
    /// Nowhere: the run boots.
    Off,
    /// This host's store of warm snapshots ([`choose`]): restore the image's, or take it.
    Store,
    /// Given by the caller: a test host's, carried in and out by its host.
    Given(Warm),
}

impl WarmSource {
    /// Whether the run may start warm at all.
    pub fn wanted(&self) -> bool {
        !matches!(self, Self::Off)
    }

    /// For an eligible run: what it does.
    pub fn choose(&self, image: &StoredImage, vmm: &Path, spec: &RunSpec) -> Option<Warm> {
        match self {
            Self::Off => None,
            Self::Store => choose(image, vmm, spec),
            Self::Given(warm) => Some(warm.clone()),
        }
    }
}

/// Whether a run under `plan` may start warm: nothing in it that a shared snapshot
/// must not hold or would not match.
pub fn eligible(plan: &Plan) -> bool {
    plan.secrets.is_empty()
        && plan.devices.net.is_none()
        && plan.devices.scratch_disks.is_empty()
        && plan.artifacts.disks.len() <= 1
}

/// The warm snapshots' directory under the data directory.
fn root() -> Option<PathBuf> {
    crate::image::store::data_dir().ok().map(|d| d.join("warm"))
}

/// The key of a warm snapshot: the image, the VMM binary (size and modification time:
/// a rebuilt VMM takes its own) and the VM's size.
fn key(image: &StoredImage, vmm: &Path, spec: &RunSpec) -> Option<String> {
    let meta = std::fs::metadata(vmm).ok()?;
    let text = format!(
        "{}\n{}\n{}.{}\n{}\n{}",
        image.digest,
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        spec.cpus,
        spec.mem_mib
    );
    let digest = Sha256Digest::of(text.as_bytes()).to_string();
    Some(
        digest
            .trim_start_matches("sha256:")
            .chars()
            .take(32)
            .collect(),
    )
}

/// What this run does: restore from the image's sealed snapshot, or take it.
pub fn choose(image: &StoredImage, vmm: &Path, spec: &RunSpec) -> Option<Warm> {
    let root = root()?;
    let dir = root.join(key(image, vmm, spec)?);
    if snapshot_seal::is_sealed(&dir) {
        return Some(Warm::Restore(dir));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .ok()?;
    sweep_abandoned(&root);
    let tmp = root.join(format!(
        "{}{TMP_MARK}{}",
        dir.file_name()?.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).ok()?;
    Some(Warm::Take { tmp, dir })
}

/// What names a snapshot being taken: `<key>.tmp-<pid of the mvm taking it>`.
const TMP_MARK: &str = ".tmp-";

/// Removes the snapshots being taken by processes that are gone (an `mvm run` killed
/// before it kept or dropped its own): each holds up to a guest's memory.
fn sweep_abandoned(root: &Path) {
    super::abandoned::sweep(root, |name| {
        name.rsplit_once(TMP_MARK)
            .and_then(|(_, pid)| pid.parse().ok())
    });
}

/// Seals the snapshot in `tmp` with the host's admission key and keeps it as `dir`
/// (another run that kept one first wins; this one is dropped).
pub fn keep(tmp: &Path, dir: &Path) -> Result<(), String> {
    let result = snapshot_seal::seal(tmp).and_then(|()| {
        std::fs::rename(tmp, dir).map_err(|e| format!("keeping {}: {e}", dir.display()))
    });
    if result.is_err() || tmp.exists() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

/// Drops a snapshot that is not kept.
pub fn discard(warm: &Warm) {
    match warm {
        Warm::Take { tmp, .. } | Warm::TakeUnsealed(tmp) => {
            let _ = std::fs::remove_dir_all(tmp);
        }
        Warm::Restore(_) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn abandoned_snapshots_are_swept_and_live_ones_and_kept_ones_are_not() {
        let root = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let names = [
            format!("k1{TMP_MARK}{dead}"),
            format!("k2{TMP_MARK}{}", std::process::id()),
            "k3".to_owned(),
            format!("k4{TMP_MARK}notapid"),
        ];
        for n in &names {
            std::fs::create_dir(root.path().join(n)).unwrap();
            std::fs::write(root.path().join(n).join("memory"), b"x").unwrap();
        }
        sweep_abandoned(root.path());
        let left: Vec<bool> = names.iter().map(|n| root.path().join(n).exists()).collect();
        assert_eq!(left, [false, true, true, true]);
    }
}
