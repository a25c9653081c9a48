//! Warm starts on the emulated tier: the image's snapshot, taken inside one run's test
//! host, carried out on a disk and kept on this host, carried into the next run's test
//! host on the same disk, read-only.
//!
//! Each emulated run boots a test host whose file systems end with it, so the snapshot
//! lives here, under `$MVM_DATA_DIR/warm-emulated/KEY/` (the key: the test host's
//! initramfs, which names the image, `mvm` and `mvm-vmm` by digest, and the VM's size):
//!
//! - `disk`: a raw file QEMU attaches as the virtio-blk disk `mvmwarm`, holding the
//!   snapshot as a pack ([`super::snapshot_pack`]);
//! - `snapshot.dsse.json`: the pack's manifest, sealed here with the host's admission key.
//!
//! The first eligible run gets a blank, sparse disk (writable) and asks the test host to
//! `take` the snapshot; the inner `mvm` takes it as the kvm backend does
//! (`--snapshot-continue --snapshot-bind-artifacts`, once the agent answered), leaves it
//! unsealed (it has no key) and packs it onto the disk. Once QEMU is gone this host reads
//! the manifest from the disk, seals it and keeps both. Later runs attach the disk
//! read-only and send the seal with the request; the inner `mvm` unpacks the disk into
//! its own directory and the inner VMM checks the seal, the plan's pins, the CPU and both
//! files' digests before anything runs, as on the kvm tier. A pack or snapshot the test
//! host refuses is dropped here, and that run boots.
//!
//! Eligible as on the kvm tier (`backend::warm::eligible`), and only for a one-shot
//! command. A run that takes the snapshot starts no spare test host (the next run's
//! disk is not there yet); one that restores starts its spare with the same disk.

use std::io::BufReader;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mvm_loader::file_identity::{
    boot_id, identity, unchanged_since_written, wait_past, FileIdentity,
};
use mvm_loader::measure::Sha256Digest;

use super::protocol::{WarmEnd, WarmRequest};
use super::qemu::Drive;
use super::snapshot_pack;
use crate::backend::{abandoned, snapshot_seal, warm, PlanFiles, RunSpec};

/// The serial the test host finds the disk by.
pub const SERIAL: &str = "mvmwarm";
/// The pack's disk in a kept snapshot's directory.
const DISK: &str = "disk";
/// What names a snapshot being taken: `<key>.tmp-<pid of the mvm taking it>`.
const TMP_MARK: &str = ".tmp-";
/// Room on a blank disk beyond the guest's memory: the state, the manifest, headers.
const DISK_SLACK: u64 = 96 << 20;

/// A run's warm start: the disk to attach and what the test host is asked to do.
#[derive(Debug)]
pub struct Carried {
    /// The disk, as QEMU attaches it.
    pub drive: Drive,
    /// What the test host is told.
    pub request: WarmRequest,
    /// Where it is kept.
    dir: PathBuf,
}

/// The warm snapshots' directory under the data directory.
fn root() -> Option<PathBuf> {
    crate::image::store::data_dir()
        .ok()
        .map(|d| d.join("warm-emulated"))
}

/// The key: the test host's initramfs (its file name is the digest of the image and the
/// binaries in it) and the VM's size.
fn key(initramfs: &Path, spec: &RunSpec) -> String {
    let text = format!(
        "emulated warm 1\n{}\n{}\n{}",
        initramfs.file_name().unwrap_or_default().to_string_lossy(),
        spec.cpus,
        spec.mem_mib
    );
    let digest = Sha256Digest::of(text.as_bytes()).to_string();
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(32)
        .collect()
}

/// Whether a run under `plan` may start warm: an admitted plan with nothing in it that
/// a shared snapshot must not hold (as on the kvm tier).
pub fn eligible(plan: &PlanFiles) -> bool {
    std::fs::read(&plan.envelope)
        .ok()
        .and_then(|e| mvm_loader::plan::envelope::decode_plan_unverified(&e).ok())
        .is_some_and(|doc| warm::eligible(&doc))
}

/// What this run does: restore from the kept snapshot, or take it onto a blank disk.
/// `None` when the store cannot be used (logged).
pub fn choose(initramfs: &Path, spec: &RunSpec) -> Option<Carried> {
    let root = root()?;
    let key = key(initramfs, spec);
    let dir = root.join(&key);
    let seal = dir.join(snapshot_seal::SEAL_FILE);
    if let Ok(seal) = std::fs::read_to_string(&seal) {
        return Some(Carried {
            drive: Drive {
                path: dir.join(DISK),
                read_only: true,
                serial: SERIAL.into(),
            },
            request: WarmRequest::Restore {
                vouched: vouched(&dir, &seal),
                seal,
            },
            dir,
        });
    }
    let made = (|| -> std::io::Result<PathBuf> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        abandoned::sweep(&root, |name| {
            name.rsplit_once(TMP_MARK)
                .and_then(|(_, pid)| pid.parse().ok())
        });
        let tmp = root.join(format!("{key}{TMP_MARK}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp.join(DISK))?;
        disk.set_len((u64::from(spec.mem_mib) << 20).saturating_add(DISK_SLACK))?;
        Ok(tmp)
    })();
    match made {
        Ok(tmp) => Some(Carried {
            drive: Drive {
                path: tmp.join(DISK),
                read_only: false,
                serial: SERIAL.into(),
            },
            request: WarmRequest::Take,
            dir,
        }),
        Err(e) => {
            tracing::warn!("no warm start: preparing {}: {e}", root.display());
            None
        }
    }
}

impl Carried {
    /// The extra drives QEMU attaches for a run's warm start (none without one).
    pub fn drives(carried: Option<&Self>) -> Vec<Drive> {
        carried.iter().map(|c| c.drive.clone()).collect()
    }

    /// The answer to the test host's `unpacked`: the seal again, naming `memory_file`
    /// (the copy the test host unpacked), if this host still vouches for the disk it was
    /// unpacked from ([`DiskVouch`]; checked again now, after the test host read it).
    pub fn reseal(&self, memory_file: &FileIdentity) -> Option<String> {
        let WarmRequest::Restore {
            seal,
            vouched: true,
        } = &self.request
        else {
            return None;
        };
        if !vouched(&self.dir, seal) {
            return None;
        }
        match snapshot_seal::reseal_naming(seal.as_bytes(), memory_file) {
            Ok(sealed) => String::from_utf8(sealed).ok(),
            Err(e) => {
                tracing::warn!("warm snapshot not sealed again: {e}");
                None
            }
        }
    }

    /// The drive a spare test host for the next run gets: the kept disk, once there is
    /// one (a run that takes the snapshot starts no spare).
    pub fn spare_drive(&self) -> Option<&Drive> {
        matches!(self.request, WarmRequest::Restore { .. }).then_some(&self.drive)
    }

    /// After QEMU is gone: keep a snapshot the test host took (its manifest sealed), drop
    /// one it refused, and remove a blank disk it did not use. `end` is the test host's
    /// word (`None`: it reported none).
    pub fn finish(self, end: Option<WarmEnd>) {
        match (&self.request, end) {
            (WarmRequest::Take, Some(WarmEnd::Kept)) => {
                let tmp = self.drive.path.parent().map(Path::to_path_buf);
                let Some(tmp) = tmp else { return };
                match keep(&tmp, &self.dir) {
                    Ok(()) => {
                        tracing::info!(dir = %self.dir.display(), "emulated warm snapshot kept")
                    }
                    Err(e) => tracing::warn!("emulated warm snapshot not kept: {e}"),
                }
                let _ = std::fs::remove_dir_all(&tmp);
            }
            (WarmRequest::Take, _) => {
                if let Some(tmp) = self.drive.path.parent() {
                    let _ = std::fs::remove_dir_all(tmp);
                }
            }
            (WarmRequest::Restore { seal, .. }, Some(WarmEnd::Refused)) => {
                // Only the snapshot refused: another run may have replaced it since.
                let now = std::fs::read_to_string(self.dir.join(snapshot_seal::SEAL_FILE));
                if now.is_ok_and(|now| &now == seal) {
                    tracing::warn!(dir = %self.dir.display(), "emulated warm snapshot refused in the test host; dropped");
                    let _ = std::fs::remove_dir_all(&self.dir);
                }
            }
            (WarmRequest::Restore { .. }, _) => {}
        }
    }
}

/// Seals the manifest at the head of the pack on `tmp`'s disk, vouches for the disk
/// (its identity, [`DiskVouch`]), and keeps `tmp` as `dir` (another run that kept one
/// first wins).
fn keep(tmp: &Path, dir: &Path) -> Result<(), String> {
    let disk = tmp.join(DISK);
    let file = std::fs::File::open(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    let manifest = snapshot_pack::read_manifest(&mut BufReader::new(&file))
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let seal = snapshot_seal::seal_manifest(&manifest)?;
    std::fs::write(tmp.join(snapshot_seal::SEAL_FILE), &seal)
        .map_err(|e| format!("writing the seal: {e}"))?;
    match vouch_for(&file, &seal) {
        Ok(vouch) => std::fs::write(tmp.join(VOUCH), vouch)
            .map_err(|e| format!("writing the disk's vouch: {e}"))?,
        // Unvouched, each restore's VMM hashes the memory file.
        Err(e) => tracing::warn!("the warm snapshot's disk is not vouched for: {e}"),
    }
    std::fs::rename(tmp, dir).map_err(|e| format!("keeping {}: {e}", dir.display()))
}

/// The host's word, beside a kept snapshot, that its disk is the one the test host wrote
/// and this host read the manifest from: the disk's identity then (boot, device, inode,
/// length, change time), and the seal it goes with, signed with the admission key.
///
/// While the disk's identity is unchanged, nothing has written it since (the argument of
/// `docs/snapshots.md` for a memory file the VMM wrote), so the memory file a test host
/// unpacks from it is the one sealed: the host then seals it again naming the unpacked
/// file ([`Carried::reseal`]), and the restore's VMM need not hash it. A disk written
/// since, by anything, is not vouched for and is hashed.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskVouch {
    disk: FileIdentity,
    /// SHA-256 of the seal's bytes.
    seal_sha256: String,
}

/// The vouch's file, beside the seal.
const VOUCH: &str = "disk.dsse.json";
/// Its DSSE payload type.
const VOUCH_PAYLOAD_TYPE: &str = "application/vnd.mvm.warm-disk+json";

/// A signed [`DiskVouch`] for `disk` and `seal`, once the clock has passed the disk's
/// change time (so a later write moves it).
fn vouch_for(disk: &std::fs::File, seal: &[u8]) -> Result<Vec<u8>, String> {
    let boot = boot_id().ok_or("no boot id")?;
    let id = identity(disk, &boot).map_err(|e| format!("fstat: {e}"))?;
    if !wait_past(&id) {
        return Err("the clock did not pass the disk's change time".into());
    }
    let vouch = DiskVouch {
        disk: id,
        seal_sha256: Sha256Digest::of(seal).to_string(),
    };
    let payload = serde_json::to_vec(&vouch).map_err(|e| e.to_string())?;
    snapshot_seal::sign_with_host_key(VOUCH_PAYLOAD_TYPE, &payload)
}

/// Whether this host vouches for the kept snapshot in `dir` under `seal`: its vouch is
/// signed by the admission key, names this seal, and the disk is unchanged since.
fn vouched(dir: &Path, seal: &str) -> bool {
    let check = || -> Result<bool, String> {
        let signed = std::fs::read(dir.join(VOUCH)).map_err(|e| e.to_string())?;
        let payload = snapshot_seal::verified_by_host_key(VOUCH_PAYLOAD_TYPE, &signed)?;
        let vouch: DiskVouch = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
        if vouch.seal_sha256 != Sha256Digest::of(seal.as_bytes()).to_string() {
            return Ok(false);
        }
        let disk = std::fs::File::open(dir.join(DISK)).map_err(|e| e.to_string())?;
        Ok(unchanged_since_written(
            &disk,
            &vouch.disk,
            boot_id().as_deref(),
        ))
    };
    check().unwrap_or_else(|e| {
        tracing::debug!("warm snapshot disk not vouched for: {e}");
        false
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::tests::spec;
    use super::*;

    #[test]
    fn the_key_names_the_test_host_and_the_vm_size_not_the_command() {
        let base = key(Path::new("/c/a.cpio"), &spec());
        assert_eq!(base.len(), 32);
        let mut other_command = spec();
        other_command.argv = vec!["true".into()];
        assert_eq!(base, key(Path::new("/c/a.cpio"), &other_command));
        let mut bigger = spec();
        bigger.mem_mib = 512;
        let mut more_cpus = spec();
        more_cpus.cpus = 2;
        for other in [
            key(Path::new("/c/b.cpio"), &spec()),
            key(Path::new("/c/a.cpio"), &bigger),
            key(Path::new("/c/a.cpio"), &more_cpus),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_refused_snapshot_is_dropped_only_if_it_is_still_the_one_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("k");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(snapshot_seal::SEAL_FILE), "new").unwrap();
        let carried = |seal: &str| Carried {
            drive: Drive {
                path: dir.join(DISK),
                read_only: true,
                serial: SERIAL.into(),
            },
            request: WarmRequest::Restore {
                seal: seal.into(),
                vouched: false,
            },
            dir: dir.clone(),
        };
        carried("old").finish(Some(WarmEnd::Refused));
        assert!(dir.exists());
        carried("new").finish(Some(WarmEnd::Restored));
        assert!(dir.exists());
        carried("new").finish(Some(WarmEnd::Refused));
        assert!(!dir.exists());
    }

    #[test]
    fn a_blank_disk_the_test_host_did_not_fill_is_removed_and_nothing_kept() {
        let root = tempfile::tempdir().unwrap();
        let tmp = root.path().join(format!("k{TMP_MARK}1"));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join(DISK), vec![0u8; 4096]).unwrap();
        let dir = root.path().join("k");
        let carried = |end| {
            Carried {
                drive: Drive {
                    path: tmp.join(DISK),
                    read_only: false,
                    serial: SERIAL.into(),
                },
                request: WarmRequest::Take,
                dir: dir.clone(),
            }
            .finish(end)
        };
        // It says kept, but the disk holds no pack: nothing is sealed or kept.
        carried(Some(WarmEnd::Kept));
        assert!(!tmp.exists() && !dir.exists());
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join(DISK), b"").unwrap();
        carried(None);
        assert!(!tmp.exists() && !dir.exists());
    }
}
