//! `run/*`: the whole journey through `mvm run --backend kvm` (issue 4):
//! output on the right streams, exit status, stdin, timeout, bulk output
//! that streams, and nothing left behind after many runs.
//!
//! Artifacts these cases need beside `mvm-vmm` (scripts/e2e provides them):
//! a static `mvm`, and an image store `mvm-data/` holding the `default`
//! image (`MVM_DATA_DIR=$art/mvm-data mvm image build --kernel vmlinux
//! --agent mvm-agent`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::case::{tail, Case, CaseResult, Context, Failure, VMM};

/// The run cases.
pub const CASES: &[Case] = &[
    Case::kvm("run/exit-and-streams", exit_and_streams),
    Case::kvm("run/stdin", stdin),
    Case::kvm("run/json", json),
    Case::kvm("run/timeout", timeout),
    Case::kvm("run/bulk-stdout-streams", bulk_stdout_streams),
    Case::kvm("run/sequential-64", sequential_64),
];

/// The `mvm` binary among the artifacts.
const MVM: &str = "mvm";
/// The image store among the artifacts.
const DATA_DIR: &str = "mvm-data";
/// `mvm run`'s exit code for `--timeout` (runtime/src/cli/exit.rs).
const EXIT_TIMEOUT: i32 = 124;
/// Bytes of the bulk-output case.
const BULK_BYTES: u64 = 64 << 20;

/// `mvm run --backend kvm` with the artifacts' VMM and image store, and its
/// run directories and host keys (created on first use) under this case's work
/// directory. The audit log and the replay store go to the image store's data
/// directory.
fn mvm(ctx: &Context, args: &[&str]) -> Result<Command, Failure> {
    let data = image_store(ctx)?;
    let mut command = mvm_with(ctx, &data, &ctx.work_file("config"))?;
    command
        .arg("run")
        .args(["--backend", "kvm"])
        .args(args)
        .stdin(Stdio::null());
    Ok(command)
}

/// `mvm` (any subcommand) with `data` as its data directory (images, audit log,
/// replay store), `config` as its config directory (keys, policy), the
/// artifacts' VMM, and run directories under the case's work directory.
pub fn mvm_with(ctx: &Context, data: &Path, config: &Path) -> Result<Command, Failure> {
    let run_dir = ctx.work_file("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Failure::new(format!("{e}")))?;
    let mut command = Command::new(ctx.artifact(MVM)?);
    command
        .env("MVM_DATA_DIR", data)
        .env("MVM_CONFIG_DIR", config)
        .env("MVM_VMM", ctx.artifact(VMM)?)
        .env("MVM_RUN_DIR", &run_dir);
    Ok(command)
}

/// The artifacts' image store, or a failure saying scripts/e2e builds it.
pub fn image_store(ctx: &Context) -> Result<PathBuf, Failure> {
    let data = ctx.artifacts.join(DATA_DIR);
    if data.is_dir() {
        Ok(data)
    } else {
        Err(Failure::new(format!(
            "artifact {} missing (scripts/e2e builds it)",
            data.display()
        )))
    }
}

pub fn output(mut command: Command) -> Result<Output, Failure> {
    command
        .output()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))
}

pub fn describe(out: &Output) -> String {
    format!(
        "{}{}",
        tail("stdout", &String::from_utf8_lossy(&out.stdout), 10),
        tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)
    )
}

pub fn expect_code(out: &Output, want: i32) -> CaseResult {
    match out.status.code() {
        Some(code) if code == want => Ok(()),
        other => Err(
            Failure::new(format!("mvm run exited {other:?}, expected {want}"))
                .with_detail(describe(out)),
        ),
    }
}

/// Run directories left in `dir` (each run's sockets and logs).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `out` on stdout, `err` on stderr, exit 7.
fn exit_and_streams(ctx: &Context) -> CaseResult {
    let out = output(mvm(
        ctx,
        &["--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    )?)?;
    expect_code(&out, 7)?;
    if out.stdout != b"out\n" {
        return Err(Failure::new(format!(
            "stdout {:?}, expected \"out\\n\"",
            String::from_utf8_lossy(&out.stdout)
        ))
        .with_detail(describe(&out)));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.lines().any(|l| l == "err") {
        return Err(Failure::new("stderr has no line \"err\"").with_detail(describe(&out)));
    }
    Ok(())
}

/// Piped stdin reaches the command.
fn stdin(ctx: &Context) -> CaseResult {
    let mut command = mvm(ctx, &["--", "sh", "-c", "cat; echo end"])?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let payload: Vec<u8> = (0..100_000u32)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(&payload)
            .map_err(|e| Failure::new(format!("writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 0)?;
    let mut want = payload;
    want.extend_from_slice(b"end\n");
    if out.stdout != want {
        return Err(Failure::new(format!(
            "stdout is {} bytes, expected the {} stdin bytes then \"end\"",
            out.stdout.len(),
            want.len()
        ))
        .with_detail(tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)));
    }
    Ok(())
}

/// `--json`: one object with the output, the status and timings.
fn json(ctx: &Context) -> CaseResult {
    let out = output(mvm(ctx, &["--json", "--", "sh", "-c", "echo hi; exit 3"])?)?;
    expect_code(&out, 3)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json printed no JSON object: {e}")).with_detail(describe(&out))
    })?;
    let checks = [
        (
            value.pointer("/stdout") == Some(&"hi\n".into()),
            "stdout \"hi\\n\"",
        ),
        (
            value.pointer("/exit_status") == Some(&3.into()),
            "exit_status 3",
        ),
        (value.pointer("/tier") == Some(&"kvm".into()), "tier kvm"),
        (
            value
                .pointer("/timings/boot_ms")
                .is_some_and(|v| v.is_u64()),
            "timings.boot_ms",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(Failure::new(format!("--json object lacks {what}: {value}")));
        }
    }
    Ok(())
}

/// `--timeout 2 -- sleep 60` ends in about 2 s of workload time with 124.
fn timeout(ctx: &Context) -> CaseResult {
    let start = Instant::now();
    let out = output(mvm(
        ctx,
        &["--json", "--timeout", "2", "--", "sleep", "60"],
    )?)?;
    let wall = start.elapsed();
    expect_code(&out, EXIT_TIMEOUT)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(format!("--json: {e}")).with_detail(describe(&out)))?;
    let exec_ms = value
        .pointer("/timings/exec_ms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(u64::MAX);
    if !(1900..=5000).contains(&exec_ms) {
        return Err(Failure::new(format!(
            "the workload ran {exec_ms} ms under --timeout 2 (wall {wall:?})"
        )));
    }
    if value.pointer("/timed_out") != Some(&true.into()) {
        return Err(Failure::new(format!("timed_out is not true: {value}")));
    }
    Ok(())
}

/// 64 MiB on stdout arrives intact, and the first bytes come before the end.
fn bulk_stdout_streams(ctx: &Context) -> CaseResult {
    let script = format!("head -c {BULK_BYTES} /dev/zero | tr '\\0' 'x'; sleep 2; echo tail");
    let mut command = mvm(ctx, &["--", "sh", "-c", &script])?;
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child: Child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Failure::new("no stdout pipe"))?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut first_at = None;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdout
            .read(&mut buf)
            .map_err(|e| Failure::new(format!("reading stdout: {e}")))?;
        if n == 0 {
            break;
        }
        first_at.get_or_insert_with(Instant::now);
        hash.update(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(u64::try_from(n).unwrap_or(0));
    }
    let eof_at = Instant::now();
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 0)?;
    let mut want = Sha256::new();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..(BULK_BYTES >> 20) {
        want.update(&chunk);
    }
    want.update(b"tail\n");
    let (got, want) = (hex::encode(hash.finalize()), hex::encode(want.finalize()));
    if got != want {
        return Err(Failure::new(format!(
            "stdout ({total} bytes) sha256 {got}, expected {want}"
        )));
    }
    // The command sleeps 2 s after the bulk: streamed output was seen first.
    let lead = first_at
        .map(|t| eof_at.duration_since(t))
        .unwrap_or_default();
    if lead < Duration::from_secs(2) {
        return Err(Failure::new(format!(
            "the first stdout bytes came only {lead:?} before the end: output is not streamed"
        )));
    }
    Ok(())
}

/// 64 runs one after another all succeed and leave no run directory behind.
fn sequential_64(ctx: &Context) -> CaseResult {
    for i in 0..64 {
        let out = output(mvm(ctx, &["--", "true"])?)?;
        expect_code(&out, 0)
            .map_err(|f| Failure::new(format!("run {i}: {}", f.reason)).with_detail(f.detail))?;
    }
    let left = leftovers(&ctx.work_file("run"));
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "run directories left behind: {left:?}"
        )));
    }
    let vmms = Command::new("pgrep")
        .args(["-x", VMM])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if !vmms.is_empty() {
        return Err(Failure::new(format!("mvm-vmm processes left: {vmms}")));
    }
    Ok(())
}
