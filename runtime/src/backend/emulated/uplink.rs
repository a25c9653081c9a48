//! The test host's way out, for a run with `--net`: QEMU's user-mode network
//! (one `virtio-net-pci` on a `-netdev user`), so what the plan allows beyond the
//! gateway leaves the test host the way it leaves a kvm host: through the inner
//! `mvm`'s tap, its nftables table and masquerade, then QEMU's sockets on this
//! host (docs/net.md, "The emulated tier").
//!
//! QEMU's user network answers on a few addresses of its own: the host alias
//! [`SLIRP_HOST`] reaches *this* host's loopback, [`SLIRP_DNS`] QEMU's resolver.
//! Neither is a destination any plan means, and the first would open services
//! that listen on `127.0.0.1` here, so the test host drops everything it would
//! forward into [`SLIRP_NET`] ([`guard_table`]), whatever the allow list says.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::RunError;

/// QEMU's user network (its default, named so it is written down once).
pub const SLIRP_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 2, 0), 24);
/// QEMU's alias for this host's loopback.
pub const SLIRP_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// QEMU's resolver.
pub const SLIRP_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The test host's address on it.
pub const TESTHOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The nftables table the test host guards its uplink with.
const GUARD_TABLE: &str = "mvm-testhost-uplink";
/// How long the test host waits for the interface after loading `virtio_net`.
const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// QEMU's arguments for the uplink: no IPv6 (the inner guests have none), no
/// option ROM (nothing boots from it).
#[must_use]
pub fn qemu_args() -> Vec<String> {
    let (net, prefix) = SLIRP_NET;
    vec![
        "-netdev".into(),
        format!("user,id=uplink,net={net}/{prefix},host={SLIRP_HOST},dns={SLIRP_DNS},ipv6=off"),
        "-device".into(),
        "virtio-net-pci,netdev=uplink,romfile=".into(),
    ]
}

/// Whether `addr/prefix` shares an address with QEMU's user network: the pool's
/// subnet for the guest must not, or the test host could not route it.
#[must_use]
pub fn overlaps_slirp(addr: Ipv4Addr, prefix: u8) -> bool {
    let (net, slirp_prefix) = SLIRP_NET;
    let shorter = prefix.min(slirp_prefix);
    let mask = |p: u8| -> u32 {
        if p == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(p.min(32)))
        }
    };
    (u32::from(addr) & mask(shorter)) == (u32::from(net) & mask(shorter))
}

/// Refuses a guest subnet (the pool's, chosen on this host) that the test host could
/// not route because it overlaps QEMU's user network.
pub fn check_pool(addr: Ipv4Addr, prefix: u8) -> Result<(), RunError> {
    if overlaps_slirp(addr, prefix) {
        let (net, slirp_prefix) = SLIRP_NET;
        return Err(RunError::Missing(format!(
            "--net on the emulated tier: the pool's subnet for this VM ({addr}/{prefix}) overlaps the test host's own network ({net}/{slirp_prefix}); choose another MVM_NET_POOL"
        )));
    }
    Ok(())
}

/// The table that keeps forwarded traffic out of QEMU's own addresses.
#[must_use]
pub fn guard_table() -> String {
    let (net, prefix) = SLIRP_NET;
    format!(
        "table ip {GUARD_TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tip daddr {net}/{prefix} drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Inside the test host: waits for the virtio-net interface, gives it
/// [`TESTHOST_ADDR`] (by ioctl, as a tap is addressed), routes everything through
/// [`SLIRP_HOST`] and applies [`guard_table`].
pub fn bring_up() -> Result<(), RunError> {
    let interface = wait_for_interface(Path::new("/sys/class/net"))?;
    let (_, prefix) = SLIRP_NET;
    crate::net::tap::address_and_up(&interface, TESTHOST_ADDR, prefix).map_err(RunError::io(
        format!("test host uplink: addressing {interface}"),
    ))?;
    let gateway = SLIRP_HOST.to_string();
    let route = [
        "route", "add", "default", "via", &gateway, "dev", &interface,
    ];
    let out = Command::new("ip")
        .args(route)
        .stdin(Stdio::null())
        .output()
        .map_err(RunError::io("test host uplink: running ip"))?;
    if !out.status.success() {
        return Err(RunError::Missing(format!(
            "test host uplink: ip {}: {} ({})",
            route.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )));
    }
    crate::net::nft::run(&["-f", "-"], Some(&guard_table()))
        .map(drop)
        .map_err(|e| RunError::Missing(format!("test host uplink: the guard table: {e}")))
}

/// The first interface other than `lo` under `class` (the test host has no other).
fn wait_for_interface(class: &Path) -> Result<String, RunError> {
    let deadline = Instant::now() + APPEAR_WITHIN;
    loop {
        let found = crate::net::tap::interfaces(class)
            .map_err(RunError::io(format!("reading {}", class.display())))?
            .into_iter()
            .filter(|name| name != "lo")
            .min();
        if let Some(name) = found {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            return Err(RunError::Missing(format!(
                "test host: no network interface appeared within {}s (virtio_net not loaded?)",
                APPEAR_WITHIN.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_gets_a_user_network_without_ipv6_or_rom() {
        let args = qemu_args().join(" ");
        assert!(
            args.contains("-netdev user,id=uplink,net=10.0.2.0/24"),
            "{args}"
        );
        assert!(args.contains("ipv6=off"), "{args}");
        assert!(
            args.contains("virtio-net-pci,netdev=uplink,romfile="),
            "{args}"
        );
    }

    #[test]
    fn the_guard_drops_forwarding_into_qemus_network_before_any_accept() {
        let table = guard_table();
        assert!(
            table.contains("hook forward priority filter - 10"),
            "{table}"
        );
        assert!(table.contains("ip daddr 10.0.2.0/24 drop"), "{table}");
        assert!(!table.contains("accept;\n\t\tip daddr 10.0.2.0/24 accept"));
    }

    #[test]
    fn overlap_with_qemus_network() {
        let at = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(!overlaps_slirp(at("10.200.0.0"), 30));
        assert!(overlaps_slirp(at("10.0.2.4"), 30));
        assert!(overlaps_slirp(at("10.0.0.0"), 8));
        assert!(!overlaps_slirp(at("10.0.3.0"), 30));
        assert!(overlaps_slirp(at("0.0.0.0"), 0));
    }

    #[test]
    fn the_interface_is_the_one_that_is_not_loopback() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lo")).unwrap();
        std::fs::create_dir(dir.path().join("eth0")).unwrap();
        assert_eq!(wait_for_interface(dir.path()).unwrap(), "eth0");
    }
}
