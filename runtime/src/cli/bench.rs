//! `mvm bench`: N runs of a command (default `true`) in fresh microVMs, each admitted,
//! verified and audited as `mvm run`'s (through the SDK), and the minimum, median and 95th
//! percentile of every phase: the VMM's own boot report (process start to the first
//! `KVM_RUN`, to the guest's init) and the runtime's timings (VM start to agent ready,
//! exec, shutdown, the whole run as the caller waits for it). For boot-time harnesses:
//! `--json` gives the same figures, and every run's raw numbers.
//!
//! The VMM's resident memory just before each VM is stopped (kvm tier, read from
//! `/proc`): the whole, the part that is guest RAM, and the VMM's own overhead.
//!
//! `--restore` adds N restores of the same image: one sandbox booted, paused (its VM
//! snapshotted and sealed), then resumed and paused again N times, each resume admitted,
//! verified and audited as `mvm sandbox resume`'s, timed from the call to the agent's
//! answer, then one command run in it (kvm backend: snapshots need the VMM on this host).

use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};

use crate::backend::{OutputSink, RunOutcome, Tier};
use crate::run::exit;
use crate::sdk::Run;

/// `mvm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs to make (1..=100).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Use this backend instead of the best one detected.
    #[arg(long, value_enum)]
    pub backend: Option<Tier>,
    /// The image: a name or a digest (prefix).
    #[arg(long, default_value = crate::image::DEFAULT_IMAGE)]
    pub image: String,
    /// Development mode (no admission, nothing verified or audited), to see its cost.
    #[arg(long)]
    pub dev: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also time N restores from a snapshot of the image's booted VM (a sandbox paused
    /// and resumed; kvm backend).
    #[arg(long)]
    pub restore: bool,
    /// Also time N warm starts (`mvm run` from the image's warm snapshot; kvm and
    /// emulated backends, the policy's `[snapshots] warm_start` on). The cold runs are always boots.
    #[arg(long)]
    pub warm: bool,
    /// The command to run each time (default: `true`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Output is counted, not kept.
struct Discard;

impl OutputSink for Discard {
    fn stdout(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }

    fn stderr(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// The phases, in milliseconds, of one run, by name; absent where a run has none.
fn phases(outcome: &RunOutcome, wall_ms: f64) -> Vec<(&'static str, Option<f64>)> {
    let report = |key: &str| {
        outcome
            .boot_report
            .as_ref()
            .and_then(|r| r.get(key))
            .and_then(Value::as_u64)
            .map(|us| us as f64 / 1000.0)
    };
    let t = &outcome.timings;
    vec![
        ("vmm: start -> first KVM_RUN", report("first_kvm_run")),
        ("vmm: start -> guest init", report("init_reached")),
        (
            "test host boot (emulated)",
            t.host_boot_ms.map(|v| v as f64),
        ),
        ("VM start -> agent ready", Some(t.boot_ms as f64)),
        ("exec", Some(t.exec_ms as f64)),
        ("shutdown", Some(t.shutdown_ms as f64)),
        ("backend total", Some(t.total_ms as f64)),
        ("whole run (admission to exit)", Some(wall_ms)),
    ]
}

/// Minimum, median and 95th percentile.
type Stats = (f64, f64, f64);

/// Minimum, median and 95th percentile (nearest rank) of `values`, if any.
pub fn stats(values: &[f64]) -> Option<Stats> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // Nearest rank: the smallest value with at least `percent`% of the values at or below.
    let at = |percent: usize| {
        let rank = (percent * n).div_ceil(100).clamp(1, n);
        sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
    };
    let median = if n % 2 == 1 {
        at(50)
    } else {
        let lo = sorted.get(n / 2 - 1).copied().unwrap_or(f64::NAN);
        let hi = sorted.get(n / 2).copied().unwrap_or(f64::NAN);
        (lo + hi) / 2.0
    };
    Some((sorted.first().copied().unwrap_or(f64::NAN), median, at(95)))
}

/// Runs `mvm bench`; returns the exit code (that of the first failed run, if one failed).
pub fn main(args: &BenchArgs) -> i32 {
    let command = if args.command.is_empty() {
        vec!["true".to_owned()]
    } else {
        args.command.clone()
    };
    let mut runs: Vec<Vec<(&'static str, Option<f64>)>> = Vec::new();
    let mut memory: Vec<crate::backend::vmm_memory::VmmMemory> = Vec::new();
    let mut tier = None;
    for i in 1..=args.runs {
        let mut run = Run::new(command.clone())
            .image(args.image.clone())
            .development(args.dev)
            .cold(true);
        if let Some(t) = args.backend {
            run = run.backend(t);
        }
        let started = Instant::now();
        match run.stream(&mut Discard) {
            Ok(outcome) => {
                let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
                if !args.json {
                    eprintln!("mvm bench: run {i}/{}: {wall_ms:.0} ms", args.runs);
                }
                tier = Some(outcome.tier);
                runs.push(phases(&outcome, wall_ms));
                memory.extend(outcome.vmm_memory);
            }
            Err(e) => {
                eprintln!("mvm bench: run {i}: {e}");
                return exit::for_error(&e);
            }
        }
    }
    let names: Vec<&str> = runs
        .first()
        .map(|r| r.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default();
    let mut rows: Vec<Row> = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.get(k).and_then(|(_, v)| *v))
            .collect();
        if let Some((min, median, p95)) = stats(&values) {
            rows.push((*name, min, median, p95, values));
        }
    }
    let tier = tier.map(|t| t.to_string()).unwrap_or_default();
    let kib = |pick: fn(&crate::backend::vmm_memory::VmmMemory) -> u64| {
        stats(&memory.iter().map(|m| pick(m) as f64).collect::<Vec<_>>())
    };
    let memory_rows: Vec<(&str, Option<Stats>)> = vec![
        ("rss", kib(|m| m.rss_kib)),
        ("guest_rss", kib(|m| m.guest_rss_kib)),
        ("overhead", kib(|m| m.overhead_kib)),
    ];
    let restores = if args.restore {
        match restores(args, &command) {
            Ok(rows) => Some(rows),
            Err(e) => {
                eprintln!("mvm bench: restores: {e}");
                return e.exit_code();
            }
        }
    } else {
        None
    };
    let restore_rows: Vec<Row> = restores.unwrap_or_default();
    rows.extend(restore_rows.iter().cloned());
    if args.warm {
        match warm_runs(args, &command) {
            Ok(warm) => rows.extend(warm),
            Err(e) => {
                eprintln!("mvm bench: warm starts: {e}");
                return exit::for_error(&e);
            }
        }
    }
    if args.json {
        let phases: Vec<Value> = rows
            .iter()
            .map(|(name, min, median, p95, values)| {
                json!({"phase": name, "min_ms": min, "median_ms": median, "p95_ms": p95, "runs_ms": values})
            })
            .collect();
        let memory: serde_json::Map<String, Value> = memory_rows
            .iter()
            .filter_map(|(name, s)| {
                s.map(|(min, median, p95)| {
                    (
                        format!("{name}_kib"),
                        json!({"min": min, "median": median, "p95": p95}),
                    )
                })
            })
            .collect();
        println!(
            "{}",
            json!({"tier": tier, "runs": args.runs, "command": command, "dev": args.dev, "phases": phases, "restore": args.restore, "vmm_memory": memory})
        );
        return 0;
    }
    println!(
        "mvm bench: {} runs of {:?} on the {tier} tier{}; milliseconds",
        args.runs,
        command.join(" "),
        if args.dev {
            " (--dev)"
        } else {
            " (admitted, verified, audited)"
        }
    );
    println!(
        "  {:<34} {:>9} {:>9} {:>9}",
        "phase", "min", "median", "p95"
    );
    for (name, min, median, p95, _) in &rows {
        println!("  {name:<34} {min:>9.1} {median:>9.1} {p95:>9.1}");
    }
    let median = |name: &str| rows.iter().find(|r| r.0 == name).map(|r| r.2);
    for (what, warm, cold) in [
        (
            "warm / cold, VM start -> agent ready",
            "warm: VM start -> agent ready",
            "VM start -> agent ready",
        ),
        (
            "warm / cold, whole run",
            "warm: whole run",
            "whole run (admission to exit)",
        ),
    ] {
        if let (Some(w), Some(c)) = (median(warm), median(cold)) {
            println!("  {what}: {:.2}x (medians)", w / c);
        }
    }
    if let [(_, Some(rss)), (_, Some(guest)), (_, Some(overhead))] = memory_rows.as_slice() {
        let mib = |v: f64| v / 1024.0;
        println!(
            "  vmm memory before shutdown, MiB (min / median / p95): resident {:.1} / {:.1} / {:.1}, \
             of it guest RAM {:.1} / {:.1} / {:.1}, overhead {:.1} / {:.1} / {:.1}",
            mib(rss.0),
            mib(rss.1),
            mib(rss.2),
            mib(guest.0),
            mib(guest.1),
            mib(guest.2),
            mib(overhead.0),
            mib(overhead.1),
            mib(overhead.2)
        );
    }
    if !args.restore {
        println!("  (restores from a snapshot: --restore)");
    }
    0
}

/// One table row: phase, min, median, p95, every run's value.
type Row = (&'static str, f64, f64, f64, Vec<f64>);

fn row(name: &'static str, values: Vec<f64>) -> Option<Row> {
    stats(&values).map(|(min, median, p95)| (name, min, median, p95, values))
}

/// `args.runs` warm starts of the command, after one run that leaves the image's warm
/// snapshot if there is none yet (not counted). Each must have been warm.
fn warm_runs(args: &BenchArgs, command: &[String]) -> Result<Vec<Row>, crate::backend::RunError> {
    let one = || {
        let mut run = Run::new(command.to_vec())
            .image(args.image.clone())
            .development(args.dev)
            .cold(false);
        if let Some(t) = args.backend {
            run = run.backend(t);
        }
        let started = Instant::now();
        run.stream(&mut Discard)
            .map(|outcome| (outcome, started.elapsed().as_secs_f64() * 1000.0))
    };
    one()?;
    let (mut whole, mut to_agent, mut unpack) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=args.runs {
        let (outcome, wall_ms) = one()?;
        if !outcome.timings.warm_start {
            return Err(crate::backend::RunError::Missing(
                "the run was not a warm start: the policy's [snapshots] warm_start is off, the \
                 backend has no warm starts (kvm and emulated have), or the run is not eligible (secrets, disks, --net, --dev)"
                    .into(),
            ));
        }
        if !args.json {
            eprintln!("mvm bench: warm run {i}/{}: {wall_ms:.0} ms", args.runs);
        }
        whole.push(wall_ms);
        to_agent.push(outcome.timings.boot_ms as f64);
        unpack.extend(outcome.timings.warm_unpack_ms.map(|ms| ms as f64));
    }
    Ok([
        row("warm: snapshot off its disk (emulated)", unpack),
        row("warm: VM start -> agent ready", to_agent),
        row("warm: whole run", whole),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Boots one sandbox of the image, pauses it, then `args.runs` times: resumes it (timed
/// to the agent's answer), runs `command` in it (timed), pauses it (timed, to a sealed
/// snapshot). The sandbox is removed at the end, whatever happened.
fn restores(
    args: &BenchArgs,
    command: &[String],
) -> Result<Vec<Row>, crate::sandbox::SandboxError> {
    use crate::sandbox;
    let info = sandbox::create(&sandbox::SandboxOptions {
        image: args.image.clone(),
        backend: Some(args.backend.unwrap_or(Tier::Kvm)),
        dev: args.dev,
        ttl: std::time::Duration::from_secs(3600),
        ..sandbox::SandboxOptions::default()
    })?;
    let id = info.id.clone();
    let result = (|| {
        let wait = std::time::Duration::from_secs(300);
        sandbox::pause(&id, sandbox::PAUSE_WAIT)?;
        let (mut resume, mut exec, mut pause) = (Vec::new(), Vec::new(), Vec::new());
        let request = mvm_agent::protocol::ExecRequest {
            argv: command.to_vec(),
            ..Default::default()
        };
        for i in 1..=args.runs {
            let started = Instant::now();
            sandbox::resume(&id, wait)?;
            resume.push(started.elapsed().as_secs_f64() * 1000.0);
            let started = Instant::now();
            let client = sandbox::connect(&id)?;
            client
                .exec(&request, mvm_agent::Stdin::Null)?
                .wait_output()
                .map_err(sandbox::SandboxError::from)?;
            drop(client);
            exec.push(started.elapsed().as_secs_f64() * 1000.0);
            let started = Instant::now();
            sandbox::pause(&id, sandbox::PAUSE_WAIT)?;
            pause.push(started.elapsed().as_secs_f64() * 1000.0);
            if !args.json {
                eprintln!(
                    "mvm bench: restore {i}/{}: {:.0} ms to ready",
                    args.runs,
                    resume.last().copied().unwrap_or(f64::NAN)
                );
            }
        }
        Ok([
            row("restore: resume -> agent ready", resume),
            row("restore: exec (new connection)", exec),
            row("restore: pause -> sealed snapshot", pause),
        ]
        .into_iter()
        .flatten()
        .collect())
    })();
    let _ = sandbox::remove(&id, true);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_median_and_nearest_rank_p95() {
        assert_eq!(stats(&[]), None);
        assert_eq!(stats(&[5.0]), Some((5.0, 5.0, 5.0)));
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0, 3.0, 2.0]), Some((1.0, 2.5, 4.0)));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(stats(&hundred), Some((1.0, 50.5, 95.0)));
        assert_eq!(stats(&[f64::NAN, 2.0]), Some((2.0, 2.0, 2.0)));
    }
}
