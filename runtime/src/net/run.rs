//! `mvm run --net` from the command line to the VMM: the pieces the run path, admission
//! and the kvm backend call.
//!
//! 1. [`prepare`] (before admission): parses `--allow`/`--dns`, pins host names to
//!    addresses, and reserves the guest's interface: on the kvm tier by setting the
//!    host network up now ([`NetSession`]), so the plan can pin its address; on the
//!    emulated tier by choosing the pool's first /30, which the inner `mvm` sets up in
//!    its fresh test host.
//! 2. [`apply_to_admission`]: the policy's egress cap (names in the policy cover the
//!    addresses they resolve to), the plan's net section, and the `mvm.net=` word on the
//!    command line the plan pins.
//! 3. [`attach`] (in the kvm backend): sets the host network up if nobody did yet (the
//!    test host side of the emulated tier), and adds `--net` and the `mvm.net=` word to
//!    the VMM's arguments.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use mvm_loader::plan::{EgressHost, EgressRule, NetInterface, Protocol};

use super::allow::{self, SystemResolver};
use super::pool::{AddressPool, SUBNET_PREFIX};
use super::session::{format_mac, NetSession};
use super::{NetError, NetRequest};
use crate::admission::{AdmissionRequest, Denial, ImageFacts, Policy, Rule};
use crate::backend::{RunError, RunSpec, Tier};

/// The DNS port, opened towards each `--dns` resolver.
const DNS_PORT: u16 = 53;

/// What `--net` asked for, parsed, pinned and reserved.
#[derive(Debug)]
pub struct NetPrep {
    /// The request the backend gets (in the run spec).
    pub request: NetRequest,
    /// The host network, when it is set up on this host before admission (kvm tier).
    pub session: Option<NetSession>,
    resolver: SystemResolver,
}

/// The `--net` flags of `mvm run` (and of `mvm sandbox create`, kept in its config).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetFlags {
    /// `--net` given (or implied by `--allow`/`--dns`).
    pub net: bool,
    /// `--allow` values, parsed.
    pub allow: Vec<EgressRule>,
    /// `--dns` values.
    pub dns: Vec<Ipv4Addr>,
    /// Hosts (names) and ports a secret is bound to (`--for`): their pinned addresses
    /// are intercepted for the run's egress proxy. Each is in `allow` too.
    pub intercept: Vec<(String, u16)>,
}

impl NetFlags {
    /// Whether the VM gets a network device.
    #[must_use]
    pub fn wanted(&self) -> bool {
        self.net || !self.allow.is_empty() || !self.dns.is_empty()
    }
}

/// Parses, pins and reserves (see the module docs). `None` without `--net`.
pub fn prepare(flags: &NetFlags, tier: Tier) -> Result<Option<NetPrep>, RunError> {
    if !flags.wanted() {
        return Ok(None);
    }
    match tier {
        Tier::Container => return Err(RunError::Missing(
            "--net: the container tier has no network in this version (its network namespace holds only loopback); use the kvm or emulated tier (docs/backends.md)".into(),
        )),
        Tier::Vz => return Err(RunError::Missing(
            "--net: the vz tier has no network device in this version; use the kvm or emulated tier (docs/backends.md)".into(),
        )),
        Tier::Kvm | Tier::Emulated => {}
    }
    let mut resolver = SystemResolver::default();
    let allow =
        allow::pin(&flags.allow, &mut resolver).map_err(|e| RunError::Missing(e.to_string()))?;
    let mut request = NetRequest {
        allow,
        resolvers: flags.dns.clone(),
        interface: None,
        tap: None,
        intercept: Vec::new(),
    };
    for (name, port) in &flags.intercept {
        let addresses = pinned_v4(&mut resolver, name)?;
        request
            .intercept
            .extend(addresses.into_iter().map(|a| SocketAddrV4::new(a, *port)));
    }
    let session = match tier {
        Tier::Kvm => {
            let session = NetSession::create(&request).map_err(RunError::Net)?;
            request.interface = Some(session.interface().clone());
            request.tap = Some(session.tap().to_owned());
            Some(session)
        }
        Tier::Emulated | Tier::Container | Tier::Vz => {
            let interface = first_interface(&request.resolvers)?;
            request.interface = Some(interface);
            None
        }
    };
    Ok(Some(NetPrep {
        request,
        session,
        resolver,
    }))
}

/// `name`'s IPv4 addresses as [`allow::pin`] pins them (the same cached answer).
fn pinned_v4(resolver: &mut SystemResolver, name: &str) -> Result<Vec<Ipv4Addr>, RunError> {
    use super::allow::Resolve as _;
    let mut v4: Vec<Ipv4Addr> = resolver
        .resolve(name)
        .map_err(|e| RunError::Missing(format!("--for {name}: {e}")))?
        .into_iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    v4.sort();
    v4.dedup();
    if v4.is_empty() {
        return Err(RunError::Missing(format!("--for {name}: no IPv4 address")));
    }
    Ok(v4)
}

impl NetPrep {
    /// The addresses `name` was pinned to for this run (`--for`).
    pub fn bound_addresses(&mut self, name: &str) -> Result<Vec<Ipv4Addr>, RunError> {
        pinned_v4(&mut self.resolver, name)
    }

    /// The egress proxy's socket (kvm tier, with `--for`), taken once.
    pub fn take_proxy_listener(&mut self) -> Option<std::net::TcpListener> {
        self.session.as_mut()?.take_proxy_listener()
    }
}

/// The pool's first /30 (the test host of the emulated tier is fresh for every run).
fn first_interface(resolvers: &[Ipv4Addr]) -> Result<NetInterface, RunError> {
    let pool = AddressPool::from_env().map_err(|e| RunError::Net(NetError::Pool(e)))?;
    let subnet = pool
        .subnet(0)
        .ok_or_else(|| RunError::Net(NetError::PoolExhausted(pool.to_string())))?;
    Ok(NetInterface {
        mac: format_mac(subnet.guest_mac()),
        address: subnet.guest(),
        prefix_len: SUBNET_PREFIX,
        gateway: subnet.gateway(),
        resolvers: resolvers.to_vec(),
    })
}

/// The egress rules the plan carries: the pinned `--allow` rules and UDP/53 to each
/// resolver (so the policy's cap applies to resolvers too).
#[must_use]
pub fn plan_rules(request: &NetRequest) -> Vec<EgressRule> {
    let mut rules = request.allow.clone();
    for r in &request.resolvers {
        let rule = EgressRule {
            host: EgressHost::Ip((*r).into()),
            port: DNS_PORT,
            last_port: None,
            protocol: Protocol::Udp,
        };
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    rules
}

/// The kernel command line with the `mvm.net=` word the agent reads.
#[must_use]
pub fn cmdline_with_net(cmdline: &str, interface: &NetInterface) -> String {
    format!(
        "{cmdline} {}={}",
        mvm_agent::net_config::CMDLINE_KEY,
        interface.cmdline_value()
    )
}

/// Admission's part: the egress cap (a denial names `egress.allow`), then the request's
/// egress rules and interface, the policy's names pinned like the request's, and the
/// command line the plan pins.
pub fn apply_to_admission(
    prep: &mut NetPrep,
    request: &mut AdmissionRequest,
    facts: &mut ImageFacts,
    policy: &mut Policy,
) -> Result<(), Denial> {
    let Some(interface) = prep.request.interface.clone() else {
        return Err(Denial {
            rule: Rule::Egress,
            reason: "the network was not reserved before admission".into(),
        });
    };
    policy.egress.allow = allow::pin_allowances(&policy.egress.allow, &mut prep.resolver);
    let rules = plan_rules(&prep.request);
    allow::check_cap(&policy.egress.allow, &rules)?;
    request.egress = rules;
    request.net = Some(interface.clone());
    facts.cmdline = cmdline_with_net(&facts.cmdline, &interface);
    Ok(())
}

/// A VM's network as the kvm backend attaches it.
#[derive(Debug)]
pub struct Attached {
    /// The session set up here (the test host side); `None` when the caller holds it.
    pub session: Option<NetSession>,
}

/// Sets the host network up unless the caller already did, then adds `--net
/// tap=..,mac=..,policy=FILE` (the policy file in `dir`: resolvers and gateway, plus
/// the allow rules when no signed plan carries them) and the `mvm.net=` word to `args`.
pub fn attach(
    spec: &RunSpec,
    dir: &Path,
    signed_plan: bool,
    args: &mut Vec<String>,
) -> Result<Option<Attached>, RunError> {
    let Some(request) = &spec.net else {
        return Ok(None);
    };
    let session = match &request.tap {
        Some(_) => None,
        None => Some(NetSession::create(request).map_err(RunError::Net)?),
    };
    let (tap, interface) = match (&session, &request.tap, &request.interface) {
        (Some(s), _, _) => (s.tap().to_owned(), s.interface().clone()),
        (None, Some(tap), Some(interface)) => (tap.clone(), interface.clone()),
        _ => {
            return Err(RunError::Missing(
                "--net: a reserved tap without its interface".into(),
            ))
        }
    };
    let policy = dir.join("net-policy.json");
    let allow: &[EgressRule] = if signed_plan { &[] } else { &request.allow };
    let value = super::session::write_vmm_policy(&policy, &tap, &interface, allow)
        .map_err(RunError::Net)?;
    if let Some(at) = args.iter().position(|a| a == "--cmdline") {
        if let Some(cmdline) = args.get_mut(at.saturating_add(1)) {
            *cmdline = cmdline_with_net(cmdline, &interface);
        }
    }
    args.push("--net".to_owned());
    args.push(value);
    Ok(Some(Attached { session }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_become_dns_rules_once() {
        let request = NetRequest {
            allow: vec![allow::parse_allow("10.0.0.53:53/udp").unwrap()],
            resolvers: vec![Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(10, 0, 0, 54)],
            interface: None,
            tap: None,
            intercept: Vec::new(),
        };
        let text: Vec<String> = plan_rules(&request)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(text, ["10.0.0.53:53/udp", "10.0.0.54:53/udp"]);
    }

    #[test]
    fn the_emulated_tier_reserves_the_pools_first_subnet() {
        let flags = NetFlags {
            net: true,
            allow: vec![allow::parse_allow("192.0.2.1:80").unwrap()],
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            intercept: vec![],
        };
        let prep = prepare(&flags, Tier::Emulated).unwrap().unwrap();
        assert!(prep.session.is_none());
        let iface = prep.request.interface.clone().unwrap();
        iface.validate().unwrap();
        assert_eq!(iface.address, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(
            cmdline_with_net("quiet", &iface),
            "quiet mvm.net=10.200.0.2/30,10.200.0.1,192.0.2.53"
        );
        assert!(prepare(&NetFlags::default(), Tier::Emulated)
            .unwrap()
            .is_none());
    }

    #[test]
    fn admission_gets_the_cap_the_rules_and_the_pinned_cmdline() {
        let flags = NetFlags {
            net: true,
            allow: vec![allow::parse_allow("192.0.2.1:80").unwrap()],
            dns: vec![],
            intercept: vec![],
        };
        let mut prep = prepare(&flags, Tier::Emulated).unwrap().unwrap();
        let mut request = AdmissionRequest::new("default");
        let mut facts = ImageFacts {
            digest: mvm_loader::measure::Sha256Digest::of(b"m"),
            names: vec![],
            kernel: mvm_loader::measure::Sha256Digest::of(b"k"),
            initramfs: None,
            cmdline: "quiet".into(),
            disks: vec![],
        };
        let mut policy = Policy::default();
        let denial =
            apply_to_admission(&mut prep, &mut request, &mut facts, &mut policy).unwrap_err();
        assert_eq!(denial.rule, Rule::Egress);
        assert!(denial.to_string().contains("192.0.2.1:80/tcp"), "{denial}");
        policy.egress.allow = vec!["192.0.2.0/24:*".parse().unwrap()];
        apply_to_admission(&mut prep, &mut request, &mut facts, &mut policy).unwrap();
        assert_eq!(request.egress, flags.allow);
        assert!(request.net.is_some());
        assert_eq!(facts.cmdline, "quiet mvm.net=10.200.0.2/30,10.200.0.1");
    }
}
