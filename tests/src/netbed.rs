//! Network test beds for the `net/*` cases, made by the test itself: a tap for the
//! guest, "remote hosts" in a network namespace behind a veth pair (routed by the
//! machine the cases run on; every address is inside the namespaces or on the tap),
//! and a busybox guest whose `/init` is a script the case writes.
//!
//! Addresses: the guest is [`GUEST_IP`] behind the tap, whose host side is
//! [`GATEWAY`]; the namespace answers on [`REMOTE`] (the allowed host) and [`OTHER`]
//! (a host the policy does not allow), reached through [`VETH_HOST_IP`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use crate::case::Failure;

/// The guest's address on its interface (`/24`).
pub const GUEST_IP: &str = "10.0.2.15";
/// The host side of the tap: the guest's gateway.
pub const GATEWAY: &str = "10.0.2.2";
/// The remote host the policies allow.
pub const REMOTE: &str = "10.99.0.2";
/// A second remote host in the same namespace, never allowed.
pub const OTHER: &str = "10.99.0.3";
/// The test host's side of the veth pair.
pub const VETH_HOST_IP: &str = "10.99.0.1";
/// The guest's MAC.
pub const GUEST_MAC: &str = "02:00:00:00:00:0f";

/// Runs `program args`, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String, Failure> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Failure::new(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Failure::new(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `ip args`.
pub fn ip(args: &[&str]) -> Result<String, Failure> {
    run("ip", args)
}

/// Turns on IPv4 forwarding, so the tap and the veth are routed to each other.
pub fn enable_forwarding() -> Result<(), Failure> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| Failure::new(format!("cannot enable ip_forward: {e}")))
}

/// A network namespace holding [`REMOTE`] and [`OTHER`] on one end of a veth pair;
/// the other end is in this namespace as [`VETH_HOST_IP`]. Deleted on drop.
#[derive(Debug)]
pub struct Remote {
    ns: String,
    veth: String,
}

impl Remote {
    /// Creates namespace `ns` and the veth pair `veth` (host end) / `veth`r (inside).
    pub fn create(ns: &str, veth: &str) -> Result<Self, Failure> {
        // Leftovers of an earlier, interrupted run of the same case.
        let _ = ip(&["netns", "del", ns]);
        let _ = ip(&["link", "del", veth]);
        let remote = Self {
            ns: ns.to_owned(),
            veth: veth.to_owned(),
        };
        let inner = format!("{veth}r");
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", &inner, "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("{VETH_HOST_IP}/24"), "dev", veth])?;
        ip(&["link", "set", veth, "up"])?;
        for addr in [REMOTE, OTHER] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
        }
        ip(&["-n", ns, "link", "set", &inner, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", VETH_HOST_IP])?;
        enable_forwarding()?;
        Ok(remote)
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates stay there).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, Failure> {
        in_netns(&self.ns, f)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.veth]);
    }
}

/// Runs `f` on a new thread that first joins network namespace `ns`
/// (`/run/netns/<ns>`, as `ip netns add` made it).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, Failure> {
    let path = Path::new("/run/netns").join(ns);
    let fail = |e: io::Error| Failure::new(format!("in netns {ns}: {e}"));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(&path)?;
                // SAFETY: setns takes an fd we own (open for the call's duration) and a
                // flag; it changes only this thread's network namespace, and this thread
                // ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
    })
    .map_err(fail)
}

/// A tap interface made for one case, addressed as [`GATEWAY`]`/24` and up. Deleted
/// on drop.
#[derive(Debug)]
pub struct HostTap {
    name: String,
}

impl HostTap {
    /// Creates (persistent, so the VMM can open it by name) and addresses tap `name`.
    pub fn create(name: &str) -> Result<Self, Failure> {
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let tap = Self {
            name: name.to_owned(),
        };
        ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

/// Where the machine running the cases keeps a static busybox (the test host's own).
pub const BUSYBOX: &str = "/bin/busybox";

/// What every net guest runs first: busybox applets, /proc, /sys, /tmp, /dev, IPv6 off on
/// its interface (no autoconfiguration chatter for the filter to drop), the address
/// and the default route. `say` prints a `NET:` line on the console.
pub fn guest_prelude() -> String {
    format!(
        "#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp
mount -t devtmpfs dev /dev || mknod /dev/null c 1 3
say() {{ echo \"NET: $*\"; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ip route add default via {GATEWAY}
"
    )
}

/// Writes a guest initramfs to `out`: busybox and `script` as `/init` (ending with a
/// reboot, which ends the VMM), and `/dev/console`. The archive is written by `mvm`
/// (`mvm __cpio`, the runtime's own newc writer, as for every other initramfs the suite
/// boots), from a tree staged in `stage`.
pub fn write_guest_initramfs(
    mvm: &Path,
    stage: &Path,
    out: &Path,
    script: &str,
) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &str, e: io::Error| Failure::new(format!("guest initramfs: {what}: {e}"));
    let _ = std::fs::remove_dir_all(stage);
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(stage.join(dir)).map_err(|e| fail(dir, e))?;
    }
    std::fs::copy(BUSYBOX, stage.join("bin/busybox"))
        .map_err(|e| fail(&format!("copy {BUSYBOX}"), e))?;
    let init = stage.join("init");
    std::fs::write(&init, format!("{script}\nsay done\nsync\nreboot -f\n"))
        .map_err(|e| fail("write /init", e))?;
    for exec in [stage.join("bin/busybox"), init] {
        std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| fail("chmod", e))?;
    }
    let status = std::process::Command::new(mvm)
        .arg("__cpio")
        .arg("--dev-console")
        .arg(stage)
        .arg(out)
        .status()
        .map_err(|e| fail(&format!("run {}", mvm.display()), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "guest initramfs: {} __cpio exited with {status}",
            mvm.display()
        )))
    }
}

/// The `NET: <key> ...` line the guest printed, without the prefix and key.
pub fn said<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().find_map(|line| {
        line.trim_end_matches('\r')
            .strip_prefix("NET: ")
            .and_then(|rest| rest.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix(' '))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_finds_the_keyed_line() {
        let console = "noise\r\nNET: allowed [echo: hi]\r\nNET: done\n";
        assert_eq!(said(console, "allowed"), Some("[echo: hi]"));
        assert_eq!(said(console, "missing"), None);
        assert_eq!(said(console, "all"), None, "whole key only");
    }
}
