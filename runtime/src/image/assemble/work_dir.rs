//! A build's work directory (`~/.cache/mvm/build/<key16>`), held under an exclusive
//! `flock` on `<key16>.lock` beside it for as long as the build uses it, and removed
//! when the build ends, however it ends.
//!
//! A build killed midway (SIGKILL, a cancelled CI job) leaves its directory behind,
//! hundreds of MiB with the builder's output disk. Its lock died with the process,
//! so every claim first sweeps `build/`: whatever no live process holds the lock of
//! is removed. A claim of a key whose lock is held is refused (the other build's pid
//! in the error), never waited for: the refused command, run again after the other
//! one finished, gets the image from the build cache.
//!
//! Lock files are created and unlinked only while holding a `flock` on the `build/`
//! directory itself, so a lock file's path and the file a holder locked stay the same
//! inode (no holder of an unlinked lock next to a claimer of a new one). The slow part,
//! removing a finished build's directory, runs under the key's lock alone.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::AssembleError;

/// The suffix of a work directory's lock file.
const LOCK_SUFFIX: &str = ".lock";

/// A build's work directory, held: removed, and its lock released, when dropped.
#[derive(Debug)]
pub struct WorkDir {
    /// The directory (`build/<key16>`).
    path: PathBuf,
    /// Its lock file (`build/<key16>.lock`).
    lock_path: PathBuf,
    /// `build/`, locked while the lock file is unlinked.
    build_dir: PathBuf,
    /// The held lock; `None` only while dropping.
    lock: Option<Flock<File>>,
}

/// What a sweep removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The work directory (or, without one, the lock file).
    pub path: PathBuf,
    /// The disk space it took, bytes.
    pub bytes: u64,
}

impl WorkDir {
    /// The work directory of build `key` under the cache's `build/`, swept first.
    pub fn claim(key: &str) -> Result<Self, AssembleError> {
        let build_dir = crate::image::store::cache_dir()?.join("build");
        let (work, swept) = Self::claim_in(&build_dir, key)?;
        for s in &swept {
            super::say(&format!(
                "removed {} ({} MiB), left by a build that was stopped",
                s.path.display(),
                s.bytes.div_ceil(1 << 20)
            ));
        }
        Ok(work)
    }

    /// The work directory of build `key` in `build_dir` (named by the key's first 16
    /// characters), created empty and locked, and what the sweep before removed.
    /// Refused with [`AssembleError::Busy`] when another build holds it.
    pub fn claim_in(build_dir: &Path, key: &str) -> Result<(Self, Vec<Swept>), AssembleError> {
        let name = key.get(..16).unwrap_or(key);
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(AssembleError::Io {
                path: build_dir.join(name),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("not a build key: {key:?}"),
                ),
            });
        }
        std::fs::create_dir_all(build_dir).map_err(io_err(build_dir))?;
        let dir_lock = lock_build_dir(build_dir)?;
        let swept = sweep_held(build_dir);
        let path = build_dir.join(name);
        let lock_path = build_dir.join(format!("{name}{LOCK_SUFFIX}"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                let pid = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Err(AssembleError::Busy { path, pid });
            }
            Err((_, errno)) => return Err(io_err(&lock_path)(errno.into())),
        };
        lock.set_len(0)
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .map_err(io_err(&lock_path))?;
        // Whatever is there is a stopped build's (the sweep missed it, or it is not
        // a directory): its lock was free.
        if std::fs::symlink_metadata(&path).is_ok() {
            remove_entry(&path).map_err(io_err(&path))?;
        }
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        drop(dir_lock);
        Ok((
            Self {
                path,
                lock_path,
                build_dir: build_dir.to_owned(),
                lock: Some(lock),
            },
            swept,
        ))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing the work directory {}: {e}", self.path.display());
            }
        }
        match lock_build_dir(&self.build_dir) {
            Ok(dir_lock) => {
                if let Err(e) = std::fs::remove_file(&self.lock_path) {
                    tracing::warn!("removing {}: {e}", self.lock_path.display());
                }
                drop(self.lock.take());
                drop(dir_lock);
            }
            // Left for the next sweep: unlinking it without the directory's lock
            // could leave a claimer holding a file no longer at its path.
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Removes from `build_dir` every work directory and lock file whose lock no live
/// process holds, the caller holding `build_dir`'s lock; what was removed. Best
/// effort: what cannot be read or removed is logged and left.
fn sweep_held(build_dir: &Path) -> Vec<Swept> {
    let entries = match std::fs::read_dir(build_dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!("sweeping {}: {e}", build_dir.display());
            return Vec::new();
        }
    };
    // Each key once, whether seen by its directory, its lock file or both.
    let names: BTreeSet<OsString> = entries
        .filter_map(Result::ok)
        .map(|entry| key_name(&entry.file_name()))
        .collect();
    let mut swept = Vec::new();
    for name in names {
        let path = build_dir.join(&name);
        let mut lock_name = name.clone();
        lock_name.push(LOCK_SUFFIX);
        let lock_path = build_dir.join(lock_name);
        // Held until the entries are gone, so no claim of this key starts meanwhile
        // (claims also take the directory's lock; this is belt and braces).
        let _lock = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&lock_path)
        {
            // No lock file: a claim makes it before the directory and a drop
            // removes it after, so the directory is a stopped build's.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("sweeping {}: {e}", lock_path.display());
                continue;
            }
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => Some(lock),
                // A build is running in it.
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, errno)) => {
                    tracing::warn!("sweeping {}: {errno}", lock_path.display());
                    continue;
                }
            },
        };
        let had_dir = std::fs::symlink_metadata(&path).is_ok();
        let bytes = if had_dir { disk_usage(&path) } else { 0 };
        if had_dir {
            if let Err(e) = remove_entry(&path) {
                tracing::warn!("removing the stale work directory {}: {e}", path.display());
                continue;
            }
        }
        match std::fs::remove_file(&lock_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("removing {}: {e}", lock_path.display());
            }
            _ => {}
        }
        swept.push(Swept {
            path: if had_dir { path } else { lock_path },
            bytes,
        });
    }
    swept
}

/// The key part of a `build/` entry's name: the name without `.lock`.
fn key_name(file_name: &OsStr) -> OsString {
    let bytes = file_name.as_bytes();
    let key = bytes
        .strip_suffix(LOCK_SUFFIX.as_bytes())
        .filter(|k| !k.is_empty())
        .unwrap_or(bytes);
    OsString::from_vec(key.to_vec())
}

/// `build_dir` locked (a `flock` on the directory itself, waited for: it is held
/// only while claiming, sweeping or releasing).
fn lock_build_dir(build_dir: &Path) -> Result<Flock<File>, AssembleError> {
    let mut file = File::open(build_dir).map_err(io_err(build_dir))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            Err((back, Errno::EINTR)) => file = back,
            Err((_, errno)) => return Err(io_err(build_dir)(errno.into())),
        }
    }
}

/// Removes a directory with its contents, or a file.
fn remove_entry(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// The disk space under `path`, bytes (allocated blocks: the output disk is sparse);
/// what cannot be read counts as nothing.
fn disk_usage(path: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![path.to_owned()];
    while let Some(p) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                pending.extend(entries.filter_map(Result::ok).map(|e| e.path()));
            }
        }
    }
    total
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaa0123456789";
    const KEY_B: &str = "bbbbbbbbbbbbbbbb0123456789";

    /// `build/<name>` with a file of `len` bytes in it, and its lock file.
    fn stale(build: &Path, name: &str, len: usize, with_lock: bool) -> PathBuf {
        let dir = build.join(name);
        std::fs::create_dir_all(dir.join("inputs")).unwrap();
        std::fs::write(dir.join("inputs/output.img"), vec![1u8; len]).unwrap();
        if with_lock {
            std::fs::write(build.join(format!("{name}.lock")), "4194304\n").unwrap();
        }
        dir
    }

    /// The lock of `build/<name>`, held through an open file description of its own,
    /// as a running build in another process would hold it.
    fn hold(build: &Path, name: &str) -> Flock<File> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(build.join(format!("{name}.lock")))
            .unwrap();
        Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap()
    }

    /// A sweep of `build` as a claim makes it.
    fn sweep(build: &Path) -> Result<Vec<Swept>, AssembleError> {
        let _dir_lock = lock_build_dir(build)?;
        Ok(sweep_held(build))
    }

    fn names(build: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(build)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn work_dir_sweep_removes_a_stale_dir_and_its_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        let dir = stale(build, "1111111111111111", 64 << 10, true);
        let swept = sweep(build).unwrap();
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].path, dir);
        assert!(swept[0].bytes >= 64 << 10, "{swept:?}");
        assert!(names(build).is_empty(), "{:?}", names(build));
    }

    #[test]
    fn work_dir_sweep_removes_a_dir_without_a_lock_file_and_a_lone_lock_file() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        // Left by an mvm from before work directories had locks.
        stale(build, "2222222222222222", 10, false);
        // Left by a build killed between removing its directory and its lock file.
        std::fs::write(build.join("3333333333333333.lock"), "1\n").unwrap();
        let swept = sweep(build).unwrap();
        assert_eq!(swept.len(), 2, "{swept:?}");
        assert!(names(build).is_empty(), "{:?}", names(build));
    }

    #[test]
    fn work_dir_sweep_keeps_a_dir_whose_lock_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        let live = stale(build, "4444444444444444", 10, false);
        let held = hold(build, "4444444444444444");
        stale(build, "5555555555555555", 10, true);
        let swept = sweep(build).unwrap();
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert_eq!(
            names(build),
            ["4444444444444444", "4444444444444444.lock"],
            "the held one is kept, the other swept"
        );
        assert!(live.join("inputs/output.img").is_file());
        drop(held);
        sweep(build).unwrap();
        assert!(names(build).is_empty(), "{:?}", names(build));
    }

    #[test]
    fn work_dir_claim_sweeps_stale_dirs_but_not_other_live_builds() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path().join("build");
        let (a, swept) = WorkDir::claim_in(&build, KEY_A).unwrap();
        assert!(swept.is_empty());
        std::fs::write(a.path().join("output.img"), b"a's output").unwrap();
        let old = stale(&build, "6666666666666666", 10, true);
        let (b, swept) = WorkDir::claim_in(&build, KEY_B).unwrap();
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert_eq!(swept[0].path, old);
        assert_eq!(
            std::fs::read(a.path().join("output.img")).unwrap(),
            b"a's output"
        );
        assert_eq!(b.path(), build.join("bbbbbbbbbbbbbbbb"));
        assert!(b.path().is_dir());
        assert_eq!(
            names(&build),
            [
                "aaaaaaaaaaaaaaaa",
                "aaaaaaaaaaaaaaaa.lock",
                "bbbbbbbbbbbbbbbb",
                "bbbbbbbbbbbbbbbb.lock"
            ]
        );
    }

    #[test]
    fn work_dir_claim_of_a_held_key_is_refused_naming_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        let (first, _) = WorkDir::claim_in(build, KEY_A).unwrap();
        std::fs::write(first.path().join("output.img"), b"first").unwrap();
        let err = WorkDir::claim_in(build, KEY_A).unwrap_err();
        match &err {
            AssembleError::Busy { path, pid } => {
                assert_eq!(path, first.path());
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("not Busy: {other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("another build of this image is running")
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        // The first build's files are untouched, and it still holds its lock.
        assert_eq!(
            std::fs::read(first.path().join("output.img")).unwrap(),
            b"first"
        );
        sweep(build).unwrap();
        assert!(first.path().join("output.img").is_file());
        drop(first);
        let (again, _) = WorkDir::claim_in(build, KEY_A).unwrap();
        assert!(again.path().is_dir());
    }

    #[test]
    fn work_dir_claim_of_a_held_key_held_elsewhere_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        let _held = hold(build, "aaaaaaaaaaaaaaaa");
        assert!(matches!(
            WorkDir::claim_in(build, KEY_A),
            Err(AssembleError::Busy { .. })
        ));
    }

    #[test]
    fn work_dir_drop_removes_the_dir_and_its_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        let (work, _) = WorkDir::claim_in(build, KEY_A).unwrap();
        std::fs::create_dir_all(work.path().join("spool/layer")).unwrap();
        std::fs::write(work.path().join("spool/layer/f"), b"x").unwrap();
        assert_eq!(names(build), ["aaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaa.lock"]);
        drop(work);
        assert!(names(build).is_empty(), "{:?}", names(build));
    }

    #[test]
    fn work_dir_claim_replaces_a_stale_dir_of_the_same_key() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path();
        stale(build, "aaaaaaaaaaaaaaaa", 10, true);
        let (work, swept) = WorkDir::claim_in(build, KEY_A).unwrap();
        assert_eq!(swept.len(), 1);
        assert!(std::fs::read_dir(work.path()).unwrap().next().is_none());
    }

    #[test]
    fn work_dir_claim_refuses_a_key_that_is_not_a_name() {
        let tmp = tempfile::tempdir().unwrap();
        for key in ["", ".lock", "../escape"] {
            assert!(
                matches!(
                    WorkDir::claim_in(tmp.path(), key),
                    Err(AssembleError::Io { .. })
                ),
                "{key:?}"
            );
        }
    }
}
