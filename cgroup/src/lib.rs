//! A cgroup v2 per jailed process tree: `<parent>/<name>` with `memory.max`, `pids.max`
//! and `cpu.max`, made before the tree starts, the tree's first process moved in before
//! it does its work, read and removed when the tree has ended. Its users: `mvm-vmm`'s
//! jail (one per VM) and the runtime's container tier (one per container); each sizes
//! its own [`Limits`].
//!
//! [`create`] refuses, with the reason, where cgroup v2 is not mounted at the parent's
//! filesystem, no controller is available there, or the directory is not writable; the
//! caller says what then runs without these limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The page size `memory.max` counts in (x86_64).
const PAGE_SIZE: u64 = 4096;
/// CPU bandwidth period (microseconds) of `cpu.max`.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The controllers a cgroup of this crate uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// The limits of one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max`, bytes (whole pages: see [`Limits::new`]).
    pub memory_max: u64,
    /// `pids.max`: processes and threads.
    pub pids_max: u64,
    /// `cpu.max` quota per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
}

impl Limits {
    /// Limits of `memory_bytes` (rounded up to whole pages: the kernel rounds
    /// `memory.max` down to one), `pids` processes and threads, and `cpus` CPUs' worth of
    /// time.
    pub fn new(memory_bytes: u64, pids: u64, cpus: u64) -> Self {
        Self {
            memory_max: memory_bytes.saturating_add(PAGE_SIZE - 1) / PAGE_SIZE * PAGE_SIZE,
            pids_max: pids,
            cpu_quota_us: cpus.saturating_mul(CPU_PERIOD_US),
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

/// A cgroup, created and limited; no process is in it yet.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub dir: PathBuf,
    /// The controllers whose limits were written.
    pub controllers: Vec<String>,
}

/// Why no cgroup was made.
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
pub fn create(parent: &Path, name: &str, limits: &Limits) -> Result<Cgroup, CgroupSkip> {
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
                "cgroup controller {c} not available in {}",
                parent.display()
            );
            continue;
        }
        match std::fs::write(&subtree, format!("+{c}")) {
            Ok(()) => enabled.push(c.to_owned()),
            Err(e) => tracing::warn!(
                "enabling cgroup controller {c} in {}: {e}",
                subtree.display()
            ),
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
    Ok(Cgroup {
        dir,
        controllers: enabled,
    })
}

/// Moves process `pid` into the cgroup.
pub fn add_process(cgroup: &Cgroup, pid: i32) -> Result<(), CgroupSkip> {
    let procs = cgroup.dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io(&procs))
}

/// How close a cgroup's processes came to its limits, read before it is removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pressure {
    /// Times `memory.max` was reached (`memory.events` `max`).
    pub memory_max_hits: u64,
    /// Processes the kernel's OOM killer ended (`memory.events` `oom_kill`).
    pub oom_kills: u64,
    /// Times a fork was refused at `pids.max` (`pids.events` `max`).
    pub pids_max_hits: u64,
    /// `memory.peak`, bytes, where the kernel has it.
    pub memory_peak: Option<u64>,
}

impl Pressure {
    /// Whether any limit was met.
    pub fn met_a_limit(&self) -> bool {
        self.memory_max_hits > 0 || self.oom_kills > 0 || self.pids_max_hits > 0
    }
}

/// Reads how close the cgroup `dir`'s processes came to its limits (`memory.peak`, the
/// `max`/`oom_kill` counts of `memory.events`, `pids.events`).
pub fn pressure(dir: &Path) -> Pressure {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let memory = read("memory.events");
    Pressure {
        memory_max_hits: event_count(&memory, "max"),
        oom_kills: event_count(&memory, "oom_kill"),
        pids_max_hits: event_count(&read("pids.events"), "max"),
        memory_peak: read("memory.peak").trim().parse().ok(),
    }
}

/// Logs [`pressure`] of `dir`, a cgroup of `what` (a warning when a limit was met:
/// reclaim slows the processes down, an OOM kill ends one).
pub fn report_pressure(dir: &Path, what: &str) {
    let p = pressure(dir);
    let peak = p
        .memory_peak
        .map_or_else(|| "unknown".to_owned(), |b| b.to_string());
    if p.met_a_limit() {
        tracing::warn!(
            "{what} met its cgroup limits: memory.max {} times, {} OOM kills, \
             pids.max {} times (memory.peak {peak} bytes)",
            p.memory_max_hits,
            p.oom_kills,
            p.pids_max_hits,
        );
    } else {
        tracing::debug!("{what}: cgroup memory.peak {peak} bytes");
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

/// Removes what processes killed with SIGKILL (which could not clean up) left in `dir`:
/// empty directories named `prefix` + a pid that no longer runs (cgroups, and the VMM's
/// per-VM root directories, are named so). `rmdir` removes neither a non-empty
/// directory nor a cgroup with processes.
pub fn sweep_dead(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir(entry.path()) {
            Ok(()) => tracing::info!("removed stale {}", entry.path().display()),
            Err(e) => tracing::debug!("stale {}: {e}", entry.path().display()),
        }
    }
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
        tracing::warn!("removing the cgroup {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_whole_pages_and_cpu_periods() {
        let l = Limits::new((202 << 20) + 1, 22, 3);
        assert_eq!(l.memory_max, (202 << 20) + 4096);
        assert_eq!(Limits::new(0, 1, 1).memory_max, 0);
        assert_eq!(l.pids_max, 22);
        assert_eq!(l.cpu_quota_us, 300_000);
        let all: Vec<String> = CONTROLLERS.iter().map(|c| (*c).to_owned()).collect();
        let files = l.files(&all);
        assert!(files.contains(&("cpu.max", "300000 100000".to_owned())));
        assert!(files.contains(&("pids.max", "22".to_owned())));
        assert!(files.contains(&("memory.swap.max", "0".to_owned())));
        assert_eq!(l.files(&["pids".to_owned()]).len(), 1);
    }

    #[test]
    fn pressure_is_read_from_the_event_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pressure(dir.path()), Pressure::default());
        std::fs::write(
            dir.path().join("memory.events"),
            "max 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("pids.events"), "max 0\n").unwrap();
        std::fs::write(dir.path().join("memory.peak"), "4096\n").unwrap();
        let p = pressure(dir.path());
        assert_eq!((p.memory_max_hits, p.oom_kills, p.pids_max_hits), (3, 1, 0));
        assert_eq!(p.memory_peak, Some(4096));
        assert!(p.met_a_limit());
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
    fn only_empty_directories_of_dead_pids_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (own, dead, full) = (
            format!("x-{}", std::process::id()),
            "x-4294967".to_owned(),
            "x-4294968".to_owned(),
        );
        for name in [&own, &dead, &full, &"other-1".to_owned()] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join(&full).join("f"), "").unwrap();
        sweep_dead(dir.path(), "x-");
        assert!(dir.path().join(&own).exists(), "a live pid's is kept");
        assert!(
            !dir.path().join(&dead).exists(),
            "a dead pid's empty one goes"
        );
        assert!(dir.path().join(&full).exists(), "a non-empty one stays");
        assert!(
            dir.path().join("other-1").exists(),
            "another prefix is not touched"
        );
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_skipped_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("mvm");
        let err = create(&parent, "x", &Limits::new(1, 1, 1)).unwrap_err();
        assert!(matches!(err, CgroupSkip::NotCgroup2(_)), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        assert!(!parent.exists());
    }
}
