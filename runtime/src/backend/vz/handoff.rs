//! Measure, then hand off: the files `vfkit` gets are private copies, measured against
//! the signed plan after they were made.
//!
//! Virtualization.framework opens files by path, later, and measures nothing. Measuring
//! the originals and passing their paths would leave a window in which a writer swaps
//! them. So each artifact is copied into a new directory only this user can enter
//! (`std::fs::copy`: a copy-on-write clone on APFS and on Linux file systems that reflink,
//! a byte copy elsewhere), the copy is measured, and only copies that match are passed on;
//! the copies are then made read-only and the directory closed to writes. A process of the
//! same user could still undo that before `vfkit` opens them (or root, any time): the
//! residual window is the user's own, never another user's. Disks are measured whole: their
//! dm-verity root is rebuilt from the copy with the plan's salt and block sizes and must
//! equal the plan's, and nothing re-checks a block as the guest reads it.

use std::io::Read;
use std::path::{Path, PathBuf};

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::Plan;
use mvm_loader::verity::{build_tree, BuildOptions};
use sha2::{Digest, Sha256};

/// The files to boot, as the caller has them (untrusted until measured).
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The kernel.
    pub kernel: &'a Path,
    /// The initramfs, if the plan pins one.
    pub initramfs: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The read-only disks, in the plan's order.
    pub disks: Vec<&'a Path>,
}

/// The measured copies, for [`super::invocation::VfkitVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOff {
    /// The kernel's copy.
    pub kernel: PathBuf,
    /// The initramfs's copy.
    pub initramfs: Option<PathBuf>,
    /// The disks' copies, in the plan's order.
    pub disks: Vec<PathBuf>,
}

/// Why nothing was handed off.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A file could not be copied, read or protected.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A copy is not what the plan pins.
    #[error("{artifact} does not match the plan: plan {plan}, measured {measured}")]
    Mismatch {
        /// Which artifact.
        artifact: String,
        /// What the plan pins.
        plan: String,
        /// What its copy measured.
        measured: String,
    },
    /// The inputs and the plan disagree on what there is.
    #[error("{0}")]
    Shape(String),
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> HandoffError {
    move |source| HandoffError::Io { what, source }
}

/// The sha256 of the file at `path`, streamed.
fn file_digest(path: &Path) -> Result<Sha256Digest, HandoffError> {
    let mut file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io(format!("reading {}", path.display())))?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            break;
        };
        hash.update(chunk);
    }
    Ok(Sha256Digest(hash.finalize().into()))
}

fn same(artifact: &str, plan: &Sha256Digest, measured: &Sha256Digest) -> Result<(), HandoffError> {
    if plan == measured {
        Ok(())
    } else {
        Err(HandoffError::Mismatch {
            artifact: artifact.to_owned(),
            plan: plan.to_string(),
            measured: measured.to_string(),
        })
    }
}

/// Copies `source` to `dir/name` and returns the copy's path.
fn copy_in(source: &Path, dir: &Path, name: &str) -> Result<PathBuf, HandoffError> {
    let copy = dir.join(name);
    std::fs::copy(source, &copy).map_err(io(format!(
        "copying {} to {}",
        source.display(),
        copy.display()
    )))?;
    Ok(copy)
}

/// Copies every artifact of `inputs` into `dir` (created here, mode 0700; it must not
/// exist), measures the copies against `plan`, and returns them read-only in a directory
/// closed to writes. `cmdline` is checked against the plan's digest too.
pub fn hand_off(plan: &Plan, inputs: &Inputs<'_>, dir: &Path) -> Result<HandedOff, HandoffError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let pinned = &plan.artifacts;
    same(
        "the kernel command line",
        &pinned.cmdline,
        &Sha256Digest::of(inputs.cmdline.as_bytes()),
    )?;
    if pinned.disks.len() != inputs.disks.len() {
        return Err(HandoffError::Shape(format!(
            "the plan pins {} disks, {} were given",
            pinned.disks.len(),
            inputs.disks.len()
        )));
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let kernel = copy_in(inputs.kernel, dir, "kernel")?;
    same("the kernel", &pinned.kernel, &file_digest(&kernel)?)?;
    let initramfs = match (&pinned.initramfs, inputs.initramfs) {
        (None, None) => None,
        (Some(digest), Some(source)) => {
            let copy = copy_in(source, dir, "initramfs")?;
            same("the initramfs", digest, &file_digest(&copy)?)?;
            Some(copy)
        }
        (Some(_), None) => {
            return Err(HandoffError::Shape(
                "the plan pins an initramfs and none was given".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(HandoffError::Shape(
                "an initramfs was given and the plan pins none".into(),
            ))
        }
    };
    let mut disks = Vec::new();
    for (n, (disk, source)) in pinned.disks.iter().zip(&inputs.disks).enumerate() {
        let copy = copy_in(source, dir, &format!("disk{n}"))?;
        let wanted = &disk.verity;
        let options = BuildOptions {
            data_block_size: wanted.data_block_size,
            hash_block_size: wanted.hash_block_size,
            ..BuildOptions::new(wanted.salt.clone())
        };
        let tree = dir.join(format!("disk{n}.verity"));
        let measured = build_tree(&copy, &tree, &options).map_err(|e| HandoffError::Mismatch {
            artifact: format!("disk {}", disk.name),
            plan: wanted.root_hash.to_string(),
            measured: e.to_string(),
        })?;
        let _ = std::fs::remove_file(&tree);
        if measured.root_hash != wanted.root_hash || measured.data_size != wanted.data_size {
            return Err(HandoffError::Mismatch {
                artifact: format!("disk {}", disk.name),
                plan: format!("root {} over {} bytes", wanted.root_hash, wanted.data_size),
                measured: format!(
                    "root {} over {} bytes",
                    measured.root_hash, measured.data_size
                ),
            });
        }
        disks.push(copy);
    }
    let read_only = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("protecting {}", path.display())))
    };
    for file in std::iter::once(&kernel)
        .chain(initramfs.iter())
        .chain(disks.iter())
    {
        read_only(file, 0o400)?;
    }
    read_only(dir, 0o500)?;
    Ok(HandedOff {
        kernel,
        initramfs,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_loader::plan::{
        Artifacts, Devices, GuestPolicy, PinnedDisk, Resources, Tier, SCHEMA_VERSION,
    };
    use mvm_loader::verity::Salt;

    const CMDLINE: &str = "console=hvc0 quiet";

    struct Fixture {
        dir: tempfile::TempDir,
        plan: Plan,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = |n: &str| dir.path().join(n);
            std::fs::write(path("vmlinux"), b"a kernel, as far as this test goes").unwrap();
            std::fs::write(path("initramfs"), b"an initramfs").unwrap();
            let disk: Vec<u8> = (0..8 * 4096u32)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect();
            std::fs::write(path("rootfs"), &disk).unwrap();
            let verity = build_tree(
                &path("rootfs"),
                &path("rootfs.verity"),
                &BuildOptions::new(Salt(vec![9, 9])),
            )
            .unwrap();
            let digest = |n: &str| Sha256Digest::of(&std::fs::read(path(n)).unwrap());
            let plan = Plan {
                schema_version: SCHEMA_VERSION,
                plan_id: "p-vz".into(),
                not_before: "2026-12-05T00:00:00Z".parse().unwrap(),
                not_after: "2026-12-05T00:05:00Z".parse().unwrap(),
                nonce: "00112233445566778899aabbccddeeff".into(),
                artifacts: Artifacts {
                    kernel: digest("vmlinux"),
                    initramfs: Some(digest("initramfs")),
                    cmdline: Sha256Digest::of(CMDLINE.as_bytes()),
                    disks: vec![PinnedDisk {
                        name: "root".into(),
                        verity,
                    }],
                },
                resources: Resources {
                    vcpus: 1,
                    memory_mib: 256,
                    timeout_secs: 60,
                },
                devices: Devices {
                    vsock: None,
                    scratch_disks: vec![],
                    net: None,
                },
                guest: GuestPolicy {
                    uid: 1000,
                    gid: 1000,
                    max_processes: 256,
                    max_open_files: 1024,
                    max_file_size_mib: 1024,
                },
                secrets: vec![],
                substitution: None,
                required_tier: Tier::Delegated,
            };
            Self { dir, plan }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn hand_off(&self, out: &str) -> Result<HandedOff, HandoffError> {
            let (kernel, initramfs, rootfs) = (
                self.path("vmlinux"),
                self.path("initramfs"),
                self.path("rootfs"),
            );
            let inputs = Inputs {
                kernel: &kernel,
                initramfs: Some(&initramfs),
                cmdline: CMDLINE,
                disks: vec![&rootfs],
            };
            hand_off(&self.plan, &inputs, &self.path(out))
        }

        /// Flips one byte of `name`.
        fn tamper(&self, name: &str) {
            let mut bytes = std::fs::read(self.path(name)).unwrap();
            bytes[3] ^= 1;
            std::fs::write(self.path(name), bytes).unwrap();
        }
    }

    /// What the plan pins is handed off as read-only copies in a closed directory, and a
    /// change to an original afterwards does not reach the copies.
    #[test]
    fn matching_artifacts_are_handed_off_as_protected_copies() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        let out = f.hand_off("handoff").unwrap();
        assert_eq!(out.kernel, f.path("handoff/kernel"));
        assert_eq!(out.disks, [f.path("handoff/disk0")]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.kernel), 0o400);
        assert_eq!(mode(&out.disks[0]), 0o400);
        assert_eq!(mode(&f.path("handoff")), 0o500);
        assert!(!f.path("handoff/disk0.verity").exists());
        f.tamper("vmlinux");
        assert_eq!(file_digest(&out.kernel).unwrap(), f.plan.artifacts.kernel);
        // Open again, so that the temporary directory can go.
        std::fs::set_permissions(f.path("handoff"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
    }

    /// One byte changed in any artifact, another command line, a missing initramfs, or a
    /// directory that already exists: nothing is handed off.
    #[test]
    fn anything_the_plan_does_not_pin_is_refused() {
        let f = Fixture::new();
        f.tamper("vmlinux");
        let e = f.hand_off("k").unwrap_err();
        assert!(e.to_string().contains("the kernel does not match"), "{e}");

        let f = Fixture::new();
        f.tamper("rootfs");
        let e = f.hand_off("d").unwrap_err();
        assert!(e.to_string().contains("disk root does not match"), "{e}");

        let f = Fixture::new();
        let (kernel, rootfs) = (f.path("vmlinux"), f.path("rootfs"));
        let other_cmdline = Inputs {
            kernel: &kernel,
            initramfs: None,
            cmdline: "console=hvc0 init=/bin/sh",
            disks: vec![&rootfs],
        };
        let e = hand_off(&f.plan, &other_cmdline, &f.path("c")).unwrap_err();
        assert!(e.to_string().contains("command line"), "{e}");
        let no_initramfs = Inputs {
            cmdline: CMDLINE,
            ..other_cmdline
        };
        let e = hand_off(&f.plan, &no_initramfs, &f.path("i")).unwrap_err();
        assert!(matches!(e, HandoffError::Shape(_)), "{e}");

        std::fs::create_dir(f.path("taken")).unwrap();
        assert!(matches!(f.hand_off("taken"), Err(HandoffError::Io { .. })));
    }
}
