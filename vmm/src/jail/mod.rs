//! The jail, on by default: after `mvm-vmm` has opened every file it needs and before any
//! thread or guest code runs, the process moves into a per-VM root and gives up what it no
//! longer needs.
//!
//! Steps, in order (all before the first thread is spawned, so each applies process-wide):
//! inherited fds above stderr are closed at start ([`close_inherited_fds`]); then
//! [`start`]: the VM's cgroup v2 is created ([`cgroup`]); the process forks into a new PID
//! namespace, the parent staying outside to forward signals, pass the exit status on and
//! clean up ([`supervisor`]); the child, PID 1 there, builds and enters its per-VM root in
//! a new mount namespace ([`root`]); a new network namespace unless the VM has a net device;
//! rlimits (open files, processes, core size 0); when started as root, the capability
//! bounding set emptied and the process moved to an unprivileged uid/gid (which clears the
//! effective and permitted sets); `PR_SET_NO_NEW_PRIVS`.
//!
//! Started by an ordinary user, the same jail is built inside a user namespace of the VMM's
//! own ([`userns`]): the namespaces, the per-VM root and the capability drop are the same,
//! the uid stays the caller's, and `/dev/kvm` is bind-mounted rather than created. A host
//! that forbids unprivileged user namespaces makes the VMM refuse to start.
//!
//! `--no-jail` skips all of it (development only; it warns). See `docs/jail.md`.

pub mod cgroup;
pub mod root;
pub mod supervisor;
pub mod userns;

use std::path::{Path, PathBuf};

use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setresgid, setresuid, Gid, Uid};

/// `--no-jail`, `--jail-uid`, `--jail-gid`, `--jail-dir`, `--cgroup-parent`.
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// Run WITHOUT the jail (development only; prints a warning). By default the VMM runs
    /// in a new PID, mount and (without --net) network namespace, a per-VM root and cgroup,
    /// without capabilities, with no_new_privs, as --jail-uid/--jail-gid when started as
    /// root, with rlimits and inherited fds closed.
    #[arg(long)]
    pub no_jail: bool,
    /// Accepted and ignored: the jail is on by default (kept for older callers).
    #[arg(long, hide = true, conflicts_with = "no_jail")]
    pub jail: bool,
    /// The uid the jailed VMM runs as when started as root.
    #[arg(long, value_name = "UID", default_value_t = 65534)]
    pub jail_uid: u32,
    /// The gid the jailed VMM runs as when started as root.
    #[arg(long, value_name = "GID", default_value_t = 65534)]
    pub jail_gid: u32,
    /// Parent of the per-VM root directories (one `mvm-vmm-<pid>` each, removed at exit).
    /// Default: /run/mvm-jail as root; otherwise $XDG_RUNTIME_DIR/mvm-jail, or
    /// `/tmp/mvm-jail-<uid>` (created 0700, refused unless it is the user's own).
    #[arg(long, value_name = "DIR")]
    pub jail_dir: Option<PathBuf>,
    /// cgroup v2 directory under which each VM gets its cgroup `mvm-vmm-<pid>` (skipped,
    /// with a logged reason, where cgroup v2 is not there or not writable).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup/mvm")]
    pub cgroup_parent: PathBuf,
}

/// What the jail needs to know about the VM.
#[derive(Debug, Clone)]
pub struct JailPlan {
    /// Directories still used by path after the jail (bind-mounted at the same path).
    pub keep_dirs: Vec<PathBuf>,
    /// Files the jailed VMM cannot remove itself (its socket): removed by the supervising
    /// parent after it exits.
    pub cleanup_files: Vec<PathBuf>,
    /// The VM has a net device (keep the host's network namespace for its tap).
    pub has_net: bool,
    /// Number of threads the VMM will start (for pids.max).
    pub threads: u64,
    /// vCPUs (for cpu.max).
    pub vcpus: u64,
    /// Guest RAM in bytes (for memory.max).
    pub mem_bytes: u64,
    /// Kernel and initramfs bytes the VMM holds (for memory.max).
    pub image_bytes: u64,
}

/// Which jail ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailKind {
    /// Started as root: namespaces, per-VM root, a change to the jail uid.
    Root,
    /// Started as an ordinary user: the same namespaces and root inside a user namespace,
    /// the uid unchanged.
    UserNamespace,
}

impl JailKind {
    /// The name the boot report and the docs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::UserNamespace => "user-namespace",
        }
    }
}

/// What the jail did (logged; the tests read it from `/proc`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailState {
    /// Which jail ran; `None` with `--no-jail`.
    pub kind: Option<JailKind>,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// The VM's cgroup, when one was made.
    pub cgroup: Option<PathBuf>,
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

fn io_step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = what.into();
    move |e| JailError {
        step,
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Open-file limit inside the jail: the VMM's own fds plus vsock connections.
const NOFILE_LIMIT: u64 = 1024;
/// Threads the VMM may start beyond its own count (std's helper threads, slack): pids.max.
pub const NPROC_SLACK: u64 = 16;
/// `RLIMIT_NPROC` without a pids cgroup: every process and thread of the jail uid together.
pub const SHARED_NPROC_LIMIT: u64 = 4096;

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

/// Enters the jail (unless `--no-jail`): as root, or in a user namespace when started by an
/// ordinary user. This forks: the process that called it becomes the supervising parent
/// and never returns from here; the VMM goes on in the child. Call with one thread only,
/// after every file is open.
pub fn start(args: &JailArgs, plan: &JailPlan) -> Result<JailState, JailError> {
    if args.no_jail {
        tracing::warn!(
            "--no-jail: the VMM runs without its jail (namespaces, per-VM root, cgroup, \
             uid change, capability drop); for development only"
        );
        return Ok(JailState::default());
    }
    let as_root = Uid::effective().is_root();
    let (kind, uid, gid) = if as_root {
        (
            JailKind::Root,
            Uid::from_raw(args.jail_uid),
            Gid::from_raw(args.jail_gid),
        )
    } else {
        // First, so that a host without user namespaces refuses before anything is made.
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        userns::enter()?;
        (JailKind::UserNamespace, uid, gid)
    };
    let jail_dir = match &args.jail_dir {
        Some(dir) => dir.clone(),
        None if as_root => PathBuf::from(ROOT_JAIL_DIR),
        None => user_jail_dir(uid)?,
    };
    sweep_stale(&jail_dir, &args.cgroup_parent);
    let name = format!("{VM_DIR_PREFIX}{}", std::process::id());
    let root_dir = jail_dir.join(&name);
    root::mkdir_all(&root_dir)?;
    let limits_wanted = cgroup::for_vm(
        plan.mem_bytes,
        plan.image_bytes,
        plan.vcpus,
        plan.threads.saturating_add(NPROC_SLACK),
    );
    let vm_cgroup = match cgroup::create(&args.cgroup_parent, &name, &limits_wanted) {
        Ok(cg) => Some(cg),
        Err(reason) if as_root => {
            tracing::warn!("jail: cgroup skipped: {reason}");
            None
        }
        Err(reason) => {
            tracing::warn!(
                "jail: cgroup skipped: {reason} (not root: give --cgroup-parent a cgroup v2 \
                 directory delegated to this user, e.g. inside `systemd-run --user --scope -p \
                 Delegate=yes`)"
            );
            None
        }
    };
    let pids_limited = vm_cgroup
        .as_ref()
        .is_some_and(|c| c.controllers.iter().any(|n| n == "pids"));
    let cgroup_dir = vm_cgroup.as_ref().map(|c| c.dir.clone());
    let cleanup = supervisor::Cleanup {
        files: plan.cleanup_files.clone(),
        root_dir: Some(root_dir.clone()),
        cgroup: vm_cgroup,
    };
    let link = match supervisor::fork_supervised(cleanup) {
        Ok(link) => link,
        Err(e) => {
            // Still the only process: undo what was made for the child.
            let _ = std::fs::remove_dir(&root_dir);
            if let Some(dir) = &cgroup_dir {
                cgroup::remove(dir);
            }
            return Err(e);
        }
    };
    // The child, PID 1 of its namespace, in its cgroup.
    let kvm = match kind {
        JailKind::Root => root::KvmNode::Create { uid, gid },
        JailKind::UserNamespace => root::KvmNode::Bind,
    };
    root::enter_root(&root_dir, &plan.keep_dirs, kvm)?;
    let mut namespaces = CloneFlags::CLONE_NEWIPC;
    if !plan.has_net {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    unshare(namespaces).map_err(step("new network and IPC namespaces"))?;
    // RLIMIT_NPROC counts the user's every process: only the jail uid's are the VMs'.
    limits(as_root && !pids_limited)?;
    match kind {
        JailKind::Root => drop_privileges(uid, gid)?,
        JailKind::UserNamespace => userns::drop_capabilities()?,
    }
    link.rearm_death_signal()?;
    no_new_privs()?;
    Ok(JailState {
        kind: Some(kind),
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        cgroup: cgroup_dir,
    })
}

/// Where the per-VM roots go as root, unless `--jail-dir` says otherwise.
pub const ROOT_JAIL_DIR: &str = "/run/mvm-jail";

/// Where the per-VM roots of a VMM started by `uid` go by default: `$XDG_RUNTIME_DIR/mvm-jail`
/// when the runtime directory is set, else `/tmp/mvm-jail-<uid>`. Either is made mode 0700
/// and must then be a directory (not a link) owned by `uid` and writable by nobody else: in
/// a shared `/tmp`, another user could have made it first.
fn user_jail_dir(uid: Uid) -> Result<PathBuf, JailError> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if Path::new(&runtime).is_absolute() => Path::new(&runtime).join("mvm-jail"),
        _ => std::env::temp_dir().join(format!("mvm-jail-{uid}")),
    };
    match nix::unistd::mkdir(&dir, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(step(format!("mkdir {}", dir.display()))(e)),
    }
    check_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Refuses `dir` unless it is a directory (not a symlink) owned by `uid`, writable by no
/// group or other.
fn check_private_dir(dir: &Path, uid: Uid) -> Result<(), JailError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta =
        std::fs::symlink_metadata(dir).map_err(io_step(format!("stat {}", dir.display())))?;
    let private = meta.file_type().is_dir()
        && meta.uid() == uid.as_raw()
        && meta.permissions().mode() & 0o022 == 0;
    if private {
        Ok(())
    } else {
        Err(step(format!(
            "{} is not a directory of uid {uid} writable only by it (give --jail-dir)",
            dir.display()
        ))(nix::Error::EPERM))
    }
}

/// Names of the per-VM root directories and cgroups: this prefix and the supervising pid.
pub const VM_DIR_PREFIX: &str = "mvm-vmm-";

/// Removes what VMMs killed with SIGKILL (whose supervisor could not clean up) left: empty
/// per-VM root directories and empty cgroups whose pid no longer runs.
fn sweep_stale(jail_dir: &Path, cgroup_parent: &Path) {
    for dir in [jail_dir, cgroup_parent] {
        mvm_cgroup::sweep_dead(dir, VM_DIR_PREFIX);
    }
}

fn no_new_privs() -> Result<(), JailError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS with arg 1 only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("PR_SET_NO_NEW_PRIVS")(nix::Error::last()));
    }
    Ok(())
}

/// Core size 0 and open files always; processes when `nproc`.
///
/// `RLIMIT_NPROC` counts every process and thread of the uid on the host, so it cannot be
/// a per-VM limit when VMs share the jail uid: a VM-sized value would make concurrent VMs
/// fail each other's thread creation. With a `pids` cgroup, `pids.max` is the per-VM limit
/// and `RLIMIT_NPROC` is left alone; without one, it is a ceiling for all the jail uid's
/// processes together ([`SHARED_NPROC_LIMIT`]). Either way no filtered thread may `clone`.
fn limits(nproc: bool) -> Result<(), JailError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    setrlimit(Resource::RLIMIT_NOFILE, NOFILE_LIMIT, NOFILE_LIMIT)
        .map_err(step("RLIMIT_NOFILE"))?;
    if nproc {
        setrlimit(
            Resource::RLIMIT_NPROC,
            SHARED_NPROC_LIMIT,
            SHARED_NPROC_LIMIT,
        )
        .map_err(step("RLIMIT_NPROC"))?;
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

    /// A shared `/tmp` is hostile: only a directory of the user's own, writable by it alone,
    /// is taken as the parent of per-VM roots.
    #[test]
    fn only_a_private_directory_of_the_user_holds_per_vm_roots() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = tempfile::tempdir().unwrap();
        let me = Uid::from_raw(std::fs::metadata(base.path()).unwrap().uid());
        let private = base.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_private_dir(&private, me).unwrap();
        let other = Uid::from_raw(me.as_raw().wrapping_add(1));
        let e = check_private_dir(&private, other).unwrap_err();
        assert!(e.step.contains("--jail-dir"), "{e}");
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        check_private_dir(&open, me).unwrap_err();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        check_private_dir(&link, me).unwrap_err();
        let file = base.path().join("file");
        std::fs::write(&file, b"").unwrap();
        check_private_dir(&file, me).unwrap_err();
    }

    #[test]
    fn sweep_removes_only_empty_dirs_of_pids_that_are_gone() {
        let base = tempfile::tempdir().unwrap();
        let jails = base.path().join("jails");
        let dead = jails.join("mvm-vmm-4000000000");
        let busy = jails.join("mvm-vmm-4000000001");
        let alive = jails.join(format!("mvm-vmm-{}", std::process::id()));
        let other = jails.join("keep-me");
        for d in [&dead, &busy, &alive, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(busy.join("f"), b"").unwrap();
        sweep_stale(&jails, &base.path().join("no-cgroups"));
        assert!(!dead.exists());
        assert!(busy.exists() && alive.exists() && other.exists());
    }

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
