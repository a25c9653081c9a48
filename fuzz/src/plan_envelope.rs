//! `plan_envelope`: what a plan author (or anyone who can write the plan file) hands
//! the VMM: the DSSE envelope decoder, the plan parser and validator, and the whole
//! `verify_plan` path with a trusted key.
//!
//! Invariants: whatever parses re-serialises and parses to the same value; a plan that
//! parses also validates; `verify_plan` accepts only the exact payload the harness key
//! signed (no mutation of a signed envelope verifies), and only inside its window.

use std::sync::OnceLock;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mvm_loader::dsse::{Envelope, TrustedKeys};
use mvm_loader::measure::sha256;
use mvm_loader::plan::envelope::{decode_plan_unverified, sign_plan, verify_plan};
use mvm_loader::plan::{
    Artifacts, Devices, EgressPolicy, EgressRule, GuestPolicy, NetDevice, PinnedDisk, Plan,
    Protocol, Resources, ScratchDisk, Tier, UtcTime, VsockDevice, PLAN_PAYLOAD_TYPE,
    SCHEMA_VERSION,
};
use mvm_loader::verity::{RootHash, Salt, VerityParams};

/// The harness's signing key (fixed, so the committed seed envelopes verify).
#[must_use]
pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[0x6d; 32])
}

/// A plan with every section filled in.
#[must_use]
pub fn sample_plan() -> Plan {
    Plan {
        schema_version: SCHEMA_VERSION,
        plan_id: "fuzz-0001".to_owned(),
        not_before: "2026-11-28T23:00:00Z".parse().expect("time"),
        not_after: "2026-11-28T23:10:00Z".parse().expect("time"),
        nonce: "00112233445566778899aabbccddeeff".to_owned(),
        artifacts: Artifacts {
            kernel: sha256(b"kernel"),
            initramfs: Some(sha256(b"initramfs")),
            cmdline: sha256(b"console=ttyS0 quiet"),
            disks: vec![PinnedDisk {
                name: "root".to_owned(),
                verity: VerityParams {
                    root_hash: RootHash([7; 32]),
                    salt: Salt(vec![1, 2, 3, 4]),
                    data_block_size: 4096,
                    hash_block_size: 4096,
                    data_size: 4096 * 100,
                },
            }],
        },
        resources: Resources {
            vcpus: 2,
            memory_mib: 512,
            timeout_secs: 60,
        },
        devices: Devices {
            vsock: Some(VsockDevice::new(3)),
            scratch_disks: vec![ScratchDisk {
                name: "scratch".to_owned(),
                size_mib: 64,
            }],
            net: Some(NetDevice {
                interface: None,
                egress: EgressPolicy {
                    allow: vec![
                        EgressRule {
                            host: "10.0.0.0/8".parse().expect("cidr"),
                            port: 443,
                            last_port: None,
                            protocol: Protocol::Tcp,
                        },
                        EgressRule {
                            host: "2001:db8::1".parse().expect("ip"),
                            port: 53,
                            last_port: None,
                            protocol: Protocol::Udp,
                        },
                    ],
                },
            }),
        },
        guest: GuestPolicy {
            uid: 1000,
            gid: 1000,
            max_processes: 256,
            max_open_files: 1024,
            max_file_size_mib: 1024,
        },
        secrets: vec!["GITHUB_TOKEN".to_owned()],
        // None: the committed seeds were signed from this plan as it was.
        substitution: None,
        required_tier: Tier::Emulated,
    }
}

/// The sample plan's envelope, signed by [`signing_key`].
#[must_use]
pub fn sample_envelope() -> Envelope {
    sign_plan(sample_plan(), &signing_key())
        .expect("sample plan signs")
        .envelope
}

/// A time inside the sample plan's window.
fn inside_window() -> UtcTime {
    "2026-11-28T23:05:00Z".parse().expect("time")
}

/// The trusted key set and the one payload the harness signed, built once.
static FIXED: OnceLock<(TrustedKeys, Vec<u8>)> = OnceLock::new();

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Ok(plan) = Plan::from_json(data) {
        plan.validate().expect("a parsed plan validates");
        let json = plan.to_json().expect("a parsed plan serialises");
        let again = Plan::from_json(&json).expect("a serialised plan parses");
        assert_eq!(again, plan, "plan changed in a round trip");
    }

    let Ok(envelope) = Envelope::from_json(data) else {
        return;
    };
    let again = Envelope::from_json(&envelope.to_json()).expect("a serialised envelope parses");
    assert_eq!(again, envelope, "envelope changed in a round trip");
    let _ = decode_plan_unverified(data);

    let (trusted, signed_payload) = FIXED.get_or_init(|| {
        let mut trusted = TrustedKeys::new();
        trusted.add(signing_key().verifying_key());
        let payload = sample_envelope()
            .payload_unverified()
            .expect("sample payload decodes");
        (trusted, payload)
    });
    if let Ok(verified) = envelope.verify(PLAN_PAYLOAD_TYPE, trusted) {
        assert_eq!(
            &verified.payload, signed_payload,
            "a payload the harness key never signed verified"
        );
    }
    let skew = Duration::from_secs(60);
    if let Ok(verified) = verify_plan(data, trusted, inside_window(), skew) {
        assert_eq!(
            verified.plan,
            sample_plan(),
            "verify_plan accepted another plan"
        );
    }
    let late: UtcTime = "2026-11-29T01:00:00Z".parse().expect("time");
    assert!(
        verify_plan(data, trusted, late, skew).is_err(),
        "verify_plan accepted an expired plan"
    );
}
