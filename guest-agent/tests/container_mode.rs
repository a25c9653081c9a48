//! `mvm-agent --container`: the container filter on the agent and its workloads, orphans
//! reaped without touching exec statuses, no VM init, and the ways it ends (shutdown,
//! SIGTERM). Once as a plain child process (a subreaper), once as PID 1 of fresh pid and
//! mount namespaces (`unshare`), which is how the container backend runs it.
//! Needs root (workloads run as uid 1000) and, for the second, util-linux `unshare`.

// A test crate: its helpers (outside #[test] functions) may fail loudly too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use mvm_agent::protocol::ExecRequest;
use mvm_agent::{Client, Stdin};

const AGENT: &str = env!("CARGO_BIN_EXE_mvm-agent");

struct Running {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(command: &mut Command, dir: tempfile::TempDir, socket: PathBuf) -> Self {
        let child = command.spawn().unwrap();
        // Built before the wait, so that a failed wait still kills the agent (Drop).
        let mut running = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind, a moment before listen: wait for a connection.
        while std::os::unix::net::UnixStream::connect(&running.socket).is_err() {
            assert!(
                running.child.try_wait().unwrap().is_none(),
                "the agent exited"
            );
            assert!(Instant::now() < deadline, "the agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        running
    }

    fn client(&self) -> Client {
        Client::connect(std::os::unix::net::UnixStream::connect(&self.socket).unwrap()).unwrap()
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent is still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Runs during a failed test's unwinding too: nothing here may panic. Under
            // unshare, the agent (PID 1 of the namespace) is the child's child; killing it
            // ends the namespace, and unshare with it.
            let id = self.child.id();
            let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
                .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill takes plain integers; `pid` is a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "the container-mode tests need root");
}

/// A socket directory the workloads' uid can use too. Not under /tmp or /run: the PID 1
/// test mounts a fresh /run, and the target dir may be under /tmp (a CI clone).
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    (dir, socket)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

/// Runs `request`; returns its stdout and exit code.
fn run(client: &Client, request: &ExecRequest) -> (String, Option<i32>) {
    let out = client
        .exec(request, Stdin::Null)
        .unwrap()
        .wait_output()
        .unwrap();
    (String::from_utf8(out.stdout).unwrap(), out.status.code)
}

/// The state letters of `pid`'s children (`Z` for a zombie).
fn children_states(pid: u32) -> Vec<String> {
    let mut states = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let children = std::fs::read_to_string(task.unwrap().path().join("children"));
        for child in children.unwrap_or_default().split_whitespace() {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // "pid (comm) S ...": the state follows the last ')'.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                states.push(format!(
                    "{child}:{}",
                    rest.trim_start().chars().next().unwrap()
                ));
            }
        }
    }
    states
}

/// The checks both ways of running share: the workload is filtered and unprivileged, and
/// an orphan it leaves behind is reaped without its status reaching any exec.
fn check_workloads(client: &Client, agent_pid: u32) {
    let (out, code) = run(
        client,
        &sh("id -u; grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status"),
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        out, "1000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n",
        "the workload runs as uid 1000 under the agent's one filter"
    );
    // A grandchild outlives its parent (keep_children: its group is not killed) and exits
    // later with a status of its own: it becomes the agent's child (PID 1's, or a
    // subreaper's), the agent reaps it, and only the parent's status is reported.
    let orphaning = ExecRequest {
        keep_children: true,
        ..sh("(sleep 1; exit 3) >/dev/null 2>&1 & exit 5")
    };
    assert_eq!(run(client, &orphaning).1, Some(5));
    let orphans = children_states(agent_pid);
    assert_eq!(orphans.len(), 1, "the orphan is the agent's: {orphans:?}");
    assert_eq!(run(client, &sh("exit 9")).1, Some(9));
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let states = children_states(agent_pid);
        if states.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still has children: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run(client, &sh("exit 4")).1, Some(4));
}

#[test]
fn a_container_agent_filters_its_workloads_reaps_orphans_and_ends_on_shutdown() {
    require_root();
    let (dir, socket) = socket_dir();
    let mut agent = Running::start(
        Command::new(AGENT)
            .arg("--container")
            .arg("--listen-unix")
            .arg(&socket)
            .args(["--log", "warn"]),
        dir,
        socket,
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    assert!(status.contains("Seccomp:\t2\n"), "{status}");
    let client = agent.client();
    let ready = client.ping().unwrap();
    assert!(!ready.pid1, "a container's agent is no guest's PID 1");
    check_workloads(&client, agent.child.id());
    client.shutdown().unwrap();
    assert!(agent.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn the_container_flag_needs_a_unix_socket() {
    let out = Command::new(AGENT)
        .args(["--container", "--listen-vsock", "1024"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen-unix"), "{stderr}");
    let out = Command::new(AGENT).arg("--print-seccomp").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("CLONE_NEWUSER"),
        "{table}"
    );
}

/// The agent's pid as the host sees it: the child of `unshare --fork`.
fn agent_host_pid(unshare: &Child) -> u32 {
    let id = unshare.id();
    let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
    children.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn as_pid1_of_a_namespace_it_does_no_vm_init_and_ends_on_sigterm() {
    require_root();
    let unshare = Command::new("unshare").arg("--version").output();
    assert!(
        unshare.is_ok_and(|o| o.status.success()),
        "this test needs unshare (util-linux)"
    );
    let (dir, socket) = socket_dir();
    // What the launcher provides, in miniature: fresh pid and mount namespaces, its own
    // /proc, a tmpfs /run. The root, /dev and /tmp stay the host's (no pivot_root here).
    let script = format!(
        "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run && exec {AGENT} --container \
         --listen-unix {} --log warn",
        socket.display()
    );
    let mut agent = Running::start(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--mount-proc"])
            .args(["--propagation", "private", "sh", "-c"])
            .arg(script),
        dir,
        socket,
    );
    let client = agent.client();
    client.ping().unwrap();
    let (out, _) = run(
        &client,
        &sh("cat /proc/1/comm; test -d /run/secrets && echo secrets"),
    );
    assert_eq!(out, "mvm-agent\nsecrets\n");
    // No VM init: the host's hostname (init sets "mvm"), no mounts of its own on /tmp or
    // /run/secrets.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (name, _) = run(&client, &sh("cat /proc/sys/kernel/hostname"));
    assert_eq!(name, host_name);
    let (mounts, _) = run(&client, &sh("cat /proc/self/mountinfo"));
    let mounted: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .collect();
    assert!(mounted.contains(&"/run"), "{mounts}");
    assert!(!mounted.contains(&"/run/secrets"), "{mounts}");
    let host_tmp = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some("/tmp"))
        .count();
    assert_eq!(
        mounted.iter().filter(|m| **m == "/tmp").count(),
        host_tmp,
        "{mounts}"
    );
    let pid = agent_host_pid(&agent.child);
    check_workloads(&client, pid);
    let pid_t: libc::pid_t = pid.try_into().unwrap();
    // SAFETY: kill takes plain integers; `pid` is the agent this test started.
    let sent = unsafe { libc::kill(pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    // unshare --fork exits with its child's status.
    assert!(agent.wait_exit(Duration::from_secs(5)).success());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}
