//! Removing what a killed `mvm` left behind: entries of a directory named for the process
//! that made them, whose process is gone.

use std::path::Path;

/// Removes every entry of `dir` (a directory, recursively) for which `owner` names a
/// process id that no longer exists. Entries `owner` names no process for are left alone,
/// and so are those of live processes (a reused pid keeps an entry until it is gone too).
pub fn sweep(dir: &Path, owner: impl Fn(&str) -> Option<u32>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(&owner).filter(|&pid| pid > 0) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!(path = %entry.path().display(), pid, "removing what a process that is gone left");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
