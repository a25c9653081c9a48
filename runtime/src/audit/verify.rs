//! Checking a whole audit log: every line canonical and signed, sequence
//! numbers contiguous from 1, each record chained to the one before.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use mvm_loader::measure::Sha256Digest;

use super::record::{Record, MAX_RECORD_BYTES};
use super::AuditError;

/// What is wrong with the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The file ends inside a record.
    #[error("the file ends in the middle of this record (truncated)")]
    Truncated,
    /// A line longer than any record.
    #[error("the line is longer than {MAX_RECORD_BYTES} bytes")]
    TooLong,
    /// Not a record.
    #[error("the line does not parse as a record ({0}): edited or corrupt")]
    Malformed(String),
    /// Parses, but not in the one valid encoding.
    #[error("the line is not in canonical form: edited")]
    NotCanonical,
    /// The signature does not verify under the audit key.
    #[error("the signature does not verify under the audit key: edited, or signed by another key")]
    BadSignature,
    /// A sequence number out of order.
    #[error("sequence number is {found}, expected {expected}: a record was deleted before it, or records were reordered")]
    Sequence {
        /// The record's seq.
        found: u64,
        /// The seq that should be here.
        expected: u64,
    },
    /// The previous-record hash does not match.
    #[error("its previous-record hash does not match the record before it: a record was deleted, reordered or replaced")]
    Chain,
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Records checked.
    pub records: u64,
    /// The last record's seq (0 for an empty log).
    pub last_seq: u64,
    /// sha256 of the last record's line (zero for an empty log).
    pub last_hash: Sha256Digest,
}

/// Verifies the log at `path` against the audit public key; the error names
/// the first bad record by line and (where known) seq.
pub fn verify_log(path: &Path, key: &VerifyingKey) -> Result<VerifySummary, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        what: "open",
        source,
    })?;
    verify_reader(path, BufReader::new(file), key)
}

pub(crate) fn verify_reader(
    path: &Path,
    mut reader: impl BufRead,
    key: &VerifyingKey,
) -> Result<VerifySummary, AuditError> {
    let mut prev = Sha256Digest::zero();
    let mut expected = 1u64;
    let mut line_no = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        line_no += 1;
        let limit = MAX_RECORD_BYTES as u64 + 2;
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(|source| AuditError::Io {
                path: path.to_owned(),
                what: "read",
                source,
            })?;
        if n == 0 {
            break;
        }
        let bad = |problem: Problem, seq: Option<u64>| AuditError::BadRecord {
            path: path.to_owned(),
            line: line_no,
            seq,
            problem,
        };
        let Some((&b'\n', body)) = line.split_last() else {
            let problem = if line.len() as u64 >= limit {
                Problem::TooLong
            } else {
                Problem::Truncated
            };
            return Err(bad(problem, None));
        };
        if body.len() > MAX_RECORD_BYTES {
            return Err(bad(Problem::TooLong, None));
        }
        let record: Record = serde_json::from_slice(body)
            .map_err(|e| bad(Problem::Malformed(e.to_string()), None))?;
        let seq = Some(record.seq);
        if record.to_line().ok().as_deref() != Some(body) {
            return Err(bad(Problem::NotCanonical, seq));
        }
        if !record.signature_ok(key) {
            return Err(bad(Problem::BadSignature, seq));
        }
        if record.seq != expected {
            return Err(bad(
                Problem::Sequence {
                    found: record.seq,
                    expected,
                },
                seq,
            ));
        }
        if record.prev != prev {
            return Err(bad(Problem::Chain, seq));
        }
        prev = Sha256Digest::of(body);
        expected = expected.saturating_add(1);
    }
    Ok(VerifySummary {
        records: expected - 1,
        last_seq: expected - 1,
        last_hash: prev,
    })
}
