//! `net_frame`: frames the guest transmits, through the Ethernet/IP parser and the
//! egress decision of a fixed policy, as `virtio-net` applies it to every TX frame.
//!
//! The input is a sequence of frames, each prefixed by a little-endian u16 length.
//! Invariants: a frame passes only if the policy's own rules say it may (source MAC,
//! ARP/NDP about a gateway, DNS to a resolver, or an allow rule covering the
//! destination), never when fragmented, carrying IPv4 options or an IPv6 routing header,
//! VLAN-tagged or of another EtherType; [`EgressFilter::check`] agrees with
//! [`parse_frame`] + [`EgressRules::decide`]; the drop table stays bounded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mvm_devices::virtio::net::frame::{
    parse_frame, Mac, Payload, Transport, ARPOP_REPLY, ARPOP_REQUEST,
};
use mvm_devices::virtio::net::policy::{
    AllowRule, Decision, EgressFilter, EgressRules, IpNet, RuleProtocol, Verdict, DNS_PORT,
    MAX_TRACKED_DESTINATIONS,
};

use crate::input::Input;

/// The guest's MAC in the harness policy.
pub const GUEST_MAC: Mac = mvm_devices::virtio::net::frame::build::GUEST_MAC;
/// An allowed IPv4 network (TCP 443).
pub const ALLOW_V4_NET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 0);
/// An allowed single host (UDP 1000..=2000).
pub const ALLOW_V4_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// The IPv4 resolver.
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 53);
/// The IPv4 gateway.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The IPv6 gateway (link-local).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// An allowed IPv6 network (TCP 80).
pub const ALLOW_V6_NET: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);

fn rules() -> EgressRules {
    let allow = vec![
        AllowRule {
            net: IpNet::new(IpAddr::V4(ALLOW_V4_NET), 8).expect("prefix"),
            first_port: 443,
            last_port: 443,
            protocol: RuleProtocol::Tcp,
        },
        AllowRule {
            net: IpNet::host(IpAddr::V4(ALLOW_V4_HOST)),
            first_port: 1000,
            last_port: 2000,
            protocol: RuleProtocol::Udp,
        },
        AllowRule {
            net: IpNet::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)), 24).expect("prefix"),
            first_port: 0,
            last_port: 0,
            protocol: RuleProtocol::Icmp,
        },
        AllowRule {
            net: IpNet::new(IpAddr::V6(ALLOW_V6_NET), 8).expect("prefix"),
            first_port: 80,
            last_port: 80,
            protocol: RuleProtocol::Tcp,
        },
    ];
    EgressRules::new(
        allow,
        vec![
            IpAddr::V4(RESOLVER_V4),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53)),
        ],
        vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
        Some(GUEST_MAC),
    )
    .expect("harness policy is valid")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let rules = rules();
    let mut filter = EgressFilter::new(rules.clone());
    let mut input = Input::new(data);
    let mut frames = 0u64;
    while !input.is_empty() {
        let len = usize::from(input.u16());
        let frame = input.take(len);
        frames += 1;
        check_one(&rules, &mut filter, frame);
    }
    assert_eq!(
        filter.passed() + filter.dropped(),
        frames,
        "a frame was not counted"
    );
    assert!(
        filter.drop_counts().count() <= MAX_TRACKED_DESTINATIONS + 1,
        "drop table grew past its bound"
    );
}

fn check_one(rules: &EgressRules, filter: &mut EgressFilter, frame: &[u8]) {
    let decision = filter.check(frame);
    let parsed = parse_frame(frame);
    let verdict = parsed.as_ref().map(|f| rules.decide(f));
    match decision {
        Decision::Pass => assert_eq!(verdict, Ok(Verdict::Allow), "filter and rules disagree"),
        Decision::Drop { .. } => assert!(
            !matches!(verdict, Ok(Verdict::Allow)),
            "filter dropped what the rules allow"
        ),
    }
    if decision != Decision::Pass {
        return;
    }
    let f = parsed.expect("a passed frame parsed");
    assert_eq!(
        f.eth.src, GUEST_MAC,
        "passed a frame with a foreign source MAC"
    );
    match f.payload {
        Payload::Arp(arp) => {
            assert_eq!(
                arp.target_ip, GATEWAY_V4,
                "passed ARP not about the gateway"
            );
            assert!(matches!(arp.op, ARPOP_REQUEST | ARPOP_REPLY));
        }
        Payload::Ip(ip) => {
            assert!(!ip.ipv4_options, "passed IPv4 options");
            assert!(!ip.ipv6_routing, "passed an IPv6 routing header");
            match ip.transport {
                Transport::Fragment { .. } => panic!("passed a fragment"),
                Transport::Other { protocol } => panic!("passed IP protocol {protocol}"),
                Transport::Icmpv6 {
                    icmp_type: 133..=137,
                    ndp_target,
                    ..
                } => {
                    let to_gateway =
                        ip.dst == IpAddr::V6(GATEWAY_V6) || ndp_target == Some(GATEWAY_V6);
                    assert!(to_gateway, "passed NDP not about the gateway: {ip:?}");
                }
                Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. }
                    if dst_port == DNS_PORT =>
                {
                    assert!(
                        rules_resolvers().contains(&ip.dst),
                        "passed DNS to {}",
                        ip.dst
                    );
                }
                transport => assert!(
                    rules
                        .allow_rules()
                        .iter()
                        .any(|r| allowed_by(r, ip.dst, &transport)),
                    "passed {ip:?} which no allow rule covers"
                ),
            }
        }
        Payload::VlanTagged => panic!("passed a VLAN-tagged frame"),
        Payload::OtherEthertype => panic!("passed EtherType {:#06x}", f.eth.ethertype),
    }
}

fn rules_resolvers() -> [IpAddr; 2] {
    [
        IpAddr::V4(RESOLVER_V4),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53)),
    ]
}

/// The harness's own reading of an allow rule, independent of the device's.
fn allowed_by(rule: &AllowRule, dst: IpAddr, transport: &Transport) -> bool {
    if !rule.net.contains(dst) {
        return false;
    }
    let ports = rule.first_port..=rule.last_port;
    match (rule.protocol, transport) {
        (RuleProtocol::Tcp, Transport::Tcp { dst_port, .. })
        | (RuleProtocol::Udp, Transport::Udp { dst_port, .. }) => ports.contains(dst_port),
        (RuleProtocol::Icmp, Transport::Icmp { .. } | Transport::Icmpv6 { .. }) => true,
        _ => false,
    }
}
