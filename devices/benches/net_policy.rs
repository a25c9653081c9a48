//! The per-frame cost of the virtio-net egress check: parse the frame, decide, count.
//! This is the work the device adds to every TX frame before it reaches the tap.
//!
//! `cargo bench -p mvm-devices --bench net_policy`

// A benchmark harness, not guest-facing code: a setup failure should stop it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mvm_devices::virtio::net::frame::{build, parse_frame, ETHERTYPE_IPV6, IPPROTO_DSTOPTS};
use mvm_devices::virtio::net::policy::{AllowRule, EgressFilter, EgressRules, IpNet, RuleProtocol};

const SERVICE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// `extra` unrelated /32 rules first (the allowed one is last: the worst case of the
/// linear scan), then the service.
fn rules(extra: u32) -> EgressRules {
    let mut allow: Vec<AllowRule> = (0..extra)
        .map(|i| AllowRule {
            net: IpNet::host(IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + i))),
            first_port: 443,
            last_port: 443,
            protocol: RuleProtocol::Tcp,
        })
        .collect();
    allow.push(AllowRule {
        net: IpNet::host(IpAddr::V4(SERVICE)),
        first_port: 443,
        last_port: 443,
        protocol: RuleProtocol::Tcp,
    });
    EgressRules::new(
        allow,
        vec![IpAddr::V4(RESOLVER)],
        vec![IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))],
        Some(build::GUEST_MAC),
    )
    .expect("bench rules")
}

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let data = vec![0x5au8; 1400];
    let tcp_full = build::eth(
        0x0800,
        &build::ipv4(
            Ipv4Addr::new(10, 0, 2, 15),
            SERVICE,
            6,
            &build::tcp(40000, 443, &data),
        ),
    );
    let mut ext = vec![17u8, 0, 0, 0, 0, 0, 0, 0];
    ext.extend(build::udp(1, 53, b"query"));
    let v6 = build::eth(
        ETHERTYPE_IPV6,
        &build::ipv6(
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15),
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7),
            IPPROTO_DSTOPTS,
            &ext,
        ),
    );
    vec![
        ("tcp_allowed_1454B", tcp_full),
        ("tcp_denied_port", build::tcp4(SERVICE, 80)),
        ("udp_dns_to_resolver", build::udp4(RESOLVER, 53, b"query")),
        ("ipv6_ext_dns_denied", v6),
        (
            "malformed_truncated",
            build::tcp4(SERVICE, 443).into_iter().take(30).collect(),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("net_policy");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in frames() {
        group.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| {
                let _ = black_box(parse_frame(black_box(&frame)));
            })
        });
        for extra in [0u32, 255] {
            let mut filter = EgressFilter::new(rules(extra));
            group.bench_function(format!("check/{name}/rules_{}", extra + 1), |b| {
                b.iter(|| black_box(filter.check(black_box(&frame))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
