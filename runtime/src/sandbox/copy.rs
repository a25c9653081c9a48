//! Copies between the host and a sandbox, a file or a whole directory tree.
//!
//! The guest is not trusted, and neither are its names: a directory copied out
//! is rebuilt under the destination one component at a time, each directory
//! opened relative to its parent without following a symbolic link (`openat`
//! with `O_NOFOLLOW`), each file written to a fresh temporary name and renamed
//! into place (`renameat` replaces a link there rather than following it). A
//! name with a `/`, a NUL, `.` or `..` stops the copy. Links, devices, FIFOs and
//! sockets are skipped on both sides and counted, never followed or made.
//! Limits: [`MAX_TRANSFER`] bytes in all, [`MAX_DIR_ENTRIES`] entries in all,
//! [`MAX_DEPTH`] levels.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mvm_agent::protocol::{
    DirEntry, EntryKind, ErrorCode, MakeDirRequest, WriteFileRequest, MAX_DIR_ENTRIES,
};
use mvm_agent::Client;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use serde::Serialize;

use super::{check_guest_path, SandboxClient, SandboxError, MAX_TRANSFER, WORKLOAD_ID};

/// The deepest a copied tree may go.
pub const MAX_DEPTH: usize = 64;

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyStats {
    /// Regular files copied.
    pub files: u64,
    /// Directories made (or found) at the destination.
    pub dirs: u64,
    /// Bytes of file contents copied.
    pub bytes: u64,
    /// Entries not copied (links, devices, FIFOs, sockets, names that are not
    /// UTF-8), as paths relative to the source.
    pub skipped: Vec<String>,
}

/// Entries copied so far, against the limits.
struct Budget {
    entries: usize,
    bytes: u64,
}

impl Budget {
    fn entry(&mut self, what: &str) -> Result<(), SandboxError> {
        self.entries += 1;
        if self.entries > MAX_DIR_ENTRIES {
            return Err(SandboxError::BadPath {
                path: what.to_owned(),
                reason: format!("the copy has more than {MAX_DIR_ENTRIES} entries"),
            });
        }
        Ok(())
    }

    /// Bytes a file may still have.
    fn left(&self) -> u64 {
        MAX_TRANSFER.saturating_sub(self.bytes)
    }

    fn add(&mut self, what: &str, size: u64) -> Result<(), SandboxError> {
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > MAX_TRANSFER {
            return Err(SandboxError::TooLarge {
                what: what.to_owned(),
                size: self.bytes,
            });
        }
        Ok(())
    }
}

fn io_error(what: impl Into<String>, e: impl Into<std::io::Error>) -> SandboxError {
    SandboxError::io(what, e.into())
}

/// A name the guest gave: one plain component.
fn check_name(parent: &str, name: &str) -> Result<(), SandboxError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(SandboxError::BadPath {
            path: format!("{parent}/{name}"),
            reason: "the guest listed a name that is not one plain path component".into(),
        });
    }
    Ok(())
}

/// A level of a tree past [`MAX_DEPTH`] stops the copy.
fn check_depth(depth: usize, path: impl FnOnce() -> String) -> Result<(), SandboxError> {
    if depth > MAX_DEPTH {
        return Err(SandboxError::BadPath {
            path: path(),
            reason: format!("deeper than {MAX_DEPTH} levels"),
        });
    }
    Ok(())
}

fn join(parent: &str, name: &str) -> String {
    format!("{}/{name}", parent.trim_end_matches('/'))
}

/// Copies through one agent connection; what it makes in the guest is owned by
/// `owner` (uid and gid), or root.
pub struct Copier<'a> {
    client: &'a Client,
    owner: Option<u32>,
}

impl SandboxClient {
    /// Whether `guest_path` is a directory in the guest (a link to one is not).
    pub fn is_dir(&self, guest_path: &str) -> Result<bool, SandboxError> {
        Copier::new(&self.client, Some(WORKLOAD_ID)).is_dir(guest_path)
    }

    /// Copies the host file or directory `host` to `guest_path` (the new file's
    /// or directory's own path; a directory already there is merged into).
    /// Files are written atomically and, with directories, owned by the workload
    /// user.
    pub fn copy_in(&self, host: &Path, guest_path: &str) -> Result<CopyStats, SandboxError> {
        Copier::new(&self.client, Some(WORKLOAD_ID)).copy_in(host, guest_path)
    }

    /// Copies the guest file or directory `guest_path` to `host` (see
    /// [`SandboxClient::copy_out`]).
    pub fn copy_out(&self, guest_path: &str, host: &Path) -> Result<CopyStats, SandboxError> {
        Copier::new(&self.client, Some(WORKLOAD_ID)).copy_out(guest_path, host)
    }
}

impl<'a> Copier<'a> {
    /// A copier on `client`, making what it makes in the guest owned by `owner`.
    pub fn new(client: &'a Client, owner: Option<u32>) -> Self {
        Self { client, owner }
    }

    /// Whether `guest_path` is a directory in the guest (a link to one is not).
    pub fn is_dir(&self, guest_path: &str) -> Result<bool, SandboxError> {
        check_guest_path(guest_path)?;
        match self.client.list_dir(guest_path) {
            Ok(_) => Ok(true),
            Err(mvm_agent::ClientError::Agent(reply))
                if matches!(reply.code, ErrorCode::BadRequest | ErrorCode::NotFound) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Copies the host file or directory `host` to `guest_path` (see
    /// [`SandboxClient::copy_in`]).
    pub fn copy_in(&self, host: &Path, guest_path: &str) -> Result<CopyStats, SandboxError> {
        check_guest_path(guest_path)?;
        let meta = std::fs::metadata(host).map_err(|e| io_error(host.display().to_string(), e))?;
        let mut stats = CopyStats::default();
        let mut budget = Budget {
            entries: 0,
            bytes: 0,
        };
        if meta.is_dir() {
            self.dir_in(host, guest_path, 0, &mut budget, &mut stats, "")?;
        } else if meta.is_file() {
            self.file_in(host, guest_path, &meta, &mut budget, &mut stats)?;
        } else {
            return Err(SandboxError::BadPath {
                path: host.display().to_string(),
                reason: "neither a regular file nor a directory".into(),
            });
        }
        Ok(stats)
    }

    fn file_in(
        &self,
        host: &Path,
        guest: &str,
        meta: &std::fs::Metadata,
        budget: &mut Budget,
        stats: &mut CopyStats,
    ) -> Result<(), SandboxError> {
        if meta.len() > budget.left() {
            return Err(SandboxError::TooLarge {
                what: host.display().to_string(),
                size: meta.len().saturating_add(budget.bytes),
            });
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(host)
            .map_err(|e| io_error(host.display().to_string(), e))?;
        let request = WriteFileRequest {
            path: guest.to_owned(),
            mode: meta.mode() & 0o777,
            uid: self.owner,
            gid: self.owner,
            append: false,
            atomic: true,
        };
        // One byte past the budget is enough to be refused: a file that grew.
        let mut limited = (&mut file).take(budget.left().saturating_add(1));
        let size = self.client.write_file_from(&request, &mut limited)?.size;
        budget.add(&host.display().to_string(), size)?;
        stats.files += 1;
        stats.bytes += size;
        Ok(())
    }

    fn dir_in(
        &self,
        host: &Path,
        guest: &str,
        depth: usize,
        budget: &mut Budget,
        stats: &mut CopyStats,
        relative: &str,
    ) -> Result<(), SandboxError> {
        check_depth(depth, || host.display().to_string())?;
        let mode = std::fs::metadata(host)
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0o755);
        self.client.make_dir(&MakeDirRequest {
            path: guest.to_owned(),
            // The workload may always enter and change what was copied in.
            mode: mode | 0o700,
            uid: self.owner,
            gid: self.owner,
        })?;
        stats.dirs += 1;
        let mut entries: Vec<_> = std::fs::read_dir(host)
            .map_err(|e| io_error(host.display().to_string(), e))?
            .collect::<Result<_, _>>()
            .map_err(|e| io_error(host.display().to_string(), e))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                stats.skipped.push(
                    join(relative, &name.to_string_lossy())
                        .trim_start_matches('/')
                        .to_owned(),
                );
                continue;
            };
            let rel = join(relative, name).trim_start_matches('/').to_owned();
            budget.entry(&rel)?;
            // Not followed: a link is what it is.
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| io_error(path.display().to_string(), e))?;
            let target = join(guest, name);
            if meta.is_dir() {
                self.dir_in(&path, &target, depth + 1, budget, stats, &rel)?;
            } else if meta.is_file() {
                self.file_in(&path, &target, &meta, budget, stats)?;
            } else {
                stats.skipped.push(rel);
            }
        }
        Ok(())
    }

    /// Copies the guest file or directory `guest_path` to `host` (the new file's
    /// or directory's own path; a directory already there is merged into). A
    /// file lands whole or not at all.
    pub fn copy_out(&self, guest_path: &str, host: &Path) -> Result<CopyStats, SandboxError> {
        check_guest_path(guest_path)?;
        let mut stats = CopyStats::default();
        let mut budget = Budget {
            entries: 0,
            bytes: 0,
        };
        let (parent, name) = host_parent(host)?;
        let parent_fd = open_dir(None, &parent, true)?;
        match self.client.list_dir(guest_path) {
            Ok(entries) => {
                let dir = make_host_dir(&parent_fd, &name, host)?;
                stats.dirs += 1;
                self.dir_out(
                    guest_path,
                    entries,
                    &dir,
                    host,
                    0,
                    &mut budget,
                    &mut stats,
                    "",
                )?;
            }
            // Not a directory: a file (or the read says why not).
            Err(mvm_agent::ClientError::Agent(reply)) if reply.code == ErrorCode::BadRequest => {
                let size = self.file_out(guest_path, &parent_fd, &name, host, budget.left())?;
                stats.files += 1;
                stats.bytes += size;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(stats)
    }

    /// Streams one guest file into a fresh temporary name in `dir`, renamed over
    /// `name` only when whole.
    fn file_out(
        &self,
        guest: &str,
        dir: &OwnedFd,
        name: &str,
        shown: &Path,
        limit: u64,
    ) -> Result<u64, SandboxError> {
        let temp = format!(".{name}.mvm-cp-{}", std::process::id());
        let fd = openat(
            Some(dir.as_raw_fd()),
            temp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| io_error(format!("creating a file beside {}", shown.display()), e))?;
        // SAFETY: `fd` was just opened here and nothing else owns it.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let remove_temp = || {
            let _ = nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                temp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        };
        check_guest_path(guest)?;
        let result = self
            .client
            .read_file_to(guest, limit.min(MAX_TRANSFER), &mut file)
            .map_err(SandboxError::from)
            .and_then(|size| {
                file.sync_all()
                    .map_err(|e| io_error(format!("writing {}", shown.display()), e))?;
                renameat(
                    Some(dir.as_raw_fd()),
                    temp.as_str(),
                    Some(dir.as_raw_fd()),
                    name,
                )
                .map_err(|e| io_error(format!("writing {}", shown.display()), e))?;
                Ok(size)
            });
        if result.is_err() {
            remove_temp();
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn dir_out(
        &self,
        guest: &str,
        entries: Vec<DirEntry>,
        dir: &OwnedFd,
        shown: &Path,
        depth: usize,
        budget: &mut Budget,
        stats: &mut CopyStats,
        relative: &str,
    ) -> Result<(), SandboxError> {
        check_depth(depth, || guest.to_owned())?;
        let mut entries = entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in entries {
            check_name(guest, &entry.name)?;
            let rel = join(relative, &entry.name)
                .trim_start_matches('/')
                .to_owned();
            budget.entry(&rel)?;
            let from = join(guest, &entry.name);
            let to = shown.join(&entry.name);
            match entry.kind {
                EntryKind::Dir => {
                    let sub = make_host_dir(dir, &entry.name, &to)?;
                    stats.dirs += 1;
                    let listed = self.client.list_dir(&from)?;
                    self.dir_out(&from, listed, &sub, &to, depth + 1, budget, stats, &rel)?;
                }
                EntryKind::File => {
                    let size = self.file_out(&from, dir, &entry.name, &to, budget.left())?;
                    budget.add(&rel, size)?;
                    stats.files += 1;
                    stats.bytes += size;
                }
                EntryKind::Symlink | EntryKind::Other => stats.skipped.push(rel),
            }
        }
        Ok(())
    }
}

/// `host`'s parent directory (`.` for a bare name) and its last component.
fn host_parent(host: &Path) -> Result<(PathBuf, String), SandboxError> {
    let name = host
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| SandboxError::BadPath {
            path: host.display().to_string(),
            reason: "the destination has no UTF-8 file name".into(),
        })?;
    let parent = host
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((parent.to_owned(), name.to_owned()))
}

/// Opens a directory: `path` relative to `at` (or the working directory),
/// following a link only when `follow` (the user's own destination).
fn open_dir(at: Option<&OwnedFd>, path: &Path, follow: bool) -> Result<OwnedFd, SandboxError> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let fd = openat(at.map(AsRawFd::as_raw_fd), path, flags, Mode::empty())
        .map_err(|e| io_error(format!("opening the directory {}", path.display()), e))?;
    // SAFETY: `fd` was just opened here and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes (or finds) the directory `name` in `parent` and opens it, never
/// through a link: a link or a file in its place is an error.
fn make_host_dir(parent: &OwnedFd, name: &str, shown: &Path) -> Result<OwnedFd, SandboxError> {
    match mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io_error(format!("making {}", shown.display()), e)),
    }
    open_dir(Some(parent), Path::new(name), false).map_err(|_| SandboxError::BadPath {
        path: shown.display().to_string(),
        reason: "exists and is not a directory (a link is not followed)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_must_be_one_plain_component() {
        for good in ["a", "a.b", ".hidden", "..x", "with space"] {
            check_name("/work", good).unwrap();
        }
        let long = "x".repeat(256);
        for bad in ["", ".", "..", "a/b", "/", "a\0b", long.as_str()] {
            assert!(check_name("/work", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_host_directory_is_made_once_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = open_dir(None, dir.path(), true).unwrap();
        make_host_dir(&root, "sub", &dir.path().join("sub")).unwrap();
        make_host_dir(&root, "sub", &dir.path().join("sub")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert!(make_host_dir(&root, "link", &dir.path().join("link")).is_err());
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(make_host_dir(&root, "file", &dir.path().join("file")).is_err());
        assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"x");
    }

    #[test]
    fn the_destination_needs_a_name() {
        assert_eq!(
            host_parent(Path::new("out")).unwrap(),
            (PathBuf::from("."), "out".to_owned())
        );
        assert_eq!(
            host_parent(Path::new("/tmp/x/out")).unwrap(),
            (PathBuf::from("/tmp/x"), "out".to_owned())
        );
        assert!(host_parent(Path::new("/")).is_err());
        assert!(host_parent(Path::new("a/..")).is_err());
    }
}
