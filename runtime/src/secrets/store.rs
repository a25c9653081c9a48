//! The host's secret store: one file per secret under `$MVM_CONFIG_DIR/secrets`
//! (default `~/.config/mvm/secrets`), the directory mode 0700 and each file mode 0600.
//!
//! A value goes in from stdin (`mvm secret set NAME`), never from the command line, where
//! `ps` and shell history would see it. A file that group or others can read, a symlink,
//! or anything but a regular file is refused, as the host keys are.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::check_secret_name;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use super::{Secret, SecretValue, MAX_VALUE_BYTES};

/// Why the store could not do what was asked. Never carries a value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name is not a secret name.
    #[error("{reason}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No secret of that name.
    #[error("secret {name:?} is not in the store {dir} (add it with: mvm secret set {name})")]
    NotFound {
        /// The name.
        name: String,
        /// The store's directory.
        dir: PathBuf,
    },
    /// A value over [`MAX_VALUE_BYTES`], or empty.
    #[error("secret {name:?}: {reason}")]
    BadValue {
        /// The name.
        name: String,
        /// What is wrong (the size, never the bytes).
        reason: String,
    },
    /// A store file others may read, or not a regular file.
    #[error("{}: {reason}", path.display())]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No config directory.
    #[error("no config directory: set MVM_CONFIG_DIR, XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    /// Reading or writing the store.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One stored secret as `mvm secret ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredSecret {
    /// Its name.
    pub name: String,
    /// sha256 of its value.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The store in one directory.
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    /// The user's store: `secrets/` in the config directory (`MVM_CONFIG_DIR`, else
    /// `$XDG_CONFIG_HOME/mvm`, else `~/.config/mvm`).
    pub fn open() -> Result<Self, StoreError> {
        let config = crate::admission::keys::config_dir().map_err(|_| StoreError::NoConfigDir)?;
        Ok(Self::at(&config))
    }

    /// The store under the config directory `config`.
    pub fn at(config: &Path) -> Self {
        Self {
            dir: config.join("secrets"),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_secret_name(name).map_err(|reason| StoreError::BadName {
            name: name.to_owned(),
            reason,
        })?;
        Ok(self.dir.join(name))
    }

    /// Stores `value` as `name`, replacing an older value atomically.
    pub fn set(&self, name: &str, value: &SecretValue) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        if value.is_empty() || value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::BadValue {
                name: name.to_owned(),
                reason: format!(
                    "{} bytes; a value has 1 to {MAX_VALUE_BYTES} bytes",
                    value.len()
                ),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        self.check_dir()?;
        let mut nonce = [0u8; 8];
        OsRng.fill_bytes(&mut nonce);
        let tmp = self.dir.join(format!(".{name}.{}", hex::encode(nonce)));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(value.expose())?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(&path)(e)
        })
    }

    /// The secret `name`, read from its file.
    pub fn get(&self, name: &str) -> Result<Secret, StoreError> {
        let path = self.path_of(name)?;
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                    dir: self.dir.clone(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StoreError::Unsafe {
                    path,
                    reason: "a symlink; a secret is a regular file".into(),
                })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let meta = file.metadata().map_err(io(&path))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_file() {
            return Err(StoreError::Unsafe {
                path,
                reason: "not a regular file".into(),
            });
        }
        if mode & 0o077 != 0 {
            return Err(StoreError::Unsafe {
                path,
                reason: format!(
                    "mode {mode:o}: a secret must not be readable by group or others (chmod 600)"
                ),
            });
        }
        let limit = u64::try_from(MAX_VALUE_BYTES).unwrap_or(u64::MAX);
        let mut bytes = Zeroizing::new(Vec::new());
        (&mut file)
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io(&path))?;
        if bytes.is_empty() || bytes.len() > MAX_VALUE_BYTES {
            return Err(StoreError::BadValue {
                name: name.to_owned(),
                reason: format!("the stored value is empty or over {MAX_VALUE_BYTES} bytes"),
            });
        }
        Ok(Secret {
            name: name.to_owned(),
            value: SecretValue::new(bytes.to_vec()),
            delivery: super::Delivery::File,
        })
    }

    /// Every stored secret, by name.
    pub fn list(&self) -> Result<Vec<StoredSecret>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporaries of an interrupted `set`, and strangers, are not secrets.
            if check_secret_name(&name).is_err() || name.starts_with('.') {
                continue;
            }
            let secret = self.get(&name)?;
            out.push(StoredSecret {
                sha256: secret.value.digest(),
                bytes: u64::try_from(secret.value.len()).unwrap_or(u64::MAX),
                name,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes `name`; a name that is not there is [`StoreError::NotFound`].
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
            }),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn check_dir(&self) -> Result<(), StoreError> {
        let meta = fs::symlink_metadata(&self.dir).map_err(io(&self.dir))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_dir() || mode & 0o077 != 0 {
            return Err(StoreError::Unsafe {
                path: self.dir.clone(),
                reason: format!(
                    "the secret store must be a directory only its owner can enter (mode {mode:o}; chmod 700)"
                ),
            });
        }
        Ok(())
    }
}

/// A value as typed or piped into `mvm secret set`: one trailing newline (`\n` or `\r\n`),
/// which `echo` and a terminal add, is not part of it unless `raw`.
pub fn value_from_input(mut bytes: Vec<u8>, raw: bool) -> SecretValue {
    if !raw && bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    let value = SecretValue::new(bytes.clone());
    zeroize::Zeroize::zeroize(&mut bytes);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SecretStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::at(dir.path());
        (dir, store)
    }

    #[test]
    fn set_get_list_remove() {
        let (_d, store) = store();
        assert!(store.list().unwrap().is_empty());
        store
            .set("TOKEN", &SecretValue::new(b"s3cr3t".to_vec()))
            .unwrap();
        let mode = fs::metadata(store.dir().join("TOKEN"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = fs::metadata(store.dir()).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert_eq!(store.get("TOKEN").unwrap().value.expose(), b"s3cr3t");
        store
            .set("TOKEN", &SecretValue::new(b"newer".to_vec()))
            .unwrap();
        assert_eq!(store.get("TOKEN").unwrap().value.expose(), b"newer");
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].sha256, Sha256Digest::of(b"newer"));
        assert_eq!(listed[0].bytes, 5);
        store.remove("TOKEN").unwrap();
        assert!(matches!(
            store.get("TOKEN"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.remove("TOKEN"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn a_missing_secret_names_the_command_that_adds_it() {
        let (_d, store) = store();
        let e = store.get("API_KEY").unwrap_err().to_string();
        assert!(e.contains("mvm secret set API_KEY"), "{e}");
    }

    #[test]
    fn bad_names_values_and_files_are_refused_without_printing_a_value() {
        let (_d, store) = store();
        for name in ["../x", "a/b", "", "a b"] {
            assert!(matches!(
                store.set(name, &SecretValue::new(b"v".to_vec())),
                Err(StoreError::BadName { .. })
            ));
        }
        let big = SecretValue::new(vec![b'x'; MAX_VALUE_BYTES + 1]);
        let e = store.set("BIG", &big).unwrap_err().to_string();
        assert!(e.contains("16385 bytes") && !e.contains("xxxx"), "{e}");
        assert!(store.set("EMPTY", &SecretValue::new(Vec::new())).is_err());

        store
            .set("OPEN", &SecretValue::new(b"visible".to_vec()))
            .unwrap();
        let path = store.dir().join("OPEN");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = store.get("OPEN").unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("visible"), "{e}");

        std::os::unix::fs::symlink("/etc/hostname", store.dir().join("LINK")).unwrap();
        assert!(matches!(store.get("LINK"), Err(StoreError::Unsafe { .. })));
    }

    #[test]
    fn a_store_directory_others_can_enter_is_refused() {
        let (_d, store) = store();
        store.set("A", &SecretValue::new(b"1".to_vec())).unwrap();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            store.set("B", &SecretValue::new(b"2".to_vec())),
            Err(StoreError::Unsafe { .. })
        ));
    }

    #[test]
    fn one_trailing_newline_is_dropped_unless_raw() {
        assert_eq!(value_from_input(b"tok\n".to_vec(), false).expose(), b"tok");
        assert_eq!(
            value_from_input(b"tok\r\n".to_vec(), false).expose(),
            b"tok"
        );
        assert_eq!(
            value_from_input(b"tok\n\n".to_vec(), false).expose(),
            b"tok\n"
        );
        assert_eq!(value_from_input(b"tok\n".to_vec(), true).expose(), b"tok\n");
    }
}
