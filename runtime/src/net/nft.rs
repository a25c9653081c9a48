//! The nftables set-up for one tap, when the plan allows egress beyond the host: one
//! table per tap (`table ip mvm-<tap>`), so tearing a VM down is one `delete table` and
//! never touches anyone else's rules.
//!
//! - `postrouting` (nat): the guest's address is masqueraded when it leaves through any
//!   other interface.
//! - `forward` (filter): from the tap, only the guest's own source address and only the
//!   plan's destinations pass (the device already enforces them; this is the second
//!   wall, in the host kernel); towards the tap, only replies (`ct state
//!   established,related`).
//!
//! The text is built by [`ruleset`] (tested as text) and applied with `nft -f -` in one
//! transaction that first creates and deletes the table, so a leftover table of the same
//! name is replaced, not merged.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};

use mvm_loader::plan::{EgressHost, EgressRule, Protocol};

use super::pool::Subnet;

/// The prefix of every table mvm creates.
pub const TABLE_PREFIX: &str = "mvm-";
/// The DNS port: the resolvers are reachable on it, over UDP and TCP.
const DNS_PORT: u16 = 53;

/// The table name of a tap.
#[must_use]
pub fn table_name(tap: &str) -> String {
    format!("{TABLE_PREFIX}{tap}")
}

/// Whether the guest may reach anything beyond the host end of its tap (then the host
/// must forward and masquerade for it).
#[must_use]
pub fn needs_nat(subnet: &Subnet, allow: &[EgressRule], resolvers: &[Ipv4Addr]) -> bool {
    let gateway = IpAddr::V4(subnet.gateway());
    let beyond = |host: &EgressHost| match host {
        EgressHost::Ip(ip) => *ip != gateway,
        EgressHost::Cidr(..) | EgressHost::Name(_) => true,
    };
    allow.iter().any(|r| beyond(&r.host)) || resolvers.iter().any(|r| *r != subnet.gateway())
}

fn destination(host: &EgressHost) -> Option<String> {
    match host {
        EgressHost::Ip(IpAddr::V4(ip)) => Some(ip.to_string()),
        EgressHost::Cidr(IpAddr::V4(ip), bits) => Some(format!("{ip}/{bits}")),
        // The guest has no IPv6 address, and names were pinned at admission.
        _ => None,
    }
}

/// TCP destinations whose connections go to a local proxy instead (secret
/// substitution's egress proxy, listening on the tap's gateway address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intercept {
    /// The bound hosts' pinned addresses and ports.
    pub destinations: Vec<SocketAddrV4>,
    /// Where the proxy listens.
    pub proxy: SocketAddrV4,
}

/// The `nft -f` script that (re)creates the tap's table; with `intercept`, a
/// `prerouting` chain that turns the guest's connections to those destinations towards
/// the proxy (`dnat`: the proxy reads the original destination back from conntrack).
#[must_use]
pub fn ruleset(
    tap: &str,
    subnet: &Subnet,
    allow: &[EgressRule],
    resolvers: &[Ipv4Addr],
    intercept: Option<&Intercept>,
) -> String {
    let table = table_name(tap);
    let guest = subnet.guest();
    let mut s = String::new();
    // Creating then deleting first makes the script replace a leftover table of this
    // name instead of failing or adding to it.
    let _ = writeln!(s, "table ip {table} {{}}");
    let _ = writeln!(s, "delete table ip {table}");
    let _ = writeln!(s, "table ip {table} {{");
    let _ = writeln!(s, "\tchain postrouting {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(s, "\t\tip saddr {guest} oifname != \"{tap}\" masquerade");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain forward {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook forward priority filter; policy accept;"
    );
    let _ = writeln!(s, "\t\tiifname \"{tap}\" ip saddr != {guest} drop");
    for rule in allow {
        let Some(dst) = destination(&rule.host) else {
            continue;
        };
        let proto = match rule.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let ports = match rule.last_port {
            Some(last) if last != rule.port => format!("{}-{last}", rule.port),
            _ => rule.port.to_string(),
        };
        let _ = writeln!(
            s,
            "\t\tiifname \"{tap}\" ip daddr {dst} {proto} dport {ports} accept"
        );
    }
    for r in resolvers {
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                s,
                "\t\tiifname \"{tap}\" ip daddr {r} {proto} dport {DNS_PORT} accept"
            );
        }
    }
    let _ = writeln!(s, "\t\tiifname \"{tap}\" drop");
    let _ = writeln!(
        s,
        "\t\toifname \"{tap}\" ct state established,related accept"
    );
    let _ = writeln!(s, "\t\toifname \"{tap}\" drop");
    let _ = writeln!(s, "\t}}");
    if let Some(intercept) = intercept {
        let _ = writeln!(s, "\tchain prerouting {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        for d in &intercept.destinations {
            let _ = writeln!(
                s,
                "\t\tiifname \"{tap}\" ip saddr {guest} ip daddr {} tcp dport {} dnat to {}",
                d.ip(),
                d.port(),
                intercept.proxy
            );
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// The table names in `nft list tables` output that belong to the `ip` family and
/// start with [`TABLE_PREFIX`].
#[must_use]
pub fn parse_tables(list_output: &str) -> Vec<String> {
    list_output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("table"), Some("ip"), Some(name), None) if name.starts_with(TABLE_PREFIX) => {
                    Some(name.to_owned())
                }
                _ => None,
            }
        })
        .collect()
}

/// Why an `nft` call failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started.
    #[error("cannot run {program} (nftables is needed for egress beyond the host): {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// `nft` ran and failed.
    #[error("{program} {args}: exit {status}: {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        stderr: String,
    },
}

/// The `nft` binary: `$MVM_NFT`, else the first `nft` in `PATH` or the sbin
/// directories (a test host's init may run `mvm` with no `PATH` at all), else `nft`.
fn program() -> String {
    if let Ok(path) = std::env::var("MVM_NFT") {
        return path;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| std::path::Path::new(d).join("nft"))
        .find(|p| p.is_file())
        .map_or_else(|| "nft".to_owned(), |p| p.display().to_string());
    found
}

/// Runs `nft ARGS`, feeding it `stdin`; returns its stdout.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let program = program();
    let mut child = Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NftError::Spawn {
            program: program.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as nft's own failure below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| NftError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NftError::Failed {
            program,
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies a [`ruleset`].
pub fn apply(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(script)).map(drop)
}

/// Deletes table `name` of family `ip`.
pub fn delete_table(name: &str) -> Result<(), NftError> {
    run(&["delete", "table", "ip", name], None).map(drop)
}

/// The names of the `ip` tables whose names start with [`TABLE_PREFIX`]; none when `nft`
/// is not installed (then nobody here can have made one with it).
pub fn list_tables() -> Result<Vec<String>, NftError> {
    match run(&["list", "tables"], None) {
        Ok(out) => Ok(parse_tables(&out)),
        Err(NftError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::pool::AddressPool;

    fn rule(host: &str, port: u16, last: Option<u16>, protocol: Protocol) -> EgressRule {
        EgressRule {
            host: host.parse().unwrap(),
            port,
            last_port: last,
            protocol,
        }
    }

    #[test]
    fn the_ruleset_masquerades_the_guest_and_forwards_only_the_plans_destinations() {
        let subnet = AddressPool::default().subnet(1).unwrap();
        let allow = [
            rule("192.0.2.7", 443, None, Protocol::Tcp),
            rule("10.1.0.0/16", 8000, Some(8080), Protocol::Udp),
            rule("2001:db8::1", 443, None, Protocol::Tcp),
        ];
        let text = ruleset(
            "mvm42-0",
            &subnet,
            &allow,
            &[Ipv4Addr::new(10, 0, 0, 53)],
            None,
        );
        let expected = "\
table ip mvm-mvm42-0 {}
delete table ip mvm-mvm42-0
table ip mvm-mvm42-0 {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.200.0.6 oifname != \"mvm42-0\" masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"mvm42-0\" ip saddr != 10.200.0.6 drop
\t\tiifname \"mvm42-0\" ip daddr 192.0.2.7 tcp dport 443 accept
\t\tiifname \"mvm42-0\" ip daddr 10.1.0.0/16 udp dport 8000-8080 accept
\t\tiifname \"mvm42-0\" ip daddr 10.0.0.53 udp dport 53 accept
\t\tiifname \"mvm42-0\" ip daddr 10.0.0.53 tcp dport 53 accept
\t\tiifname \"mvm42-0\" drop
\t\toifname \"mvm42-0\" ct state established,related accept
\t\toifname \"mvm42-0\" drop
\t}
}
";
        assert_eq!(text, expected);
    }

    #[test]
    fn intercepted_destinations_go_to_the_proxy_from_this_guest_only() {
        let subnet = AddressPool::default().subnet(1).unwrap();
        let allow = [rule("192.0.2.7", 443, None, Protocol::Tcp)];
        let intercept = Intercept {
            destinations: vec![SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 443)],
            proxy: SocketAddrV4::new(subnet.gateway(), 40001),
        };
        let text = ruleset("mvm42-0", &subnet, &allow, &[], Some(&intercept));
        assert!(text.contains("type nat hook prerouting priority dstnat; policy accept;"));
        assert!(text.contains(&format!(
            "iifname \"mvm42-0\" ip saddr {} ip daddr 192.0.2.7 tcp dport 443 dnat to {}:40001",
            subnet.guest(),
            subnet.gateway()
        )));
        let plain = ruleset("mvm42-0", &subnet, &allow, &[], None);
        assert!(!plain.contains("prerouting"));
    }

    #[test]
    fn nat_only_when_something_is_beyond_the_gateway() {
        let subnet = AddressPool::default().subnet(0).unwrap();
        let gw = subnet.gateway().to_string();
        assert!(!needs_nat(&subnet, &[], &[]));
        assert!(!needs_nat(
            &subnet,
            &[rule(&gw, 80, None, Protocol::Tcp)],
            &[subnet.gateway()]
        ));
        assert!(needs_nat(
            &subnet,
            &[rule("10.0.0.0/8", 80, None, Protocol::Tcp)],
            &[]
        ));
        assert!(needs_nat(&subnet, &[], &[Ipv4Addr::new(9, 9, 9, 9)]));
    }

    #[test]
    fn only_our_ip_tables_are_listed() {
        let out = "table ip mvm-mvm12-0\ntable inet filter\ntable ip nat\ntable ip6 mvm-mvm1-0\ntable ip mvm-x extra\n  table ip mvm-mvm13-2\n";
        assert_eq!(parse_tables(out), ["mvm-mvm12-0", "mvm-mvm13-2"]);
        assert!(parse_tables("").is_empty());
    }
}
