//! A private per-run directory for sockets and logs, removed when the run
//! ends (including on errors and Ctrl-C), so nothing is left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Distinguishes several runs in one process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where run directories go: `$MVM_RUN_DIR`, else `$XDG_RUNTIME_DIR`, else `/tmp`.
pub fn base_dir() -> PathBuf {
    ["MVM_RUN_DIR", "XDG_RUNTIME_DIR"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Removes the run directories (`mvm-<pid>-<n>`) under `base` that process
/// `pid` left when it was killed before it could (`kill -9 mvm`). The caller
/// has judged `pid` gone; a directory of another pid is never touched.
/// Returns how many were removed.
pub fn remove_left_by(base: &Path, pid: u32) -> usize {
    let prefix = format!("mvm-{pid}-");
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!("removing {}: {e}", entry.path().display()),
        }
    }
    removed
}

/// Checks that `dir` is a directory of this user's that no one else may write, and not a
/// link: what a per-user directory in a shared base (`/tmp`) must be before it is used or
/// read, since another user could have made it first. Absent is an error too.
pub fn check_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = nix::unistd::getuid().as_raw();
    if meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o022 == 0 {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of uid {uid} writable only by it",
                dir.display()
            ),
        ))
    }
}

/// A directory that is deleted with everything in it on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$MVM_RUN_DIR` or `$XDG_RUNTIME_DIR` or `/tmp`, then
    /// `mvm-<pid>-<n>` inside it, mode 0700. The path stays short because
    /// Unix socket paths are limited to 107 bytes.
    pub fn create() -> std::io::Result<Self> {
        Self::create_in(&base_dir())
    }

    /// Creates `mvm-<pid>-<n>` under `base`, mode 0700.
    pub fn create_in(base: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("mvm-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("removing {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let dir = ScratchDir::create_in(base.path()).unwrap();
        let path = dir.path().to_owned();
        std::fs::write(path.join("vsock.sock_1024"), b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let other = ScratchDir::create_in(base.path()).unwrap();
        assert_ne!(other.path(), path);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn only_a_dead_runs_directories_are_removed() {
        let base = tempfile::tempdir().unwrap();
        for name in [
            "mvm-4242-0",
            "mvm-4242-1",
            "mvm-42420-0",
            "mvm-4242-x",
            "other",
        ] {
            std::fs::create_dir(base.path().join(name)).unwrap();
        }
        std::fs::write(base.path().join("mvm-4242-0/vmm.log"), b"x").unwrap();
        assert_eq!(remove_left_by(base.path(), 4242), 2);
        let mut left: Vec<String> = std::fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["mvm-4242-x", "mvm-42420-0", "other"]);
    }
}
