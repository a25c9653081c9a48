//! `run/warm-start`: `mvm run` from the image's warm snapshot on a real KVM, the
//! policy allowing it. The first run boots and leaves the sealed snapshot (taken once
//! its agent answered, while the VM went on to run the command); the next runs restore
//! from it, each admitted with its own plan, each reseeded (different `/dev/urandom`
//! bytes, its own id), with `snapshot_restored` in the audit log where a boot has
//! `boot_verified`; `--cold` boots.

use serde_json::Value;

use crate::case::{CaseResult, Context, Failure};
use crate::cases::run::{describe, image_store, mvm_with, output};

/// Reads 32 random bytes and the sandbox id the reseed wrote.
const PROBE: &str = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /run/mvm/sandbox-id 2>/dev/null || echo booted";

/// One `mvm run --backend BACKEND --json` of [`PROBE`] with the case's policy; its JSON.
fn run(ctx: &Context, backend: &str, extra: &[&str]) -> Result<Value, Failure> {
    let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    command
        .args(["run", "--backend", backend, "--json"])
        .args(extra)
        .args(["--", "sh", "-c", PROBE])
        .stdin(std::process::Stdio::null());
    let out = output(command)?;
    if !out.status.success() {
        return Err(
            Failure::new(format!("mvm run {extra:?} exited {:?}", out.status.code()))
                .with_detail(describe(&out)),
        );
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(format!("--json: {e}")).with_detail(describe(&out)))
}

/// Whether the run started warm.
pub(crate) fn warm(v: &Value) -> bool {
    v.pointer("/timings/warm_start") == Some(&Value::Bool(true))
}

pub(crate) fn text(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The audit log's records for `plan`.
pub(crate) fn records_of(ctx: &Context, plan: &str) -> Result<Vec<Value>, Failure> {
    let log = image_store(ctx)?.join("audit.jsonl");
    let all = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(all
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| text(r, "/plan_id") == plan)
        .collect())
}

/// The audit log's event kinds for `plan`.
fn events_of(ctx: &Context, plan: &str) -> Result<Vec<String>, Failure> {
    Ok(records_of(ctx, plan)?
        .iter()
        .map(|r| text(r, "/event"))
        .collect())
}

/// How the restore under `plan` checked the memory file (`snapshot_restored`'s
/// `memory_check`).
fn memory_check(ctx: &Context, plan: &str) -> Result<String, Failure> {
    Ok(records_of(ctx, plan)?
        .iter()
        .find(|r| text(r, "/event") == "snapshot_restored")
        .map(|r| text(r, "/fields/memory_check"))
        .unwrap_or_default())
}

/// Writes the case's policy: warm starts allowed.
pub(crate) fn allow_warm_starts(ctx: &Context) -> Result<(), Failure> {
    let config = ctx.work_file("config");
    std::fs::create_dir_all(&config).map_err(|e| Failure::new(format!("config: {e}")))?;
    std::fs::write(
        config.join("policy.toml"),
        "[snapshots]\nwarm_start = true\n",
    )
    .map_err(|e| Failure::new(format!("policy: {e}")))
}

/// The four runs of [`warm_then_cold`].
pub(crate) struct WarmRuns {
    pub first: Value,
    pub a: Value,
    pub b: Value,
    pub cold: Value,
}

/// On `backend`: a first run that boots and leaves one sealed snapshot (`kept` counts
/// them), two warm starts that read different `/dev/urandom` bytes and know their own
/// plan ids, with `plan_admitted` first and `snapshot_restored` and no `boot_verified`
/// in their records, and a `--cold` run that boots.
pub(crate) fn warm_then_cold(
    ctx: &Context,
    backend: &str,
    kept: &dyn Fn() -> usize,
) -> Result<WarmRuns, Failure> {
    let first = run(ctx, backend, &[])?;
    let kept = kept();
    if warm(&first) || kept != 1 {
        return Err(Failure::new(format!(
            "the first run: warm {}, {kept} sealed warm snapshot(s) kept",
            warm(&first)
        )));
    }
    let a = run(ctx, backend, &[])?;
    let b = run(ctx, backend, &[])?;
    let cold = run(ctx, backend, &["--cold"])?;
    if !warm(&a) || !warm(&b) || warm(&cold) {
        return Err(Failure::new(format!(
            "warm starts: {} {} and --cold {}",
            warm(&a),
            warm(&b),
            warm(&cold)
        )));
    }
    let lines =
        |v: &Value| -> Vec<String> { text(v, "/stdout").lines().map(str::to_owned).collect() };
    let (la, lb) = (lines(&a), lines(&b));
    let (pa, pb) = (text(&a, "/plan_id"), text(&b, "/plan_id"));
    if la.first() == lb.first()
        || la.first().map_or(0, String::len) != 64
        || la.get(1) != Some(&pa)
        || lb.get(1) != Some(&pb)
        || pa == pb
    {
        return Err(Failure::new(format!(
            "two warm starts said {la:?} ({pa}) and {lb:?} ({pb})"
        )));
    }
    for (plan, want, not) in [
        (&pa, "snapshot_restored", "boot_verified"),
        (&pb, "snapshot_restored", "boot_verified"),
        (
            &text(&cold, "/plan_id"),
            "boot_verified",
            "snapshot_restored",
        ),
    ] {
        let kinds = events_of(ctx, plan)?;
        if !kinds.iter().any(|k| k == want)
            || kinds.iter().any(|k| k == not)
            || kinds.first().map(String::as_str) != Some("plan_admitted")
        {
            return Err(Failure::new(format!("plan {plan}: records {kinds:?}")));
        }
    }
    Ok(WarmRuns { first, a, b, cold })
}

/// Each warm start of `runs` found its memory file as sealed (`memory_check:
/// "unchanged"`), not hashed.
pub(crate) fn memory_unchanged(ctx: &Context, runs: &WarmRuns) -> CaseResult {
    for v in [&runs.a, &runs.b] {
        let plan = text(v, "/plan_id");
        let check = memory_check(ctx, &plan)?;
        if check != "unchanged" {
            return Err(Failure::new(format!(
                "plan {plan}: the warm start's memory check was '{check}', not 'unchanged'"
            )));
        }
    }
    Ok(())
}

/// One run after the kept snapshot was changed: it must have been refused
/// (`boot_refused` naming `memory_mismatch`), and the run booted instead.
pub(crate) fn refused_then_booted(ctx: &Context, backend: &str) -> Result<(), Failure> {
    let tampered = run(ctx, backend, &[])?;
    let records = records_of(ctx, &text(&tampered, "/plan_id"))?;
    let refused = records
        .iter()
        .any(|r| text(r, "/event") == "boot_refused" && r.to_string().contains("memory_mismatch"));
    let booted = records.iter().any(|r| text(r, "/event") == "boot_verified");
    let restored = records
        .iter()
        .any(|r| text(r, "/event") == "snapshot_restored");
    if warm(&tampered) || !refused || !booted || restored {
        let kinds: Vec<String> = records.iter().map(|r| text(r, "/event")).collect();
        return Err(Failure::new(format!(
            "after a byte of the memory changed: warm {}, records {kinds:?}",
            warm(&tampered)
        )));
    }
    Ok(())
}

/// `mvm bench --runs 2 --warm` on `backend`, its warm and cold rows printed, and the
/// runs' own figures.
pub(crate) fn bench_and_print(ctx: &Context, backend: &str, runs: &WarmRuns) -> CaseResult {
    let ms = |v: &Value, key: &str| {
        v.pointer(&format!("/timings/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let mut bench = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    bench
        .args(["bench", "--runs", "2", "--warm", "--backend", backend])
        .stdin(std::process::Stdio::null());
    let out = output(bench)?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !table.contains("warm / cold, whole run") {
        return Err(
            Failure::new(format!("mvm bench --warm --backend {backend}"))
                .with_detail(describe(&out)),
        );
    }
    for line in table.lines().filter(|l| {
        l.contains("warm")
            || l.contains("agent ready")
            || l.contains("whole run")
            || l.contains("test host")
    }) {
        println!("    warm| bench: {}", line.trim());
    }
    let WarmRuns { first, a, b, cold } = runs;
    println!(
        "    warm| total ms: first (boot + snapshot) {}, warm {} and {}, cold {}; VM start to agent: warm {} / {}, cold {}",
        ms(first, "total_ms"),
        ms(a, "total_ms"),
        ms(b, "total_ms"),
        ms(cold, "total_ms"),
        ms(a, "boot_ms"),
        ms(b, "boot_ms"),
        ms(cold, "boot_ms")
    );
    Ok(())
}

/// The one sealed warm snapshot's directory under `root`.
fn warm_dir(root: &std::path::Path) -> Result<std::path::PathBuf, Failure> {
    std::fs::read_dir(root)
        .map_err(|e| Failure::new(format!("{}: {e}", root.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("snapshot.dsse.json").is_file())
        .ok_or_else(|| Failure::new("no sealed warm snapshot"))
}

pub(super) fn warm_start(ctx: &Context) -> CaseResult {
    allow_warm_starts(ctx)?;
    let warm_root = image_store(ctx)?.join("warm");
    let result = (|| {
        let kept = || {
            std::fs::read_dir(&warm_root)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().join("snapshot.dsse.json").is_file())
                        .count()
                })
                .unwrap_or(0)
        };
        let runs = warm_then_cold(ctx, "kvm", &kept)?;
        // The memory file the VMM wrote, untouched: not hashed again.
        memory_unchanged(ctx, &runs)?;
        let phases: Vec<String> = [
            "args_parsed",
            "plan_verified",
            "artifacts_measured",
            "vm_created",
            "first_kvm_run",
            "exit",
        ]
        .iter()
        .filter_map(|p| {
            runs.b
                .pointer(&format!("/boot_report/{p}"))
                .and_then(Value::as_u64)
                .map(|us| format!("{p} {:.3} s", us as f64 / 1e6))
        })
        .collect();
        println!("    warm| a warm start's VMM: {}", phases.join(", "));
        // `mvm bench --warm`: cold runs (always boots) against warm starts, side by side.
        bench_and_print(ctx, "kvm", &runs)?;
        // One byte of the sealed memory file changed in place, its modification time put
        // back: the file is hashed, the restore refused, the snapshot dropped, the run boots.
        let dir = warm_dir(&warm_root)?;
        let memory = dir.join("memory");
        let tamper = || -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new().write(true).open(&memory)?;
            let mtime = f.metadata()?.modified()?;
            std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5], 4096 + 17)?;
            f.set_modified(mtime)
        };
        tamper().map_err(|e| Failure::new(format!("changing {}: {e}", memory.display())))?;
        refused_then_booted(ctx, "kvm")?;
        println!("    warm| a byte changed in place in the memory file: refused, dropped, booted");
        Ok(())
    })();
    // The shared image store keeps no warm snapshot of this case's.
    let _ = std::fs::remove_dir_all(&warm_root);
    result
}
