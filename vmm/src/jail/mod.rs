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
//! `--no-jail` skips all of it (development only; it warns). See `docs/jail.md`.

pub mod cgroup;
pub mod root;
pub mod supervisor;

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
    #[arg(long, value_name = "DIR", default_value = "/run/mvm-jail")]
    pub jail_dir: PathBuf,
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

/// What the jail did (logged; the tests read it from `/proc`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailState {
    /// Namespaces, per-VM root, uid change: started as root with the jail on.
    pub full: bool,
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

/// Enters the jail (unless `--no-jail`). Started as root, this forks: the process that
/// called it becomes the supervising parent and never returns from here; the VMM goes on
/// in the child. Call with one thread only, after every file is open.
pub fn start(args: &JailArgs, plan: &JailPlan) -> Result<JailState, JailError> {
    if args.no_jail {
        tracing::warn!(
            "--no-jail: the VMM runs without its jail (namespaces, per-VM root, cgroup, \
             uid change, capability drop); for development only"
        );
        return Ok(JailState::default());
    }
    if !Uid::effective().is_root() {
        tracing::warn!(
            "jail: not started as root: no namespaces, per-VM root, cgroup or uid change \
             (rlimits and no_new_privs only)"
        );
        limits(false)?;
        no_new_privs()?;
        return Ok(JailState::default());
    }
    let uid = Uid::from_raw(args.jail_uid);
    let gid = Gid::from_raw(args.jail_gid);
    sweep_stale(&args.jail_dir, &args.cgroup_parent);
    let name = format!("{VM_DIR_PREFIX}{}", std::process::id());
    let root_dir = args.jail_dir.join(&name);
    root::mkdir_all(&root_dir)?;
    let limits_wanted = cgroup::Limits::for_vm(
        plan.mem_bytes,
        plan.image_bytes,
        plan.vcpus,
        plan.threads.saturating_add(NPROC_SLACK),
    );
    let vm_cgroup = match cgroup::create(&args.cgroup_parent, &name, &limits_wanted) {
        Ok(cg) => Some(cg),
        Err(reason) => {
            tracing::warn!("jail: cgroup skipped: {reason}");
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
    root::enter_root(&root_dir, &plan.keep_dirs, uid, gid)?;
    if !plan.has_net {
        unshare(CloneFlags::CLONE_NEWNET).map_err(step("new network namespace"))?;
    }
    limits(!pids_limited)?;
    drop_privileges(uid, gid)?;
    link.rearm_death_signal()?;
    no_new_privs()?;
    Ok(JailState {
        full: true,
        uid: args.jail_uid,
        gid: args.jail_gid,
        cgroup: cgroup_dir,
    })
}

/// Names of the per-VM root directories and cgroups: this prefix and the supervising pid.
pub const VM_DIR_PREFIX: &str = "mvm-vmm-";

/// Removes what VMMs killed with SIGKILL (whose supervisor could not clean up) left: empty
/// per-VM root directories and empty cgroups whose pid no longer runs. `rmdir` removes
/// neither a non-empty directory nor a cgroup with processes.
fn sweep_stale(jail_dir: &Path, cgroup_parent: &Path) {
    for dir in [jail_dir, cgroup_parent] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(VM_DIR_PREFIX))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            match std::fs::remove_dir(entry.path()) {
                Ok(()) => tracing::info!("jail: removed stale {}", entry.path().display()),
                Err(e) => tracing::debug!("jail: stale {}: {e}", entry.path().display()),
            }
        }
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
