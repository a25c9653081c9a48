//! `mvm run`: pick the backend, find the image, run, stream, exit.

use std::io::{IsTerminal, Read, Write};

use serde_json::json;

use super::RunArgs;
use crate::backend::detect::{judge, HostFacts};
use crate::backend::{
    emulated, interrupt, kvm, locate, resources, NoJournal, OutputSink, PlanFiles, RunArtifacts,
    RunError, RunJournal, RunOutcome, RunSpec, StdinMode, Tier,
};
use crate::image::{ImageStore, StoredImage};
use crate::run::admit;
use crate::run::exit;
use crate::run::output_digest::DigestSink;
use crate::terminal::escape_controls;
use mvm_loader::plan::UtcTime;

/// Writes output to this process's stdout and stderr as it arrives.
struct StreamSink;

impl OutputSink for StreamSink {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(data)?;
        out.flush()
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut err = std::io::stderr().lock();
        err.write_all(data)?;
        err.flush()
    }
}

/// Keeps output for `--json`.
#[derive(Default)]
struct CollectSink {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl OutputSink for CollectSink {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stdout.extend_from_slice(data);
        Ok(())
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stderr.extend_from_slice(data);
        Ok(())
    }
}

/// The spec a `mvm run` command line asks for; stdin is forwarded when it is
/// not a terminal.
pub fn spec_from_args(args: &RunArgs, stdin_is_terminal: bool) -> RunSpec {
    RunSpec {
        argv: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        workdir: args.workdir.clone(),
        cpus: args.cpus,
        mem_mib: args.mem_mib,
        timeout_secs: args.timeout,
        stdin: if stdin_is_terminal {
            StdinMode::Null
        } else {
            StdinMode::Forward
        },
        disks: args.disk.clone(),
        ready_timeout_secs: args.ready_timeout,
        net: None, // netrt: set in execute(), after the names are pinned
    }
}

/// Chooses the tier: the one asked for, else the best one detected.
fn choose_tier(asked: Option<Tier>, facts: &HostFacts) -> Result<Tier, RunError> {
    if let Some(tier) = asked {
        return Ok(tier);
    }
    let detection = judge(facts);
    detection.chosen.ok_or_else(|| {
        let reasons: Vec<String> = detection
            .verdicts
            .iter()
            .map(|v| format!("{}: {}", v.tier, v.reason))
            .collect();
        RunError::NoBackend(reasons.join("; "))
    })
}

/// Admits the run (unless `--dev`), launches it, and appends its evidence.
fn execute(
    args: &RunArgs,
    spec: &RunSpec,
    sink: &mut dyn OutputSink,
) -> Result<RunOutcome, RunError> {
    let facts = HostFacts::probe();
    let tier = choose_tier(args.backend, &facts)?;
    // Before admission, the image and any VM process: the VMM's own bounds and
    // the host's memory, whatever the flags.
    resources::check(tier, spec.cpus, spec.mem_mib)?;
    if args.dev_mode() {
        admit::check_dev_memory(spec.mem_mib)?;
    }
    let image = ImageStore::open_default()?.resolve(&args.image)?;
    interrupt::install().map_err(RunError::io("installing the Ctrl-C handler"))?;
    // netrt: --net: names pinned, the network reserved before admission so that the
    // plan pins it; the host network lives (and is torn down) with `net`.
    let mut net = crate::net::run::prepare(&args.net_flags(), tier)?;
    let mut spec = spec.clone();
    spec.net = net.as_ref().map(|n| n.request.clone());
    let spec = &spec;
    if args.dev_mode() {
        if args.receipt.is_some() {
            return Err(RunError::Missing(
                "--receipt needs an admitted run: drop --dev / MVM_DEV".into(),
            ));
        }
        if let Some(name) = args.secrets.iter().chain(&args.secret_env).next() {
            return Err(RunError::Missing(format!(
                "--secret {name}: a secret is released only to a verified, measured boot, and development mode has none: drop --dev / MVM_DEV"
            )));
        }
        eprintln!(
            "mvm: WARNING: development mode (--dev / MVM_DEV=1): no admission, no signed plan, NOTHING IS VERIFIED OR AUDITED"
        );
        return launch(tier, &facts, spec, &image, None, &mut NoJournal, sink);
    }
    if let Some(disk) = spec.disks.first() {
        return Err(RunError::Missing(format!(
            "--disk {disk}: extra disks are not pinned by admission yet (a read-only disk needs its dm-verity root hash in the plan); use --dev to attach it unverified"
        )));
    }
    let mut admitted = admit::admit_run(&args.run_request(), &image, tier, net.as_mut())?;
    // The plan's timeout is the workload's (the policy's longest without --timeout).
    let mut spec = spec.clone();
    spec.timeout_secs = Some(u64::from(admitted.signed.plan.resources.timeout_secs));
    let mut digests = DigestSink::new(sink);
    let started = UtcTime::now();
    // `admitted` writes the run's records ahead, as the backend reaches them.
    let files = admitted.files.clone();
    let result = launch(
        tier,
        &facts,
        &spec,
        &image,
        Some(&files),
        &mut admitted,
        &mut digests,
    );
    let finished = UtcTime::now();
    let output = digests.digests();
    let plan_id = admitted.plan_id().to_owned();
    let vm_id = admitted.vm_id.clone();
    let finishing = std::time::Instant::now();
    match admitted.finish(
        &spec.argv,
        &result,
        output,
        (started, finished),
        args.receipt.as_deref(),
    ) {
        Ok(evidence) => tracing::info!(
            plan = %plan_id,
            vm = %vm_id,
            first_seq = evidence.audit.first_seq,
            last_seq = evidence.audit.last_seq,
            audit_us = u64::try_from(finishing.elapsed().as_micros()).unwrap_or(u64::MAX),
            "run audited"
        ),
        // The workload ran but its evidence is incomplete: that is a failure.
        Err(e) if result.is_ok() => return Err(RunError::Missing(format!("evidence: {e}"))),
        Err(e) => eprintln!("mvm: {}", escape_controls(&e)),
    }
    result
}

/// Starts the run on `tier`, verified against `plan` when given.
fn launch(
    tier: Tier,
    facts: &HostFacts,
    spec: &RunSpec,
    image: &StoredImage,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    sink: &mut dyn OutputSink,
) -> Result<RunOutcome, RunError> {
    let stdin: Option<Box<dyn Read + Send>> = match spec.stdin {
        StdinMode::Forward => Some(Box::new(std::io::stdin())),
        StdinMode::Null => None,
    };
    match tier {
        Tier::Kvm => {
            let artifacts = RunArtifacts {
                image: image.clone(),
                vmm: locate::vmm_binary()?,
            };
            kvm::run_verified(spec, &artifacts, plan, journal, sink, stdin)
        }
        Tier::Emulated => {
            let qemu = facts.qemu.clone().ok_or_else(|| {
                RunError::NoBackend(
                    "emulated: qemu-system-x86_64 not found (install qemu-system-x86, or set MVM_QEMU)"
                        .into(),
                )
            })?;
            eprintln!(
                "mvm: warning: backend 'emulated': no hardware KVM here, so mvm-vmm runs inside a QEMU-TCG test host (slow; the outer wall is QEMU's emulator)"
            );
            emulated::run(spec, image, &qemu, plan, journal, sink, stdin)
        }
    }
}

/// Runs `mvm run` and returns the process exit code.
pub fn main(args: &RunArgs) -> i32 {
    let spec = spec_from_args(args, std::io::stdin().is_terminal());
    if args.json {
        let mut sink = CollectSink::default();
        let result = execute(args, &spec, &mut sink);
        let (code, body) = json_report(&result, &sink);
        println!("{body}");
        return code;
    }
    match execute(args, &spec, &mut StreamSink) {
        Ok(outcome) => exit::for_status(&outcome.status),
        Err(e) => {
            let code = exit::for_error(&e);
            // A closed stdout is the reader's choice, not an error to report.
            if code != exit::BROKEN_PIPE {
                // The message may carry the VM log's tail or the guest's words.
                eprintln!("mvm: error: {}", escape_controls(&e.to_string()));
            }
            code
        }
    }
}

/// The `--json` object and the exit code for a finished (or failed) run.
fn json_report(result: &Result<RunOutcome, RunError>, out: &CollectSink) -> (i32, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (code, value) = match result {
        Ok(outcome) => {
            let code = exit::for_status(&outcome.status);
            (
                code,
                json!({
                    "stdout": stdout,
                    "stderr": stderr,
                    "exit_status": code,
                    "code": outcome.status.code,
                    "signal": outcome.status.signal,
                    "timed_out": outcome.status.timed_out,
                    "tier": outcome.tier,
                    "timings": outcome.timings,
                    "boot_report": outcome.boot_report,
                }),
            )
        }
        Err(e) => {
            let code = exit::for_error(e);
            (
                code,
                json!({
                    "stdout": stdout,
                    "stderr": stderr,
                    "exit_status": code,
                    "error": { "kind": exit::error_kind(e), "message": e.to_string() },
                }),
            )
        }
    };
    (code, value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Timings, WorkloadStatus};
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use std::path::PathBuf;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["mvm", "run"].iter().chain(args.iter())).unwrap();
        match cli.command {
            Command::Run(run) => run,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn spec_follows_the_arguments_and_the_terminal() {
        let args = run_args(&["--env", "K=V", "--timeout", "2", "--", "cat"]);
        let spec = spec_from_args(&args, false);
        assert_eq!(spec.stdin, StdinMode::Forward);
        assert_eq!(spec.env.get("K").map(String::as_str), Some("V"));
        assert_eq!(spec.timeout_secs, Some(2));
        assert_eq!(spec.argv, ["cat"]);
        assert_eq!(spec_from_args(&args, true).stdin, StdinMode::Null);
    }

    #[test]
    fn the_tier_asked_for_wins_and_none_usable_is_an_error() {
        let none = HostFacts::default();
        assert_eq!(choose_tier(Some(Tier::Kvm), &none).unwrap(), Tier::Kvm);
        let err = choose_tier(None, &none).unwrap_err();
        assert_eq!(exit::for_error(&err), exit::NO_BACKEND);
        assert!(err.to_string().contains("kvm:"), "{err}");
        let qemu_only = HostFacts {
            qemu: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
            kvm_modules: vec!["kvm_pvm".into()],
            dev_kvm: true,
            dev_kvm_rw: true,
            ..HostFacts::default()
        };
        assert_eq!(choose_tier(None, &qemu_only).unwrap(), Tier::Emulated);
    }

    #[test]
    fn json_report_has_output_status_and_timings() {
        let sink = CollectSink {
            stdout: b"out\n".to_vec(),
            stderr: b"err\n".to_vec(),
        };
        let outcome = RunOutcome {
            status: WorkloadStatus {
                code: Some(7),
                signal: None,
                timed_out: false,
            },
            timings: Timings {
                boot_ms: 10,
                ..Timings::default()
            },
            tier: Tier::Kvm,
            boot_report: None,
        };
        let (code, body) = json_report(&Ok(outcome), &sink);
        assert_eq!(code, 7);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stdout"], "out\n");
        assert_eq!(v["stderr"], "err\n");
        assert_eq!(v["exit_status"], 7);
        assert_eq!(v["tier"], "kvm");
        assert_eq!(v["timings"]["boot_ms"], 10);

        let (code, body) = json_report(
            &Err(RunError::Timeout(std::time::Duration::from_secs(2))),
            &sink,
        );
        assert_eq!(code, exit::TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["kind"], "timeout");
    }
}
