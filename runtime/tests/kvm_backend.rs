//! The `kvm` backend's whole run loop without a VM: this test binary also
//! plays `mvm-vmm` (when `MVM_FAKE_VMM` is set), serving the hybrid-vsock
//! handshake on the `--vsock` socket and handing each connection to a real,
//! in-process `mvm-agent`. So readiness, exec, streaming, stdin, timeouts,
//! shutdown, "VMM died", "agent not ready" and cleanup run for real in
//! `cargo test`; only the guest kernel is missing.
//!
//! A custom harness (`harness = false`): the same binary is the test runner
//! and, re-executed with `MVM_FAKE_VMM`, the fake VMM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mvm_agent::agent::{Agent, Policy, PowerAction};
use mvm_runtime::backend::{kvm, OutputSink, RunArtifacts, RunError, RunSpec, StdinMode};
use mvm_runtime::image::{build, BuildInputs, ImageStore};

/// What the fake VMM does: `agent` (serve), `die` (exit 3 at once), `mute`
/// (accept and close every connection: the guest never listens).
const ROLE: &str = "MVM_FAKE_VMM";

fn fake_vmm(role: &str) -> ! {
    if role == "die" {
        eprintln!("kvm: fake failure");
        std::process::exit(3);
    }
    let args: Vec<String> = std::env::args().collect();
    let vsock = args
        .iter()
        .position(|a| a == "--vsock")
        .and_then(|i| args.get(i + 1))
        .expect("--vsock");
    let uds = vsock.split("uds=").nth(1).expect("uds=");
    let listener = UnixListener::bind(uds).expect("bind");
    if role == "mute" {
        for stream in listener.incoming() {
            drop(stream);
        }
        std::process::exit(0);
    }
    let agent = Agent::new(Policy::default(), false, PowerAction::ExitProcess).expect("agent");
    let result = agent.serve_forever(|| loop {
        let (mut stream, _) = listener.accept()?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        if line.starts_with(b"CONNECT ") {
            stream.write_all(b"OK 1\n")?;
            return Ok::<UnixStream, std::io::Error>(stream);
        }
    });
    std::process::exit(i32::from(result.is_err()));
}

#[derive(Default)]
struct Collect {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl OutputSink for Collect {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stdout.extend_from_slice(data);
        Ok(())
    }
    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stderr.extend_from_slice(data);
        Ok(())
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    run_dir: PathBuf,
    artifacts: RunArtifacts,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "needs Debian's busybox-static (scripts/setup installs it)"
    );
    let kernel = dir.path().join("vmlinux");
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(4096, 0);
    std::fs::write(&kernel, k).unwrap();
    let inputs = BuildInputs {
        kernel,
        agent: busybox.clone(),
        busybox,
        cmdline: None,
    };
    let store = ImageStore::at(&dir.path().join("data"));
    let image = store.put("default", &build(&inputs).unwrap()).unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    // Workloads run as an unprivileged uid: let them into the temp tree.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Setup {
        artifacts: RunArtifacts {
            image,
            vmm: std::env::current_exe().unwrap(),
        },
        run_dir,
        _dir: dir,
    }
}

fn spec(argv: &[&str]) -> RunSpec {
    RunSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Default::default(),
        workdir: None,
        cpus: 1,
        mem_mib: 128,
        timeout_secs: None,
        stdin: StdinMode::Null,
        disks: vec![],
        ready_timeout_secs: 10,
        net: None,
    }
}

fn set_role(role: &str) {
    // The runner is single-threaded when it sets this; children inherit it.
    std::env::set_var(ROLE, role);
}

fn assert_clean(run_dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(run_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "run directories left: {left:?}");
}

fn streams_and_exit_status(s: &Setup) {
    set_role("agent");
    let mut out = Collect::default();
    let outcome = kvm::run(
        &spec(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
        &s.artifacts,
        &mut out,
        None,
    )
    .unwrap();
    assert_eq!(outcome.status.code, Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(outcome.timings.boot_ms < 10_000);
}

fn stdin_is_forwarded(s: &Setup) {
    set_role("agent");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let mut run = spec(&["cat"]);
    run.stdin = StdinMode::Forward;
    let mut out = Collect::default();
    let outcome = kvm::run(
        &run,
        &s.artifacts,
        &mut out,
        Some(Box::new(std::io::Cursor::new(data.clone()))),
    )
    .unwrap();
    assert_eq!(outcome.status.code, Some(0));
    assert!(
        out.stdout == data,
        "cat returned {} bytes",
        out.stdout.len()
    );
}

fn timeout_stops_the_workload(s: &Setup) {
    set_role("agent");
    let mut run = spec(&["sleep", "60"]);
    run.timeout_secs = Some(1);
    let start = Instant::now();
    let outcome = kvm::run(&run, &s.artifacts, &mut Collect::default(), None).unwrap();
    assert!(outcome.status.timed_out, "{outcome:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

fn a_dying_vmm_is_reported_with_its_log(s: &Setup) {
    set_role("die");
    let err = kvm::run(
        &spec(&["true"]),
        &s.artifacts,
        &mut Collect::default(),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, RunError::VmmDied { .. }), "{err}");
    assert!(err.to_string().contains("kvm: fake failure"), "{err}");
}

fn a_silent_guest_is_not_ready(s: &Setup) {
    set_role("mute");
    let mut run = spec(&["true"]);
    run.ready_timeout_secs = 2;
    let start = Instant::now();
    let err = kvm::run(&run, &s.artifacts, &mut Collect::default(), None).unwrap_err();
    assert!(matches!(err, RunError::AgentNotReady { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(8));
}

/// Ctrl-C while the workload runs is passed to it: a workload that traps
/// SIGINT cleans up and its own status is the run's. Last: the signal count is
/// process-wide and stays set.
fn a_signal_is_passed_to_the_workload(s: &Setup) {
    set_role("agent");
    let script = "trap 'echo caught INT; exit 3' INT; echo started; sleep 60 & wait";
    let mut out = Collect::default();
    let signaller = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(2));
        mvm_runtime::backend::interrupt::deliver(libc::SIGINT);
        Instant::now()
    });
    let outcome = kvm::run(&spec(&["sh", "-c", script]), &s.artifacts, &mut out, None).unwrap();
    let sent = signaller.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "started\ncaught INT\n"
    );
    assert_eq!(outcome.status.code, Some(3), "{outcome:?}");
    assert!(sent.elapsed() < mvm_runtime::backend::interrupt::GRACE);
}

/// One scenario.
type Case = fn(&Setup);

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        fake_vmm(&role);
    }
    let s = setup();
    std::env::set_var("MVM_RUN_DIR", &s.run_dir);
    let cases: [(&str, Case); 6] = [
        ("streams_and_exit_status", streams_and_exit_status),
        ("stdin_is_forwarded", stdin_is_forwarded),
        ("timeout_stops_the_workload", timeout_stops_the_workload),
        (
            "a_dying_vmm_is_reported_with_its_log",
            a_dying_vmm_is_reported_with_its_log,
        ),
        ("a_silent_guest_is_not_ready", a_silent_guest_is_not_ready),
        (
            "a_signal_is_passed_to_the_workload",
            a_signal_is_passed_to_the_workload,
        ),
    ];
    for (name, case) in cases {
        let start = Instant::now();
        case(&s);
        assert_clean(&s.run_dir);
        println!("test {name} ... ok ({:?})", start.elapsed());
    }
    println!("test result: ok. {} passed", cases.len());
}
