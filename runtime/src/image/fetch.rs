//! Image inputs fetched by digest into a content-addressed cache.
//!
//! `~/.cache/mvm/cas/sha256/<hex>` holds each input once, named by the sha256 of its
//! bytes: a second build of the same lock fetches nothing, and an image built once
//! still rebuilds on this machine after its source stopped serving the file. A
//! download is written to a temporary file beside the cache entry, hashed as it
//! arrives, and renamed into place only when its size and digest are the ones asked
//! for. Nothing fetched is ever executed or unpacked here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Largest single input fetched (a `.deb`, an index).
pub const MAX_INPUT_BYTES: u64 = 2 << 30;
/// How long a connection may stay silent.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an input could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source answered, but not with the file.
    #[error("{input}: {url} answered {status}{hint}")]
    Status {
        /// What the input is.
        input: String,
        /// Where it was asked for.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What to do about it.
        hint: String,
    },
    /// The source could not be reached.
    #[error("{input}: fetching {url}: {reason}")]
    Transport {
        /// What the input is.
        input: String,
        /// Where it was asked for.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The bytes are not the pinned ones.
    #[error(
        "{input}: digest mismatch: the lock pins sha256:{expected}, {url} served sha256:{actual} ({size} bytes)"
    )]
    Digest {
        /// What the input is.
        input: String,
        /// Where it came from.
        url: String,
        /// Pinned.
        expected: String,
        /// Served.
        actual: String,
        /// Bytes served.
        size: u64,
    },
    /// The bytes are not the pinned size.
    #[error("{input}: {url} served {actual} bytes, the lock pins {expected}")]
    Size {
        /// What the input is.
        input: String,
        /// Where it came from.
        url: String,
        /// Pinned.
        expected: u64,
        /// Served (at least).
        actual: u64,
    },
    /// The cache could not be written.
    #[error("cache {path}: {source}")]
    Cache {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A digest that is not 64 lowercase hex digits.
    #[error("{input}: {digest:?} is not a sha256 digest")]
    BadDigest {
        /// What the input is.
        input: String,
        /// The value.
        digest: String,
    },
}

/// Is `s` 64 lowercase hex digits?
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The content-addressed cache.
#[derive(Debug, Clone)]
pub struct Cas {
    dir: PathBuf,
}

/// One input to have: where it comes from and what it must be.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    /// A label for messages (`python3.11 3.11.2-6+deb12u6`).
    pub input: &'a str,
    /// The URL.
    pub url: &'a str,
    /// sha256, lowercase hex.
    pub sha256: &'a str,
    /// Size in bytes, when pinned.
    pub size: Option<u64>,
}

impl Cas {
    /// The cache under the cache directory (`crate::image::store::cache_dir`):
    /// `cas/`.
    pub fn open_default() -> Result<Self, FetchError> {
        let root = crate::image::store::cache_dir().map_err(|e| FetchError::Cache {
            path: PathBuf::from("cas"),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self::at(&root.join("cas")))
    }

    /// The cache in `dir`.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the input of digest `hex` lives (whether or not it is there).
    pub fn path_of(&self, hex: &str) -> PathBuf {
        self.dir.join("sha256").join(hex)
    }

    /// Whether the input of digest `hex` is cached.
    pub fn has(&self, hex: &str) -> bool {
        self.path_of(hex).is_file()
    }

    /// The cached file for `wanted`, fetched first if it is not cached. `progress`
    /// is told the bytes as they arrive.
    pub fn get(&self, wanted: &Wanted<'_>, progress: &dyn Fn(u64)) -> Result<PathBuf, FetchError> {
        if !is_sha256_hex(wanted.sha256) {
            return Err(FetchError::BadDigest {
                input: wanted.input.to_owned(),
                digest: wanted.sha256.to_owned(),
            });
        }
        let path = self.path_of(wanted.sha256);
        if path.is_file() {
            return Ok(path);
        }
        let parent = self.dir.join("sha256");
        let cache_err = |path: &Path| {
            let path = path.to_owned();
            move |source| FetchError::Cache { path, source }
        };
        std::fs::create_dir_all(&parent).map_err(cache_err(&parent))?;
        let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), wanted.sha256));
        let result = download(wanted, &tmp, progress);
        match result {
            Ok(()) => std::fs::rename(&tmp, &path).map_err(cache_err(&path))?,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(path)
    }

    /// Stores `bytes` (already checked by the caller) under their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<(String, PathBuf), FetchError> {
        let hex = hex::encode(Sha256::digest(bytes));
        let path = self.path_of(&hex);
        if !path.is_file() {
            let parent = self.dir.join("sha256");
            std::fs::create_dir_all(&parent).map_err(|source| FetchError::Cache {
                path: parent.clone(),
                source,
            })?;
            let tmp = parent.join(format!(".tmp-{}-{hex}", std::process::id()));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|source| FetchError::Cache {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok((hex, path))
    }
}

/// GETs `url` into memory (an index, bounded by [`MAX_INPUT_BYTES`]); for files
/// whose digest is not known in advance (a signed `InRelease`).
pub fn get_bytes(input: &str, url: &str, max: u64) -> Result<Vec<u8>, FetchError> {
    let reader = open(input, url)?;
    let mut bytes = Vec::new();
    reader
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::Transport {
            input: input.to_owned(),
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > max {
        return Err(FetchError::Transport {
            input: input.to_owned(),
            url: url.to_owned(),
            reason: format!("larger than {max} bytes"),
        });
    }
    Ok(bytes)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(READ_TIMEOUT)
        .user_agent(concat!("mvm/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A reader of `url`'s body: `file://` reads a local file (a mirror on disk, as the
/// tests use), anything else is fetched over HTTP.
fn open(input: &str, url: &str) -> Result<Box<dyn Read + Send>, FetchError> {
    if let Some(path) = url.strip_prefix("file://") {
        return match std::fs::File::open(path) {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FetchError::Status {
                input: input.to_owned(),
                url: url.to_owned(),
                status: 404,
                hint: not_served_hint(),
            }),
            Err(e) => Err(FetchError::Transport {
                input: input.to_owned(),
                url: url.to_owned(),
                reason: e.to_string(),
            }),
        };
    }
    match agent().get(url).call() {
        Ok(response) => Ok(Box::new(response.into_reader())),
        Err(ureq::Error::Status(status, _)) => Err(FetchError::Status {
            input: input.to_owned(),
            url: url.to_owned(),
            status,
            hint: if status == 404 || status == 410 {
                not_served_hint()
            } else {
                String::new()
            },
        }),
        Err(e) => Err(FetchError::Transport {
            input: input.to_owned(),
            url: url.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn not_served_hint() -> String {
    ": the source no longer serves this pinned version (Debian keeps only the current \
     one); re-lock with `mvm image lock DIR` (docs/images.md: locks age)"
        .to_owned()
}

fn download(wanted: &Wanted<'_>, tmp: &Path, progress: &dyn Fn(u64)) -> Result<(), FetchError> {
    let mut reader = open(wanted.input, wanted.url)?;
    let mut file = std::fs::File::create(tmp).map_err(|source| FetchError::Cache {
        path: tmp.to_owned(),
        source,
    })?;
    let limit = wanted.size.unwrap_or(MAX_INPUT_BYTES);
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut buf).map_err(|e| FetchError::Transport {
            input: wanted.input.to_owned(),
            url: wanted.url.to_owned(),
            reason: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if total > limit {
            return Err(FetchError::Size {
                input: wanted.input.to_owned(),
                url: wanted.url.to_owned(),
                expected: limit,
                actual: total,
            });
        }
        hasher.update(chunk);
        file.write_all(chunk).map_err(|source| FetchError::Cache {
            path: tmp.to_owned(),
            source,
        })?;
        progress(u64::try_from(n).unwrap_or(0));
    }
    if let Some(expected) = wanted.size {
        if total != expected {
            return Err(FetchError::Size {
                input: wanted.input.to_owned(),
                url: wanted.url.to_owned(),
                expected,
                actual: total,
            });
        }
    }
    let actual = hex::encode(hasher.finalize());
    if actual != wanted.sha256 {
        return Err(FetchError::Digest {
            input: wanted.input.to_owned(),
            url: wanted.url.to_owned(),
            expected: wanted.sha256.to_owned(),
            actual,
            size: total,
        });
    }
    file.sync_all().map_err(|source| FetchError::Cache {
        path: tmp.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn fetches_once_and_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pkg.deb");
        std::fs::write(&src, b"package bytes").unwrap();
        let url = format!("file://{}", src.display());
        let cas = Cas::at(&dir.path().join("cas"));
        let digest = sha(b"package bytes");
        let wanted = Wanted {
            input: "pkg 1.0",
            url: &url,
            sha256: &digest,
            size: Some(13),
        };
        let path = cas.get(&wanted, &|_| {}).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"package bytes");
        // Cached: the source may go away.
        std::fs::remove_file(&src).unwrap();
        assert_eq!(cas.get(&wanted, &|_| {}).unwrap(), path);
    }

    #[test]
    fn a_wrong_digest_names_input_both_digests_and_source_and_caches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pkg.deb");
        std::fs::write(&src, b"evil bytes").unwrap();
        let url = format!("file://{}", src.display());
        let cas = Cas::at(&dir.path().join("cas"));
        let pinned = sha(b"good bytes");
        let err = cas
            .get(
                &Wanted {
                    input: "pkg 1.0",
                    url: &url,
                    sha256: &pinned,
                    size: None,
                },
                &|_| {},
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("pkg 1.0"), "{err}");
        assert!(err.contains(&pinned), "{err}");
        assert!(err.contains(&sha(b"evil bytes")), "{err}");
        assert!(err.contains(&url), "{err}");
        let left: Vec<_> = std::fs::read_dir(cas.dir().join("sha256"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "nothing cached: {left:?}");
    }

    #[test]
    fn a_missing_input_says_how_to_relock() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::at(dir.path());
        let url = format!("file://{}/gone.deb", dir.path().display());
        let digest = sha(b"x");
        let err = cas
            .get(
                &Wanted {
                    input: "gone 1.0",
                    url: &url,
                    sha256: &digest,
                    size: None,
                },
                &|_| {},
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gone 1.0") && err.contains("mvm image lock"),
            "{err}"
        );
    }

    #[test]
    fn oversized_is_refused_while_reading() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        std::fs::write(&src, vec![0u8; 100]).unwrap();
        let url = format!("file://{}", src.display());
        let digest = sha(&[0u8; 10]);
        let err = Cas::at(dir.path())
            .get(
                &Wanted {
                    input: "big",
                    url: &url,
                    sha256: &digest,
                    size: Some(10),
                },
                &|_| {},
            )
            .unwrap_err();
        assert!(matches!(err, FetchError::Size { .. }), "{err}");
    }
}
