//! `mvm run --disk` under admission: every extra disk is in the signed plan.
//!
//! A read-only disk (`path=FILE,ro`) is pinned by a dm-verity tree computed now,
//! beside a link to the file in the run's scratch directory (`diskN` and
//! `diskN.verity`), so that the VMM verifies each block the guest reads against the
//! root hash the plan carries, and the user's directory gets no tree file. A writable
//! disk (`path=FILE,rw`) is a scratch disk the plan names by its size, which the
//! VMM checks before boot and the audit log records with the plan.

use std::path::{Path, PathBuf};

use mvm_loader::plan::{PinnedDisk, ScratchDisk};
use mvm_loader::verity::{build_tree, BuildOptions, Salt, TREE_SUFFIX};
use rand_core::{OsRng, RngCore};

use super::{PinnedFile, RunRequest, ScratchFile};
use crate::backend::{parse_disk, RunError};

/// Largest scratch disk, MiB (the plan's own bound).
const MAX_SCRATCH_MIB: u64 = 1 << 20;

fn refuse(disk: &str, why: impl std::fmt::Display) -> RunError {
    RunError::Missing(format!("--disk {disk}: {why}"))
}

/// Adds the `--disk` values to `request`, read-only ones first (pinned, their trees
/// written under `dir`), then writable ones, each in the order given.
pub fn pin_user_disks(
    disks: &[String],
    dir: &Path,
    request: &mut RunRequest,
) -> Result<(), RunError> {
    let mut n = request.disks.len();
    for disk in disks {
        let (path, read_only) =
            parse_disk(disk).ok_or_else(|| refuse(disk, "expected path=FILE,ro|rw"))?;
        let path = std::path::absolute(&path).map_err(|e| refuse(disk, e))?;
        let meta = std::fs::metadata(&path).map_err(|e| refuse(disk, e))?;
        if !meta.is_file() {
            return Err(refuse(disk, "not a regular file"));
        }
        if read_only {
            let link = dir.join(format!("disk{n}"));
            std::os::unix::fs::symlink(&path, &link).map_err(|e| refuse(disk, e))?;
            let mut tree = link.clone().into_os_string();
            tree.push(TREE_SUFFIX);
            let mut salt = vec![0u8; 32];
            OsRng.fill_bytes(&mut salt);
            let verity = build_tree(&link, Path::new(&tree), &BuildOptions::new(Salt(salt)))
                .map_err(|e| refuse(disk, format!("dm-verity tree: {e}")))?;
            request.disks.push(PinnedFile {
                path: link,
                pin: PinnedDisk {
                    name: format!("disk{n}"),
                    verity,
                },
            });
            n += 1;
        } else {
            let len = meta.len();
            if len == 0 || len % (1 << 20) != 0 || len >> 20 > MAX_SCRATCH_MIB {
                return Err(refuse(
                    disk,
                    format!(
                        "a writable disk is a scratch disk the plan names by size: it must be a whole number of MiB, 1 MiB to 1 TiB (this one is {len} bytes; truncate -s 64M FILE makes one)"
                    ),
                ));
            }
            let index = request.scratch_disks.len();
            request.scratch_disks.push(ScratchFile {
                path: PathBuf::from(&path),
                disk: ScratchDisk {
                    name: format!("scratch{index}"),
                    size_mib: u32::try_from(len >> 20).unwrap_or(u32::MAX),
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RunRequest {
        RunRequest {
            image: "default".into(),
            cpus: 1,
            mem_mib: 128,
            timeout_secs: None,
            argv: vec![],
            secrets: vec![],
            substitutions: Vec::new(),
            forwards: vec![],
            disks: vec![],
            scratch_disks: vec![],
        }
    }

    #[test]
    fn read_only_disks_are_pinned_and_writable_ones_named_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("data.img");
        std::fs::write(&ro, vec![7u8; 8192]).unwrap();
        let rw = dir.path().join("scratch.img");
        std::fs::File::create(&rw)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let trees = tempfile::tempdir().unwrap();
        let mut req = request();
        pin_user_disks(
            &[
                format!("path={},rw", rw.display()),
                format!("path={},ro", ro.display()),
            ],
            trees.path(),
            &mut req,
        )
        .unwrap();
        assert_eq!(req.disks.len(), 1);
        assert_eq!(req.disks[0].pin.verity.data_size, 8192);
        assert!(trees.path().join("disk0.verity").is_file());
        assert_eq!(req.scratch_disks[0].disk.size_mib, 2);
        // The user's directory got no tree.
        assert!(!dir.path().join("data.img.verity").exists());
    }

    #[test]
    fn odd_disks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        for disk in [
            format!("path={},rw", odd.display()),
            format!("path={}/missing,ro", dir.path().display()),
            format!("path={},ro", dir.path().display()),
            "ro".to_owned(),
        ] {
            let mut req = request();
            assert!(
                pin_user_disks(std::slice::from_ref(&disk), dir.path(), &mut req).is_err(),
                "{disk}"
            );
        }
    }
}
