//! `mvm __container-init DIR`: the process that makes the container's namespaces and
//! starts the agent as their PID 1.
//!
//! 1. It leaves this host's user namespace (`unshare(CLONE_NEWUSER)`), says so on
//!    stdout ([`UNSHARED`]), and waits on stdin ([`MAPPED`]) while the run's `mvm`
//!    writes its uid and gid maps ([`crate::backend::idmap`]: as root, a range of this host's
//!    that no account uses; as an ordinary user, the user as the container's root and
//!    its subordinate ids).
//! 2. It makes the other namespaces (mount, PID, network, IPC, UTS, cgroup) and forks:
//!    the child is PID 1 of the new PID namespace; this process waits for it and
//!    exits with its status (the run's `mvm` kills this process to stop the container;
//!    PID 1 follows through its parent-death signal, and the kernel ends every other
//!    process of the namespace with it).
//! 3. PID 1 mounts a tmpfs on the run's empty tree directory and enters it while it is
//!    still the run's `mvm` as far as paths go (the run directory is its alone), then
//!    takes the container's root ids (a file made on a filesystem mounted in the
//!    namespace needs an owner mapped in it), unpacks the measured initramfs (inherited
//!    as a sealed memfd, read before the namespaces were made) into the tmpfs, and
//!    mounts the rest of the container's tree: a new `/proc`, a small tmpfs `/dev` with `null zero full random urandom
//!    tty` bound in from this host and a new `devpts`, tmpfs `/dev/shm`, `/tmp`,
//!    `/run` and `/work` (the workload's), and the run's socket directory at `/run/mvm`; brings loopback up; gives
//!    the container its hostname; `pivot_root`s into the tree and detaches the old
//!    root (on a host running from its initial ramfs, which cannot be pivoted away
//!    from: moves the tree over `/` and chroots, as switch_root does); and execs the agent (`/init --container ...`), which installs the
//!    seccomp filter every process of the container then inherits.

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Uid};
use serde::{Deserialize, Serialize};

/// The init's instructions, in `DIR/container.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The empty directory, on this host, the container's tree is mounted on (a tmpfs
    /// in the container's mount namespace only).
    pub root: PathBuf,
    /// The descriptor, inherited, of the image's measured initramfs (a sealed memfd):
    /// the tree is unpacked from it inside.
    pub initramfs_fd: i32,
    /// The size of the tree's tmpfs, MiB: the unpacked image and what the workload
    /// writes beside it.
    pub tree_mib: u64,
    /// The size of each of `/tmp`, `/work` and `/dev/shm`, MiB (the run's `--mem`: a
    /// VM's tmpfs cannot outgrow its RAM, and here nothing else bounds them).
    pub scratch_mib: u64,
    /// The directory, on this host, that is `/run/mvm` inside (the agent's socket).
    pub socket_dir: PathBuf,
    /// The container's hostname.
    pub hostname: String,
    /// The uid and gid that own `/work` (the workload's default identity).
    pub workload_ids: (u32, u32),
    /// The agent's command line, as seen inside.
    pub argv: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
}

/// The file of [`InitConfig`] in the init's directory.
pub const CONFIG_FILE: &str = "container.json";
/// What the init writes on stdout once it is in its own user namespace.
pub const UNSHARED: &str = "unshared";
/// What it waits for on stdin before it goes on (its maps are written).
pub const MAPPED: &str = "mapped";
/// Where the socket directory is inside.
pub const SOCKET_DIR_INSIDE: &str = "/run/mvm";
/// The most `/run` holds, MiB (secrets' files and the agent's state).
const RUN_MIB: u64 = 16;
/// The device nodes bound in from this host.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The init's entry point: its exit status (the container's PID 1's, or 125 when the
/// container could not be made, the reason on stderr).
pub fn main(dir: &Path) -> i32 {
    match make(dir) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mvm: container init: {e}");
            125
        }
    }
}

fn make(dir: &Path) -> Result<i32, String> {
    let text = std::fs::read(dir.join(CONFIG_FILE))
        .map_err(|e| format!("reading {}: {e}", dir.join(CONFIG_FILE).display()))?;
    let config: InitConfig =
        serde_json::from_slice(&text).map_err(|e| format!("{CONFIG_FILE}: {e}"))?;
    // Read while this is still the host's user namespace, then closed: the agent and
    // the workload never hold it.
    let initramfs = std::fs::read(format!("/proc/self/fd/{}", config.initramfs_fd))
        .map_err(|e| format!("reading the initramfs (fd {}): {e}", config.initramfs_fd))?;
    nix::unistd::close(config.initramfs_fd).map_err(|e| format!("closing the initramfs: {e}"))?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("a new user namespace: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{UNSHARED}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("telling mvm: {e}"))?;
    drop(stdout);
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("waiting for mvm: {e}"))?;
    if line.trim_end() != MAPPED {
        return Err(format!("mvm did not map the user namespace ({line:?})"));
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| format!("the container's namespaces: {e}"))?;
    // SAFETY: `mvm __container-init` has one thread (nothing before this spawns any),
    // so the child may run ordinary code; it ends in exec or _exit.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let e = pid1(&config, &initramfs);
            eprintln!("mvm: container init (pid 1): {e}");
            // SAFETY: _exit ends the child at once, without running the parent's
            // atexit handlers or flushing its buffers twice.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("waiting for the container's init: {e}")),
            }
        },
    }
}

/// PID 1: the mounts, then the agent. Returns only on failure.
fn pid1(config: &InitConfig, initramfs: &[u8]) -> String {
    match setup(config, initramfs).and_then(|()| exec_agent(config)) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Whether this mount namespace's `/` is the initial ramfs (`rootfs` in mountinfo).
fn root_is_initial_ramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let Some((fields, fs)) = line.split_once(" - ") else {
                return false;
            };
            fields.split_whitespace().nth(4) == Some("/")
                && fs.split_whitespace().next() == Some("rootfs")
        })
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

fn mount_at(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "mounting {} on {}: {e}",
            source.map_or_else(
                || fstype.unwrap_or("-").to_owned(),
                |s| s.display().to_string()
            ),
            target.display()
        )
    })
}

fn setup(config: &InitConfig, initramfs: &[u8]) -> Result<(), String> {
    let none: Option<&Path> = None;
    mount_at(
        none,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // The tree lives in memory of this mount namespace, as a VM's initramfs does: owned
    // by the container's root (ids as this user namespace reads them), bounded, and gone
    // with the container; nothing of it is on this host's disks.
    let tree = format!("mode=755,uid=0,gid=0,size={}m", config.tree_mib);
    mount_at(
        Some(Path::new("tmpfs")),
        &config.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&tree),
    )?;
    // Held open while this process can still reach it: after the ids change, the path
    // to it (under the run directory, its `mvm`'s alone) may be closed to it.
    let socket_dir = std::fs::File::open(&config.socket_dir)
        .map_err(|e| format!("opening {}: {e}", config.socket_dir.display()))?;
    nix::unistd::chdir(&config.root)
        .map_err(|e| format!("chdir {}: {e}", config.root.display()))?;
    // The container's root from here on (root only inside; on this host UID_BASE, or
    // the user who ran `mvm`): a file made on a filesystem mounted in the namespace
    // needs an owner mapped in it.
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let zero_gid = Gid::from_raw(0);
    let zero_uid = Uid::from_raw(0);
    nix::unistd::setresgid(zero_gid, zero_gid, zero_gid).map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setresuid(zero_uid, zero_uid, zero_uid).map_err(|e| format!("setresuid: {e}"))?;
    // The id change made the process undumpable, which closes its own /proc/self/fd to
    // it; the socket directory is bound through that below. (The exec of the agent sets
    // it again from the agent's file.)
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_DUMPABLE: {}",
            std::io::Error::last_os_error()
        ));
    }
    let root = Path::new(".");
    // Unpacked as the container's root, so every file is its.
    let entries = super::rootfs::unpack(initramfs, root).map_err(|e| e.to_string())?;
    if entries == 0 {
        return Err("the image's initramfs holds nothing".into());
    }
    let proc = root.join("proc");
    mkdir(&proc)?;
    mount_at(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    let dev = root.join("dev");
    mkdir(&dev)?;
    mount_at(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=256k"),
    )?;
    for name in DEVICES {
        let node = dev.join(name);
        std::fs::File::create(&node).map_err(|e| format!("creating {}: {e}", node.display()))?;
        mount_at(
            Some(&Path::new("/dev").join(name)),
            &node,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        std::os::unix::fs::symlink(target, &path)
            .map_err(|e| format!("linking {}: {e}", path.display()))?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    if let Err(e) = mount_at(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    ) {
        // Terminals (sandbox exec with a pty) fail without it; a command does not.
        eprintln!("mvm: container init: no terminals: {e}");
    }
    let (uid, gid) = config.workload_ids;
    let mib = config.scratch_mib;
    let work = format!("mode=755,uid={uid},gid={gid},size={mib}m");
    let shared = format!("mode=1777,size={mib}m");
    let run = format!("mode=755,size={}m", mib.min(RUN_MIB));
    for (dir, flags, data) in [
        (
            "dev/shm",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            shared.as_str(),
        ),
        (
            "tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            shared.as_str(),
        ),
        ("run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, run.as_str()),
        // The workload's working directory, as the agent makes it in a VM.
        (
            "work",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            work.as_str(),
        ),
    ] {
        let path = root.join(dir);
        mkdir(&path)?;
        mount_at(
            Some(Path::new("tmpfs")),
            &path,
            Some("tmpfs"),
            flags,
            Some(data),
        )?;
    }
    let sockets = root.join(SOCKET_DIR_INSIDE.trim_start_matches('/'));
    mkdir(&sockets)?;
    let by_fd = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&socket_dir)
    ));
    mount_at(Some(&by_fd), &sockets, None, MsFlags::MS_BIND, None)?;
    drop(socket_dir);
    nix::unistd::sethostname(&config.hostname).map_err(|e| format!("sethostname: {e}"))?;
    if let Err(e) = loopback_up() {
        eprintln!("mvm: container init: loopback stays down: {e}");
    }
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| format!("detaching the old root: {e}"))?;
        }
        // The initial ramfs cannot be pivoted away from (the kernel refuses it for the
        // root it booted with), on a host that runs from it. Then the tree is moved over
        // `/` and entered by chroot, as switch_root does: this host's root stays beneath
        // it in the container's mount namespace, covered, and uncovering it takes a
        // umount, which the container's seccomp filter denies to every process in it.
        Err(nix::errno::Errno::EINVAL) if root_is_initial_ramfs() => {
            mount_at(Some(root), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
            nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
        }
        Err(e) => return Err(format!("pivot_root: {e}")),
    }
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // Stdin was mvm's pipe and stdout its channel to this process: neither is the
    // agent's.
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0)
        .and_then(|_| nix::unistd::dup2(2, 1))
        .map_err(|e| format!("stdio: {e}"))?;
    Ok(())
}

/// Sets `IFF_UP` on `lo`, the only interface of the new network namespace.
fn loopback_up() -> Result<(), String> {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `request`, which
    // lives across the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut request) } != 0 {
        return Err(format!("SIOCGIFFLAGS: {}", std::io::Error::last_os_error()));
    }
    let up = libc::c_short::try_from(libc::IFF_UP).map_err(|e| format!("IFF_UP: {e}"))?;
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    unsafe {
        request.ifr_ifru.ifru_flags |= up;
    }
    // SAFETY: SIOCSIFFLAGS sets the flags in `request`, which lives across the call.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &request) } != 0 {
        return Err(format!("SIOCSIFFLAGS: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn exec_agent(config: &InitConfig) -> Result<std::convert::Infallible, String> {
    let cstring = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL"));
    let argv: Vec<CString> = config
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let env: Vec<CString> = config
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let program = argv.first().ok_or("no agent command")?;
    // Here, after the ids changed (which clears it) and before exec (which keeps it):
    // the init's death takes PID 1, and with it the whole PID namespace.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(format!(
            "PR_SET_PDEATHSIG: {}",
            std::io::Error::last_os_error()
        ));
    }
    nix::unistd::execve(program, &argv, &env)
        .map_err(|e| format!("exec {}: {e}", program.to_string_lossy()))
}
