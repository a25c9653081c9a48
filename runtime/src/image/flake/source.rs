//! A flake's directory, read for its digest and copied onto the inputs disk:
//! directories, regular files (with their executable bit) and symlinks (copied as
//! symlinks, never followed), in name order; `.git` directories and top-level
//! `result*` symlinks (`nix build`'s own) left out; anything else (a device, a FIFO,
//! a socket) refused, and the whole bounded.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The most bytes of regular files a flake's directory may hold.
pub const MAX_BYTES: u64 = 256 << 20;
/// The most entries.
pub const MAX_ENTRIES: u64 = 50_000;
/// The deepest nesting.
const MAX_DEPTH: usize = 64;

/// Why a flake's directory could not be read or copied.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something the copy does not take.
    #[error("{path}: {reason}")]
    Refused {
        /// Where.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `sha256:<hex>` over the directory's entries as [`copy`] would copy them.
pub fn digest(dir: &Path) -> Result<String, SourceError> {
    walk(dir, None)
}

/// Copies the directory to `dest` (made here); returns the digest of what was
/// copied.
pub fn copy(dir: &Path, dest: &Path) -> Result<String, SourceError> {
    walk(dir, Some(dest))
}

struct Walk {
    hash: Sha256,
    bytes: u64,
    entries: u64,
}

fn walk(dir: &Path, dest: Option<&Path>) -> Result<String, SourceError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(SourceError::Refused {
            path: dir.to_owned(),
            reason: "not a directory".into(),
        });
    }
    if let Some(dest) = dest {
        std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    }
    let mut state = Walk {
        hash: Sha256::new(),
        bytes: 0,
        entries: 0,
    };
    walk_dir(dir, dest, "", 0, &mut state)?;
    Ok(format!("sha256:{}", hex::encode(state.hash.finalize())))
}

fn walk_dir(
    dir: &Path,
    dest: Option<&Path>,
    rel: &str,
    depth: usize,
    state: &mut Walk,
) -> Result<(), SourceError> {
    if depth > MAX_DEPTH {
        return Err(SourceError::Refused {
            path: dir.to_owned(),
            reason: format!("nested more than {MAX_DEPTH} deep"),
        });
    }
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let Some(text) = name.to_str() else {
            return Err(SourceError::Refused {
                path,
                reason: "a name that is not UTF-8".into(),
            });
        };
        let rel_path = if rel.is_empty() {
            text.to_owned()
        } else {
            format!("{rel}/{text}")
        };
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let kind = meta.file_type();
        if kind.is_dir() && text == ".git" {
            continue;
        }
        if kind.is_symlink() && depth == 0 && text.starts_with("result") {
            continue;
        }
        state.entries += 1;
        if state.entries > MAX_ENTRIES {
            return Err(SourceError::Refused {
                path,
                reason: format!("more than {MAX_ENTRIES} entries"),
            });
        }
        let target = dest.map(|d| d.join(&name));
        if kind.is_dir() {
            state.hash.update(format!("d {rel_path}\0").as_bytes());
            if let Some(t) = &target {
                std::fs::create_dir(t).map_err(io_err(t))?;
            }
            walk_dir(&path, target.as_deref(), &rel_path, depth + 1, state)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&path).map_err(io_err(&path))?;
            let link_text = link.to_string_lossy();
            state
                .hash
                .update(format!("l {rel_path}\0{link_text}\0").as_bytes());
            if let Some(t) = &target {
                std::os::unix::fs::symlink(&link, t).map_err(io_err(t))?;
            }
        } else if kind.is_file() {
            state.bytes = state.bytes.saturating_add(meta.len());
            if state.bytes > MAX_BYTES {
                return Err(SourceError::Refused {
                    path,
                    reason: format!("the flake's files add up to more than {MAX_BYTES} bytes"),
                });
            }
            let exec = meta.mode() & 0o111 != 0;
            state
                .hash
                .update(format!("f {rel_path}\0{}\0{}\0", u8::from(exec), meta.len()).as_bytes());
            let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
            let mut out = match &target {
                Some(t) => Some(std::fs::File::create(t).map_err(io_err(t))?),
                None => None,
            };
            let mut buf = vec![0u8; 1 << 16];
            let mut left = meta.len();
            while left > 0 {
                let n = file.read(&mut buf).map_err(io_err(&path))?;
                if n == 0 {
                    return Err(SourceError::Refused {
                        path,
                        reason: "the file shrank while it was read".into(),
                    });
                }
                let chunk = buf.get(..n).unwrap_or_default();
                state.hash.update(chunk);
                if let (Some(out), Some(t)) = (&mut out, &target) {
                    std::io::Write::write_all(out, chunk).map_err(io_err(t))?;
                }
                left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
            }
            if let Some(t) = &target {
                let mode = if exec { 0o755 } else { 0o644 };
                std::fs::set_permissions(t, std::fs::Permissions::from_mode(mode))
                    .map_err(io_err(t))?;
            }
        } else {
            return Err(SourceError::Refused {
                path,
                reason: "not a directory, regular file or symlink".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_has_the_digest_of_the_source_and_leaves_out_git_and_results() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("flake");
        std::fs::create_dir_all(src.join("busybox")).unwrap();
        std::fs::create_dir_all(src.join(".git/objects")).unwrap();
        std::fs::write(src.join("flake.nix"), "{ }").unwrap();
        std::fs::write(src.join("busybox/busybox"), b"\x7fELF").unwrap();
        std::fs::set_permissions(
            src.join("busybox/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/nix/store/x-result", src.join("result")).unwrap();
        std::os::unix::fs::symlink("flake.nix", src.join("alias")).unwrap();
        let before = digest(&src).unwrap();
        let copied = copy(&src, &tmp.path().join("copy")).unwrap();
        assert_eq!(before, copied);
        let dest = tmp.path().join("copy");
        assert!(!dest.join(".git").exists());
        assert!(std::fs::symlink_metadata(dest.join("result")).is_err());
        assert_eq!(
            std::fs::read_link(dest.join("alias")).unwrap(),
            PathBuf::from("flake.nix")
        );
        let mode = std::fs::metadata(dest.join("busybox/busybox"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // Any change changes the digest: content, the executable bit, a link target.
        std::fs::write(src.join("flake.nix"), "{ } ").unwrap();
        let changed = digest(&src).unwrap();
        assert_ne!(changed, before);
        std::fs::set_permissions(
            src.join("flake.nix"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_ne!(digest(&src).unwrap(), changed);
    }

    #[test]
    fn special_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = digest(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("not a directory, regular file or symlink"),
            "{err}"
        );
    }
}
