//! `mvm.lock`: a spec resolved to exact inputs, each pinned by digest.
//!
//! `mvm image lock DIR` reads Debian's signed indexes (`InRelease`, checked with
//! `gpgv` against Debian's archive keyring; the `Packages` index by the digest the
//! signed file gives), resolves the spec's packages with Debian's essential set and
//! their dependencies, and writes every `.deb` with its exact version, size and
//! sha256, and every host file with its digest. The lock, not the spec, is what a
//! build reads; its sha256 is in the image's manifest.
//!
//! Locks age: Debian serves only the current version of each package, so a lock
//! stops being fetchable at the next point release or security update. The cache
//! keeps what was fetched (an image built once rebuilds on that machine), and an
//! input that is no longer served is an error naming it and the command that
//! re-locks (see `docs/images.md`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::debian::{self, PackageEntry, Universe};
use super::fetch::{self, Cas, Wanted};
use super::spec::LoadedSpec;

pub use super::spec::LOCK_FILE;
/// The schema this code writes and reads.
pub const LOCK_SCHEMA: u32 = 1;
/// Largest `InRelease` accepted.
const MAX_INRELEASE_BYTES: u64 = 4 << 20;
/// Largest decompressed `Packages` index accepted.
const MAX_PACKAGES_BYTES: u64 = 512 << 20;
/// Packages every image has besides the essential set (see [`lock`]).
pub const BASE_ROOTS: &[&str] = &["usr-is-merged", "mawk"];
/// The index of each suite this code reads.
const PACKAGES_INDEX: &str = "main/binary-amd64/Packages.xz";

/// A whole lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// [`LOCK_SCHEMA`].
    pub schema: u32,
    /// sha256 (hex) of the spec bytes this lock was made from.
    pub spec_sha256: String,
    /// The Debian suite.
    pub suite: String,
    /// Every timestamp in the image: the newest index's date at lock time.
    pub source_date_epoch: u64,
    /// The signed indexes read, for the record.
    #[serde(default, rename = "index")]
    pub indexes: Vec<LockedIndex>,
    /// Every package, sorted by name.
    #[serde(default, rename = "package")]
    pub packages: Vec<LockedPackage>,
    /// Every host file, in the spec's order.
    #[serde(default, rename = "file")]
    pub files: Vec<LockedFile>,
}

/// One signed index read at lock time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedIndex {
    /// `debian` or `debian-security`.
    pub archive: String,
    /// e.g. `bookworm-updates`.
    pub suite: String,
    /// The index's `Date:`.
    pub date: String,
    /// sha256 (hex) of the `Packages.xz` read.
    pub packages_sha256: String,
}

/// One `.deb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// Whether it is in Debian's essential set or needed by it: unpacked first (by
    /// the host, into the starting tree), so that the tree's own dpkg can run.
    #[serde(default)]
    pub essential: bool,
    /// `debian` or `debian-security`.
    pub archive: String,
    /// Path under the archive's URL.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// One host file copied in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedFile {
    /// Relative to the spec's directory.
    pub src: String,
    /// sha256, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Why a lock cannot be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Reading or writing the lock.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a lock this code reads.
    #[error("{path}: {reason}")]
    Parse {
        /// The lock.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The lock was made from another spec.
    #[error("{lock} was made from another version of {spec}: re-lock with `mvm image lock {dir}`")]
    Stale {
        /// The lock.
        lock: PathBuf,
        /// The spec.
        spec: PathBuf,
        /// The directory.
        dir: PathBuf,
    },
    /// A host file changed since the lock was made.
    #[error("{src}: changed since {lock} was made (sha256 {now}, locked {locked}): re-lock")]
    FileChanged {
        /// The file.
        src: String,
        /// The lock.
        lock: PathBuf,
        /// Its digest now.
        now: String,
        /// Its digest in the lock.
        locked: String,
    },
    /// Fetching an index.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// Debian's index or resolution.
    #[error(transparent)]
    Debian(#[from] debian::DebianError),
}

/// One archive a suite's packages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// `debian` or `debian-security`.
    pub name: &'static str,
    /// Base URL (override with `MVM_DEBIAN_MIRROR` / `MVM_DEBIAN_SECURITY_MIRROR`).
    pub url: String,
    /// The suites read from it.
    pub suites: Vec<String>,
}

/// The archives of `suite`: the release and its updates, and its security suite.
pub fn archives(suite: &str) -> Vec<Archive> {
    let env = |key: &str, default: &str| {
        std::env::var(key)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
            .trim_end_matches('/')
            .to_owned()
    };
    vec![
        Archive {
            name: "debian",
            url: env("MVM_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
            suites: vec![suite.to_owned(), format!("{suite}-updates")],
        },
        Archive {
            name: "debian-security",
            url: env(
                "MVM_DEBIAN_SECURITY_MIRROR",
                "http://deb.debian.org/debian-security",
            ),
            suites: vec![format!("{suite}-security")],
        },
    ]
}

/// The URL of a locked package.
pub fn package_url(suite: &str, package: &LockedPackage) -> String {
    let base = archives(suite)
        .into_iter()
        .find(|a| a.name == package.archive)
        .map_or_else(|| "http://deb.debian.org/debian".to_owned(), |a| a.url);
    format!("{base}/{}", package.filename)
}

/// The keyrings `gpgv` checks `InRelease` against: `MVM_DEBIAN_KEYRING` (a
/// colon-separated list), else Debian's archive keyring.
fn keyrings() -> Vec<PathBuf> {
    match std::env::var("MVM_DEBIAN_KEYRING") {
        Ok(v) if !v.is_empty() => v.split(':').map(PathBuf::from).collect(),
        _ => vec![PathBuf::from(debian::DEFAULT_KEYRING)],
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One suite's index as read: its record, its packages (with the archive each came
/// from) and its date.
type SuiteIndex = (LockedIndex, Vec<(PackageEntry, &'static str)>, i64);

/// A `Packages.xz` index, decompressed (at most [`MAX_PACKAGES_BYTES`]).
#[cfg(target_os = "linux")]
fn read_packages_xz(file: std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    xz2::read::XzDecoder::new(file)
        .take(MAX_PACKAGES_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Refused: xz is read only where images are built.
#[cfg(not(target_os = "linux"))]
fn read_packages_xz(_file: std::fs::File) -> std::io::Result<String> {
    Err(crate::image::compression_unsupported("xz"))
}

/// Reads one suite's signed index and its packages.
fn read_index(
    cas: &Cas,
    archive: &Archive,
    suite: &str,
    work: &Path,
) -> Result<SuiteIndex, LockError> {
    let label = format!("{}/{suite} InRelease", archive.name);
    let url = format!("{}/dists/{suite}/InRelease", archive.url);
    let signed = fetch::get_bytes(&label, &url, MAX_INRELEASE_BYTES)?;
    let path = work.join(format!("{}-{suite}.InRelease", archive.name));
    std::fs::write(&path, &signed).map_err(|source| LockError::Io {
        path: path.clone(),
        source,
    })?;
    let payload = debian::verify_inrelease(&path, &keyrings())?;
    let release = debian::parse_release(&payload)?;
    let (size, digest) =
        release
            .sha256
            .get(PACKAGES_INDEX)
            .cloned()
            .ok_or_else(|| LockError::Parse {
                path: PathBuf::from(&url),
                reason: format!("the signed index lists no {PACKAGES_INDEX}"),
            })?;
    let index_url = format!("{}/dists/{suite}/{PACKAGES_INDEX}", archive.url);
    let index_label = format!("{}/{suite} {PACKAGES_INDEX}", archive.name);
    let xz = cas.get(
        &Wanted {
            input: &index_label,
            url: &index_url,
            sha256: &digest,
            size: Some(size),
        },
        &|_| {},
    )?;
    let file = std::fs::File::open(&xz).map_err(|source| LockError::Io {
        path: xz.clone(),
        source,
    })?;
    let text = read_packages_xz(file).map_err(|source| LockError::Io { path: xz, source })?;
    let entries = debian::parse_packages(&text)?
        .into_iter()
        .map(|e| (e, archive.name))
        .collect();
    Ok((
        LockedIndex {
            archive: archive.name.to_owned(),
            suite: suite.to_owned(),
            date: release.date.clone(),
            packages_sha256: digest,
        },
        entries,
        release.date_epoch,
    ))
}

/// Resolves `spec` against Debian's current indexes into a lock (`status` is told
/// what is being read).
pub fn lock(spec: &LoadedSpec, status: &dyn Fn(&str)) -> Result<Lock, LockError> {
    let cas = Cas::open_default()?;
    let work = crate::backend::scratch::ScratchDir::create().map_err(|source| LockError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let suite = &spec.spec.image.suite;
    let mut indexes = Vec::new();
    let mut all = Vec::new();
    let mut newest = 0i64;
    for archive in archives(suite) {
        for s in &archive.suites {
            status(&format!("reading {}/dists/{s}", archive.url));
            let (index, entries, date) = read_index(&cas, &archive, s, work.path())?;
            indexes.push(index);
            all.extend(entries);
            newest = newest.max(date);
        }
    }
    // Which archive each entry came from: the same version may be in both archives,
    // each under its own pool path, so the entry's file name tells them apart.
    let mut origin = std::collections::BTreeMap::new();
    for (entry, archive) in &all {
        origin.insert(
            (
                entry.name.clone(),
                entry.version.clone(),
                entry.filename.clone(),
            ),
            *archive,
        );
    }
    let universe = Universe::new(all.into_iter().map(|(e, _)| e).collect());
    status("resolving dependencies");
    // Debian's essential set, with the two choices its alternatives leave open made
    // as Debian makes them: the merged-/usr marker (the tree is merged-/usr; the
    // first alternative, `usrmerge`, would convert it and pull in perl) and Debian's
    // default awk.
    let base_roots: Vec<String> = BASE_ROOTS.iter().map(|s| (*s).to_owned()).collect();
    let mut roots = base_roots.clone();
    roots.extend(spec.spec.image.packages.iter().cloned());
    let resolved = debian::resolve(&universe, &roots, true)?;
    // The essential set with what it needs: unpacked first, so that the tree's own
    // dpkg and shell can run.
    let base: std::collections::BTreeSet<String> = debian::resolve(&universe, &base_roots, true)?
        .into_iter()
        .map(|p| p.name)
        .collect();
    let packages = resolved
        .into_iter()
        .map(|p| LockedPackage {
            essential: base.contains(p.name.as_str()),
            archive: origin
                .get(&(p.name.clone(), p.version.clone(), p.filename.clone()))
                .copied()
                .unwrap_or("debian")
                .to_owned(),
            name: p.name,
            version: p.version,
            architecture: p.architecture,
            filename: p.filename,
            size: p.size,
            sha256: p.sha256,
        })
        .collect::<Vec<_>>();
    let mut packages = packages;
    for local in &spec.spec.debs {
        packages.push(lock_local_deb(spec, &local.path)?);
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    let files = spec
        .spec
        .files
        .iter()
        .map(|f| {
            let (sha256, size) = file_digest(&spec.dir().join(&f.src))?;
            Ok(LockedFile {
                src: f.src.clone(),
                sha256,
                size,
            })
        })
        .collect::<Result<Vec<_>, LockError>>()?;
    Ok(Lock {
        schema: LOCK_SCHEMA,
        spec_sha256: sha256_hex(&spec.bytes),
        suite: suite.clone(),
        source_date_epoch: u64::try_from(newest).unwrap_or(0),
        indexes,
        packages,
        files,
    })
}

/// The archive name of a package given as a file next to the spec.
pub const LOCAL_ARCHIVE: &str = "local";

/// Pins a `.deb` next to the spec: its digest, and its name and version as its
/// control file gives them (read, never run).
fn lock_local_deb(spec: &LoadedSpec, rel: &str) -> Result<LockedPackage, LockError> {
    let path = spec.dir().join(rel);
    let (sha256, size) = file_digest(&path)?;
    let bytes = std::fs::read(&path).map_err(|source| LockError::Io {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| LockError::Parse {
        path: path.clone(),
        reason,
    };
    let deb = super::deb::open_deb(&bytes, &super::deb::Limits::default())
        .map_err(|e| bad(e.to_string()))?;
    let field = |name: &str| deb.control.field(name).unwrap_or_default().to_owned();
    let name = field("Package");
    if !super::spec::valid_package_name(&name) || field("Version").is_empty() {
        return Err(bad(
            "its control file has no valid Package and Version".into()
        ));
    }
    Ok(LockedPackage {
        name,
        version: field("Version"),
        architecture: field("Architecture"),
        essential: false,
        archive: LOCAL_ARCHIVE.to_owned(),
        filename: rel.to_owned(),
        size,
        sha256,
    })
}

/// sha256 (hex) and size of a host file (a regular file, not followed through a
/// symlink out of the spec's directory: the spec check keeps `src` inside it).
pub fn file_digest(path: &Path) -> Result<(String, u64), LockError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| LockError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() || meta.len() > super::spec::MAX_FILE_BYTES {
        return Err(LockError::Parse {
            path: path.to_owned(),
            reason: format!(
                "a file copied into an image must be a regular file of at most {} MiB",
                super::spec::MAX_FILE_BYTES >> 20
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| LockError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok((sha256_hex(&bytes), meta.len()))
}

impl Lock {
    /// The lock's bytes as written: a header comment, then TOML.
    pub fn to_bytes(&self) -> Result<Vec<u8>, LockError> {
        let body = toml::to_string(self).map_err(|e| LockError::Parse {
            path: PathBuf::from(LOCK_FILE),
            reason: e.to_string(),
        })?;
        Ok(format!(
            "# Written by `mvm image lock`: every input of the image, pinned. Do not edit;\n\
             # re-lock instead. Keep it next to mvm.toml, under version control.\n{body}"
        )
        .into_bytes())
    }

    /// Parses lock bytes, checking every digest's form.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, LockError> {
        let parse_err = |reason: String| LockError::Parse {
            path: path.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| parse_err("not UTF-8".into()))?;
        let lock: Lock = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        if lock.schema != LOCK_SCHEMA {
            return Err(parse_err(format!(
                "schema {} (this mvm reads {LOCK_SCHEMA})",
                lock.schema
            )));
        }
        let digests = std::iter::once(&lock.spec_sha256)
            .chain(lock.packages.iter().map(|p| &p.sha256))
            .chain(lock.files.iter().map(|f| &f.sha256));
        for d in digests {
            if !fetch::is_sha256_hex(d) {
                return Err(parse_err(format!("{d:?} is not a sha256 digest")));
            }
        }
        for p in &lock.packages {
            let path_ok = !p.filename.starts_with('/')
                && p.filename.split('/').all(|c| !c.is_empty() && c != "..");
            if !super::spec::valid_package_name(&p.name) || !path_ok {
                return Err(parse_err(format!(
                    "package {:?}: bad name or filename",
                    p.name
                )));
            }
        }
        Ok(lock)
    }

    /// Reads the lock beside `spec`, refusing one made from another spec.
    pub fn read_for(spec: &LoadedSpec) -> Result<(Self, Vec<u8>), LockError> {
        let path = spec.lock_path();
        let bytes = std::fs::read(&path).map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
        let lock = Self::from_bytes(&path, &bytes)?;
        if lock.spec_sha256 != sha256_hex(&spec.bytes) {
            return Err(LockError::Stale {
                lock: path,
                spec: spec.path.clone(),
                dir: spec.dir().to_owned(),
            });
        }
        Ok((lock, bytes))
    }

    /// sha256 (hex) of the lock's bytes: the digest the manifest records.
    pub fn digest_of(bytes: &[u8]) -> String {
        sha256_hex(bytes)
    }
}

/// Writes `lock` beside `spec` (through a temporary file and a rename).
pub fn write(spec: &LoadedSpec, lock: &Lock) -> Result<(PathBuf, Vec<u8>), LockError> {
    let path = spec.lock_path();
    let bytes = lock.to_bytes()?;
    let tmp = path.with_extension(format!("lock.tmp.{}", std::process::id()));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((path, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lock {
        Lock {
            schema: LOCK_SCHEMA,
            spec_sha256: "a".repeat(64),
            suite: "bookworm".into(),
            source_date_epoch: 1_700_000_000,
            indexes: vec![],
            packages: vec![LockedPackage {
                name: "dash".into(),
                version: "0.5.12-2".into(),
                architecture: "amd64".into(),
                essential: true,
                archive: "debian".into(),
                filename: "pool/main/d/dash/dash_0.5.12-2_amd64.deb".into(),
                size: 10,
                sha256: "b".repeat(64),
            }],
            files: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let lock = sample();
        let bytes = lock.to_bytes().unwrap();
        assert_eq!(
            Lock::from_bytes(Path::new("mvm.lock"), &bytes).unwrap(),
            lock
        );
    }

    #[test]
    fn refuses_bad_digests_and_paths() {
        let mut lock = sample();
        lock.packages[0].sha256 = "B".repeat(64);
        let bytes = lock.to_bytes().unwrap();
        assert!(Lock::from_bytes(Path::new("l"), &bytes).is_err());
        let mut lock = sample();
        lock.packages[0].filename = "../../etc/passwd".into();
        let bytes = lock.to_bytes().unwrap();
        assert!(Lock::from_bytes(Path::new("l"), &bytes).is_err());
    }
}
