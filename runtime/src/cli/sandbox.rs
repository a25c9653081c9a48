//! `mvm sandbox ...`: long-lived sandboxes, written on the SDK's
//! [`crate::sandbox`] API (docs/sandboxes.md).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use mvm_agent::protocol::ExecRequest;
use mvm_agent::{ClientError, ExecEvent, Stdin};
use serde_json::json;

use crate::backend::interrupt::{self, Action, Forwarder};
use crate::backend::Tier;
use crate::sandbox::{self, SandboxError, SandboxInfo, SandboxOptions};
use crate::terminal::escape_controls;

/// `mvm sandbox ...`.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Admit, boot and keep a VM up; prints its id once its agent is ready.
    Create(CreateArgs),
    /// List sandboxes: ready, starting, stopped, failed, or stale (supervisor killed).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox; streams its output and exits with its status.
    Exec(ExecArgs),
    /// An interactive shell (or CMD) on a terminal in a sandbox; exits with its status.
    Shell {
        /// Id, id prefix or name.
        sandbox: String,
        /// Working directory in the guest.
        #[arg(long, value_name = "DIR")]
        workdir: Option<String>,
        /// The command (default `sh`), after `--`.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Copy a file or a directory in or out: `cp HOST_PATH ID:GUEST_PATH` or
    /// `cp ID:GUEST_PATH HOST_PATH`. Links, devices and FIFOs are skipped and named.
    Cp {
        /// The source.
        from: String,
        /// The destination (into it, under the source's name, when it is a directory
        /// or ends with `/`).
        to: String,
        /// Print what was copied as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's supervisor log (admission, boot, session).
    Logs {
        /// Id, id prefix or name.
        sandbox: String,
    },
    /// Stop a sandbox (its VM powers off; its records close).
    Stop {
        /// Id, id prefix or name.
        sandbox: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a sandbox: its VM is snapshotted to disk, sealed, and stops running until
    /// `resume` (kvm backend). What runs in it goes on from the same instant then.
    Pause {
        /// Id, id prefix or name.
        sandbox: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused sandbox from its snapshot (admitted and audited as a restore),
    /// with fresh entropy for its kernel and the host's clock.
    Resume {
        /// Id, id prefix or name.
        sandbox: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fork a sandbox: a new sandbox from this one's instant (its files, its processes),
    /// with its own entropy and id; both go on (kvm backend). Prints the new id.
    Fork {
        /// Id, id prefix or name.
        sandbox: String,
        /// A name for the new sandbox.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a stopped or stale sandbox's state.
    Rm {
        /// Id, id prefix or name.
        sandbox: String,
        /// Stop it first if it is running.
        #[arg(long, short)]
        force: bool,
    },
}

/// `mvm sandbox create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image: a name or a digest (prefix).
    #[arg(long, default_value = crate::image::DEFAULT_IMAGE)]
    pub image: String,
    /// A name to find it by (unique among your sandboxes).
    #[arg(long)]
    pub name: Option<String>,
    /// How long it lives: SECS, or a number with s, m or h (default 15m).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub ttl: Duration,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long = "mem", value_name = "MiB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(64..))]
    pub mem_mib: u32,
    /// Use this backend instead of the best one detected.
    #[arg(long, value_enum)]
    pub backend: Option<Tier>,
    /// Put the stored secret NAME at /run/secrets/NAME after the verified boot; or, as
    /// NAME=PLACEHOLDER, give the sandbox only the placeholder, which the host replaces
    /// by the value in the headers of HTTPS requests to the --for hosts (repeatable;
    /// docs/secrets.md).
    #[arg(
        long = "secret",
        value_name = "NAME[=PLACEHOLDER]",
        conflicts_with = "dev"
    )]
    pub secrets: Vec<String>,
    /// The host (port 443 unless given) a placeholder secret's value may go to
    /// (repeatable; NAME= when there are several). Implies --allow HOST:PORT; the
    /// policy's [secrets.hosts] must list it.
    #[arg(
        long = "for",
        value_name = "[NAME=]HOST[:PORT]",
        conflicts_with = "dev"
    )]
    pub for_hosts: Vec<String>,
    /// The network flags (a sandbox with a network cannot be paused or forked).
    #[command(flatten)]
    pub network: super::NetArgs,
    /// Forward 127.0.0.1:HOST_PORT on this host to GUEST_PORT in the guest (TCP over
    /// vsock, no guest network needed; pinned in the plan; repeatable).
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST",
          value_parser = crate::sandbox::ports::parse_forward)]
    pub ports: Vec<(u16, u16)>,
    /// Development only: no admission, nothing verified or audited. Also MVM_DEV=1.
    #[arg(long)]
    pub dev: bool,
    /// Print the sandbox as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// `mvm sandbox exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Id, id prefix or name.
    pub sandbox: String,
    /// Set an environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit 124).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: Option<u64>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Parses `90`, `90s`, `15m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90, 90s, 15m, 2h)"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?} is not a duration (e.g. 90, 90s, 15m, 2h)"))?;
    if secs == 0 || secs > 7 * 24 * 3600 {
        return Err(format!("{text:?}: between 1 second and 7 days"));
    }
    Ok(Duration::from_secs(secs))
}

/// Runs `mvm sandbox ...`; returns the exit code.
pub fn main(command: &SandboxCommand) -> i32 {
    let result = match command {
        SandboxCommand::Create(args) => create(args),
        SandboxCommand::Ls { json } => {
            ls(*json);
            Ok(0)
        }
        SandboxCommand::Exec(args) => exec(args),
        SandboxCommand::Cp { from, to, json } => cp(from, to, *json),
        SandboxCommand::Shell {
            sandbox,
            workdir,
            command,
        } => sandbox::connect(sandbox).and_then(|client| {
            super::terminal_session::run(
                &client,
                super::terminal_session::Interactive {
                    argv: if command.is_empty() {
                        vec!["sh".to_owned()]
                    } else {
                        command.clone()
                    },
                    env: Default::default(),
                    workdir: workdir.clone(),
                },
            )
        }),
        SandboxCommand::Logs { sandbox } => sandbox::logs(sandbox).map(|log| {
            print!("{}", escape_controls(&log));
            0
        }),
        SandboxCommand::Stop { sandbox, json } => sandbox::stop(sandbox).map(|info| {
            print_info(&info, *json);
            0
        }),
        SandboxCommand::Pause { sandbox, json } => sandbox::pause(sandbox, sandbox::PAUSE_WAIT)
            .map(|info| {
                print_info(&info, *json);
                0
            }),
        SandboxCommand::Resume { sandbox, json } => {
            sandbox::resume(sandbox, RESUME_TIMEOUT).map(|info| {
                print_info(&info, *json);
                0
            })
        }
        SandboxCommand::Fork {
            sandbox,
            name,
            json,
        } => sandbox::fork(sandbox, name.clone(), RESUME_TIMEOUT).map(|info| {
            if *json {
                println!("{}", json!(info));
            } else {
                println!("{}", info.id);
            }
            0
        }),
        SandboxCommand::Rm { sandbox, force } => sandbox::remove(sandbox, *force).map(|info| {
            println!("{}", info.id);
            0
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("mvm: {}", escape_controls(&e.to_string()));
        e.exit_code()
    })
}

/// How long `resume` waits for the restored sandbox to answer.
const RESUME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

fn print_info(info: &SandboxInfo, json: bool) {
    if json {
        println!("{}", json!(info));
    } else {
        println!("{} {}", info.id, info.status);
    }
}

fn create(args: &CreateArgs) -> Result<i32, SandboxError> {
    let dev = args.dev || std::env::var_os("MVM_DEV").is_some_and(|v| v == "1");
    if dev {
        eprintln!(
            "mvm: WARNING: development mode (--dev / MVM_DEV=1): no admission, no signed plan, NOTHING IS VERIFIED OR AUDITED"
        );
    }
    let (secrets, substitutions) =
        crate::secrets::split_secret_args(&args.secrets, &args.for_hosts)
            .map_err(|e| SandboxError::io("--secret", std::io::Error::other(e)))?;
    eprintln!("mvm: creating a sandbox (admission, boot; its agent answers when it is ready)");
    let info = sandbox::create(&SandboxOptions {
        image: args.image.clone(),
        name: args.name.clone(),
        ttl: args.ttl,
        cpus: args.cpus,
        mem_mib: args.mem_mib,
        backend: args.backend,
        dev,
        secrets,
        ports: args.ports.clone(),
        net: args.network.flags(),
        substitutions,
        ..SandboxOptions::default()
    })?;
    if args.json {
        println!("{}", json!(info));
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

fn ls(json: bool) {
    let all = sandbox::list();
    if json {
        println!("{}", json!(all));
        return;
    }
    println!(
        "{:<20} {:<16} {:<9} {:<9} {:<21} REASON",
        "ID", "NAME", "STATUS", "TIER", "EXPIRES"
    );
    for s in all {
        println!(
            "{:<20} {:<16} {:<9} {:<9} {:<21} {}",
            s.id,
            s.name.as_deref().unwrap_or("-"),
            s.status,
            s.tier.map_or("-".to_owned(), |t| t.to_string()),
            s.expires.map_or("-".to_owned(), |t| t.to_string()),
            escape_controls(s.reason.as_deref().unwrap_or(""))
        );
    }
}

/// How often exec looks at Ctrl-C while waiting for output.
const POLL: Duration = Duration::from_millis(50);

fn exec(args: &ExecArgs) -> Result<i32, SandboxError> {
    let client = sandbox::connect(&args.sandbox)?;
    let request = ExecRequest {
        argv: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        cwd: args.workdir.clone(),
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        ..ExecRequest::default()
    };
    let forward = !std::io::stdin().is_terminal();
    let mode = if forward { Stdin::Stream } else { Stdin::Null };
    interrupt::install().map_err(|e| SandboxError::io("installing the Ctrl-C handler", e))?;
    let mut exec = client.exec(&request, mode)?;
    if forward {
        let writer = exec.stdin();
        crate::backend::stdin_pump::spawn(
            "stdin",
            Box::new(std::io::stdin()),
            64 << 10,
            move |data| {
                if data.is_empty() {
                    let _ = writer.close();
                    return false;
                }
                writer.write(data).is_ok()
            },
        )
        .map_err(|e| SandboxError::io("starting the stdin thread", e))?;
    }
    let mut interrupts = Forwarder::new();
    loop {
        match interrupts.poll() {
            Action::None => {}
            Action::Forward(signal) => {
                let _ = exec.signal(signal);
            }
            Action::Kill => {
                let _ = exec.signal(libc::SIGKILL);
                return Ok(130);
            }
        }
        match exec.next_event_timeout(POLL) {
            Ok(Some(ExecEvent::Stdout(data))) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)
                    .and_then(|()| out.flush())
                    .map_err(|e| SandboxError::io("writing stdout", e))?;
            }
            Ok(Some(ExecEvent::Stderr(data))) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&data)
                    .and_then(|()| err.flush())
                    .map_err(|e| SandboxError::io("writing stderr", e))?;
            }
            Ok(Some(ExecEvent::Exit(status))) => {
                return Ok(if status.timed_out {
                    124
                } else {
                    status.shell_code()
                })
            }
            Ok(None) => {
                return Err(SandboxError::Agent(ClientError::Unexpected(
                    "end of the command without a status".into(),
                )))
            }
            Err(ClientError::Timeout(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `ID:PATH` split, when `text` names a sandbox path.
fn guest_side(text: &str) -> Option<(&str, &str)> {
    let (sandbox, path) = text.split_once(':')?;
    (!sandbox.is_empty() && !sandbox.contains('/') && path.starts_with('/'))
        .then_some((sandbox, path))
}

/// The file name of a path, for a destination that is a directory.
fn file_name(path: &str) -> Option<&str> {
    path.rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

fn cp(from: &str, to: &str, json: bool) -> Result<i32, SandboxError> {
    let bad = |reason: &str| SandboxError::BadPath {
        path: format!("{from} -> {to}"),
        reason: reason.to_owned(),
    };
    let stats = match (guest_side(from), guest_side(to)) {
        (None, Some((id, guest))) => {
            let host = Path::new(from);
            let client = sandbox::connect(id)?;
            // Into a directory that is there (or named with a trailing /), as cp(1).
            let into = guest.ends_with('/') || client.is_dir(guest)?;
            let guest = if into {
                let name = host
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| bad("the source has no UTF-8 file name"))?;
                format!("{}/{name}", guest.trim_end_matches('/'))
            } else {
                guest.to_owned()
            };
            let stats = client.copy_in(host, &guest)?;
            tracing::info!(bytes = stats.bytes, "copied into {}:{guest}", client.id());
            stats
        }
        (Some((id, guest)), None) => {
            let mut host = PathBuf::from(to);
            if host.is_dir() || to.ends_with('/') {
                let name = file_name(guest).ok_or_else(|| bad("the source has no file name"))?;
                host = host.join(name);
            }
            let client = sandbox::connect(id)?;
            client.copy_out(guest, &host)?
        }
        (Some(_), Some(_)) => return Err(bad("copy between two sandboxes: not supported")),
        (None, None) => return Err(bad("one side must be SANDBOX:/ABSOLUTE/PATH")),
    };
    if json {
        println!("{}", serde_json::to_string(&stats).unwrap_or_default());
    } else if stats.dirs > 0 || !stats.skipped.is_empty() {
        eprintln!(
            "mvm: copied {} file(s), {} director{}, {} bytes",
            stats.files,
            stats.dirs,
            if stats.dirs == 1 { "y" } else { "ies" },
            stats.bytes
        );
    }
    if !stats.skipped.is_empty() {
        let shown: Vec<String> = stats
            .skipped
            .iter()
            .take(10)
            .map(|p| escape_controls(p).into_owned())
            .collect();
        eprintln!(
            "mvm: skipped {} link(s), device(s) or other special file(s): {}{}",
            stats.skipped.len(),
            shown.join(", "),
            if stats.skipped.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "0", "m", "5d", "-1", "1.5m", "999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sandbox_paths_are_told_from_host_paths() {
        assert_eq!(guest_side("sb-1:/work/a"), Some(("sb-1", "/work/a")));
        assert_eq!(guest_side("web:/"), Some(("web", "/")));
        assert_eq!(guest_side("./a:b"), None);
        assert_eq!(guest_side("a:relative"), None);
        assert_eq!(guest_side("/abs/path"), None);
        assert_eq!(file_name("/work/out.json"), Some("out.json"));
        assert_eq!(file_name("/work/"), None);
    }
}
