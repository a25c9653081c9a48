//! The host's audit log: JSON lines, one record per event, each carrying the
//! hash of the record before it and an ed25519 signature by the audit key.
//!
//! The log lives at `$MVM_DATA_DIR/audit.jsonl` (default
//! `$XDG_DATA_HOME/mvm`, else `~/.local/share/mvm`). Writers append under an
//! exclusive `flock` ([`AuditLog::append`]); [`verify_log`] names the first
//! record that is edited, missing, reordered, truncated or badly signed.
//! Records hold names, sizes and digests, never payloads: a text field longer
//! than [`record::MAX_TEXT_BYTES`] is refused.
//!
//! What the chain cannot show on its own is the loss of the newest records
//! (cutting the file at a record boundary); receipts carry the audit sequence
//! range of their run, which anchors it.

mod events;
mod log;
pub mod open_runs;
pub mod record;
mod verify;
pub mod vmm_events;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

pub use log::AuditLog;
pub use open_runs::{close_abandoned, OpenRun};
pub use record::{AuditEvent, EventKind, FieldValue, Record};
pub use verify::{verify_log, Problem, VerifySummary};

/// File name of the log in the data directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// I/O on the log.
    #[error("audit log {}: {what}: {source}", path.display())]
    Io {
        /// The log.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An event that does not belong in the log.
    #[error("audit event refused: {0}")]
    Event(String),
    /// The log's last line is not a whole record, so nothing can be chained to
    /// it.
    #[error("audit log {} does not end with a whole record; run `mvm audit verify` and repair it before more events can be appended", path.display())]
    TornTail {
        /// The log.
        path: PathBuf,
    },
    /// The first bad record found by verification.
    #[error("audit log {}: record at line {line}{}: {problem}", path.display(), seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    BadRecord {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The record's seq, if it parsed.
        seq: Option<u64>,
        /// What is wrong.
        problem: Problem,
    },
    /// No data directory can be derived from the environment.
    #[error("no data directory: set MVM_DATA_DIR, XDG_DATA_HOME or HOME")]
    NoDataDir,
}

/// `audit.jsonl` in the user's data directory (the image store's
/// [`crate::image::store::data_dir`]).
pub fn default_log_path() -> Result<PathBuf, AuditError> {
    crate::image::store::data_dir()
        .map(|d| d.join(AUDIT_FILE))
        .map_err(|_| AuditError::NoDataDir)
}

/// Reads every record (without verifying), optionally only those of one VM,
/// for `mvm audit show`. A line that does not parse is an error naming it.
pub fn read_records(path: &Path, vm_id: Option<&str>) -> Result<Vec<Record>, AuditError> {
    let file = std::fs::File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        what: "open",
        source,
    })?;
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut line_no = 0;
    loop {
        line.clear();
        line_no += 1;
        let n = (&mut reader)
            .take(record::MAX_RECORD_BYTES as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|source| AuditError::Io {
                path: path.to_owned(),
                what: "read",
                source,
            })?;
        if n == 0 {
            break;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let record: Record = serde_json::from_slice(body).map_err(|e| AuditError::BadRecord {
            path: path.to_owned(),
            line: line_no,
            seq: None,
            problem: Problem::Malformed(e.to_string()),
        })?;
        if vm_id.is_none_or(|id| record.vm_id.as_deref() == Some(id)) {
            out.push(record);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
