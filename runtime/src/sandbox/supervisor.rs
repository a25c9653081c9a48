//! A sandbox's supervisor (`mvm __sandbox-supervise DIR`): a detached process
//! of its own (new session, output to the sandbox's log) that admits the
//! sandbox's plan, boots its VM and serves its control socket until the
//! sandbox is stopped, paused, its TTL ends or its VM exits. It is the VMM's parent:
//! killed, it takes the VM with it (the VMM dies with its parent), and the
//! sandbox shows as stale.
//!
//! On the `kvm` tier the VMM is started able to snapshot (`--snapshot-dir`): a pause
//! writes the VM to disk, the supervisor seals it ([`super::pause`]) and exits with
//! the sandbox `paused`; `resume` starts a supervisor again (`--resume`), which admits
//! the restore and starts the VM from that snapshot.

use std::path::Path;
use std::time::Duration;

use mvm_loader::plan::{PortForward, UtcTime};

use super::mux::Mux;
use super::pause;
use super::ports::Listeners;
use super::state::{Sandbox, SandboxState, Status};
use crate::backend::detect::HostFacts;
use crate::backend::session::{RestoreFrom, SessionSnapshots, SNAPSHOT_PLAN_FILE};
use crate::backend::{RunSpec, StdinMode, Tier, Workload};
use crate::run::execute::{choose_tier, execute_workload, RunOptions};
use crate::run::{exit, RunRequest};
use crate::secrets::{Delivery, SecretRequest};

/// How long the supervisor waits for the guest agent.
const READY_TIMEOUT_SECS: u64 = 120;

/// The command a sandbox's records carry as its run's (hashed, like any run's).
pub fn session_argv(id: &str) -> Vec<String> {
    vec!["mvm-sandbox".to_owned(), id.to_owned()]
}

/// Runs the sandbox in `dir` to its end (or its pause); returns the process's exit
/// status. `resume`: start it from its sealed snapshot.
pub fn supervise(dir: &Path, resume: bool) -> i32 {
    let sandbox = Sandbox::at(dir);
    let config = match sandbox.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mvm: sandbox supervisor: {e}");
            return 1;
        }
    };
    let pid = std::process::id();
    // A resumed sandbox goes on at its epoch, with the TTL it had left.
    let before = sandbox.state().ok().flatten();
    let epoch = before.as_ref().map_or(0, |s| s.epoch);
    let ttl_secs = if resume {
        before
            .as_ref()
            .and_then(|s| s.ttl_left_secs)
            .unwrap_or(config.ttl_secs)
            .max(1)
    } else {
        config.ttl_secs
    };
    let mut state = SandboxState {
        epoch,
        ..SandboxState::starting(pid)
    };
    let save = |state: &SandboxState| {
        if let Err(e) = sandbox.set_state(state) {
            tracing::error!("{e}");
        }
    };
    save(&state);

    // The forwards' host ports, bound before anything boots: one in use fails now.
    let mut listeners = match Listeners::bind(&config.ports) {
        Ok(l) => Some(l),
        Err(e) => {
            state.status = Status::Failed;
            state.reason = Some(e.to_string());
            save(&state);
            eprintln!("mvm: sandbox {}: {e}", config.id);
            return 1;
        }
    };
    let tier = choose_tier(config.backend, &HostFacts::probe());
    state.tier = tier.as_ref().ok().copied();
    save(&state);
    // Snapshots where the VMM is this host's process; the next one at the next epoch.
    // A sandbox with a network is not paused: its tap, its table and its egress proxy
    // (whose CA key lives only in this process) would not come back with it.
    let snapshots = match tier {
        Ok(Tier::Kvm) if !config.has_network() => pause::prepare_next(&sandbox).and_then(|write_to| {
            Ok(SessionSnapshots {
                write_to,
                epoch: epoch.saturating_add(1),
                trust: pause::trust_file()?,
                restore: resume.then(|| RestoreFrom {
                    dir: sandbox.snapshot_dir(),
                    min_epoch: epoch,
                    sandbox_id: config.id.clone(),
                }),
            })
        }),
        _ => Err(super::SandboxError::io(
            "resume",
            std::io::Error::other(
                "a paused sandbox resumes on the kvm backend only (on the emulated tier the VMM lived inside a test host that ended with it)",
            ),
        )),
    };
    let snapshots = match snapshots {
        Ok(s) => Some(s),
        Err(e) if resume => {
            state.status = Status::Paused;
            state.reason = Some(format!("not resumed: {e}"));
            save(&state);
            eprintln!("mvm: sandbox {}: not resumed: {e}", config.id);
            return 1;
        }
        Err(_) => None,
    };
    let argv = session_argv(&config.id);
    let options = RunOptions {
        backend: state.tier,
        image: config.image.clone(),
        request: RunRequest {
            image: config.image.clone(),
            cpus: config.cpus,
            mem_mib: config.mem_mib,
            timeout_secs: Some(config.ttl_secs),
            argv: argv.clone(),
            secrets: config
                .secrets
                .iter()
                .map(|name| SecretRequest {
                    name: name.clone(),
                    delivery: Delivery::File,
                })
                .collect(),
            substitutions: config.substitutions.clone(),
            forwards: config
                .ports
                .iter()
                .map(|&(host, guest)| PortForward { host, guest })
                .collect(),
            disks: Vec::new(),
            scratch_disks: Vec::new(),
        },
        receipt: None,
        dev: config.dev,
        net: config.net.clone(),
        forward_signals: true,
        cold: false,
        // A restore is admitted on the plan that booted the VM, kept with its snapshot.
        restore_plan: (resume && !config.dev)
            .then(|| sandbox.snapshot_dir().join(SNAPSHOT_PLAN_FILE)),
    };
    let spec = RunSpec {
        argv,
        env: Default::default(),
        workdir: None,
        cpus: config.cpus,
        mem_mib: config.mem_mib,
        timeout_secs: Some(config.ttl_secs),
        stdin: StdinMode::Null,
        disks: vec![],
        ready_timeout_secs: READY_TIMEOUT_SECS,
        net: None,
        egress_trust: None,
    };
    let ready_state = state.clone();
    let ready_sandbox = sandbox.clone();
    let ttl = Duration::from_secs(ttl_secs);
    let socket = sandbox.socket();
    let mut mux = Mux::new(
        sandbox.socket(),
        ttl,
        Box::new(move |_| {
            if let Some(listeners) = listeners.take() {
                listeners.serve(&socket);
            }
            let now = UtcTime::now();
            let ready = SandboxState {
                status: Status::Ready,
                ready_at: Some(now),
                expires: Some(now.saturating_add(ttl)),
                ..ready_state.clone()
            };
            if let Err(e) = ready_sandbox.set_state(&ready) {
                tracing::error!("{e}");
            }
            tracing::info!("sandbox ready");
        }),
    )
    .forwarded_ports(config.ports.iter().map(|&(_, guest)| guest).collect());
    if config.ephemeral {
        mux = mux.ends_with_clients();
    }
    if let Some(snapshots) = snapshots {
        mux = mux.with_snapshots(snapshots);
    }
    if !config.substitutions.is_empty() {
        let placeholders: Vec<(String, String)> = config
            .substitutions
            .iter()
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect();
        mux = mux.with_exec_env(crate::secrets::guest_trust::workload_env(&placeholders));
    }
    let result = tier.and_then(|_| execute_workload(&options, &spec, Workload::Session(&mut mux)));
    // The latest state (ready, with its times) is the base of the last one.
    if let Ok(Some(latest)) = sandbox.state() {
        state = latest;
    }
    let code = match &result {
        Ok(_) if mux.ended_because() == Some("pause") => match pause::seal_and_keep(&sandbox) {
            Ok(()) => {
                state.status = Status::Paused;
                state.reason = Some("pause".to_owned());
                state.epoch = epoch.saturating_add(1);
                state.ttl_left_secs = Some(
                    state
                        .expires
                        .map_or(ttl_secs, |end| end.seconds_since(UtcTime::now()).max(1)),
                );
                state.expires = None;
                0
            }
            Err(e) => {
                state.status = Status::Failed;
                state.reason = Some(format!("pause: {e}"));
                eprintln!("mvm: sandbox {}: pause: {e}", config.id);
                1
            }
        },
        Ok(outcome) => {
            state.status = Status::Stopped;
            state.reason = Some(
                mux.ended_because()
                    .unwrap_or(if outcome.status.timed_out {
                        "ttl"
                    } else {
                        "stop"
                    })
                    .to_owned(),
            );
            0
        }
        Err(e) => {
            state.status = Status::Failed;
            state.reason = Some(e.to_string());
            let code = exit::for_error(e);
            state.exit_code = Some(code);
            eprintln!("mvm: sandbox {}: {e}", config.id);
            code
        }
    };
    save(&state);
    // An ephemeral sandbox that ran leaves nothing behind but its records in the
    // audit log. One that failed stays, for its maker to read why and remove.
    if config.ephemeral && result.is_ok() {
        if let Some(root) = dir.parent() {
            if let Err(e) = sandbox.remove(root) {
                tracing::error!("{e}");
            }
        }
    }
    code
}
