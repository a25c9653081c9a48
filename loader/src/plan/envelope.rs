//! A plan inside its DSSE envelope: signing at admission, and the VMM's checks
//! in their fixed order: signature, then schema and fields, then the window.
//! (The nonce is checked next by [`crate::replay`], then the artifacts are
//! measured by [`crate::measure`].)

use std::time::Duration;

use ed25519_dalek::SigningKey;

use super::{Plan, PlanError, UtcTime, WindowError, PLAN_PAYLOAD_TYPE};
use crate::dsse::{DsseError, Envelope, KeyId, TrustedKeys};
use crate::measure::Sha256Digest;
use crate::replay::{ReplayError, ReplayStore};

/// A plan and the envelope that signs it.
#[derive(Debug, Clone)]
pub struct SignedPlan {
    /// The plan.
    pub plan: Plan,
    /// Its envelope; write [`Envelope::to_json`] to a file for the VMM.
    pub envelope: Envelope,
    /// sha256 of the exact payload bytes: the plan's identity in receipts.
    pub digest: Sha256Digest,
}

/// Validates `plan` and signs its compact JSON.
pub fn sign_plan(plan: Plan, key: &SigningKey) -> Result<SignedPlan, PlanError> {
    plan.validate()?;
    let payload = plan.to_json()?;
    let envelope = Envelope::sign(PLAN_PAYLOAD_TYPE, &payload, key);
    Ok(SignedPlan {
        plan,
        envelope,
        digest: Sha256Digest::of(&payload),
    })
}

/// A plan whose signature, fields and window all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedPlan {
    /// The plan.
    pub plan: Plan,
    /// sha256 of the exact payload bytes.
    pub digest: Sha256Digest,
    /// The trusted key that signed it.
    pub keyid: KeyId,
}

/// Why the VMM (or `mvm plan verify`) refused a plan envelope.
#[derive(Debug, thiserror::Error)]
pub enum PlanVerifyError {
    /// The envelope or its signature.
    #[error("plan envelope: {0}")]
    Envelope(#[from] DsseError),
    /// The signed plan itself.
    #[error("{0}")]
    Plan(#[from] PlanError),
    /// The validity window.
    #[error("{0}")]
    Window(#[from] WindowError),
    /// The nonce was used before on this host, or the store failed.
    #[error("{0}")]
    Replay(#[from] ReplayError),
}

impl PlanVerifyError {
    /// A short, stable name of the refusal, for exit statuses and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Envelope(DsseError::UntrustedKey { .. }) => "untrusted_key",
            Self::Envelope(DsseError::BadSignature { .. }) => "bad_signature",
            Self::Envelope(_) => "malformed_envelope",
            Self::Plan(PlanError::NewerSchema { .. }) => "newer_schema",
            Self::Plan(PlanError::UnknownField(_)) => "unknown_field",
            Self::Plan(_) => "invalid_plan",
            Self::Window(WindowError::Expired { .. }) => "expired",
            Self::Window(WindowError::NotYetValid { .. }) => "not_yet_valid",
            Self::Replay(ReplayError::Replayed { .. }) => "replay",
            Self::Replay(_) => "replay_store",
        }
    }
}

/// Checks an envelope file's bytes: signature by a trusted key, then the plan,
/// then the window at `now` with `skew` either side.
pub fn verify_plan(
    envelope_json: &[u8],
    trusted: &TrustedKeys,
    now: UtcTime,
    skew: Duration,
) -> Result<VerifiedPlan, PlanVerifyError> {
    let verified = verify_plan_for_restore(envelope_json, trusted)?;
    verified.plan.check_window(now, skew)?;
    Ok(verified)
}

/// Everything the VMM checks before measuring, in order: [`verify_plan`],
/// then the nonce against the host's replay store (recorded only if every
/// earlier check passed, so a refused plan does not burn its nonce).
pub fn verify_plan_for_boot(
    envelope_json: &[u8],
    trusted: &TrustedKeys,
    now: UtcTime,
    skew: Duration,
    replay: &ReplayStore,
) -> Result<VerifiedPlan, PlanVerifyError> {
    let verified = verify_plan(envelope_json, trusted, now, skew)?;
    replay.check_and_record(&verified.plan.nonce, verified.plan.not_after, now)?;
    Ok(verified)
}

/// Checks a plan that booted a VM now being restored from its snapshot: the signature
/// by a trusted key and the plan, but neither the window nor the nonce. Both bound
/// admission to *boot* (a plan boots once, within minutes of being signed); a restore is
/// not that boot, and is bounded instead by the snapshot's seal (signed by the host's
/// key when the snapshot was taken, binding this plan's id and digest) and its epoch.
/// A plan envelope alone restores nothing: without a sealed snapshot of a VM it booted,
/// there is nothing for it to admit.
pub fn verify_plan_for_restore(
    envelope_json: &[u8],
    trusted: &TrustedKeys,
) -> Result<VerifiedPlan, PlanVerifyError> {
    let envelope = Envelope::from_json(envelope_json)?;
    let verified = envelope.verify(PLAN_PAYLOAD_TYPE, trusted)?;
    let plan = Plan::from_json(&verified.payload)?;
    Ok(VerifiedPlan {
        digest: Sha256Digest::of(&verified.payload),
        plan,
        keyid: verified.keyid,
    })
}

/// Decodes an envelope's plan WITHOUT checking the signature (for
/// `mvm plan show`). Never act on the result.
pub fn decode_plan_unverified(envelope_json: &[u8]) -> Result<Plan, PlanVerifyError> {
    let envelope = Envelope::from_json(envelope_json)?;
    Ok(Plan::from_json(&envelope.payload_unverified()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::sample_plan;
    use crate::plan::CLOCK_SKEW;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(k: &SigningKey) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.add(k.verifying_key());
        t
    }

    fn in_window() -> UtcTime {
        "2026-11-28T23:05:00Z".parse().unwrap()
    }

    #[test]
    fn signed_plan_verifies_with_its_digest() {
        let k = key(1);
        let signed = sign_plan(sample_plan(), &k).unwrap();
        let v = verify_plan(
            &signed.envelope.to_json(),
            &trusted(&k),
            in_window(),
            CLOCK_SKEW,
        )
        .unwrap();
        assert_eq!(v.plan, sample_plan());
        assert_eq!(v.digest, signed.digest);
        assert_eq!(v.keyid, KeyId::of(&k.verifying_key()));
    }

    #[test]
    fn a_restore_checks_the_signature_but_not_the_boot_window() {
        let k = key(1);
        let signed = sign_plan(sample_plan(), &k).unwrap();
        let json = signed.envelope.to_json();
        // Long after its boot window: a boot is refused, a restore is not.
        let later: UtcTime = "2027-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            verify_plan(&json, &trusted(&k), later, CLOCK_SKEW)
                .unwrap_err()
                .reason(),
            "expired"
        );
        let v = verify_plan_for_restore(&json, &trusted(&k)).unwrap();
        assert_eq!(v.digest, signed.digest);
        // Another key's plan is refused all the same.
        assert_eq!(
            verify_plan_for_restore(&json, &trusted(&key(2)))
                .unwrap_err()
                .reason(),
            "untrusted_key"
        );
    }

    #[test]
    fn refusals_have_distinct_reasons() {
        let k = key(1);
        let t = trusted(&k);
        let signed = sign_plan(sample_plan(), &k).unwrap();
        let good = signed.envelope.to_json();
        let reason = |bytes: &[u8], now: UtcTime| {
            verify_plan(bytes, &t, now, CLOCK_SKEW)
                .unwrap_err()
                .reason()
        };

        // Edited after signing.
        let mut payload = signed.plan.to_json().unwrap();
        let pos = payload.windows(4).position(|w| w == b"2026").unwrap();
        payload[pos + 3] = b'7';
        let mut env = signed.envelope.clone();
        env.payload = BASE64.encode(&payload);
        assert_eq!(reason(&env.to_json(), in_window()), "bad_signature");

        // Signed by someone else.
        let other = sign_plan(sample_plan(), &key(2)).unwrap();
        assert_eq!(
            reason(&other.envelope.to_json(), in_window()),
            "untrusted_key"
        );

        // Window.
        assert_eq!(
            reason(&good, "2026-11-29T00:00:00Z".parse().unwrap()),
            "expired"
        );
        assert_eq!(
            reason(&good, "2026-11-28T22:00:00Z".parse().unwrap()),
            "not_yet_valid"
        );

        // Unknown field and newer schema, each properly signed.
        let mut v = serde_json::to_value(sample_plan()).unwrap();
        v["surprise"] = true.into();
        let env = Envelope::sign(PLAN_PAYLOAD_TYPE, &serde_json::to_vec(&v).unwrap(), &k);
        assert_eq!(reason(&env.to_json(), in_window()), "unknown_field");
        let mut v = serde_json::to_value(sample_plan()).unwrap();
        v["schema_version"] = 2.into();
        let env = Envelope::sign(PLAN_PAYLOAD_TYPE, &serde_json::to_vec(&v).unwrap(), &k);
        assert_eq!(reason(&env.to_json(), in_window()), "newer_schema");

        assert_eq!(reason(b"not json", in_window()), "malformed_envelope");
    }

    #[test]
    fn a_plan_boots_once_per_host() {
        let k = key(1);
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::new(dir.path().join("nonces"), CLOCK_SKEW);
        let env = sign_plan(sample_plan(), &k).unwrap().envelope.to_json();
        let t = trusted(&k);
        verify_plan_for_boot(&env, &t, in_window(), CLOCK_SKEW, &store).unwrap();
        let err = verify_plan_for_boot(&env, &t, in_window(), CLOCK_SKEW, &store).unwrap_err();
        assert_eq!(err.reason(), "replay");
        // A refused plan (here: untrusted) does not record its nonce.
        let other = sign_plan(
            Plan {
                nonce: "ff".repeat(16),
                ..sample_plan()
            },
            &key(2),
        )
        .unwrap()
        .envelope
        .to_json();
        assert_eq!(
            verify_plan_for_boot(&other, &t, in_window(), CLOCK_SKEW, &store)
                .unwrap_err()
                .reason(),
            "untrusted_key"
        );
        assert!(!std::fs::read_to_string(dir.path().join("nonces"))
            .unwrap()
            .contains(&"ff".repeat(16)));
    }

    #[test]
    fn unverified_decode_shows_the_plan() {
        let signed = sign_plan(sample_plan(), &key(3)).unwrap();
        let plan = decode_plan_unverified(&signed.envelope.to_json()).unwrap();
        assert_eq!(plan.plan_id, "p-0001");
    }

    #[test]
    fn invalid_plans_are_not_signed() {
        let mut plan = sample_plan();
        plan.resources.vcpus = 0;
        assert!(matches!(
            sign_plan(plan, &key(1)),
            Err(PlanError::Vcpus { value: 0 })
        ));
    }
}
