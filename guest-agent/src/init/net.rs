//! The guest's network set-up from the `mvm.net=` word ([`crate::net_config`]):
//! [`configure`] turns IPv6 off on the interface (no link-local address, no router
//! solicitation, no MLD: addresses are static and the device drops NDP that is not
//! about the gateway), sets the address, brings `lo` and the interface up, adds the
//! default route through the gateway and writes `/etc/resolv.conf`, all through the
//! ioctls of [`crate::netif`].

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::net_config::NetConfig;
use crate::netif::{add_default_route, disable_ipv6, set_ipv4, set_up};

/// How long the agent waits for the network interface to appear.
const INTERFACE_WAIT: Duration = Duration::from_secs(3);

/// The `/etc/resolv.conf` text for `resolvers`.
#[must_use]
pub fn resolv_conf(resolvers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# written by mvm-agent from the plan (mvm.net=)\n");
    for r in resolvers {
        text.push_str(&format!("nameserver {r}\n"));
    }
    text
}

/// The first network interface other than `lo` under `sys_class_net`, by name.
pub fn find_interface(sys_class_net: &Path) -> io::Result<Option<String>> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// Brings the loopback interface up: programs in the guest talk to themselves over
/// 127.0.0.1, and a sandbox's port forwards arrive there. Done at every boot, with a
/// network device or without.
pub fn loopback_up() -> io::Result<()> {
    set_up("lo")
}

/// Configures the guest's interface, route and resolver.
pub fn configure(config: &NetConfig) -> io::Result<String> {
    let start = Instant::now();
    let name = loop {
        match find_interface(Path::new("/sys/class/net")) {
            Ok(Some(name)) => break name,
            Ok(None) | Err(_) if start.elapsed() < INTERFACE_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no network interface appeared",
                ))
            }
            Err(e) => return Err(e),
        }
    };
    disable_ipv6(&name)?;
    set_ipv4(&name, config.address, config.prefix_len)?;
    set_up(&name)?;
    if let Err(e) = set_up("lo") {
        tracing::warn!("lo up: {e}");
    }
    add_default_route(config.gateway)?;
    std::fs::create_dir_all("/etc")?;
    std::fs::write("/etc/resolv.conf", resolv_conf(&config.resolvers))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_the_resolvers() {
        let text = resolv_conf(&[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]);
        assert!(
            text.ends_with("nameserver 10.0.0.1\nnameserver 10.0.0.2\n"),
            "{text}"
        );
    }

    #[test]
    fn the_interface_is_the_first_that_is_not_lo() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_interface(dir.path()).unwrap(), None);
        for n in ["lo", "eth1", "eth0"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        assert_eq!(find_interface(dir.path()).unwrap().as_deref(), Some("eth0"));
    }
}
