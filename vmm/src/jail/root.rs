//! The per-VM root: a new mount namespace, a small tmpfs holding only `/dev/kvm` and bind
//! mounts of the directories the VM still uses by path, and the switch into it.
//!
//! The switch is `pivot_root`; where the host's own root is the initial ramfs (a test host
//! booted from an initramfs), `pivot_root` refuses (`EINVAL`), and the root is switched the
//! way `switch_root` does: every other mount is detached, the new root is moved onto `/`
//! and the process `chroot`s into it (it then drops `CAP_SYS_CHROOT` with every other
//! capability, so it cannot chroot back out).

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, chown, chroot, pivot_root, Gid, Uid};

use super::{io_step, step, JailError};

/// Size of the per-VM root's tmpfs: it holds one device node and empty mount points.
const ROOT_TMPFS_OPTIONS: &str = "mode=0755,size=1m";

/// How `/dev/kvm` gets into the per-VM root.
#[derive(Debug, Clone, Copy)]
pub enum KvmNode {
    /// A fresh device node, mode 0600, owned by the jail's uid and gid (as root).
    Create {
        /// Owner.
        uid: Uid,
        /// Group.
        gid: Gid,
    },
    /// The host's node, bind-mounted (in a user namespace, where `mknod` is refused and
    /// the caller's own rights on the host's node are what count).
    Bind,
}

/// Builds the per-VM root at `root` (an existing empty directory) in a new mount namespace
/// and makes it the process's root.
pub fn enter_root(root: &Path, keep_dirs: &[PathBuf], kvm_node: KvmNode) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("new mount namespace"))?;
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make / private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(ROOT_TMPFS_OPTIONS),
    )
    .map_err(step(format!("tmpfs on {}", root.display())))?;
    // /dev/kvm: the only device node.
    let dev = root.join("dev");
    mkdir_all(&dev)?;
    let kvm = dev.join("kvm");
    match kvm_node {
        KvmNode::Create { uid, gid } => {
            let host_kvm = nix::sys::stat::stat("/dev/kvm").map_err(step("stat /dev/kvm"))?;
            nix::sys::stat::mknod(
                &kvm,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                host_kvm.st_rdev,
            )
            .map_err(step("mknod /dev/kvm"))?;
            chown(&kvm, Some(uid), Some(gid)).map_err(step("chown /dev/kvm"))?;
        }
        KvmNode::Bind => {
            std::fs::File::create(&kvm).map_err(io_step("create the /dev/kvm mount point"))?;
            mount(
                Some("/dev/kvm"),
                &kvm,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step("bind /dev/kvm"))?;
        }
    }
    for dir in keep_dirs {
        let inside = root.join(dir.strip_prefix("/").unwrap_or(dir));
        mkdir_all(&inside)?;
        mount(
            Some(dir.as_path()),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(step(format!("bind {}", dir.display())))?;
    }
    switch_root(root)?;
    // Read-only from here: the VMM writes nothing into its root, only into kept dirs.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(step("remount / read-only"))?;
    Ok(())
}

/// Makes `root` the process's root: `pivot_root`, or the initramfs fallback.
fn switch_root(root: &Path) -> Result<(), JailError> {
    let old = root.join(".old-root");
    mkdir_all(&old)?;
    match pivot_root(root, &old) {
        Ok(()) => {
            chdir("/").map_err(step("chdir /"))?;
            umount2("/.old-root", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
            std::fs::remove_dir("/.old-root").map_err(io_step("remove /.old-root"))?;
            Ok(())
        }
        Err(nix::Error::EINVAL) => {
            tracing::debug!("jail: pivot_root refused (root on the initial ramfs): move + chroot");
            std::fs::remove_dir(&old).map_err(io_step("remove .old-root"))?;
            detach_other_mounts(root)?;
            chdir(root).map_err(step(format!("chdir {}", root.display())))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("move the new root onto /"))?;
            chroot(".").map_err(step("chroot"))?;
            chdir("/").map_err(step("chdir /"))
        }
        Err(e) => Err(step("pivot_root")(e)),
    }
}

/// Detaches every mount of this (private) namespace except `/` and those at or under
/// `root`, deepest first, so that nothing of the host stays reachable under the new root.
fn detach_other_mounts(root: &Path) -> Result<(), JailError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(io_step("read mountinfo"))?;
    let mut points: Vec<PathBuf> = mount_points(&info)
        .into_iter()
        .filter(|p| p != Path::new("/") && !p.starts_with(root))
        .collect();
    // Deepest first: a mount is detached before the one it sits on.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            // Already gone with a parent detached before it.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(step(format!("detach {}", point.display()))(e)),
        }
    }
    Ok(())
}

/// The mount points listed in a `/proc/PID/mountinfo` text (field 5, octal escapes
/// undone). Lines that do not parse are skipped.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// Undoes mountinfo's `\NNN` escapes (space, tab, newline, backslash).
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let code = bytes
            .get(i.saturating_add(1)..i.saturating_add(4))
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|c| (b'0'..=b'7').contains(&c)))
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b, code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i = i.saturating_add(4);
            }
            _ => {
                out.push(b);
                i = i.saturating_add(1);
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `mkdir -p`.
pub fn mkdir_all(dir: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(dir).map_err(io_step(format!("mkdir {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_field_five_unescaped() {
        let info = "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n\
                    25 22 0:5 / /dev rw - devtmpfs dev rw\n\
                    30 25 0:6 / /mnt/a\\040b rw - tmpfs t rw\n\
                    garbage\n";
        assert_eq!(
            mount_points(info),
            [
                PathBuf::from("/"),
                PathBuf::from("/dev"),
                PathBuf::from("/mnt/a b")
            ]
        );
        assert_eq!(unescape_octal("x\\134y\\0"), "x\\y\\0");
    }
}
