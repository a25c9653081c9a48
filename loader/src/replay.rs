//! The nonce replay store: a plan boots at most once per host.
//!
//! A text file of `<nonce hex> <not_after unix seconds>` lines. Every check
//! takes an exclusive `flock` on a lock file beside it (`<store>.lock`), reads
//! the store, forgets nonces whose plan has expired (plus the clock skew, so a
//! plan cannot be replayed while its window is still open anywhere), refuses a
//! nonce it still holds, and otherwise writes the new set to a temporary file
//! that is fsynced and renamed over the store. So the store survives restarts
//! and crashes (it is the old set or the new set, never half of one), and two
//! VMMs racing with the same plan cannot both win.
//!
//! A store that does not parse refuses every boot (fail closed) with the line
//! at fault: it is host state, and a corrupt one must be looked at.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::plan::UtcTime;

/// Most live nonces the store holds; past this it refuses new plans rather
/// than grow without bound (plans live at most a day).
pub const MAX_LIVE_NONCES: usize = 1_000_000;
/// Longest nonce accepted, in hex characters.
const MAX_NONCE_HEX: usize = 128;

/// Errors from the replay store.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The nonce was already used on this host.
    #[error("plan nonce {nonce} was already used on this host (replay refused); it is remembered until {until}")]
    Replayed {
        /// The nonce.
        nonce: String,
        /// When the store will forget it.
        until: UtcTime,
    },
    /// The nonce is not lowercase hex of a sane length.
    #[error("plan nonce {0:?} is not 1..=128 lowercase hex characters")]
    BadNonce(String),
    /// The store file is corrupt.
    #[error("replay store {}: line {line} is not \"<nonce> <unix time>\"; refusing all boots until it is repaired", path.display())]
    Corrupt {
        /// The store.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// Too many live nonces.
    #[error("replay store {} holds {live} live nonces, the limit; refusing new plans", path.display())]
    Full {
        /// The store.
        path: PathBuf,
        /// Live nonces held.
        live: usize,
    },
    /// I/O on the store or its lock.
    #[error("replay store {}: {what}: {source}", path.display())]
    Io {
        /// The store.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A replay store at a path.
#[derive(Debug, Clone)]
pub struct ReplayStore {
    path: PathBuf,
    skew: Duration,
}

/// An exclusive flock held until dropped (closing the fd releases it).
struct LockGuard {
    _file: File,
}

impl ReplayStore {
    /// A store at `path` (created on first use). `skew` is the clock skew the
    /// window check allows; nonces are kept that much past `not_after`.
    pub fn new(path: impl Into<PathBuf>, skew: Duration) -> Self {
        Self {
            path: path.into(),
            skew,
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
        move |source| ReplayError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn lock(&self) -> Result<LockGuard, ReplayError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(self.io("open lock file"))?;
        loop {
            // SAFETY: flock on a file descriptor this function owns; it takes
            // no pointers and cannot affect memory safety.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(self.io("flock")(err));
            }
        }
        Ok(LockGuard { _file: file })
    }

    fn load(&self) -> Result<BTreeMap<String, i64>, ReplayError> {
        let mut text = String::new();
        match File::open(&self.path) {
            Ok(f) => {
                // The store is bounded by MAX_LIVE_NONCES lines of bounded length.
                let limit = (MAX_LIVE_NONCES as u64 + 1) * (MAX_NONCE_HEX as u64 + 24);
                f.take(limit)
                    .read_to_string(&mut text)
                    .map_err(self.io("read"))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("open")(e)),
        }
        let mut set = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let corrupt = || ReplayError::Corrupt {
                path: self.path.clone(),
                line: n + 1,
            };
            let (nonce, until) = line.split_once(' ').ok_or_else(corrupt)?;
            check_nonce(nonce).map_err(|_| corrupt())?;
            let until: i64 = until.parse().map_err(|_| corrupt())?;
            set.insert(nonce.to_owned(), until);
        }
        Ok(set)
    }

    fn store(&self, set: &BTreeMap<String, i64>) -> Result<(), ReplayError> {
        let mut tmp_path = self.path.clone().into_os_string();
        tmp_path.push(".tmp");
        let tmp_path = PathBuf::from(tmp_path);
        let mut text = String::with_capacity(set.len() * 48);
        for (nonce, until) in set {
            text.push_str(nonce);
            text.push(' ');
            text.push_str(&until.to_string());
            text.push('\n');
        }
        let mut tmp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(self.io("create temporary file"))?;
        tmp.write_all(text.as_bytes()).map_err(self.io("write"))?;
        tmp.sync_all().map_err(self.io("fsync"))?;
        fs::rename(&tmp_path, &self.path).map_err(self.io("rename"))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io("fsync directory"))?;
        }
        Ok(())
    }

    /// Records `nonce` (valid until `not_after`) if it is new; refuses it if it
    /// was seen before and has not been forgotten. Expired nonces are dropped.
    pub fn check_and_record(
        &self,
        nonce: &str,
        not_after: UtcTime,
        now: UtcTime,
    ) -> Result<(), ReplayError> {
        check_nonce(nonce)?;
        let _guard = self.lock()?;
        let mut set = self.load()?;
        let skew = i64::try_from(self.skew.as_secs()).unwrap_or(i64::MAX);
        set.retain(|_, until| until.saturating_add(skew) >= now.unix());
        if let Some(&until) = set.get(nonce) {
            return Err(ReplayError::Replayed {
                nonce: nonce.to_owned(),
                until: UtcTime::from_unix(until.saturating_add(skew)).unwrap_or(not_after),
            });
        }
        if set.len() >= MAX_LIVE_NONCES {
            return Err(ReplayError::Full {
                path: self.path.clone(),
                live: set.len(),
            });
        }
        set.insert(nonce.to_owned(), not_after.unix());
        self.store(&set)
    }
}

fn check_nonce(nonce: &str) -> Result<(), ReplayError> {
    let ok = !nonce.is_empty()
        && nonce.len() <= MAX_NONCE_HEX
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ReplayError::BadNonce(nonce.chars().take(140).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn t(unix: i64) -> UtcTime {
        UtcTime::from_unix(unix).unwrap()
    }

    #[test]
    fn a_nonce_is_accepted_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nonces");
        let store = ReplayStore::new(&path, Duration::from_secs(60));
        store.check_and_record("aa01", t(2000), t(1000)).unwrap();
        let err = store
            .check_and_record("aa01", t(2000), t(1001))
            .unwrap_err();
        assert!(matches!(err, ReplayError::Replayed { .. }), "{err}");
        // A new store object (a restarted VMM) still remembers.
        let again = ReplayStore::new(&path, Duration::from_secs(60));
        assert!(matches!(
            again.check_and_record("aa01", t(2000), t(1500)),
            Err(ReplayError::Replayed { .. })
        ));
        again.check_and_record("bb02", t(2000), t(1500)).unwrap();
    }

    #[test]
    fn expired_nonces_are_forgotten_after_the_skew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nonces");
        let store = ReplayStore::new(&path, Duration::from_secs(60));
        store.check_and_record("aa01", t(2000), t(1000)).unwrap();
        store.check_and_record("bb02", t(5000), t(1000)).unwrap();
        // Still inside not_after + skew: remembered.
        assert!(store.check_and_record("aa01", t(2000), t(2060)).is_err());
        // Past it: forgotten, and pruned from the file.
        store.check_and_record("cc03", t(5000), t(2061)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("aa01"), "{text}");
        assert!(text.contains("bb02") && text.contains("cc03"), "{text}");
    }

    #[test]
    fn corrupt_store_refuses_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nonces");
        fs::write(&path, "aa01 100\ngarbage\n").unwrap();
        let store = ReplayStore::new(&path, Duration::from_secs(60));
        let err = store.check_and_record("bb02", t(200), t(100)).unwrap_err();
        assert!(matches!(err, ReplayError::Corrupt { line: 2, .. }), "{err}");
        assert!(matches!(
            store.check_and_record("XX", t(200), t(100)),
            Err(ReplayError::BadNonce(_))
        ));
    }

    #[test]
    fn racing_checks_of_one_nonce_let_exactly_one_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nonces");
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let path = path.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    // Separate store objects and lock fds, as separate VMMs have.
                    let store = ReplayStore::new(path, Duration::from_secs(60));
                    barrier.wait();
                    let same = store.check_and_record("dead", t(9000), t(1000)).is_ok();
                    let own = store
                        .check_and_record(&format!("{i:04x}"), t(9000), t(1000))
                        .is_ok();
                    (same, own)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|(same, _)| *same).count(), 1);
        assert!(results.iter().all(|(_, own)| *own));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), threads + 1, "{text}");
    }
}
