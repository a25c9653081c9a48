//! Receipts: a signed statement of what one run did.
//!
//! A receipt is a DSSE envelope (payloadType `application/vnd.in-toto+json`)
//! around an in-toto Statement v1 whose subject is the plan (its sha256: the
//! digest of the exact signed plan payload) and whose predicate
//! (`predicateType` [`PREDICATE_TYPE`]) records the measurements, the command
//! digest, exit status, output digests, times and the audit sequence range of
//! the run. It is signed with the host's audit key.
//!
//! The command digest is sha256 over each argv element followed by one NUL
//! byte (`"ls\0-l\0"`), so argument boundaries are part of what is hashed.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use mvm_loader::dsse::{DsseError, Envelope, KeyId, TrustedKeys};
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::{Plan, Tier, UtcTime};
use mvm_loader::verity::RootHash;
use serde::{Deserialize, Serialize};

/// DSSE payloadType of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The in-toto Statement v1 type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The predicate type of an mvm run receipt: a URI naming the predicate's
/// schema (in-toto's convention), documented field by field in
/// `docs/trust.md#receipts`. It is a name, never fetched. A change to the
/// fields that an older verifier would misread gets a new version (`/v2`).
pub const PREDICATE_TYPE: &str = "https://mvm.dev/receipt/v1";

/// An in-toto Statement v1 with an mvm run predicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// The plan, by digest.
    pub subject: Vec<Subject>,
    /// [`PREDICATE_TYPE`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// What happened.
    pub predicate: RunPredicate,
}

/// An in-toto subject: a name and a digest set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    /// `plan:<plan id>`.
    pub name: String,
    /// `{"sha256": "<hex>"}`.
    pub digest: BTreeMap<String, String>,
}

/// What the VMM measured before boot (equal to the plan's pins, or there
/// would have been no run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurements {
    /// Kernel digest.
    pub kernel: Sha256Digest,
    /// Initramfs digest.
    pub initramfs: Option<Sha256Digest>,
    /// Command line digest.
    pub cmdline: Sha256Digest,
    /// Verified disks: name to dm-verity root hash.
    pub disks: BTreeMap<String, RootHash>,
}

impl Measurements {
    /// The measurements a verified boot of `plan` implies.
    pub fn of_plan(plan: &Plan) -> Self {
        Self {
            kernel: plan.artifacts.kernel,
            initramfs: plan.artifacts.initramfs,
            cmdline: plan.artifacts.cmdline,
            disks: plan
                .artifacts
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.verity.root_hash))
                .collect(),
        }
    }
}

/// The first and last audit records of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRange {
    /// Seq of the run's first record.
    pub first_seq: u64,
    /// Seq of the run's last record.
    pub last_seq: u64,
}

/// The mvm run predicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPredicate {
    /// The plan's id.
    pub plan_id: String,
    /// The VM's id.
    pub vm_id: String,
    /// The backend tier that ran it.
    pub tier: Tier,
    /// What was measured at boot.
    pub measurements: Measurements,
    /// [`command_digest`] of the argv.
    pub command_sha256: Sha256Digest,
    /// The command's exit status (128 + N for a signal N, as a shell reports).
    pub exit_status: i32,
    /// sha256 of everything the command wrote to stdout.
    pub stdout_sha256: Sha256Digest,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// sha256 of everything the command wrote to stderr.
    pub stderr_sha256: Sha256Digest,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// When the command started.
    pub started_at: UtcTime,
    /// When it finished.
    pub finished_at: UtcTime,
    /// The run's records in the host audit log.
    pub audit: AuditRange,
    /// The secrets the run was given: names and digests, never values. Absent
    /// when none (receipts of runs without secrets read as before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secrets::ReleasedSecret>,
    /// The wall the run had (`mvm doctor`'s row for its backend). Absent in receipts
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall: Option<crate::backend::wall::Wall>,
}

/// The digest of an argv: each element followed by a NUL byte.
pub fn command_digest<S: AsRef<[u8]>>(argv: &[S]) -> Sha256Digest {
    let mut bytes = Vec::new();
    for arg in argv {
        bytes.extend_from_slice(arg.as_ref());
        bytes.push(0);
    }
    Sha256Digest::of(&bytes)
}

/// Why a receipt did not verify.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// Envelope or signature.
    #[error("receipt envelope: {0}")]
    Envelope(#[from] DsseError),
    /// The statement does not parse.
    #[error("receipt statement does not parse: {0}")]
    Malformed(String),
    /// A statement of another kind.
    #[error("receipt statement {field} is {found:?}, expected {expected:?}")]
    Type {
        /// `_type` or `predicateType`.
        field: &'static str,
        /// What it says.
        found: String,
        /// What it should say.
        expected: &'static str,
    },
    /// The subject is not one plan digest.
    #[error("receipt subject must be exactly one plan with a sha256 digest")]
    Subject,
    /// Encoding failed (should not happen).
    #[error("receipt encoding: {0}")]
    Encode(String),
}

/// A receipt that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    /// The statement.
    pub statement: Statement,
    /// The plan digest (the subject).
    pub plan_digest: Sha256Digest,
    /// The key that signed it.
    pub keyid: KeyId,
}

/// Builds the statement for a run of the plan with digest `plan_digest`.
pub fn statement(plan_digest: Sha256Digest, predicate: RunPredicate) -> Statement {
    Statement {
        statement_type: STATEMENT_TYPE.to_owned(),
        subject: vec![Subject {
            name: format!("plan:{}", predicate.plan_id),
            digest: BTreeMap::from([("sha256".to_owned(), plan_digest.to_hex())]),
        }],
        predicate_type: PREDICATE_TYPE.to_owned(),
        predicate,
    }
}

/// Signs `statement` into a receipt envelope with `key` (the audit key).
pub fn sign_receipt(statement: &Statement, key: &SigningKey) -> Result<Envelope, ReceiptError> {
    let payload = serde_json::to_vec(statement).map_err(|e| ReceiptError::Encode(e.to_string()))?;
    Ok(Envelope::sign(PAYLOAD_TYPE, &payload, key))
}

/// Verifies a receipt file's bytes against the trusted keys and parses it.
pub fn verify_receipt(
    envelope_json: &[u8],
    trusted: &TrustedKeys,
) -> Result<VerifiedReceipt, ReceiptError> {
    let envelope = Envelope::from_json(envelope_json)?;
    let verified = envelope.verify(PAYLOAD_TYPE, trusted)?;
    let statement: Statement = serde_json::from_slice(&verified.payload)
        .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    if statement.statement_type != STATEMENT_TYPE {
        return Err(ReceiptError::Type {
            field: "_type",
            found: statement.statement_type.chars().take(100).collect(),
            expected: STATEMENT_TYPE,
        });
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(ReceiptError::Type {
            field: "predicateType",
            found: statement.predicate_type.chars().take(100).collect(),
            expected: PREDICATE_TYPE,
        });
    }
    let plan_digest = match statement.subject.as_slice() {
        [one] if one.digest.len() == 1 => one
            .digest
            .get("sha256")
            .and_then(|hex| format!("sha256:{hex}").parse::<Sha256Digest>().ok())
            .ok_or(ReceiptError::Subject)?,
        _ => return Err(ReceiptError::Subject),
    };
    Ok(VerifiedReceipt {
        statement,
        plan_digest,
        keyid: verified.keyid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn trusted() -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.add(key().verifying_key());
        t
    }

    fn sample() -> Statement {
        let predicate = RunPredicate {
            plan_id: "plan-00aa".to_owned(),
            vm_id: "vm-1".to_owned(),
            tier: Tier::Emulated,
            measurements: Measurements {
                kernel: Sha256Digest::of(b"k"),
                initramfs: Some(Sha256Digest::of(b"i")),
                cmdline: Sha256Digest::of(b"c"),
                disks: BTreeMap::from([("root".to_owned(), RootHash([3; 32]))]),
            },
            command_sha256: command_digest(&["echo", "hi"]),
            exit_status: 0,
            stdout_sha256: Sha256Digest::of(b"hi\n"),
            stdout_bytes: 3,
            stderr_sha256: Sha256Digest::of(b""),
            stderr_bytes: 0,
            started_at: "2026-11-29T00:00:00Z".parse().unwrap(),
            finished_at: "2026-11-29T00:00:02Z".parse().unwrap(),
            audit: AuditRange {
                first_seq: 10,
                last_seq: 14,
            },
            secrets: Vec::new(),
            wall: Some(crate::backend::wall::of(
                crate::backend::Tier::Emulated,
                true,
            )),
        };
        statement(Sha256Digest::of(b"plan payload"), predicate)
    }

    #[test]
    fn a_real_receipt_verifies() {
        let env = sign_receipt(&sample(), &key()).unwrap();
        let v = verify_receipt(&env.to_json(), &trusted()).unwrap();
        assert_eq!(v.statement, sample());
        assert_eq!(v.plan_digest, Sha256Digest::of(b"plan payload"));
        let json: serde_json::Value =
            serde_json::from_slice(&env.payload_unverified().unwrap()).unwrap();
        assert_eq!(json["_type"], STATEMENT_TYPE);
        assert_eq!(json["predicateType"], "https://mvm.dev/receipt/v1");
        assert_eq!(
            json["subject"][0]["digest"]["sha256"],
            Sha256Digest::of(b"plan payload").to_hex()
        );
    }

    #[test]
    fn any_changed_payload_byte_fails() {
        let env = sign_receipt(&sample(), &key()).unwrap();
        let payload = env.payload_unverified().unwrap();
        for i in 0..payload.len() {
            let mut changed = payload.clone();
            changed[i] ^= 0x01;
            let mut tampered = env.clone();
            tampered.payload = BASE64.encode(&changed);
            let err = verify_receipt(&tampered.to_json(), &trusted()).unwrap_err();
            assert!(
                matches!(err, ReceiptError::Envelope(DsseError::BadSignature { .. })),
                "byte {i}: {err}"
            );
        }
    }

    #[test]
    fn untrusted_signer_and_wrong_types_are_refused() {
        let env = sign_receipt(&sample(), &SigningKey::from_bytes(&[6; 32])).unwrap();
        assert!(matches!(
            verify_receipt(&env.to_json(), &trusted()),
            Err(ReceiptError::Envelope(DsseError::UntrustedKey { .. }))
        ));
        // Another predicate, and the placeholder receipts carried before v1 was named.
        for other in [
            "https://example.com/other",
            "https://example.invalid/mvm/receipt/v1",
            "https://mvm.dev/receipt/v2",
        ] {
            let mut s = sample();
            s.predicate_type = other.to_owned();
            let env = sign_receipt(&s, &key()).unwrap();
            assert!(
                matches!(
                    verify_receipt(&env.to_json(), &trusted()),
                    Err(ReceiptError::Type {
                        field: "predicateType",
                        ..
                    })
                ),
                "{other}"
            );
        }
        let mut s = sample();
        s.subject.clear();
        let env = sign_receipt(&s, &key()).unwrap();
        assert!(matches!(
            verify_receipt(&env.to_json(), &trusted()),
            Err(ReceiptError::Subject)
        ));
        // A plan envelope is not a receipt, even when signed by a trusted key.
        let plan_env = Envelope::sign("application/vnd.mvm.plan+json", b"{}", &key());
        assert!(matches!(
            verify_receipt(&plan_env.to_json(), &trusted()),
            Err(ReceiptError::Envelope(DsseError::PayloadType { .. }))
        ));
    }

    #[test]
    fn command_digest_keeps_argument_boundaries() {
        assert_ne!(command_digest(&["ab", "c"]), command_digest(&["a", "bc"]));
        assert_eq!(command_digest(&["ls", "-l"]), Sha256Digest::of(b"ls\0-l\0"));
    }
}
