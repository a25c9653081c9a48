//! The per-VM address pool: each VM gets a /30 of the pool (network, gateway = the host
//! end of the tap, guest, broadcast), the first one that overlaps no address already on
//! the host. The caller holds the pool lock ([`super::session`]) from the scan until the
//! tap has its address, so concurrent runs never pick the same subnet.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The pool when `MVM_NET_POOL` is not set.
pub const DEFAULT_POOL: &str = "10.200.0.0/16";
/// The environment variable that overrides the pool (an IPv4 CIDR, /8 to /30).
pub const POOL_ENV: &str = "MVM_NET_POOL";
/// Prefix length of one VM's subnet.
pub const SUBNET_PREFIX: u8 = 30;

/// An IPv4 network: address (host bits zero) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix_len)))
        .unwrap_or(0)
}

impl Ipv4Net {
    /// The network holding `addr` with `prefix_len` (host bits cleared).
    #[must_use]
    pub fn containing(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = prefix_len.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        }
    }

    /// Whether `ip` is inside.
    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix_len) == u32::from(self.addr)
    }

    /// Whether the two networks share an address.
    #[must_use]
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One VM's /30.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The /30 network.
    pub net: Ipv4Net,
}

impl Subnet {
    /// The host end of the tap: the first address.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.addr).wrapping_add(1))
    }

    /// The guest: the second address.
    #[must_use]
    pub fn guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.addr).wrapping_add(2))
    }

    /// A locally administered unicast MAC made from the guest address (`02:00:` and its
    /// four octets), so one subnet always gives one MAC.
    #[must_use]
    pub fn guest_mac(&self) -> [u8; 6] {
        let [a, b, c, d] = self.guest().octets();
        [0x02, 0x00, a, b, c, d]
    }
}

/// The pool: an IPv4 network cut into /30s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPool {
    net: Ipv4Net,
}

/// Why a pool did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address pool {0:?} is not an IPv4 CIDR network with zero host bits and a prefix of 8..=30 (e.g. {DEFAULT_POOL})")]
pub struct PoolParseError(pub String);

impl FromStr for AddressPool {
    type Err = PoolParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PoolParseError(s.chars().take(60).collect());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        if prefix.starts_with('+') {
            return Err(err());
        }
        let prefix_len: u8 = prefix.parse().map_err(|_| err())?;
        if !(8..=SUBNET_PREFIX).contains(&prefix_len) {
            return Err(err());
        }
        let net = Ipv4Net::containing(addr, prefix_len);
        if net.addr != addr {
            return Err(err());
        }
        Ok(Self { net })
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net.fmt(f)
    }
}

impl Default for AddressPool {
    fn default() -> Self {
        Self {
            net: Ipv4Net {
                addr: Ipv4Addr::new(10, 200, 0, 0),
                prefix_len: 16,
            },
        }
    }
}

impl AddressPool {
    /// The pool from `MVM_NET_POOL`, else [`DEFAULT_POOL`].
    pub fn from_env() -> Result<Self, PoolParseError> {
        match std::env::var(POOL_ENV) {
            Ok(value) if !value.is_empty() => value.parse(),
            _ => Ok(Self::default()),
        }
    }

    /// How many /30s it holds.
    #[must_use]
    pub fn len(&self) -> u32 {
        1u32.checked_shl(u32::from(SUBNET_PREFIX.saturating_sub(self.net.prefix_len)))
            .unwrap_or(1)
    }

    /// Always false: a pool holds at least one /30.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `index`th /30.
    #[must_use]
    pub fn subnet(&self, index: u32) -> Option<Subnet> {
        if index >= self.len() {
            return None;
        }
        let addr = u32::from(self.net.addr).checked_add(index.checked_mul(4)?)?;
        Some(Subnet {
            net: Ipv4Net {
                addr: Ipv4Addr::from(addr),
                prefix_len: SUBNET_PREFIX,
            },
        })
    }

    /// The first /30 that overlaps none of `in_use` (the networks of the host's
    /// addresses).
    #[must_use]
    pub fn first_free(&self, in_use: &[Ipv4Net]) -> Option<Subnet> {
        (0..self.len())
            .filter_map(|i| self.subnet(i))
            .find(|s| !in_use.iter().any(|used| used.overlaps(&s.net)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        let (a, p) = s.split_once('/').unwrap();
        Ipv4Net::containing(a.parse().unwrap(), p.parse().unwrap())
    }

    #[test]
    fn pools_parse_and_bad_ones_are_refused() {
        let p: AddressPool = DEFAULT_POOL.parse().unwrap();
        assert_eq!(p, AddressPool::default());
        assert_eq!(p.len(), 16384);
        assert_eq!("10.0.0.0/30".parse::<AddressPool>().unwrap().len(), 1);
        for bad in [
            "10.200.0.1/16",
            "10.200.0.0/31",
            "10.0.0.0/7",
            "10.0.0.0",
            "10.0.0.0/+16",
            "::/64",
            "x/16",
        ] {
            assert!(bad.parse::<AddressPool>().is_err(), "{bad}");
        }
    }

    #[test]
    fn subnets_have_gateway_guest_and_mac() {
        let p = AddressPool::default();
        let s = p.subnet(1).unwrap();
        assert_eq!(s.net.to_string(), "10.200.0.4/30");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(s.guest(), Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(s.guest_mac(), [2, 0, 10, 200, 0, 6]);
        assert_eq!(
            p.subnet(16383).unwrap().net.to_string(),
            "10.200.255.252/30"
        );
        assert_eq!(p.subnet(16384), None);
    }

    #[test]
    fn the_first_free_subnet_skips_every_overlap() {
        let p: AddressPool = "10.200.0.0/28".parse().unwrap();
        assert_eq!(p.first_free(&[]).unwrap().net.to_string(), "10.200.0.0/30");
        // Taps of other VMs (their host ends), and an unrelated host network.
        let used = [
            net("10.200.0.1/30"),
            net("10.200.0.9/30"),
            net("192.168.1.7/24"),
        ];
        assert_eq!(
            p.first_free(&used).unwrap().net.to_string(),
            "10.200.0.4/30"
        );
        // A wide host network covering the whole pool leaves nothing.
        assert_eq!(p.first_free(&[net("10.0.0.1/8")]), None);
        // A host address inside one /30 (prefix 32) takes just that /30.
        let used = [net("10.200.0.2/32"), net("10.200.0.5/32")];
        assert_eq!(
            p.first_free(&used).unwrap().net.to_string(),
            "10.200.0.8/30"
        );
        // All four taken.
        let used: Vec<Ipv4Net> = (0..4).map(|i| p.subnet(i).unwrap().net).collect();
        assert_eq!(p.first_free(&used), None);
    }
}
