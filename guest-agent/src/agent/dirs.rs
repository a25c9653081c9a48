//! Directories for the host's recursive copies: make one, list one.
//!
//! Listing reports each entry as it is (`lstat`: a symbolic link is a link, never
//! what it points to), so the host decides what to follow, which is nothing.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, DirBuilderExt, MetadataExt, PermissionsExt};

use super::files::io_reply;
use super::reply::reply;
use crate::protocol::{
    DirEntry, EntryKind, ErrorCode, ErrorReply, ListDirRequest, MakeDirRequest, MAX_DIR_ENTRIES,
};

/// Entries per dir-entries frame: at most 64 × ~1.6 KiB of JSON (a 255-byte
/// name of control characters, escaped), well under a frame.
pub(super) const ENTRIES_PER_FRAME: usize = 64;

/// Makes the directory `request` names; one already there is fine.
pub(super) fn make_dir(request: &MakeDirRequest) -> Result<(), ErrorReply> {
    let path = &request.path;
    match DirBuilder::new().mode(request.mode).create(path) {
        Ok(()) => {
            // The mode regardless of the umask, then the owner.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(request.mode))
                .map_err(|e| io_reply("cannot set mode of", path, &e))?;
            if request.uid.is_some() || request.gid.is_some() {
                chown(path, request.uid, request.gid)
                    .map_err(|e| io_reply("cannot change owner of", path, &e))?;
            }
            tracing::info!("made directory {path:?}");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
            if is_dir {
                Ok(())
            } else {
                Err(reply(
                    ErrorCode::BadRequest,
                    format!("{path:?} exists and is not a directory"),
                ))
            }
        }
        Err(e) => Err(io_reply("cannot make directory", path, &e)),
    }
}

/// Lists the directory `request` names (not through a symbolic link at its end).
pub(super) fn list_dir(request: &ListDirRequest) -> Result<Vec<DirEntry>, ErrorReply> {
    let path = &request.path;
    let is_dir = std::fs::symlink_metadata(path)
        .map_err(|e| io_reply("cannot list", path, &e))?
        .is_dir();
    if !is_dir {
        return Err(reply(
            ErrorCode::BadRequest,
            format!("{path:?} is not a directory"),
        ));
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_reply("cannot list", path, &e))? {
        let entry = entry.map_err(|e| io_reply("cannot list", path, &e))?;
        if entries.len() >= MAX_DIR_ENTRIES {
            return Err(reply(
                ErrorCode::Limit,
                format!("{path:?} has more than {MAX_DIR_ENTRIES} entries"),
            ));
        }
        let raw = entry.file_name();
        let utf8 = std::str::from_utf8(raw.as_bytes()).ok();
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Gone since readdir: not an entry any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_reply("cannot look at an entry of", path, &e)),
        };
        let kind = match (utf8, meta.file_type()) {
            (None, _) => EntryKind::Other,
            (_, t) if t.is_file() => EntryKind::File,
            (_, t) if t.is_dir() => EntryKind::Dir,
            (_, t) if t.is_symlink() => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        entries.push(DirEntry {
            name: raw.to_string_lossy().into_owned(),
            kind,
            size: meta.size(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(path: &std::path::Path) -> Vec<DirEntry> {
        let mut entries = list_dir(&ListDirRequest {
            path: path.to_str().unwrap().to_owned(),
        })
        .unwrap();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    #[test]
    fn listing_says_what_each_entry_is_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"12345").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let kinds: Vec<(String, EntryKind, u64)> = list(dir.path())
            .into_iter()
            .map(|e| {
                (
                    e.name,
                    e.kind,
                    if e.kind == EntryKind::File { e.size } else { 0 },
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("fifo".into(), EntryKind::Other, 0),
                ("file".into(), EntryKind::File, 5),
                ("link".into(), EntryKind::Symlink, 0),
                ("sub".into(), EntryKind::Dir, 0),
            ]
        );
        // A link to a directory is not listed through.
        let err = list_dir(&ListDirRequest {
            path: dir.path().join("link").to_str().unwrap().to_owned(),
        })
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn making_a_directory_is_idempotent_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d").to_str().unwrap().to_owned();
        let request = MakeDirRequest {
            path: path.clone(),
            mode: 0o700,
            uid: None,
            gid: None,
        };
        make_dir(&request).unwrap();
        make_dir(&request).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let file = MakeDirRequest {
            path: dir.path().join("f").to_str().unwrap().to_owned(),
            ..request.clone()
        };
        assert_eq!(make_dir(&file).unwrap_err().code, ErrorCode::BadRequest);
        std::os::unix::fs::symlink(dir.path(), dir.path().join("l")).unwrap();
        let link = MakeDirRequest {
            path: dir.path().join("l").to_str().unwrap().to_owned(),
            ..request
        };
        assert_eq!(make_dir(&link).unwrap_err().code, ErrorCode::BadRequest);
    }
}
