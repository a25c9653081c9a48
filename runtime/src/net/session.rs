//! One VM's host network: the tap, its address, and (when the plan reaches beyond the
//! host) forwarding and the tap's nftables table; all removed when the session drops.
//!
//! [`NetSession::create`] runs under a host-wide lock (`flock` on [`lock_path`]): it
//! first removes what dead runs left ([`super::leftovers`]), then picks the first free
//! /30 of the pool, creates and addresses the tap; so concurrent runs never share a
//! subnet and never remove each other's taps.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use mvm_loader::plan::{EgressRule, NetInterface};
use serde_json::json;

use super::leftovers::{self, tap_name};
use super::pool::{AddressPool, Ipv4Net, Subnet, SUBNET_PREFIX};
use super::{nft, tap, NetError, NetRequest};

/// Taps this process has created so far (the `<n>` of `mvm<pid>-<n>`).
static TAP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The host-wide lock file: `/run/mvm-net.lock`, or under `/tmp` without `/run`.
#[must_use]
pub fn lock_path() -> PathBuf {
    if Path::new("/run").is_dir() {
        PathBuf::from("/run/mvm-net.lock")
    } else {
        PathBuf::from("/tmp/mvm-net.lock")
    }
}

/// Holds the lock until dropped.
struct PoolLock(File);

impl PoolLock {
    fn take(path: &Path) -> Result<Self, NetError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(NetError::io(format!("opening the lock {}", path.display())))?;
        // SAFETY: flock(2) on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(NetError::io(format!("locking {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self(file))
    }
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Removes taps and tables whose owner is dead; failures are logged (one stuck leftover
/// must not stop every later run).
pub fn remove_leftovers() -> Stale {
    let interfaces = tap::interfaces(Path::new("/sys/class/net")).unwrap_or_default();
    let tables = nft::list_tables().unwrap_or_else(|e| {
        tracing::warn!("listing nftables tables: {e}");
        Vec::new()
    });
    let stale = leftovers::stale(&interfaces, &tables, leftovers::process_alive);
    for table in &stale.tables {
        match nft::delete_table(table) {
            Ok(()) => tracing::info!(table, "removed a dead run's nftables table"),
            Err(e) => tracing::warn!(table, "removing a dead run's table: {e}"),
        }
    }
    for name in &stale.taps {
        match tap::delete(name) {
            Ok(()) => tracing::info!(tap = name, "removed a dead run's tap"),
            Err(e) => tracing::warn!(tap = name, "removing a dead run's tap: {e}"),
        }
    }
    stale
}

pub use leftovers::Stale;

/// A VM's host network, torn down on drop.
#[derive(Debug)]
pub struct NetSession {
    tap: String,
    interface: NetInterface,
    allow: Vec<EgressRule>,
    nat: bool,
    tap_created: bool,
    /// The egress proxy's socket, bound on the gateway address before the table that
    /// sends the intercepted destinations to it (taken by the run that serves it).
    proxy_listener: Option<std::net::TcpListener>,
}

impl NetSession {
    /// Checks CAP_NET_ADMIN, removes leftovers, picks a subnet (the request's, or the
    /// first free one of the pool), creates, addresses and brings up the tap, and sets up
    /// forwarding and NAT when the request reaches beyond the host.
    pub fn create(request: &NetRequest) -> Result<Self, NetError> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if !tap::has_net_admin(&status) {
            return Err(NetError::NoCapability);
        }
        if !Path::new(tap::TUN_DEVICE).exists() {
            return Err(NetError::NoTun);
        }
        let n = TAP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = tap_name(std::process::id(), n).ok_or(NetError::TooManyTaps)?;
        let lock = PoolLock::take(&lock_path())?;
        remove_leftovers();
        let subnet = match &request.interface {
            Some(fixed) => fixed_subnet(fixed)?,
            None => {
                let pool = AddressPool::from_env().map_err(NetError::Pool)?;
                let used = tap::host_networks().map_err(NetError::io("listing host addresses"))?;
                pool.first_free(&used)
                    .ok_or_else(|| NetError::PoolExhausted(pool.to_string()))?
            }
        };
        let interface = match &request.interface {
            Some(fixed) => fixed.clone(),
            None => NetInterface {
                mac: format_mac(subnet.guest_mac()),
                address: subnet.guest(),
                prefix_len: SUBNET_PREFIX,
                gateway: subnet.gateway(),
                resolvers: request.resolvers.clone(),
            },
        };
        let mut session = Self {
            tap: name,
            interface,
            allow: request.allow.clone(),
            nat: false,
            tap_created: false,
            proxy_listener: None,
        };
        tap::create(&session.tap).map_err(|e| NetError::Tap {
            tap: session.tap.clone(),
            source: e,
        })?;
        session.tap_created = true;
        tap::address_and_up(&session.tap, subnet.gateway(), session.interface.prefix_len).map_err(
            |e| NetError::Tap {
                tap: session.tap.clone(),
                source: e,
            },
        )?;
        drop(lock);
        let intercept = if request.intercept.is_empty() {
            None
        } else {
            let listener = std::net::TcpListener::bind((subnet.gateway(), 0))
                .map_err(NetError::io("binding the egress proxy's socket"))?;
            let proxy = match listener
                .local_addr()
                .map_err(NetError::io("the egress proxy's address"))?
            {
                std::net::SocketAddr::V4(v4) => v4,
                std::net::SocketAddr::V6(_) => {
                    return Err(NetError::io("the egress proxy's address")(
                        std::io::Error::other("bound to IPv6"),
                    ))
                }
            };
            session.proxy_listener = Some(listener);
            Some(nft::Intercept {
                destinations: request.intercept.clone(),
                proxy,
            })
        };
        if intercept.is_some()
            || nft::needs_nat(&subnet, &session.allow, &session.interface.resolvers)
        {
            enable_forwarding()?;
            session.nat = true;
            nft::apply(&nft::ruleset(
                &session.tap,
                &subnet,
                &session.allow,
                &session.interface.resolvers,
                intercept.as_ref(),
            ))
            .map_err(NetError::Nft)?;
        }
        tracing::info!(
            tap = session.tap,
            guest = %session.interface.address,
            gateway = %session.interface.gateway,
            nat = session.nat,
            "host network ready"
        );
        Ok(session)
    }

    /// The tap's name.
    #[must_use]
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// The guest's interface, as the plan carries it.
    #[must_use]
    pub fn interface(&self) -> &NetInterface {
        &self.interface
    }

    /// The egress proxy's socket, bound on the gateway address, when the request
    /// intercepts destinations (once: the proxy owns it from then on).
    pub fn take_proxy_listener(&mut self) -> Option<std::net::TcpListener> {
        self.proxy_listener.take()
    }

    /// Whether NAT (and forwarding) was set up.
    #[must_use]
    pub fn nat(&self) -> bool {
        self.nat
    }

    /// The `mvm.net=...` word for the guest's kernel command line.
    #[must_use]
    pub fn cmdline_word(&self) -> String {
        format!(
            "{}={}",
            mvm_agent::net_config::CMDLINE_KEY,
            self.interface.cmdline_value()
        )
    }

    fn teardown(&mut self) {
        if self.nat {
            if let Err(e) = nft::delete_table(&nft::table_name(&self.tap)) {
                tracing::warn!(tap = self.tap, "removing the nftables table: {e}");
            }
            self.nat = false;
        }
        if self.tap_created {
            if let Err(e) = delete_tap_when_free(&self.tap) {
                tracing::warn!(tap = self.tap, "removing the tap: {e}");
            }
            self.tap_created = false;
        }
    }
}

impl Drop for NetSession {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Writes the `mvm-vmm --net ...,policy=FILE` policy file (the allow rules, the
/// resolvers, and the gateway as the one address ARP may ask about) and returns the
/// `--net` value. With a signed plan `allow` must be empty: the plan's rules are the
/// only ones the VMM takes.
pub fn write_vmm_policy(
    path: &Path,
    tap: &str,
    interface: &NetInterface,
    allow: &[EgressRule],
) -> Result<String, NetError> {
    let body = json!({
        "allow": allow,
        "resolvers": interface.resolvers,
        "gateways": [interface.gateway],
    });
    let mut file =
        File::create(path).map_err(NetError::io(format!("writing {}", path.display())))?;
    file.write_all(body.to_string().as_bytes())
        .map_err(NetError::io(format!("writing {}", path.display())))?;
    Ok(format!(
        "tap={tap},mac={},policy={}",
        interface.mac,
        path.display()
    ))
}

/// How long teardown waits for a dying VMM (a jailed child may outlive its reaped
/// supervisor by a moment) to let go of the tap.
const TAP_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Deletes the tap, retrying while another process still has it attached (EBUSY); what
/// is still busy after [`TAP_BUSY_WAIT`] is left to the next start's leftover scan.
fn delete_tap_when_free(name: &str) -> std::io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match tap::delete(name) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && start.elapsed() < TAP_BUSY_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn fixed_subnet(fixed: &NetInterface) -> Result<Subnet, NetError> {
    let net = Ipv4Net::containing(fixed.address, fixed.prefix_len);
    let subnet = Subnet { net };
    if subnet.gateway() != fixed.gateway || subnet.guest() != fixed.address {
        return Err(NetError::Interface(format!(
            "the host end must be the first address of {net} and the guest the second (got gateway {}, guest {})",
            fixed.gateway, fixed.address
        )));
    }
    Ok(subnet)
}

/// `xx:xx:xx:xx:xx:xx`.
#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// Sets `net.ipv4.ip_forward` to 1 (left on afterwards: other VMs, and other software,
/// may rely on it; docs/net.md says so).
fn enable_forwarding() -> Result<(), NetError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => std::fs::write(PATH, "1").map_err(NetError::io(format!("setting {PATH}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn macs_format_and_fixed_subnets_are_checked() {
        assert_eq!(format_mac([2, 0, 10, 200, 0, 6]), "02:00:0a:c8:00:06");
        let good = NetInterface {
            mac: "02:00:0a:c8:00:06".into(),
            address: Ipv4Addr::new(10, 200, 0, 6),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 200, 0, 5),
            resolvers: vec![],
        };
        assert_eq!(
            fixed_subnet(&good).unwrap().net.to_string(),
            "10.200.0.4/30"
        );
        let swapped = NetInterface {
            address: Ipv4Addr::new(10, 200, 0, 5),
            gateway: Ipv4Addr::new(10, 200, 0, 6),
            ..good
        };
        assert!(fixed_subnet(&swapped).is_err());
    }

    /// These tests need CAP_NET_ADMIN, /dev/net/tun and nft; without any of
    /// them they fail (scripts/test runs as root, scripts/setup installs nftables).
    fn require_privileged() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(tap::has_net_admin(&status), "this test needs CAP_NET_ADMIN");
        assert!(
            Path::new(tap::TUN_DEVICE).exists(),
            "this test needs {}",
            tap::TUN_DEVICE
        );
        assert!(
            nft::run(&["--version"], None).is_ok(),
            "this test needs nft (nftables)"
        );
    }

    fn nft_tables() -> Vec<String> {
        nft::list_tables().unwrap()
    }

    /// On the real host: a session makes an addressed tap and its table; dropping it
    /// removes both. Skipped without CAP_NET_ADMIN.
    #[test]
    fn a_session_sets_up_and_tears_down_on_the_host() {
        require_privileged();
        let request = NetRequest {
            allow: vec![crate::net::allow::parse_allow("192.0.2.0/24:80-81").unwrap()],
            resolvers: vec![Ipv4Addr::new(192, 0, 2, 53)],
            interface: None,
            tap: None,
            intercept: Vec::new(),
        };
        let session = NetSession::create(&request).unwrap();
        let name = session.tap().to_owned();
        let sys = Path::new("/sys/class/net").join(&name);
        assert!(sys.exists(), "{name}");
        let gw = session.interface().gateway;
        let nets = tap::host_networks().unwrap();
        assert!(
            nets.iter().any(|n| n.contains(gw) && n.prefix_len == 30),
            "{nets:?}"
        );
        assert!(session.nat());
        assert!(nft_tables().contains(&nft::table_name(&name)));
        assert!(session.cmdline_word().starts_with("mvm.net="));
        // A second, concurrent session gets another subnet.
        let other = NetSession::create(&NetRequest::default()).unwrap();
        assert_ne!(other.interface().address, session.interface().address);
        assert!(!other.nat(), "nothing beyond the gateway: no NAT");
        drop(other);
        drop(session);
        assert!(!sys.exists(), "{name} left behind");
        assert!(!nft_tables().contains(&nft::table_name(&name)));
    }

    /// On the real host: a tap and a table named for a dead owner are removed by the
    /// next start's scan; a live owner's are not.
    #[test]
    fn leftovers_of_dead_owners_are_removed() {
        require_privileged();
        let dead = (4_000_000..4_100_000)
            .find(|p| !leftovers::process_alive(*p))
            .unwrap();
        let name = tap_name(dead, 7).unwrap();
        // Held so that a concurrent start's scan does not take our fake leftovers first.
        let lock = PoolLock::take(&lock_path()).unwrap();
        tap::create(&name).unwrap();
        nft::apply(&format!("table ip {} {{}}\n", nft::table_name(&name))).unwrap();
        let live = tap_name(std::process::id(), 9999).unwrap();
        tap::create(&live).unwrap();
        let stale = remove_leftovers();
        drop(lock);
        assert!(stale.taps.contains(&name), "{stale:?}");
        assert!(!stale.taps.contains(&live));
        assert!(!Path::new("/sys/class/net").join(&name).exists());
        assert!(Path::new("/sys/class/net").join(&live).exists());
        assert!(!nft_tables().contains(&nft::table_name(&name)));
        tap::delete(&live).unwrap();
        assert!(!Path::new("/sys/class/net").join(&live).exists());
    }
}
