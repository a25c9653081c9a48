//! Spare test hosts (opt-in, `MVM_TESTHOST_SPARE=1`): a test host booted ahead of the
//! run that will use it, so that a run on the emulated tier does not wait for the test
//! host's own boot (about half of `mvm run -- true` there, docs/boot-time.md).
//!
//! A spare is never reused: each one serves exactly one run and is then powered off with
//! it, so each run still gets a test host nothing else ran in. What changes is only *when*
//! it booted: before the run asked, from the same test host kernel, initramfs (image and
//! binaries) and QEMU arguments as a cold boot for that run would use. The arguments are
//! the spare's key; a run whose QEMU arguments differ (another image, memory size or disk)
//! boots cold.
//!
//! Each spare is a keeper process (`mvm __testhost-spare DIR`, detached) that starts QEMU
//! as its child, accepts the four serial ports, and waits on `DIR/claim.sock`. A run claims
//! a spare by renaming its directory (one run wins), connecting to the claim socket and
//! receiving the four ports' descriptors. From then on the claim connection is QEMU's
//! lifeline: the run closing it (its end, or its death) makes the keeper kill QEMU; QEMU
//! exiting makes the keeper say so and close it. A spare not claimed within
//! [`IDLE_LIMIT`] powers off by itself. Spares live under the run directory's base in
//! `mvm-spares-<uid>` (mode 0700, checked to be the user's own).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qemu::{accept_from, qemu_args, spawn_qemu, Drive};
use crate::backend::{scratch, RunError, RunSpec};

/// The environment variable that turns spares on (`1`).
pub const ENV: &str = "MVM_TESTHOST_SPARE";
/// How long an unclaimed spare waits before it powers off.
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// The file a keeper writes once its spare can be claimed (its pid).
const READY: &str = "ready";
/// The file a keeper writes as it starts (its pid): a spare still booting.
const KEEPER: &str = "keeper";
/// How long a run waits for a spare still booting, rather than booting its own: a spare
/// that started earlier is ready sooner than a cold boot would be.
const BOOTING_WAIT: Duration = Duration::from_secs(60);
/// The file a keeper writes once QEMU runs (QEMU's pid), for the claimant's stall
/// watch.
const QEMU_PID: &str = "qemu.pid";
/// What a keeper is asked to start.
const SPEC_FILE: &str = "spare.json";
const CLAIM_SOCKET: &str = "claim.sock";
/// A claimed spare's directory: this prefix, the run's pid, a count.
const CLAIMED: &str = "c.";
/// The longest path a Unix socket address holds.
const MAX_SOCKET_PATH: usize = 107;
/// The four ports, in the order they are passed.
const PORTS: [&str; 4] = ["ctl", "in", "out", "err"];

/// Whether spares are on for this process.
pub fn enabled() -> bool {
    std::env::var(ENV).is_ok_and(|v| v == "1")
}

/// The QEMU a keeper starts.
#[derive(Debug, Serialize, Deserialize)]
struct SpareSpec {
    qemu: PathBuf,
    args: Vec<String>,
}

/// The key of a test host: QEMU and its arguments, with the per-spare directory left out.
pub fn key(
    qemu: &Path,
    testhost: &Path,
    initramfs: &Path,
    spec: &RunSpec,
    extra: &[Drive],
) -> String {
    let placeholder = Path::new("/spare");
    let args = qemu_args(
        testhost,
        initramfs,
        &placeholder.join("console.log"),
        placeholder,
        spec,
        extra,
    );
    let mut hash = Sha256::new();
    hash.update(qemu.as_os_str().as_encoded_bytes());
    for arg in &args {
        hash.update([0]);
        hash.update(arg.as_bytes());
    }
    let hex = hex::encode(hash.finalize());
    hex.get(..12).unwrap_or(&hex).to_owned()
}

/// The user's spares directory, made 0700 if missing; refused unless it is a directory of
/// this user's that no one else can write (the base may be a shared `/tmp`).
fn spares_dir() -> Result<PathBuf, RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = scratch::base_dir().join(format!("mvm-spares-{}", nix::unistd::getuid()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(RunError::io(format!("creating {}", dir.display()))(e)),
    }
    scratch::check_private_dir(&dir).map_err(RunError::io("spares are off"))?;
    Ok(dir)
}

/// Starts a spare for `key` in the background: a keeper process that boots the test host
/// with the given QEMU arguments and waits to be claimed. Returns once the keeper runs.
pub fn start(
    mvm: &Path,
    qemu: &Path,
    testhost: &Path,
    initramfs: &Path,
    spec: &RunSpec,
    extra: &[Drive],
    key: &str,
) -> Result<(), RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let spares = spares_dir()?;
    let (ready, booting) = spares_of(&spares, key);
    if !ready.is_empty() || !booting.is_empty() {
        return Ok(()); // one spare per test host is enough
    }
    // Short: the ports' sockets in it must fit a socket address (107 bytes).
    let dir = spares.join(format!("{key}.{}", std::process::id()));
    if dir.join(CLAIM_SOCKET).as_os_str().len() > MAX_SOCKET_PATH {
        return Err(RunError::Missing(format!(
            "{}: too long a path for the spare's sockets (set MVM_RUN_DIR to a shorter directory)",
            dir.display()
        )));
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(RunError::io(format!("creating {}", dir.display())))?;
    let args = qemu_args(
        testhost,
        initramfs,
        &dir.join("console.log"),
        &dir,
        spec,
        extra,
    );
    let spare = SpareSpec {
        qemu: qemu.to_owned(),
        args,
    };
    let json = serde_json::to_vec(&spare).map_err(|e| RunError::Agent(e.to_string()))?;
    std::fs::write(dir.join(SPEC_FILE), json)
        .map_err(RunError::io(format!("writing {}", dir.display())))?;
    // The keeper detaches itself (it forks and its first process exits), so this wait is
    // short and nothing is left for this process to reap later.
    let status = std::process::Command::new(mvm)
        .arg("__testhost-spare")
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(RunError::io(format!("starting {}", mvm.display())))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(RunError::Missing(format!(
            "the spare test host's keeper did not start ({status})"
        )));
    }
    Ok(())
}

/// The keeper: detaches (a new session, its first process exits 0), boots the test host
/// described in `dir`, and serves one claim. Returns when the spare is done with.
pub fn keep(dir: &Path) -> Result<(), RunError> {
    // SAFETY: called first thing in `mvm __testhost-spare`, while the process has one
    // thread; the child goes on with ordinary code, the parent exits at once.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => return Err(RunError::io("forking the keeper")(e.into())),
    }
    let _ = nix::unistd::setsid();
    let served = serve_one_claim(dir);
    if served.is_err() || dir.exists() {
        // Never claimed (or failed before): nobody else will remove it.
        let _ = std::fs::remove_dir_all(dir);
    }
    served
}

fn serve_one_claim(dir: &Path) -> Result<(), RunError> {
    std::fs::write(dir.join(KEEPER), std::process::id().to_string())
        .map_err(RunError::io("writing the keeper's pid"))?;
    let text = std::fs::read(dir.join(SPEC_FILE))
        .map_err(RunError::io(format!("reading {}", dir.display())))?;
    let spare: SpareSpec =
        serde_json::from_slice(&text).map_err(|e| RunError::Agent(e.to_string()))?;
    let mut listeners = Vec::new();
    for id in PORTS {
        let path = dir.join(id);
        listeners.push(
            UnixListener::bind(&path)
                .map_err(RunError::io(format!("listening on {}", path.display())))?,
        );
    }
    let logs = [dir.join("console.log"), dir.join("qemu.log")];
    let log_refs = [logs[0].as_path(), logs[1].as_path()];
    let mut qemu = spawn_qemu(&spare.qemu, &spare.args, &logs[1])?;
    std::fs::write(dir.join(QEMU_PID), qemu.child.id().to_string())
        .map_err(RunError::io("writing QEMU's pid"))?;
    let mut ports = Vec::new();
    for listener in &listeners {
        ports.push(accept_from(
            listener,
            &mut qemu,
            &log_refs,
            Duration::from_secs(30),
        )?);
    }
    drop(listeners);
    let claims = UnixListener::bind(dir.join(CLAIM_SOCKET))
        .map_err(RunError::io("listening for a claim"))?;
    claims
        .set_nonblocking(true)
        .map_err(RunError::io("listening for a claim"))?;
    std::fs::write(dir.join(READY), std::process::id().to_string())
        .map_err(RunError::io("marking the spare ready"))?;
    let idle_until = Instant::now() + IDLE_LIMIT;
    let mut conn = loop {
        match claims.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(RunError::io("accepting a claim")(e)),
        }
        if Instant::now() > idle_until || qemu.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    conn.set_nonblocking(false)
        .map_err(RunError::io("claim connection"))?;
    let fds: Vec<i32> = ports.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"ports\n")];
    nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| RunError::io("passing the ports")(e.into()))?;
    // The claimant holds the ports now; this process keeps none, so their ends are its.
    drop(ports);
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(RunError::io("claim connection"))?;
    let mut byte = [0u8; 64];
    loop {
        if let Ok(Some(status)) = qemu.child.try_wait() {
            let _ = writeln!(conn, "exited {status}");
            return Ok(());
        }
        match conn.read(&mut byte) {
            // The run is over (or died): the test host goes with it (`Qemu`'s drop).
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// A claimed spare: its four ports, and the lifeline to its keeper. Dropping it powers the
/// test host off (the keeper kills QEMU) and removes its directory.
pub struct Claimed {
    dir: PathBuf,
    lifeline: BufReader<UnixStream>,
    /// The ports, in the order `ctl`, `in`, `out`, `err`.
    pub ports: Vec<UnixStream>,
    ended: Option<String>,
}

impl Claimed {
    /// The console and QEMU logs, for error messages.
    pub fn logs(&self) -> [PathBuf; 2] {
        [self.dir.join("console.log"), self.dir.join("qemu.log")]
    }

    /// QEMU's process id, as its keeper wrote it.
    pub fn qemu_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(QEMU_PID))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Whether QEMU has exited (as its keeper last said), and how.
    pub fn ended(&mut self) -> Option<String> {
        if self.ended.is_none() {
            let _ = self.lifeline.get_ref().set_nonblocking(true);
            let mut line = String::new();
            match self.lifeline.read_line(&mut line) {
                Ok(0) => self.ended = Some("its keeper is gone".to_owned()),
                Ok(_) => self.ended = Some(line.trim().to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => self.ended = Some(format!("its keeper's line failed: {e}")),
            }
        }
        self.ended.clone()
    }

    /// Waits up to `limit` for QEMU to exit on its own (the test host powers off after
    /// reporting).
    pub fn wait_ended(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.ended().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let _ = self.lifeline.get_ref().shutdown(std::net::Shutdown::Both);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Claims a ready spare for `key`, if there is one, waiting for one still booting (its
/// keeper alive); `None` means boot cold. A spare that cannot be claimed (its keeper
/// gone, a race lost) is skipped (and removed if this run took its directory).
pub fn claim(key: &str) -> Option<Claimed> {
    let dir = spares_dir()
        .map_err(|e| tracing::warn!("spare test hosts: {e}"))
        .ok()?;
    sweep_claimed(&dir);
    let until = Instant::now() + BOOTING_WAIT;
    loop {
        let (ready, booting) = spares_of(&dir, key);
        for candidate in ready {
            if let Some(claimed) = try_claim(&dir, &candidate) {
                return Some(claimed);
            }
        }
        if booting.is_empty() || Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what runs killed before they could (`c.<pid>.*` of a pid that is gone)
/// left; their keepers have killed their QEMUs already (the lifeline closed).
fn sweep_claimed(dir: &Path) {
    crate::backend::abandoned::sweep(dir, |name| {
        name.strip_prefix(CLAIMED)
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse().ok())
    });
}

/// The spares of `key` under `dir`: those ready to claim, and those whose keeper is still
/// booting them.
fn spares_of(dir: &Path, key: &str) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let prefix = format!("{key}.");
    let mut spares: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    spares.sort();
    let alive = |path: &Path| {
        std::fs::read_to_string(path.join(KEEPER))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    let (ready, rest): (Vec<PathBuf>, Vec<PathBuf>) =
        spares.into_iter().partition(|p| p.join(READY).is_file());
    let mut booting = Vec::new();
    for spare in rest {
        if alive(&spare) {
            booting.push(spare);
        } else if spare.join(KEEPER).is_file() {
            // Its keeper died before the spare was ready (killed): nobody else removes it.
            let _ = std::fs::remove_dir_all(&spare);
        }
    }
    (ready, booting)
}

fn try_claim(dir: &Path, candidate: &Path) -> Option<Claimed> {
    static CLAIMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let claimed = dir.join(format!("{CLAIMED}{}.{n}", std::process::id()));
    // One run wins the rename; the others go on to the next spare.
    std::fs::rename(candidate, &claimed).ok()?;
    match receive_ports(&claimed) {
        Ok((lifeline, ports)) => Some(Claimed {
            dir: claimed,
            lifeline: BufReader::new(lifeline),
            ports,
            ended: None,
        }),
        Err(e) => {
            tracing::info!("spare {} not usable: {e}", candidate.display());
            let _ = std::fs::remove_dir_all(&claimed);
            None
        }
    }
}

fn receive_ports(dir: &Path) -> std::io::Result<(UnixStream, Vec<UnixStream>)> {
    let conn = UnixStream::connect(dir.join(CLAIM_SOCKET))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([i32; 4]);
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    // SAFETY: each descriptor was just received in SCM_RIGHTS and belongs to nobody else
    // in this process; it is wrapped once, here.
    let ports: Vec<UnixStream> = fds
        .into_iter()
        .map(|fd| UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect();
    if ports.len() != PORTS.len() {
        return Err(std::io::Error::other(format!(
            "the keeper passed {} ports, not {}",
            ports.len(),
            PORTS.len()
        )));
    }
    conn.set_read_timeout(None)?;
    Ok((conn, ports))
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    /// A spare serves only a run that would have booted the very same test host.
    #[test]
    fn the_key_is_the_test_host_qemu_would_boot() {
        let (qemu, th, initramfs) = (
            Path::new("/usr/bin/qemu"),
            Path::new("/th"),
            Path::new("/c/a.cpio"),
        );
        let warm = Drive {
            path: "/w/disk".into(),
            read_only: true,
            serial: "mvmwarm".into(),
        };
        let base = key(qemu, th, initramfs, &spec(), &[]);
        assert_eq!(base, key(qemu, th, initramfs, &spec(), &[]));
        assert_eq!(base.len(), 12);
        let mut more_memory = spec();
        more_memory.mem_mib = 512;
        let mut disk = spec();
        disk.disks = vec!["path=/d/scratch.img,rw".into()];
        for other in [
            key(qemu, th, Path::new("/c/b.cpio"), &spec(), &[]),
            key(Path::new("/opt/qemu"), th, initramfs, &spec(), &[]),
            key(qemu, th, initramfs, &more_memory, &[]),
            key(qemu, th, initramfs, &disk, &[]),
            key(qemu, th, initramfs, &spec(), &[warm]),
        ] {
            assert_ne!(base, other);
        }
        // The workload itself is not part of the test host.
        let mut other_command = spec();
        other_command.argv = vec!["true".into()];
        assert_eq!(base, key(qemu, th, initramfs, &other_command, &[]));
    }

    #[test]
    fn runs_killed_while_holding_a_spare_leave_nothing_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(format!("{CLAIMED}4000000000.0"));
        let mine = dir
            .path()
            .join(format!("{CLAIMED}{}.0", std::process::id()));
        let other = dir.path().join("abcdef012345.77");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir(d).unwrap();
        }
        sweep_claimed(dir.path());
        assert!(!dead.exists() && mine.exists() && other.exists());
    }
}
