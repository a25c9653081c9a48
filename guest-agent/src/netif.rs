//! IPv4 set-up of one network interface through ioctls, so it needs no `ip`
//! binary: an address and netmask, up, IPv6 off, a default route. The guest's
//! PID 1 uses it on its virtio-net interface (`crate::init::net`) and the
//! host's runtime on its tap; nothing here knows which side it runs on.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use crate::net_config::netmask;

/// Longest interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

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
    fn netmasks() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
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
