//! Host keys: the admission key that signs plans and the audit key that signs
//! audit records (and receipts). Both are ed25519, kept as one-line files
//! (format in [`mvm_loader::dsse`]) under the user's config directory:
//!
//! ```text
//! $MVM_CONFIG_DIR (default $XDG_CONFIG_HOME/mvm, else ~/.config/mvm)   mode 0700
//!   admission.key   admission.pub                                       0600 / 0644
//!   audit.key       audit.pub
//! ```
//!
//! Keys are created on first use. Creation is atomic (a temporary file
//! hard-linked into place), so two `mvm` processes starting at once agree on
//! one key. A secret key file readable by group or others is refused.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use mvm_loader::dsse::{self, KeyId};
use rand_core::{OsRng, RngCore};

/// A temporary name beside `path` that no other process or thread picks.
fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".tmp.{}.{:016x}",
        std::process::id(),
        OsRng.next_u64()
    ));
    PathBuf::from(name)
}

/// File name of the admission (plan-signing) secret key.
pub const ADMISSION_KEY: &str = "admission.key";
/// File name of the audit secret key.
pub const AUDIT_KEY: &str = "audit.key";

/// Errors about host keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No config directory can be derived from the environment.
    #[error("no config directory: set MVM_CONFIG_DIR, XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    /// I/O on a key file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A secret key file others can read.
    #[error("{} has mode {mode:o}: a secret key must not be readable by group or others (chmod 600)", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file that does not parse.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The user's config directory for mvm: `MVM_CONFIG_DIR`, else
/// `$XDG_CONFIG_HOME/mvm`, else `~/.config/mvm`.
pub fn config_dir() -> Result<PathBuf, KeyError> {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = from_env("MVM_CONFIG_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = from_env("XDG_CONFIG_HOME") {
        return Ok(dir.join("mvm"));
    }
    from_env("HOME")
        .map(|home| home.join(".config/mvm"))
        .ok_or(KeyError::NoConfigDir)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The host's two signing keys.
pub struct HostKeys {
    /// Signs plans.
    pub admission: SigningKey,
    /// Signs audit records and receipts.
    pub audit: SigningKey,
    dir: PathBuf,
}

impl std::fmt::Debug for HostKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secret material.
        f.debug_struct("HostKeys")
            .field("admission", &KeyId::of(&self.admission.verifying_key()))
            .field("audit", &KeyId::of(&self.audit.verifying_key()))
            .field("dir", &self.dir)
            .finish()
    }
}

/// One key as `mvm keys show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyInfo {
    /// "admission" or "audit".
    pub role: &'static str,
    /// The key id.
    pub keyid: KeyId,
    /// The public key file (`<role>.pub`), for `--trust`.
    pub public_key_file: PathBuf,
    /// The public key file's text.
    pub public_key_text: String,
}

impl HostKeys {
    /// Loads the keys in `dir`, creating whichever is missing. Returns the keys
    /// and whether any was created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), KeyError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let (admission, a_new) = load_or_create_key(&dir.join(ADMISSION_KEY))?;
        let (audit, b_new) = load_or_create_key(&dir.join(AUDIT_KEY))?;
        let keys = Self {
            admission,
            audit,
            dir: dir.to_owned(),
        };
        keys.write_public_keys()?;
        Ok((keys, a_new || b_new))
    }

    /// Loads existing keys from `dir` without creating anything.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        Ok(Self {
            admission: load_key(&dir.join(ADMISSION_KEY))?,
            audit: load_key(&dir.join(AUDIT_KEY))?,
            dir: dir.to_owned(),
        })
    }

    /// The keys in [`config_dir`], created on first use.
    pub fn open_default() -> Result<Self, KeyError> {
        Ok(Self::load_or_create(&config_dir()?)?.0)
    }

    /// The directory the keys live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Public halves, ids and `.pub` file paths, for `mvm keys show`.
    pub fn public(&self) -> Vec<PublicKeyInfo> {
        let info = |role: &'static str, key: VerifyingKey| PublicKeyInfo {
            role,
            keyid: KeyId::of(&key),
            public_key_file: self.dir.join(format!("{role}.pub")),
            public_key_text: dsse::format_public_key(&key),
        };
        vec![
            info("admission", self.admission.verifying_key()),
            info("audit", self.audit.verifying_key()),
        ]
    }

    fn write_public_keys(&self) -> Result<(), KeyError> {
        for info in self.public() {
            let current = fs::read_to_string(&info.public_key_file).ok();
            if current.as_deref() != Some(info.public_key_text.as_str()) {
                let tmp = temporary_beside(&info.public_key_file);
                fs::write(&tmp, &info.public_key_text).map_err(io(&tmp))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
                fs::rename(&tmp, &info.public_key_file).map_err(io(&info.public_key_file))?;
            }
        }
        Ok(())
    }
}

/// Reads a secret key file, refusing one that group or others can read.
pub fn load_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > 4096 {
        return Err(KeyError::Format {
            path: path.to_owned(),
            reason: "larger than a key file can be".to_owned(),
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    dsse::parse_secret_key(&text).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads a public key file (a `--trust` argument).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.len() > 4096 {
        return Err(KeyError::Format {
            path: path.to_owned(),
            reason: "larger than a key file can be".to_owned(),
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    dsse::parse_public_key(&text).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn load_or_create_key(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    match fs::symlink_metadata(path) {
        Ok(_) => return Ok((load_key(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let key = SigningKey::generate(&mut OsRng);
    let tmp = temporary_beside(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(dsse::format_secret_key(&key).as_bytes())?;
        f.sync_all()
    })();
    written.map_err(io(&tmp))?;
    // link() fails if the name exists: whoever links first wins, and everyone
    // else loads the winner's key.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((load_key(path)?, false)),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("mvm");
        let (keys, created) = HostKeys::load_or_create(&cfg).unwrap();
        assert!(created);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cfg), 0o700);
        assert_eq!(mode(&cfg.join(ADMISSION_KEY)), 0o600);
        assert_eq!(mode(&cfg.join(AUDIT_KEY)), 0o600);
        let (again, created) = HostKeys::load_or_create(&cfg).unwrap();
        assert!(!created);
        assert_eq!(again.admission.to_bytes(), keys.admission.to_bytes());
        assert_ne!(keys.admission.to_bytes(), keys.audit.to_bytes());
        // The .pub files hold the public halves.
        let public = load_public_key(&cfg.join("admission.pub")).unwrap();
        assert_eq!(public, keys.admission.verifying_key());
        let shown = keys.public();
        assert_eq!(shown[0].keyid, KeyId::of(&keys.admission.verifying_key()));
        assert!(!format!("{keys:?}").contains(&hex::encode(keys.audit.to_bytes())));
    }

    #[test]
    fn readable_secret_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        HostKeys::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(AUDIT_KEY);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = HostKeys::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn concurrent_first_use_agrees_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    HostKeys::load_or_create(&cfg)
                        .unwrap()
                        .0
                        .admission
                        .to_bytes()
                })
            })
            .collect();
        let keys: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
    }
}
