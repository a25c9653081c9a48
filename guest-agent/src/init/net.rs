//! The guest's network set-up, from the `mvm.net=ADDRESS/PREFIX,GATEWAY[,RESOLVER]...`
//! kernel command-line key (the plan pins the command line, so the signature covers it).
//!
//! [`parse_net_config`] is the whole parsing surface; [`configure`] then turns IPv6 off on
//! the interface (no link-local address, no router solicitation, no MLD: addresses are
//! static and the device drops NDP that is not about the gateway), sets the address,
//! brings `lo` and the interface up, adds the default route through the gateway and
//! writes `/etc/resolv.conf`. All through ioctls, so it needs no `ip` binary; the host
//! side of `mvm run --net` uses the same interface functions on its tap.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The kernel command-line key.
pub const CMDLINE_KEY: &str = "mvm.net";
/// Most resolvers read from the command line.
pub const MAX_RESOLVERS: usize = 4;
/// Longest interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// How long the agent waits for the network interface to appear.
const INTERFACE_WAIT: Duration = Duration::from_secs(3);

/// The guest's network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length (1..=31).
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// DNS resolvers, in order.
    pub resolvers: Vec<Ipv4Addr>,
}

/// Why `mvm.net=` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mvm.net={value:?}: {reason} (expected ADDRESS/PREFIX,GATEWAY[,RESOLVER]...)")]
pub struct NetConfigError {
    /// The value (at most 120 characters of it).
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// Parses `ADDRESS/PREFIX,GATEWAY[,RESOLVER]...`.
pub fn parse_net_config(value: &str) -> Result<NetConfig, NetConfigError> {
    let err = |reason: String| NetConfigError {
        value: value.chars().take(120).collect(),
        reason,
    };
    let mut parts = value.split(',');
    let cidr = parts.next().unwrap_or_default();
    let (address, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| err(format!("{cidr:?} has no /PREFIX")))?;
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| err(format!("{address:?} is not an IPv4 address")))?;
    let prefix_len = match prefix.parse::<u8>() {
        Ok(p) if (1..=31).contains(&p) && !prefix.starts_with('+') => p,
        _ => return Err(err(format!("prefix {prefix:?} is not 1..=31"))),
    };
    let gateway = parts.next().ok_or_else(|| err("no gateway".to_owned()))?;
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| err(format!("gateway {gateway:?} is not an IPv4 address")))?;
    let mut resolvers = Vec::new();
    for r in parts {
        if resolvers.len() == MAX_RESOLVERS {
            return Err(err(format!("more than {MAX_RESOLVERS} resolvers")));
        }
        resolvers.push(
            r.parse()
                .map_err(|_| err(format!("resolver {r:?} is not an IPv4 address")))?,
        );
    }
    let mask = netmask(prefix_len);
    if u32::from(address) & u32::from(mask) != u32::from(gateway) & u32::from(mask)
        || address == gateway
    {
        return Err(err(format!(
            "gateway {gateway} is not another address in {address}/{prefix_len}"
        )));
    }
    Ok(NetConfig {
        address,
        prefix_len,
        gateway,
        resolvers,
    })
}

/// The netmask of a prefix length.
#[must_use]
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32u32.saturating_sub(u32::from(prefix_len)))
            .unwrap_or(0),
    )
}

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

/// Turns IPv6 off on `name` (no link-local address, no autoconfiguration, no router
/// solicitation). A kernel without IPv6 has nothing to turn off.
pub fn disable_ipv6(name: &str) -> io::Result<()> {
    check_name(name)?;
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}"))),
    }
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "bad interface name {:?}",
                name.chars().take(32).collect::<String>()
            ),
        ))
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_name(name)?;
    // SAFETY: `ifreq` is plain old data (a byte array and a union of integers, arrays and
    // pointers); all zeroes is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(ifr)
}

/// An IPv4 `sockaddr` (the `sockaddr_in` layout: family, port 0, address).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: `sockaddr` is plain old data; all zeroes is valid.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0);
    // sa_data: two bytes of port (0), then the address in network order.
    for (dst, src) in sa.sa_data.iter_mut().skip(2).zip(addr.octets()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    sa
}

fn ioctl_ifreq(
    fd: &OwnedFd,
    request: libc::c_ulong,
    ifr: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: every request passed here (SIOCSIFADDR, SIOCSIFNETMASK, SIOCGIFFLAGS,
    // SIOCSIFFLAGS) reads or writes one `ifreq`, and `ifr` is a valid, exclusively
    // borrowed `ifreq` that outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(ifr)) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Sets `name`'s IPv4 address and netmask.
pub fn set_ipv4(name: &str, address: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_addr = sockaddr_v4(address);
    ioctl_ifreq(
        &fd,
        libc::SIOCSIFADDR,
        &mut ifr,
        &format!("{name}: SIOCSIFADDR {address}"),
    )?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr_v4(netmask(prefix_len));
    ioctl_ifreq(
        &fd,
        libc::SIOCSIFNETMASK,
        &mut ifr,
        &format!("{name}: SIOCSIFNETMASK /{prefix_len}"),
    )
}

/// Brings `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut ifr = ifreq(name)?;
    ioctl_ifreq(
        &fd,
        libc::SIOCGIFFLAGS,
        &mut ifr,
        &format!("{name}: SIOCGIFFLAGS"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    ifr.ifr_ifru.ifru_flags = flags | up;
    ioctl_ifreq(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut ifr,
        &format!("{name}: SIOCSIFFLAGS up"),
    )
}

/// Adds the default route through `gateway` (an existing one is left alone).
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let fd = inet_socket()?;
    // SAFETY: `rtentry` is plain old data (integers, sockaddrs and a null-able pointer);
    // all zeroes is a valid value, with `rt_dev` null (the kernel picks the interface
    // from the gateway).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one `rtentry`; `rt` is valid and outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCADDRT, std::ptr::from_mut(&mut rt)) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(io::Error::new(
            e.kind(),
            format!("SIOCADDRT default via {gateway}: {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_parses() {
        let c = parse_net_config("10.200.0.2/30,10.200.0.1,1.1.1.1,9.9.9.9").unwrap();
        assert_eq!(c.address, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(c.prefix_len, 30);
        assert_eq!(c.gateway, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(
            c.resolvers,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        let c = parse_net_config("192.168.1.10/24,192.168.1.1").unwrap();
        assert!(c.resolvers.is_empty());
    }

    #[test]
    fn hostile_net_configs_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "no /PREFIX"),
            ("10.0.0.2", "no /PREFIX"),
            ("10.0.0.2/32,10.0.0.1", "prefix"),
            ("10.0.0.2/0,10.0.0.1", "prefix"),
            ("10.0.0.2/+8,10.0.0.1", "prefix"),
            ("10.0.0.2/30", "no gateway"),
            ("10.0.0.2/30,10.0.0.9", "not another address"),
            ("10.0.0.2/30,10.0.0.2", "not another address"),
            ("10.0.0.2/30,10.0.0.1,x", "resolver"),
            (
                "10.0.0.2/30,10.0.0.1,1.1.1.1,1.1.1.1,1.1.1.1,1.1.1.1,1.1.1.1",
                "more than",
            ),
            ("::1/64,::2", "not an IPv4"),
        ] {
            let err = parse_net_config(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn netmask_and_resolv_conf() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
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

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
            assert_eq!(
                set_up(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }
}
