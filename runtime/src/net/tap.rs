//! Host taps: created persistent (`TUNSETPERSIST`) so that `mvm-vmm` can open the same
//! tap by name and so that it survives until mvm deletes it (or the next start finds it
//! stale, [`super::leftovers`]); addressed and brought up with the same ioctls the guest
//! agent uses; deleted by clearing the persist flag.

use std::fs::File;
#[cfg(target_os = "linux")]
use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::path::Path;

use super::pool::Ipv4Net;

/// The tun/tap control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

#[cfg(target_os = "linux")]
fn name_ifreq(name: &str, flags: libc::c_int) -> io::Result<libc::ifreq> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "bad tap name {:?}",
                name.chars().take(32).collect::<String>()
            ),
        ));
    }
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap_or(0);
    Ok(ifr)
}

/// How long [`attach`] retries a tap another process briefly holds.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens `/dev/net/tun` and attaches to (or creates) tap `name`, retrying `EBUSY` for
/// up to [`BUSY_WAIT`]: a thread of this process that forks (to run `nft`, say) while
/// we hold a tap's fd gives its child a copy until the child execs, and a tap takes one
/// attachment at a time.
fn attach(name: &str) -> io::Result<File> {
    let start = std::time::Instant::now();
    loop {
        match attach_once(name) {
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy && start.elapsed() < BUSY_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

#[cfg(target_os = "linux")]
fn attach_once(name: &str) -> io::Result<File> {
    let mut ifr = name_ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|e| io::Error::new(e.kind(), format!("{TUN_DEVICE}: {e}")))?;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`; `ifr` is valid, exclusively
    // borrowed and outlives the call; the fd is ours.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            std::ptr::from_mut(&mut ifr),
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    Ok(file)
}

/// Taps are Linux's (`/dev/net/tun`): on another host none is made.
#[cfg(not(target_os = "linux"))]
fn attach_once(_name: &str) -> io::Result<File> {
    Err(unsupported())
}

#[cfg(not(target_os = "linux"))]
fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "taps are created on Linux hosts only",
    )
}

#[cfg(not(target_os = "linux"))]
fn set_persist(_file: &File, _name: &str, _persist: bool) -> io::Result<()> {
    Err(unsupported())
}

#[cfg(target_os = "linux")]
fn set_persist(file: &File, name: &str, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its flag by value; no memory is passed.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("TUNSETPERSIST {name}: {e}"),
        ));
    }
    Ok(())
}

/// Creates the persistent tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
pub fn create(name: &str) -> io::Result<()> {
    let file = attach(name)?;
    set_persist(&file, name, true)
}

/// How long [`delete`] waits for the kernel to unregister the tap after the last fd on
/// it closes.
const GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Deletes tap `name`: clears its persist flag, so it goes when the last fd on it
/// closes (ours, now, once the VMM is gone), and returns once it is gone. The wait is
/// not idle caution: a thread of this process that forks (to run `nft`, say) between
/// our open and our close holds a copy of the fd until its child execs, and the tap
/// lives until then; a caller that re-creates the name, or checks, must not see it.
pub fn delete(name: &str) -> io::Result<()> {
    let file = attach(name)?;
    set_persist(&file, name, false)?;
    drop(file);
    let sys = Path::new("/sys/class/net").join(name);
    let start = std::time::Instant::now();
    while sys.exists() {
        if start.elapsed() > GONE_WAIT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("tap {name} is still there {GONE_WAIT:?} after its last close of ours: another process holds it open"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Gives `name` the address `gateway/prefix_len`, turns its IPv6 off (no link-local
/// address, no router solicitations towards the guest) and brings it up.
pub fn address_and_up(name: &str, gateway: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        mvm_agent::netif::disable_ipv6(name)?;
        mvm_agent::netif::set_ipv4(name, gateway, prefix_len)?;
        mvm_agent::netif::set_up(name)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (name, gateway, prefix_len);
        Err(unsupported())
    }
}

/// The interface names under `/sys/class/net`.
pub fn interfaces(sys_class_net: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The IPv4 networks of every address on the host's interfaces (`getifaddrs`).
pub fn host_networks() -> io::Result<Vec<Ipv4Net>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head through the valid pointer; the list is freed
    // below with freeifaddrs and not used after.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned, valid until
        // freeifaddrs.
        let node = unsafe { &*cur };
        if let (Some(addr), Some(mask)) = (ipv4_of(node.ifa_addr), ipv4_of(node.ifa_netmask)) {
            let prefix_len = u8::try_from(u32::from(mask).leading_ones()).unwrap_or(32);
            out.push(Ipv4Net::containing(addr, prefix_len));
        }
        cur = node.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn ipv4_of(sa: *const libc::sockaddr) -> Option<Ipv4Addr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs is at least a `sockaddr`.
    let sa = unsafe { &*sa };
    if i32::from(sa.sa_family) != libc::AF_INET {
        return None;
    }
    // sockaddr_in: family, port (2 bytes), then the address in network order.
    let b = |i: usize| sa.sa_data.get(i).map(|c| c.to_ne_bytes()[0]);
    Some(Ipv4Addr::new(b(2)?, b(3)?, b(4)?, b(5)?))
}

/// Whether this process has CAP_NET_ADMIN in its effective set (from `/proc/self/status`).
#[must_use]
pub fn has_net_admin(proc_status: &str) -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1u64 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_admin_is_read_from_the_effective_set() {
        assert!(has_net_admin("Name:\tmvm\nCapEff:\t000001ffffffffff\n"));
        assert!(has_net_admin("CapEff:\t0000000000001000\n"));
        assert!(!has_net_admin("CapEff:\t0000000000000000\n"));
        assert!(!has_net_admin(
            "CapPrm:\t0000000000001000\nCapEff:\t0000000000000fff\n"
        ));
        assert!(!has_net_admin("no caps line"));
    }

    #[test]
    fn host_networks_include_loopback() {
        let nets = host_networks().unwrap();
        assert!(
            nets.iter().any(|n| n.contains(Ipv4Addr::LOCALHOST)),
            "{nets:?}"
        );
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "0123456789abcdef", "a b"] {
            assert_eq!(create(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
    }

    /// On the real host, as root: taps made and deleted while another thread spawns
    /// processes (whose children hold copies of our fds until they exec) are neither
    /// refused as busy nor left behind. Before `attach` retried, about one in thirty
    /// deletes failed with EBUSY here.
    #[test]
    fn taps_come_and_go_while_other_threads_spawn() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(has_net_admin(&status), "this test needs CAP_NET_ADMIN");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::process::Command::new("true").status().unwrap();
                }
            })
        };
        let mut failures = Vec::new();
        for n in 0..150 {
            let name = crate::net::leftovers::tap_name(std::process::id(), 9000 + n).unwrap();
            if let Err(e) = create(&name).and_then(|()| delete(&name)) {
                failures.push(format!("{name}: {e}"));
            }
            if Path::new("/sys/class/net").join(&name).exists() {
                failures.push(format!("{name} left behind"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spawner.join().unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }
}
