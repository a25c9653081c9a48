//! Debian packages (`.deb`) read into one normalized image tree.
//!
//! An image's starting tree is built from `.deb` files fetched by digest. The
//! host executes nothing from a package and writes none of its paths onto its
//! own file system: [`open_deb`] parses the ar container and the control
//! tarball in memory, and [`TreeWriter`] streams each data tarball through
//! validation into a single merged tar stream that is extracted later, inside
//! a VM.
//!
//! Threat model: every byte of a package is hostile. Parsing never panics and
//! never trusts a size it has not bounded ([`Limits`]: per entry, in total, in
//! entry count, for control members and for decompressor memory). Entries
//! that could escape or confuse the tree (`..`, absolute paths, links that
//! climb out of the root, writes through symlinks, device nodes, FIFOs,
//! sparse files, duplicates) are refused with an error naming the package,
//! the entry and the rule.

mod ar;
mod control;
pub(in crate::image) mod tarball;
pub(in crate::image) mod tree;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use control::parse_control;
pub use tree::{AddStats, TreeOptions, TreeStats, TreeWriter};

/// The longest path or link target accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// Bounds on the work and memory spent on one tree (data) or one control
/// tarball (control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single data entry, checked from its header before any of its
    /// data is read.
    pub max_entry_bytes: u64,
    /// Largest sum of entry sizes over all packages added to one tree.
    pub max_total_bytes: u64,
    /// Most tar headers read (extension headers included), over all packages
    /// of one tree, and in one control tarball.
    pub max_entries: u64,
    /// Largest sum of member sizes in one control tarball.
    pub max_control_bytes: u64,
    /// Most memory an xz or zstd decoder may allocate (dictionary / window).
    pub max_decoder_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entry_bytes: 1 << 30,
            max_total_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_control_bytes: 16 << 20,
            max_decoder_memory: 256 << 20,
        }
    }
}

/// How a `control.tar*` or `data.tar*` member is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `.tar`
    None,
    /// `.tar.gz`
    Gzip,
    /// `.tar.xz`
    Xz,
    /// `.tar.zst`
    Zstd,
}

impl Compression {
    /// The compression of member `name` if it is `{base}.tar` plus a known
    /// suffix; `None` for any other name.
    fn of_member(name: &str, base: &str) -> Option<Self> {
        match name.strip_prefix(base)? {
            ".tar" => Some(Self::None),
            ".tar.gz" => Some(Self::Gzip),
            ".tar.xz" => Some(Self::Xz),
            ".tar.zst" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Why one tar entry (of a data or control tarball) was refused.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    /// The path breaks a path rule (absolute, `..`, empty component, NUL, ...).
    #[error("bad path: {0}")]
    BadPath(&'static str),
    /// Not a directory, regular file, symlink or hard link.
    #[error("unsupported entry type: {0}")]
    UnsupportedType(String),
    /// The header claims more than the per-entry limit.
    #[error("entry of {size} bytes exceeds the per-entry limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// The entries so far add up to more than the total limit.
    #[error("total size exceeds the limit of {limit} bytes")]
    TotalBytes { limit: u64 },
    /// More headers than the entry limit.
    #[error("more than {limit} entries")]
    TooManyEntries { limit: u64 },
    /// A symlink or hard-link target that is empty, too long or has a NUL.
    #[error("bad link target: {0}")]
    BadLinkTarget(&'static str),
    /// A relative symlink target that climbs above the image root.
    #[error("link escapes the tree: target {target:?}")]
    LinkEscapes { target: String },
    /// A hard link whose target is not a regular file already in the tree.
    #[error("hard link target {target:?} is not a regular file already in the tree")]
    HardLinkTarget { target: String },
    /// An ancestor of the path is a symlink.
    #[error("writes through symlink {symlink}")]
    ThroughSymlink { symlink: String },
    /// An ancestor of the path is a regular file.
    #[error("parent {parent} is not a directory")]
    BelowNonDirectory { parent: String },
    /// The path is already in the tree (and is not a directory written again
    /// as a directory).
    #[error("already written as {existing} by package {first_package}")]
    Duplicate {
        existing: &'static str,
        first_package: String,
    },
    /// A header field that cannot be decoded.
    #[error("bad header: {0}")]
    Header(String),
    /// A GNU long-name or PAX extension header that is malformed or too big.
    #[error("bad extension header: {0}")]
    Extension(&'static str),
    /// The data stream ended or failed inside this entry's data.
    #[error("reading entry data: {0}")]
    Read(#[source] std::io::Error),
}

/// Errors reading a `.deb` or building a tree from it.
///
/// Errors of [`open_deb`] name the ar member (the caller knows the file);
/// errors of [`TreeWriter::add_deb`] name the package and the entry.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    /// The bytes do not start with the ar magic.
    #[error("not a Debian package: no ar magic \"!<arch>\\n\" at the start")]
    NotAr,
    /// An ar member header that is malformed.
    #[error("ar member header at byte {offset}: {reason}")]
    ArHeader { offset: usize, reason: &'static str },
    /// An ar member whose data runs past the end of the file.
    #[error("ar member {member:?} at byte {offset}: truncated ({size} bytes declared, {available} present)")]
    Truncated {
        member: String,
        offset: usize,
        size: u64,
        available: usize,
    },
    /// A member other than the one the format requires at this position.
    #[error("unexpected ar member {found:?} (expected {expected})")]
    UnexpectedMember {
        found: String,
        expected: &'static str,
    },
    /// A required member is absent.
    #[error("missing ar member {0}")]
    MissingMember(&'static str),
    /// `debian-binary` is not `2.x\n`.
    #[error("debian-binary: unsupported format version {found:?} (expected \"2.x\\n\")")]
    Version { found: String },
    /// `control.tar*` / `data.tar*` with a compression suffix not supported.
    #[error(
        "ar member {member:?}: unknown compression (supported: .tar, .tar.gz, .tar.xz, .tar.zst)"
    )]
    UnknownCompression { member: String },
    /// The control file or the control tarball's layout is unusable.
    #[error("{member}: {reason}")]
    Control { member: String, reason: String },
    /// The (decompressed) tar stream is corrupt: a bad checksum, bad
    /// compression, an early end.
    #[error("{context}: corrupt tar stream after {after}: {source}")]
    Stream {
        context: String,
        after: String,
        source: std::io::Error,
    },
    /// One entry was refused.
    #[error("{package}: {path}: {problem}")]
    Entry {
        package: String,
        path: String,
        problem: EntryProblem,
    },
    /// Writing the output tree failed.
    #[error("writing the image tree: {0}")]
    Write(#[source] std::io::Error),
}

/// The control part of a package.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlInfo {
    /// The fields of the `control` file (`Package`, `Version`, ...), names as
    /// written; continuation lines are kept, joined by `\n`.
    pub fields: BTreeMap<String, String>,
    /// The other control members (`conffiles`, `md5sums`, `postinst`, ...),
    /// by plain name.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl ControlInfo {
    /// The value of field `name`, matched case-insensitively as deb822 does.
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A parsed package: its control part, and its data tarball still compressed
/// (it is validated while [`TreeWriter::add_deb`] streams it).
#[derive(Clone)]
pub struct Deb<'a> {
    /// The parsed control tarball.
    pub control: ControlInfo,
    data_member: &'a str,
    data: &'a [u8],
    data_compression: Compression,
}

impl std::fmt::Debug for Deb<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deb")
            .field("control", &self.control.fields)
            .field("control_files", &self.control.files.keys())
            .field("data_member", &self.data_member)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

impl<'a> Deb<'a> {
    /// The ar name of the data member (`data.tar.xz`, ...).
    #[must_use]
    pub fn data_member(&self) -> &'a str {
        self.data_member
    }

    /// How the data member is compressed.
    #[must_use]
    pub fn data_compression(&self) -> Compression {
        self.data_compression
    }

    /// The `Package` field.
    #[must_use]
    pub fn package(&self) -> Option<&str> {
        self.control.field("Package")
    }
}

/// Parses a `.deb`: the ar container (`debian-binary`, `control.tar*`,
/// `data.tar*`, in this order; members named `_*` are skipped as dpkg does),
/// and the control tarball, in memory under `limits`. The data tarball is
/// only located here.
pub fn open_deb<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Deb<'a>, DebError> {
    let mut members = ar::ArReader::new(bytes)?;
    let version = members
        .next()
        .transpose()?
        .ok_or(DebError::MissingMember("debian-binary"))?;
    if version.name != "debian-binary" {
        return Err(DebError::UnexpectedMember {
            found: version.name.to_owned(),
            expected: "debian-binary",
        });
    }
    check_version(version.data)?;

    let control = next_required(&mut members, "control.tar")?;
    let control_compression = Compression::of_member(control.name, "control").ok_or_else(|| {
        unknown_or_unexpected(control.name, "control", "control.tar{,.gz,.xz,.zst}")
    })?;
    let data = next_required(&mut members, "data.tar")?;
    let data_compression = Compression::of_member(data.name, "data")
        .ok_or_else(|| unknown_or_unexpected(data.name, "data", "data.tar{,.gz,.xz,.zst}"))?;
    // After data.tar only ignorable members (`_*`) may follow; their bounds
    // are still checked.
    for member in members {
        let member = member?;
        if !member.name.starts_with('_') {
            return Err(DebError::UnexpectedMember {
                found: member.name.to_owned(),
                expected: "nothing after data.tar (or a member named _*)",
            });
        }
    }

    let control = control::read_control(control.name, control.data, control_compression, limits)?;
    Ok(Deb {
        control,
        data_member: data.name,
        data: data.data,
        data_compression,
    })
}

/// The next member that is not an ignorable `_*` member.
fn next_required<'a>(
    members: &mut ar::ArReader<'a>,
    expected: &'static str,
) -> Result<ar::Member<'a>, DebError> {
    for member in members {
        let member = member?;
        if !member.name.starts_with('_') {
            return Ok(member);
        }
    }
    Err(DebError::MissingMember(expected))
}

/// The error for a member that should be `{base}.tar*`: an unknown
/// compression if it is `{base}.tar.<something>`, else an unexpected member.
fn unknown_or_unexpected(name: &str, base: &str, expected: &'static str) -> DebError {
    let is_tar = name
        .strip_prefix(base)
        .is_some_and(|rest| rest.starts_with(".tar."));
    if is_tar {
        DebError::UnknownCompression {
            member: name.to_owned(),
        }
    } else {
        DebError::UnexpectedMember {
            found: name.to_owned(),
            expected,
        }
    }
}

/// Accepts `debian-binary` contents `2.<digits>\n`.
fn check_version(data: &[u8]) -> Result<(), DebError> {
    let minor = data
        .strip_prefix(b"2.")
        .and_then(|rest| rest.strip_suffix(b"\n"));
    match minor {
        Some(minor) if !minor.is_empty() && minor.iter().all(u8::is_ascii_digit) => Ok(()),
        _ => Err(DebError::Version {
            found: String::from_utf8_lossy(data.get(..16).unwrap_or(data)).into_owned(),
        }),
    }
}

/// A path or name from a package, for an error message: lossy UTF-8 with
/// control characters escaped, at most a few hundred characters.
pub(in crate::image) fn display_bytes(bytes: &[u8]) -> String {
    const SHOWN: usize = 256;
    let shown = bytes.get(..SHOWN).unwrap_or(bytes);
    let mut text = String::new();
    for c in String::from_utf8_lossy(shown).chars() {
        if c.is_control() {
            text.extend(c.escape_default());
        } else {
            text.push(c);
        }
    }
    if shown.len() < bytes.len() {
        text.push_str("...");
    }
    text
}
