//! The guest's PID 1 duties, done only when the agent is PID 1: filesystems, stdio,
//! hostname, power signals, and telling the VMM how far boot got.

pub mod guest_signal;
pub mod net;
pub mod power;
pub mod root;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// One filesystem PID 1 mounts.
struct MountPoint {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The filesystems a guest needs, in mount order (`/dev` before `/dev/pts`).
const MOUNTS: &[MountPoint] = &[
    MountPoint {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountPoint {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountPoint {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0755",
    },
    MountPoint {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0620,ptmxmode=0666",
    },
    MountPoint {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    MountPoint {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    MountPoint {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    // The workload's own place (a sandbox's working directory and `cp` target), owned by
    // the unprivileged workload uid, in memory like the rest of the root.
    MountPoint {
        source: "tmpfs",
        target: "/work",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755,uid=1000,gid=1000",
    },
    // Released secrets (`/run/secrets/NAME`, each 0400 and owned by the workload's uid),
    // on a tmpfs of their own: never on a disk, and only root (the agent) writes here.
    MountPoint {
        source: "tmpfs",
        target: "/run/secrets",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: "mode=0755,size=1m",
    },
];

/// Mounts what PID 1 needs before it knows its root: `/proc` (the command line) and
/// `/dev` (the console, the root disk). [`mount_filesystems`] then finds them mounted.
pub fn mount_early() -> Vec<String> {
    mount_points(MOUNTS.iter().filter(|m| is_early(m)))
}

/// Mounts the rest, after [`mount_early`] in the same root.
pub fn mount_rest() -> Vec<String> {
    mount_points(MOUNTS.iter().filter(|m| !is_early(m)))
}

fn is_early(m: &MountPoint) -> bool {
    m.target == "/proc" || m.target == "/dev"
}

/// Mounts the guest's filesystems. Returns what failed (an already mounted filesystem is
/// not a failure), for logging once the console is usable.
pub fn mount_filesystems() -> Vec<String> {
    mount_points(MOUNTS.iter())
}

fn mount_points<'a>(points: impl Iterator<Item = &'a MountPoint>) -> Vec<String> {
    let mut failures = Vec::new();
    for m in points {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            failures.push(format!("mkdir {}: {e}", m.target));
            continue;
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => failures.push(format!("mount {} on {}: {e}", m.fstype, m.target)),
        }
    }
    failures
}

/// Makes sure fds 0, 1 and 2 are open (on the console, else /dev/null), so that no socket
/// or pipe the agent opens later lands on a standard fd.
pub fn ensure_stdio() {
    ensure_stdio_on(&["/dev/console", "/dev/null"]);
}

/// Opens each of fds 0, 1 and 2 that is closed on the first of `devices` that opens.
pub fn ensure_stdio_on(devices: &[&str]) {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on an integer fd only queries it.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
        if open {
            continue;
        }
        let file = devices
            .iter()
            .find_map(|device| OpenOptions::new().read(true).write(true).open(device).ok());
        if let Some(file) = file {
            if file.as_raw_fd() != fd {
                // SAFETY: both are open descriptors; dup2 makes `fd` a copy, and `file`
                // is closed when it goes out of scope.
                unsafe { libc::dup2(file.as_raw_fd(), fd) };
            } else {
                // It already landed on the free standard fd: keep it open.
                let _ = file.into_raw_fd();
            }
        }
    }
}

/// The kernel command line (empty if /proc is not there).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// The value of `key=value` on a command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Sets the guest's hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io::Error::from)
}

/// The signals busybox `halt`, `poweroff` and `reboot` (and ctrl-alt-del) send to PID 1.
fn power_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        set.add(signal);
    }
    set
}

/// Blocks the power signals in the calling thread, and so in every thread started after.
/// Must run before any thread starts. Blocked signals reach PID 1 (unblocked ones without a
/// handler are dropped by the kernel); children get a clean mask from `Command`.
pub fn block_power_signals() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&power_signals()), None)
        .map_err(io::Error::from)
}

/// Starts a thread named `name` that waits for the (blocked) signals of `set` and hands
/// each to `on`.
pub(crate) fn spawn_signal_thread(
    name: &str,
    set: SigSet,
    on: impl Fn(Signal) + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => on(signal),
                Err(e) => {
                    tracing::warn!("sigwait: {e}");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        })?;
    Ok(())
}

/// Starts the thread that turns power signals into a clean power-off or reboot.
pub fn spawn_power_signal_thread() -> io::Result<()> {
    spawn_signal_thread("power-signals", power_signals(), |signal| match signal {
        Signal::SIGTERM | Signal::SIGINT => {
            tracing::info!("reboot signal");
            power::power_off(true);
        }
        signal => {
            tracing::info!("power-off signal {signal}");
            power::power_off(false);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let line = "console=ttyS0 mvm.agent.port=2000 quiet mvm.hostname=box\n";
        assert_eq!(cmdline_value(line, "mvm.agent.port"), Some("2000"));
        assert_eq!(cmdline_value(line, "mvm.hostname"), Some("box"));
        assert_eq!(cmdline_value(line, "quiet"), None);
        assert_eq!(cmdline_value(line, "port"), None);
    }
}
