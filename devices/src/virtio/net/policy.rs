//! The egress decision for every frame the guest sends: default deny.
//!
//! [`EgressRules`] is the pure decision over a parsed [`Frame`]; [`EgressFilter`] wraps it
//! with the parser and the drop counters the device keeps. What passes, in order:
//!
//! 1. The frame's source MAC must be the guest's (when the device knows it).
//! 2. ARP only about the gateway: a request whose target is a gateway address, or a reply
//!    to the gateway (target address a gateway's). Nothing else, not even gratuitous ARP.
//! 3. NDP only for the gateway: a Neighbour Solicitation whose target is a gateway address,
//!    sent to that address or its solicited-node multicast group; a Neighbour
//!    Advertisement sent to a gateway address. Router solicitations, redirects and the
//!    rest of NDP are dropped (addresses are static, from the plan; no DHCP, no SLAAC).
//! 4. Never: VLAN-tagged frames, EtherTypes other than ARP/IPv4/IPv6, IP fragments, IPv4
//!    options, IPv6 Routing headers, malformed frames (see [`super::frame`]).
//! 5. DNS (TCP or UDP to port 53) only to the named resolvers, whatever the allow rules
//!    say: a rule that opens "any port" to a network does not open DNS to it.
//! 6. TCP, UDP or ICMP (v4 or v6, non-NDP) to a destination inside an allow rule's
//!    network, with the destination port in its range (ICMP rules have no ports).
//!
//! The filter is stateless and judges only the destination: replies to connections the
//! host opens towards the guest are judged like any other egress. Source IP addresses
//! are not checked here; the host's NAT and routing own that.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::frame::{
    parse_frame, Frame, IpPacket, Mac, Malformed, Payload, Transport, ARPOP_REPLY, ARPOP_REQUEST,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NDISC_NEIGHBOUR_ADVERTISEMENT,
    NDISC_NEIGHBOUR_SOLICITATION, NDISC_REDIRECT, NDISC_ROUTER_SOLICITATION,
};

/// The DNS port: TCP and UDP to it go only to the named resolvers.
pub const DNS_PORT: u16 = 53;
/// Most allow rules one filter holds (the plan allows 256; the rest is headroom).
pub const MAX_ALLOW_RULES: usize = 1024;
/// Most resolvers or gateway addresses.
pub const MAX_ADDRESSES: usize = 16;
/// Destinations whose drops are counted one by one; drops to further destinations share
/// the [`Destination::Untracked`] counter, so a guest cannot grow the table without bound.
pub const MAX_TRACKED_DESTINATIONS: usize = 1024;

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network `addr/prefix`. Host bits of `addr` are ignored.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PolicyError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(PolicyError::Prefix { addr, prefix });
        }
        Ok(Self { addr, prefix })
    }

    /// The network holding exactly `addr`.
    #[must_use]
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    /// Whether `ip` is inside the network (an IPv4 network never holds an IPv6 address,
    /// IPv4-mapped or not).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The transport an allow rule opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleProtocol {
    /// TCP to the port range.
    Tcp,
    /// UDP to the port range.
    Udp,
    /// ICMP or ICMPv6 (other than NDP), any type; the port range is ignored.
    Icmp,
}

/// One allowed destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// The destination network.
    pub net: IpNet,
    /// First allowed destination port.
    pub first_port: u16,
    /// Last allowed destination port (inclusive).
    pub last_port: u16,
    /// The transport.
    pub protocol: RuleProtocol,
}

impl AllowRule {
    fn matches(&self, dst: IpAddr, transport: &Transport) -> bool {
        if !self.net.contains(dst) {
            return false;
        }
        let port_ok = |port: u16| (self.first_port..=self.last_port).contains(&port);
        match (self.protocol, transport) {
            (RuleProtocol::Tcp, Transport::Tcp { dst_port, .. })
            | (RuleProtocol::Udp, Transport::Udp { dst_port, .. }) => port_ok(*dst_port),
            (RuleProtocol::Icmp, Transport::Icmp { .. } | Transport::Icmpv6 { .. }) => true,
            _ => false,
        }
    }
}

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A prefix longer than the address.
    #[error("network {addr}/{prefix}: prefix longer than the address")]
    Prefix {
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },
    /// A port range whose first port is above its last.
    #[error("port range {first}-{last} is empty")]
    PortRange {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// Too many rules or addresses.
    #[error("{what}: {count} given, at most {max}")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A plan rule still names a host: admission must resolve names into addresses.
    #[error("egress rule host {0:?} is a DNS name; admission must pin it to addresses")]
    UnresolvedName(String),
}

/// The egress policy of one device: the decision, without counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressRules {
    allow: Vec<AllowRule>,
    resolvers: Vec<IpAddr>,
    gateways: Vec<IpAddr>,
    guest_mac: Option<Mac>,
    /// Benchmarks only (`mvm-vmm --dev --net ..,policy=off`): pass every frame without
    /// parsing or judging it. False in every other constructor, `Default` included.
    unchecked: bool,
}

/// Why a frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    /// No allow rule covers the destination.
    #[error("no allow rule covers the destination")]
    NotAllowed,
    /// DNS to a server that is not a named resolver.
    #[error("DNS to a server that is not a named resolver")]
    DnsNotToResolver,
    /// ARP about something other than the gateway.
    #[error("ARP not about the gateway")]
    ArpNotForGateway,
    /// NDP other than neighbour discovery of the gateway.
    #[error("NDP not about the gateway")]
    NdpNotForGateway,
    /// An IP fragment.
    #[error("IP fragment")]
    Fragment,
    /// An IPv4 packet with options.
    #[error("IPv4 options")]
    Ipv4Options,
    /// An IPv6 packet with a Routing header.
    #[error("IPv6 routing header")]
    Ipv6RoutingHeader,
    /// An 802.1Q/802.1ad tagged frame.
    #[error("VLAN-tagged frame")]
    VlanTagged,
    /// An EtherType the device does not carry.
    #[error("EtherType {0:#06x} not carried")]
    Ethertype(u16),
    /// A source MAC other than the guest's.
    #[error("source MAC is not the guest's")]
    SourceMac,
    /// The frame did not parse.
    #[error("malformed: {0}")]
    Malformed(Malformed),
}

/// The verdict on one parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to the tap.
    Allow,
    /// Drop it.
    Deny(DenyReason),
}

fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    let [.., a, b, c] = t;
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, a, b, c])
}

impl EgressRules {
    /// A policy. `gateways` are the addresses ARP/NDP may ask about (the host end of the
    /// tap, IPv4 and/or IPv6 link-local); `guest_mac`, when given, is the only source MAC
    /// that passes.
    pub fn new(
        allow: Vec<AllowRule>,
        resolvers: Vec<IpAddr>,
        gateways: Vec<IpAddr>,
        guest_mac: Option<Mac>,
    ) -> Result<Self, PolicyError> {
        let bound = |what, count, max| {
            if count > max {
                Err(PolicyError::TooMany { what, count, max })
            } else {
                Ok(())
            }
        };
        bound("allow rules", allow.len(), MAX_ALLOW_RULES)?;
        bound("resolvers", resolvers.len(), MAX_ADDRESSES)?;
        bound("gateways", gateways.len(), MAX_ADDRESSES)?;
        if let Some(r) = allow.iter().find(|r| r.first_port > r.last_port) {
            return Err(PolicyError::PortRange {
                first: r.first_port,
                last: r.last_port,
            });
        }
        Ok(Self {
            allow,
            resolvers,
            gateways,
            guest_mac,
            unchecked: false,
        })
    }

    /// The allow rules.
    #[must_use]
    pub fn allow_rules(&self) -> &[AllowRule] {
        &self.allow
    }

    fn is_gateway(&self, ip: IpAddr) -> bool {
        self.gateways.contains(&ip)
    }

    /// The verdict on one frame.
    #[must_use]
    pub fn decide(&self, frame: &Frame) -> Verdict {
        if let Some(mac) = self.guest_mac {
            if frame.eth.src != mac {
                return Verdict::Deny(DenyReason::SourceMac);
            }
        }
        match &frame.payload {
            Payload::Arp(arp) => {
                let about_gateway = self.is_gateway(IpAddr::V4(arp.target_ip));
                if about_gateway && matches!(arp.op, ARPOP_REQUEST | ARPOP_REPLY) {
                    Verdict::Allow
                } else {
                    Verdict::Deny(DenyReason::ArpNotForGateway)
                }
            }
            Payload::Ip(ip) => self.decide_ip(ip),
            Payload::VlanTagged => Verdict::Deny(DenyReason::VlanTagged),
            Payload::OtherEthertype => Verdict::Deny(DenyReason::Ethertype(frame.eth.ethertype)),
        }
    }

    fn decide_ip(&self, ip: &IpPacket) -> Verdict {
        if matches!(ip.transport, Transport::Fragment { .. }) {
            return Verdict::Deny(DenyReason::Fragment);
        }
        if ip.ipv4_options {
            return Verdict::Deny(DenyReason::Ipv4Options);
        }
        if ip.ipv6_routing {
            return Verdict::Deny(DenyReason::Ipv6RoutingHeader);
        }
        if let Transport::Icmpv6 {
            icmp_type,
            ndp_target,
            ..
        } = ip.transport
        {
            if (NDISC_ROUTER_SOLICITATION..=NDISC_REDIRECT).contains(&icmp_type) {
                return self.decide_ndp(ip.dst, icmp_type, ndp_target);
            }
        }
        if ip.transport.dst_port() == Some(DNS_PORT) {
            return if self.resolvers.contains(&ip.dst) {
                Verdict::Allow
            } else {
                Verdict::Deny(DenyReason::DnsNotToResolver)
            };
        }
        if self.allow.iter().any(|r| r.matches(ip.dst, &ip.transport)) {
            Verdict::Allow
        } else {
            Verdict::Deny(DenyReason::NotAllowed)
        }
    }

    fn decide_ndp(&self, dst: IpAddr, icmp_type: u8, target: Option<Ipv6Addr>) -> Verdict {
        let allowed = match (icmp_type, target, dst) {
            (NDISC_NEIGHBOUR_SOLICITATION, Some(target), IpAddr::V6(dst)) => {
                self.is_gateway(IpAddr::V6(target))
                    && (dst == target || dst == solicited_node(target))
            }
            (NDISC_NEIGHBOUR_ADVERTISEMENT, Some(_), dst) => self.is_gateway(dst),
            _ => false,
        };
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny(DenyReason::NdpNotForGateway)
        }
    }
}

/// Where a dropped frame was going: the key drops are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// An IP destination, with the destination port for TCP and UDP.
    Ip {
        /// Destination address.
        addr: IpAddr,
        /// IP protocol number.
        protocol: u8,
        /// Destination port (TCP/UDP only).
        port: Option<u16>,
    },
    /// An ARP packet about this address.
    Arp {
        /// The ARP target address.
        target: Ipv4Addr,
    },
    /// A frame of another EtherType (or VLAN-tagged) to this MAC.
    Link {
        /// Destination MAC.
        dst: Mac,
        /// The EtherType.
        ethertype: u16,
    },
    /// A frame that did not parse.
    Malformed,
    /// Any destination after [`MAX_TRACKED_DESTINATIONS`] distinct ones.
    Untracked,
}

impl Destination {
    fn of(frame: &Frame) -> Self {
        match &frame.payload {
            Payload::Ip(ip) => Self::Ip {
                addr: ip.dst,
                protocol: ip.transport.protocol(),
                port: ip.transport.dst_port(),
            },
            Payload::Arp(arp) => Self::Arp {
                target: arp.target_ip,
            },
            Payload::VlanTagged | Payload::OtherEthertype => Self::Link {
                dst: frame.eth.dst,
                ethertype: frame.eth.ethertype,
            },
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip {
                addr,
                protocol,
                port,
            } => {
                let proto = match *protocol {
                    IPPROTO_TCP => "tcp".to_owned(),
                    IPPROTO_UDP => "udp".to_owned(),
                    IPPROTO_ICMP => "icmp".to_owned(),
                    IPPROTO_ICMPV6 => "icmpv6".to_owned(),
                    other => format!("proto {other}"),
                };
                match (addr, port) {
                    (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}/{proto}"),
                    (IpAddr::V4(a), Some(p)) => write!(f, "{a}:{p}/{proto}"),
                    (a, None) => write!(f, "{a} {proto}"),
                }
            }
            Self::Arp { target } => write!(f, "arp {target}"),
            Self::Link { dst, ethertype } => {
                let [a, b, c, d, e, g] = dst;
                write!(
                    f,
                    "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x} ethertype {ethertype:#06x}"
                )
            }
            Self::Malformed => f.write_str("malformed frames"),
            Self::Untracked => f.write_str("untracked destinations (table full)"),
        }
    }
}

/// The filter's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it.
    Pass,
    /// Drop it.
    Drop {
        /// Why.
        reason: DenyReason,
        /// Where it was going (the counter it went to).
        destination: Destination,
        /// This is the first drop to this destination: audit it.
        first: bool,
    },
}

/// The policy plus its drop counters, owned by the device's worker.
#[derive(Debug, Clone)]
pub struct EgressFilter {
    rules: EgressRules,
    drops: HashMap<Destination, u64>,
    passed: u64,
    dropped: u64,
}

impl EgressRules {
    /// No policy at all: every frame passes unparsed. Only for measuring what the check
    /// costs (`--dev` benchmarks); a signed plan never yields this.
    #[must_use]
    pub fn unchecked() -> Self {
        Self {
            unchecked: true,
            ..Self::default()
        }
    }

    /// Whether this is [`EgressRules::unchecked`].
    #[must_use]
    pub fn is_unchecked(&self) -> bool {
        self.unchecked
    }
}

impl EgressFilter {
    /// A filter enforcing `rules`, with no drops counted yet.
    #[must_use]
    pub fn new(rules: EgressRules) -> Self {
        Self {
            rules,
            drops: HashMap::new(),
            passed: 0,
            dropped: 0,
        }
    }

    /// The rules.
    #[must_use]
    pub fn rules(&self) -> &EgressRules {
        &self.rules
    }

    /// Parses and judges one frame (without the virtio header) and counts the outcome.
    pub fn check(&mut self, frame: &[u8]) -> Decision {
        if self.rules.unchecked {
            self.passed = self.passed.saturating_add(1);
            return Decision::Pass;
        }
        let (reason, destination) = match parse_frame(frame) {
            Ok(parsed) => match self.rules.decide(&parsed) {
                Verdict::Allow => {
                    self.passed = self.passed.saturating_add(1);
                    return Decision::Pass;
                }
                Verdict::Deny(reason) => (reason, Destination::of(&parsed)),
            },
            Err(m) => (DenyReason::Malformed(m), Destination::Malformed),
        };
        self.dropped = self.dropped.saturating_add(1);
        // One hash lookup for a destination seen before (the common case under a flood).
        if let Some(count) = self.drops.get_mut(&destination) {
            *count = count.saturating_add(1);
            return Decision::Drop {
                reason,
                destination,
                first: false,
            };
        }
        let key = if self.drops.len() < MAX_TRACKED_DESTINATIONS {
            destination
        } else {
            Destination::Untracked
        };
        let count = self.drops.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        Decision::Drop {
            reason,
            destination: key,
            first: *count == 1,
        }
    }

    /// Frames dropped on their way to `destination`.
    #[must_use]
    pub fn drops_to(&self, destination: &Destination) -> u64 {
        self.drops.get(destination).copied().unwrap_or(0)
    }

    /// Every destination with its drop count.
    pub fn drop_counts(&self) -> impl Iterator<Item = (&Destination, &u64)> {
        self.drops.iter()
    }

    /// Frames passed.
    #[must_use]
    pub fn passed(&self) -> u64 {
        self.passed
    }

    /// Frames dropped, malformed ones included.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::build::*;
    use super::super::frame::*;
    use super::*;

    const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    const SERVICE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const GW6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
    const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x15);
    const NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);

    fn rules() -> EgressRules {
        EgressRules::new(
            vec![
                AllowRule {
                    net: IpNet::host(IpAddr::V4(SERVICE)),
                    first_port: 443,
                    last_port: 443,
                    protocol: RuleProtocol::Tcp,
                },
                AllowRule {
                    net: IpNet::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 24).unwrap(),
                    first_port: 1,
                    last_port: 65535,
                    protocol: RuleProtocol::Udp,
                },
                AllowRule {
                    net: IpNet::new(IpAddr::V6(NET6), 32).unwrap(),
                    first_port: 8000,
                    last_port: 8999,
                    protocol: RuleProtocol::Tcp,
                },
                AllowRule {
                    net: IpNet::host(IpAddr::V4(GW4)),
                    first_port: 0,
                    last_port: 0,
                    protocol: RuleProtocol::Icmp,
                },
            ],
            vec![IpAddr::V4(RESOLVER)],
            vec![IpAddr::V4(GW4), IpAddr::V6(GW6)],
            Some(GUEST_MAC),
        )
        .unwrap()
    }

    fn verdict(frame: &[u8]) -> Verdict {
        rules().decide(&parse_frame(frame).unwrap())
    }

    fn tcp6(dst: Ipv6Addr, port: u16) -> Vec<u8> {
        eth(
            ETHERTYPE_IPV6,
            &ipv6(GUEST6, dst, IPPROTO_TCP, &tcp(40000, port, &[])),
        )
    }

    fn nd(icmp_type: u8, dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        eth(
            ETHERTYPE_IPV6,
            &ipv6(GUEST6, dst, IPPROTO_ICMPV6, &icmpv6_nd(icmp_type, target)),
        )
    }

    #[test]
    fn decision_table() {
        use DenyReason::*;
        let deny = Verdict::Deny;
        let n6 = |last: u16| Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, last);
        let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
            ("allowed tcp host:port", tcp4(SERVICE, 443), Verdict::Allow),
            ("other port same host", tcp4(SERVICE, 80), deny(NotAllowed)),
            (
                "allowed port other host",
                tcp4(OTHER, 443),
                deny(NotAllowed),
            ),
            (
                "udp to tcp-only rule",
                udp4(SERVICE, 443, b""),
                deny(NotAllowed),
            ),
            (
                "udp inside cidr",
                udp4(Ipv4Addr::new(203, 0, 113, 9), 9, b""),
                Verdict::Allow,
            ),
            (
                "udp just outside cidr",
                udp4(Ipv4Addr::new(203, 0, 114, 0), 9, b""),
                deny(NotAllowed),
            ),
            ("v6 tcp in range", tcp6(n6(1), 8500), Verdict::Allow),
            ("v6 tcp range low end", tcp6(n6(1), 8000), Verdict::Allow),
            ("v6 tcp below range", tcp6(n6(1), 7999), deny(NotAllowed)),
            ("v6 tcp above range", tcp6(n6(1), 9000), deny(NotAllowed)),
            (
                "v6 outside /32",
                tcp6(Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 1), 8500),
                deny(NotAllowed),
            ),
            (
                "dns udp to resolver",
                udp4(RESOLVER, 53, b"q"),
                Verdict::Allow,
            ),
            ("dns tcp to resolver", tcp4(RESOLVER, 53), Verdict::Allow),
            (
                "dns to other server",
                udp4(OTHER, 53, b"q"),
                deny(DnsNotToResolver),
            ),
            (
                "dns inside an any-port rule",
                udp4(Ipv4Addr::new(203, 0, 113, 9), 53, b"q"),
                deny(DnsNotToResolver),
            ),
            (
                "resolver on other port",
                udp4(RESOLVER, 54, b""),
                deny(NotAllowed),
            ),
            (
                "arp for gateway",
                eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, GUEST4, GW4)),
                Verdict::Allow,
            ),
            (
                "arp reply to gateway",
                eth(ETHERTYPE_ARP, &arp(ARPOP_REPLY, GUEST4, GW4)),
                Verdict::Allow,
            ),
            (
                "arp for another host",
                eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, GUEST4, OTHER)),
                deny(ArpNotForGateway),
            ),
            (
                "gratuitous arp",
                eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, GUEST4, GUEST4)),
                deny(ArpNotForGateway),
            ),
            (
                "arp op 3 for gateway",
                eth(ETHERTYPE_ARP, &arp(3, GUEST4, GW4)),
                deny(ArpNotForGateway),
            ),
            (
                "ns for gateway, solicited-node",
                nd(
                    NDISC_NEIGHBOUR_SOLICITATION,
                    "ff02::1:ff00:2".parse().unwrap(),
                    GW6,
                ),
                Verdict::Allow,
            ),
            (
                "ns for gateway, unicast",
                nd(NDISC_NEIGHBOUR_SOLICITATION, GW6, GW6),
                Verdict::Allow,
            ),
            (
                "ns for gateway to all-nodes",
                nd(
                    NDISC_NEIGHBOUR_SOLICITATION,
                    "ff02::1".parse().unwrap(),
                    GW6,
                ),
                deny(NdpNotForGateway),
            ),
            (
                "ns for another host",
                nd(
                    NDISC_NEIGHBOUR_SOLICITATION,
                    "ff02::1:ff00:9".parse().unwrap(),
                    "fe80::9".parse().unwrap(),
                ),
                deny(NdpNotForGateway),
            ),
            (
                "na to gateway",
                nd(NDISC_NEIGHBOUR_ADVERTISEMENT, GW6, GUEST6),
                Verdict::Allow,
            ),
            (
                "na to all-nodes",
                nd(
                    NDISC_NEIGHBOUR_ADVERTISEMENT,
                    "ff02::1".parse().unwrap(),
                    GUEST6,
                ),
                deny(NdpNotForGateway),
            ),
            (
                "router solicitation",
                eth(
                    ETHERTYPE_IPV6,
                    &ipv6(
                        GUEST6,
                        "ff02::2".parse().unwrap(),
                        IPPROTO_ICMPV6,
                        &[133, 0, 0, 0, 0, 0, 0, 0],
                    ),
                ),
                deny(NdpNotForGateway),
            ),
            (
                "icmp echo to gateway",
                eth(
                    ETHERTYPE_IPV4,
                    &ipv4(GUEST4, GW4, IPPROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0]),
                ),
                Verdict::Allow,
            ),
            (
                "icmp echo elsewhere",
                eth(
                    ETHERTYPE_IPV4,
                    &ipv4(GUEST4, OTHER, IPPROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0]),
                ),
                deny(NotAllowed),
            ),
            (
                "gre to allowed host",
                eth(ETHERTYPE_IPV4, &ipv4(GUEST4, SERVICE, 47, &[0; 8])),
                deny(NotAllowed),
            ),
            (
                "fragment to allowed host:port",
                eth(
                    ETHERTYPE_IPV4,
                    &ipv4_with(
                        GUEST4,
                        SERVICE,
                        IPPROTO_TCP,
                        &[],
                        IPV4_MF,
                        &tcp(1, 443, &[]),
                    ),
                ),
                deny(Fragment),
            ),
            (
                "non-first fragment",
                eth(
                    ETHERTYPE_IPV4,
                    &ipv4_with(GUEST4, SERVICE, IPPROTO_TCP, &[], 3, &[0; 8]),
                ),
                deny(Fragment),
            ),
            (
                "options to allowed host:port",
                eth(
                    ETHERTYPE_IPV4,
                    &ipv4_with(
                        GUEST4,
                        SERVICE,
                        IPPROTO_TCP,
                        &[131, 7, 4, 1, 2, 3, 4, 0],
                        0,
                        &tcp(1, 443, &[]),
                    ),
                ),
                deny(Ipv4Options),
            ),
            (
                "vlan tagged",
                eth(ETHERTYPE_VLAN, &[0; 46]),
                deny(VlanTagged),
            ),
            (
                "other ethertype",
                eth(0x88b5, &[0; 46]),
                deny(Ethertype(0x88b5)),
            ),
        ];
        for (name, frame, want) in cases {
            assert_eq!(verdict(&frame), want, "{name}");
        }
    }

    #[test]
    fn routing_header_to_allowed_destination_is_dropped() {
        let mut rh = vec![IPPROTO_TCP, 2, 0, 1, 0, 0, 0, 0];
        rh.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        rh.extend(tcp(1, 8080, &[]));
        let dst = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let f = eth(ETHERTYPE_IPV6, &ipv6(GUEST6, dst, IPPROTO_ROUTING, &rh));
        assert_eq!(verdict(&f), Verdict::Deny(DenyReason::Ipv6RoutingHeader));
    }

    #[test]
    fn spoofed_source_mac_is_dropped() {
        let mut f = tcp4(SERVICE, 443);
        f[6..12].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
        assert_eq!(verdict(&f), Verdict::Deny(DenyReason::SourceMac));
    }

    #[test]
    fn empty_policy_denies_everything() {
        let r = EgressRules::default();
        for f in [
            tcp4(SERVICE, 443),
            udp4(RESOLVER, 53, b""),
            eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, GUEST4, GW4)),
        ] {
            assert!(matches!(
                r.decide(&parse_frame(&f).unwrap()),
                Verdict::Deny(_)
            ));
        }
    }

    #[test]
    fn counters_and_first_drop_per_destination() {
        let mut filter = EgressFilter::new(rules());
        assert_eq!(filter.check(&tcp4(SERVICE, 443)), Decision::Pass);
        let to80 = Destination::Ip {
            addr: IpAddr::V4(SERVICE),
            protocol: IPPROTO_TCP,
            port: Some(80),
        };
        for i in 0..3 {
            let d = filter.check(&tcp4(SERVICE, 80));
            assert_eq!(
                d,
                Decision::Drop {
                    reason: DenyReason::NotAllowed,
                    destination: to80,
                    first: i == 0
                }
            );
        }
        let Decision::Drop { first, .. } = filter.check(&tcp4(SERVICE, 81)) else {
            panic!("passed");
        };
        assert!(first, "another port is another destination");
        let Decision::Drop {
            reason,
            destination,
            first,
        } = filter.check(&[0u8; 10])
        else {
            panic!("passed");
        };
        assert!(matches!(reason, DenyReason::Malformed(_)));
        assert_eq!(destination, Destination::Malformed);
        assert!(first);
        assert_eq!(filter.drops_to(&to80), 3);
        assert_eq!(filter.drops_to(&Destination::Malformed), 1);
        assert_eq!((filter.passed(), filter.dropped()), (1, 5));
        assert_eq!(to80.to_string(), "192.0.2.7:80/tcp");
    }

    #[test]
    fn only_the_unchecked_rules_pass_everything() {
        // Default and an empty rule set deny; only the benchmark's unchecked rules pass,
        // malformed frames included (nothing is parsed).
        for rules in [EgressRules::default(), rules()] {
            assert!(!rules.is_unchecked());
            let mut filter = EgressFilter::new(rules);
            assert!(matches!(filter.check(&[0u8; 10]), Decision::Drop { .. }));
        }
        let mut filter = EgressFilter::new(EgressRules::unchecked());
        assert_eq!(
            filter.check(&tcp4(Ipv4Addr::new(203, 0, 113, 9), 25)),
            Decision::Pass
        );
        assert_eq!(filter.check(&[0u8; 10]), Decision::Pass);
        assert_eq!((filter.passed(), filter.dropped()), (2, 0));
    }

    #[test]
    fn the_drop_table_is_bounded() {
        let mut filter = EgressFilter::new(EgressRules::default());
        let mut firsts = 0;
        for i in 0..(u32::try_from(MAX_TRACKED_DESTINATIONS).unwrap() + 500) {
            let dst = Ipv4Addr::from(0x0a00_0000 + i);
            if let Decision::Drop { first: true, .. } = filter.check(&tcp4(dst, 1)) {
                firsts += 1;
            }
        }
        assert_eq!(filter.drop_counts().count(), MAX_TRACKED_DESTINATIONS + 1);
        assert_eq!(filter.drops_to(&Destination::Untracked), 500);
        assert_eq!(firsts, MAX_TRACKED_DESTINATIONS + 1);
        // A tracked destination keeps its own counter after the table is full.
        filter.check(&tcp4(Ipv4Addr::from(0x0a00_0000), 1));
        assert_eq!(
            filter.drops_to(&Destination::Ip {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000)),
                protocol: IPPROTO_TCP,
                port: Some(1)
            }),
            2
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(matches!(
            IpNet::new(IpAddr::V4(GW4), 33),
            Err(PolicyError::Prefix { prefix: 33, .. })
        ));
        let rule = AllowRule {
            net: IpNet::host(IpAddr::V4(GW4)),
            first_port: 9,
            last_port: 8,
            protocol: RuleProtocol::Tcp,
        };
        assert_eq!(
            EgressRules::new(vec![rule], vec![], vec![], None),
            Err(PolicyError::PortRange { first: 9, last: 8 })
        );
    }

    #[test]
    fn zero_prefix_holds_every_address_of_its_family_only() {
        let any4 = IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap();
        assert!(any4.contains(IpAddr::V4(OTHER)));
        assert!(!any4.contains(IpAddr::V6(GW6)));
        assert!(!any4.contains(IpAddr::V6(SERVICE.to_ipv6_mapped())));
        let any6 = IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).unwrap();
        assert!(any6.contains(IpAddr::V6(GW6)));
    }
}
