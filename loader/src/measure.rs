//! Artifact measurement: sha256 digests written `sha256:<hex>`, and a measured
//! artifact that keeps the exact bytes it hashed.
//!
//! The VMM reads the kernel and initramfs once into memory, hashes those bytes,
//! compares them with the plan and then loads the *same* buffer into guest
//! memory. [`MeasuredArtifact`] owns that buffer, and the only way to get the
//! bytes out for loading is [`MeasuredArtifact::verify`], so there is no window
//! between measuring a file and using it.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The prefix of every digest string in plans, receipts and the audit log.
pub const SHA256_PREFIX: &str = "sha256:";

/// Length in bytes of a sha256 digest.
pub const SHA256_LEN: usize = 32;

/// A sha256 digest. Displayed and serialised as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; SHA256_LEN]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The all-zero digest (used as the "previous hash" of a chain's first link).
    pub const fn zero() -> Self {
        Self([0; SHA256_LEN])
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; SHA256_LEN] {
        &self.0
    }

    /// Lowercase hex without the `sha256:` prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Shorthand for [`Sha256Digest::of`].
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::of(bytes)
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SHA256_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    /// The string does not start with `sha256:`.
    #[error("digest {0:?} does not start with \"sha256:\"")]
    MissingPrefix(String),
    /// The hex part is not 64 lowercase hex characters.
    #[error("digest {0:?} is not \"sha256:\" followed by 64 lowercase hex characters")]
    BadHex(String),
}

impl FromStr for Sha256Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let short = || s.chars().take(80).collect::<String>();
        let hex_part = s
            .strip_prefix(SHA256_PREFIX)
            .ok_or_else(|| DigestParseError::MissingPrefix(short()))?;
        // Only one spelling of a digest is accepted, so a digest string compares
        // equal exactly when the digests do.
        if hex_part.len() != SHA256_LEN * 2
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestParseError::BadHex(short()));
        }
        let mut out = [0u8; SHA256_LEN];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| DigestParseError::BadHex(short()))?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Errors from measuring an artifact or comparing it with the plan.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The artifact could not be read.
    #[error("{artifact}: cannot read {}: {source}", path.display())]
    Read {
        /// Which artifact ("kernel", "initramfs", ...).
        artifact: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The artifact is larger than the caller allows.
    #[error("{artifact}: {} is larger than the limit of {limit} bytes", path.display())]
    TooLarge {
        /// Which artifact.
        artifact: String,
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// The measured digest differs from the one the plan pins.
    #[error("{artifact} digest mismatch: plan {expected}, measured {measured}")]
    Mismatch {
        /// Which artifact.
        artifact: String,
        /// The digest the plan pins.
        expected: Sha256Digest,
        /// The digest of the bytes actually read.
        measured: Sha256Digest,
    },
}

/// An artifact read once into memory and hashed. The bytes are only handed out
/// after they have been compared with the plan ([`MeasuredArtifact::verify`]).
pub struct MeasuredArtifact {
    artifact: String,
    bytes: Vec<u8>,
    digest: Sha256Digest,
}

impl fmt::Debug for MeasuredArtifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeasuredArtifact")
            .field("artifact", &self.artifact)
            .field("len", &self.bytes.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl MeasuredArtifact {
    /// Reads `path` (at most `limit` bytes, else an error) and hashes it.
    /// `artifact` names it in errors ("kernel", "initramfs").
    pub fn read(artifact: &str, path: &Path, limit: u64) -> Result<Self, MeasureError> {
        let read_err = |source| MeasureError::Read {
            artifact: artifact.to_owned(),
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        // Size the buffer once from the file's length (bounded by the limit);
        // the read below still stops at limit + 1 whatever the length says.
        let hint = file.metadata().map_or(0, |m| m.len()).min(limit);
        let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0).saturating_add(1));
        // Read one byte past the limit to tell "exactly the limit" from "more".
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if u64::try_from(bytes.len()).map_or(true, |len| len > limit) {
            return Err(MeasureError::TooLarge {
                artifact: artifact.to_owned(),
                path: path.to_owned(),
                limit,
            });
        }
        Ok(Self::from_bytes(artifact, bytes))
    }

    /// Measures bytes already in memory (an artifact that arrived another way).
    pub fn from_bytes(artifact: &str, bytes: Vec<u8>) -> Self {
        let digest = Sha256Digest::of(&bytes);
        Self {
            artifact: artifact.to_owned(),
            bytes,
            digest,
        }
    }

    /// The digest of the bytes held.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }

    /// The artifact's name as given to [`MeasuredArtifact::read`].
    pub fn artifact(&self) -> &str {
        &self.artifact
    }

    /// Compares with the digest the plan pins; on a match, returns the very bytes
    /// that were hashed, for loading.
    pub fn verify(self, expected: &Sha256Digest) -> Result<VerifiedArtifact, MeasureError> {
        if self.digest != *expected {
            return Err(MeasureError::Mismatch {
                artifact: self.artifact,
                expected: *expected,
                measured: self.digest,
            });
        }
        Ok(VerifiedArtifact {
            artifact: self.artifact,
            bytes: self.bytes,
            digest: self.digest,
        })
    }
}

/// Bytes whose digest matched the plan. Load exactly these.
pub struct VerifiedArtifact {
    artifact: String,
    bytes: Vec<u8>,
    digest: Sha256Digest,
}

impl fmt::Debug for VerifiedArtifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedArtifact")
            .field("artifact", &self.artifact)
            .field("len", &self.bytes.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl VerifiedArtifact {
    /// The verified bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Consumes the artifact, giving up the verified bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The digest that matched.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }

    /// The artifact's name.
    pub fn artifact(&self) -> &str {
        &self.artifact
    }
}

/// Compares a kernel command line with the digest the plan pins. The plan pins
/// the exact bytes: no trimming, no normalising of spaces.
pub fn verify_cmdline(cmdline: &str, expected: &Sha256Digest) -> Result<(), MeasureError> {
    let measured = Sha256Digest::of(cmdline.as_bytes());
    if measured != *expected {
        return Err(MeasureError::Mismatch {
            artifact: "cmdline".to_owned(),
            expected: *expected,
            measured,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digest_of_empty_input_is_the_known_value() {
        assert_eq!(
            sha256(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digest_round_trips_and_rejects_other_spellings() {
        let d = sha256(b"abc");
        let s = d.to_string();
        assert_eq!(s.parse::<Sha256Digest>().unwrap(), d);
        assert!(matches!(
            s.to_uppercase().parse::<Sha256Digest>(),
            Err(DigestParseError::MissingPrefix(_))
        ));
        let upper_hex = format!("sha256:{}", d.to_hex().to_uppercase());
        assert!(matches!(
            upper_hex.parse::<Sha256Digest>(),
            Err(DigestParseError::BadHex(_))
        ));
        assert!("sha256:abcd".parse::<Sha256Digest>().is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), d);
    }

    #[test]
    fn measured_file_verifies_and_yields_the_hashed_bytes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"kernel bytes").unwrap();
        let m = MeasuredArtifact::read("kernel", f.path(), 1024).unwrap();
        let expected = sha256(b"kernel bytes");
        assert_eq!(m.digest(), expected);
        let v = m.verify(&expected).unwrap();
        assert_eq!(v.bytes(), b"kernel bytes");
    }

    #[test]
    fn mismatch_names_artifact_and_both_digests() {
        let m = MeasuredArtifact::from_bytes("initramfs", b"one".to_vec());
        let plan = sha256(b"two");
        let err = m.verify(&plan).unwrap_err().to_string();
        assert!(err.starts_with("initramfs digest mismatch"), "{err}");
        assert!(err.contains(&plan.to_string()), "{err}");
        assert!(err.contains(&sha256(b"one").to_string()), "{err}");
    }

    #[test]
    fn oversized_artifact_is_refused() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 11]).unwrap();
        assert!(MeasuredArtifact::read("kernel", f.path(), 11).is_ok());
        let err = MeasuredArtifact::read("kernel", f.path(), 10).unwrap_err();
        assert!(matches!(err, MeasureError::TooLarge { limit: 10, .. }));
    }

    #[test]
    fn cmdline_is_compared_exactly() {
        let pinned = sha256(b"console=ttyS0 quiet");
        assert!(verify_cmdline("console=ttyS0 quiet", &pinned).is_ok());
        let err = verify_cmdline("console=ttyS0  quiet", &pinned).unwrap_err();
        assert!(err.to_string().starts_with("cmdline digest mismatch"));
    }
}
