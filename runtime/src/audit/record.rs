//! One audit record: its fields, its single byte encoding, its signature.
//!
//! A record is one line of compact JSON, fields in this order:
//!
//! ```text
//! {"seq":7,"time":"2026-11-29T00:00:00Z","event":"exec_exited","plan_id":"plan-..","vm_id":"..",
//!  "fields":{"exit_status":0},"prev":"sha256:<hex of the previous line>","sig":"<base64>"}
//! ```
//!
//! `plan_id` and `vm_id` are left out when absent. `fields` is sorted by key.
//! `sig` is ed25519 by the audit key over `"mvm-audit-v1\n"` followed by the
//! same line without its `sig` member. Only this encoding is valid: a verifier
//! re-encodes what it parsed and refuses a line that differs by a byte.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::UtcTime;
use serde::{Deserialize, Serialize};

/// Domain separation for audit signatures (the audit key also signs receipts).
const SIGNING_CONTEXT: &[u8] = b"mvm-audit-v1\n";
/// Longest record line, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Longest text value: names, digests and short reasons fit; payloads do not.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Most fields per record.
pub const MAX_FIELDS: usize = 64;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Admission signed a plan.
    PlanAdmitted,
    /// Admission refused (fields: rule, reason).
    PlanDenied,
    /// The VMM verified the plan and measured every artifact (fields: digests).
    BootVerified,
    /// The VMM refused to boot (fields: reason, artifact, digests).
    BootRefused,
    /// The VMM verified a sealed snapshot and the plan that booted it, and restored
    /// the VM from it (fields: memory and state digests, epoch, VMM build).
    SnapshotRestored,
    /// A verified disk block did not match its hash tree.
    VerityFailure,
    /// A guest broke the device protocol; the device was marked NEEDS_RESET.
    DeviceError,
    /// The first dropped frame to a destination the egress policy refuses.
    EgressDropped,
    /// A secret was released into the guest (by name).
    SecretReleased,
    /// The egress proxy put a secret's value in place of its placeholder in a request
    /// to a host the plan binds it to (fields: name, value digest, destination).
    SecretSubstituted,
    /// The egress proxy refused a request carrying a placeholder (or a response
    /// carrying a value) (fields: name when known, destination, reason).
    SecretRefused,
    /// A command started (fields: argv digest).
    ExecStarted,
    /// A command exited (fields: exit status, output digests).
    ExecExited,
    /// A file was written into the guest (fields: path, size, digest).
    FileWritten,
    /// A file was read out of the guest (fields: path, size, digest).
    FileRead,
    /// A sandbox's session is ending (field: reason).
    SessionStopping,
    /// A connection to a forwarded guest port opened (field: port).
    ForwardOpened,
    /// It closed (fields: port, bytes each way).
    ForwardClosed,
    /// The VM exited (fields: reason, status; `signal` when a signal ended
    /// its process).
    VmExited,
    /// A run whose `mvm` died before closing it, found by a later command
    /// (fields: pid, reason).
    RunAbandoned,
    /// How the VMM verifies a pinned disk's reads (fields: disk, mode, why).
    DiskVerification,
    /// An image was built in a builder VM, whose plan the record names (fields:
    /// image, digest, lock_sha256, root_hash).
    ImageBuilt,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// A field value: a flag, a number, or short text (a name, a digest, a
/// reason). Never a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldValue {
    /// true / false.
    Bool(bool),
    /// A non-negative integer.
    UInt(u64),
    /// A negative integer.
    Int(i64),
    /// Text, at most [`MAX_TEXT_BYTES`].
    Text(String),
}

impl fmt::Display for FieldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::UInt(n) => write!(f, "{n}"),
            Self::Int(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s}"),
        }
    }
}

impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<u64> for FieldValue {
    fn from(v: u64) -> Self {
        Self::UInt(v)
    }
}

impl From<u32> for FieldValue {
    fn from(v: u32) -> Self {
        Self::UInt(u64::from(v))
    }
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        u64::try_from(v).map_or(Self::Int(v), Self::UInt)
    }
}

impl From<i32> for FieldValue {
    fn from(v: i32) -> Self {
        Self::from(i64::from(v))
    }
}

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<Sha256Digest> for FieldValue {
    fn from(v: Sha256Digest) -> Self {
        Self::Text(v.to_string())
    }
}

/// An event to append: the record minus what the log fills in (seq, time,
/// prev, sig).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// What happened.
    pub kind: EventKind,
    /// The plan it concerns.
    pub plan_id: Option<String>,
    /// The VM it concerns.
    pub vm_id: Option<String>,
    /// Names, sizes, digests, statuses.
    pub fields: BTreeMap<String, FieldValue>,
}

impl AuditEvent {
    /// An event with no ids and no fields.
    pub fn new(kind: EventKind) -> Self {
        Self {
            kind,
            plan_id: None,
            vm_id: None,
            fields: BTreeMap::new(),
        }
    }

    /// Sets the plan id.
    pub fn plan(mut self, plan_id: impl Into<String>) -> Self {
        self.plan_id = Some(plan_id.into());
        self
    }

    /// Sets the VM id.
    pub fn vm(mut self, vm_id: impl Into<String>) -> Self {
        self.vm_id = Some(vm_id.into());
        self
    }

    /// Adds a field.
    pub fn field(mut self, name: &str, value: impl Into<FieldValue>) -> Self {
        self.fields.insert(name.to_owned(), value.into());
        self
    }

    /// Refuses what does not belong in an audit log: long text (a payload),
    /// odd field names, too many fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.fields.len() > MAX_FIELDS {
            return Err(format!(
                "{} fields; at most {MAX_FIELDS}",
                self.fields.len()
            ));
        }
        for (name, value) in &self.fields {
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !name_ok {
                return Err(format!("field name {name:?} is not [a-z0-9_]{{1,64}}"));
            }
            if let FieldValue::Text(t) = value {
                if t.len() > MAX_TEXT_BYTES {
                    return Err(format!(
                        "field {name} is {} bytes; audit fields hold names, sizes and digests (at most {MAX_TEXT_BYTES} bytes), never payloads",
                        t.len()
                    ));
                }
            }
        }
        for (what, id) in [("plan_id", &self.plan_id), ("vm_id", &self.vm_id)] {
            if id.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
                return Err(format!("{what} must be 1..=128 bytes"));
            }
        }
        Ok(())
    }
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1 for the first record, then +1 each.
    pub seq: u64,
    /// When it was appended.
    pub time: UtcTime,
    /// What happened.
    pub event: EventKind,
    /// The plan it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// The VM it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// Names, sizes, digests, statuses.
    pub fields: BTreeMap<String, FieldValue>,
    /// sha256 of the previous record's line (zero for the first).
    pub prev: Sha256Digest,
    /// Base64 ed25519 signature (empty while being signed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

impl fmt::Display for Record {
    /// One readable line: `seq time event [plan=..] [vm=..] key=value ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>6} {} {}", self.seq, self.time, self.event)?;
        if let Some(plan) = &self.plan_id {
            write!(f, " plan={plan}")?;
        }
        if let Some(vm) = &self.vm_id {
            write!(f, " vm={vm}")?;
        }
        for (name, value) in &self.fields {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

impl Record {
    /// A signed record for `event` following a record whose line hashed to
    /// `prev`.
    pub fn sign(
        seq: u64,
        time: UtcTime,
        event: AuditEvent,
        prev: Sha256Digest,
        key: &SigningKey,
    ) -> Result<Self, serde_json::Error> {
        let mut record = Self {
            seq,
            time,
            event: event.kind,
            plan_id: event.plan_id,
            vm_id: event.vm_id,
            fields: event.fields,
            prev,
            sig: String::new(),
        };
        let sig = key.sign(&record.signing_bytes()?);
        record.sig = BASE64.encode(sig.to_bytes());
        Ok(record)
    }

    fn signing_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let unsigned = Self {
            sig: String::new(),
            ..self.clone()
        };
        let mut bytes = SIGNING_CONTEXT.to_vec();
        bytes.extend_from_slice(&serde_json::to_vec(&unsigned)?);
        Ok(bytes)
    }

    /// The record's line, without the newline.
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// True if the signature verifies under `key`.
    pub fn signature_ok(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = self.signing_bytes() else {
            return false;
        };
        let Ok(raw) = BASE64.decode(self.sig.as_bytes()) else {
            return false;
        };
        let Ok(array) = <[u8; 64]>::try_from(raw.as_slice()) else {
            return false;
        };
        key.verify(&bytes, &Signature::from_bytes(&array)).is_ok()
    }
}
