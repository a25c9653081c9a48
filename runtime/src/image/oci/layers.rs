//! OCI image layers applied in order into one merged tree, written out as one
//! normalized tar stream.
//!
//! Each layer is a tarball (uncompressed, gzip or zstd) read through the
//! bounded reader of [`crate::image::deb`]: headers are counted and sizes
//! checked against [`Limits`] before any data is read. Applying a layer
//! executes nothing and writes nothing but files in the caller's spool
//! directory: the tree's metadata lives in memory, regular-file contents in
//! spool files, and [`LayerTree::write_tar`] turns the tree into one tar
//! stream that is unpacked later, inside a VM.
//!
//! The rules are the image-spec's ("Image Layer Filesystem Changeset"): an
//! entry replaces what is at its path (a directory over a directory only takes
//! the new metadata), `DIR/.wh.NAME` deletes `NAME` and `DIR/.wh..wh..opq`
//! empties `DIR`, of what lower layers wrote.
//!
//! Refused, naming the layer and the entry: `..` components, NUL, paths over
//! [`MAX_PATH_BYTES`] or with a component over 255 bytes; writes through a
//! symlink or below a non-directory; symlinks whose target climbs above the
//! root; hard links to anything but a regular file already in the tree;
//! device nodes, FIFOs, sparse files and every other type; entries, totals or
//! node counts over the limits. Extended attributes (PAX `SCHILY.xattr.*`) are
//! dropped: the tree keeps type, permission bits, owner, mtime, link target
//! and contents only.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tar::{EntryType, Header};

use crate::image::deb::tarball::{self, Budget, Entry, Kind};
use crate::image::deb::tree::{append_entry, check_link_depth, check_link_target};
use crate::image::deb::{
    display_bytes, Compression, DebError, EntryProblem, Limits, MAX_PATH_BYTES,
};

#[cfg(test)]
mod tests;

/// The name prefix that makes an entry a whiteout.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The whiteout name that makes its directory opaque.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The longest path component accepted (Linux `NAME_MAX`, erofs's limit).
const MAX_NAME_BYTES: usize = 255;
/// Mode of the directories the tree makes for missing parents.
const IMPLIED_DIR_MODE: u32 = 0o755;
/// Mtime of the directories the tree makes: clamped to the epoch on output.
const IMPLIED_MTIME: u64 = u64::MAX;
/// The copy buffer for layer data going to the spool.
const COPY_BUFFER_BYTES: u64 = 64 * 1024;

/// The merged tree of the layers applied so far.
///
/// Paths are normalized: a leading `/` or `./` is stripped and empty and `.`
/// components are dropped (`a//b` and `a/./b` are `a/b`); `..` is refused.
/// Missing parent directories are created, as Docker does: mode 0755, owned
/// by root, mtime the epoch given to [`LayerTree::write_tar`].
///
/// After a failed [`LayerTree::apply`] the tree is half applied: every later
/// call refuses to work on it.
pub struct LayerTree {
    tree: Tree,
    limits: Limits,
    budget: Budget,
    failed: Option<String>,
}

/// What one [`LayerTree::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries added or replaced, missing parent directories included.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Regular-file bytes stored.
    pub bytes: u64,
}

/// What a tar stream written by [`LayerTree::write_tar`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Entries written (GNU long-name headers not counted).
    pub entries: u64,
    /// Regular-file bytes written (hard links count nothing).
    pub bytes: u64,
}

/// Why a layer could not be applied or the tree not written.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// One entry of one layer was refused.
    #[error("layer {layer}: path \"{path}\": {problem}")]
    Entry {
        /// The layer's digest.
        layer: String,
        /// The entry's path as the layer spells it.
        path: String,
        /// The rule it broke.
        problem: EntryProblem,
    },
    /// The layer stream itself failed (decompression, tar framing), or the
    /// tree is unusable after an earlier failure.
    #[error("layer {layer}: {reason}")]
    Layer {
        /// The layer's digest.
        layer: String,
        /// What failed.
        reason: String,
    },
    /// The spool directory or the output.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl std::fmt::Debug for LayerTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerTree")
            .field("spool", &self.tree.spool)
            .field("nodes", &self.tree.nodes.len())
            .field("limits", &self.limits)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl LayerTree {
    /// An empty tree. `spool`: an existing empty directory that is the
    /// tree's alone; regular-file contents are kept there, one file per
    /// content, so memory holds only metadata. A spool file is removed when
    /// no path of the tree holds its content any more, and when the tree is
    /// dropped.
    ///
    /// `limits` bound the whole tree: headers and bytes over all layers, and
    /// the paths the tree holds at once (`max_entries`).
    #[must_use]
    pub fn new(spool: &Path, limits: Limits) -> Self {
        Self {
            tree: Tree {
                nodes: Nodes {
                    max: limits.max_entries,
                    ..Nodes::default()
                },
                spool: spool.to_path_buf(),
                next_content: 0,
            },
            budget: Budget::new(
                limits.max_entries,
                limits.max_total_bytes,
                limits.max_entry_bytes,
            ),
            limits,
            failed: None,
        }
    }

    /// Applies one layer. `layer` is its digest (for messages).
    ///
    /// `data` is read to its end, past the tar end marker, so a digest
    /// computed while reading it covers the whole blob; pass `&mut reader`
    /// to keep the reader.
    pub fn apply(
        &mut self,
        layer: &str,
        data: impl Read,
        compression: Compression,
    ) -> Result<LayerStats, LayerError> {
        self.usable()?;
        match self.apply_layer(layer, data, compression) {
            Ok(stats) => {
                self.tree.nodes.seal();
                Ok(stats)
            }
            Err(error) => {
                self.failed = Some(layer.to_owned());
                Err(error)
            }
        }
    }

    /// The bytes of regular file `path` (relative, like `etc/passwd`; no
    /// symlink is followed), if the tree has one; `Ok(None)` for a directory,
    /// a symlink or nothing. A file over `max` bytes is refused
    /// ([`io::ErrorKind::InvalidData`]), a path with `..` or NUL too
    /// ([`io::ErrorKind::InvalidInput`]).
    pub fn read_file(&self, path: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        self.usable()
            .map_err(|error| io::Error::other(error.to_string()))?;
        let normalized = normalize(path.as_bytes()).map_err(|problem| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path:?}: {problem}"))
        })?;
        let Some((key, _)) = normalized else {
            return Ok(None);
        };
        let Some(NodeKind::File(content)) = self.tree.nodes.get(&key).map(|node| &node.kind) else {
            return Ok(None);
        };
        if content.size > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{path:?}: {} bytes, over the limit of {max} bytes",
                    content.size
                ),
            ));
        }
        let mut bytes = Vec::new();
        ExactReader::open(content)?.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Writes the merged tree as one tar stream on `out` (then flushes it).
    ///
    /// The output is deterministic: entries in byte order of their paths (so
    /// parents before children), GNU headers with numeric owner, permission
    /// bits and `min(mtime, source_date_epoch)`, no user or group names,
    /// directories as `path/`; paths and link targets are written byte for
    /// byte, with a GNU long-name entry when one is too long for its field.
    ///
    /// Paths holding the same content (hard links, in any layer) are written
    /// once: the first in output order as a regular file, the others as hard
    /// links to it. So a hard link whose target was later removed or replaced
    /// is written as a regular file with the content the target had when it
    /// was linked.
    pub fn write_tar<W: Write>(
        &self,
        out: W,
        source_date_epoch: u64,
    ) -> Result<TreeStats, LayerError> {
        self.usable()?;
        let mut builder = tar::Builder::new(out);
        let mut written: HashMap<u64, &[u8]> = HashMap::new();
        let mut stats = TreeStats::default();
        for (path, node) in self.tree.nodes.iter() {
            let mut header = Header::new_gnu();
            header.set_mode(node.meta.mode);
            header.set_uid(node.meta.uid);
            header.set_gid(node.meta.gid);
            header.set_mtime(node.meta.mtime.min(source_date_epoch));
            header.set_size(0);
            let result = match &node.kind {
                NodeKind::Dir => {
                    header.set_entry_type(EntryType::Directory);
                    let with_slash = [path.as_slice(), b"/"].concat();
                    append_entry(&mut builder, header, &with_slash, None, &mut io::empty())
                }
                NodeKind::Symlink(target) => {
                    header.set_entry_type(EntryType::Symlink);
                    append_entry(&mut builder, header, path, Some(target), &mut io::empty())
                }
                NodeKind::File(content) => match written.entry(content.id) {
                    Slot::Occupied(first) => {
                        header.set_entry_type(EntryType::Link);
                        append_entry(
                            &mut builder,
                            header,
                            path,
                            Some(first.get()),
                            &mut io::empty(),
                        )
                    }
                    Slot::Vacant(slot) => {
                        slot.insert(path.as_slice());
                        header.set_entry_type(EntryType::Regular);
                        header.set_size(content.size);
                        stats.bytes += content.size;
                        ExactReader::open(content).and_then(|mut data| {
                            append_entry(&mut builder, header, path, None, &mut data)
                        })
                    }
                },
            };
            result.map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!(
                        "writing {:?} to the image tar: {error}",
                        display_bytes(path)
                    ),
                )
            })?;
            stats.entries += 1;
        }
        let mut out = builder.into_inner()?;
        out.flush()?;
        Ok(stats)
    }

    /// Refuses to work on a tree whose last apply failed.
    fn usable(&self) -> Result<(), LayerError> {
        match &self.failed {
            None => Ok(()),
            Some(layer) => Err(LayerError::Layer {
                layer: layer.clone(),
                reason: "failed to apply earlier: the tree is incomplete".to_owned(),
            }),
        }
    }

    /// Streams `data` through validation into the tree.
    fn apply_layer(
        &mut self,
        layer: &str,
        mut data: impl Read,
        compression: Compression,
    ) -> Result<LayerStats, LayerError> {
        let reader =
            decoder(compression, &mut data, &self.limits).map_err(|error| LayerError::Layer {
                layer: layer.to_owned(),
                reason: format!("starting {compression:?} decompression: {error}"),
            })?;
        let mut stats = LayerStats::default();
        let tree = &mut self.tree;
        tarball::walk(reader, &mut self.budget, layer, |entry, entry_data| {
            tree.place(entry, entry_data, &mut stats)
                .map_err(|error| match error {
                    PlaceError::Entry(problem) => DebError::Entry {
                        package: layer.to_owned(),
                        path: display_bytes(&entry.path),
                        problem,
                    },
                    PlaceError::Spool(error) => DebError::Write(error),
                })
        })
        .map_err(|error| layer_error(layer, error))?;
        io::copy(&mut data, &mut io::sink()).map_err(|error| LayerError::Layer {
            layer: layer.to_owned(),
            reason: format!("reading the blob after the tar end: {error}"),
        })?;
        Ok(stats)
    }
}

/// A [`DebError`] from the tar walk as a [`LayerError`].
fn layer_error(layer: &str, error: DebError) -> LayerError {
    match error {
        DebError::Entry { path, problem, .. } => LayerError::Entry {
            layer: layer.to_owned(),
            path,
            problem,
        },
        DebError::Stream { after, source, .. } => LayerError::Layer {
            layer: layer.to_owned(),
            reason: format!("corrupt tar stream after {after}: {source}"),
        },
        DebError::Write(error) => LayerError::Io(error),
        other => LayerError::Layer {
            layer: layer.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// A decompressing reader over `data`. xz and zstd decoders may allocate at
/// most [`Limits::max_decoder_memory`]. Gzip may have several members (as
/// eStargz layers do), zstd several frames.
fn decoder<'a>(
    compression: Compression,
    data: impl Read + 'a,
    limits: &Limits,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(data),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        #[cfg(target_os = "linux")]
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(limits.max_decoder_memory, 0)
                .map_err(io::Error::from)?;
            Box::new(xz2::read::XzDecoder::new_stream(data, stream))
        }
        #[cfg(target_os = "linux")]
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(data)?;
            decoder.window_log_max(tarball::window_log(limits.max_decoder_memory))?;
            Box::new(decoder)
        }
        #[cfg(not(target_os = "linux"))]
        Compression::Xz | Compression::Zstd => {
            let _ = limits.max_decoder_memory;
            return Err(crate::image::compression_unsupported(match compression {
                Compression::Xz => "xz",
                _ => "zstd",
            }));
        }
    })
}

/// Owner, permission bits and mtime of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    /// `mode & 0o7777`: setuid, setgid and sticky kept.
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// One regular-file content in the spool. Every path holding it (a file and
/// its hard links) shares one `Arc`; the spool file goes with the last.
#[derive(Debug)]
struct Content {
    /// Unique in the tree: names the spool file and groups hard links.
    id: u64,
    file: PathBuf,
    size: u64,
}

impl Drop for Content {
    fn drop(&mut self) {
        // Best effort: the spool directory is the caller's to remove anyway.
        let _ = fs::remove_file(&self.file);
    }
}

/// What a path in the tree is.
#[derive(Debug, Clone)]
enum NodeKind {
    Dir,
    /// A regular file, or a hard link to one (the same content).
    File(Arc<Content>),
    /// A symlink to this target (checked, never followed on the host).
    Symlink(Vec<u8>),
}

/// One path of the tree.
#[derive(Debug, Clone)]
struct Node {
    kind: NodeKind,
    meta: Meta,
}

/// The paths of the tree, split by who wrote them: `upper` holds what the
/// layer being applied wrote (and the directories above it), `lower` the
/// rest, so whiteouts touch only `lower` and never scan this layer's entries.
///
/// Invariants: a path is in one map at most; every ancestor of a node is a
/// directory node; every ancestor of an `upper` node is in `upper`.
#[derive(Debug, Default)]
struct Nodes {
    lower: BTreeMap<Vec<u8>, Node>,
    upper: BTreeMap<Vec<u8>, Node>,
    /// The most paths held at once.
    max: u64,
}

impl Nodes {
    /// The node at `path`.
    fn get(&self, path: &[u8]) -> Option<&Node> {
        self.upper.get(path).or_else(|| self.lower.get(path))
    }

    /// How many paths the tree holds.
    fn len(&self) -> usize {
        self.lower.len() + self.upper.len()
    }

    /// Every path and node, in byte order of the paths.
    fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Node)> {
        // Both maps are sorted and disjoint: merge them.
        let mut lower = self.lower.iter().peekable();
        let mut upper = self.upper.iter().peekable();
        std::iter::from_fn(move || {
            let lower_first = match (lower.peek(), upper.peek()) {
                (Some((low, _)), Some((up, _))) => low < up,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if lower_first {
                lower.next()
            } else {
                upper.next()
            }
        })
    }

    /// Puts `node` at `path` as written by this layer, replacing what is
    /// there (but not its children); refuses a path over the node limit.
    fn put(&mut self, path: &[u8], node: Node) -> Result<(), EntryProblem> {
        let known = self.lower.remove(path).is_some() || self.upper.contains_key(path);
        if !known && !u64::try_from(self.len()).is_ok_and(|len| len < self.max) {
            return Err(EntryProblem::TooManyEntries { limit: self.max });
        }
        self.upper.insert(path.to_vec(), node);
        Ok(())
    }

    /// Moves `path` (a directory) and its ancestors into `upper`, up to the
    /// first already there.
    fn promote(&mut self, path: &[u8]) {
        let mut end = path.len();
        loop {
            let Some(dir) = path.get(..end) else { return };
            if dir.is_empty() || self.upper.contains_key(dir) {
                return;
            }
            if let Some((key, node)) = self.lower.remove_entry(dir) {
                self.upper.insert(key, node);
            }
            match last_slash(dir) {
                Some(slash) => end = slash,
                None => return,
            }
        }
    }

    /// Removes every node below `dir` (both maps).
    fn remove_below(&mut self, dir: &[u8]) {
        remove_below(&mut self.lower, dir);
        remove_below(&mut self.upper, dir);
    }

    /// Removes every node of lower layers below `dir` (the root if empty).
    /// By the invariants, none of them has a node of this layer below it.
    fn remove_lower_below(&mut self, dir: &[u8]) {
        if dir.is_empty() {
            self.lower.clear();
        } else {
            remove_below(&mut self.lower, dir);
        }
    }

    /// Ends a layer: what it wrote becomes lower.
    fn seal(&mut self) {
        for (path, node) in std::mem::take(&mut self.upper) {
            self.lower.insert(path, node);
        }
    }
}

/// Removes the keys of `map` below `dir` (non-empty): those in
/// `["dir/", "dir0")`, `'0'` being the byte after `'/'`.
fn remove_below(map: &mut BTreeMap<Vec<u8>, Node>, dir: &[u8]) {
    let start = [dir, b"/"].concat();
    let end = [dir, b"0"].concat();
    let doomed: Vec<Vec<u8>> = map
        .range::<[u8], _>((
            Bound::Included(start.as_slice()),
            Bound::Excluded(end.as_slice()),
        ))
        .map(|(path, _)| path.clone())
        .collect();
    for path in doomed {
        map.remove(&path);
    }
}

/// The nodes, the spool and what goes into them.
#[derive(Debug)]
struct Tree {
    nodes: Nodes,
    spool: PathBuf,
    next_content: u64,
}

/// Why one entry could not be placed.
#[derive(Debug)]
enum PlaceError {
    /// A rule of the tree.
    Entry(EntryProblem),
    /// Writing the spool.
    Spool(io::Error),
}

impl From<EntryProblem> for PlaceError {
    fn from(problem: EntryProblem) -> Self {
        Self::Entry(problem)
    }
}

impl Tree {
    /// Validates `entry` and applies it to the tree, storing its data from
    /// `data` if it is a regular file.
    fn place(
        &mut self,
        entry: &Entry,
        data: &mut dyn Read,
        stats: &mut LayerStats,
    ) -> Result<(), PlaceError> {
        let Some((path, trailing_slash)) = normalize(&entry.path)? else {
            return if entry.kind == Kind::Dir {
                Ok(())
            } else {
                Err(EntryProblem::BadPath("the archive root is not a directory").into())
            };
        };
        let (parent, name) = match last_slash(&path) {
            Some(slash) => (
                path.get(..slash).unwrap_or_default(),
                path.get(slash + 1..).unwrap_or_default(),
            ),
            None => (&b""[..], path.as_slice()),
        };
        if parent
            .split(|b| *b == b'/')
            .any(|component| component.starts_with(WHITEOUT_PREFIX))
        {
            return Err(EntryProblem::BadPath("a directory named .wh.* (a whiteout name)").into());
        }
        if let Some(whited_out) = name.strip_prefix(WHITEOUT_PREFIX) {
            self.whiteout(&path, parent, name, whited_out)?;
            stats.whiteouts += 1;
            return Ok(());
        }
        if trailing_slash && entry.kind != Kind::Dir {
            return Err(EntryProblem::BadPath("trailing '/' on a non-directory").into());
        }
        let existing = self.existing_ancestor(&path)?;
        let kind = match entry.kind {
            Kind::Dir => NodeKind::Dir,
            Kind::Symlink => NodeKind::Symlink(check_symlink(&path, entry.link.as_deref())?),
            Kind::HardLink => NodeKind::File(self.hard_link_target(entry.link.as_deref())?),
            Kind::File => {
                let content = self.spool(entry.size, data)?;
                stats.bytes += entry.size;
                NodeKind::File(content)
            }
        };
        let meta = Meta {
            mode: entry.mode & 0o7777,
            uid: entry.uid,
            gid: entry.gid,
            mtime: entry.mtime,
        };

        self.nodes.promote(path.get(..existing).unwrap_or_default());
        for slash in slashes(&path).filter(|slash| *slash > existing) {
            let dir = path.get(..slash).unwrap_or_default();
            self.nodes.put(dir, implied_dir())?;
            stats.entries += 1;
        }
        let replaces_dir = matches!(
            self.nodes.get(&path).map(|node| &node.kind),
            Some(NodeKind::Dir)
        );
        if replaces_dir && !matches!(kind, NodeKind::Dir) {
            self.nodes.remove_below(&path);
        }
        self.nodes.put(&path, Node { kind, meta })?;
        stats.entries += 1;
        Ok(())
    }

    /// Applies whiteout `path` (`parent/name`, `name` = `.wh.` +
    /// `whited_out`) to what lower layers wrote.
    fn whiteout(
        &mut self,
        path: &[u8],
        parent: &[u8],
        name: &[u8],
        whited_out: &[u8],
    ) -> Result<(), EntryProblem> {
        if whited_out.is_empty() {
            return Err(EntryProblem::BadPath("whiteout of an empty name"));
        }
        if whited_out == b".." || whited_out == b"." {
            return Err(EntryProblem::BadPath("whiteout of '.' or '..'"));
        }
        if self.existing_ancestor(path)? != parent.len() {
            // The directory is not in the tree: nothing to remove.
            return Ok(());
        }
        if name == OPAQUE_MARKER {
            self.nodes.remove_lower_below(parent);
            return Ok(());
        }
        let target = if parent.is_empty() {
            whited_out.to_vec()
        } else {
            [parent, b"/", whited_out].concat()
        };
        self.nodes.remove_lower_below(&target);
        self.nodes.lower.remove(&target);
        Ok(())
    }

    /// The length of the nearest ancestor of `path` in the tree (0: the
    /// root), which must be a directory (so, by the tree's invariant, are
    /// all above it).
    fn existing_ancestor(&self, path: &[u8]) -> Result<usize, EntryProblem> {
        let mut end = path.len();
        while let Some(slash) = path.get(..end).and_then(last_slash) {
            let parent = path.get(..slash).unwrap_or_default();
            match self.nodes.get(parent).map(|node| &node.kind) {
                Some(NodeKind::Dir) => return Ok(slash),
                Some(NodeKind::Symlink(_)) => {
                    return Err(EntryProblem::ThroughSymlink {
                        symlink: display_bytes(parent),
                    })
                }
                Some(NodeKind::File(_)) => {
                    return Err(EntryProblem::BelowNonDirectory {
                        parent: display_bytes(parent),
                    })
                }
                None => end = slash,
            }
        }
        Ok(0)
    }

    /// The content of a hard link's target, which must be a regular file
    /// (or a hard link to one) already in the tree.
    fn hard_link_target(&self, link: Option<&[u8]>) -> Result<Arc<Content>, EntryProblem> {
        let link = link
            .filter(|link| !link.is_empty())
            .ok_or(EntryProblem::BadLinkTarget("empty"))?;
        let refuse = || EntryProblem::HardLinkTarget {
            target: display_bytes(link),
        };
        match normalize(link) {
            Ok(Some((target, false))) => match self.nodes.get(&target).map(|node| &node.kind) {
                Some(NodeKind::File(content)) => Ok(Arc::clone(content)),
                _ => Err(refuse()),
            },
            _ => Err(refuse()),
        }
    }

    /// Copies exactly `size` bytes of `data` into a new spool file.
    fn spool(&mut self, size: u64, data: &mut dyn Read) -> Result<Arc<Content>, PlaceError> {
        let id = self.next_content;
        self.next_content += 1;
        let file = self.spool.join(id.to_string());
        let spool_error = |error: io::Error| {
            PlaceError::Spool(io::Error::new(
                error.kind(),
                format!("spool file {}: {error}", file.display()),
            ))
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(spool_error)?;
        // From here on, a failure drops `content`, which removes the file.
        let content = Arc::new(Content {
            id,
            file: file.clone(),
            size,
        });
        let buffer_len = usize::try_from(size.min(COPY_BUFFER_BYTES)).unwrap_or(0);
        let mut buffer = vec![0u8; buffer_len];
        let mut remaining = size;
        while remaining > 0 {
            let want =
                usize::try_from(remaining).map_or(buffer.len(), |left| left.min(buffer.len()));
            let slot = buffer.get_mut(..want).unwrap_or_default();
            let read = match data.read(slot) {
                Ok(0) => {
                    return Err(EntryProblem::Read(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("data ends after {} of {size} bytes", size - remaining),
                    ))
                    .into())
                }
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(EntryProblem::Read(error).into()),
            };
            out.write_all(slot.get(..read).unwrap_or_default())
                .map_err(spool_error)?;
            remaining = remaining.saturating_sub(read as u64);
        }
        Ok(content)
    }
}

/// A directory the tree makes for a missing parent.
fn implied_dir() -> Node {
    Node {
        kind: NodeKind::Dir,
        meta: Meta {
            mode: IMPLIED_DIR_MODE,
            uid: 0,
            gid: 0,
            mtime: IMPLIED_MTIME,
        },
    }
}

/// Normalizes a layer path: leading `/` and `./`, empty and `.` components
/// dropped; `Ok(None)` for the root. Else the path (relative, components
/// joined by one `/`) and whether it ended in `/` (or `/.`). Refuses `..`,
/// NUL, an empty path, more than [`MAX_PATH_BYTES`] and a component over
/// [`MAX_NAME_BYTES`].
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
    let mut path = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(EntryProblem::BadPath("'..' component")),
            _ if component.len() > MAX_NAME_BYTES => {
                return Err(EntryProblem::BadPath("a component longer than 255 bytes"))
            }
            _ => {
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(component);
            }
        }
    }
    if path.is_empty() {
        return Ok(None);
    }
    let trailing_slash = matches!(raw.rsplit(|b| *b == b'/').next(), Some(b"" | b"."));
    Ok(Some((path, trailing_slash)))
}

/// Checks the target of a symlink at `path` (normalized): not empty, no NUL,
/// at most [`MAX_PATH_BYTES`], and resolved lexically (from the link's
/// directory, or from the root if absolute) it never climbs above the root.
/// Absolute targets that stay inside are kept: the guest resolves them in its
/// own root, and the host never follows a link of the tree. Returns the
/// target.
fn check_symlink(path: &[u8], link: Option<&[u8]>) -> Result<Vec<u8>, EntryProblem> {
    let target = check_link_target(link)?;
    check_link_depth(path, target)?;
    Ok(target.to_vec())
}

/// The positions of the `/` in `path`, in order.
fn slashes(path: &[u8]) -> impl Iterator<Item = usize> + '_ {
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(|(at, _)| at)
}

/// The position of the last `/` in `path`.
fn last_slash(path: &[u8]) -> Option<usize> {
    path.iter().rposition(|b| *b == b'/')
}

/// Reads a spool file, failing if it ends before its recorded size (the tar
/// builder would otherwise write a header whose data is short).
struct ExactReader {
    file: io::Take<File>,
    remaining: u64,
}

impl ExactReader {
    /// Opens the spool file of `content`.
    fn open(content: &Content) -> io::Result<Self> {
        let file = File::open(&content.file).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("spool file {}: {error}", content.file.display()),
            )
        })?;
        Ok(Self {
            file: file.take(content.size),
            remaining: content.size,
        })
    }
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let read = self.file.read(buf)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("spool file ends {} bytes early", self.remaining),
            ));
        }
        self.remaining = self.remaining.saturating_sub(read as u64);
        Ok(read)
    }
}
