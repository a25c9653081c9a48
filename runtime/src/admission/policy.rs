//! The host's admission policy: a TOML file (`policy.toml` in the config
//! directory; documented in `docs/policy.md`). Every section is optional and
//! falls back to the default below; unknown keys are refused, so a typo never
//! silently loosens the policy.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use mvm_loader::plan::{self, EgressHost, EgressRule, Protocol, Tier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// File name of the policy in the config directory.
pub const POLICY_FILE: &str = "policy.toml";
/// Largest policy file read.
const MAX_POLICY_BYTES: u64 = 1 << 20;

/// The default policy, exactly as `docs/policy.md` shows it.
pub const DEFAULT_POLICY_TOML: &str = r#"# mvm admission policy (see docs/policy.md)

[limits]
max_vcpus = 4
max_memory_mib = 2048
max_timeout_secs = 3600

[images]
# Image names or sha256:<hex> image digests; "*" allows every image in the
# local store.
allow = ["*"]

[egress]
# "HOST:PORT" or "HOST:PORT/udp"; HOST is an IP address, a CIDR network,
# [IPv6] in brackets, or a DNS name; PORT may be "*". Empty: no network.
allow = []

[secrets]
# Names of secrets a plan may ask for (`mvm run --secret NAME`; docs/secrets.md).
allow = []
# A secret may be bound to images (names or "sha256:..." digests):
# [secrets.images]
# API_TOKEN = ["python"]
# A secret the guest only sees as a placeholder (`mvm run --secret NAME=PLACEHOLDER
# --for HOST`) goes only to the hosts listed for it here ("HOST" is port 443):
# [secrets.hosts]
# API_TOKEN = ["api.example.com", "upload.example.com:8443"]

[tier]
# container < emulated < delegated < hardware
minimum = "emulated"

[guest]
uid = 1000
gid = 1000
max_processes = 256
max_open_files = 1024
max_file_size_mib = 1024
"#;

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Resource caps.
    pub limits: Limits,
    /// Which images may run.
    pub images: ImageRules,
    /// Which destinations a plan may allow.
    pub egress: EgressRules,
    /// Which secrets a plan may name.
    pub secrets: SecretRules,
    /// The weakest backend tier a plan may require.
    pub tier: TierRule,
    /// The in-guest policy every plan carries.
    pub guest: plan::GuestPolicy,
    /// What may start from a snapshot.
    pub snapshots: SnapshotRules,
}

/// `[snapshots]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotRules {
    /// `mvm run` may start from the image's warm snapshot (`backend::warm`) instead of
    /// booting; each such run is still admitted with its own plan, and the VMM checks
    /// the snapshot against it. Off unless the policy says so: such a run's records
    /// hold `snapshot_restored` where a boot's hold `boot_verified`.
    pub warm_start: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most vCPUs per VM.
    pub max_vcpus: u8,
    /// Most memory per VM, MiB.
    pub max_memory_mib: u32,
    /// Longest workload timeout, seconds.
    pub max_timeout_secs: u32,
}

/// `[images]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageRules {
    /// Names, `sha256:<hex>` digests, or `"*"`.
    pub allow: Vec<String>,
}

/// `[egress]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressRules {
    /// Destinations a plan may allow.
    pub allow: Vec<EgressAllowance>,
}

/// `[secrets]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretRules {
    /// Secret names a plan may carry.
    pub allow: Vec<String>,
    /// `[secrets.images]`: a secret listed here may go only to these images (names or
    /// `sha256:` digests, as `[images] allow`); one not listed, to any allowed image.
    pub images: std::collections::BTreeMap<String, Vec<String>>,
    /// `[secrets.hosts]`: the hosts (`NAME` or `NAME:PORT`, port 443 by default) whose
    /// requests may carry the secret in place of its placeholder; a secret not listed
    /// here is never substituted.
    pub hosts: std::collections::BTreeMap<String, Vec<String>>,
}

impl SecretRules {
    /// Whether `[secrets.hosts]` lets `secret` go to `host:port`.
    #[must_use]
    pub fn host_allowed(&self, secret: &str, host: &str, port: u16) -> bool {
        self.hosts.get(secret).is_some_and(|hosts| {
            hosts.iter().any(|entry| {
                let (name, entry_port) = match entry.rsplit_once(':') {
                    Some((name, p)) => (name, p.parse::<u16>().ok()),
                    None => (entry.as_str(), Some(443)),
                };
                name.eq_ignore_ascii_case(host) && entry_port == Some(port)
            })
        })
    }
}

/// `[tier]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierRule {
    /// The weakest tier allowed.
    pub minimum: Tier,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vcpus: 4,
            max_memory_mib: 2048,
            max_timeout_secs: 3600,
        }
    }
}

impl Default for ImageRules {
    fn default() -> Self {
        Self {
            allow: vec!["*".to_owned()],
        }
    }
}

impl Default for TierRule {
    fn default() -> Self {
        Self {
            minimum: Tier::Emulated,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            images: ImageRules::default(),
            egress: EgressRules::default(),
            secrets: SecretRules::default(),
            tier: TierRule::default(),
            guest: plan::GuestPolicy {
                uid: 1000,
                gid: 1000,
                max_processes: 256,
                max_open_files: 1024,
                max_file_size_mib: 1024,
            },
            snapshots: SnapshotRules::default(),
        }
    }
}

/// Errors reading a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("policy {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("policy {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Policy {
    /// Parses policy TOML; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, PolicyError> {
        let invalid = |reason: String| PolicyError::Invalid {
            path: origin.to_owned(),
            reason,
        };
        let policy: Policy = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for name in policy
            .secrets
            .allow
            .iter()
            .chain(policy.secrets.images.keys())
            .chain(policy.secrets.hosts.keys())
        {
            plan::check_secret_name(name).map_err(invalid)?;
        }
        if policy.guest.uid == 0 || policy.guest.gid == 0 {
            return Err(invalid("[guest] uid and gid may not be 0".to_owned()));
        }
        Ok(policy)
    }

    /// Reads the policy at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        use std::io::Read as _;
        let io = |source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_POLICY_BYTES)
            .read_to_string(&mut text)
            .map_err(io)?;
        Self::from_toml(&text, path)
    }

    /// `policy.toml` in `config_dir` if it exists, else the default.
    pub fn load_or_default(config_dir: &Path) -> Result<Self, PolicyError> {
        let path = config_dir.join(POLICY_FILE);
        if path.exists() {
            Self::load(&path)
        } else {
            Ok(Self::default())
        }
    }
}

/// An egress destination a policy allows: like an [`EgressRule`], but the
/// port may be any (`*`) and a network covers the addresses inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllowance {
    /// Address, network or name.
    pub host: EgressHost,
    /// `None` for any port.
    pub port: Option<u16>,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// Why a `HOST:PORT[/proto]` string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress {input:?}: {reason} (expected HOST:PORT or HOST:PORT/udp; IPv6 as [ADDR]:PORT)")]
pub struct EgressParseError {
    /// The input.
    pub input: String,
    /// What is wrong.
    pub reason: String,
}

/// Splits `HOST:PORT[/tcp|/udp]` into its parts.
fn split_destination(s: &str) -> Result<(EgressHost, &str, Protocol), EgressParseError> {
    let err = |reason: &str| EgressParseError {
        input: s.chars().take(100).collect(),
        reason: reason.to_owned(),
    };
    let (rest, protocol) = match s.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "udp")) => (rest, Protocol::Udp),
        // A slash that is part of a CIDR network, not a protocol suffix.
        _ => (s, Protocol::Tcp),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or_else(|| err("unclosed '['"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| err("missing :PORT"))?;
        (host, port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
        if host.contains(':') {
            return Err(err("IPv6 addresses must be written in brackets"));
        }
        (host, port)
    };
    let host: EgressHost = host
        .parse()
        .map_err(|e: plan::EgressHostParseError| err(&e.to_string()))?;
    Ok((host, port, protocol))
}

fn parse_port(port: &str, input: &str) -> Result<u16, EgressParseError> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => Ok(p),
        _ => Err(EgressParseError {
            input: input.chars().take(100).collect(),
            reason: format!("port {port:?} is not 1..=65535"),
        }),
    }
}

/// Parses a request's `--allow HOST:PORT[/udp]`.
pub fn parse_egress_rule(s: &str) -> Result<EgressRule, EgressParseError> {
    let (host, port, protocol) = split_destination(s)?;
    Ok(EgressRule {
        host,
        port: parse_port(port, s)?,
        last_port: None,
        protocol,
    })
}

impl std::str::FromStr for EgressAllowance {
    type Err = EgressParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port, protocol) = split_destination(s)?;
        let port = if port == "*" {
            None
        } else {
            Some(parse_port(port, s)?)
        };
        Ok(Self {
            host,
            port,
            protocol,
        })
    }
}

impl fmt::Display for EgressAllowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host {
            EgressHost::Ip(IpAddr::V6(_)) | EgressHost::Cidr(IpAddr::V6(_), _) => {
                format!("[{}]", self.host)
            }
            _ => self.host.to_string(),
        };
        let port = self.port.map_or("*".to_owned(), |p| p.to_string());
        match self.protocol {
            Protocol::Tcp => write!(f, "{host}:{port}"),
            Protocol::Udp => write!(f, "{host}:{port}/udp"),
        }
    }
}

impl Serialize for EgressAllowance {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressAllowance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `addr` as a 128-bit number and its width (32 or 128).
fn ip_bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// True if network `net/bits` contains `ip/ip_prefix` entirely.
fn network_contains(net: IpAddr, bits: u8, ip: IpAddr, ip_prefix: u8) -> bool {
    let ((n, n_width), (a, a_width)) = (ip_bits(net), ip_bits(ip));
    if n_width != a_width || ip_prefix < bits {
        return false;
    }
    let mask = u128::MAX
        .checked_shl(u32::from(128 - bits.min(128)))
        .unwrap_or(0);
    n & mask == a & mask
}

impl EgressAllowance {
    /// True if this allowance covers `rule`.
    pub fn covers(&self, rule: &EgressRule) -> bool {
        // netrt: a one-port allowance covers only that port, never a range around it.
        let one_port = |p: u16| p == rule.port && rule.last_port.unwrap_or(p) == p;
        if self.protocol != rule.protocol || self.port.is_some_and(|p| !one_port(p)) {
            return false;
        }
        match (&self.host, &rule.host) {
            (EgressHost::Name(a), EgressHost::Name(b)) => a == b,
            (EgressHost::Ip(a), EgressHost::Ip(b)) => a == b,
            (EgressHost::Cidr(net, bits), EgressHost::Ip(ip)) => {
                network_contains(*net, *bits, *ip, ip_bits(*ip).1)
            }
            (EgressHost::Cidr(net, bits), EgressHost::Cidr(ip, prefix)) => {
                network_contains(*net, *bits, *ip, *prefix)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_text_is_the_default_policy() {
        let parsed = Policy::from_toml(DEFAULT_POLICY_TOML, Path::new("default")).unwrap();
        assert_eq!(parsed, Policy::default());
        assert_eq!(
            Policy::from_toml("", Path::new("empty")).unwrap(),
            Policy::default()
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        for bad in [
            "[limits]\nmax_cpus = 8\n",
            "[network]\n",
            "[tier]\nminimum = \"vm\"\n",
            "[egress]\nallow = [\"example.com\"]\n",
            "[secrets]\nallow = [\"a b\"]\n",
            "[guest]\nuid = 0\n",
        ] {
            let err = Policy::from_toml(bad, Path::new("p.toml")).unwrap_err();
            assert!(err.to_string().starts_with("policy p.toml"), "{err}");
        }
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let p = Policy::from_toml("[limits]\nmax_vcpus = 8\n", Path::new("p")).unwrap();
        assert_eq!(p.limits.max_vcpus, 8);
        assert_eq!(p.limits.max_memory_mib, 2048);
    }

    #[test]
    fn destinations_parse() {
        let r = parse_egress_rule("example.com:443").unwrap();
        assert_eq!((r.port, r.protocol), (443, Protocol::Tcp));
        let r = parse_egress_rule("[2001:db8::1]:53/udp").unwrap();
        assert_eq!(r.protocol, Protocol::Udp);
        assert_eq!(r.to_string(), "[2001:db8::1]:53/udp");
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:x",
            "2001:db8::1:53",
            "[::1:53",
            "a:*",
        ] {
            assert!(parse_egress_rule(bad).is_err(), "{bad}");
        }
        let a: EgressAllowance = "10.0.0.0/8:*".parse().unwrap();
        assert_eq!(a.port, None);
        assert_eq!(a.to_string(), "10.0.0.0/8:*");
        let a: EgressAllowance = "10.0.0.0/8:53/udp".parse().unwrap();
        assert_eq!((a.port, a.protocol), (Some(53), Protocol::Udp));
    }

    #[test]
    fn allowances_cover_what_they_should_and_nothing_else() {
        let allow = |s: &str| s.parse::<EgressAllowance>().unwrap();
        let rule = |s: &str| parse_egress_rule(s).unwrap();
        assert!(allow("10.0.0.0/8:*").covers(&rule("10.1.2.3:443")));
        assert!(allow("10.0.0.0/8:*").covers(&rule("10.1.0.0/16:443")));
        assert!(!allow("10.0.0.0/8:*").covers(&rule("11.0.0.1:443")));
        assert!(!allow("10.0.0.0/8:*").covers(&rule("0.0.0.0/0:443")));
        assert!(!allow("10.0.0.0/8:*").covers(&rule("10.1.2.3:53/udp")));
        assert!(allow("0.0.0.0/0:443").covers(&rule("192.0.2.1:443")));
        assert!(!allow("0.0.0.0/0:443").covers(&rule("[2001:db8::1]:443")));
        assert!(allow("example.com:443").covers(&rule("example.com:443")));
        assert!(!allow("example.com:443").covers(&rule("evil.example.com:443")));
        assert!(!allow("example.com:443").covers(&rule("example.com:80")));
        assert!(allow("[2001:db8::/32]:*").covers(&rule("[2001:db8::5]:22")));
    }
}
