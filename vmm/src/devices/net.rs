//! `--net tap=NAME,mac=MAC[,policy=FILE|off]`: the virtio-net device on a host tap, with its
//! egress policy enforced in the device (`policy=off`, refused with a signed plan, turns the
//! check off for benchmarks).
//!
//! The value is parsed here ([`parse_net_arg`]); the policy file is read and the tap opened
//! while the arguments are checked ([`open_net`]), so a bad policy or a missing tap never
//! creates a VM; [`attach_net`] puts the device on a virtio-mmio slot and starts its
//! thread. Without `policy=`, the device passes nothing at all (default deny).
//!
//! The policy file is JSON, unknown fields refused:
//!
//! ```json
//! { "allow": [ { "host": "192.0.2.7", "port": 443, "protocol": "tcp" },
//!              { "host": "10.0.0.0/8", "port": 8080, "protocol": "tcp" } ],
//!   "resolvers": ["10.0.2.3"],
//!   "gateways": ["10.0.2.2", "fe80::1"] }
//! ```
//!
//! `allow` entries are the plan's egress rules (addresses or networks; names must have
//! been resolved at admission); `resolvers` are the only DNS servers the guest may reach;
//! `gateways` the only addresses ARP and NDP may ask about.
//!
//! With a signed plan (`--plan`), the allow rules are the plan's `devices.net.egress` and
//! nothing else: a policy file with `allow` rules is refused. When the plan also names
//! the guest's interface (`devices.net.interface`), the MAC must be the plan's, and the
//! resolvers and the gateway are the plan's: a policy file may repeat them, not add any.
//! Without an interface in the plan, a policy file may add `resolvers` and `gateways`.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mvm_devices::virtio::net::policy::{AllowRule, IpNet, PolicyError, RuleProtocol};
use mvm_devices::virtio::net::{EgressRules, MacAddr, Net, NetConfig, NetError, NetWorker, Tap};
use mvm_loader::plan::{EgressHost, EgressPolicy, EgressRule, NetDevice, Protocol};
use serde::Deserialize;

use crate::devices::{attach_virtio_device, DeviceContext, DeviceThread};
use crate::error::{BootError, PlanDisagreement};
use mvm_seccomp::{allow, roles::device_thread, Role};

/// The net thread: frames between the guest and the tap.
pub const ROLE: Role = Role::new("net", || {
    device_thread([
        allow!(
            SYS_readv,
            "read a frame (vnet header + payload) from the tap"
        ),
        allow!(
            SYS_writev,
            "write a frame (vnet header + payload) to the tap"
        ),
    ])
    // `read`/`write` on the tap are in the event loop and runtime sets.
});

/// Largest policy file read.
pub const MAX_POLICY_BYTES: u64 = 256 * 1024;

/// One `--net` as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// The tap interface.
    pub tap: String,
    /// The guest's MAC.
    pub mac: MacAddr,
    /// The policy file, if any.
    pub policy: Option<PathBuf>,
    /// `policy=off`: no egress check at all, for measuring what the check costs. Refused
    /// with a signed plan, so only a `--dev` boot can have it.
    pub unchecked: bool,
}

/// Why `--net` was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetArgError {
    /// A malformed, unknown or repeated `key=value` item.
    #[error("--net: unknown, malformed or repeated item {0:?} (expected tap=NAME,mac=MAC[,policy=FILE|off])")]
    Item(String),
    /// A required key is missing.
    #[error("--net: {0}= is required (expected tap=NAME,mac=MAC[,policy=FILE|off])")]
    Missing(&'static str),
    /// The MAC does not parse.
    #[error("--net: {0}")]
    Mac(NetError),
    /// The policy file cannot be read.
    #[error("--net policy {path}: {source}")]
    PolicyRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The policy file is larger than [`MAX_POLICY_BYTES`].
    #[error("--net policy {0}: larger than {MAX_POLICY_BYTES} bytes")]
    PolicyTooLarge(PathBuf),
    /// The policy file is not valid policy JSON.
    #[error("--net policy {path}: {reason}")]
    PolicyParse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The policy's content is refused.
    #[error("--net policy {path}: {source}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: PolicyError,
    },
    /// The tap could not be opened.
    #[error("--net: {0}")]
    Tap(NetError),
    /// A policy file naming resolvers or gateways the plan's interface does not.
    #[error("--net policy {path}: {what} {value} is not in the signed plan's interface")]
    NotInPlan {
        /// The file.
        path: PathBuf,
        /// `resolver` or `gateway`.
        what: &'static str,
        /// The address.
        value: IpAddr,
    },
    /// `policy=off` next to a signed plan.
    #[error("--net policy=off: a signed plan's egress policy cannot be switched off (policy=off is for --dev benchmarks)")]
    UncheckedWithPlan,
    /// A policy file with allow rules next to a signed plan.
    #[error("--net policy {0}: allow rules come from the signed plan; the file may only name resolvers and gateways")]
    AllowBesidePlan(PathBuf),
}

/// clap's parser for one `--net` value.
pub fn parse_net_value(value: &str) -> Result<NetArg, String> {
    parse_net_arg(value).map_err(|e| e.to_string())
}

/// Parses `tap=NAME,mac=MAC[,policy=FILE|off]`.
pub fn parse_net_arg(value: &str) -> Result<NetArg, NetArgError> {
    let mut tap = None;
    let mut mac = None;
    let mut policy = None;
    let mut unchecked = false;
    for item in value.split(',') {
        let bad = || NetArgError::Item(item.chars().take(64).collect());
        match item.split_once('=') {
            Some(("tap", v)) if !v.is_empty() && tap.is_none() => tap = Some(v.to_owned()),
            Some(("mac", v)) if mac.is_none() => {
                mac = Some(v.parse::<MacAddr>().map_err(NetArgError::Mac)?)
            }
            Some(("policy", "off")) if policy.is_none() && !unchecked => unchecked = true,
            Some(("policy", v)) if !v.is_empty() && policy.is_none() && !unchecked => {
                policy = Some(PathBuf::from(v))
            }
            _ => return Err(bad()),
        }
    }
    Ok(NetArg {
        tap: tap.ok_or(NetArgError::Missing("tap"))?,
        mac: mac.ok_or(NetArgError::Missing("mac"))?,
        policy,
        unchecked,
    })
}

/// `--net` against the plan's `devices.net`: none where the plan has none, and, when the
/// plan names the guest's interface, the plan's MAC.
pub fn check_plan(arg: Option<&NetArg>, plan: Option<&NetDevice>) -> Result<(), PlanDisagreement> {
    match (plan, arg) {
        (None, Some(n)) => Err(PlanDisagreement {
            flag: "--net tap",
            given: n.tap.clone(),
            field: "devices.net",
            plan: "none".into(),
        }),
        (Some(signed), Some(n)) => match &signed.interface {
            Some(interface) if interface.mac_octets() != Some(n.mac.octets()) => {
                Err(PlanDisagreement {
                    flag: "--net mac",
                    given: n.mac.to_string(),
                    field: "devices.net.interface.mac",
                    plan: interface.mac.clone(),
                })
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The policy file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<EgressRule>,
    #[serde(default)]
    resolvers: Vec<IpAddr>,
    #[serde(default)]
    gateways: Vec<IpAddr>,
}

/// Reads and checks a policy file for a guest with MAC `mac`. With `plan` (the signed
/// plan's net section), the allow rules are the plan's and the file may not add any;
/// when the plan names the interface, the resolvers and gateway are the plan's too.
pub fn load_policy(
    path: &Path,
    mac: MacAddr,
    plan: Option<&NetDevice>,
) -> Result<EgressRules, NetArgError> {
    let read_err = |source| NetArgError::PolicyRead {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_POLICY_BYTES {
        return Err(NetArgError::PolicyTooLarge(path.to_owned()));
    }
    let parsed: PolicyFile =
        serde_json::from_slice(&bytes).map_err(|e| NetArgError::PolicyParse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let allow = match plan {
        Some(_) if !parsed.allow.is_empty() => {
            return Err(NetArgError::AllowBesidePlan(path.to_owned()))
        }
        Some(signed) => signed.egress.clone(),
        None => EgressPolicy {
            allow: parsed.allow,
        },
    };
    let (resolvers, gateways) = match plan.and_then(|p| p.interface.as_ref()) {
        Some(interface) => {
            let (resolvers, gateways) = plan_addresses(interface);
            let extra = |what, given: &[IpAddr], signed: &[IpAddr]| {
                given
                    .iter()
                    .find(|a| !signed.contains(a))
                    .map(|a| NetArgError::NotInPlan {
                        path: path.to_owned(),
                        what,
                        value: *a,
                    })
            };
            if let Some(e) = extra("resolver", &parsed.resolvers, &resolvers)
                .or_else(|| extra("gateway", &parsed.gateways, &gateways))
            {
                return Err(e);
            }
            (resolvers, gateways)
        }
        None => (parsed.resolvers, parsed.gateways),
    };
    egress_rules(&allow, resolvers, gateways, Some(mac.octets())).map_err(|source| {
        NetArgError::Policy {
            path: path.to_owned(),
            source,
        }
    })
}

/// The device's egress rules from the plan's egress section (the plan's format, converted
/// here so the device knows nothing of plans), plus what the plan's network set-up adds
/// (resolvers, gateways, the guest's MAC). Each plan rule opens one port, or one range, of
/// one protocol; host names must already be resolved to addresses.
pub fn egress_rules(
    plan: &EgressPolicy,
    resolvers: Vec<IpAddr>,
    gateways: Vec<IpAddr>,
    guest_mac: Option<[u8; 6]>,
) -> Result<EgressRules, PolicyError> {
    let mut allow = Vec::with_capacity(plan.allow.len());
    for rule in &plan.allow {
        let net = match &rule.host {
            EgressHost::Ip(ip) => IpNet::host(*ip),
            EgressHost::Cidr(ip, bits) => IpNet::new(*ip, *bits)?,
            EgressHost::Name(name) => return Err(PolicyError::UnresolvedName(name.clone())),
        };
        let protocol = match rule.protocol {
            Protocol::Tcp => RuleProtocol::Tcp,
            Protocol::Udp => RuleProtocol::Udp,
        };
        allow.push(AllowRule {
            net,
            first_port: rule.port,
            // netrt: plan rules may carry a port range.
            last_port: rule.last_port.unwrap_or(rule.port),
            protocol,
        });
    }
    EgressRules::new(allow, resolvers, gateways, guest_mac)
}

/// A network device whose tap is open, not yet attached.
#[derive(Debug)]
pub struct OpenNet {
    front: Net,
    worker: NetWorker<Tap>,
}

impl OpenNet {
    /// The device's counters, shared with its thread (the boot report reads them).
    pub fn metrics(&self) -> std::sync::Arc<mvm_devices::virtio::net::NetMetrics> {
        self.worker.metrics()
    }
}

/// The resolvers and the gateway a plan's interface names.
fn plan_addresses(interface: &mvm_loader::plan::NetInterface) -> (Vec<IpAddr>, Vec<IpAddr>) {
    (
        interface.resolvers.iter().map(|r| IpAddr::V4(*r)).collect(),
        vec![IpAddr::V4(interface.gateway)],
    )
}

/// Reads the policy and opens the tap. `plan` is the signed plan's net section, when
/// the VMM boots from a plan (whose MAC [`check_plan`] already matched).
pub fn open_net(arg: &NetArg, plan: Option<&NetDevice>) -> Result<OpenNet, NetArgError> {
    let policy_err = |source| NetArgError::Policy {
        path: arg.policy.clone().unwrap_or_default(),
        source,
    };
    if arg.unchecked {
        if plan.is_some() {
            return Err(NetArgError::UncheckedWithPlan);
        }
        tracing::warn!(tap = %arg.tap, "--net policy=off: NO egress check; for benchmarks under --dev only");
        eprintln!("mvm-vmm: warning: --net policy=off: every frame the guest sends reaches the tap unchecked");
        let config = NetConfig {
            tap: arg.tap.clone(),
            mac: arg.mac,
            rules: EgressRules::unchecked(),
        };
        let (front, worker) = Net::open(&config).map_err(NetArgError::Tap)?;
        return Ok(OpenNet { front, worker });
    }
    let rules = match (&arg.policy, plan) {
        (Some(path), plan) => load_policy(path, arg.mac, plan)?,
        (None, Some(signed)) => {
            let (resolvers, gateways) = signed
                .interface
                .as_ref()
                .map(plan_addresses)
                .unwrap_or_default();
            egress_rules(&signed.egress, resolvers, gateways, Some(arg.mac.octets()))
                .map_err(policy_err)?
        }
        (None, None) => {
            tracing::warn!(tap = %arg.tap, "--net without policy= or plan: the device passes nothing");
            EgressRules::new(vec![], vec![], vec![], Some(arg.mac.octets())).map_err(policy_err)?
        }
    };
    let config = NetConfig {
        tap: arg.tap.clone(),
        mac: arg.mac,
        rules,
    };
    let (front, worker) = Net::open(&config).map_err(NetArgError::Tap)?;
    Ok(OpenNet { front, worker })
}

/// Puts the device on the next virtio-mmio slot (irqfd, ioeventfds, bus, command line) and
/// starts its device thread.
pub fn attach_net(ctx: &mut DeviceContext<'_>, net: OpenNet) -> Result<(), BootError> {
    let OpenNet { front, worker } = net;
    let tap = worker.backend().name().to_owned();
    let mac = front.mac();
    let rules = worker.filter().rules().allow_rules().len();
    let slot = attach_virtio_device(
        ctx,
        front,
        worker,
        DeviceThread {
            name: "virtio-net".into(),
            role: ROLE,
            label: "net".into(),
        },
    )?;
    tracing::info!(
        tap,
        mac = %mac,
        rules,
        addr = slot.base,
        gsi = slot.gsi,
        "virtio-net attached"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_devices::virtio::net::frame::build::*;
    use mvm_devices::virtio::net::frame::parse_frame;
    use mvm_devices::virtio::net::policy::Verdict;
    use std::net::Ipv4Addr;

    #[test]
    fn net_args_parse_and_bad_ones_are_named() {
        let a = parse_net_arg("tap=tap0,mac=02:00:00:00:00:01,policy=/p.json").unwrap();
        assert_eq!(a.tap, "tap0");
        assert_eq!(a.mac.to_string(), "02:00:00:00:00:01");
        assert_eq!(a.policy.as_deref(), Some(Path::new("/p.json")));
        let a = parse_net_arg("mac=02:00:00:00:00:01,tap=t").unwrap();
        assert_eq!(a.policy, None);
        for (bad, part) in [
            ("tap=t", "mac= is required"),
            ("mac=02:00:00:00:00:01", "tap= is required"),
            ("tap=t,tap=u,mac=02:00:00:00:00:01", "\"tap=u\""),
            ("tap=t,mac=01:00:00:00:00:01", "unicast"),
            ("tap=t,mac=02:00:00:00:00:01,speed=10", "\"speed=10\""),
        ] {
            let err = parse_net_arg(bad).unwrap_err().to_string();
            assert!(err.contains(part), "{bad}: {err}");
        }
    }

    #[test]
    fn policy_files_load_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"allow":[{"host":"192.0.2.7","port":443,"protocol":"tcp"}],
                "resolvers":["10.0.2.3"],"gateways":["10.0.2.2"]}"#,
        )
        .unwrap();
        let rules = load_policy(&path, mac, None).unwrap();
        assert_eq!(rules.allow_rules().len(), 1);

        std::fs::write(&path, r#"{"allow":[],"extra":1}"#).unwrap();
        let err = load_policy(&path, mac, None).unwrap_err().to_string();
        assert!(err.contains("extra"), "{err}");

        std::fs::write(
            &path,
            r#"{"allow":[{"host":"example.com","port":443,"protocol":"tcp"}]}"#,
        )
        .unwrap();
        let err = load_policy(&path, mac, None).unwrap_err().to_string();
        assert!(err.contains("example.com"), "{err}");

        std::fs::write(&path, vec![b' '; 300 * 1024]).unwrap();
        assert!(matches!(
            load_policy(&path, mac, None),
            Err(NetArgError::PolicyTooLarge(_))
        ));

        let err = load_policy(&dir.path().join("none.json"), mac, None).unwrap_err();
        assert!(err.to_string().contains("none.json"), "{err}");
    }

    #[test]
    fn with_a_signed_plan_the_allow_rules_are_the_plans() {
        let dir = tempfile::tempdir().unwrap();
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let signed = NetDevice {
            interface: None,
            egress: EgressPolicy {
                allow: vec![EgressRule {
                    host: "192.0.2.7".parse().unwrap(),
                    port: 443,
                    last_port: None,
                    protocol: mvm_loader::plan::Protocol::Tcp,
                }],
            },
        };
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"resolvers":["10.0.2.3"],"gateways":["10.0.2.2"]}"#,
        )
        .unwrap();
        let rules = load_policy(&path, mac, Some(&signed)).unwrap();
        assert_eq!(rules.allow_rules().len(), 1);
        std::fs::write(
            &path,
            r#"{"allow":[{"host":"0.0.0.0/0","port":22,"protocol":"tcp"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            load_policy(&path, mac, Some(&signed)),
            Err(NetArgError::AllowBesidePlan(_))
        ));
    }

    #[test]
    fn a_plans_interface_fixes_the_mac_resolvers_and_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let mac: MacAddr = "02:00:0a:c8:00:02".parse().unwrap();
        let signed = NetDevice {
            interface: Some(mvm_loader::plan::NetInterface {
                mac: "02:00:0a:c8:00:02".into(),
                address: "10.200.0.2".parse().unwrap(),
                prefix_len: 30,
                gateway: "10.200.0.1".parse().unwrap(),
                resolvers: vec!["10.0.0.53".parse().unwrap()],
            }),
            egress: EgressPolicy::default(),
        };
        let path = dir.path().join("p.json");
        // Repeating the plan's addresses is fine.
        std::fs::write(
            &path,
            r#"{"allow":[],"resolvers":["10.0.0.53"],"gateways":["10.200.0.1"]}"#,
        )
        .unwrap();
        load_policy(&path, mac, Some(&signed)).unwrap();
        // Adding one is not.
        for (body, what) in [
            (r#"{"resolvers":["10.0.0.54"]}"#, "resolver 10.0.0.54"),
            (r#"{"gateways":["10.200.0.5"]}"#, "gateway 10.200.0.5"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = load_policy(&path, mac, Some(&signed))
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{err}");
        }
        // A MAC other than the plan's is refused (as a plan disagreement, while the
        // configuration is resolved) before the tap is opened.
        let arg = parse_net_arg("tap=nonexistent0,mac=02:00:00:00:00:09").unwrap();
        let err = check_plan(Some(&arg), Some(&signed))
            .unwrap_err()
            .to_string();
        assert!(err.contains("02:00:0a:c8:00:02"), "{err}");
        // A signed plan's policy cannot be switched off.
        let arg = parse_net_arg("tap=nonexistent0,mac=02:00:0a:c8:00:02,policy=off").unwrap();
        let err = open_net(&arg, Some(&signed)).unwrap_err();
        assert!(matches!(err, NetArgError::UncheckedWithPlan), "{err}");
    }

    #[test]
    fn policy_off_parses_once_and_never_with_a_file() {
        let a = parse_net_arg("tap=t,mac=02:00:00:00:00:01,policy=off").unwrap();
        assert!(a.unchecked);
        assert_eq!(a.policy, None);
        assert!(
            !parse_net_arg("tap=t,mac=02:00:00:00:00:01")
                .unwrap()
                .unchecked
        );
        for bad in [
            "tap=t,mac=02:00:00:00:00:01,policy=off,policy=/p.json",
            "tap=t,mac=02:00:00:00:00:01,policy=/p.json,policy=off",
            "tap=t,mac=02:00:00:00:00:01,policy=off,policy=off",
        ] {
            assert!(parse_net_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_rules_convert_and_names_are_refused() {
        let plan: EgressPolicy = serde_json_free_plan();
        let r = egress_rules(&plan, vec![], vec![], None).unwrap();
        assert_eq!(r.allow_rules().len(), 2);
        assert_eq!(
            r.decide(&parse_frame(&tcp4(Ipv4Addr::new(192, 0, 2, 7), 443)).unwrap()),
            Verdict::Allow
        );
        assert_eq!(
            r.decide(&parse_frame(&udp4(Ipv4Addr::new(10, 1, 2, 3), 5000, b"")).unwrap()),
            Verdict::Allow
        );
        let mut named = plan.clone();
        named.allow[0].host = "example.com".parse().unwrap();
        assert_eq!(
            egress_rules(&named, vec![], vec![], None),
            Err(PolicyError::UnresolvedName("example.com".into()))
        );
    }

    fn serde_json_free_plan() -> EgressPolicy {
        use mvm_loader::plan::EgressRule;
        EgressPolicy {
            allow: vec![
                EgressRule {
                    host: "192.0.2.7".parse().unwrap(),
                    port: 443,
                    last_port: None,
                    protocol: Protocol::Tcp,
                },
                EgressRule {
                    host: "10.0.0.0/8".parse().unwrap(),
                    port: 5000,
                    last_port: None,
                    protocol: Protocol::Udp,
                },
            ],
        }
    }
}
