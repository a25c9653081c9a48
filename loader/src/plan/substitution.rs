//! Secrets the guest never holds: it sees a placeholder, and the host's egress proxy
//! puts the value in place of it only in requests to the hosts the plan binds the
//! secret to (docs/secrets.md). The plan pins the binding (names, placeholders,
//! hosts and the addresses those were resolved to) and the digest of the per-run CA
//! certificate the guest is told to trust, so a signature covers all of it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::{
    check_secret_name, check_token, field_err, EgressHost, EgressRule, PlanError, Protocol,
};
use crate::measure::Sha256Digest;

/// Most substituted secrets in one plan.
pub const MAX_SUBSTITUTED: usize = 16;
/// Most hosts one secret is bound to.
pub const MAX_BOUND_HOSTS: usize = 8;
/// Most addresses one bound host was pinned to.
pub const MAX_BOUND_ADDRESSES: usize = 16;
/// Placeholder length range, in bytes.
pub const PLACEHOLDER_LEN: std::ops::RangeInclusive<usize> = 8..=256;

/// The substitution section of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Substitution {
    /// sha256 of the DER of the per-run CA certificate the guest trusts; its key
    /// never leaves the `mvm` process that runs the proxy.
    pub ca_sha256: Sha256Digest,
    /// The substituted secrets.
    pub secrets: Vec<SubstitutedSecret>,
}

/// One secret the guest sees only as its placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstitutedSecret {
    /// The stored secret's name.
    pub name: String,
    /// What the guest sees and sends instead: [`PLACEHOLDER_LEN`] bytes of
    /// `A-Z a-z 0-9 _ . -`.
    pub placeholder: String,
    /// The hosts whose requests get the value.
    pub hosts: Vec<BoundHost>,
}

/// A host a secret is bound to: the name its TLS certificate must carry, the port, and
/// the addresses the name was pinned to at admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundHost {
    /// DNS name, lowercase.
    pub name: String,
    /// TCP port (HTTPS).
    pub port: u16,
    /// The IPv4 addresses `name` resolved to.
    pub addresses: Vec<Ipv4Addr>,
}

/// Whether `name` is a lowercase DNS name: labels of `a-z 0-9 -` (1..=63 bytes, not
/// starting or ending with `-`), at most 253 bytes, and not all digits and dots (an
/// address is not a name a certificate is checked against here).
#[must_use]
pub fn is_dns_name(name: &str) -> bool {
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    !name.is_empty()
        && name.len() <= 253
        && labels_ok
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Checks a placeholder's length and characters.
pub fn check_placeholder(placeholder: &str) -> Result<(), String> {
    check_token("placeholder", placeholder, PLACEHOLDER_LEN)
}

/// Whether `rule` lets TCP to `address:port` through.
fn allows(rule: &EgressRule, address: Ipv4Addr, port: u16) -> bool {
    let port_ok = rule.port <= port && port <= rule.last_port.unwrap_or(rule.port);
    let host_ok = match &rule.host {
        EgressHost::Ip(IpAddr::V4(ip)) => *ip == address,
        EgressHost::Cidr(IpAddr::V4(net), bits) => {
            let mask = u32::MAX.checked_shl(32u32.saturating_sub(u32::from(*bits)));
            let mask = mask.unwrap_or(0);
            u32::from(*net) & mask == u32::from(address) & mask
        }
        _ => false,
    };
    rule.protocol == Protocol::Tcp && port_ok && host_ok
}

impl Substitution {
    /// Checks names, placeholders (distinct, none inside another), hosts, and that the
    /// plan's egress rules (`allow`) let every bound address and port through: the
    /// device decides where packets go, the proxy only substitutes.
    pub fn validate(
        &self,
        secrets: &[String],
        allow: Option<&[EgressRule]>,
    ) -> Result<(), PlanError> {
        let field = "substitution.secrets";
        if self.secrets.is_empty() || self.secrets.len() > MAX_SUBSTITUTED {
            return Err(field_err(
                field,
                format!("{} secrets; 1..={MAX_SUBSTITUTED}", self.secrets.len()),
            ));
        }
        let Some(allow) = allow else {
            return Err(field_err(field, "substitution needs a network device"));
        };
        let mut names = BTreeSet::new();
        for (i, secret) in self.secrets.iter().enumerate() {
            check_secret_name(&secret.name).map_err(|r| field_err(field, r))?;
            if !names.insert(&secret.name) {
                return Err(field_err(field, format!("{:?} named twice", secret.name)));
            }
            if secrets.contains(&secret.name) {
                return Err(field_err(
                    field,
                    format!("{:?} is both released and substituted", secret.name),
                ));
            }
            check_placeholder(&secret.placeholder).map_err(|r| field_err(field, r))?;
            let overlaps = self.secrets.iter().enumerate().any(|(j, other)| {
                j != i
                    && (other.placeholder.contains(&secret.placeholder)
                        || secret.placeholder.contains(&other.placeholder))
            });
            if overlaps {
                return Err(field_err(
                    field,
                    format!(
                        "the placeholder of {:?} is, or is inside, another's",
                        secret.name
                    ),
                ));
            }
            if secret.hosts.is_empty() || secret.hosts.len() > MAX_BOUND_HOSTS {
                return Err(field_err(
                    field,
                    format!(
                        "{:?}: {} hosts; 1..={MAX_BOUND_HOSTS}",
                        secret.name,
                        secret.hosts.len()
                    ),
                ));
            }
            for host in &secret.hosts {
                check_host(&secret.name, host, allow)?;
            }
        }
        Ok(())
    }
}

fn check_host(secret: &str, host: &BoundHost, allow: &[EgressRule]) -> Result<(), PlanError> {
    let field = "substitution.secrets";
    if !is_dns_name(&host.name) {
        return Err(field_err(
            field,
            format!("{secret:?}: {:?} is not a lowercase DNS name", host.name),
        ));
    }
    if host.port == 0 {
        return Err(field_err(
            field,
            format!("{secret:?}: {} port 0", host.name),
        ));
    }
    if host.addresses.is_empty() || host.addresses.len() > MAX_BOUND_ADDRESSES {
        return Err(field_err(
            field,
            format!(
                "{secret:?}: {} has {} addresses; 1..={MAX_BOUND_ADDRESSES}",
                host.name,
                host.addresses.len()
            ),
        ));
    }
    if let Some(a) = host
        .addresses
        .iter()
        .find(|a| !allow.iter().any(|r| allows(r, **a, host.port)))
    {
        return Err(field_err(
            field,
            format!(
                "{secret:?}: {}:{} ({a}) is not allowed by the plan's egress rules",
                host.name, host.port
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, port: u16) -> EgressRule {
        EgressRule {
            host: host.parse().unwrap(),
            port,
            last_port: None,
            protocol: Protocol::Tcp,
        }
    }

    fn section() -> Substitution {
        Substitution {
            ca_sha256: Sha256Digest::of(b"ca"),
            secrets: vec![SubstitutedSecret {
                name: "API_TOKEN".into(),
                placeholder: "MVM_PLACEHOLDER_API_TOKEN".into(),
                hosts: vec![BoundHost {
                    name: "api.example.com".into(),
                    port: 443,
                    addresses: vec![Ipv4Addr::new(192, 0, 2, 7)],
                }],
            }],
        }
    }

    #[test]
    fn a_binding_the_egress_rules_allow_is_valid() {
        let allow = [rule("192.0.2.7", 443)];
        section().validate(&[], Some(&allow)).unwrap();
        let net = [rule("192.0.2.0/24", 443)];
        section().validate(&[], Some(&net)).unwrap();
    }

    #[test]
    fn hostile_sections_are_refused() {
        let allow = [rule("192.0.2.7", 443)];
        type Change = Box<dyn Fn(&mut Substitution)>;
        let cases: Vec<(&str, Change)> = vec![
            ("no secrets", Box::new(|s| s.secrets.clear())),
            ("bad name", Box::new(|s| s.secrets[0].name = "a b".into())),
            (
                "short",
                Box::new(|s| s.secrets[0].placeholder = "abc".into()),
            ),
            (
                "newline",
                Box::new(|s| s.secrets[0].placeholder = "MVM_PLACE\nHOLDER".into()),
            ),
            ("no hosts", Box::new(|s| s.secrets[0].hosts.clear())),
            (
                "upper",
                Box::new(|s| s.secrets[0].hosts[0].name = "API.example.com".into()),
            ),
            (
                "address",
                Box::new(|s| s.secrets[0].hosts[0].name = "192.0.2.7".into()),
            ),
            ("port 0", Box::new(|s| s.secrets[0].hosts[0].port = 0)),
            (
                "not allowed",
                Box::new(|s| s.secrets[0].hosts[0].port = 8443),
            ),
            (
                "other address",
                Box::new(|s| s.secrets[0].hosts[0].addresses = vec![Ipv4Addr::new(192, 0, 2, 8)]),
            ),
            (
                "no addresses",
                Box::new(|s| s.secrets[0].hosts[0].addresses.clear()),
            ),
            (
                "twice",
                Box::new(|s| {
                    let again = s.secrets[0].clone();
                    s.secrets.push(again);
                }),
            ),
            (
                "placeholder inside another",
                Box::new(|s| {
                    let mut other = s.secrets[0].clone();
                    other.name = "OTHER".into();
                    other.placeholder = "MVM_PLACEHOLDER_API_TOKEN_2".into();
                    s.secrets.push(other);
                }),
            ),
        ];
        for (what, change) in cases {
            let mut s = section();
            change(&mut s);
            assert!(s.validate(&[], Some(&allow)).is_err(), "{what}");
        }
        assert!(section().validate(&[], None).is_err(), "no network");
        assert!(
            section()
                .validate(&["API_TOKEN".into()], Some(&allow))
                .is_err(),
            "released too"
        );
        let udp = [EgressRule {
            protocol: Protocol::Udp,
            ..rule("192.0.2.7", 443)
        }];
        assert!(section().validate(&[], Some(&udp)).is_err(), "udp only");
    }

    #[test]
    fn dns_names() {
        for good in ["api.example.com", "a", "x-1.test", "localhost"] {
            assert!(is_dns_name(good), "{good}");
        }
        for bad in [
            "", "A.com", "-a.com", "a-.com", "a..com", "1.2.3.4", "a_b.com", "a.com.",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
