//! DSSE envelopes (Dead Simple Signing Envelope, v1.0) signed with ed25519.
//!
//! The signature covers the pre-authentication encoding (PAE) of the payload
//! type and the exact payload bytes:
//!
//! ```text
//! PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body
//! ```
//!
//! where `LEN` is the byte length in ASCII decimal without leading zeros and
//! `SP` is one space. There is nothing to canonicalise: the verifier hashes the
//! bytes it will parse.
//!
//! # Key ids
//!
//! A key id is `sha256:<hex>` of the raw 32-byte ed25519 public key. It names a
//! key in errors and lets a verifier skip signatures by keys it does not hold;
//! it is never trusted on its own: the signature is checked with the trusted
//! key whose id matches.
//!
//! # Key files
//!
//! One line of text, a label and the base64 (standard alphabet, padded) of 32
//! raw bytes, and a newline:
//!
//! ```text
//! mvm-ed25519-public 3q2+7w...=        (public key)
//! mvm-ed25519-secret AAECAwQ...=       (secret key seed; file mode 0600)
//! ```
//!
//! Lines starting with `#` and blank lines are ignored, so a key file can carry
//! a comment.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::measure::{Sha256Digest, SHA256_PREFIX};

/// Label of a public key file line.
pub const PUBLIC_KEY_LABEL: &str = "mvm-ed25519-public";
/// Label of a secret key file line.
pub const SECRET_KEY_LABEL: &str = "mvm-ed25519-secret";
/// Largest envelope accepted, in bytes (base64 grows the payload by 4/3).
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// Most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 8;

/// A key id: `sha256:<hex>` of the raw public key bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub Sha256Digest);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        Self(Sha256Digest::of(key.as_bytes()))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A DSSE envelope in its JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Media type of the payload.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    /// One or more signatures over PAE(payloadType, payload bytes).
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    /// The signer's key id (`sha256:<hex>`).
    pub keyid: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// Errors from envelopes and keys. Each names the key id or the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsseError {
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not an envelope.
    #[error("envelope does not parse: {0}")]
    Malformed(String),
    /// The payload is not base64.
    #[error("envelope payload is not valid base64")]
    PayloadEncoding,
    /// A different payload type than the caller expects.
    #[error("envelope payloadType is {found:?}, expected {expected:?}")]
    PayloadType {
        /// What the envelope says.
        found: String,
        /// What the caller wanted.
        expected: String,
    },
    /// No signatures, or too many.
    #[error("envelope has {0} signatures; need 1..={MAX_SIGNATURES}")]
    SignatureCount(usize),
    /// No signature is by a trusted key.
    #[error("no signature by a trusted key: envelope signed by [{}], trusted [{}]", .signed_by.join(", "), .trusted.join(", "))]
    UntrustedKey {
        /// Key ids on the envelope.
        signed_by: Vec<String>,
        /// Key ids the verifier trusts.
        trusted: Vec<String>,
    },
    /// A signature that claims a trusted key does not verify.
    #[error("signature by trusted key {keyid} does not verify: the payload was changed after signing, or the signature is forged")]
    BadSignature {
        /// The trusted key's id.
        keyid: KeyId,
    },
    /// A key file or key string that does not parse.
    #[error("key: {0}")]
    Key(String),
}

/// The DSSE pre-authentication encoding of `payload_type` and `payload`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = payload.len().to_string();
    let mut out = Vec::with_capacity(
        16 + type_len.len() + payload_type.len() + body_len.len() + payload.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// A set of trusted public keys, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl TrustedKeys {
    /// An empty set (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key; returns its id.
    pub fn add(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        self.keys.insert(id, key);
        id
    }

    /// Adds the key in a public key file's text.
    pub fn add_public_key_file(&mut self, text: &str) -> Result<KeyId, DsseError> {
        Ok(self.add(parse_public_key(text)?))
    }

    /// The ids of the keys held.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// True if no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A payload whose envelope verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPayload {
    /// The exact payload bytes that were signed.
    pub payload: Vec<u8>,
    /// The trusted key whose signature verified.
    pub keyid: KeyId,
}

impl Envelope {
    /// Signs `payload` as `payload_type` with `key`.
    pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Self {
        let sig = key.sign(&pae(payload_type, payload));
        Self {
            payload_type: payload_type.to_owned(),
            payload: BASE64.encode(payload),
            signatures: vec![EnvelopeSignature {
                keyid: KeyId::of(&key.verifying_key()).to_string(),
                sig: BASE64.encode(sig.to_bytes()),
            }],
        }
    }

    /// Parses an envelope (bounded in size; unknown fields refused).
    pub fn from_json(bytes: &[u8]) -> Result<Self, DsseError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DsseError::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| DsseError::Malformed(e.to_string()))
    }

    /// The envelope as pretty JSON with a trailing newline (the file format).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings cannot fail; fall back to an empty body
        // rather than panic if serde ever says otherwise.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The payload bytes, NOT verified. For display only.
    pub fn payload_unverified(&self) -> Result<Vec<u8>, DsseError> {
        BASE64
            .decode(self.payload.as_bytes())
            .map_err(|_| DsseError::PayloadEncoding)
    }

    /// Verifies that a trusted key signed PAE(`expected_type`, payload) and
    /// returns the payload bytes. A signature by an unknown key id is skipped;
    /// a signature claiming a trusted key id that fails is an error naming it.
    pub fn verify(
        &self,
        expected_type: &str,
        trusted: &TrustedKeys,
    ) -> Result<VerifiedPayload, DsseError> {
        if self.payload_type != expected_type {
            return Err(DsseError::PayloadType {
                found: self.payload_type.chars().take(100).collect(),
                expected: expected_type.to_owned(),
            });
        }
        if self.signatures.is_empty() || self.signatures.len() > MAX_SIGNATURES {
            return Err(DsseError::SignatureCount(self.signatures.len()));
        }
        let payload = self.payload_unverified()?;
        let message = pae(&self.payload_type, &payload);
        let mut bad = None;
        for entry in &self.signatures {
            let Some((keyid, key)) = entry
                .keyid
                .parse::<Sha256Digest>()
                .ok()
                .map(KeyId)
                .and_then(|id| trusted.keys.get(&id).map(|k| (id, k)))
            else {
                continue;
            };
            let verified =
                decode_signature(&entry.sig).is_some_and(|sig| key.verify(&message, &sig).is_ok());
            if verified {
                return Ok(VerifiedPayload { payload, keyid });
            }
            bad.get_or_insert(keyid);
        }
        if let Some(keyid) = bad {
            return Err(DsseError::BadSignature { keyid });
        }
        Err(DsseError::UntrustedKey {
            signed_by: self
                .signatures
                .iter()
                .map(|s| s.keyid.chars().take(80).collect())
                .collect(),
            trusted: trusted.ids().map(ToString::to_string).collect(),
        })
    }
}

fn decode_signature(b64: &str) -> Option<Signature> {
    let bytes = BASE64.decode(b64.as_bytes()).ok()?;
    let array: [u8; 64] = bytes.as_slice().try_into().ok()?;
    Some(Signature::from_bytes(&array))
}

/// Finds the one `label base64` line of a key file and decodes its 32 bytes.
fn parse_key_line(text: &str, label: &str) -> Result<[u8; 32], DsseError> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines
        .next()
        .ok_or_else(|| DsseError::Key(format!("no {label} line")))?;
    if lines.next().is_some() {
        return Err(DsseError::Key(format!(
            "more than one key line; expected one {label} line"
        )));
    }
    let (found, b64) = line
        .split_once(' ')
        .ok_or_else(|| DsseError::Key(format!("expected \"{label} <base64>\"")))?;
    if found != label {
        return Err(DsseError::Key(format!(
            "key file label is {:?}, expected {label:?}",
            found.chars().take(40).collect::<String>()
        )));
    }
    let bytes = BASE64
        .decode(b64.trim().as_bytes())
        .map_err(|_| DsseError::Key(format!("{label}: key is not valid base64")))?;
    bytes.as_slice().try_into().map_err(|_| {
        DsseError::Key(format!(
            "{label}: key is {} bytes, expected 32",
            bytes.len()
        ))
    })
}

/// Parses a public key file.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, DsseError> {
    let bytes = parse_key_line(text, PUBLIC_KEY_LABEL)?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| DsseError::Key("public key is not a valid ed25519 point".to_owned()))
}

/// Parses a secret key file.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, DsseError> {
    let seed = parse_key_line(text, SECRET_KEY_LABEL)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A public key file's text, with a comment naming the key id.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!(
        "# mvm ed25519 public key, key id {}\n{PUBLIC_KEY_LABEL} {}\n",
        KeyId::of(key),
        BASE64.encode(key.as_bytes())
    )
}

/// A secret key file's text.
pub fn format_secret_key(key: &SigningKey) -> String {
    format!("{SECRET_KEY_LABEL} {}\n", BASE64.encode(key.to_bytes()))
}

impl FromStr for KeyId {
    type Err = DsseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with(SHA256_PREFIX) {
            return Err(DsseError::Key(format!(
                "key id {s:?} must start with sha256:"
            )));
        }
        s.parse()
            .map(KeyId)
            .map_err(|e: crate::measure::DigestParseError| DsseError::Key(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "application/vnd.mvm.plan+json";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trust(keys: &[&SigningKey]) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        for k in keys {
            t.add(k.verifying_key());
        }
        t
    }

    #[test]
    fn pae_matches_the_spec_example() {
        // The worked example of the DSSE v1 protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn sign_then_verify_returns_the_exact_payload() {
        let k = key(1);
        let env = Envelope::sign(TYPE, b"{\"a\":1}", &k);
        let parsed = Envelope::from_json(&env.to_json()).unwrap();
        let v = parsed.verify(TYPE, &trust(&[&k])).unwrap();
        assert_eq!(v.payload, b"{\"a\":1}");
        assert_eq!(v.keyid, KeyId::of(&k.verifying_key()));
        assert_eq!(parsed.signatures[0].keyid, v.keyid.to_string());
    }

    #[test]
    fn changed_payload_fails_naming_the_key() {
        let k = key(1);
        let mut env = Envelope::sign(TYPE, b"{\"a\":1}", &k);
        env.payload = BASE64.encode(b"{\"a\":2}");
        let err = env.verify(TYPE, &trust(&[&k])).unwrap_err();
        assert_eq!(
            err,
            DsseError::BadSignature {
                keyid: KeyId::of(&k.verifying_key())
            }
        );
        assert!(err
            .to_string()
            .contains(&KeyId::of(&k.verifying_key()).to_string()));
    }

    #[test]
    fn changed_payload_type_fails() {
        let k = key(1);
        let mut env = Envelope::sign(TYPE, b"x", &k);
        env.payload_type = "application/other".to_owned();
        assert!(matches!(
            env.verify(TYPE, &trust(&[&k])),
            Err(DsseError::PayloadType { .. })
        ));
        // Even when the verifier is asked for the new type, PAE binds the type.
        assert!(matches!(
            env.verify("application/other", &trust(&[&k])),
            Err(DsseError::BadSignature { .. })
        ));
    }

    #[test]
    fn untrusted_key_is_refused_and_both_sides_named() {
        let signer = key(1);
        let other = key(2);
        let env = Envelope::sign(TYPE, b"x", &signer);
        let err = env.verify(TYPE, &trust(&[&other])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&KeyId::of(&signer.verifying_key()).to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&KeyId::of(&other.verifying_key()).to_string()),
            "{msg}"
        );
        assert!(matches!(err, DsseError::UntrustedKey { .. }));
    }

    #[test]
    fn a_forged_keyid_does_not_help() {
        // An attacker signs with their key but claims the trusted key's id.
        let trusted = key(1);
        let attacker = key(2);
        let mut env = Envelope::sign(TYPE, b"x", &attacker);
        env.signatures[0].keyid = KeyId::of(&trusted.verifying_key()).to_string();
        assert!(matches!(
            env.verify(TYPE, &trust(&[&trusted])),
            Err(DsseError::BadSignature { .. })
        ));
    }

    #[test]
    fn one_good_signature_among_several_suffices() {
        let a = key(1);
        let b = key(2);
        let mut env = Envelope::sign(TYPE, b"x", &a);
        let other = Envelope::sign(TYPE, b"x", &b);
        env.signatures.insert(0, other.signatures[0].clone());
        let v = env.verify(TYPE, &trust(&[&a])).unwrap();
        assert_eq!(v.keyid, KeyId::of(&a.verifying_key()));
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert!(matches!(
            Envelope::from_json(b"{}"),
            Err(DsseError::Malformed(_))
        ));
        let k = key(1);
        let mut v = serde_json::to_value(Envelope::sign(TYPE, b"x", &k)).unwrap();
        v["extra"] = 1.into();
        assert!(matches!(
            Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(DsseError::Malformed(_))
        ));
        let mut env = Envelope::sign(TYPE, b"x", &k);
        env.signatures.clear();
        assert_eq!(
            env.verify(TYPE, &trust(&[&k])),
            Err(DsseError::SignatureCount(0))
        );
        let mut env = Envelope::sign(TYPE, b"x", &k);
        env.payload = "!!".to_owned();
        assert_eq!(
            env.verify(TYPE, &trust(&[&k])),
            Err(DsseError::PayloadEncoding)
        );
        let mut env = Envelope::sign(TYPE, b"x", &k);
        env.signatures[0].sig = "AAAA".to_owned();
        assert!(matches!(
            env.verify(TYPE, &trust(&[&k])),
            Err(DsseError::BadSignature { .. })
        ));
        let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::from_json(&huge),
            Err(DsseError::TooLarge { .. })
        ));
    }

    #[test]
    fn key_files_round_trip_and_reject_garbage() {
        let k = key(9);
        let public = format_public_key(&k.verifying_key());
        assert_eq!(parse_public_key(&public).unwrap(), k.verifying_key());
        let secret = format_secret_key(&k);
        assert_eq!(parse_secret_key(&secret).unwrap().to_bytes(), k.to_bytes());
        assert!(
            parse_public_key(&secret).is_err(),
            "secret file read as public"
        );
        assert!(
            parse_secret_key(&public).is_err(),
            "public file read as secret"
        );
        assert!(parse_public_key("mvm-ed25519-public AAAA\n").is_err());
        assert!(parse_public_key("").is_err());
        let two = format!("{public}{public}");
        assert!(parse_public_key(&two).is_err());
        let id: KeyId = KeyId::of(&k.verifying_key()).to_string().parse().unwrap();
        assert_eq!(id, KeyId::of(&k.verifying_key()));
    }
}
