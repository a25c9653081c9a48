//! An image archive read: an OCI image layout (a directory or a tar of one) or a
//! `docker save` tar. Nothing in it is trusted: every JSON document is read under a
//! size cap and parsed strictly enough to find what is needed, every blob is found by
//! a name checked for `..` and read within its own bounds, and every layer is checked
//! against its digest (compressed) and its `diff_id` (uncompressed) before a byte of
//! it is applied.
//!
//! Which format: `index.json` and `oci-layout` at the top make an OCI layout (an
//! index may name one manifest, or several for several platforms, in which case the
//! `linux/amd64` one is taken; a nested index is followed one level); otherwise a
//! top-level `manifest.json` makes a `docker save` archive (its first image).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::image::deb::Compression;

/// The largest JSON document (index, manifest, config) read.
pub const MAX_JSON_BYTES: u64 = 4 << 20;
/// The most layers an image may have.
pub const MAX_LAYERS: usize = 256;
/// Most symlink hops followed between members of a tar archive (old `docker save`
/// archives link repeated layers to one file).
const MAX_MEMBER_LINKS: usize = 4;
/// The platform mvm runs.
const OS: &str = "linux";
const ARCHITECTURE: &str = "amd64";

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Neither an OCI image layout nor a `docker save` archive.
    #[error("{0}: not an OCI image layout (index.json, oci-layout) or a docker save archive (manifest.json)")]
    Unknown(PathBuf),
    /// A member the archive needs is not in it.
    #[error("{0} is not in the archive")]
    Missing(String),
    /// A member name that is absolute, climbs with `..`, or is otherwise odd.
    #[error("archive member {name:?}: {reason}")]
    BadName {
        /// The name, as the archive spells it.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A JSON document that is too big or not what its format says.
    #[error("{what}: {reason}")]
    Json {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
    /// A blob whose bytes do not have the digest or size it is named by.
    #[error("{what}: {reason}")]
    Digest {
        /// Which blob.
        what: String,
        /// What differed.
        reason: String,
    },
    /// The image is for another platform, or uses something mvm does not take.
    #[error("{0}")]
    Unsupported(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the archive's members are.
enum Source {
    /// A directory: members are files under it.
    Dir(PathBuf),
    /// A tar file: members are byte ranges of it (regular files), or links to other
    /// members.
    Tar {
        path: PathBuf,
        file: Arc<File>,
        members: BTreeMap<String, Member>,
    },
}

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

/// A byte range of a file, read with `pread` (so several can be open at once).
pub struct Slice {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let Some(buf) = buf.get_mut(..want) else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.file.read_at(buf, self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a member",
            ));
        }
        self.pos += u64::try_from(n).unwrap_or(0);
        Ok(n)
    }
}

/// A member name made relative and checked: no absolute path, no `..`, no NUL.
fn clean_name(name: &str) -> Result<String, ArchiveError> {
    let bad = |reason| ArchiveError::BadName {
        name: name.chars().take(200).collect(),
        reason,
    };
    if name.contains('\0') {
        return Err(bad("has a NUL"));
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("climbs with ..")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(bad("is empty"));
    }
    Ok(parts.join("/"))
}

/// A tar file's members, indexed by name (regular files by their byte range).
fn index_tar(path: &Path) -> Result<(Arc<File>, BTreeMap<String, Member>), ArchiveError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut members = BTreeMap::new();
    {
        let mut archive = tar::Archive::new(&file);
        let entries = archive.entries().map_err(io_err(path))?;
        for entry in entries {
            let entry = entry.map_err(io_err(path))?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            let member = if kind.is_file() {
                Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                }
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry.link_name_bytes() else {
                    continue;
                };
                let target = String::from_utf8_lossy(&target).into_owned();
                // Hard links name a member; symlinks are relative to their directory.
                let target = if kind.is_symlink() && !target.starts_with('/') {
                    match raw.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                Member::Link(target)
            } else {
                continue;
            };
            let name = clean_name(&raw)?;
            if members.insert(name.clone(), member).is_some() {
                return Err(ArchiveError::BadName {
                    name,
                    reason: "is in the archive twice",
                });
            }
        }
    }
    Ok((Arc::new(file), members))
}

/// An open archive.
pub struct Archive {
    source: Source,
}

impl Archive {
    /// Opens `path`: a directory or a tar file.
    pub fn open(path: &Path) -> Result<Self, ArchiveError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let source = if meta.is_dir() {
            Source::Dir(path.to_owned())
        } else {
            let (file, members) = index_tar(path)?;
            Source::Tar {
                path: path.to_owned(),
                file,
                members,
            }
        };
        Ok(Self { source })
    }

    /// Whether member `name` exists.
    fn has(&self, name: &str) -> bool {
        self.member(name).is_ok()
    }

    /// Member `name` opened for reading, with its size.
    fn member(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), ArchiveError> {
        let mut name = clean_name(name)?;
        match &self.source {
            Source::Dir(dir) => {
                let path = dir.join(&name);
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(|_| ArchiveError::Missing(name.clone()))?;
                if !meta.is_file() {
                    return Err(ArchiveError::BadName {
                        name,
                        reason: "is not a regular file",
                    });
                }
                let file = File::open(&path).map_err(io_err(&path))?;
                Ok((Box::new(file), meta.len()))
            }
            Source::Tar { file, members, .. } => {
                for _ in 0..=MAX_MEMBER_LINKS {
                    match members.get(&name) {
                        Some(Member::File { offset, size }) => {
                            let slice = Slice {
                                file: Arc::clone(file),
                                pos: *offset,
                                end: offset.saturating_add(*size),
                            };
                            return Ok((Box::new(slice), *size));
                        }
                        Some(Member::Link(target)) => name = clean_name(target)?,
                        None => return Err(ArchiveError::Missing(name)),
                    }
                }
                Err(ArchiveError::BadName {
                    name,
                    reason: "links to a link to a link...",
                })
            }
        }
    }

    /// Member `name` read whole, if no larger than [`MAX_JSON_BYTES`].
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let (reader, size) = self.member(name)?;
        if size > MAX_JSON_BYTES {
            return Err(ArchiveError::Json {
                what: name.to_owned(),
                reason: format!("{size} bytes, more than the {MAX_JSON_BYTES} taken"),
            });
        }
        let mut bytes = Vec::new();
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|source| ArchiveError::Io {
                path: self.path().join(name),
                source,
            })?;
        Ok(bytes)
    }

    fn path(&self) -> &Path {
        match &self.source {
            Source::Dir(p) | Source::Tar { path: p, .. } => p,
        }
    }

    /// The image in the archive: its manifest, config and layers found and the small
    /// documents checked by digest. Layers are checked by [`Archive::verify_layer`].
    pub fn image(&self) -> Result<Image, ArchiveError> {
        if self.has("index.json") && self.has("oci-layout") {
            self.oci_image()
        } else if self.has("manifest.json") {
            self.docker_image()
        } else {
            Err(ArchiveError::Unknown(self.path().to_owned()))
        }
    }

    /// Blob `digest` (`sha256:<hex>`) of an OCI layout, read whole and checked.
    fn small_blob(&self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, ArchiveError> {
        let name = blob_name(&descriptor.digest)?;
        let bytes = self.read_small(&name)?;
        check_digest(what, &bytes, &descriptor.digest, Some(descriptor.size))?;
        Ok(bytes)
    }

    fn oci_image(&self) -> Result<Image, ArchiveError> {
        let layout: OciLayout = parse("oci-layout", &self.read_small("oci-layout")?)?;
        if layout.image_layout_version != "1.0.0" {
            return Err(ArchiveError::Unsupported(format!(
                "oci-layout version {:?} (1.0.0 is taken)",
                layout.image_layout_version
            )));
        }
        let mut index: Index = parse("index.json", &self.read_small("index.json")?)?;
        let mut what = "index.json".to_owned();
        // An index names manifests, or (one level down) another index.
        for _ in 0..2 {
            let descriptor = pick_manifest(&what, &index.manifests)?;
            if descriptor.media_type == MEDIA_INDEX {
                what = format!("index {}", descriptor.digest);
                index = parse(&what, &self.small_blob(&descriptor, &what)?)?;
                continue;
            }
            let manifest_what = format!("manifest {}", descriptor.digest);
            let bytes = self.small_blob(&descriptor, &manifest_what)?;
            let manifest: OciManifest = parse(&manifest_what, &bytes)?;
            let config_what = format!("config {}", manifest.config.digest);
            let config_bytes = self.small_blob(&manifest.config, &config_what)?;
            let config: ConfigFile = parse(&config_what, &config_bytes)?;
            let layers = manifest
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerRef {
                        member: blob_name(&l.digest)?,
                        digest: Some(l.digest.clone()),
                        size: Some(l.size),
                        compression: layer_compression(&l.media_type)?,
                        diff_id: String::new(),
                    })
                })
                .collect::<Result<Vec<_>, ArchiveError>>()?;
            return Image::new(
                Format::OciLayout,
                descriptor.digest.clone(),
                manifest.config.digest.clone(),
                config,
                layers,
            );
        }
        Err(ArchiveError::Unsupported(
            "an index of an index of an index: one level of nesting is followed".into(),
        ))
    }

    fn docker_image(&self) -> Result<Image, ArchiveError> {
        let bytes = self.read_small("manifest.json")?;
        let entries: Vec<DockerEntry> = parse("manifest.json", &bytes)?;
        let entry = match entries.as_slice() {
            [one] => one,
            [] => {
                return Err(ArchiveError::Json {
                    what: "manifest.json".into(),
                    reason: "names no image".into(),
                })
            }
            _ => {
                return Err(ArchiveError::Unsupported(format!(
                    "manifest.json names {} images; save one image per archive",
                    entries.len()
                )))
            }
        };
        let config_bytes = self.read_small(&entry.config)?;
        let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
        // Docker names the config by its digest: `<hex>.json` or `blobs/sha256/<hex>`.
        let stem = entry
            .config
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".json");
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            check_digest(
                &format!("config {}", entry.config),
                &config_bytes,
                &format!("sha256:{stem}"),
                None,
            )?;
        }
        let config: ConfigFile = parse(&format!("config {}", entry.config), &config_bytes)?;
        let layers = entry
            .layers
            .iter()
            .map(|member| {
                // Newer docker writes layers as blobs named by digest: check it too.
                let digest = member
                    .strip_prefix("blobs/sha256/")
                    .filter(|h| h.len() == 64)
                    .map(|h| format!("sha256:{h}"));
                Ok(LayerRef {
                    member: clean_name(member)?,
                    digest,
                    size: None,
                    compression: None,
                    diff_id: String::new(),
                })
            })
            .collect::<Result<Vec<_>, ArchiveError>>()?;
        Image::new(
            Format::DockerSave,
            config_digest.clone(),
            config_digest,
            config,
            layers,
        )
    }

    /// Reads layer `layer` once, whole: its size and digest as the manifest gives
    /// them, and its uncompressed digest against the config's `diff_id`. Returns its
    /// compression (found from its first bytes when the manifest does not say).
    pub fn verify_layer(
        &self,
        layer: &LayerRef,
        max_uncompressed: u64,
    ) -> Result<Compression, ArchiveError> {
        let what = format!("layer {}", layer.name());
        let compression = match layer.compression {
            Some(c) => c,
            None => self.sniff(&layer.member)?,
        };
        let (reader, size) = self.member(&layer.member)?;
        if let Some(want) = layer.size {
            if want != size {
                return Err(ArchiveError::Digest {
                    what,
                    reason: format!("{size} bytes where the manifest says {want}"),
                });
            }
        }
        let mut hashing = HashingReader {
            inner: reader,
            hash: Sha256::new(),
        };
        let mut plain: Box<dyn Read> = match compression {
            Compression::None => Box::new(&mut hashing),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(&mut hashing)),
            #[cfg(not(target_os = "linux"))]
            Compression::Zstd => {
                return Err(ArchiveError::Digest {
                    what: what.clone(),
                    reason: crate::image::compression_unsupported("zstd").to_string(),
                })
            }
            #[cfg(target_os = "linux")]
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(&mut hashing).map_err(|e| {
                    ArchiveError::Digest {
                        what: what.clone(),
                        reason: format!("zstd: {e}"),
                    }
                })?)
            }
            Compression::Xz => {
                return Err(ArchiveError::Unsupported(format!(
                    "{what}: xz layers are not part of the OCI image spec"
                )))
            }
        };
        let mut diff = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = plain.read(&mut buf).map_err(|e| ArchiveError::Digest {
                what: what.clone(),
                reason: format!("reading: {e}"),
            })?;
            if n == 0 {
                break;
            }
            total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            if total > max_uncompressed {
                return Err(ArchiveError::Digest {
                    what,
                    reason: format!("more than {max_uncompressed} bytes uncompressed"),
                });
            }
            diff.update(buf.get(..n).unwrap_or_default());
        }
        // A decoder may stop at its end marker: the digest covers every byte.
        drop(plain);
        io::copy(&mut hashing.inner, &mut io::sink()).map_err(|e| ArchiveError::Digest {
            what: what.clone(),
            reason: format!("reading: {e}"),
        })?;
        let got = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
        if let Some(want) = &layer.digest {
            if &got != want {
                return Err(ArchiveError::Digest {
                    what,
                    reason: format!("the bytes are {got}"),
                });
            }
        }
        let got_diff = format!("sha256:{}", hex::encode(diff.finalize()));
        if got_diff != layer.diff_id {
            return Err(ArchiveError::Digest {
                what,
                reason: format!(
                    "uncompressed it is {got_diff}, where the config's diff_id says {}",
                    layer.diff_id
                ),
            });
        }
        Ok(compression)
    }

    /// Layer `layer`'s bytes, as stored (compressed).
    pub fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send>, ArchiveError> {
        Ok(self.member(&layer.member)?.0)
    }

    /// A blob's compression from its first bytes.
    fn sniff(&self, member: &str) -> Result<Compression, ArchiveError> {
        let (mut reader, _) = self.member(member)?;
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            let Some(rest) = head.get_mut(got..) else {
                break;
            };
            match reader.read(rest) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(source) => {
                    return Err(ArchiveError::Io {
                        path: self.path().join(member),
                        source,
                    })
                }
            }
        }
        Ok(match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
            _ => Compression::None,
        })
    }
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

/// Which kind of archive an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An OCI image layout (directory or tar).
    OciLayout,
    /// A `docker save` archive.
    DockerSave,
}

impl Format {
    /// A short name, for manifests and messages.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::OciLayout => "oci-layout",
            Self::DockerSave => "docker-save",
        }
    }
}

/// One layer of an image.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// Its member name in the archive.
    pub member: String,
    /// Its digest (compressed), when the archive names it by one.
    pub digest: Option<String>,
    /// Its size as the manifest gives it.
    pub size: Option<u64>,
    /// Its compression as the manifest's media type gives it.
    pub compression: Option<Compression>,
    /// The digest of its uncompressed tar, from the config.
    pub diff_id: String,
}

impl LayerRef {
    /// The layer's name in messages: its digest, else its `diff_id`.
    #[must_use]
    pub fn name(&self) -> &str {
        self.digest.as_deref().unwrap_or(&self.diff_id)
    }
}

/// What the image's config says a container runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`, split.
    pub env: BTreeMap<String, String>,
    /// `WorkingDir`, when set.
    pub workdir: Option<String>,
    /// `User`, when set (`uid`, `uid:gid`, `name`, `name:group`).
    pub user: Option<String>,
}

/// The image found in an archive.
#[derive(Debug, Clone)]
pub struct Image {
    /// Where it came from.
    pub format: Format,
    /// What names it: the manifest's digest (OCI), or the config's (docker's image id).
    pub digest: String,
    /// The config's digest.
    pub config_digest: String,
    /// What it runs.
    pub run: RunConfig,
    /// Its layers, bottom first, each with its `diff_id`.
    pub layers: Vec<LayerRef>,
}

impl Image {
    fn new(
        format: Format,
        digest: String,
        config_digest: String,
        config: ConfigFile,
        mut layers: Vec<LayerRef>,
    ) -> Result<Self, ArchiveError> {
        if config.os != OS || config.architecture != ARCHITECTURE {
            return Err(ArchiveError::Unsupported(format!(
                "the image is for {}/{}; mvm runs {OS}/{ARCHITECTURE}",
                config.os, config.architecture
            )));
        }
        if config.rootfs.kind != "layers" {
            return Err(ArchiveError::Unsupported(format!(
                "config rootfs type {:?} (\"layers\" is taken)",
                config.rootfs.kind
            )));
        }
        if layers.len() != config.rootfs.diff_ids.len() {
            return Err(ArchiveError::Json {
                what: format!("config {config_digest}"),
                reason: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    layers.len()
                ),
            });
        }
        if layers.len() > MAX_LAYERS {
            return Err(ArchiveError::Unsupported(format!(
                "{} layers; at most {MAX_LAYERS} are taken",
                layers.len()
            )));
        }
        for (layer, diff_id) in layers.iter_mut().zip(&config.rootfs.diff_ids) {
            check_digest_form(diff_id)?;
            layer.diff_id.clone_from(diff_id);
        }
        let c = config.config.unwrap_or_default();
        let mut env = BTreeMap::new();
        for pair in c.env.unwrap_or_default() {
            let (key, value) = pair.split_once('=').unwrap_or((pair.as_str(), ""));
            if key.is_empty() || key.contains('\0') || value.contains('\0') {
                return Err(ArchiveError::Json {
                    what: format!("config {config_digest}"),
                    reason: format!(
                        "Env entry {:?} is not KEY=VALUE",
                        pair.chars().take(80).collect::<String>()
                    ),
                });
            }
            env.insert(key.to_owned(), value.to_owned());
        }
        Ok(Self {
            format,
            digest,
            config_digest,
            run: RunConfig {
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                env,
                workdir: c.working_dir.filter(|w| !w.is_empty()),
                user: c.user.filter(|u| !u.is_empty()),
            },
            layers,
        })
    }
}

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A layer media type's compression; anything else (foreign layers, encrypted
/// layers, ...) is refused.
fn layer_compression(media_type: &str) -> Result<Option<Compression>, ArchiveError> {
    Ok(Some(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
        other => {
            return Err(ArchiveError::Unsupported(format!(
                "layer media type {other:?} is not taken (plain, gzip or zstd tar layers are)"
            )))
        }
    }))
}

/// The manifest to take from an index: the only one, else the `linux/amd64` one.
fn pick_manifest(what: &str, manifests: &[Descriptor]) -> Result<Descriptor, ArchiveError> {
    let fits = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == OS && p.architecture == ARCHITECTURE)
    };
    let candidates: Vec<&Descriptor> = manifests.iter().filter(fits).collect();
    match candidates.as_slice() {
        [one] => {
            let mut d = (*one).clone();
            if d.media_type == MEDIA_DOCKER_LIST {
                d.media_type = MEDIA_INDEX.into();
            }
            Ok(d)
        }
        [] => Err(ArchiveError::Unsupported(format!(
            "{what} names no {OS}/{ARCHITECTURE} image"
        ))),
        _ => Err(ArchiveError::Unsupported(format!(
            "{what} names {} {OS}/{ARCHITECTURE} images; export one",
            candidates.len()
        ))),
    }
}

/// `blobs/sha256/<hex>` for digest `sha256:<hex>`.
fn blob_name(digest: &str) -> Result<String, ArchiveError> {
    check_digest_form(digest)?;
    Ok(format!(
        "blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    ))
}

fn check_digest_form(digest: &str) -> Result<(), ArchiveError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(ArchiveError::Unsupported(format!(
            "digest {:?}: only sha256:<64 lowercase hex> is taken",
            digest.chars().take(80).collect::<String>()
        ))),
    }
}

fn check_digest(
    what: &str,
    bytes: &[u8],
    digest: &str,
    size: Option<u64>,
) -> Result<(), ArchiveError> {
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if let Some(size) = size {
        if size != len {
            return Err(ArchiveError::Digest {
                what: what.to_owned(),
                reason: format!("{len} bytes where its descriptor says {size}"),
            });
        }
    }
    let got = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if got != digest {
        return Err(ArchiveError::Digest {
            what: what.to_owned(),
            reason: format!("the bytes are {got}"),
        });
    }
    Ok(())
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ArchiveError> {
    serde_json::from_slice(bytes).map_err(|e| ArchiveError::Json {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Default, Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
