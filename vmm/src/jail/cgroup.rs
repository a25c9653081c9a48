//! A cgroup v2 per VM: `<parent>/mvm-vmm-<pid>` with `memory.max`, `pids.max` and
//! `cpu.max` from the VM's size, created by the supervising process before the VMM starts,
//! the VMM moved into it before it allocates guest memory, removed when the VMM has exited.
//!
//! Skipped, with the reason logged, where cgroup v2 is not mounted at the parent's
//! filesystem, a controller is not available there, or the directory is not writable:
//! the VM then runs without these limits (the jail's rlimits still apply).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The VMM's own memory beyond guest RAM: its code, heap, stacks, device queues and buffers,
/// plus the kernel and initramfs images it keeps (added separately, by size).
pub const VMM_MEMORY_OVERHEAD: u64 = 64 << 20;
/// The page size memory.max counts in (x86_64).
const PAGE_SIZE: u64 = 4096;
/// CPU bandwidth period (microseconds) of `cpu.max`.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The controllers the VM's cgroup uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max`, bytes: guest RAM + images + [`VMM_MEMORY_OVERHEAD`].
    pub memory_max: u64,
    /// `pids.max`: the VMM's threads and slack.
    pub pids_max: u64,
    /// `cpu.max` quota per [`CPU_PERIOD_US`]: one CPU per vCPU and one for the device
    /// threads and the VMM's own.
    pub cpu_quota_us: u64,
}

impl Limits {
    /// Limits for a VM of `mem_bytes` RAM, `images` bytes of kernel and initramfs,
    /// `vcpus` vCPUs and `threads` threads.
    pub fn for_vm(mem_bytes: u64, images: u64, vcpus: u64, threads: u64) -> Self {
        Self {
            // Whole pages: the kernel rounds memory.max down to one.
            memory_max: mem_bytes
                .saturating_add(images)
                .saturating_add(VMM_MEMORY_OVERHEAD)
                .saturating_add(PAGE_SIZE - 1)
                / PAGE_SIZE
                * PAGE_SIZE,
            pids_max: threads,
            cpu_quota_us: vcpus.saturating_add(1).saturating_mul(CPU_PERIOD_US),
        }
    }

    /// The `(file, value)` pairs written into the cgroup, for the controllers enabled.
    pub fn files(&self, enabled: &[String]) -> Vec<(&'static str, String)> {
        let mut files = Vec::new();
        if enabled.iter().any(|c| c == "memory") {
            files.push(("memory.max", self.memory_max.to_string()));
            // No swap: the limit is the limit.
            files.push(("memory.swap.max", "0".to_owned()));
        }
        if enabled.iter().any(|c| c == "pids") {
            files.push(("pids.max", self.pids_max.to_string()));
        }
        if enabled.iter().any(|c| c == "cpu") {
            files.push(("cpu.max", format!("{} {CPU_PERIOD_US}", self.cpu_quota_us)));
        }
        files
    }
}

/// A VM's cgroup, created and limited; the VMM is not in it yet.
#[derive(Debug)]
pub struct VmCgroup {
    /// Its directory.
    pub dir: PathBuf,
    /// The controllers whose limits were written.
    pub controllers: Vec<String>,
}

/// Why the cgroup was skipped (logged; the VM runs without it).
#[derive(Debug, thiserror::Error)]
pub enum CgroupSkip {
    /// No cgroup v2 at the parent's location.
    #[error("no cgroup v2 hierarchy at {0} (no cgroup.controllers there)")]
    NotCgroup2(PathBuf),
    /// None of memory, pids, cpu is available (or could be enabled).
    #[error("none of the memory, pids, cpu controllers could be enabled in {0}")]
    NoControllers(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupSkip + '_ {
    move |source| CgroupSkip::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `<parent>/<name>` with `limits`. `parent` is created under its own parent (the
/// cgroup v2 mount) if missing, and the controllers are enabled for its children.
pub fn create(parent: &Path, name: &str, limits: &Limits) -> Result<VmCgroup, CgroupSkip> {
    let mount = parent.parent().unwrap_or(parent);
    if !mount.join("cgroup.controllers").is_file() {
        return Err(CgroupSkip::NotCgroup2(mount.to_path_buf()));
    }
    match std::fs::create_dir(parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(parent)(e)),
    }
    let available_file = parent.join("cgroup.controllers");
    let available = std::fs::read_to_string(&available_file).map_err(io(&available_file))?;
    // One controller at a time: one that cannot be enabled does not take the others along.
    let subtree = parent.join("cgroup.subtree_control");
    let mut enabled = Vec::new();
    for c in CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            tracing::info!(
                "jail: cgroup controller {c} not available in {}",
                parent.display()
            );
            continue;
        }
        match std::fs::write(&subtree, format!("+{c}")) {
            Ok(()) => enabled.push(c.to_owned()),
            Err(e) => tracing::warn!("jail: enabling {c} in {}: {e}", subtree.display()),
        }
    }
    if enabled.is_empty() {
        return Err(CgroupSkip::NoControllers(parent.to_path_buf()));
    }
    let dir = parent.join(name);
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    for (file, value) in limits.files(&enabled) {
        let path = dir.join(file);
        if let Err(e) = std::fs::write(&path, &value) {
            // memory.swap.max is absent without swap accounting: not a reason to skip.
            if file == "memory.swap.max" {
                continue;
            }
            remove(&dir);
            return Err(io(&path)(e));
        }
    }
    Ok(VmCgroup {
        dir,
        controllers: enabled,
    })
}

/// Moves process `pid` into the cgroup.
pub fn add_process(cgroup: &VmCgroup, pid: i32) -> Result<(), CgroupSkip> {
    let procs = cgroup.dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io(&procs))
}

/// Logs how close the VM came to its limits (`memory.peak`, the `max`/`oom_kill` counts
/// of `memory.events`, `pids.events`), read before the cgroup is removed. A VM that hit
/// `memory.max` gets a warning: reclaim slows it down, an OOM kill ends it.
pub fn report_pressure(dir: &Path) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let memory = read("memory.events");
    let (max, oom) = (
        event_count(&memory, "max"),
        event_count(&memory, "oom_kill"),
    );
    let pids = event_count(&read("pids.events"), "max");
    let peak = read("memory.peak");
    if max > 0 || oom > 0 || pids > 0 {
        tracing::warn!(
            "jail: the VM met its cgroup limits: memory.max {max} times, {oom} OOM kills, \
             pids.max {pids} times (memory.peak {} bytes)",
            peak.trim()
        );
    } else {
        tracing::debug!("jail: cgroup memory.peak {} bytes", peak.trim());
    }
}

/// The count of `key` in a cgroup `*.events` text (`key N` lines); 0 when absent.
fn event_count(events: &str, key: &str) -> u64 {
    events
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Removes the cgroup directory once its processes are gone (the kernel may take a moment
/// after the last one is reaped). Logs when it cannot.
pub fn remove(dir: &Path) {
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(e) = last {
        tracing::warn!("jail: removing the cgroup {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size() {
        let l = Limits::for_vm(128 << 20, 10 << 20, 2, 22);
        assert_eq!(l.memory_max, (128 + 10 + 64) << 20);
        assert_eq!(Limits::for_vm(0, 1, 1, 1).memory_max, (64 << 20) + 4096);
        assert_eq!(l.pids_max, 22);
        assert_eq!(l.cpu_quota_us, 300_000);
        let all: Vec<String> = CONTROLLERS.iter().map(|c| (*c).to_owned()).collect();
        let files = l.files(&all);
        assert!(files.contains(&("cpu.max", "300000 100000".to_owned())));
        assert!(files.contains(&("pids.max", "22".to_owned())));
        assert!(files.contains(&("memory.max", ((202u64) << 20).to_string())));
        assert_eq!(l.files(&["pids".to_owned()]).len(), 1);
    }

    #[test]
    fn event_counts_are_read_by_key() {
        let events = "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\n";
        assert_eq!(event_count(events, "max"), 17);
        assert_eq!(event_count(events, "oom_kill"), 1);
        assert_eq!(event_count(events, "oom_group_kill"), 0);
        assert_eq!(event_count("max x\n", "max"), 0);
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_skipped_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("mvm");
        let err = create(&parent, "x", &Limits::for_vm(1, 0, 1, 1)).unwrap_err();
        assert!(matches!(err, CgroupSkip::NotCgroup2(_)), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        assert!(!parent.exists());
    }
}
