//! `mvm run`: the command line turned into a run ([`crate::run::execute`], which the
//! SDK uses too), its output streamed or collected for `--json`, its exit status.

use std::io::{IsTerminal, Read, Write};

use serde_json::json;

use super::terminal_session::{self, Interactive};
use super::RunArgs;
use crate::backend::{OutputSink, RunError, RunOutcome, RunSpec, StdinMode};
use crate::run::execute::RunOptions;
use crate::run::exit;
use crate::sandbox::{self, SandboxError, SandboxOptions};
use crate::sdk::Collect as CollectSink;
use crate::terminal::escape_controls;

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
        stdin: if stdin_is_terminal && !args.interactive {
            StdinMode::Null
        } else {
            StdinMode::Forward
        },
        disks: args.disk.clone(),
        ready_timeout_secs: args.ready_timeout,
        net: None,          // netrt: set in execute(), after the names are pinned
        egress_trust: None, // set in execute(), after admission made the run's CA
    }
}

/// What the command line asks beyond the spec.
pub fn options_from_args(args: &RunArgs) -> Result<RunOptions, RunError> {
    let mut request = args.run_request();
    request.substitutions = args.substitutions().map_err(RunError::Missing)?;
    Ok(RunOptions {
        backend: args.backend,
        image: args.image.clone(),
        request,
        receipt: args.receipt.clone(),
        dev: args.dev_mode(),
        net: args.net_flags(),
        forward_signals: true,
        cold: args.cold,
        restore_plan: None,
    })
}

/// Admits, launches and audits the run, the workload's stdin being ours.
fn execute(
    args: &RunArgs,
    spec: &RunSpec,
    sink: &mut dyn OutputSink,
) -> Result<RunOutcome, RunError> {
    let stdin: Box<dyn Read + Send> = Box::new(std::io::stdin());
    crate::run::execute::execute(&options_from_args(args)?, spec, sink, Some(stdin))
}

/// `mvm run -t`: the command on a terminal in a sandbox made for it, stopped and
/// removed at the end, admitted and audited as any sandbox.
fn with_terminal(args: &RunArgs) -> Result<i32, SandboxError> {
    let created = sandbox::create(&SandboxOptions {
        image: args.image.clone(),
        ttl: std::time::Duration::from_secs(args.timeout.unwrap_or(3600)),
        cpus: args.cpus,
        mem_mib: args.mem_mib,
        backend: args.backend,
        dev: args.dev_mode(),
        secrets: args
            .secrets
            .iter()
            .filter(|v| !v.contains('='))
            .cloned()
            .collect(),
        ephemeral: true,
        net: args.net_flags(),
        substitutions: args
            .substitutions()
            .map_err(|e| SandboxError::io("--secret", std::io::Error::other(e)))?,
        ..SandboxOptions::default()
    });
    let info = match created {
        Ok(info) => info,
        Err(e) => {
            // A sandbox that failed to start stays for its log; this one is ours.
            if let SandboxError::Failed { id, .. } = &e {
                let _ = sandbox::remove(id, true);
            }
            return Err(e);
        }
    };
    let result = sandbox::connect(&info.id).and_then(|client| {
        terminal_session::run(
            &client,
            Interactive {
                argv: args.command.clone(),
                env: args.env.iter().cloned().collect(),
                workdir: args.workdir.clone(),
            },
        )
    });
    // The client is gone: the sandbox stops and its supervisor removes it (as it
    // would if this process had been killed). Wait for that, so the VM is gone
    // when `mvm` returns; force it if it takes too long.
    if !sandbox::wait_gone(&info.id, std::time::Duration::from_secs(60)) {
        if let Err(e) = sandbox::remove(&info.id, true) {
            eprintln!("mvm: removing sandbox {}: {e}", info.id);
        }
    }
    result
}

/// Runs `mvm run` and returns the process exit code.
pub fn main(args: &RunArgs) -> i32 {
    if args.tty {
        return with_terminal(args).unwrap_or_else(|e| {
            eprintln!("mvm: {}", escape_controls(&e.to_string()));
            e.exit_code()
        });
    }
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
                    "plan_id": outcome.plan_id,
                    "vmm_memory": outcome.vmm_memory,
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
    use crate::backend::Tier;
    use crate::backend::{Timings, WorkloadStatus};
    use crate::cli::{Cli, Command};
    use clap::Parser;

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
            plan_id: None,
            vmm_memory: None,
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
