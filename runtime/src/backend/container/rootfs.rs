//! The container's tree: the image's initramfs (measured against the plan before it gets
//! here) unpacked by the container's init, as the container's root, into the tmpfs of
//! its own mount namespace ([`super::init`]), so every file is the container root's.
//!
//! An archive is data, not instructions for this host: every path must stay inside the
//! new directory, so a path that is absolute or holds `.` or `..`, an entry under a
//! symbolic link of the archive (which would be followed on this host), and a path seen
//! twice are refused. Symbolic links are created as they are and never followed here
//! (their owner is whoever unpacks); device nodes are skipped (the container's `/dev` is
//! made by its init).

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::backend::RunError;
use crate::image::cpio::{parse_newc, Entry, EntryKind};

/// What unpacking found wrong.
fn refused(path: &str, why: &str) -> RunError {
    RunError::Missing(format!(
        "the image's initramfs cannot be unpacked for a container: {path:?}: {why}"
    ))
}

/// The relative path of an archive entry, checked to stay inside the tree.
fn inside(path: &str) -> Result<PathBuf, RunError> {
    let relative = Path::new(path);
    if path.is_empty() || relative.is_absolute() {
        return Err(refused(path, "not a relative path"));
    }
    let mut out = PathBuf::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => out.push(part),
            _ => return Err(refused(path, "a path holding '.', '..' or a root")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refused(path, "an empty path"));
    }
    Ok(out)
}

/// Unpacks the newc archive `initramfs` into `root` (which must exist and be empty),
/// every entry owned by the caller. Returns how many entries were written.
pub(super) fn unpack(initramfs: &[u8], root: &Path) -> Result<usize, RunError> {
    let entries = parse_newc(initramfs).map_err(|e| {
        RunError::Missing(format!("the image's initramfs is not a newc archive: {e}"))
    })?;
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let mut written = 0;
    for entry in &entries {
        // The kernel's unpacker gives the root's own entry as "."; it is `root` itself.
        if entry.path == "." {
            continue;
        }
        let relative = inside(&entry.path)?;
        if relative.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(refused(&entry.path, "under a symbolic link of the archive"));
        }
        if !seen.insert(relative.clone()) {
            return Err(refused(&entry.path, "given twice"));
        }
        let path = root.join(&relative);
        if let Some(parent) = path.parent() {
            // Only directories of this tree can be on the way: links were refused above.
            std::fs::create_dir_all(parent)
                .map_err(RunError::io(format!("creating {}", parent.display())))?;
        }
        if write_entry(entry, &path)? {
            written += 1;
            if matches!(entry.kind, EntryKind::Symlink(_)) {
                links.insert(relative);
            }
        }
    }
    Ok(written)
}

/// Writes one entry; `false` for one skipped (a device node).
fn write_entry(entry: &Entry, path: &Path) -> Result<bool, RunError> {
    let what = |verb: &str| format!("{verb} {}", path.display());
    let perm = entry.perm & 0o7777;
    match &entry.kind {
        EntryKind::Dir => {
            match std::fs::create_dir(path) {
                Ok(()) => {}
                // Made already as a parent of an earlier entry.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(e) => return Err(RunError::io(what("creating"))(e)),
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(perm))
                .map_err(RunError::io(what("setting the mode of")))?;
        }
        EntryKind::File(bytes) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(perm)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(RunError::io(what("creating")))?;
            file.write_all(bytes)
                .map_err(RunError::io(what("writing")))?;
            // The mode without the process's umask.
            file.set_permissions(std::fs::Permissions::from_mode(perm))
                .map_err(RunError::io(what("setting the mode of")))?;
        }
        EntryKind::Symlink(target) => {
            std::os::unix::fs::symlink(target, path).map_err(RunError::io(what("linking")))?;
        }
        EntryKind::CharDev { .. } => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::cpio::Archive;

    fn archive(build: impl FnOnce(&mut Archive)) -> Vec<u8> {
        let mut a = Archive::new();
        build(&mut a);
        a.to_newc().unwrap()
    }

    /// A newc archive of `(path, mode with type, data)` entries, written without any
    /// of the writer's checks.
    fn raw(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let pad = |bytes: &mut Vec<u8>| {
            while bytes.len() % 4 != 0 {
                bytes.push(0);
            }
        };
        for (name, mode, data) in entries.iter().chain([&("TRAILER!!!", 0, &b""[..])]) {
            let fields = [
                1,
                *mode,
                0,
                0,
                1,
                0,
                u32::try_from(data.len()).unwrap(),
                0,
                0,
                0,
                0,
                u32::try_from(name.len()).unwrap() + 1,
                0,
            ];
            bytes.extend_from_slice(b"070701");
            for f in fields {
                bytes.extend_from_slice(format!("{f:08x}").as_bytes());
            }
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0);
            pad(&mut bytes);
            bytes.extend_from_slice(data);
            pad(&mut bytes);
        }
        bytes
    }

    #[test]
    fn a_tree_unpacks_with_modes_links_and_no_devices() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(|a| {
            a.add_dir("bin", 0o755).unwrap();
            a.add_file("bin/busybox", 0o755, b"elf".to_vec()).unwrap();
            a.add_symlink("bin/sh", "busybox").unwrap();
            a.add_file("etc/secret", 0o600, b"x".to_vec()).unwrap();
            a.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        });
        let n = unpack(&bytes, dir.path()).unwrap();
        assert_eq!(
            n, 6,
            "bin, busybox, sh, dev and etc (made for their files), secret"
        );
        let busybox = dir.path().join("bin/busybox");
        assert_eq!(std::fs::read(&busybox).unwrap(), b"elf");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&busybox), 0o755);
        assert_eq!(mode(&dir.path().join("etc/secret")), 0o600);
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(!dir.path().join("dev/console").exists());
    }

    #[test]
    fn paths_that_leave_the_tree_are_refused() {
        for bad in ["../escape", "a/../../escape", "/etc/passwd", "./x/../.."] {
            let dir = tempfile::tempdir().unwrap();
            // The archive writer refuses such paths itself: written by hand.
            let bytes = raw(&[(bad, 0o100_644, b"pwned")]);
            let err = unpack(&bytes, dir.path()).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
            assert!(!dir.path().parent().unwrap().join("escape").exists());
        }
    }

    #[test]
    fn an_entry_under_a_link_of_the_archive_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_owned();
        let bytes = raw(&[
            ("etc", 0o120_777, target.as_bytes()),
            ("etc/passwd", 0o100_644, b"root::0:0::/:/bin/sh"),
        ]);
        let err = unpack(&bytes, dir.path()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!outside.path().join("passwd").exists());
    }
}
