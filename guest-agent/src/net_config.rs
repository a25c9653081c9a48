//! The `mvm.net=ADDRESS/PREFIX,GATEWAY[,RESOLVER]...` kernel command-line word:
//! the host's runtime writes it (the plan pins the command line, so the signature
//! covers it) and the guest's PID 1 reads it ([`parse_net_config`] is the whole
//! parsing surface; `crate::init::net` acts on the result).

use std::net::Ipv4Addr;

/// The netmask of a prefix length.
#[must_use]
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32u32.saturating_sub(u32::from(prefix_len)))
            .unwrap_or(0),
    )
}

/// The kernel command-line key.
pub const CMDLINE_KEY: &str = "mvm.net";
/// Most resolvers read from the command line.
pub const MAX_RESOLVERS: usize = 4;

/// The guest's network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length (1..=31).
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// DNS resolvers, in order.
    pub resolvers: Vec<Ipv4Addr>,
}

/// Why `mvm.net=` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mvm.net={value:?}: {reason} (expected ADDRESS/PREFIX,GATEWAY[,RESOLVER]...)")]
pub struct NetConfigError {
    /// The value (at most 120 characters of it).
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// Parses `ADDRESS/PREFIX,GATEWAY[,RESOLVER]...`.
pub fn parse_net_config(value: &str) -> Result<NetConfig, NetConfigError> {
    let err = |reason: String| NetConfigError {
        value: value.chars().take(120).collect(),
        reason,
    };
    let mut parts = value.split(',');
    let cidr = parts.next().unwrap_or_default();
    let (address, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| err(format!("{cidr:?} has no /PREFIX")))?;
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| err(format!("{address:?} is not an IPv4 address")))?;
    let prefix_len = match prefix.parse::<u8>() {
        Ok(p) if (1..=31).contains(&p) && !prefix.starts_with('+') => p,
        _ => return Err(err(format!("prefix {prefix:?} is not 1..=31"))),
    };
    let gateway = parts.next().ok_or_else(|| err("no gateway".to_owned()))?;
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| err(format!("gateway {gateway:?} is not an IPv4 address")))?;
    let mut resolvers = Vec::new();
    for r in parts {
        if resolvers.len() == MAX_RESOLVERS {
            return Err(err(format!("more than {MAX_RESOLVERS} resolvers")));
        }
        resolvers.push(
            r.parse()
                .map_err(|_| err(format!("resolver {r:?} is not an IPv4 address")))?,
        );
    }
    let mask = netmask(prefix_len);
    if u32::from(address) & u32::from(mask) != u32::from(gateway) & u32::from(mask)
        || address == gateway
    {
        return Err(err(format!(
            "gateway {gateway} is not another address in {address}/{prefix_len}"
        )));
    }
    Ok(NetConfig {
        address,
        prefix_len,
        gateway,
        resolvers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_parses() {
        let c = parse_net_config("10.200.0.2/30,10.200.0.1,1.1.1.1,9.9.9.9").unwrap();
        assert_eq!(c.address, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(c.prefix_len, 30);
        assert_eq!(c.gateway, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(
            c.resolvers,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        let c = parse_net_config("192.168.1.10/24,192.168.1.1").unwrap();
        assert!(c.resolvers.is_empty());
    }

    #[test]
    fn hostile_net_configs_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "no /PREFIX"),
            ("10.0.0.2", "no /PREFIX"),
            ("10.0.0.2/32,10.0.0.1", "prefix"),
            ("10.0.0.2/0,10.0.0.1", "prefix"),
            ("10.0.0.2/+8,10.0.0.1", "prefix"),
            ("10.0.0.2/30", "no gateway"),
            ("10.0.0.2/30,10.0.0.9", "not another address"),
            ("10.0.0.2/30,10.0.0.2", "not another address"),
            ("10.0.0.2/30,10.0.0.1,x", "resolver"),
            (
                "10.0.0.2/30,10.0.0.1,1.1.1.1,1.1.1.1,1.1.1.1,1.1.1.1,1.1.1.1",
                "more than",
            ),
            ("::1/64,::2", "not an IPv4"),
        ] {
            let err = parse_net_config(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
