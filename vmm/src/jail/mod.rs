//! The jail: after `mvm-vmm` has opened every file it needs and before any thread or guest
//! code runs, the process moves into a per-VM root and gives up what it no longer needs.
//!
//! Steps, in order (all before the first thread is spawned, so each applies process-wide):
//! inherited fds above stderr are closed at start ([`close_inherited_fds`]); then
//! [`enter`]: a new mount namespace with a tmpfs per-VM root holding only `/dev/kvm` and
//! bind mounts of the directories the VM still uses by path (the vsock socket's, the boot
//! report's), `pivot_root` into it; a new network namespace unless the VM has a net device;
//! rlimits (open files, processes, core size 0); when started as root, the capability
//! bounding set emptied and the process moved to an unprivileged uid/gid (which clears the
//! effective and permitted sets); `PR_SET_NO_NEW_PRIVS`.
//!
//! Off by default for now (`--jail` turns it on); see `docs/jail.md` for what is not done
//! (PID namespace, cgroups, user namespaces for unprivileged starts).

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chdir, chown, pivot_root, setresgid, setresuid, Gid, Uid};

/// `--jail`, `--jail-uid`, `--jail-gid`, `--jail-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// Run jailed: per-VM mount namespace and root, no capabilities, no_new_privs,
    /// unprivileged uid/gid when started as root, rlimits, inherited fds closed.
    #[arg(long)]
    pub jail: bool,
    /// The uid the jailed VMM runs as when started as root.
    #[arg(long, value_name = "UID", default_value_t = 65534)]
    pub jail_uid: u32,
    /// The gid the jailed VMM runs as when started as root.
    #[arg(long, value_name = "GID", default_value_t = 65534)]
    pub jail_gid: u32,
    /// Parent of the per-VM root directories (one `mvm-vmm-<pid>` each).
    #[arg(long, value_name = "DIR", default_value = "/run/mvm-jail")]
    pub jail_dir: PathBuf,
}

/// What the jail needs to know about the VM.
#[derive(Debug, Clone)]
pub struct JailPlan {
    /// Directories still used by path after the jail (bind-mounted at the same path).
    pub keep_dirs: Vec<PathBuf>,
    /// Files written by path at exit: created before the jail and given to the jail uid.
    pub precreate: Vec<PathBuf>,
    /// The VM has a net device (keep the host's network namespace for its tap).
    pub has_net: bool,
    /// Number of threads the VMM will start (for RLIMIT_NPROC).
    pub threads: u64,
}

/// Why the jail could not be entered. The VMM refuses to boot then.
#[derive(Debug, thiserror::Error)]
#[error("jail: {step}: {source}")]
pub struct JailError {
    /// Which step failed.
    pub step: String,
    /// The OS error.
    #[source]
    pub source: nix::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = what.into();
    move |source| JailError { step, source }
}

/// Open-file limit inside the jail: the VMM's own fds plus vsock connections.
const NOFILE_LIMIT: u64 = 1024;
/// Threads the VMM may start beyond its own count (std's helper threads, slack).
const NPROC_SLACK: u64 = 16;

/// Closes every fd above stderr. Call first thing, before the VMM opens anything.
pub fn close_inherited_fds() {
    // SAFETY: close_range on [3, ~0] only closes descriptors; nothing in this process has
    // opened one yet that it still needs (this runs before any file is opened).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "jail: close_range failed; inherited fds stay open"
        );
    }
}

/// Enters the jail. Returns the per-VM root's host path.
pub fn enter(args: &JailArgs, plan: &JailPlan) -> Result<PathBuf, JailError> {
    let is_root = Uid::effective().is_root();
    let uid = Uid::from_raw(args.jail_uid);
    let gid = Gid::from_raw(args.jail_gid);
    let root = args
        .jail_dir
        .join(format!("mvm-vmm-{}", std::process::id()));
    if is_root {
        for file in &plan.precreate {
            std::fs::write(file, b"").map_err(|e| JailError {
                step: format!("create {}", file.display()),
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            chown(file, Some(uid), Some(gid)).map_err(step(format!("chown {}", file.display())))?;
        }
        build_root(&root, plan, uid, gid)?;
        if !plan.has_net {
            unshare(CloneFlags::CLONE_NEWNET).map_err(step("new network namespace"))?;
        }
    } else {
        tracing::warn!(
            "jail: not started as root: no mount/network namespace, no uid change \
             (rlimits and no_new_privs only)"
        );
    }
    limits(plan, is_root)?;
    if is_root {
        drop_privileges(uid, gid)?;
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS with arg 1 only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError {
            step: "PR_SET_NO_NEW_PRIVS".into(),
            source: nix::Error::last(),
        });
    }
    Ok(root)
}

/// The new mount namespace and the per-VM root, then pivot_root into it.
fn build_root(root: &Path, plan: &JailPlan, uid: Uid, gid: Gid) -> Result<(), JailError> {
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
    mkdir_all(root)?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(step(format!("tmpfs on {}", root.display())))?;
    // /dev/kvm: the only device node, owned by the jail uid.
    let dev = root.join("dev");
    mkdir_all(&dev)?;
    let kvm = dev.join("kvm");
    let host_kvm = nix::sys::stat::stat("/dev/kvm").map_err(step("stat /dev/kvm"))?;
    nix::sys::stat::mknod(
        &kvm,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        host_kvm.st_rdev,
    )
    .map_err(step("mknod /dev/kvm"))?;
    chown(&kvm, Some(uid), Some(gid)).map_err(step("chown /dev/kvm"))?;
    for dir in &plan.keep_dirs {
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
    let old = root.join(".old-root");
    mkdir_all(&old)?;
    pivot_root(root, &old).map_err(step("pivot_root"))?;
    chdir("/").map_err(step("chdir /"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    std::fs::remove_dir("/.old-root").map_err(|e| JailError {
        step: "remove /.old-root".into(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
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

fn mkdir_all(dir: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(dir).map_err(|e| JailError {
        step: format!("mkdir {}", dir.display()),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })
}

/// RLIMIT_NPROC counts every process of the uid, so it is set only for the jail uid.
fn limits(plan: &JailPlan, is_root: bool) -> Result<(), JailError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    setrlimit(Resource::RLIMIT_NOFILE, NOFILE_LIMIT, NOFILE_LIMIT)
        .map_err(step("RLIMIT_NOFILE"))?;
    if is_root {
        let nproc = plan.threads.saturating_add(NPROC_SLACK);
        setrlimit(Resource::RLIMIT_NPROC, nproc, nproc).map_err(step("RLIMIT_NPROC"))?;
    }
    Ok(())
}

/// Empties the bounding set, then changes gid, groups and uid; leaving uid 0 clears the
/// permitted and effective capability sets (no SECBIT_KEEP_CAPS is set).
fn drop_privileges(uid: Uid, gid: Gid) -> Result<(), JailError> {
    for cap in 0..=63 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown ones return EINVAL,
        // which ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    nix::unistd::setgroups(&[gid]).map_err(step("setgroups"))?;
    setresgid(gid, gid, gid).map_err(step(format!("setresgid {gid}")))?;
    setresuid(uid, uid, uid).map_err(step(format!("setresuid {uid}")))?;
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL only clears this process's ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// The directory of `path` (for a socket or report given by path).
pub fn parent_dir(path: &Path) -> Option<PathBuf> {
    let parent = path.parent()?;
    if parent.as_os_str().is_empty() {
        return std::env::current_dir().ok();
    }
    std::fs::canonicalize(parent).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_dir_of_a_bare_name_is_the_working_directory() {
        assert_eq!(
            parent_dir(Path::new("x.sock")),
            std::env::current_dir().ok()
        );
        assert_eq!(
            parent_dir(Path::new("/tmp/x.sock")),
            std::fs::canonicalize("/tmp").ok()
        );
    }
}
