//! `tier/*`: the README's main job, `mvm run`, on the machine the user has,
//! through the tier it gives (no `--backend`): `emulated` on a host without
//! hardware virtualization (these build machines), `kvm` on one with it. These
//! cases run on that machine itself, not inside the test host; `scripts/e2e`
//! runs them first (`mvm-e2e --place user-host`).
//!
//! Each case asks `mvm doctor --json` which tier the host gives, and checks
//! that `mvm run` used it.

use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{
    describe, expect_code, expect_streams, image_store, mvm_with, output, STREAMS_SCRIPT,
};

/// The cases. Each `mvm run` on the emulated tier boots a QEMU test host and
/// a VM inside it: tens of seconds on a loaded machine.
pub const CASES: &[Case] = &[
    Case::user_host("tier/exit-and-streams", exit_and_streams).limit_secs(420),
    Case::user_host("tier/bulk-16mib", bulk_16mib).limit_secs(420),
    Case::user_host("tier/json", json).limit_secs(420),
    Case::user_host("tier/sdk-example", sdk_example).limit_secs(420),
    Case::user_host("tier/bench", bench).limit_secs(420),
    Case::user_host("tier/emulated-spare", emulated_spare).limit_secs(420),
];

/// Bytes of the bulk case's stdout.
const BULK_BYTES: usize = 16 << 20;

/// `mvm SUBCOMMAND ARGS` with the artifacts' binaries and image store, keys
/// and policy under the case's work directory.
pub(crate) fn mvm(ctx: &Context, subcommand: &str, args: &[&str]) -> Result<Command, Failure> {
    let data = image_store(ctx)?;
    let mut command = mvm_with(ctx, &data, &ctx.work_file("config"))?;
    command.arg(subcommand).args(args).stdin(Stdio::null());
    Ok(command)
}

/// The tier `mvm doctor --json` chooses on this host; a host with none fails
/// the case (a user would get exit 120).
fn chosen_tier(ctx: &Context) -> Result<String, Failure> {
    let out = output(mvm(ctx, "doctor", &["--json"])?)?;
    let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("mvm doctor --json is not JSON: {e}")).with_detail(describe(&out))
    })?;
    doctor
        .get("chosen")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            Failure::new("mvm doctor --json chose no tier: this host cannot run mvm")
                .with_detail(describe(&out))
        })
}

/// The tier `mvm run` announced on stderr (`mvm: tier: NAME ...`), if any.
fn announced(out: &Output, tier: &str) -> bool {
    String::from_utf8_lossy(&out.stderr).contains(tier)
}

/// Exit status and the two streams, apart.
fn exit_and_streams(ctx: &Context) -> CaseResult {
    let tier = chosen_tier(ctx)?;
    let out = output(mvm(ctx, "run", &["--", "sh", "-c", STREAMS_SCRIPT])?)?;
    expect_streams(&out)?;
    if tier == "emulated" && !announced(&out, "emulated") {
        return Err(
            Failure::new("the emulated tier was not named on stderr").with_detail(describe(&out))
        );
    }
    Ok(())
}

/// 16 MiB of random bytes from the guest arrive whole: the digest the guest
/// computed (on stderr) is the digest of what reached our stdout.
fn bulk_16mib(ctx: &Context) -> CaseResult {
    let script = format!(
        "head -c {BULK_BYTES} /dev/urandom > /tmp/bulk && sha256sum /tmp/bulk >&2 && cat /tmp/bulk"
    );
    let out = output(mvm(ctx, "run", &["--", "sh", "-c", &script])?)?;
    expect_code(&out, 0)?;
    let short = || describe_short(&out);
    if out.stdout.len() != BULK_BYTES {
        return Err(Failure::new(format!(
            "stdout has {} bytes, expected {BULK_BYTES}",
            out.stdout.len()
        ))
        .with_detail(short()));
    }
    let ours = hex::encode(Sha256::digest(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let guests = stderr
        .lines()
        .find(|l| l.ends_with("/tmp/bulk"))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| Failure::new("the guest printed no sha256sum line").with_detail(short()))?;
    if guests != ours {
        return Err(Failure::new(format!(
            "stdout sha256 {ours}, the guest's {guests}"
        )));
    }
    Ok(())
}

/// `describe` without 16 MiB of stdout in it.
fn describe_short(out: &Output) -> String {
    crate::case::tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)
}

/// `--json`: one object on stdout, with the workload's streams, status and
/// the tier the host gave.
/// The QEMU processes whose command line names `needle` (a spare's directory).
pub(crate) fn qemus_naming(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            text.contains("qemu-system") && text.contains(needle)
        })
        .collect()
}

/// Spare test hosts (`MVM_TESTHOST_SPARE=1`, docs/boot-time.md): the first run boots cold
/// and leaves a spare booting; the second claims it (`timings.testhost_spare`), gets its
/// own output, and leaves the next spare; the claimed spare's QEMU is gone after the run,
/// and stopping the keeper of the one left takes its QEMU with it. Forces the emulated
/// tier (the only one with a test host).
fn emulated_spare(ctx: &Context) -> CaseResult {
    let run = |word: &str| -> Result<serde_json::Value, Failure> {
        let mut command = mvm(
            ctx,
            "run",
            &["--backend", "emulated", "--json", "--", "echo", word],
        )?;
        command.env("MVM_TESTHOST_SPARE", "1");
        let out = output(command)?;
        expect_code(&out, 0)?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            Failure::new(format!("--json output is not JSON: {e}")).with_detail(describe(&out))
        })?;
        if value.get("stdout") != Some(&format!("{word}\n").into()) {
            return Err(Failure::new(format!("{word}: wrong stdout: {value}")));
        }
        Ok(value)
    };
    let spare_used = |v: &serde_json::Value| v.pointer("/timings/testhost_spare").cloned();
    let first = run("one")?;
    if spare_used(&first) != Some(false.into()) {
        return Err(Failure::new(format!(
            "the first run claims a spare: {first}"
        )));
    }
    let second = run("two")?;
    if spare_used(&second) != Some(true.into()) {
        return Err(Failure::new(format!(
            "the second run booted cold: {second}"
        )));
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let spares = ctx.work_file("run").join(format!("mvm-spares-{uid}"));
    let left: Vec<std::path::PathBuf> = std::fs::read_dir(&spares)
        .map_err(|e| Failure::new(format!("{}: {e}", spares.display())))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let [next] = left.as_slice() else {
        return Err(Failure::new(format!(
            "expected one spare left (the next run's), found {left:?}"
        )));
    };
    let name = next
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    if name.starts_with("c.") {
        return Err(Failure::new(format!("a claimed spare was left: {name}")));
    }
    // Only the next spare's QEMU runs (it may still be booting).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let keeper = loop {
        let pid = std::fs::read_to_string(next.join("keeper"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            break pid;
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::new(format!("{name}: no keeper pid")));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let all = qemus_naming(&spares.display().to_string());
    let mine = qemus_naming(&name);
    // SAFETY: signalling the keeper this case's runs started.
    unsafe { libc::kill(keeper, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !qemus_naming(&name).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after = qemus_naming(&name);
    if mine.len() != 1 || all.len() != 1 || !after.is_empty() {
        return Err(Failure::new(format!(
            "QEMU processes: of spares {all:?}, of the next spare {mine:?}, after its keeper was stopped {after:?}"
        )));
    }
    Ok(())
}

fn json(ctx: &Context) -> CaseResult {
    let tier = chosen_tier(ctx)?;
    let out = output(mvm(
        ctx,
        "run",
        &["--json", "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"],
    )?)?;
    expect_code(&out, 3)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json output is not one JSON object: {e}"))
            .with_detail(describe(&out))
    })?;
    let field = |name: &str| value.get(name).cloned().unwrap_or(serde_json::Value::Null);
    let checks = [
        ("stdout", field("stdout") == "hi\n"),
        ("stderr", field("stderr") == "oops\n"),
        ("exit_status", field("exit_status") == 3),
        ("tier", field("tier") == tier.as_str()),
    ];
    for (name, ok) in checks {
        if !ok {
            return Err(Failure::new(format!(
                "--json field {name} is {}, (tier expected {tier})",
                field(name)
            ))
            .with_detail(describe(&out)));
        }
    }
    Ok(())
}

/// The SDK's example program (`runtime/examples/run.rs`, built by `scripts/e2e` as
/// `sdk-run`), a program of its own that embeds mvm: it runs a command on this host's
/// tier, gets its output and exit code back, and the run is admitted and audited like
/// `mvm run`'s.
fn sdk_example(ctx: &Context) -> CaseResult {
    let data = image_store(ctx)?;
    let config = ctx.work_file("config");
    let run_dir = ctx.work_file("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Failure::new(format!("{e}")))?;
    let tier = chosen_tier(ctx)?;
    let exited = || {
        std::fs::read_to_string(data.join("audit.jsonl"))
            .unwrap_or_default()
            .matches("\"exec_exited\"")
            .count()
    };
    let before = exited();
    let mut command = Command::new(ctx.artifact("sdk-run")?);
    command
        .env("MVM_DATA_DIR", &data)
        .env("MVM_CONFIG_DIR", &config)
        .env("MVM_VMM", ctx.artifact(crate::case::VMM)?)
        .env("MVM_RUN_DIR", &run_dir)
        .args(["sh", "-c", "echo from the sdk; echo to stderr >&2; exit 5"])
        .stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, 5)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("run: exit code 5 on the {tier} tier");
    if out.stdout != b"from the sdk\n" || !stderr.contains("to stderr") || !stderr.contains(&want) {
        return Err(Failure::new(format!(
            "the SDK example's output (want stdout 'from the sdk', stderr with '{want}')"
        ))
        .with_detail(describe(&out)));
    }
    if exited() != before + 1 {
        return Err(Failure::new(
            "the SDK's run did not add one exec_exited to the audit log",
        ));
    }
    Ok(())
}

/// `mvm bench --runs 2 --json`: two admitted runs on this host's tier, and for each phase
/// (the VMM's boot report and the runtime's timings) both runs' figures and their
/// minimum, median and p95, ordered as such.
fn bench(ctx: &Context) -> CaseResult {
    let tier = chosen_tier(ctx)?;
    let out = output(mvm(ctx, "bench", &["--runs", "2", "--json"])?)?;
    expect_code(&out, 0)?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("mvm bench --json is not JSON: {e}")).with_detail(describe(&out))
    })?;
    let get = |v: &serde_json::Value, key: &str| v.get(key).cloned().unwrap_or_default();
    if get(&report, "tier") != tier.as_str() || get(&report, "runs") != 2 {
        return Err(Failure::new(format!("bench report: {report}")));
    }
    let phases = get(&report, "phases")
        .as_array()
        .cloned()
        .unwrap_or_default();
    for want in [
        "vmm: start -> first KVM_RUN",
        "VM start -> agent ready",
        "whole run (admission to exit)",
    ] {
        let phase = phases
            .iter()
            .find(|p| get(p, "phase") == want)
            .ok_or_else(|| Failure::new(format!("bench report has no {want:?}: {report}")))?;
        let n = get(phase, "runs_ms").as_array().map_or(0, Vec::len);
        let ms = |key| get(phase, key).as_f64().unwrap_or(-1.0);
        let (min, median, p95) = (ms("min_ms"), ms("median_ms"), ms("p95_ms"));
        if n != 2 || !(0.0 < min && min <= median && median <= p95) {
            return Err(Failure::new(format!("bench phase {want:?}: {phase}")));
        }
    }
    Ok(())
}
