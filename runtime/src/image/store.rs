//! The content-addressed image store under the user's data directory:
//!
//! ```text
//! $MVM_DATA_DIR (default $XDG_DATA_HOME/mvm, else ~/.local/share/mvm)
//!   images/<hex>/manifest.json, vmlinux, initramfs.cpio
//!   images/names/<name>      "sha256:<hex>\n": which image a name points to
//! ```
//!
//! `<hex>` is the sha256 of the manifest bytes; the manifest holds the digest
//! of every artifact, so the directory name covers the whole image.
//!
//! A reference the user's store does not have is looked up, read-only, in the
//! machine's shared store ([`system_dir`]`/images`, laid out the same way), where
//! `scripts/setup` publishes the images it builds for every user of the machine.
//! Writes (`put`, `name`, `gc`) only ever touch the user's own store.

use std::path::{Path, PathBuf};

use super::build::BuiltImage;
use super::manifest::{sha256_digest, Artifact, Manifest, MANIFEST_FILE};
use super::ImageError;

/// The name `mvm image build` gives the image it builds, and `mvm run` uses.
pub const DEFAULT_IMAGE: &str = "default";
/// The shortest digest prefix accepted as a reference.
const MIN_PREFIX: usize = 12;
/// The longest image name accepted.
const MAX_NAME: usize = 64;

/// The cache directory (derived, rebuildable files): `$MVM_CACHE`, else
/// `$XDG_CACHE_HOME/mvm`, else `~/.cache/mvm`, as `scripts/lib/cache.sh` has it.
pub fn cache_dir() -> Result<PathBuf, ImageError> {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from_env("MVM_CACHE")
        .or_else(|| from_env("XDG_CACHE_HOME").map(|d| d.join("mvm")))
        .or_else(|| from_env("HOME").map(|h| h.join(".cache/mvm")))
        .ok_or(ImageError::NoCacheDir)
}

/// The data directory: `$MVM_DATA_DIR`, else `$XDG_DATA_HOME/mvm`, else
/// `~/.local/share/mvm`.
pub fn data_dir() -> Result<PathBuf, ImageError> {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = from_env("MVM_DATA_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = from_env("XDG_DATA_HOME") {
        return Ok(dir.join("mvm"));
    }
    from_env("HOME")
        .map(|home| home.join(".local/share/mvm"))
        .ok_or(ImageError::NoDataDir)
}

/// Where `scripts/setup` (as root) publishes what every user of the machine may run:
/// `bin/` (`mvm`, `mvm-vmm`, `mvm-agent`), `images/` (a store, read-only to users) and
/// `testhost/`.
pub const SYSTEM_DIR: &str = "/usr/local/lib/mvm";

/// The machine's shared directory: `$MVM_SYSTEM_DIR`, else [`SYSTEM_DIR`]; `None` when
/// it does not exist.
pub fn system_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MVM_SYSTEM_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(SYSTEM_DIR), PathBuf::from);
    dir.is_dir().then_some(dir)
}

/// Checks an image name: 1..=64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// An image as it lies in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The image digest, `sha256:<hex>`.
    pub digest: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl StoredImage {
    /// Opens an image directory outside any store (e.g. one carried into
    /// the test host); its digest is computed from its manifest.
    pub fn open_dir(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let manifest = Manifest::from_bytes(&bytes).map_err(|e| ImageError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        check_artifact(&manifest.kernel)?;
        check_artifact(&manifest.initramfs)?;
        Ok(Self {
            digest: sha256_digest(&bytes),
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// The kernel's path.
    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.file)
    }

    /// The initramfs's path.
    pub fn initramfs_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs.file)
    }

    /// Re-measures both artifacts against the manifest.
    pub fn verify(&self) -> Result<(), ImageError> {
        for artifact in [&self.manifest.kernel, &self.manifest.initramfs] {
            let path = self.dir.join(&artifact.file);
            let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
                path: path.clone(),
                source,
            })?;
            let measured = sha256_digest(&bytes);
            if measured != artifact.sha256 {
                return Err(ImageError::DigestMismatch {
                    file: path,
                    manifest: artifact.sha256.clone(),
                    measured,
                });
            }
        }
        Ok(())
    }
}

/// The store rooted at a data directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    images: PathBuf,
    /// The machine's shared store, looked in (read-only) for what this one lacks.
    shared: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// An artifact file name must be a plain name inside the image directory.
fn check_artifact(artifact: &Artifact) -> Result<(), ImageError> {
    let plain = !artifact.file.is_empty()
        && !artifact.file.starts_with('.')
        && !artifact.file.contains('/');
    if plain {
        Ok(())
    } else {
        Err(ImageError::BadManifest {
            path: PathBuf::from(&artifact.file),
            reason: "artifact file name must be a plain file name".into(),
        })
    }
}

impl ImageStore {
    /// The store under [`data_dir`], with the machine's shared store ([`system_dir`])
    /// behind it for lookups.
    pub fn open_default() -> Result<Self, ImageError> {
        let mut store = Self::at(&data_dir()?);
        store.shared = system_dir()
            .map(|d| d.join("images"))
            .filter(|shared| shared.is_dir() && *shared != store.images);
        Ok(store)
    }

    /// The store under `data_dir` alone.
    pub fn at(data_dir: &Path) -> Self {
        Self {
            images: data_dir.join("images"),
            shared: None,
        }
    }

    /// The machine's shared store behind this one, alone, if there is one.
    pub fn shared_store(&self) -> Option<Self> {
        self.shared.as_ref().map(|images| Self {
            images: images.clone(),
            shared: None,
        })
    }

    /// The store `image` lies in (its directory's parent), alone: where its names are.
    pub fn holding(image: &StoredImage) -> Option<Self> {
        image.dir.parent().map(|images| Self {
            images: images.to_owned(),
            shared: None,
        })
    }

    fn names_dir(&self) -> PathBuf {
        self.images.join("names")
    }

    /// Stores `image` (a no-op for its files if the digest is already there)
    /// and points `name` at it.
    pub fn put(&self, name: &str, image: &BuiltImage) -> Result<StoredImage, ImageError> {
        self.store(name, &image.manifest, |tmp| {
            let files: [(&str, &[u8]); 2] = [
                (&image.manifest.kernel.file, &image.kernel),
                (&image.manifest.initramfs.file, &image.initramfs),
            ];
            for (file, bytes) in files {
                let path = tmp.join(file);
                std::fs::write(&path, bytes).map_err(io(&path))?;
            }
            Ok(())
        })
    }

    /// Stores an image given as its manifest and files (`(name in the image
    /// directory, source path)`; each source is hard-linked, else copied), and
    /// points `name` at it. Used for images with a root filesystem, whose files are
    /// too large to hold in memory.
    pub fn put_files(
        &self,
        name: &str,
        manifest: &Manifest,
        files: &[(&str, &Path)],
    ) -> Result<StoredImage, ImageError> {
        self.store(name, manifest, |tmp| {
            files.iter().try_for_each(|(file, src)| {
                let dst = tmp.join(file);
                if std::fs::hard_link(src, &dst).is_err() {
                    std::fs::copy(src, &dst).map_err(io(&dst))?;
                }
                Ok(())
            })
        })
    }

    /// Stores the image of `manifest` (`fill` puts its files into a temporary
    /// directory, moved into place whole with the manifest; a no-op if the digest
    /// is already stored) and points `name` at it.
    fn store(
        &self,
        name: &str,
        manifest: &Manifest,
        fill: impl FnOnce(&Path) -> Result<(), ImageError>,
    ) -> Result<StoredImage, ImageError> {
        check_name(name)?;
        let manifest_bytes = manifest.to_bytes().map_err(|e| ImageError::BadManifest {
            path: PathBuf::from(MANIFEST_FILE),
            reason: e.to_string(),
        })?;
        let digest = sha256_digest(&manifest_bytes);
        let hex = digest.trim_start_matches("sha256:");
        let dir = self.images.join(hex);
        if !dir.join(MANIFEST_FILE).is_file() {
            std::fs::create_dir_all(&self.images).map_err(io(&self.images))?;
            let tmp = self
                .images
                .join(format!(".tmp-{}-{hex}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
            let written = fill(&tmp).and_then(|()| {
                let path = tmp.join(MANIFEST_FILE);
                std::fs::write(&path, &manifest_bytes).map_err(io(&path))
            });
            if let Err(e) = written {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            match std::fs::rename(&tmp, &dir) {
                Ok(()) => {}
                // Someone else stored the same content meanwhile: keep theirs.
                Err(_) if dir.join(MANIFEST_FILE).is_file() => {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                Err(source) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(ImageError::Io { path: dir, source });
                }
            }
        }
        self.name_digest(name, &digest)?;
        self.load(hex)
    }

    fn name_digest(&self, name: &str, digest: &str) -> Result<(), ImageError> {
        check_name(name)?;
        let names = self.names_dir();
        std::fs::create_dir_all(&names).map_err(io(&names))?;
        write_atomic(&names.join(name), format!("{digest}\n").as_bytes())
    }

    /// Points `name` at a stored image.
    pub fn name(&self, name: &str, image: &StoredImage) -> Result<(), ImageError> {
        self.name_digest(name, &image.digest)
    }

    /// Removes the name `name`; the image it pointed at goes too when no other name
    /// points at it (returns its digest then).
    pub fn remove_name(&self, name: &str) -> Result<Option<String>, ImageError> {
        check_name(name)?;
        let names = self.names()?;
        let digest = names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| ImageError::NotFound {
                reference: name.to_owned(),
                store: self.images.clone(),
            })?;
        let path = self.names_dir().join(name);
        std::fs::remove_file(&path).map_err(io(&path))?;
        if names.iter().any(|(n, d)| n != name && *d == digest) {
            return Ok(None);
        }
        let dir = self.images.join(digest.trim_start_matches("sha256:"));
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        Ok(Some(digest))
    }

    /// Removes every image no name points at (and leftovers of interrupted
    /// stores); returns their digests.
    pub fn gc(&self) -> Result<Vec<String>, ImageError> {
        let named: std::collections::BTreeSet<String> =
            self.names()?.into_iter().map(|(_, d)| d).collect();
        let mut removed = Vec::new();
        for hex in self.digests()? {
            let digest = format!("sha256:{hex}");
            if !named.contains(&digest) {
                let dir = self.images.join(&hex);
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
                removed.push(digest);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.images) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(removed)
    }

    /// Loads the image whose directory is `images/<hex>`; checks that the
    /// manifest's bytes still hash to the directory name.
    fn load(&self, hex: &str) -> Result<StoredImage, ImageError> {
        let image = StoredImage::open_dir(&self.images.join(hex))?;
        if image.digest.trim_start_matches("sha256:") != hex {
            return Err(ImageError::DigestMismatch {
                file: image.dir.join(MANIFEST_FILE),
                manifest: format!("sha256:{hex}"),
                measured: image.digest,
            });
        }
        Ok(image)
    }

    /// The digests (hex) of every stored image, sorted.
    fn digests(&self) -> Result<Vec<String>, ImageError> {
        let entries = match std::fs::read_dir(&self.images) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ImageError::Io {
                    path: self.images.clone(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.images))?;
            if let Some(name) = entry.file_name().to_str() {
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The names pointing at each digest: `(name, "sha256:<hex>")`, sorted.
    pub fn names(&self) -> Result<Vec<(String, String)>, ImageError> {
        let dir = self.names_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(ImageError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_name(&name).is_err() {
                continue;
            }
            let path = entry.path();
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            out.push((name, text.trim().to_owned()));
        }
        out.sort();
        Ok(out)
    }

    /// Every stored image with the names that point at it.
    pub fn list(&self) -> Result<Vec<(StoredImage, Vec<String>)>, ImageError> {
        let names = self.names()?;
        let mut out = Vec::new();
        for hex in self.digests()? {
            // One image this version cannot read (damaged, or written by a newer mvm
            // with fields this one does not know) must not hide every other image.
            let image = match self.load(&hex) {
                Ok(image) => image,
                Err(e) => {
                    tracing::warn!("image sha256:{hex} skipped: {e}");
                    continue;
                }
            };
            let pointing = names
                .iter()
                .filter(|(_, d)| *d == image.digest)
                .map(|(n, _)| n.clone())
                .collect();
            out.push((image, pointing));
        }
        Ok(out)
    }

    /// Finds an image by name, by `sha256:<hex>`, or by a hex prefix of at
    /// least 12 digits: in this store, else in the machine's shared one.
    pub fn resolve(&self, reference: &str) -> Result<StoredImage, ImageError> {
        let here = self.resolve_here(reference);
        match (&here, self.shared_store()) {
            // Not found in either: the error names the user's own store.
            (Err(ImageError::NotFound { .. }), Some(shared)) => {
                match shared.resolve_here(reference) {
                    Err(ImageError::NotFound { .. }) => here,
                    found => found,
                }
            }
            _ => here,
        }
    }

    fn resolve_here(&self, reference: &str) -> Result<StoredImage, ImageError> {
        let hex = reference.trim_start_matches("sha256:");
        let looks_hex = hex.len() >= MIN_PREFIX && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if check_name(reference).is_ok() {
            let path = self.names_dir().join(reference);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let digest = text.trim();
                let hex = digest.trim_start_matches("sha256:");
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ImageError::BadManifest {
                        path,
                        reason: format!("name points at {digest:?}, not a sha256 digest"),
                    });
                }
                return self.load(hex);
            }
        }
        if looks_hex {
            let lower = hex.to_ascii_lowercase();
            let matches: Vec<String> = self
                .digests()?
                .into_iter()
                .filter(|d| d.starts_with(&lower))
                .collect();
            match matches.as_slice() {
                [one] => return self.load(one),
                [] => {}
                _ => return Err(ImageError::Ambiguous(reference.to_owned())),
            }
        }
        Err(ImageError::NotFound {
            reference: reference.to_owned(),
            store: self.images.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::build::{build, tests::fake_inputs};

    /// A user's store without an image finds it in the machine's shared store, read-only;
    /// the user's own image of the same name wins; a name in neither is not found.
    #[test]
    fn the_shared_store_answers_what_the_users_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path());
        let system = dir.path().join("system");
        let shared = ImageStore::at(&system);
        let image = build(&inputs).unwrap();
        let published = shared.put(DEFAULT_IMAGE, &image).unwrap();
        let mut user = ImageStore::at(&dir.path().join("user"));
        assert!(matches!(
            user.resolve(DEFAULT_IMAGE),
            Err(ImageError::NotFound { .. })
        ));
        user.shared = Some(system.join("images"));
        let found = user.resolve(DEFAULT_IMAGE).unwrap();
        assert_eq!(found.dir, published.dir);
        let names = ImageStore::holding(&found).unwrap().names().unwrap();
        assert_eq!(names, [(DEFAULT_IMAGE.to_owned(), found.digest.clone())]);
        assert!(user.resolve(&found.digest).is_ok());
        match user.resolve("nope") {
            Err(ImageError::NotFound { store, .. }) => {
                assert_eq!(store, dir.path().join("user/images"));
            }
            other => panic!("{other:?}"),
        }
        // Nothing was written to the user's store by the lookups.
        assert!(!dir.path().join("user").exists());
        let own = user.put(DEFAULT_IMAGE, &image).unwrap();
        assert_eq!(user.resolve(DEFAULT_IMAGE).unwrap().dir, own.dir);
    }

    #[test]
    fn put_then_resolve_by_name_digest_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path());
        let store = ImageStore::at(&dir.path().join("data"));
        let image = build(&inputs).unwrap();
        let stored = store.put(DEFAULT_IMAGE, &image).unwrap();
        stored.verify().unwrap();
        assert_eq!(store.resolve("default").unwrap().digest, stored.digest);
        assert_eq!(store.resolve(&stored.digest).unwrap().dir, stored.dir);
        let prefix = &stored.digest["sha256:".len().."sha256:".len() + 12];
        assert_eq!(store.resolve(prefix).unwrap().digest, stored.digest);
        assert!(matches!(
            store.resolve("nosuch"),
            Err(ImageError::NotFound { .. })
        ));
        // Storing the same image again is idempotent.
        let again = store.put(DEFAULT_IMAGE, &image).unwrap();
        assert_eq!(again.digest, stored.digest);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1, vec!["default".to_owned()]);
        // No temporary directories are left behind.
        let leftovers = std::fs::read_dir(dir.path().join("data/images"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path());
        let store = ImageStore::at(&dir.path().join("data"));
        let stored = store.put("t", &build(&inputs).unwrap()).unwrap();
        std::fs::write(stored.kernel_path(), b"\x7fELF tampered").unwrap();
        let err = stored.verify().unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        let manifest = stored.dir.join(MANIFEST_FILE);
        let mut bytes = std::fs::read(&manifest).unwrap();
        bytes.push(b' ');
        std::fs::write(&manifest, bytes).unwrap();
        assert!(matches!(
            store.resolve("t"),
            Err(ImageError::DigestMismatch { .. })
        ));
        // An image that cannot be read does not hide the others from the list.
        let mut other = fake_inputs(dir.path());
        other.cmdline = Some("console=ttyS0 other".into());
        let good = store.put("good", &build(&other).unwrap()).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0.digest, good.digest);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("default").is_ok());
        assert!(check_name("a.b-c_1").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
