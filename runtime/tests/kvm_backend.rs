//! The `kvm` backend's whole run loop without a VM: this test binary also
//! plays `mvm-vmm` (see `common`), handing each connection to a real,
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

mod common;

use std::time::{Duration, Instant};

use common::{assert_clean, fake_vmm, set_role, setup, spec, Setup, ROLE};
use mvm_runtime::backend::{kvm, RunError, StdinMode};
use mvm_runtime::sdk::Collect;

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
