//! The `container` backend: no VM. The image's initramfs tree (the static `mvm-agent`
//! is its `/init`) runs in new Linux namespaces (user, mount, PID, network, IPC, UTS,
//! cgroup) with the agent as PID 1 under a seccomp filter, and this process talks to
//! the agent over a Unix socket with the same client as to a VM's. It shares this
//! host's kernel: the weakest tier, named so wherever it appears ([`LABEL`]), never
//! chosen unless asked for, and refused by the default policy (`[tier] minimum`).
//!
//! The run, in order: [`verify`] checks the signed plan (signature, window, nonce, that
//! it allows this tier) and measures the image's kernel, initramfs and command line
//! against it, writing `boot_verified` as `mvm-vmm` would; the measured initramfs goes
//! to the init as a sealed memfd; [`init`] (`mvm __container-init`) leaves this host's
//! user namespace, has its ids mapped ([`super::idmap`]: root or an ordinary user), makes the
//! other namespaces, unpacks the tree ([`rootfs`]) into a tmpfs of its own mount
//! namespace, mounts, `pivot_root`s and execs the agent; then the workload goes through
//! the agent as on the kvm tier. Docs: `docs/backends.md`.

pub mod init;
mod limits;
mod rootfs;
mod verify;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_agent::Client;

use super::agent_exec::{self, shutdown_guest, Holder};
use super::held::HeldProcess;
use super::idmap::IdMap;
use super::scratch::ScratchDir;
use super::{
    interrupt, locate, PlanFiles, RunError, RunJournal, RunOutcome, RunSpec, Tier, Timings,
    Workload,
};
use crate::image::StoredImage;

pub use super::wall::CONTAINER_LABEL as LABEL;
/// The agent's socket, in the socket directory.
const AGENT_SOCKET: &str = "agent.sock";
/// The container's hostname.
const HOSTNAME: &str = "mvm";
/// Time the container gets to end after the agent acknowledged shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The container's init process (`mvm __container-init`), killed and reaped on drop,
/// and then its cgroup removed.
struct Container {
    init: HeldProcess,
    /// Its cgroup, when it has one ([`limits`]); removed once the container ended.
    cgroup: Option<mvm_cgroup::Cgroup>,
}

impl Drop for Container {
    fn drop(&mut self) {
        Holder::kill(&mut self.init);
        if let Some(cgroup) = self.cgroup.take() {
            limits::release(&cgroup);
        }
    }
}

/// Runs `spec` (or the session of `workload`) in a container of `image`, verified
/// against `plan` when given (`None`: `--dev`, nothing checked).
pub fn run(
    spec: &RunSpec,
    image: &StoredImage,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    workload: Workload<'_>,
) -> Result<RunOutcome, RunError> {
    let start = Instant::now();
    let ids = IdMap::for_this_process()
        .map_err(|why| RunError::NoBackend(format!("container: {why}")))?;
    if !spec.disks.is_empty() {
        return Err(RunError::Missing(
            "the container tier runs an image's initramfs tree only: disks (an image's root filesystem, --disk) need a VM tier".into(),
        ));
    }
    let initramfs = verify::verify(plan, image)?;
    let scratch = ScratchDir::create().map_err(RunError::io("creating the run directory"))?;
    let root = scratch.path().join("root");
    let sockets = scratch.path().join("sockets");
    for dir in [&root, &sockets] {
        std::fs::create_dir(dir).map_err(RunError::io(format!("creating {}", dir.display())))?;
    }
    // The container's root alone may enter it: a workload (uid 1000) must not reach
    // the agent's socket.
    let (root_uid, root_gid) = ids.container_root();
    std::os::unix::fs::chown(&sockets, Some(root_uid), Some(root_gid))
        .and_then(|()| {
            std::fs::set_permissions(
                &sockets,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
        })
        .map_err(RunError::io(format!("owning {}", sockets.display())))?;
    let sealed = sealed_copy(&initramfs)?;
    let initramfs_bytes = u64::try_from(initramfs.len()).unwrap_or(u64::MAX);
    drop(initramfs);
    let mut container = start_init(
        image,
        &ids,
        Tree {
            dir: scratch.path(),
            root: &root,
            sockets: &sockets,
            initramfs: sealed,
            initramfs_bytes,
            mem_mib: spec.mem_mib,
            cpus: spec.cpus,
        },
    )?;
    let socket = sockets.join(AGENT_SOCKET);
    let ready_timeout = Duration::from_secs(spec.ready_timeout_secs);
    let client = wait_for_agent(&mut container, &socket, ready_timeout)?;
    let ready = Instant::now();

    let (status, client) =
        agent_exec::run_workload(client, spec, workload, journal, &mut container.init, || {
            UnixStream::connect(&socket)
        })?;
    let exited = Instant::now();
    shutdown_guest(client, SHUTDOWN_GRACE);
    container.init.wait_or_kill(SHUTDOWN_GRACE);
    let stopped = Instant::now();
    drop(container);
    drop(scratch);
    Ok(RunOutcome {
        status,
        timings: Timings {
            boot_ms: millis(ready.duration_since(start)),
            exec_ms: millis(exited.duration_since(ready)),
            shutdown_ms: millis(stopped.duration_since(exited)),
            total_ms: millis(start.elapsed()),
            guest_boot_ms: None,
            host_boot_ms: None,
            testhost_spare: false,
            warm_unpack_ms: None,
            warm_start: false,
        },
        tier: Tier::Container,
        boot_report: None,
        plan_id: None,
        vmm_memory: None,
    })
}

/// A copy of the measured initramfs the init unpacks: a memfd sealed against every
/// change, so what is unpacked is what was measured.
fn sealed_copy(bytes: &[u8]) -> Result<OwnedFd, RunError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let sys = |what: &'static str| move |e: nix::errno::Errno| RunError::io(what)(e.into());
    let fd = memfd_create(
        c"mvm-container-initramfs",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(sys("creating the initramfs memfd"))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)
        .map_err(RunError::io("writing the initramfs memfd"))?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
        .map_err(sys("sealing the initramfs memfd"))?;
    Ok(OwnedFd::from(file))
}

/// The descriptor number the init finds the initramfs at.
const INITRAMFS_FD: i32 = 3;

/// Where the container's tree comes from and goes.
struct Tree<'a> {
    /// The run directory (the init's config and log).
    dir: &'a Path,
    /// The empty directory the tree's tmpfs is mounted on.
    root: &'a Path,
    /// The socket directory.
    sockets: &'a Path,
    /// The measured initramfs, sealed, and its size.
    initramfs: OwnedFd,
    initramfs_bytes: u64,
    /// The run's memory, MiB, and CPUs: the sizes of the tree's and the scratch
    /// tmpfs, and the cgroup's limits.
    mem_mib: u32,
    cpus: u8,
}

/// Starts `mvm __container-init` over `tree` and maps its user namespace with `ids`.
fn start_init(image: &StoredImage, ids: &IdMap, tree: Tree<'_>) -> Result<Container, RunError> {
    let Tree {
        dir,
        root,
        sockets,
        initramfs,
        initramfs_bytes,
        mem_mib,
        cpus,
    } = tree;
    let policy = mvm_agent::agent::policy::Policy::from_cmdline(&image.manifest.cmdline);
    let mut argv = vec![
        "/init".to_owned(),
        "--container".to_owned(),
        "--listen-unix".to_owned(),
        format!("{}/{AGENT_SOCKET}", init::SOCKET_DIR_INSIDE),
        "--uid".to_owned(),
        policy.default_uid.to_string(),
        "--gid".to_owned(),
        policy.default_gid.to_string(),
        "--nofile".to_owned(),
        policy.limits.nofile.to_string(),
        "--nproc".to_owned(),
        policy.limits.nproc.to_string(),
    ];
    if policy.allow_root {
        argv.push("--allow-root".to_owned());
    }
    let config = init::InitConfig {
        root: root.to_owned(),
        initramfs_fd: INITRAMFS_FD,
        // The image's tree and what the workload writes beside it.
        tree_mib: initramfs_bytes
            .div_ceil(1 << 20)
            .saturating_add(u64::from(mem_mib)),
        scratch_mib: u64::from(mem_mib),
        socket_dir: sockets.to_owned(),
        hostname: HOSTNAME.to_owned(),
        workload_ids: (policy.default_uid, policy.default_gid),
        argv,
        env: vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOME".to_owned(), "/".to_owned()),
        ],
    };
    let json = serde_json::to_vec(&config).map_err(|e| RunError::Agent(e.to_string()))?;
    let config_path = dir.join(init::CONFIG_FILE);
    std::fs::write(&config_path, json)
        .map_err(RunError::io(format!("writing {}", config_path.display())))?;
    let log = dir.join("init.log");
    let log_file =
        std::fs::File::create(&log).map_err(RunError::io(format!("creating {}", log.display())))?;
    let mvm = locate::mvm_binary()?;
    let mut command = Command::new(&mvm);
    command
        .arg("__container-init")
        .arg(dir)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file);
    super::vmm_process::own_group_dies_with_us(&mut command);
    let raw = initramfs.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // dup2(2) and fcntl(2), which are async-signal-safe, on a descriptor the parent
    // keeps open until the spawn returns.
    unsafe {
        command.pre_exec(move || {
            let rc = if raw == INITRAMFS_FD {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, INITRAMFS_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let cgroup = limits::make(
        ids,
        &limits::for_container(mem_mib, initramfs_bytes, policy.limits.nproc, cpus),
    );
    let spawned = command.spawn();
    drop(initramfs);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Some(cgroup) = &cgroup {
                mvm_cgroup::remove(&cgroup.dir);
            }
            return Err(RunError::VmmDied {
                reason: format!("cannot start {} __container-init: {e}", mvm.display()),
                log: String::new(),
                exit: None,
            });
        }
    };
    // In its cgroup before it is let go on (it waits for its maps), so every process of
    // the container is.
    let cgroup = cgroup.and_then(|c| limits::enter(c, child.id()));
    let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
    let mut container = Container {
        init: HeldProcess::new(child, log, "the container's init"),
        cgroup,
    };
    let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
        return Err(RunError::Agent(
            "the container init's pipes are missing".into(),
        ));
    };
    if let Err(why) = map_users(ids, container.init.id(), stdin, stdout) {
        Holder::kill(&mut container.init);
        let status = container.init.try_exit();
        return Err(RunError::VmmDied {
            reason: format!("making the container's user namespace: {why}"),
            log: container.init.log_tail(),
            exit: status.map(Into::into),
        });
    }
    Ok(container)
}

/// Waits for the init to leave this host's user namespace, has its maps written
/// ([`super::idmap`]), and lets it go on.
fn map_users(
    ids: &IdMap,
    pid: u32,
    mut stdin: ChildStdin,
    stdout: ChildStdout,
) -> Result<(), String> {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the init: {e}"))?;
    if line.trim_end() != init::UNSHARED {
        return Err(format!("the init said {line:?}"));
    }
    ids.apply(pid)?;
    writeln!(stdin, "{}", init::MAPPED).map_err(|e| format!("telling the init: {e}"))
}

/// Connects to the agent once its socket is there: hello and ping. Gives up when the
/// init ends, on Ctrl-C, or after `timeout`.
fn wait_for_agent(
    container: &mut Container,
    socket: &Path,
    timeout: Duration,
) -> Result<Client, RunError> {
    let start = Instant::now();
    let mut last = String::from("the agent has not made its socket");
    loop {
        if interrupt::requested() {
            return Err(RunError::Interrupted);
        }
        if let Some(status) = container.init.try_exit() {
            return Err(container.init.died(status));
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(RunError::AgentNotReady {
                timeout,
                reason: last,
                log: container.init.log_tail(),
            });
        }
        let left = timeout.saturating_sub(elapsed).min(Duration::from_secs(5));
        if socket.exists() {
            match UnixStream::connect(socket) {
                Ok(stream) => match Client::connect_with_timeout(stream, Some(left)) {
                    Ok(client) => match client.ping_timeout(Some(left)) {
                        Ok(_) => return Ok(client),
                        Err(e) => last = format!("ping: {e}"),
                    },
                    Err(e) => last = format!("hello: {e}"),
                },
                Err(e) => last = format!("connecting {}: {e}", socket.display()),
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
