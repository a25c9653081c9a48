//! `container/*`: the container tier (`mvm run --backend container`) on this machine,
//! through the installed-style `mvm` of the artifacts: no VM, the image's tree in
//! namespaces under a seccomp filter (docs/backends.md). These cases need root (the
//! tier does, in this version) and run on the user's machine, not in the test host.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code, image_store, mvm_with, output};
use crate::cases::sandbox::ok;
use crate::cases::secret::copy_default_image;
use crate::cases::tier::mvm;

/// The cases: each run starts a container (well under a second) and its checks.
pub const CASES: &[Case] = &[
    Case::user_host("container/refused-by-default", refused_by_default).limit_secs(120),
    Case::user_host("container/run", run).limit_secs(180),
    Case::user_host("container/escapes", escapes).limit_secs(180),
    Case::user_host("container/sandbox", sandbox).limit_secs(180),
    Case::user_host("container/tampered", tampered).limit_secs(120),
];

/// `mvm run`'s exit code when the policy refuses the plan.
const DENIED: i32 = 119;
/// `mvm run`'s exit code when the start is refused (a measurement differs).
const BOOT_REFUSED: i32 = 118;
/// The first host uid the container's users map onto (`backend::container::UID_BASE`).
const UID_BASE: u32 = 0x5d00_0000;

fn need_root() -> CaseResult {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::new(
            "the container tier needs root in this version: run scripts/e2e as root",
        ));
    }
    Ok(())
}

/// The case's policy: the default, with the container tier allowed.
fn allow_container(ctx: &Context) -> CaseResult {
    let config = ctx.work_file("config");
    std::fs::create_dir_all(&config).map_err(|e| Failure::new(format!("{e}")))?;
    std::fs::write(
        config.join("policy.toml"),
        "[tier]\nminimum = \"container\"\n",
    )
    .map_err(|e| Failure::new(format!("writing the policy: {e}")))
}

/// The audit log's lines after the first `from`.
fn audit_after(ctx: &Context, from: usize) -> Result<Vec<String>, Failure> {
    let log = image_store(ctx)?.join("audit.jsonl");
    Ok(std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .skip(from)
        .map(str::to_owned)
        .collect())
}

/// Processes of this host running as a container's user (they outlived the run).
fn container_processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                })
                .is_some_and(|uid| uid >= UID_BASE)
        })
        .collect()
}

/// The default policy's minimum tier is `emulated`: a container run is refused before
/// anything starts (exit 119), naming the rule.
fn refused_by_default(ctx: &Context) -> CaseResult {
    need_root()?;
    let out = output(mvm(ctx, "run", &["--backend", "container", "--", "true"])?)?;
    expect_code(&out, DENIED)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("tier") {
        return Err(
            Failure::new("the refusal does not name the tier rule").with_detail(describe(&out))
        );
    }
    Ok(())
}

/// With the policy allowing it: a command's output, exit code and `--json` (tier
/// `container`), the workload as uid 1000 on host `mvm`, stdin piped through, the
/// start audited as `boot_verified` with the tier, and nothing left running.
fn run(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let before = audit_after(ctx, 0)?.len();
    let script = "echo hi; echo oops >&2; id -u; hostname; cat; exit 3";
    let mut command = mvm(
        ctx,
        "run",
        &["--backend", "container", "--json", "--", "sh", "-c", script],
    )?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(b"piped in\n")
            .map_err(|e| Failure::new(format!("writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 3)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json output is not JSON: {e}")).with_detail(describe(&out))
    })?;
    let field = |name: &str| value.get(name).cloned().unwrap_or_default();
    if field("stdout") != "hi\n1000\nmvm\npiped in\n"
        || field("stderr") != "oops\n"
        || field("tier") != "container"
    {
        return Err(Failure::new(format!("unexpected result: {value}")));
    }
    let records = audit_after(ctx, before)?;
    let verified = records
        .iter()
        .any(|r| r.contains("\"boot_verified\"") && r.contains("\"tier\":\"container\""));
    if !verified {
        return Err(Failure::new(format!(
            "no boot_verified with the container tier among the run's records: {records:?}"
        )));
    }
    let left = container_processes();
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the container's users left running: {left:?}"
        )));
    }
    Ok(())
}

/// `mvm-escape-probe` piped in and run as the workload: mounts, new namespaces, ptrace
/// of the agent (PID 1), kernel modules, kexec, bpf, userfaultfd, keyrings, a
/// `/proc/sys` write, swapon and perf events each fail; this host's hostname is
/// unchanged.
fn escapes(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let probe = std::fs::File::open(ctx.artifact("mvm-escape-probe")?)
        .map_err(|e| Failure::new(format!("the probe: {e}")))?;
    let mut command: Command = mvm(
        ctx,
        "run",
        &[
            "--backend",
            "container",
            "--",
            "sh",
            "-c",
            "cat > /tmp/probe && chmod 755 /tmp/probe && /tmp/probe",
        ],
    )?;
    command.stdin(probe);
    let out = output(command)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let allowed: Vec<&&str> = lines.iter().filter(|l| !l.contains(" denied ")).collect();
    if lines.len() < 14 || !allowed.is_empty() {
        return Err(
            Failure::new(format!("{} attempts, not denied: {allowed:?}", lines.len()))
                .with_detail(describe(&out)),
        );
    }
    let after = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if after != hostname {
        return Err(Failure::new(format!(
            "this host's hostname changed: {hostname:?} -> {after:?}"
        )));
    }
    Ok(())
}

/// A sandbox on the container tier: created, a command run in it as uid 1000 in
/// `/work`, a file copied in and read back, stopped; nothing of the container's users
/// left running.
fn sandbox(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let created = ok(ctx, &["create", "--backend", "container"])?;
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let result = (|| {
        let out = ok(ctx, &["exec", &id, "--", "sh", "-c", "echo in; pwd; id -u"])?;
        if out.stdout != b"in\n/work\n1000\n" {
            return Err(Failure::new("exec printed something else").with_detail(describe(&out)));
        }
        let file = ctx.work_file("copied.txt");
        std::fs::write(&file, b"copied in\n").map_err(|e| Failure::new(format!("{e}")))?;
        let to = format!("{id}:/work/copied.txt");
        ok(ctx, &["cp", &file.display().to_string(), &to])?;
        let out = ok(ctx, &["exec", &id, "--", "cat", "/work/copied.txt"])?;
        if out.stdout != b"copied in\n" {
            return Err(
                Failure::new("the copied file reads back otherwise").with_detail(describe(&out))
            );
        }
        Ok(())
    })();
    let stopped = ok(ctx, &["stop", &id]);
    result?;
    stopped?;
    let left = container_processes();
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the container's users left running: {left:?}"
        )));
    }
    Ok(())
}

/// One byte of the image's initramfs changed after it was built (in a store of the
/// case's own): the container does not start (exit 118), the refusal names the
/// initramfs, and the audit log has `boot_refused` and no `exec_started`.
fn tampered(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let data = ctx.work_file("data");
    copy_default_image(&image_store(ctx)?.join("images"), &data.join("images"))?;
    let mut command = mvm_with(ctx, &data, &ctx.work_file("config"))?;
    command
        .args(["run", "--backend", "container", "--", "echo", "ran"])
        .stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, BOOT_REFUSED)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("initramfs") || !out.stdout.is_empty() {
        return Err(
            Failure::new("the refusal does not name the initramfs, or the workload ran")
                .with_detail(describe(&out)),
        );
    }
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap_or_default();
    if !audit.contains("\"boot_refused\"") || audit.contains("\"exec_started\"") {
        return Err(Failure::new(format!(
            "the audit log should hold boot_refused and no exec_started: {audit}"
        )));
    }
    Ok(())
}
