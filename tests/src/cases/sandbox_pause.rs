//! `sandbox/pause-resume`: a sandbox on a real KVM paused in the middle of a process
//! that counts, and resumed: the count goes on, a file written before the pause is
//! there after it, the guest knows its id (the resume's reseed), and the audit log
//! holds the pause and the admitted restore. Then a fork: two sandboxes from one
//! instant, with different `/dev/urandom` bytes and their own ids, each going on by
//! itself. Then the rollback case: an older sealed snapshot put back in place of the
//! latest is refused, with a record.

use serde_json::Value;

use super::sandbox;
use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, image_store, mvm_with};

/// The cases.
pub const CASES: &[Case] = &[
    Case::kvm("sandbox/pause-resume", pause_resume).limit_secs(600),
    Case::kvm("bench/restore", bench_restore).limit_secs(600),
];

/// A counter in the background of the sandbox: one more in `/work/count` every 200 ms.
const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /work/count.tmp; mv /work/count.tmp /work/count; sleep 0.2; done";

/// `mvm sandbox ARGS`, wanting exit 0: its stdout, trimmed.
fn ok(ctx: &Context, args: &[&str]) -> Result<String, Failure> {
    let out = sandbox::ok(ctx, args)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The count the guest's counter last wrote.
fn count(ctx: &Context, id: &str) -> Result<u64, Failure> {
    let text = ok(ctx, &["exec", id, "--", "cat", "/work/count"])?;
    text.parse()
        .map_err(|_| Failure::new(format!("/work/count holds {text:?}")))
}

/// Waits until the count passes `above`.
fn count_past(ctx: &Context, id: &str, above: u64) -> Result<u64, Failure> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = count(ctx, id)?;
        if n > above {
            return Ok(n);
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::new(format!("the count stayed at {n}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

fn field<'a>(record: &'a Value, key: &str) -> Option<&'a Value> {
    record.get("fields").and_then(|f| f.get(key))
}

fn status(ctx: &Context, id: &str) -> Result<String, Failure> {
    let all = sandbox::list(ctx)?;
    all.iter()
        .find(|i| sandbox::field(i, "id") == id)
        .map(|i| sandbox::field(i, "status"))
        .ok_or_else(|| Failure::new(format!("{id} is not in mvm sandbox ls")))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> CaseResult {
    let fail = |e: std::io::Error| Failure::new(format!("copying {}: {e}", from.display()));
    std::fs::create_dir(to).map_err(fail)?;
    for entry in std::fs::read_dir(from).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(fail)?;
    }
    Ok(())
}

fn pause_resume(ctx: &Context) -> CaseResult {
    let result = pause_resume_inner(ctx);
    // Whatever happened: no sandbox left running.
    for info in sandbox::list(ctx).unwrap_or_default() {
        let _ = sandbox::run(ctx, &["rm", "--force", &sandbox::field(&info, "id")]);
    }
    result
}

fn pause_resume_inner(ctx: &Context) -> CaseResult {
    let id = ok(ctx, &["create", "--backend", "kvm", "--ttl", "20m"])?;
    ok(
        ctx,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo written-before-the-pause > /work/before",
        ],
    )?;
    ok(
        ctx,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            &format!("({COUNTER}) >/dev/null 2>&1 &"),
        ],
    )?;
    let before = count_past(ctx, &id, 3)?;

    // Paused: nothing runs, exec says so, and the audit log has the pause.
    let paused = ok(ctx, &["pause", &id])?;
    if paused != format!("{id} paused") || status(ctx, &id)? != "paused" {
        return Err(Failure::new(format!("pause printed {paused:?}")));
    }
    sandbox::refused(ctx, &["exec", &id, "--", "true"], "is paused")?;
    sandbox::refused(ctx, &["pause", &id], "is paused")?;
    let snapshot = ctx
        .work_file("run")
        .join(format!("mvm-sandboxes-{}", nix::unistd::getuid()))
        .join(&id)
        .join("snapshot");
    if !snapshot.join("snapshot.dsse.json").is_file() || !snapshot.join("plan.dsse.json").is_file()
    {
        return Err(Failure::new(format!(
            "no sealed snapshot with its plan in {}",
            snapshot.display()
        )));
    }
    let stopping = sandbox::audit_records(ctx, "session_stopping")?;
    if !stopping
        .iter()
        .any(|r| field(r, "reason").and_then(Value::as_str) == Some("pause"))
    {
        return Err(Failure::new("no session_stopping record with reason pause"));
    }
    let first = ctx.work_file("snapshot-epoch-1");
    copy_dir(&snapshot, &first)?;

    // Two resumes at once: one resumes it, the other is refused (the sandbox's lock, or
    // the first one's `starting`/`ready`).
    let two: Vec<_> = (0..2)
        .map(|_| {
            let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
            command
                .args(["sandbox", "resume", &id])
                .stdin(std::process::Stdio::null());
            command
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| Failure::new(format!("starting mvm: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let outs: Vec<std::process::Output> = two
        .into_iter()
        .map(|c| c.wait_with_output())
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    let won: Vec<&std::process::Output> = outs.iter().filter(|o| o.status.success()).collect();
    let [winner] = won.as_slice() else {
        return Err(
            Failure::new(format!("{} of two concurrent resumes succeeded", won.len()))
                .with_detail(outs.iter().map(describe).collect::<Vec<_>>().join("\n")),
        );
    };
    let resumed = String::from_utf8_lossy(&winner.stdout).trim().to_owned();
    if resumed != format!("{id} ready") {
        return Err(Failure::new(format!("resume printed {resumed:?}")));
    }
    let after = count_past(ctx, &id, before)?;
    let file = ok(ctx, &["exec", &id, "--", "cat", "/work/before"])?;
    let own = ok(ctx, &["exec", &id, "--", "cat", "/run/mvm/sandbox-id"])?;
    if file != "written-before-the-pause" || own != id {
        return Err(Failure::new(format!(
            "after the resume: /work/before {file:?}, sandbox id {own:?}"
        )));
    }
    let restored = sandbox::audit_records(ctx, "snapshot_restored")?;
    let readmitted = sandbox::audit_records(ctx, "plan_admitted")?
        .into_iter()
        .filter(|r| field(r, "restore") == Some(&Value::Bool(true)))
        .count();
    if restored.is_empty() || readmitted == 0 {
        return Err(Failure::new(format!(
            "after the resume: {} snapshot_restored, {readmitted} plan_admitted with restore",
            restored.len()
        )));
    }
    sandbox::refused(ctx, &["resume", &id], "only a paused sandbox resumes")?;

    // Forked: two sandboxes from one instant, each with its own randomness and id, each
    // going on by itself.
    let restored_before = restored.len();
    let fork = ok(ctx, &["fork", &id])?;
    if !fork.starts_with("sb-") || fork == id {
        return Err(Failure::new(format!("fork printed {fork:?}")));
    }
    // Both restores found the shared memory file as it was sealed again at the fork,
    // after its links: neither hashed it.
    let checks: Vec<String> = sandbox::audit_records(ctx, "snapshot_restored")?
        .iter()
        .skip(restored_before)
        .map(|r| {
            field(r, "memory_check")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned()
        })
        .collect();
    if checks != ["unchanged", "unchanged"] {
        return Err(Failure::new(format!(
            "the fork's two restores checked the memory file as {checks:?}, not [\"unchanged\", \"unchanged\"]"
        )));
    }
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let mut seen = Vec::new();
    for sb in [&id, &fork] {
        let own = ok(ctx, &["exec", sb, "--", "cat", "/run/mvm/sandbox-id"])?;
        let file = ok(ctx, &["exec", sb, "--", "cat", "/work/before"])?;
        let bytes = ok(ctx, &["exec", sb, "--", "sh", "-c", random])?;
        if own != *sb || file != "written-before-the-pause" || bytes.len() != 64 {
            return Err(Failure::new(format!(
                "{sb} after the fork: id {own:?}, /work/before {file:?}, urandom {bytes:?}"
            )));
        }
        seen.push(bytes);
    }
    if seen.first() == seen.get(1) {
        return Err(Failure::new(format!(
            "the source and its fork read the same bytes from /dev/urandom: {seen:?}"
        )));
    }
    let at_fork = count(ctx, &fork)?;
    count_past(ctx, &fork, at_fork)?;
    ok(
        ctx,
        &[
            "exec",
            &fork,
            "--",
            "sh",
            "-c",
            "echo fork-only > /work/mine",
        ],
    )?;
    // Not in the source: cat fails there, saying so.
    sandbox::refused(
        ctx,
        &["exec", &id, "--", "cat", "/work/mine"],
        "No such file",
    )
    .map_err(|_| Failure::new("a file written in the fork is in the source"))?;
    ok(ctx, &["rm", "--force", &fork])?;

    // Paused again (a later epoch); the first snapshot put back is a rollback, refused.
    ok(ctx, &["pause", &id])?;
    std::fs::remove_dir_all(&snapshot)
        .map_err(|e| Failure::new(format!("removing the snapshot: {e}")))?;
    copy_dir(&first, &snapshot)?;
    sandbox::refused(ctx, &["resume", &id], "rollback")?;
    let refusals = sandbox::audit_records(ctx, "boot_refused")?;
    if !refusals
        .iter()
        .any(|r| field(r, "reason").and_then(Value::as_str) == Some("rollback"))
    {
        return Err(Failure::new("no boot_refused record with reason rollback"));
    }
    println!(
        "    pause| counted to {before}, paused, resumed, counted on to {after}; forked: both restores found the memory file unchanged, different urandom, own ids; the epoch-1 snapshot put back was refused (rollback)"
    );
    Ok(())
}

/// `mvm bench --restore --json`: cold runs and restores of the default image, every
/// restore row there with one value per run, in order (min, median, p95), and the VMM's
/// memory split into guest RAM and its own.
fn bench_restore(ctx: &Context) -> CaseResult {
    let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    command
        .args([
            "bench",
            "--runs",
            "2",
            "--restore",
            "--backend",
            "kvm",
            "--json",
        ])
        .stdin(std::process::Stdio::null());
    let out = crate::cases::run::output(command)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let detail = || describe(&out);
    if !out.status.success() {
        return Err(
            Failure::new(format!("mvm bench exited {:?}", out.status.code())).with_detail(detail()),
        );
    }
    let report: Value = serde_json::from_str(text.trim())
        .map_err(|e| Failure::new(format!("bench --json: {e}")).with_detail(detail()))?;
    let phases = report
        .get("phases")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut shown = Vec::new();
    for want in [
        "restore: resume -> agent ready",
        "restore: exec (new connection)",
        "restore: pause -> sealed snapshot",
        "whole run (admission to exit)",
    ] {
        let phase = phases
            .iter()
            .find(|p| p.get("phase").and_then(Value::as_str) == Some(want))
            .ok_or_else(|| Failure::new(format!("no phase {want:?}")).with_detail(detail()))?;
        let number = |k: &str| phase.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let runs = phase
            .get("runs_ms")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let (min, median, p95) = (number("min_ms"), number("median_ms"), number("p95_ms"));
        if runs != 2 || !(min > 0.0 && min <= median && median <= p95) {
            return Err(Failure::new(format!("phase {want:?}: {phase}")).with_detail(detail()));
        }
        shown.push(format!("{want} {median:.0} ms"));
    }
    // The VMM's memory, read from outside before each VM stopped.
    let median = |key: &str| {
        report
            .get("vmm_memory")
            .and_then(|m| m.get(key))
            .and_then(|v| v.get("median"))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let (rss, guest, overhead) = (
        median("rss_kib"),
        median("guest_rss_kib"),
        median("overhead_kib"),
    );
    if !(guest > 0.0 && overhead > 0.0 && (rss - guest - overhead).abs() < 1.0) {
        return Err(Failure::new(format!(
            "vmm_memory: rss {rss}, guest {guest}, overhead {overhead}"
        ))
        .with_detail(detail()));
    }
    shown.push(format!(
        "VMM resident {:.1} MiB of which guest {:.1} MiB, overhead {:.1} MiB",
        rss / 1024.0,
        guest / 1024.0,
        overhead / 1024.0
    ));
    // The bench's sandbox is gone.
    if !sandbox::list(ctx)?.is_empty() {
        return Err(Failure::new("mvm bench left a sandbox behind"));
    }
    println!("    bench| medians (TCG): {}", shown.join("; "));
    Ok(())
}
