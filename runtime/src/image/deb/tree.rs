//! The merged image tree: data tarballs validated entry by entry and written
//! as one normalized tar stream.
//!
//! The writer remembers every path it wrote (directory, file or symlink, and
//! which package wrote it), so it can refuse writes through symlinks,
//! duplicates and hard links to anything but an earlier regular file.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use tar::{EntryType, Header};

use super::tarball::{self, Budget, Entry, Kind};
use super::{display_bytes, Deb, DebError, EntryProblem, Limits, MAX_PATH_BYTES};

/// The top-level directories that merged-usr turns into symlinks to `usr/`.
const MERGED_USR_ALIASES: [&str; 4] = ["bin", "sbin", "lib", "lib64"];
/// The owner named in errors for entries the writer made itself.
const WRITER_LABEL: &str = "(merged-usr layout)";
/// Mode of directories the writer makes (merged-usr, missing parents).
const DIR_MODE: u32 = 0o755;

/// How the tree is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeOptions {
    /// No mtime in the output is later than this.
    pub source_date_epoch: u64,
    /// Start with `bin`, `sbin`, `lib`, `lib64` as symlinks into `usr/`, and
    /// move package entries under them to `usr/`.
    pub merged_usr: bool,
    /// Bounds over all packages of the tree.
    pub limits: Limits,
}

/// What one [`TreeWriter::add_deb`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddStats {
    /// Entries written (missing parent directories included).
    pub entries: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
    /// Entries skipped: the archive root, directories already in the tree,
    /// merged-usr symlinks the tree already has.
    pub skipped: u64,
}

/// What a whole tree holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Packages added.
    pub packages: u64,
    /// Entries written, the writer's own included.
    pub entries: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
}

/// What a path in the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Dir,
    File,
    Symlink,
}

impl NodeKind {
    /// "a directory", ..., for messages.
    fn article_name(self) -> &'static str {
        match self {
            Self::Dir => "a directory",
            Self::File => "a regular file",
            Self::Symlink => "a symlink",
        }
    }
}

/// One path in the tree and the package (index) that wrote it.
#[derive(Debug, Clone, Copy)]
struct Node {
    kind: NodeKind,
    package: usize,
}

/// The paths written so far (normalized: relative, no `./`, no trailing `/`).
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<Vec<u8>, Node>,
    packages: Vec<String>,
}

impl Tree {
    /// The name of package number `index`.
    fn package(&self, index: usize) -> String {
        self.packages
            .get(index)
            .cloned()
            .unwrap_or_else(|| WRITER_LABEL.to_owned())
    }

    /// Checks the ancestors of `path`: each must be a directory or absent.
    /// Returns the absent ones, outermost first.
    fn missing_parents(&self, path: &[u8]) -> Result<Vec<Vec<u8>>, EntryProblem> {
        let mut missing = Vec::new();
        for (at, _) in path.iter().enumerate().filter(|(_, b)| **b == b'/') {
            let parent = path.get(..at).unwrap_or_default();
            match self.nodes.get(parent).map(|node| node.kind) {
                Some(NodeKind::Dir) => {}
                Some(NodeKind::Symlink) => {
                    return Err(EntryProblem::ThroughSymlink {
                        symlink: display_bytes(parent),
                    })
                }
                Some(NodeKind::File) => {
                    return Err(EntryProblem::BelowNonDirectory {
                        parent: display_bytes(parent),
                    })
                }
                None => missing.push(parent.to_vec()),
            }
        }
        Ok(missing)
    }

    /// Refuses `path` if it is already in the tree; `Ok(true)` if it is a
    /// directory and `kind` is a directory too (written again: skipped).
    fn check_new(&self, path: &[u8], kind: NodeKind) -> Result<bool, EntryProblem> {
        match self.nodes.get(path) {
            None => Ok(false),
            Some(node) if node.kind == NodeKind::Dir && kind == NodeKind::Dir => Ok(true),
            Some(node) => Err(EntryProblem::Duplicate {
                existing: node.kind.article_name(),
                first_package: self.package(node.package),
            }),
        }
    }
}

/// Writes one merged, normalized tar stream from many packages.
pub struct TreeWriter<W: Write> {
    builder: tar::Builder<W>,
    options: TreeOptions,
    tree: Tree,
    budget: Budget,
    stats: TreeStats,
}

impl<W: Write> std::fmt::Debug for TreeWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeWriter")
            .field("options", &self.options)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<W: Write> TreeWriter<W> {
    /// Starts a tree on `out`; with `merged_usr`, writes `usr/{bin,sbin,lib,
    /// lib64}/` and the `bin -> usr/bin`, ... symlinks first.
    pub fn new(out: W, options: TreeOptions) -> io::Result<Self> {
        let limits = options.limits;
        let mut writer = Self {
            builder: tar::Builder::new(out),
            options,
            tree: Tree::default(),
            budget: Budget::new(
                limits.max_entries,
                limits.max_total_bytes,
                limits.max_entry_bytes,
            ),
            stats: TreeStats::default(),
        };
        if options.merged_usr {
            writer.write_merged_usr()?;
        }
        Ok(writer)
    }

    /// The merged-usr directories and symlinks, owned by the writer.
    fn write_merged_usr(&mut self) -> io::Result<()> {
        let mut placer = Placer {
            builder: &mut self.builder,
            tree: &mut self.tree,
            options: &self.options,
            package: usize::MAX,
            name: WRITER_LABEL,
            added: AddStats::default(),
        };
        let dir = placer.default_dir_header();
        placer.write_dir(b"usr", &dir)?;
        for alias in MERGED_USR_ALIASES {
            placer.write_dir(format!("usr/{alias}").as_bytes(), &dir)?;
        }
        for alias in MERGED_USR_ALIASES {
            let mut header = dir.clone();
            header.set_mode(0o777);
            let target = format!("usr/{alias}");
            placer.write_link(
                alias.as_bytes(),
                EntryType::Symlink,
                target.as_bytes(),
                header,
            )?;
        }
        self.stats.entries += placer.added.entries;
        Ok(())
    }

    /// Streams the data tarball of `deb` (named `package` in errors and in the
    /// tree's ownership records) through validation into the tree.
    ///
    /// On error the output is unusable (an entry may be half written): the
    /// caller discards it.
    pub fn add_deb(&mut self, package: &str, deb: &Deb<'_>) -> Result<AddStats, DebError> {
        let reader = tarball::decoder(deb.data_compression, deb.data, &self.options.limits)
            .map_err(|source| DebError::Stream {
                context: format!("{package} ({})", deb.data_member),
                after: "the start".to_owned(),
                source,
            })?;
        let index = self.tree.packages.len();
        self.tree.packages.push(package.to_owned());
        let mut placer = Placer {
            builder: &mut self.builder,
            tree: &mut self.tree,
            options: &self.options,
            package: index,
            name: package,
            added: AddStats::default(),
        };
        tarball::walk(reader, &mut self.budget, package, |entry, data| {
            placer.place(entry, data)
        })?;
        let added = placer.added;
        self.stats.packages += 1;
        self.stats.entries += added.entries;
        self.stats.bytes += added.bytes;
        Ok(added)
    }

    /// Writes the tar end blocks; returns the output and the tree's totals.
    pub fn finish(self) -> Result<(W, TreeStats), DebError> {
        let stats = self.stats;
        let out = self.builder.into_inner().map_err(DebError::Write)?;
        Ok((out, stats))
    }
}

/// Validates and writes the entries of one package.
struct Placer<'w, W: Write> {
    builder: &'w mut tar::Builder<W>,
    tree: &'w mut Tree,
    options: &'w TreeOptions,
    package: usize,
    name: &'w str,
    added: AddStats,
}

impl<W: Write> Placer<'_, W> {
    /// Validates `entry` and writes it (with missing parents), reading its
    /// data from `data`.
    fn place(&mut self, entry: &Entry, data: &mut dyn Read) -> Result<(), DebError> {
        let name = self.name;
        let refuse = |problem| DebError::Entry {
            package: name.to_owned(),
            path: display_bytes(&entry.path),
            problem,
        };
        match self.plan(entry).map_err(refuse)? {
            Plan::Skip => {
                self.added.skipped += 1;
                Ok(())
            }
            Plan::Write {
                path,
                parents,
                link,
            } => {
                let header = self.header(entry);
                let dir = self.default_dir_header();
                for parent in &parents {
                    self.write_dir(parent, &dir).map_err(DebError::Write)?;
                }
                self.write(entry, &path, link.as_deref(), header, data)
                    .map_err(|error| match error {
                        WriteError::Input(error) => refuse(EntryProblem::Read(error)),
                        WriteError::Output(error) => DebError::Write(error),
                    })
            }
        }
    }

    /// Decides what to do with `entry`, checking every rule; writes nothing.
    fn plan(&self, entry: &Entry) -> Result<Plan, EntryProblem> {
        let Some((path, trailing_slash)) = normalize(&entry.path)? else {
            return if entry.kind == Kind::Dir {
                Ok(Plan::Skip)
            } else {
                Err(EntryProblem::BadPath("the archive root is not a directory"))
            };
        };
        if trailing_slash && entry.kind != Kind::Dir {
            return Err(EntryProblem::BadPath("trailing '/' on a non-directory"));
        }
        if self.is_merged_usr_alias(&path, entry) {
            return Ok(Plan::Skip);
        }
        let path = self.merge_usr(path);
        let node_kind = match entry.kind {
            Kind::Dir => NodeKind::Dir,
            Kind::File | Kind::HardLink => NodeKind::File,
            Kind::Symlink => NodeKind::Symlink,
        };
        let link = match entry.kind {
            Kind::Dir | Kind::File => None,
            Kind::Symlink => Some(check_symlink(&path, entry.link.as_deref())?),
            Kind::HardLink => Some(self.hard_link_target(entry.link.as_deref())?),
        };
        let parents = self.tree.missing_parents(&path)?;
        if self.tree.check_new(&path, node_kind)? {
            return Ok(Plan::Skip);
        }
        Ok(Plan::Write {
            path,
            parents,
            link,
        })
    }

    /// Whether `path` is a merged-usr alias (`bin`, ...) shipped by the
    /// package as the very symlink the writer already made.
    fn is_merged_usr_alias(&self, path: &[u8], entry: &Entry) -> bool {
        if !self.options.merged_usr || entry.kind != Kind::Symlink {
            return false;
        }
        let Some(alias) = MERGED_USR_ALIASES
            .iter()
            .find(|alias| alias.as_bytes() == path)
        else {
            return false;
        };
        let target = entry.link.as_deref().unwrap_or_default();
        let target = target.strip_prefix(b"/").unwrap_or(target);
        let target = target.strip_suffix(b"/").unwrap_or(target);
        target.strip_prefix(b"usr/") == Some(alias.as_bytes())
    }

    /// With merged-usr, `bin/...` (and the other aliases) moved to
    /// `usr/bin/...`; otherwise `path` unchanged.
    fn merge_usr(&self, path: Vec<u8>) -> Vec<u8> {
        if !self.options.merged_usr {
            return path;
        }
        let first = path.split(|b| *b == b'/').next().unwrap_or_default();
        if MERGED_USR_ALIASES
            .iter()
            .any(|alias| alias.as_bytes() == first)
        {
            let mut moved = b"usr/".to_vec();
            moved.extend_from_slice(&path);
            moved
        } else {
            path
        }
    }

    /// The normalized target of a hard link, which must be a regular file
    /// already in the tree.
    fn hard_link_target(&self, link: Option<&[u8]>) -> Result<Vec<u8>, EntryProblem> {
        let link = link.ok_or(EntryProblem::BadLinkTarget("empty"))?;
        let refuse = || EntryProblem::HardLinkTarget {
            target: display_bytes(link),
        };
        let (target, trailing_slash) = normalize(link).map_err(|_| refuse())?.ok_or_else(refuse)?;
        if trailing_slash {
            return Err(refuse());
        }
        let target = self.merge_usr(target);
        match self.tree.nodes.get(target.as_slice()) {
            Some(node) if node.kind == NodeKind::File => Ok(target),
            _ => Err(refuse()),
        }
    }

    /// The output header of `entry`: its type, permission bits, numeric
    /// owner, mtime clamped to the epoch; no user or group names.
    fn header(&self, entry: &Entry) -> Header {
        let (entry_type, size) = match entry.kind {
            Kind::Dir => (EntryType::Directory, 0),
            Kind::File => (EntryType::Regular, entry.size),
            Kind::Symlink => (EntryType::Symlink, 0),
            Kind::HardLink => (EntryType::Link, 0),
        };
        let mut header = Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(entry.mode & 0o7777);
        header.set_uid(entry.uid);
        header.set_gid(entry.gid);
        header.set_mtime(entry.mtime.min(self.options.source_date_epoch));
        header.set_size(size);
        header
    }

    /// The header of a directory the writer makes: 0755, root, the epoch.
    fn default_dir_header(&self) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Directory);
        header.set_mode(DIR_MODE);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.options.source_date_epoch);
        header.set_size(0);
        header
    }

    /// Writes `entry` at `path`, then records it.
    fn write(
        &mut self,
        entry: &Entry,
        path: &[u8],
        link: Option<&[u8]>,
        header: Header,
        data: &mut dyn Read,
    ) -> Result<(), WriteError> {
        match (entry.kind, link) {
            (Kind::Dir, _) => self.write_dir(path, &header).map_err(WriteError::Output),
            (Kind::File, _) => self.write_file(path, header, entry.size, data),
            (Kind::Symlink, Some(target)) => self
                .write_link(path, EntryType::Symlink, target, header)
                .map_err(WriteError::Output),
            (Kind::HardLink, Some(target)) => self
                .write_link(path, EntryType::Link, target, header)
                .map_err(WriteError::Output),
            (Kind::Symlink | Kind::HardLink, None) => Err(WriteError::Output(io::Error::new(
                io::ErrorKind::InvalidInput,
                "link without a target",
            ))),
        }
    }

    /// Writes a directory entry (`path/`) and records it.
    fn write_dir(&mut self, path: &[u8], header: &Header) -> io::Result<()> {
        let mut with_slash = path.to_vec();
        with_slash.push(b'/');
        append_entry(
            self.builder,
            header.clone(),
            &with_slash,
            None,
            &mut io::empty(),
        )?;
        self.record(path, NodeKind::Dir);
        Ok(())
    }

    /// Streams a regular file's `size` bytes from `data` and records it.
    fn write_file(
        &mut self,
        path: &[u8],
        header: Header,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), WriteError> {
        let mut reader = ExactReader {
            inner: data,
            remaining: size,
            failed: false,
        };
        let result = append_entry(self.builder, header, path, None, &mut reader);
        match result {
            Ok(()) => {
                self.record(path, NodeKind::File);
                self.added.bytes += size;
                Ok(())
            }
            Err(error) if reader.failed => Err(WriteError::Input(error)),
            Err(error) => Err(WriteError::Output(error)),
        }
    }

    /// Writes a symlink or hard link to `target` and records it.
    fn write_link(
        &mut self,
        path: &[u8],
        entry_type: EntryType,
        target: &[u8],
        mut header: Header,
    ) -> io::Result<()> {
        header.set_entry_type(entry_type);
        header.set_size(0);
        append_entry(self.builder, header, path, Some(target), &mut io::empty())?;
        let kind = if entry_type == EntryType::Link {
            NodeKind::File
        } else {
            NodeKind::Symlink
        };
        self.record(path, kind);
        Ok(())
    }

    /// Records `path` as written by this placer's package.
    fn record(&mut self, path: &[u8], kind: NodeKind) {
        self.tree.nodes.insert(
            path.to_vec(),
            Node {
                kind,
                package: self.package,
            },
        );
        self.added.entries += 1;
    }
}

/// What [`Placer::plan`] decided.
#[derive(Debug)]
enum Plan {
    /// Nothing to write.
    Skip,
    /// Write the missing `parents`, then the entry at `path` (a link to
    /// `link`).
    Write {
        path: Vec<u8>,
        parents: Vec<Vec<u8>>,
        link: Option<Vec<u8>>,
    },
}

/// A failure while copying an entry: reading the package, or writing out.
#[derive(Debug)]
enum WriteError {
    Input(io::Error),
    Output(io::Error),
}

/// Reads exactly `remaining` bytes from `inner`: an early end is an error,
/// and any failure of `inner` is flagged so it is not taken for an output
/// error.
struct ExactReader<'r> {
    inner: &'r mut dyn Read,
    remaining: u64,
    failed: bool,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining).map_or(buf.len(), |left| left.min(buf.len()));
        let slot = buf.get_mut(..want).unwrap_or_default();
        match self.inner.read(slot) {
            Ok(0) => {
                self.failed = true;
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("data ends {} bytes early", self.remaining),
                ))
            }
            Ok(read) => {
                self.remaining = self.remaining.saturating_sub(read as u64);
                Ok(read)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Err(error),
            Err(error) => {
                self.failed = true;
                Err(error)
            }
        }
    }
}

/// The size of the name and link-name fields of a tar header.
const NAME_FIELD_BYTES: usize = 100;

/// Appends `header` with `path` (and link target `link`) written byte for
/// byte, preceded by a GNU long-name (long-link) entry when one does not fit
/// its field, then the entry's `data` (exactly the header's size).
pub(in crate::image) fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: Header,
    path: &[u8],
    link: Option<&[u8]>,
    data: &mut dyn Read,
) -> io::Result<()> {
    if path.len() > NAME_FIELD_BYTES {
        append_long_name(builder, EntryType::GNULongName, path)?;
    }
    copy_field(&mut header.as_old_mut().name, path);
    if let Some(link) = link {
        if link.len() > NAME_FIELD_BYTES {
            append_long_name(builder, EntryType::GNULongLink, link)?;
        }
        copy_field(&mut header.as_old_mut().linkname, link);
    }
    header.set_cksum();
    builder.append(&header, data)
}

/// Appends a GNU `././@LongLink` entry of type `entry_type` holding `value`
/// and its NUL terminator.
fn append_long_name<W: Write>(
    builder: &mut tar::Builder<W>,
    entry_type: EntryType,
    value: &[u8],
) -> io::Result<()> {
    let mut header = Header::new_gnu();
    copy_field(&mut header.as_old_mut().name, b"././@LongLink");
    header.set_entry_type(entry_type);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(value.len() as u64 + 1);
    header.set_cksum();
    builder.append(&header, value.chain(&[0u8][..]))
}

/// Fills a fixed header field with `value`, truncated to fit, NUL-padded.
fn copy_field(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    for (slot, byte) in field.iter_mut().zip(value) {
        *slot = *byte;
    }
}

/// Normalizes an archive path: one leading `./` stripped; `Ok(None)` for the
/// archive root (`./`, `.`); else the path without trailing `/` and whether
/// it had one. Refuses absolute paths, `..` and `.` components, empty
/// components (but a trailing `/`), NUL and more than [`MAX_PATH_BYTES`].
fn normalize(raw: &[u8]) -> Result<Option<(Vec<u8>, bool)>, EntryProblem> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(EntryProblem::BadPath("longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(EntryProblem::BadPath("contains NUL"));
    }
    if raw.is_empty() {
        return Err(EntryProblem::BadPath("empty"));
    }
    if raw.starts_with(b"/") {
        return Err(EntryProblem::BadPath("absolute"));
    }
    let rest = raw.strip_prefix(b"./").unwrap_or(raw);
    if rest.is_empty() || rest == b"." {
        return Ok(None);
    }
    let (body, trailing_slash) = match rest.strip_suffix(b"/") {
        Some(body) => (body, true),
        None => (rest, false),
    };
    for component in body.split(|b| *b == b'/') {
        match component {
            b"" => return Err(EntryProblem::BadPath("empty path component")),
            b".." => return Err(EntryProblem::BadPath("'..' component")),
            b"." => return Err(EntryProblem::BadPath("'.' component")),
            _ => {}
        }
    }
    Ok(Some((body.to_vec(), trailing_slash)))
}

/// Checks a symlink at `path` (normalized) with target `link`: non-empty, no
/// NUL, at most [`MAX_PATH_BYTES`]; if relative, resolving it lexically from
/// the link's directory must not climb above the root. Returns the target.
fn check_symlink(path: &[u8], link: Option<&[u8]>) -> Result<Vec<u8>, EntryProblem> {
    let target = check_link_target(link)?;
    if !target.starts_with(b"/") {
        check_link_depth(path, target)?;
    }
    Ok(target.to_vec())
}

/// A symlink's target, if it is one: not empty, no NUL, at most [`MAX_PATH_BYTES`].
pub(in crate::image) fn check_link_target(link: Option<&[u8]>) -> Result<&[u8], EntryProblem> {
    let target = link.unwrap_or_default();
    if target.is_empty() {
        return Err(EntryProblem::BadLinkTarget("empty"));
    }
    if target.contains(&0) {
        return Err(EntryProblem::BadLinkTarget("contains NUL"));
    }
    if target.len() > MAX_PATH_BYTES {
        return Err(EntryProblem::BadLinkTarget("longer than 4096 bytes"));
    }
    Ok(target)
}

/// Refuses a link at `path` whose `target`, resolved lexically from the link's
/// directory (from the root when it is absolute), climbs above the root.
pub(in crate::image) fn check_link_depth(path: &[u8], target: &[u8]) -> Result<(), EntryProblem> {
    let mut depth = if target.starts_with(b"/") {
        0
    } else {
        path.iter().filter(|b| **b == b'/').count()
    };
    for component in target.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| EntryProblem::LinkEscapes {
                        target: display_bytes(target),
                    })?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize(b"./").unwrap(), None);
        assert_eq!(normalize(b".").unwrap(), None);
        assert_eq!(normalize(b"./usr/").unwrap(), Some((b"usr".to_vec(), true)));
        assert_eq!(
            normalize(b"usr/bin/ls").unwrap(),
            Some((b"usr/bin/ls".to_vec(), false))
        );
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"./a/../b",
            b"a//b",
            b".//a",
            b"././a",
            b"a/./b",
            b"a\0b",
            b"",
            b"./..",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
        assert!(normalize(&[b'a'; MAX_PATH_BYTES + 1]).is_err());
    }

    #[test]
    fn symlink_targets() {
        assert!(check_symlink(b"usr/lib/a", Some(b"../../etc/x")).is_ok());
        assert!(check_symlink(b"usr/lib/a", Some(b"/etc/x")).is_ok());
        assert!(check_symlink(b"usr/lib/a", Some(b"./b/../c")).is_ok());
        assert!(check_symlink(b"a", Some(b"b")).is_ok());
        assert!(matches!(
            check_symlink(b"usr/lib/a", Some(b"../../../etc")),
            Err(EntryProblem::LinkEscapes { .. })
        ));
        assert!(matches!(
            check_symlink(b"a", Some(b"../a")),
            Err(EntryProblem::LinkEscapes { .. })
        ));
        assert!(check_symlink(b"a", Some(b"")).is_err());
        assert!(check_symlink(b"a", None).is_err());
        assert!(check_symlink(b"a", Some(b"b\0c")).is_err());
    }
}
