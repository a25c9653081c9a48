//! The container's cgroup: memory, processes and CPU time bounded as a VM's are by its
//! size (`mvm-cgroup`, the code `mvm-vmm`'s jail uses for a VM).
//!
//! `<PARENT>/mvm-container-<pid of mvm>`, made before the init starts and the init moved
//! in before it makes the container, so every process of the container is in it; read
//! (a warning when a limit was met) and removed when the container has ended. Made when
//! `mvm` runs as root on a host with cgroup v2; elsewhere (an ordinary user, a cgroup v1
//! host) the container runs without it, which `mvm doctor`'s wall row says, and the
//! agent's rlimits and the tmpfs sizes are what bound it.

use std::path::Path;

use mvm_cgroup::{Cgroup, Limits};

use crate::backend::idmap::IdMap;

/// Where containers' cgroups go (beside `mvm-vmm`'s VMs').
const PARENT: &str = "/sys/fs/cgroup/mvm";
/// The name of a container's cgroup, before `mvm`'s pid.
const PREFIX: &str = "mvm-container-";
/// Memory beyond the run's `--mem` and the image's tree: the init and the agent.
const OVERHEAD: u64 = 32 << 20;
/// Processes and threads beyond the workload's `nproc`: the init, the agent's threads.
const PIDS_SLACK: u64 = 32;

/// The limits of a container of `mem_mib` MiB, a tree of `tree_bytes`, `nproc`
/// processes for the workload and `cpus` CPUs.
pub(super) fn for_container(mem_mib: u32, tree_bytes: u64, nproc: u64, cpus: u8) -> Limits {
    Limits::new(
        (u64::from(mem_mib) << 20)
            .saturating_add(tree_bytes)
            .saturating_add(OVERHEAD),
        nproc.saturating_add(PIDS_SLACK),
        u64::from(cpus.max(1)),
    )
}

/// Makes the container's cgroup, or says at `info` why there is none.
pub(super) fn make(ids: &IdMap, limits: &Limits) -> Option<Cgroup> {
    if *ids != IdMap::Root {
        tracing::info!("container: no cgroup (mvm is not root; the agent's rlimits apply)");
        return None;
    }
    let parent = Path::new(PARENT);
    // Those of containers whose `mvm` was killed before it removed them.
    mvm_cgroup::sweep_dead(parent, PREFIX);
    let name = format!("{PREFIX}{}", std::process::id());
    match mvm_cgroup::create(parent, &name, limits) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            tracing::info!("container: no cgroup: {why}");
            None
        }
    }
}

/// Moves process `pid` into `cgroup`; on failure the cgroup is removed and `None` given.
pub(super) fn enter(cgroup: Cgroup, pid: u32) -> Option<Cgroup> {
    let entered = i32::try_from(pid)
        .map_err(|_| "pid out of range".to_owned())
        .and_then(|pid| mvm_cgroup::add_process(&cgroup, pid).map_err(|e| e.to_string()));
    match entered {
        Ok(()) => Some(cgroup),
        Err(why) => {
            tracing::warn!("container: running without its cgroup: {why}");
            mvm_cgroup::remove(&cgroup.dir);
            None
        }
    }
}

/// Reports how close the container came to its limits and removes its cgroup (its
/// processes have ended).
pub(super) fn release(cgroup: &Cgroup) {
    mvm_cgroup::report_pressure(&cgroup.dir, "the container");
    mvm_cgroup::remove(&cgroup.dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_is_bounded_by_its_size() {
        let l = for_container(128, 4 << 20, 1024, 2);
        assert_eq!(l.memory_max, (128 + 4 + 32) << 20);
        assert_eq!(l.pids_max, 1024 + 32);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(for_container(64, 0, 0, 0).cpu_quota_us, 100_000);
    }

    #[test]
    fn an_ordinary_user_gets_no_cgroup() {
        let user = IdMap::User {
            uid: 1000,
            gid: 1000,
            sub_uid: 100_000,
            sub_gid: 100_000,
            newuidmap: "/usr/bin/newuidmap".into(),
            newgidmap: "/usr/bin/newgidmap".into(),
        };
        assert!(make(&user, &for_container(64, 0, 1, 1)).is_none());
    }
}
