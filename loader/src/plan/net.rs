//! The guest's network interface in a plan (`devices.net.interface`): its MAC, its IPv4
//! address and prefix, the gateway (the host end of the tap) and the DNS resolvers.
//!
//! The signature covers these as it covers the egress rules: the VMM gives the device
//! the MAC and lets ARP ask only about the gateway and DNS go only to the resolvers; the
//! agent configures exactly this address, route and `resolv.conf`. IPv4 only: the guest
//! gets no IPv6 address and its IPv6 autoconfiguration is off.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{field_err, PlanError};

/// Most resolvers one interface may name (the device's limit is larger).
pub const MAX_RESOLVERS: usize = 4;
/// Shortest prefix accepted for the guest's subnet.
pub const MIN_PREFIX_LEN: u8 = 8;
/// Longest prefix accepted (a /31 point-to-point link still holds guest and gateway).
pub const MAX_PREFIX_LEN: u8 = 31;

/// The guest side of the network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    /// The guest's MAC, `xx:xx:xx:xx:xx:xx` in lowercase hex, unicast, not all zero.
    pub mac: String,
    /// The guest's IPv4 address.
    pub address: Ipv4Addr,
    /// Prefix length of the guest's subnet, [`MIN_PREFIX_LEN`]..=[`MAX_PREFIX_LEN`].
    pub prefix_len: u8,
    /// The default gateway: the host end of the tap, inside the subnet.
    pub gateway: Ipv4Addr,
    /// DNS resolvers, in order; DNS to anything else is dropped by the device.
    pub resolvers: Vec<Ipv4Addr>,
}

impl NetInterface {
    /// The MAC as six octets (call after [`NetInterface::validate`]; `None` if malformed).
    #[must_use]
    pub fn mac_octets(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }

    /// The value of the `mvm.net=` kernel command-line key the agent reads:
    /// `ADDRESS/PREFIX,GATEWAY[,RESOLVER]...`.
    #[must_use]
    pub fn cmdline_value(&self) -> String {
        let mut value = format!("{}/{},{}", self.address, self.prefix_len, self.gateway);
        for r in &self.resolvers {
            value.push(',');
            value.push_str(&r.to_string());
        }
        value
    }

    /// Checks the MAC, the prefix, that the gateway is in the guest's subnet and is not
    /// the guest, and the resolver count.
    pub fn validate(&self) -> Result<(), PlanError> {
        const FIELD: &str = "devices.net.interface";
        let mac = parse_mac(&self.mac).ok_or_else(|| {
            field_err(
                format!("{FIELD}.mac"),
                format!(
                    "{:?} is not a lowercase xx:xx:xx:xx:xx:xx MAC",
                    self.mac.chars().take(40).collect::<String>()
                ),
            )
        })?;
        let [first, ..] = mac;
        if first & 1 != 0 || mac == [0; 6] {
            return Err(field_err(
                format!("{FIELD}.mac"),
                format!("{} is multicast or all zero", self.mac),
            ));
        }
        if !(MIN_PREFIX_LEN..=MAX_PREFIX_LEN).contains(&self.prefix_len) {
            return Err(field_err(
                format!("{FIELD}.prefix_len"),
                format!(
                    "{} is outside {MIN_PREFIX_LEN}..={MAX_PREFIX_LEN}",
                    self.prefix_len
                ),
            ));
        }
        let mask = u32::MAX
            .checked_shl(32u32.saturating_sub(u32::from(self.prefix_len)))
            .unwrap_or(0);
        let (addr, gw) = (u32::from(self.address), u32::from(self.gateway));
        if addr & mask != gw & mask || addr == gw {
            return Err(field_err(
                format!("{FIELD}.gateway"),
                format!(
                    "{} is not another address in {}/{}",
                    self.gateway, self.address, self.prefix_len
                ),
            ));
        }
        if self.address.is_unspecified()
            || self.address.is_broadcast()
            || self.address.is_multicast()
            || self.address.is_loopback()
        {
            return Err(field_err(
                format!("{FIELD}.address"),
                format!("{} cannot be a guest address", self.address),
            ));
        }
        if self.resolvers.len() > MAX_RESOLVERS {
            return Err(field_err(
                format!("{FIELD}.resolvers"),
                format!(
                    "{} resolvers; at most {MAX_RESOLVERS}",
                    self.resolvers.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (lowercase hex, two digits each).
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for slot in &mut out {
        let part = parts.next()?;
        if part.len() != 2
            || !part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> NetInterface {
        NetInterface {
            mac: "02:00:0a:c8:00:02".into(),
            address: Ipv4Addr::new(10, 200, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            resolvers: vec![Ipv4Addr::new(10, 200, 0, 1)],
        }
    }

    #[test]
    fn a_good_interface_validates_and_gives_its_cmdline_value() {
        let i = iface();
        i.validate().unwrap();
        assert_eq!(i.mac_octets(), Some([2, 0, 10, 200, 0, 2]));
        assert_eq!(i.cmdline_value(), "10.200.0.2/30,10.200.0.1,10.200.0.1");
        let none = NetInterface {
            resolvers: vec![],
            ..iface()
        };
        assert_eq!(none.cmdline_value(), "10.200.0.2/30,10.200.0.1");
    }

    #[test]
    fn bad_interfaces_name_the_field() {
        type Edit = fn(&mut NetInterface);
        let cases: [(&str, Edit); 9] = [
            ("mac", |i| i.mac = "02:00:0A:c8:00:02".into()),
            ("mac", |i| i.mac = "02:00:0a:c8:00".into()),
            ("mac", |i| i.mac = "02:00:0a:c8:00:02:03".into()),
            ("mac", |i| i.mac = "03:00:0a:c8:00:02".into()),
            ("prefix_len", |i| i.prefix_len = 32),
            ("prefix_len", |i| i.prefix_len = 4),
            ("gateway", |i| i.gateway = Ipv4Addr::new(10, 200, 0, 5)),
            ("gateway", |i| i.gateway = i.address),
            ("resolvers", |i| i.resolvers = vec![Ipv4Addr::LOCALHOST; 5]),
        ];
        for (field, edit) in cases {
            let mut i = iface();
            edit(&mut i);
            let err = i.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
