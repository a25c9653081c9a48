//! Appending to the audit log under an exclusive `flock`, so writers in many
//! processes never interleave, skip or repeat a sequence number.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::UtcTime;
use nix::fcntl::{Flock, FlockArg};

use super::record::{AuditEvent, Record, MAX_RECORD_BYTES};
use super::AuditError;

/// The audit log of this host, written with the audit key.
#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    key: SigningKey,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The log at `path`, signed with `key` (the host's audit key).
    pub fn new(path: impl Into<PathBuf>, key: SigningKey) -> Self {
        Self {
            path: path.into(),
            key,
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
        move |source| AuditError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Appends `event` and returns its sequence number.
    pub fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        self.append_at(event, UtcTime::now())
    }

    /// Appends `event` with an explicit time (tests; replayed events).
    pub fn append_at(&self, event: AuditEvent, time: UtcTime) -> Result<u64, AuditError> {
        event.validate().map_err(AuditError::Event)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(self.io("create directory"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(self.io("open"))?;
        let mut locked = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| self.io("flock")(std::io::Error::from(errno)))?;
        let (last_seq, prev) = self.tail(&locked)?;
        let seq = last_seq
            .checked_add(1)
            .ok_or_else(|| AuditError::Event("sequence number overflow".to_owned()))?;
        let record = Record::sign(seq, time, event, prev, &self.key)
            .map_err(|e| AuditError::Event(e.to_string()))?;
        let mut line = record
            .to_line()
            .map_err(|e| AuditError::Event(e.to_string()))?;
        if line.len() > MAX_RECORD_BYTES {
            return Err(AuditError::Event(format!(
                "record is {} bytes; at most {MAX_RECORD_BYTES}",
                line.len()
            )));
        }
        line.push(b'\n');
        // One write of the whole line, O_APPEND, under the lock.
        locked.write_all(&line).map_err(self.io("write"))?;
        locked.sync_data().map_err(self.io("fsync"))?;
        Ok(seq)
        // The lock is released when `locked` is dropped.
    }

    /// The last record's seq and line hash, or (0, zero) for an empty log.
    fn tail(&self, file: &File) -> Result<(u64, Sha256Digest), AuditError> {
        let len = file.metadata().map_err(self.io("stat"))?.len();
        if len == 0 {
            return Ok((0, Sha256Digest::zero()));
        }
        let window = len.min(MAX_RECORD_BYTES as u64 + 1);
        let mut buf = vec![0u8; usize::try_from(window).unwrap_or(0)];
        file.read_exact_at(&mut buf, len - window)
            .map_err(self.io("read tail"))?;
        let Some((&b'\n', body)) = buf.split_last() else {
            return Err(AuditError::TornTail {
                path: self.path.clone(),
            });
        };
        let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if start == 0 && window < len {
            return Err(AuditError::TornTail {
                path: self.path.clone(),
            });
        }
        let line = body.get(start..).unwrap_or_default();
        let record: Record = serde_json::from_slice(line).map_err(|_| AuditError::TornTail {
            path: self.path.clone(),
        })?;
        Ok((record.seq, Sha256Digest::of(line)))
    }
}
