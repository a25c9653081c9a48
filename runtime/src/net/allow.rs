//! `--allow HOST_OR_CIDR:PORT[-PORT][/tcp|/udp]` and `--dns IP`, and the pinning of host
//! names: a name is resolved once, at admission, and the plan carries the addresses it
//! resolved to (IPv4 only: the guest has no IPv6), never the name. The guest can then
//! reach exactly those addresses, whatever the name resolves to later.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};

use mvm_loader::plan::{EgressHost, EgressRule, Protocol};

use crate::admission::policy::EgressAllowance;
use crate::admission::{Denial, Rule};

/// Why an `--allow` value did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--allow {input:?}: {reason} (expected HOST_OR_CIDR:PORT[-PORT][/tcp|/udp]; IPv6 as [ADDR]:PORT)")]
pub struct AllowParseError {
    /// The value, at most 100 characters of it.
    pub input: String,
    /// What is wrong.
    pub reason: String,
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses one `--allow` value.
pub fn parse_allow(s: &str) -> Result<EgressRule, AllowParseError> {
    let err = |reason: String| AllowParseError {
        input: s.chars().take(100).collect(),
        reason,
    };
    let (rest, protocol) = match s.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "udp")) => (rest, Protocol::Udp),
        _ => (s, Protocol::Tcp),
    };
    let (host, ports) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| err("unclosed '['".into()))?;
        let ports = after
            .strip_prefix(':')
            .ok_or_else(|| err("missing :PORT".into()))?;
        (host, ports)
    } else {
        let (host, ports) = rest
            .rsplit_once(':')
            .ok_or_else(|| err("missing :PORT".into()))?;
        if host.contains(':') {
            return Err(err("IPv6 addresses must be written in brackets".into()));
        }
        (host, ports)
    };
    let host: EgressHost = host.parse().map_err(|e| err(format!("{e}")))?;
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (ports, None),
    };
    let port = parse_port(first).ok_or_else(|| err(format!("port {first:?} is not 1..=65535")))?;
    let last_port = match last {
        None => None,
        Some(b) => {
            let last = parse_port(b).ok_or_else(|| err(format!("port {b:?} is not 1..=65535")))?;
            if last < port {
                return Err(err(format!("port range {port}-{last} is reversed")));
            }
            (last != port).then_some(last)
        }
    };
    Ok(EgressRule {
        host,
        port,
        last_port,
        protocol,
    })
}

/// Parses one `--dns` value: an IPv4 address.
pub fn parse_dns(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("--dns {s:?}: not an IPv4 address"))
}

/// Turns a host name into addresses.
pub trait Resolve {
    /// The addresses of `name`.
    fn resolve(&mut self, name: &str) -> Result<Vec<IpAddr>, String>;
}

/// The system resolver (`getaddrinfo`), each name asked once per admission.
#[derive(Debug, Default)]
pub struct SystemResolver {
    cache: BTreeMap<String, Vec<IpAddr>>,
}

impl Resolve for SystemResolver {
    fn resolve(&mut self, name: &str) -> Result<Vec<IpAddr>, String> {
        if let Some(hit) = self.cache.get(name) {
            return Ok(hit.clone());
        }
        let mut addrs: Vec<IpAddr> = (name, 0u16)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .map(|sa| sa.ip())
            .collect();
        addrs.sort();
        addrs.dedup();
        self.cache.insert(name.to_owned(), addrs.clone());
        Ok(addrs)
    }
}

/// Why a name could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--allow {rule}: cannot resolve {name:?}: {reason}")]
pub struct PinError {
    /// The rule as written.
    pub rule: String,
    /// The name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Most addresses one name may pin (a name with hundreds of records is refused, not
/// turned into hundreds of rules).
pub const MAX_ADDRESSES_PER_NAME: usize = 16;

/// Replaces every name in `rules` by one rule per IPv4 address it resolves to (same
/// ports and protocol); addresses and networks pass through.
pub fn pin(rules: &[EgressRule], resolver: &mut dyn Resolve) -> Result<Vec<EgressRule>, PinError> {
    let mut out = Vec::with_capacity(rules.len());
    for rule in rules {
        let EgressHost::Name(name) = &rule.host else {
            out.push(rule.clone());
            continue;
        };
        let fail = |reason: String| PinError {
            rule: rule.to_string(),
            name: name.clone(),
            reason,
        };
        let v4: Vec<IpAddr> = resolver
            .resolve(name)
            .map_err(&fail)?
            .into_iter()
            .filter(IpAddr::is_ipv4)
            .collect();
        if v4.is_empty() {
            return Err(fail("no IPv4 address".into()));
        }
        if v4.len() > MAX_ADDRESSES_PER_NAME {
            return Err(fail(format!(
                "{} addresses; at most {MAX_ADDRESSES_PER_NAME}",
                v4.len()
            )));
        }
        for ip in v4 {
            out.push(EgressRule {
                host: EgressHost::Ip(ip),
                ..rule.clone()
            });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The policy's egress allowances with every name also pinned: a policy entry for a name
/// covers the addresses that name resolves to now (the same resolver, so the same answers
/// as the request's names got). A name that does not resolve covers nothing pinned.
pub fn pin_allowances(
    allow: &[EgressAllowance],
    resolver: &mut dyn Resolve,
) -> Vec<EgressAllowance> {
    let mut out = allow.to_vec();
    for a in allow {
        let EgressHost::Name(name) = &a.host else {
            continue;
        };
        if let Ok(addrs) = resolver.resolve(name) {
            out.extend(
                addrs
                    .into_iter()
                    .filter(IpAddr::is_ipv4)
                    .map(|ip| EgressAllowance {
                        host: EgressHost::Ip(ip),
                        ..a.clone()
                    }),
            );
        }
    }
    out
}

/// The admission policy's cap on egress: every pinned rule must be covered by an
/// allowance, else a denial naming the rule (`egress.allow`) and the destination.
pub fn check_cap(allow: &[EgressAllowance], rules: &[EgressRule]) -> Result<(), Denial> {
    for rule in rules {
        if !allow.iter().any(|a| a.covers(rule)) {
            return Err(Denial {
                rule: Rule::Egress,
                reason: format!("egress to {rule} is not allowed by any policy entry"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(BTreeMap<&'static str, Vec<IpAddr>>);

    impl Resolve for Fake {
        fn resolve(&mut self, name: &str) -> Result<Vec<IpAddr>, String> {
            self.0
                .get(name)
                .cloned()
                .ok_or_else(|| "NXDOMAIN".to_owned())
        }
    }

    #[test]
    fn allow_values_parse_with_ranges_and_protocols() {
        let r = parse_allow("10.0.0.0/8:8000-8080/udp").unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8:8000-8080/udp");
        assert_eq!((r.port, r.last_port), (8000, Some(8080)));
        let r = parse_allow("example.com:443").unwrap();
        assert_eq!(
            (r.port, r.last_port, r.protocol),
            (443, None, Protocol::Tcp)
        );
        let r = parse_allow("192.0.2.1:53-53/udp").unwrap();
        assert_eq!(r.last_port, None);
        let r = parse_allow("[2001:db8::1]:22/tcp").unwrap();
        assert_eq!(r.to_string(), "[2001:db8::1]:22/tcp");
        for (bad, why) in [
            ("10.0.0.1", "missing :PORT"),
            ("10.0.0.1:0", "not 1..=65535"),
            ("10.0.0.1:70000", "not 1..=65535"),
            ("10.0.0.1:+80", "not 1..=65535"),
            ("10.0.0.1:90-80", "reversed"),
            ("10.0.0.1:80-", "not 1..=65535"),
            ("10.0.0.1:*", "not 1..=65535"),
            ("2001:db8::1:22", "brackets"),
            ("[2001:db8::1:22", "unclosed"),
            ("10.0.0.1/8:22", "CIDR"),
            ("Bad_Name:22", "DNS name"),
        ] {
            let err = parse_allow(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(parse_dns("1.1.1.1").is_ok());
        assert!(parse_dns("::1").is_err());
    }

    #[test]
    fn names_are_pinned_to_their_ipv4_addresses() {
        let mut fake = Fake(BTreeMap::from([
            (
                "svc.test",
                vec![
                    "192.0.2.2".parse().unwrap(),
                    "2001:db8::2".parse().unwrap(),
                    "192.0.2.1".parse().unwrap(),
                ],
            ),
            ("v6only.test", vec!["2001:db8::3".parse().unwrap()]),
        ]));
        let rules = [
            parse_allow("svc.test:8000-8001").unwrap(),
            parse_allow("10.0.0.0/8:22").unwrap(),
        ];
        let pinned = pin(&rules, &mut fake).unwrap();
        let text: Vec<String> = pinned.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "192.0.2.1:8000-8001/tcp",
                "192.0.2.2:8000-8001/tcp",
                "10.0.0.0/8:22/tcp"
            ]
        );
        let err = pin(&[parse_allow("v6only.test:1").unwrap()], &mut fake).unwrap_err();
        assert!(err.to_string().contains("no IPv4"), "{err}");
        let err = pin(&[parse_allow("nx.test:1").unwrap()], &mut fake).unwrap_err();
        assert!(err.to_string().contains("NXDOMAIN"), "{err}");
    }

    #[test]
    fn the_policy_cap_applies_to_pinned_addresses_and_names_cover_theirs() {
        let mut fake = Fake(BTreeMap::from([(
            "svc.test",
            vec!["192.0.2.1".parse().unwrap()],
        )]));
        let policy: Vec<EgressAllowance> = ["svc.test:443", "10.0.0.0/8:*/udp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let policy = pin_allowances(&policy, &mut fake);
        let ok = pin(
            &[
                parse_allow("svc.test:443").unwrap(),
                parse_allow("10.1.2.3:5000-5010/udp").unwrap(),
            ],
            &mut fake,
        )
        .unwrap();
        check_cap(&policy, &ok).unwrap();
        for bad in [
            "192.0.2.1:444",
            "192.0.2.2:443",
            "10.1.2.3:53",
            "192.0.2.1:443-444",
        ] {
            let denial = check_cap(&policy, &[parse_allow(bad).unwrap()]).unwrap_err();
            assert_eq!(denial.rule, Rule::Egress);
            assert!(denial.to_string().contains("egress.allow"), "{denial}");
        }
    }
}
