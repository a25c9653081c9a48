//! A deterministic writer (and a bounded reader) for the newc cpio format, the
//! format the Linux kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Determinism is the point: entries are sorted by path, every mtime is 0,
//! every owner is root, and inode numbers are assigned in path order, so the
//! same tree always gives the same bytes.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The magic at the start of every newc header (no checksum variant).
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Header length: the magic plus thirteen 8-digit hex fields.
const HEADER_LEN: usize = 110;
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";
/// `S_IFMT` and the file types from `<sys/stat.h>`.
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
/// The permission bits a mode may carry (rwx for all, setuid/setgid/sticky).
const PERM_MASK: u32 = 0o7777;
/// The first inode number handed out; 0 is avoided because some tools treat
/// it as "no inode".
const FIRST_INODE: u32 = 1;

/// Errors while building or reading an archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// A path that is empty, absolute after normalisation, or has `.`/`..`.
    #[error("invalid archive path {0:?}: must be relative, non-empty, without '.' or '..' parts")]
    InvalidPath(String),
    /// Two different entries for one path.
    #[error("archive path {0:?} added twice with different contents")]
    Duplicate(String),
    /// A path whose parent was added as something other than a directory.
    #[error("archive path {path:?}: parent {parent:?} is not a directory")]
    ParentNotDir { path: String, parent: String },
    /// A field does not fit the 32-bit newc header.
    #[error("archive entry {path:?}: {what} {value} does not fit a newc header")]
    TooLarge {
        path: String,
        what: &'static str,
        value: usize,
    },
    /// The archive ends in the middle of an entry.
    #[error("cpio archive truncated at offset {0}")]
    Truncated(usize),
    /// A header that does not start with the newc magic.
    #[error("bad cpio magic at offset {0}")]
    BadMagic(usize),
    /// A header field that is not 8 hex digits.
    #[error("bad cpio header field at offset {0}")]
    BadField(usize),
    /// A name that is not NUL-terminated UTF-8.
    #[error("bad cpio entry name at offset {0}")]
    BadName(usize),
    /// No `TRAILER!!!` entry before the data ran out.
    #[error("cpio archive has no trailer")]
    NoTrailer,
}

/// Why a directory tree could not become an archive.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Reading the tree failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A device node, socket or FIFO: an initramfs tree is files, directories and links.
    #[error("{}: not a file, directory or symbolic link", path.display())]
    Unsupported {
        /// The entry.
        path: PathBuf,
    },
    /// A name (or link target) that is not UTF-8.
    #[error("{}: name or link target is not UTF-8", path.display())]
    NotUtf8 {
        /// The entry.
        path: PathBuf,
    },
    /// The archive refused the entry.
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String),
    /// A character device node.
    CharDev { major: u32, minor: u32 },
}

/// One entry of an archive, as written or as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path inside the archive, relative, without a leading `/`.
    pub path: String,
    /// Permission bits (`0o755`), without the file type.
    pub perm: u32,
    /// What the entry is.
    pub kind: EntryKind,
}

impl Entry {
    fn type_bits(&self) -> u32 {
        match self.kind {
            EntryKind::Dir => S_IFDIR,
            EntryKind::File(_) => S_IFREG,
            EntryKind::Symlink(_) => S_IFLNK,
            EntryKind::CharDev { .. } => S_IFCHR,
        }
    }
}

/// A file tree to be written as one newc archive; sorted by construction.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Checks and normalises an archive path: `/bin/sh` and `bin/sh` are the same.
fn normalise(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'));
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(CpioError::InvalidPath(path.to_owned()))
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its missing parents, mode 0755).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.insert(path, perm, EntryKind::Dir)
    }

    /// Adds a regular file (and its missing parents).
    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), CpioError> {
        self.insert(path, perm, EntryKind::File(data))
    }

    /// Adds a symbolic link (and its missing parents).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(path, 0o777, EntryKind::Symlink(target.to_owned()))
    }

    /// Adds a character device node (and its missing parents).
    pub fn add_char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(path, perm, EntryKind::CharDev { major, minor })
    }

    /// Adds everything under `dir` (files, directories, symbolic links), named
    /// relative to it, with their permission bits; owners and times are the
    /// archive's (root, 0), as for every entry.
    pub fn add_tree(&mut self, dir: &Path) -> Result<(), TreeError> {
        self.add_tree_under(dir, dir)
    }

    fn add_tree_under(&mut self, root: &Path, dir: &Path) -> Result<(), TreeError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TreeError::Io { path, source }
        };
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let not_utf8 = || TreeError::NotUtf8 { path: path.clone() };
            let name = path
                .strip_prefix(root)
                .ok()
                .and_then(Path::to_str)
                .ok_or_else(not_utf8)?;
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            let perm = meta.permissions().mode();
            let kind = meta.file_type();
            if kind.is_dir() {
                self.add_dir(name, perm)?;
                self.add_tree_under(root, &path)?;
            } else if kind.is_file() {
                let data = std::fs::read(&path).map_err(io(&path))?;
                self.add_file(name, perm, data)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io(&path))?;
                self.add_symlink(name, target.to_str().ok_or_else(not_utf8)?)?;
            } else {
                return Err(TreeError::Unsupported { path });
            }
        }
        Ok(())
    }

    /// The entries in archive order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    fn insert(&mut self, path: &str, perm: u32, kind: EntryKind) -> Result<(), CpioError> {
        let path = normalise(path)?;
        // Parents first, so the kernel creates directories before their contents.
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        let (_, dirs) = parts
            .split_last()
            .ok_or(CpioError::InvalidPath(path.clone()))?;
        for part in dirs {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                }) => {}
                Some(_) => {
                    return Err(CpioError::ParentNotDir {
                        path,
                        parent: parent.clone(),
                    })
                }
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            path: parent.clone(),
                            perm: 0o755,
                            kind: EntryKind::Dir,
                        },
                    );
                }
            }
        }
        let entry = Entry {
            path: path.clone(),
            perm: perm & PERM_MASK,
            kind,
        };
        match self.entries.get(&path) {
            // Re-adding a directory (e.g. an explicit mode after an implicit
            // parent) takes the explicit mode; anything else must be identical.
            Some(existing) if existing.kind == EntryKind::Dir && entry.kind == EntryKind::Dir => {
                self.entries.insert(path, entry);
                Ok(())
            }
            Some(existing) if *existing == entry => Ok(()),
            Some(_) => Err(CpioError::Duplicate(path)),
            None => {
                self.entries.insert(path, entry);
                Ok(())
            }
        }
    }

    /// Writes the archive: sorted entries, mtime 0, uid/gid 0, inode numbers
    /// in path order, then the trailer.
    pub fn to_newc(&self) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        let mut ino = FIRST_INODE;
        for entry in self.entries.values() {
            let data: &[u8] = match &entry.kind {
                EntryKind::File(data) => data,
                EntryKind::Symlink(target) => target.as_bytes(),
                EntryKind::Dir | EntryKind::CharDev { .. } => &[],
            };
            let (rmajor, rminor) = match entry.kind {
                EntryKind::CharDev { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if entry.kind == EntryKind::Dir { 2 } else { 1 };
            let header = Header {
                ino,
                mode: entry.type_bits() | entry.perm,
                nlink,
                filesize: fit(&entry.path, "file size", data.len())?,
                rdevmajor: rmajor,
                rdevminor: rminor,
            };
            write_entry(&mut out, &entry.path, &header, data)?;
            ino = ino.checked_add(1).ok_or(CpioError::TooLarge {
                path: entry.path.clone(),
                what: "inode count",
                value: self.entries.len(),
            })?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        write_entry(&mut out, TRAILER, &trailer, &[])?;
        Ok(out)
    }
}

/// The header fields that vary between our entries; the rest are fixed at 0.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

fn fit(path: &str, what: &'static str, value: usize) -> Result<u32, CpioError> {
    u32::try_from(value).map_err(|_| CpioError::TooLarge {
        path: path.to_owned(),
        what,
        value,
    })
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, name: &str, h: &Header, data: &[u8]) -> Result<(), CpioError> {
    let namesize = fit(name, "name length", name.len().saturating_add(1))?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        h.ino,
        h.mode,
        0,
        0,
        h.nlink,
        0,
        h.filesize,
        0,
        0,
        h.rdevmajor,
        h.rdevminor,
        namesize,
        0,
    ];
    out.extend_from_slice(NEWC_MAGIC);
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
    Ok(())
}

/// Reads one 8-hex-digit header field at `offset`.
fn field(bytes: &[u8], offset: usize) -> Result<u32, CpioError> {
    let end = offset.checked_add(8).ok_or(CpioError::Truncated(offset))?;
    let raw = bytes.get(offset..end).ok_or(CpioError::Truncated(offset))?;
    let text = std::str::from_utf8(raw).map_err(|_| CpioError::BadField(offset))?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CpioError::BadField(offset));
    }
    u32::from_str_radix(text, 16).map_err(|_| CpioError::BadField(offset))
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

/// Parses a newc archive up to its trailer. Every length is checked against
/// the bytes that are really there, so hostile input gives an error, never a
/// panic or an allocation larger than the input.
pub fn parse_newc(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        if pos >= bytes.len() {
            return Err(CpioError::NoTrailer);
        }
        let magic_end = pos.checked_add(6).ok_or(CpioError::Truncated(pos))?;
        let magic = bytes.get(pos..magic_end).ok_or(CpioError::Truncated(pos))?;
        if magic != NEWC_MAGIC {
            return Err(CpioError::BadMagic(pos));
        }
        let f = |i: usize| {
            field(
                bytes,
                pos.saturating_add(6).saturating_add(i.saturating_mul(8)),
            )
        };
        let mode = f(1)?;
        let filesize = usize::try_from(f(6)?).map_err(|_| CpioError::BadField(pos))?;
        let rdevmajor = f(9)?;
        let rdevminor = f(10)?;
        let namesize = usize::try_from(f(11)?).map_err(|_| CpioError::BadField(pos))?;
        let name_start = pos
            .checked_add(HEADER_LEN)
            .ok_or(CpioError::Truncated(pos))?;
        let name_end = name_start
            .checked_add(namesize)
            .ok_or(CpioError::Truncated(pos))?;
        let raw_name = bytes
            .get(name_start..name_end)
            .ok_or(CpioError::Truncated(name_start))?;
        let (nul, name) = raw_name
            .split_last()
            .ok_or(CpioError::BadName(name_start))?;
        if *nul != 0 {
            return Err(CpioError::BadName(name_start));
        }
        let name = std::str::from_utf8(name).map_err(|_| CpioError::BadName(name_start))?;
        let data_start = align4(name_end).ok_or(CpioError::Truncated(name_end))?;
        let data_end = data_start
            .checked_add(filesize)
            .ok_or(CpioError::Truncated(data_start))?;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(CpioError::Truncated(data_start))?;
        if name == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => EntryKind::File(data.to_vec()),
            S_IFLNK => EntryKind::Symlink(
                std::str::from_utf8(data)
                    .map_err(|_| CpioError::BadName(data_start))?
                    .to_owned(),
            ),
            S_IFCHR => EntryKind::CharDev {
                major: rdevmajor,
                minor: rdevminor,
            },
            _ => return Err(CpioError::BadField(pos.saturating_add(14))),
        };
        entries.push(Entry {
            path: name.to_owned(),
            perm: mode & PERM_MASK,
            kind,
        });
        pos = align4(data_end).ok_or(CpioError::Truncated(data_end))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add_file("/init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        a.add_char_dev("/dev/console", 0o600, 5, 1).unwrap();
        a.add_symlink("/bin/sh", "/bin/busybox").unwrap();
        a.add_file("/bin/busybox", 0o755, vec![0x7f, b'E', b'L', b'F', 1])
            .unwrap();
        a.add_dir("/tmp", 0o1777).unwrap();
        a
    }

    #[test]
    fn round_trips_through_the_parser() {
        let bytes = sample().to_newc().unwrap();
        let entries = parse_newc(&bytes).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "tmp"
            ]
        );
        let console = entries.iter().find(|e| e.path == "dev/console").unwrap();
        assert_eq!(console.kind, EntryKind::CharDev { major: 5, minor: 1 });
        let tmp = entries.iter().find(|e| e.path == "tmp").unwrap();
        assert_eq!(tmp.perm, 0o1777);
        let sh = entries.iter().find(|e| e.path == "bin/sh").unwrap();
        assert_eq!(sh.kind, EntryKind::Symlink("/bin/busybox".into()));
    }

    #[test]
    fn a_tree_is_read_with_modes_and_links() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir(d.join("tmp")).unwrap();
        std::fs::set_permissions(d.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(d.join("bin/busybox"), [0x7f, b'E', b'L', b'F', 1]).unwrap();
        std::fs::set_permissions(
            d.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("/bin/busybox", d.join("bin/sh")).unwrap();
        std::fs::write(d.join("init"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(d.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut a = Archive::new();
        a.add_tree(d).unwrap();
        a.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        assert_eq!(a.to_newc().unwrap(), sample().to_newc().unwrap());
    }

    #[test]
    fn insertion_order_does_not_change_the_bytes() {
        let mut b = Archive::new();
        b.add_dir("/tmp", 0o1777).unwrap();
        b.add_file("/bin/busybox", 0o755, vec![0x7f, b'E', b'L', b'F', 1])
            .unwrap();
        b.add_symlink("/bin/sh", "/bin/busybox").unwrap();
        b.add_char_dev("/dev/console", 0o600, 5, 1).unwrap();
        b.add_file("/init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        assert_eq!(sample().to_newc().unwrap(), b.to_newc().unwrap());
    }

    #[test]
    fn header_fields_are_fixed() {
        let bytes = sample().to_newc().unwrap();
        // First entry "bin": ino 1, uid 0, gid 0, mtime 0.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[14..22], b"000041ED");
        assert_eq!(&bytes[22..30], b"00000000");
        assert_eq!(&bytes[30..38], b"00000000");
        assert_eq!(&bytes[46..54], b"00000000");
        assert_eq!(bytes.len() % 4, 0);
        // The same archive agrees with GNU cpio's reading of it, if present.
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut child) = out {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            let listing = child.wait_with_output().unwrap();
            let text = String::from_utf8(listing.stdout).unwrap();
            assert_eq!(
                text.lines().collect::<Vec<_>>(),
                [
                    "bin",
                    "bin/busybox",
                    "bin/sh",
                    "dev",
                    "dev/console",
                    "init",
                    "tmp"
                ]
            );
        }
    }

    /// Every header, not only the first: nothing from the build machine or
    /// the build time. uid, gid, mtime, devmajor, devminor and check are 0,
    /// inode numbers count up from 1 in path order (the trailer's is 0).
    #[test]
    fn no_header_carries_time_owner_or_device() {
        let bytes = sample().to_newc().unwrap();
        let mut pos = 0;
        let mut inodes = Vec::new();
        loop {
            assert_eq!(&bytes[pos..pos + 6], NEWC_MAGIC);
            let f = |i: usize| field(&bytes, pos + 6 + i * 8).unwrap();
            // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
            for (i, what) in [
                (2, "uid"),
                (3, "gid"),
                (5, "mtime"),
                (7, "devmajor"),
                (8, "devminor"),
                (12, "check"),
            ] {
                assert_eq!(f(i), 0, "{what} at offset {pos}");
            }
            let namesize = f(11) as usize;
            let name = &bytes[pos + HEADER_LEN..pos + HEADER_LEN + namesize - 1];
            if name == TRAILER.as_bytes() {
                assert_eq!(f(0), 0);
                break;
            }
            inodes.push(f(0));
            let data = align4(pos + HEADER_LEN + namesize).unwrap();
            pos = align4(data + f(6) as usize).unwrap();
        }
        let expected: Vec<u32> = (1..=u32::try_from(inodes.len()).unwrap()).collect();
        assert_eq!(inodes, expected);
    }

    #[test]
    fn refuses_bad_paths_and_conflicts() {
        let mut a = Archive::new();
        assert!(matches!(
            a.add_dir("../x", 0o755),
            Err(CpioError::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_dir("/", 0o755),
            Err(CpioError::InvalidPath(_))
        ));
        a.add_file("/etc", 0o644, vec![]).unwrap();
        assert!(matches!(
            a.add_file("/etc/passwd", 0o644, vec![]),
            Err(CpioError::ParentNotDir { .. })
        ));
        assert!(matches!(
            a.add_file("/etc", 0o644, vec![1]),
            Err(CpioError::Duplicate(_))
        ));
    }

    #[test]
    fn parser_rejects_hostile_input() {
        let bytes = sample().to_newc().unwrap();
        // Every truncation is an error, never a panic.
        for cut in 0..bytes.len() - 1 {
            assert!(parse_newc(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert_eq!(parse_newc(&bad), Err(CpioError::BadMagic(0)));
        // A file size far past the end is "truncated", not an allocation.
        let mut huge = bytes.clone();
        huge[54..62].copy_from_slice(b"FFFFFFFF");
        assert!(matches!(parse_newc(&huge), Err(CpioError::Truncated(_))));
        let mut nonhex = bytes;
        nonhex[15] = b'z';
        assert!(matches!(parse_newc(&nonhex), Err(CpioError::BadField(_))));
    }
}
