//! An image's root disk as `/`: the read-only filesystem on the first disk (pinned by
//! the plan and verified per block by the VMM) under a writable overlay in memory.
//!
//! The kernel command line (measured, so pinned by the plan) asks for it with
//! `mvm.root=vda` and `mvm.rootfstype=erofs|ext4`. PID 1 then, before anything else is
//! mounted in the new root:
//!
//! 1. mounts the disk read-only on `/.mvm/lower` (`nodev`: device nodes in an image
//!    open nothing),
//! 2. a tmpfs on `/.mvm/rw` holding the overlay's `upper` and `work` directories,
//! 3. the overlay of the two on `/.mvm/root`,
//! 4. detaches the early `/proc` and `/dev`, moves the overlay onto `/` and `chroot`s
//!    into it, as `switch_root` does. The agent keeps running from memory; every
//!    workload it starts sees the image as its whole world.
//!
//! A root that cannot be mounted is fatal (the caller powers the guest off): a workload
//! must never run in the agent's initramfs when the plan named an image.

use std::io;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The command line key naming the root disk (a name under `/dev`, e.g. `vda`).
pub const ROOT_KEY: &str = "mvm.root";
/// The command line key naming its filesystem type.
pub const FSTYPE_KEY: &str = "mvm.rootfstype";

const LOWER: &str = "/.mvm/lower";
const RW: &str = "/.mvm/rw";
const NEW_ROOT: &str = "/.mvm/root";

/// A root disk the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// `/dev/NAME`.
    pub device: String,
    /// `erofs` or `ext4`.
    pub fstype: &'static str,
}

/// Why the root could not be switched.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The command line names a root that this agent refuses.
    #[error("{key}={value:?}: {reason}")]
    BadCmdline {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A step failed.
    #[error("root disk: {step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// The error.
        source: io::Error,
    },
}

impl RootDisk {
    /// The root disk `cmdline` asks for, if any.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, RootError> {
        let Some(name) = super::cmdline_value(cmdline, ROOT_KEY) else {
            return Ok(None);
        };
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(RootError::BadCmdline {
                key: ROOT_KEY,
                value: name.to_owned(),
                reason: "a block device name under /dev (lowercase letters and digits)",
            });
        }
        let fstype = match super::cmdline_value(cmdline, FSTYPE_KEY).unwrap_or("erofs") {
            "erofs" => "erofs",
            "ext4" => "ext4",
            other => {
                return Err(RootError::BadCmdline {
                    key: FSTYPE_KEY,
                    value: other.to_owned(),
                    reason: "erofs or ext4",
                })
            }
        };
        Ok(Some(Self {
            device: format!("/dev/{name}"),
            fstype,
        }))
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> RootError {
    let what = what.into();
    move |e| RootError::Step {
        step: what,
        source: io::Error::from(e),
    }
}

fn mkdir(path: &str) -> Result<(), RootError> {
    std::fs::create_dir_all(path).map_err(|source| RootError::Step {
        step: format!("mkdir {path}"),
        source,
    })
}

/// Mounts `root` under its overlay and makes it `/` (see the module doc). Needs the
/// early `/dev` (devtmpfs) to find the device; detaches the early `/proc` and `/dev`.
pub fn switch(root: &RootDisk) -> Result<(), RootError> {
    for dir in [LOWER, RW, NEW_ROOT] {
        mkdir(dir)?;
    }
    mount(
        Some(root.device.as_str()),
        LOWER,
        Some(root.fstype),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(step(format!(
        "mount {} ({}) read-only",
        root.device, root.fstype
    )))?;
    mount(
        Some("tmpfs"),
        RW,
        Some("tmpfs"),
        MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(step("mount the overlay's tmpfs"))?;
    for dir in ["/.mvm/rw/upper", "/.mvm/rw/work"] {
        mkdir(dir)?;
    }
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some("lowerdir=/.mvm/lower,upperdir=/.mvm/rw/upper,workdir=/.mvm/rw/work"),
    )
    .map_err(step("mount the overlay"))?;
    // The early mounts stay behind in the initramfs; the new root mounts its own.
    for early in ["/dev", "/proc"] {
        if let Err(e) = umount2(early, MntFlags::MNT_DETACH) {
            tracing::debug!("detach early {early}: {e}");
        }
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|source| RootError::Step {
        step: format!("chdir {NEW_ROOT}"),
        source,
    })?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move the new root onto /"))?;
    nix::unistd::chroot(".").map_err(step("chroot into the new root"))?;
    std::env::set_current_dir(Path::new("/")).map_err(|source| RootError::Step {
        step: "chdir /".to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_comes_from_the_command_line() {
        assert_eq!(RootDisk::from_cmdline("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(
            RootDisk::from_cmdline("mvm.root=vda").unwrap(),
            Some(RootDisk {
                device: "/dev/vda".into(),
                fstype: "erofs"
            })
        );
        assert_eq!(
            RootDisk::from_cmdline("mvm.rootfstype=ext4 mvm.root=vdb")
                .unwrap()
                .unwrap()
                .fstype,
            "ext4"
        );
    }

    #[test]
    fn odd_roots_are_refused() {
        for cmdline in [
            "mvm.root=../sda",
            "mvm.root=",
            "mvm.root=VDA",
            "mvm.root=vda mvm.rootfstype=nfs",
        ] {
            assert!(RootDisk::from_cmdline(cmdline).is_err(), "{cmdline}");
        }
    }
}
