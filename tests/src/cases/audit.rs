//! `audit/*`: the evidence `mvm run` leaves: a hash-chained, signed
//! audit log that survives concurrent writers and names the record a tamper
//! broke; a signed receipt that verifies and refuses a changed payload; a
//! policy denial with its own status and a `plan_denied` record.
//!
//! Each case has its own data directory (the artifacts' images linked in, its
//! own `audit.jsonl` and replay store) and its own host keys.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::run::{
    descendants, describe, events, expect_code, image_store, last_run, mvm_with, output, running,
    Watched, FIRST_OUTPUT,
};
use crate::case::{Case, CaseResult, Context, Failure};

/// The audit cases.
pub const CASES: &[Case] = &[
    Case::kvm("audit/concurrent-4", concurrent_4).limit_secs(600),
    Case::kvm("audit/receipt", receipt),
    Case::kvm("audit/denied", denied),
    Case::kvm("audit/overhead", overhead),
    Case::kvm("audit/vm-killed", vm_killed),
    Case::kvm("audit/mvm-killed", mvm_killed),
];

/// Runs of each kind in `audit/overhead`.
const OVERHEAD_RUNS: usize = 3;

/// `mvm run`'s exit status for a policy denial (runtime/src/run/exit.rs).
const EXIT_DENIED: i32 = 119;
/// `mvm run`'s exit status when the VM process died (runtime/src/run/exit.rs).
const EXIT_VMM_DIED: i32 = 122;
/// The workload of the kill cases: a line to wait for, then a long sleep.
const STARTED_THEN_SLEEP: &str = "echo started; sleep 120";
/// Concurrent runs in `audit/concurrent-4`. Four writers prove what eight did (the
/// log's lock, the chain, one record set per plan), and four VMs alive at once prove
/// the runs do not share a CID, a socket or a run directory. Eight made the case
/// stall on a loaded machine (docs/e2e.md: simultaneous guest boots in the test host).
const CONCURRENT: usize = 4;
/// Their `--ready-timeout`: one TCG boot takes 2-20 s depending on the
/// machine's load, and the four share one emulated CPU.
const CONCURRENT_READY_SECS: &str = "400";
/// Seconds between the starts of the concurrent runs. Guests booting at the same
/// moment on the test host's one emulated CPU stall it (docs/e2e.md), so the boots are
/// staggered; each workload then sleeps until about the same moment, so all the VMs
/// are alive together and their records reach the log at about the same time.
const CONCURRENT_STAGGER_SECS: u64 = 12;

fn fail(what: &str) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

/// A case's own mvm homes: `data/` (images linked from the artifacts, unless the
/// case put its own `data/images` there first) and `config/`.
pub(super) struct Homes {
    pub(super) data: PathBuf,
    pub(super) config: PathBuf,
}

impl Homes {
    pub(super) fn new(ctx: &Context) -> Result<Self, Failure> {
        let store = image_store(ctx)?;
        let data = ctx.work_file("data");
        let config = ctx.work_file("config");
        std::fs::create_dir_all(&data).map_err(fail("creating the data directory"))?;
        std::fs::create_dir_all(&config).map_err(fail("creating the config directory"))?;
        let images = data.join("images");
        if !images.exists() {
            std::os::unix::fs::symlink(store.join("images"), &images)
                .map_err(fail("linking the image store"))?;
        }
        Ok(Self { data, config })
    }

    pub(super) fn log(&self) -> PathBuf {
        self.data.join("audit.jsonl")
    }

    pub(super) fn mvm(&self, ctx: &Context, args: &[&str]) -> Result<Command, Failure> {
        let mut command = mvm_with(ctx, &self.data, &self.config)?;
        command.args(args).stdin(Stdio::null());
        Ok(command)
    }

    pub(super) fn run(&self, ctx: &Context, args: &[&str]) -> Result<Command, Failure> {
        let mut command = self.mvm(ctx, &["run", "--backend", "kvm"])?;
        command.args(args);
        Ok(command)
    }

    /// `mvm audit verify [--log FILE]`.
    pub(super) fn verify(&self, ctx: &Context, log: Option<&Path>) -> Result<Output, Failure> {
        let mut command = self.mvm(ctx, &["audit", "verify"])?;
        if let Some(log) = log {
            command.arg("--log").arg(log);
        }
        output(command)
    }
}

/// The log's records, parsed.
fn records(log: &Path) -> Result<Vec<Value>, Failure> {
    let text = std::fs::read_to_string(log).map_err(fail("reading the audit log"))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Failure::new(format!("audit log line {}: {e}", i + 1)))
        })
        .collect()
}

fn text<'a>(record: &'a Value, pointer: &str) -> &'a str {
    record
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Each run's records: admitted (by plan id), then boot_verified, exec_started,
/// exec_exited (status 0), vm_exited for its VM id, in that order.
fn check_runs(records: &[Value], runs: usize) -> CaseResult {
    let admitted: Vec<&str> = records
        .iter()
        .filter(|r| text(r, "/event") == "plan_admitted")
        .map(|r| text(r, "/plan_id"))
        .collect();
    if admitted.len() != runs {
        return Err(Failure::new(format!(
            "{} plan_admitted records, expected {runs}",
            admitted.len()
        )));
    }
    for plan in admitted {
        let kinds: Vec<&str> = records
            .iter()
            .filter(|r| text(r, "/plan_id") == plan && !text(r, "/vm_id").is_empty())
            .map(|r| text(r, "/event"))
            .collect();
        let want = ["boot_verified", "exec_started", "exec_exited", "vm_exited"];
        if kinds != want {
            return Err(Failure::new(format!(
                "plan {plan}: records {kinds:?}, expected {want:?}"
            )));
        }
        let vms: Vec<&str> = records
            .iter()
            .filter(|r| text(r, "/plan_id") == plan)
            .map(|r| text(r, "/vm_id"))
            .filter(|v| !v.is_empty())
            .collect();
        if vms.windows(2).any(|w| w.first() != w.get(1)) {
            return Err(Failure::new(format!(
                "plan {plan}: records of several VMs {vms:?}"
            )));
        }
        let exited = records
            .iter()
            .find(|r| text(r, "/plan_id") == plan && text(r, "/event") == "exec_exited");
        if exited.and_then(|r| r.pointer("/fields/exit_status")) != Some(&0.into()) {
            return Err(Failure::new(format!(
                "plan {plan}: exec_exited without exit_status 0: {exited:?}"
            )));
        }
        let booted = records
            .iter()
            .find(|r| text(r, "/plan_id") == plan && text(r, "/event") == "boot_verified");
        for field in ["kernel", "initramfs", "cmdline", "plan_digest"] {
            if booted.is_none_or(|r| !text(r, &format!("/fields/{field}")).starts_with("sha256:")) {
                return Err(Failure::new(format!(
                    "plan {plan}: boot_verified lacks the {field} digest: {booted:?}"
                )));
            }
        }
    }
    Ok(())
}

/// `mvm audit verify --log copy` must fail and name `line N`.
fn expect_tamper_named(
    homes: &Homes,
    ctx: &Context,
    what: &str,
    lines: &[&str],
    cut: Option<usize>,
    line: usize,
) -> CaseResult {
    let copy = ctx.work_file(&format!("tampered-{}.jsonl", what.replace(' ', "-")));
    let mut bytes = lines.join("\n").into_bytes();
    bytes.push(b'\n');
    if let Some(len) = cut {
        bytes.truncate(len);
    }
    std::fs::write(&copy, &bytes).map_err(fail("writing a tampered copy"))?;
    let out = homes.verify(ctx, Some(&copy))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(1) || !stderr.contains(&format!("line {line}")) {
        return Err(Failure::new(format!(
            "{what}: mvm audit verify exited {:?} without naming line {line}",
            out.status.code()
        ))
        .with_detail(describe(&out)));
    }
    Ok(())
}

/// Concurrent runs; the log verifies and holds each run's records; four
/// tampered copies each fail, naming the record.
fn concurrent_4(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    // Keys first, so the runs do not race to create them.
    expect_code(&output(homes.mvm(ctx, &["keys", "init"])?)?, 0)?;
    let mut children = Vec::new();
    for i in 0..CONCURRENT {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_secs(CONCURRENT_STAGGER_SECS));
        }
        // Run i starts i staggers after the first and sleeps for the remaining ones, so
        // every run ends at about the same time (boot time apart).
        let rest = CONCURRENT_STAGGER_SECS * u64::try_from(CONCURRENT - 1 - i).unwrap_or(0);
        let script = format!("sleep {}; echo run-{i}", rest + 5);
        // The boots share the test host's one emulated CPU: give the agents time.
        let mut command = homes.run(
            ctx,
            &[
                "--ready-timeout",
                CONCURRENT_READY_SECS,
                "--mem",
                "128",
                "--",
                "sh",
                "-c",
                &script,
            ],
        )?;
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        children.push(command.spawn().map_err(fail("starting mvm"))?);
    }
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(fail("waiting for mvm"))?;
        expect_code(&out, 0)
            .map_err(|f| Failure::new(format!("run {i}: {}", f.reason)).with_detail(f.detail))?;
        if out.stdout != format!("run-{i}\n").into_bytes() {
            return Err(Failure::new(format!("run {i}: wrong stdout")).with_detail(describe(&out)));
        }
    }
    let out = homes.verify(ctx, None)?;
    expect_code(&out, 0)?;
    let log = homes.log();
    check_runs(&records(&log)?, CONCURRENT)?;

    let text = std::fs::read_to_string(&log).map_err(fail("reading the audit log"))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() < 10 {
        return Err(Failure::new(format!("only {} records", lines.len())));
    }
    // One byte edited in record 5: a digit of its time.
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    if let Some(line) = edited.get_mut(4) {
        let at = line
            .find("\"time\":\"")
            .map(|i| i + "\"time\":\"".len() + 3)
            .ok_or_else(|| Failure::new("record 5 has no time"))?;
        let old = line.as_bytes().get(at).copied().unwrap_or(b'0');
        let new = if old == b'9' { "8" } else { "9" };
        line.replace_range(at..=at, new);
    }
    let edited: Vec<&str> = edited.iter().map(String::as_str).collect();
    expect_tamper_named(&homes, ctx, "one byte edited", &edited, None, 5)?;
    // Record 5 deleted: line 5 now holds seq 6.
    let mut deleted = lines.clone();
    deleted.remove(4);
    expect_tamper_named(&homes, ctx, "one record deleted", &deleted, None, 5)?;
    // Records 5 and 6 swapped.
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    expect_tamper_named(&homes, ctx, "two records swapped", &swapped, None, 5)?;
    // Truncated in the middle of the last record.
    let full: usize = lines.iter().map(|l| l.len() + 1).sum();
    let last = lines.last().map_or(0, |l| l.len());
    expect_tamper_named(
        &homes,
        ctx,
        "truncated mid-record",
        &lines,
        Some(full - last / 2 - 1),
        lines.len(),
    )?;
    Ok(())
}

/// `mvm run --receipt` writes a receipt that `mvm receipt verify --trust
/// audit.pub` accepts and states the run; one payload byte changed, refused.
fn receipt(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    let file = ctx.work_file("receipt.json");
    let receipt_arg = file.display().to_string();
    let out = output(homes.run(
        ctx,
        &[
            "--receipt",
            &receipt_arg,
            "--",
            "sh",
            "-c",
            "echo receipt; exit 3",
        ],
    )?)?;
    expect_code(&out, 3)?;
    let trust = homes.config.join("audit.pub").display().to_string();
    let verify = |path: &Path| -> Result<Output, Failure> {
        let mut command = homes.mvm(ctx, &["receipt", "verify"])?;
        command.arg(path).args(["--trust", &trust]);
        output(command)
    };
    let out = verify(&file)?;
    expect_code(&out, 0)?;

    let envelope: Value =
        serde_json::from_slice(&std::fs::read(&file).map_err(fail("reading the receipt"))?)
            .map_err(|e| Failure::new(format!("receipt is not JSON: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload = b64
        .decode(text(&envelope, "/payload"))
        .map_err(|e| Failure::new(format!("receipt payload: {e}")))?;
    let statement: Value = serde_json::from_slice(&payload)
        .map_err(|e| Failure::new(format!("receipt statement: {e}")))?;
    let want_stdout = format!("sha256:{}", hex::encode(Sha256::digest(b"receipt\n")));
    let checks = [
        (
            statement.pointer("/predicate/exit_status") == Some(&3.into()),
            "exit_status 3",
        ),
        (
            text(&statement, "/predicate/stdout_sha256") == want_stdout,
            "the stdout digest",
        ),
        (
            text(&statement, "/predicate/measurements/kernel").starts_with("sha256:"),
            "the kernel measurement",
        ),
        (
            text(&statement, "/predicate/wall/backend") == "kvm"
                && statement.pointer("/predicate/wall/hardware_virtualized") == Some(&true.into())
                && text(&statement, "/predicate/wall/plan_verified_by").starts_with("mvm-vmm"),
            "the wall of the kvm backend",
        ),
        (
            statement
                .pointer("/subject/0/digest/sha256")
                .and_then(Value::as_str)
                .is_some_and(|d| d.len() == 64),
            "the plan digest subject",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(Failure::new(format!("receipt lacks {what}: {statement}")));
        }
    }
    // The run's audit range is in the log and verifies.
    expect_code(&homes.verify(ctx, None)?, 0)?;

    // One payload byte changed (inside the JSON, so it still parses).
    let at = payload.len() / 2;
    if let Some(byte) = payload.get_mut(at) {
        *byte = if *byte == b'0' { b'1' } else { b'0' };
    }
    let mut tampered = envelope.clone();
    if let Some(p) = tampered.get_mut("payload") {
        *p = Value::from(b64.encode(&payload));
    }
    let bad = ctx.work_file("receipt-tampered.json");
    std::fs::write(&bad, tampered.to_string()).map_err(fail("writing the tampered receipt"))?;
    let out = verify(&bad)?;
    if out.status.code() != Some(1) {
        return Err(Failure::new(format!(
            "a receipt with one payload byte changed: mvm receipt verify exited {:?}, expected 1",
            out.status.code()
        ))
        .with_detail(describe(&out)));
    }
    Ok(())
}

/// A policy capping vCPUs at 1: `--cpus 2` exits with the denial status,
/// names the rule, and the log has `plan_denied` with it (and verifies).
fn denied(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    std::fs::write(
        homes.config.join("policy.toml"),
        "[limits]\nmax_vcpus = 1\nmax_memory_mib = 2048\nmax_timeout_secs = 3600\n",
    )
    .map_err(fail("writing the policy"))?;
    let out = output(homes.run(ctx, &["--cpus", "2", "--", "true"])?)?;
    expect_code(&out, EXIT_DENIED)?;
    if !String::from_utf8_lossy(&out.stderr).contains("limits.max_vcpus") {
        return Err(
            Failure::new("the denial does not name limits.max_vcpus").with_detail(describe(&out))
        );
    }
    let records = records(&homes.log())?;
    let denial = records
        .iter()
        .find(|r| text(r, "/event") == "plan_denied")
        .ok_or_else(|| Failure::new("no plan_denied record"))?;
    if text(denial, "/fields/rule") != "limits.max_vcpus" {
        return Err(Failure::new(format!(
            "plan_denied names the wrong rule: {denial}"
        )));
    }
    if records.iter().any(|r| text(r, "/event") == "plan_admitted") {
        return Err(Failure::new("a denied run was admitted too"));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;
    // Within the cap it runs.
    expect_code(&output(homes.run(ctx, &["--cpus", "1", "--", "true"])?)?, 0)
}

/// Boot report phases (µs since the VMM started) and the run's wall time.
fn phases(out: &Output, wall: std::time::Duration) -> Result<String, Failure> {
    let value: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(format!("--json: {e}")).with_detail(describe(out)))?;
    let us = |name: &str| {
        value
            .pointer(&format!("/boot_report/{name}"))
            .and_then(Value::as_u64)
            .map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v as f64 / 1000.0))
    };
    let boot_ms = value
        .pointer("/timings/boot_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(format!(
        "args_parsed {} ms, plan_verified {} ms, artifacts_measured {} ms, vm_created {} ms, agent_ready {} ms; mvm boot_ms {boot_ms}, wall {} ms",
        us("args_parsed"),
        us("plan_verified"),
        us("artifacts_measured"),
        us("vm_created"),
        us("agent_ready"),
        wall.as_millis()
    ))
}

/// Not a check but a measurement (printed): the same `mvm run --json -- true`
/// with `--dev` and admitted, alternately, with the VMM's boot report phases
/// and the wall time of the whole command. Fails only if a run fails.
fn overhead(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    expect_code(&output(homes.mvm(ctx, &["keys", "init"])?)?, 0)?;
    for i in 0..OVERHEAD_RUNS {
        for dev in [true, false] {
            let mut args = vec!["--json"];
            if dev {
                args.push("--dev");
            }
            args.extend(["--", "true"]);
            let start = std::time::Instant::now();
            let out = output(homes.run(ctx, &args)?)?;
            let wall = start.elapsed();
            expect_code(&out, 0)?;
            println!(
                "audit/overhead run {i} {}: {}",
                if dev { "--dev " } else { "signed" },
                phases(&out, wall)?
            );
        }
    }
    Ok(())
}

/// The VM's process is killed (SIGKILL to mvm-vmm, mvm's child) after the
/// workload printed `started`: mvm exits 122 and the log holds the run's
/// `boot_verified`, `exec_started` and a `vm_exited` saying the process died
/// of signal 9; the log verifies.
fn vm_killed(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    let mut run = Watched::spawn(homes.run(ctx, &["--", "sh", "-c", STARTED_THEN_SLEEP])?)?;
    run.wait_for_line("started", FIRST_OUTPUT)?;
    let below = descendants(run.pid())?;
    let vmm = below
        .iter()
        .find(|p| p.ppid == run.pid() && p.comm == crate::case::VMM)
        .ok_or_else(|| Failure::new(format!("no mvm-vmm child of mvm: {below:?}")))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(vmm.pid).unwrap_or(i32::MAX)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| Failure::new(format!("kill -KILL mvm-vmm {}: {e}", vmm.pid)))?;
    let out = run.wait(std::time::Duration::from_secs(60))?;
    expect_code(&out, EXIT_VMM_DIED)?;
    let records = last_run(&records(&homes.log())?)?;
    let kinds = events(&records);
    let want = [
        "plan_admitted",
        "boot_verified",
        "exec_started",
        "vm_exited",
    ];
    if kinds != want {
        return Err(Failure::new(format!(
            "the run's records are {kinds:?}, expected {want:?}"
        ))
        .with_detail(describe(&out)));
    }
    let exited = records.last().cloned().unwrap_or_default();
    if text(&exited, "/fields/reason") != "vm_process_died"
        || exited.pointer("/fields/signal") != Some(&9.into())
    {
        return Err(Failure::new(format!(
            "vm_exited does not say the VM process died of signal 9: {exited}"
        )));
    }
    expect_code(&homes.verify(ctx, None)?, 0)
}

/// mvm itself is killed (SIGKILL) while its workload runs: no VM process
/// outlives it, the next command (`mvm audit show`) appends `run_abandoned`
/// for the run after its `boot_verified` and `exec_started`, removes the
/// run's marker and the run directories the killed mvm left, and the log
/// verifies.
fn mvm_killed(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    let mut run = Watched::spawn(homes.run(ctx, &["--", "sh", "-c", STARTED_THEN_SLEEP])?)?;
    run.wait_for_line("started", FIRST_OUTPUT)?;
    let below = descendants(run.pid())?;
    if !below.iter().any(|p| p.comm == crate::case::VMM) {
        return Err(Failure::new(format!("no mvm-vmm below mvm: {below:?}")));
    }
    let run_pid = run.pid();
    run.signal(nix::sys::signal::Signal::SIGKILL)?;
    let out = run.wait(std::time::Duration::from_secs(30))?;
    if out.status.code().is_some() {
        return Err(Failure::new(format!("mvm was not killed: {}", out.status)));
    }
    // PR_SET_PDEATHSIG: the VM processes die with mvm.
    let start = std::time::Instant::now();
    let left = loop {
        let left: Vec<_> = below.iter().filter(|p| running(p.pid)).collect();
        if left.is_empty() || start.elapsed() > std::time::Duration::from_secs(10) {
            break left.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the killed run still running: {left:?}"
        )));
    }
    let before = last_run(&records(&homes.log())?)?;
    if events(&before) != ["plan_admitted", "boot_verified", "exec_started"] {
        return Err(Failure::new(format!(
            "before the next command the run's records are {:?}, expected them written ahead",
            events(&before)
        )));
    }

    let show = output(homes.mvm(ctx, &["audit", "show"])?)?;
    expect_code(&show, 0)?;
    if !String::from_utf8_lossy(&show.stderr).contains("abandoned") {
        return Err(
            Failure::new("mvm audit show did not say it closed an abandoned run")
                .with_detail(describe(&show)),
        );
    }
    let after = last_run(&records(&homes.log())?)?;
    let kinds = events(&after);
    let want = [
        "plan_admitted",
        "boot_verified",
        "exec_started",
        "run_abandoned",
    ];
    if kinds != want {
        return Err(Failure::new(format!(
            "after mvm audit show the run's records are {kinds:?}, expected {want:?}"
        )));
    }
    // The killed mvm's run directories (mvm-<pid>-<n>) went with the marker.
    let prefix = format!("mvm-{}-", run_pid);
    let left: Vec<_> = std::fs::read_dir(ctx.work_file("run"))
        .map_err(fail("listing the run directories"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "the killed mvm's run directories are left: {left:?}"
        )));
    }
    let markers = homes.data.join("open-runs");
    let open: Vec<_> = std::fs::read_dir(&markers)
        .map_err(fail("listing open-runs"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    if !open.is_empty() {
        return Err(Failure::new(format!("run markers left: {open:?}")));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;
    // Closed once: another command appends nothing more.
    expect_code(&output(homes.mvm(ctx, &["audit", "show"])?)?, 0)?;
    let again = events(&last_run(&records(&homes.log())?)?);
    if again != want {
        return Err(Failure::new(format!(
            "a second command changed the run's records to {again:?}"
        )));
    }
    Ok(())
}
