//! Admission: turning "run this" into a signed plan, or a denial that names the
//! policy rule and why.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mvm_runtime::admission::{admit, keys, AdmissionRequest, HostKeys, ImageFacts, Policy};
//! use mvm_loader::plan::UtcTime;
//!
//! let config = keys::config_dir()?;
//! let keys = HostKeys::load_or_create(&config)?.0;
//! let policy = Policy::load_or_default(&config)?;
//! # let stored: mvm_runtime::image::StoredImage = todo!();
//! let image = ImageFacts::from_stored(&stored, &["default".to_owned()])?;
//! let mut request = AdmissionRequest::new("default");
//! request.vcpus = 2;
//! match admit(&request, &image, &policy, &keys.admission, UtcTime::now()) {
//!     Ok(signed) => std::fs::write("plan.dsse.json", signed.envelope.to_json())?,
//!     Err(denied) => eprintln!("{denied}"), // e.g. exit with the denial status
//! }
//! # Ok(()) }
//! ```

pub mod keys;
pub mod policy;

use std::fmt;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::{sign_plan, SignedPlan};
use mvm_loader::plan::{
    self, Artifacts, Devices, EgressPolicy, EgressRule, NetDevice, NetInterface, PinnedDisk, Plan,
    PlanError, PortForward, Resources, ScratchDisk, Tier, UtcTime, VsockDevice, SCHEMA_VERSION,
};
use rand_core::{OsRng, RngCore};

use crate::image::StoredImage;
pub use keys::HostKeys;
pub use policy::{parse_egress_rule, Policy};

/// How long after admission a plan may still boot. The VMM checks the window
/// when it starts, so this only covers admission-to-boot, not the workload.
pub const BOOT_WINDOW: Duration = Duration::from_secs(300);
/// The guest context id the vsock device gets.
pub const GUEST_CID: u32 = 3;

/// What a caller asks to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionRequest {
    /// The image as the user named it (a name or a digest).
    pub image_ref: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Workload timeout, seconds.
    pub timeout_secs: u32,
    /// Destinations the guest may reach; empty means no network device.
    pub egress: Vec<EgressRule>,
    /// Secrets that may be released into the VM.
    pub secrets: Vec<String>,
    /// Secrets the guest sees only as placeholders (the plan's `substitution`,
    /// everything but the names already checked and pinned by the caller).
    pub substitution: Option<plan::Substitution>,
    /// The weakest tier the caller accepts; `None` takes the policy minimum.
    pub required_tier: Option<Tier>,
    /// Writable scratch disks.
    pub scratch_disks: Vec<ScratchDisk>,
    /// netrt: the guest's network interface (`--net`); with it the plan gets a network
    /// device even without egress rules.
    pub net: Option<NetInterface>,
    /// TCP forwards from the host's loopback into the guest (a sandbox's `-p`).
    pub forwards: Vec<PortForward>,
}

impl AdmissionRequest {
    /// A request with small defaults: 1 vCPU, 256 MiB, 600 s, no network, no
    /// secrets.
    pub fn new(image_ref: &str) -> Self {
        Self {
            image_ref: image_ref.to_owned(),
            vcpus: 1,
            memory_mib: 256,
            timeout_secs: 600,
            egress: Vec::new(),
            secrets: Vec::new(),
            substitution: None,
            required_tier: None,
            scratch_disks: Vec::new(),
            net: None,
            forwards: Vec::new(),
        }
    }
}

/// What admission needs to know about the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// The image digest (`sha256` of its manifest).
    pub digest: Sha256Digest,
    /// Names that point at it in the local store.
    pub names: Vec<String>,
    /// Kernel digest.
    pub kernel: Sha256Digest,
    /// Initramfs digest, if the image has one.
    pub initramfs: Option<Sha256Digest>,
    /// The exact kernel command line.
    pub cmdline: String,
    /// Read-only disks pinned by their verity trees.
    pub disks: Vec<PinnedDisk>,
}

impl ImageFacts {
    /// From an image in the store and the names pointing at it. The manifest's
    /// digests are parsed strictly and its command line digest checked.
    pub fn from_stored(image: &StoredImage, names: &[String]) -> Result<Self, AdmitError> {
        let parse = |what: &str, s: &str| {
            s.parse::<Sha256Digest>()
                .map_err(|e| AdmitError::Image(format!("{what}: {e}")))
        };
        let m = &image.manifest;
        let cmdline_digest = parse("cmdline_sha256", &m.cmdline_sha256)?;
        if Sha256Digest::of(m.cmdline.as_bytes()) != cmdline_digest {
            return Err(AdmitError::Image(
                "manifest cmdline_sha256 is not the digest of its cmdline".to_owned(),
            ));
        }
        Ok(Self {
            digest: parse("image digest", &image.digest)?,
            names: names.to_vec(),
            kernel: parse("kernel", &m.kernel.sha256)?,
            initramfs: Some(parse("initramfs", &m.initramfs.sha256)?),
            cmdline: m.cmdline.clone(),
            // The image's root disk first: it is `vda` in the guest.
            disks: m
                .rootfs
                .iter()
                .map(|r| PinnedDisk {
                    name: ROOT_DISK.to_owned(),
                    verity: r.verity.clone(),
                })
                .collect(),
        })
    }
}

/// The plan's name for an image's root disk.
pub const ROOT_DISK: &str = "root";

/// The policy rule behind a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `[limits] max_vcpus`.
    MaxVcpus,
    /// `[limits] max_memory_mib`.
    MaxMemory,
    /// `[limits] max_timeout_secs`.
    MaxTimeout,
    /// `[images] allow`.
    Images,
    /// `[egress] allow`.
    Egress,
    /// `[secrets] allow`.
    Secrets,
    /// `[tier] minimum`.
    MinimumTier,
    /// The plan schema's own limits (not the host policy).
    PlanSchema,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MaxVcpus => "limits.max_vcpus",
            Self::MaxMemory => "limits.max_memory_mib",
            Self::MaxTimeout => "limits.max_timeout_secs",
            Self::Images => "images.allow",
            Self::Egress => "egress.allow",
            Self::Secrets => "secrets.allow",
            Self::MinimumTier => "tier.minimum",
            Self::PlanSchema => "plan schema",
        })
    }
}

/// A refusal by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by policy rule {rule}: {reason}")]
pub struct Denial {
    /// The rule.
    pub rule: Rule,
    /// Why, with the values involved.
    pub reason: String,
}

/// Why admission produced no plan.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The policy denies the request.
    #[error("{0}")]
    Denied(#[from] Denial),
    /// The image's manifest cannot be turned into a plan.
    #[error("image: {0}")]
    Image(String),
    /// The clock is outside what a plan can express.
    #[error("host clock {0} cannot start a plan window")]
    Clock(UtcTime),
}

fn deny(rule: Rule, reason: String) -> AdmitError {
    AdmitError::Denied(Denial { rule, reason })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Checks `request` for `image` against `policy`; builds the plan and signs it
/// with the admission key. The plan is valid from `now` for [`BOOT_WINDOW`].
pub fn admit(
    request: &AdmissionRequest,
    image: &ImageFacts,
    policy: &Policy,
    admission_key: &SigningKey,
    now: UtcTime,
) -> Result<SignedPlan, AdmitError> {
    check_policy(request, image, policy)?;
    let required_tier = request.required_tier.unwrap_or(policy.tier.minimum);
    let plan = Plan {
        schema_version: SCHEMA_VERSION,
        plan_id: format!("plan-{}", random_hex(8)),
        not_before: now,
        not_after: now.checked_add(BOOT_WINDOW).ok_or(AdmitError::Clock(now))?,
        nonce: random_hex(32),
        artifacts: Artifacts {
            kernel: image.kernel,
            initramfs: image.initramfs,
            cmdline: Sha256Digest::of(image.cmdline.as_bytes()),
            disks: image.disks.clone(),
        },
        resources: Resources {
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            timeout_secs: request.timeout_secs,
        },
        devices: Devices {
            vsock: Some(VsockDevice {
                guest_cid: GUEST_CID,
                forwards: request.forwards.clone(),
            }),
            scratch_disks: request.scratch_disks.clone(),
            net: (request.net.is_some() || !request.egress.is_empty()).then(|| NetDevice {
                interface: request.net.clone(),
                egress: EgressPolicy {
                    allow: request.egress.clone(),
                },
            }),
        },
        guest: policy.guest,
        secrets: request.secrets.clone(),
        substitution: request.substitution.clone(),
        required_tier,
    };
    // The schema's own bounds (vCPUs >= 1, names, list sizes) refuse here.
    sign_plan(plan, admission_key).map_err(|e: PlanError| deny(Rule::PlanSchema, e.to_string()))
}

/// `[secrets] allow` and `[secrets.images]` for one secret and the run's image.
fn check_secret_allowed(
    name: &str,
    image_ref: &str,
    image: &ImageFacts,
    policy: &Policy,
) -> Result<(), AdmitError> {
    let digest = image.digest.to_string();
    plan::check_secret_name(name).map_err(|r| deny(Rule::Secrets, r))?;
    if !policy.secrets.allow.iter().any(|a| a == name) {
        return Err(deny(
            Rule::Secrets,
            format!("secret {name:?} is not in the allowed list"),
        ));
    }
    if let Some(bound) = policy.secrets.images.get(name) {
        let matches = bound
            .iter()
            .any(|b| *b == digest || image.names.iter().any(|n| n == b));
        if !matches {
            return Err(deny(
                Rule::Secrets,
                format!(
                    "secret {name:?} is bound to the images {bound:?} ([secrets.images]), not {image_ref:?} ({digest})"
                ),
            ));
        }
    }
    Ok(())
}

/// A substituted secret is allowed as a released one is, and only towards the hosts
/// `[secrets.hosts]` lists for it.
fn check_substitution(
    substitution: &plan::Substitution,
    image_ref: &str,
    image: &ImageFacts,
    policy: &Policy,
) -> Result<(), AdmitError> {
    for secret in &substitution.secrets {
        check_secret_allowed(&secret.name, image_ref, image, policy)?;
        for host in &secret.hosts {
            if !policy
                .secrets
                .host_allowed(&secret.name, &host.name, host.port)
            {
                return Err(deny(
                    Rule::Secrets,
                    format!(
                        "secret {:?} may not be substituted for {}:{} (not in [secrets.hosts])",
                        secret.name, host.name, host.port
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `[limits] max_memory_mib` alone: the one rule that also holds for `--dev`
/// runs, which skip admission but must not ask the host for more memory than
/// its owner allows any VM.
pub fn check_memory_rule(memory_mib: u32, policy: &Policy) -> Result<(), Denial> {
    let max = policy.limits.max_memory_mib;
    if memory_mib > max {
        return Err(Denial {
            rule: Rule::MaxMemory,
            reason: format!("{memory_mib} MiB requested, at most {max} MiB allowed"),
        });
    }
    Ok(())
}

/// The policy checks alone, in a fixed order (first failure wins).
pub fn check_policy(
    request: &AdmissionRequest,
    image: &ImageFacts,
    policy: &Policy,
) -> Result<(), AdmitError> {
    let limits = &policy.limits;
    if request.vcpus > limits.max_vcpus {
        return Err(deny(
            Rule::MaxVcpus,
            format!(
                "{} vCPUs requested, at most {} allowed",
                request.vcpus, limits.max_vcpus
            ),
        ));
    }
    check_memory_rule(request.memory_mib, policy)?;
    if request.timeout_secs > limits.max_timeout_secs {
        return Err(deny(
            Rule::MaxTimeout,
            format!(
                "timeout {} s requested, at most {} s allowed",
                request.timeout_secs, limits.max_timeout_secs
            ),
        ));
    }
    let digest = image.digest.to_string();
    let image_allowed = policy.images.allow.iter().any(|allowed| {
        allowed == "*" || *allowed == digest || image.names.iter().any(|n| n == allowed)
    });
    if !image_allowed {
        return Err(deny(
            Rule::Images,
            format!(
                "image {:?} ({digest}) is not in the allowed list",
                request.image_ref
            ),
        ));
    }
    for rule in &request.egress {
        if !policy.egress.allow.iter().any(|a| a.covers(rule)) {
            return Err(deny(
                Rule::Egress,
                format!("egress to {rule} is not allowed by any policy entry"),
            ));
        }
    }
    for name in &request.secrets {
        check_secret_allowed(name, &request.image_ref, image, policy)?;
    }
    if let Some(substitution) = &request.substitution {
        check_substitution(substitution, &request.image_ref, image, policy)?;
    }
    let required = request.required_tier.unwrap_or(policy.tier.minimum);
    if required < policy.tier.minimum {
        return Err(deny(
            Rule::MinimumTier,
            format!(
                "request accepts tier {required}, weaker than the policy minimum {}",
                policy.tier.minimum
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_loader::dsse::TrustedKeys;
    use mvm_loader::plan::envelope::verify_plan;
    use mvm_loader::plan::CLOCK_SKEW;

    fn image() -> ImageFacts {
        ImageFacts {
            digest: Sha256Digest::of(b"manifest"),
            names: vec!["default".to_owned()],
            kernel: Sha256Digest::of(b"kernel"),
            initramfs: Some(Sha256Digest::of(b"initramfs")),
            cmdline: "console=ttyS0 quiet".to_owned(),
            disks: Vec::new(),
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[4; 32])
    }

    fn now() -> UtcTime {
        "2026-11-29T00:00:00Z".parse().unwrap()
    }

    fn denied_rule(request: &AdmissionRequest, policy: &Policy) -> Rule {
        match admit(request, &image(), policy, &key(), now()) {
            Err(AdmitError::Denied(d)) => d.rule,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn admitted_plan_verifies_and_pins_the_image() {
        let mut request = AdmissionRequest::new("default");
        request.vcpus = 2;
        let signed = admit(&request, &image(), &Policy::default(), &key(), now()).unwrap();
        let mut trusted = TrustedKeys::new();
        trusted.add(key().verifying_key());
        let v = verify_plan(&signed.envelope.to_json(), &trusted, now(), CLOCK_SKEW).unwrap();
        assert_eq!(v.plan.artifacts.kernel, image().kernel);
        assert_eq!(
            v.plan.artifacts.cmdline,
            Sha256Digest::of(b"console=ttyS0 quiet")
        );
        assert_eq!(v.plan.resources.vcpus, 2);
        assert_eq!(v.plan.required_tier, Tier::Emulated);
        assert!(v.plan.devices.net.is_none());
        assert_eq!(v.digest, signed.digest);
        // Two admissions never share a nonce or a plan id.
        let other = admit(&request, &image(), &Policy::default(), &key(), now()).unwrap();
        assert_ne!(other.plan.nonce, signed.plan.nonce);
        assert_ne!(other.plan.plan_id, signed.plan.plan_id);
    }

    #[test]
    fn image_facts_come_from_a_stored_manifest() {
        use crate::image::manifest::{sha256_digest, Artifact, Manifest, MANIFEST_SCHEMA};
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            kernel: Artifact::of("vmlinux", b"kernel"),
            initramfs: Artifact::of("initramfs.cpio", b"initramfs"),
            cmdline: "console=ttyS0 quiet".into(),
            cmdline_sha256: sha256_digest(b"console=ttyS0 quiet"),
            agent_vsock_port: 1024,
            inputs: Vec::new(),
            rootfs: None,
            lock_sha256: None,
            config: None,
        };
        let mut stored = StoredImage {
            digest: sha256_digest(b"manifest"),
            dir: std::path::PathBuf::from("/nonexistent"),
            manifest,
        };
        let facts = ImageFacts::from_stored(&stored, &["default".to_owned()]).unwrap();
        assert_eq!(facts, image());
        stored.manifest.cmdline.push(' ');
        assert!(matches!(
            ImageFacts::from_stored(&stored, &[]),
            Err(AdmitError::Image(_))
        ));
        stored.manifest.cmdline.pop();
        stored.manifest.kernel.sha256 = "md5:abc".into();
        assert!(matches!(
            ImageFacts::from_stored(&stored, &[]),
            Err(AdmitError::Image(_))
        ));
    }

    #[test]
    fn each_rule_denies_by_name() {
        let policy = Policy::default();
        let mut r = AdmissionRequest::new("default");
        r.vcpus = 5;
        assert_eq!(denied_rule(&r, &policy), Rule::MaxVcpus);
        let mut r = AdmissionRequest::new("default");
        r.memory_mib = 4096;
        assert_eq!(denied_rule(&r, &policy), Rule::MaxMemory);
        let mut r = AdmissionRequest::new("default");
        r.timeout_secs = 3601;
        assert_eq!(denied_rule(&r, &policy), Rule::MaxTimeout);
        let mut r = AdmissionRequest::new("default");
        r.egress = vec![parse_egress_rule("example.com:443").unwrap()];
        assert_eq!(denied_rule(&r, &policy), Rule::Egress);
        let mut r = AdmissionRequest::new("default");
        r.secrets = vec!["TOKEN".to_owned()];
        assert_eq!(denied_rule(&r, &policy), Rule::Secrets);
        let mut r = AdmissionRequest::new("default");
        r.required_tier = Some(Tier::Container);
        assert_eq!(denied_rule(&r, &policy), Rule::MinimumTier);
        let mut strict = Policy::default();
        strict.images.allow = vec!["other".to_owned()];
        assert_eq!(
            denied_rule(&AdmissionRequest::new("default"), &strict),
            Rule::Images
        );
        let mut r = AdmissionRequest::new("default");
        r.vcpus = 0;
        assert_eq!(denied_rule(&r, &policy), Rule::PlanSchema);
    }

    #[test]
    fn denial_message_names_rule_and_values() {
        let mut r = AdmissionRequest::new("default");
        r.vcpus = 8;
        let err = admit(&r, &image(), &Policy::default(), &key(), now()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "denied by policy rule limits.max_vcpus: 8 vCPUs requested, at most 4 allowed"
        );
    }

    #[test]
    fn a_substituted_secret_goes_only_to_the_hosts_the_policy_binds_it_to() {
        let policy = Policy::from_toml(
            "[egress]\nallow = [\"192.0.2.0/24:*\"]\n[secrets]\nallow = [\"TOKEN\", \"FREE\"]\n\
             [secrets.hosts]\nTOKEN = [\"api.example.com\", \"up.example.com:8443\"]\n",
            std::path::Path::new("p"),
        )
        .unwrap();
        let bound = |secret: &str, host: &str, port: u16| {
            let mut r = AdmissionRequest::new("default");
            r.net = Some(plan::NetInterface {
                mac: "02:00:0a:c8:00:02".into(),
                address: std::net::Ipv4Addr::new(10, 200, 0, 2),
                prefix_len: 30,
                gateway: std::net::Ipv4Addr::new(10, 200, 0, 1),
                resolvers: vec![],
            });
            r.egress = vec![EgressRule {
                host: "192.0.2.7".parse().unwrap(),
                port,
                last_port: None,
                protocol: plan::Protocol::Tcp,
            }];
            r.substitution = Some(plan::Substitution {
                ca_sha256: Sha256Digest::of(b"ca"),
                secrets: vec![plan::SubstitutedSecret {
                    name: secret.into(),
                    placeholder: "MVM_PLACEHOLDER_X".into(),
                    hosts: vec![plan::BoundHost {
                        name: host.into(),
                        port,
                        addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 7)],
                    }],
                }],
            });
            r
        };
        let signed = admit(
            &bound("TOKEN", "api.example.com", 443),
            &image(),
            &policy,
            &key(),
            now(),
        )
        .unwrap();
        assert!(signed.plan.substitution.is_some());
        assert!(admit(
            &bound("TOKEN", "up.example.com", 8443),
            &image(),
            &policy,
            &key(),
            now()
        )
        .is_ok());
        for (secret, host, port) in [
            ("TOKEN", "evil.example.com", 443),
            ("TOKEN", "api.example.com", 8443),
            ("TOKEN", "up.example.com", 443),
            ("FREE", "api.example.com", 443),
            ("OTHER", "api.example.com", 443),
        ] {
            assert_eq!(
                denied_rule(&bound(secret, host, port), &policy),
                Rule::Secrets,
                "{secret} {host}:{port}"
            );
        }
    }

    #[test]
    fn a_secret_bound_to_other_images_is_denied() {
        let policy = Policy::from_toml(
            "[secrets]\nallow = [\"TOKEN\", \"FREE\"]\n[secrets.images]\nTOKEN = [\"python\"]\n",
            std::path::Path::new("p"),
        )
        .unwrap();
        let mut r = AdmissionRequest::new("default");
        r.secrets = vec!["FREE".to_owned()];
        assert!(admit(&r, &image(), &policy, &key(), now()).is_ok());
        r.secrets = vec!["TOKEN".to_owned()];
        assert_eq!(denied_rule(&r, &policy), Rule::Secrets);
        let mut python = image();
        python.names.push("python".to_owned());
        assert!(admit(&r, &python, &policy, &key(), now()).is_ok());
        let bad = "[secrets]\nallow = []\n[secrets.images]\n\"a b\" = [\"x\"]\n";
        assert!(Policy::from_toml(bad, std::path::Path::new("p")).is_err());
    }

    #[test]
    fn allowed_egress_secrets_and_images_pass_into_the_plan() {
        let policy = Policy::from_toml(
            "[images]\nallow = [\"default\"]\n[egress]\nallow = [\"10.0.0.0/8:*\"]\n[secrets]\nallow = [\"TOKEN\"]\n",
            std::path::Path::new("p"),
        )
        .unwrap();
        let mut r = AdmissionRequest::new("default");
        r.egress = vec![parse_egress_rule("10.1.2.3:443").unwrap()];
        r.secrets = vec!["TOKEN".to_owned()];
        r.required_tier = Some(Tier::Hardware);
        let signed = admit(&r, &image(), &policy, &key(), now()).unwrap();
        let net = signed.plan.devices.net.unwrap();
        assert_eq!(net.egress.allow, r.egress);
        assert_eq!(signed.plan.secrets, vec!["TOKEN".to_owned()]);
        assert_eq!(signed.plan.required_tier, Tier::Hardware);
        let mut by_digest = policy.clone();
        by_digest.images.allow = vec![image().digest.to_string()];
        assert!(admit(
            &AdmissionRequest::new("x"),
            &image(),
            &by_digest,
            &key(),
            now()
        )
        .is_ok());
    }
}
