//! The agent's PID 1 duties, tested on the host: the agent runs as PID 1 of fresh pid,
//! mount, UTS and IPC namespaces (`unshare`), serving a Unix socket instead of vsock.
//! Needs root and util-linux `unshare`; skipped otherwise.

// A test crate: its helpers (outside #[test] functions) may fail loudly too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use mvm_agent::protocol::ExecRequest;
use mvm_agent::{Client, Stdin};

struct Pid1Agent {
    unshare: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// These tests need root and util-linux's `unshare`; without either they fail
/// (a missing prerequisite is never a quiet pass).
fn require_root_and_unshare() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "the PID 1 namespace tests need root");
    let unshare = Command::new("unshare").arg("--version").output();
    assert!(
        unshare.is_ok_and(|o| o.status.success()),
        "the PID 1 namespace tests need unshare (util-linux)"
    );
}

impl Pid1Agent {
    fn start() -> Self {
        // Not under /tmp, /run or /dev: the agent mounts fresh file systems there in its
        // namespace, hiding the socket. The target dir may itself be under /tmp (a CI clone),
        // so /var/tmp, which the agent leaves alone.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let socket = dir.path().join("pid1.sock");
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
            ])
            .arg(env!("CARGO_BIN_EXE_mvm-agent"))
            .env("MVM_AGENT_PID1_TEST_SOCKET", &socket)
            .spawn()
            .unwrap();
        // Built before the wait, so that a failed wait still kills the namespace (Drop).
        let agent = Self {
            unshare,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind, a moment before listen: wait for a connection.
        while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
            assert!(Instant::now() < deadline, "PID 1 agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> Client {
        Client::connect(std::os::unix::net::UnixStream::connect(&self.socket).unwrap()).unwrap()
    }

    /// The agent's pid as the host sees it (the child of `unshare`).
    fn host_pid(&self) -> i32 {
        let id = self.unshare.id();
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "PID 1 agent still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pid1Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.unshare.try_wait() {
            // Killing PID 1 of the namespace ends every process in it. Runs during a failed
            // test's unwinding too, so nothing here may panic.
            let id = self.unshare.id();
            let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
                .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill takes plain integers; `pid` is the agent this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn stdout(client: &Client, script: &str) -> String {
    let out = client
        .exec(&sh(script), Stdin::Null)
        .unwrap()
        .wait_output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn pid1_mounts_names_and_reaps() {
    require_root_and_unshare();
    let agent = Pid1Agent::start();
    let client = agent.client();
    let ready = client.ping().unwrap();
    assert!(ready.pid1);
    assert_eq!(stdout(&client, "cat /proc/1/comm"), "mvm-agent\n");
    assert_eq!(stdout(&client, "hostname"), "mvm\n");
    // PID 1 blocks the power signals; its workloads must not inherit that.
    assert_eq!(
        stdout(&client, "grep -E '^Sig(Blk|Ign)' /proc/self/status"),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    let mounts = stdout(&client, "cut -d' ' -f2,3 /proc/mounts");
    for expected in [
        "/proc proc",
        "/sys sysfs",
        "/dev devtmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/tmp tmpfs",
        "/run tmpfs",
    ] {
        assert!(
            mounts.lines().any(|l| l == expected),
            "{expected} not in {mounts}"
        );
    }

    // Orphans (here: processes that left the workload's session) are reaped by PID 1,
    // and exec statuses are never stolen while that happens.
    for code in 0..20 {
        let out = client
            .exec(
                &sh(&format!(
                    "setsid sleep 0.05 </dev/null >/dev/null 2>&1 & exit {code}"
                )),
                Stdin::Null,
            )
            .unwrap()
            .wait_output()
            .unwrap();
        assert_eq!(out.status.code, Some(code));
    }
    std::thread::sleep(Duration::from_millis(500));
    let zombies = stdout(&client, "grep -h '^State:' /proc/[0-9]*/status | grep -c Z");
    assert_eq!(zombies.trim(), "0", "zombies left behind");
}

#[test]
fn shutdown_request_ends_the_namespace() {
    require_root_and_unshare();
    let mut agent = Pid1Agent::start();
    let client = agent.client();
    // A workload that would otherwise keep running.
    let _running = client.exec(&sh("sleep 60"), Stdin::Null).unwrap();
    client.shutdown().unwrap();
    let status = agent.wait_exit(Duration::from_secs(5));
    // reboot(2) in a pid namespace ends its init: RB_AUTOBOOT as SIGHUP.
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}");
}

#[test]
fn busybox_poweroff_signal_ends_the_namespace() {
    require_root_and_unshare();
    let mut agent = Pid1Agent::start();
    agent.client().ping().unwrap();
    let pid = agent.host_pid();
    // SAFETY: kill takes plain integers; `pid` is the agent this test started.
    unsafe { libc::kill(pid, libc::SIGUSR2) };
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}");
}
