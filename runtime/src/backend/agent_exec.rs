//! One command driven through a connected guest agent: the exec request sent, stdin
//! streamed in, output into the sink, Ctrl-C passed on, the host's deadline kept, until
//! the workload's status. Shared by the backends whose agent this process talks to
//! (`kvm`, `container`); what holds the workload (a VMM, a container's init) is a
//! [`Holder`].

use std::io::Read;
use std::time::{Duration, Instant};

use std::sync::mpsc;

use mvm_agent::client::ExecStdin;
use mvm_agent::protocol::{ExecRequest, WriteFileRequest};
use mvm_agent::{Client, ClientError, ExecEvent, Stdin};

use super::interrupt::{Action, Forwarder};
use super::{stdin_pump, OutputSink, RunError, RunSpec, StdinMode, WorkloadStatus};
use crate::secrets::{Delivery, Secret};

/// How often the loop looks at Ctrl-C, the deadline and the holder.
const POLL: Duration = Duration::from_millis(50);
/// Time the agent gets beyond the workload timeout to report it before the host
/// stops the holder itself.
const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// Bytes read from stdin per frame.
const STDIN_CHUNK: usize = 64 << 10;

/// What holds the workload: a VMM process, a container's init.
pub(crate) trait Holder {
    /// Its end, as the run's error, once it has ended.
    fn ended(&mut self) -> Option<RunError>;
    /// Stops it at once.
    fn kill(&mut self);
    /// The run's error for a failed agent call (the holder's end explains it when it
    /// ended).
    fn agent_error(&mut self, e: &ClientError) -> RunError;
}

/// The uid and gid that own a released secret's file and run the workload:
/// the agent's unprivileged default.
const SECRET_OWNER: u32 = mvm_agent::protocol::DEFAULT_WORKLOAD_ID;

/// Writes each file secret to its file in the guest (`/run/secrets/NAME`, the
/// agent's own tmpfs), mode 0400, owned by [`SECRET_OWNER`]. (Environment
/// secrets go in the exec request.)
pub(crate) fn deliver_secrets(client: &Client, secrets: &[Secret]) -> Result<(), ClientError> {
    for secret in secrets.iter().filter(|s| s.delivery == Delivery::File) {
        let request = WriteFileRequest {
            path: secret.guest_path(),
            mode: 0o400,
            uid: Some(SECRET_OWNER),
            gid: Some(SECRET_OWNER),
            append: false,
            atomic: false,
        };
        client.write_file_with(&request, secret.value.expose())?;
        tracing::info!(name = %secret.name, "secret delivered");
    }
    Ok(())
}

/// Asks the agent to power the guest off, without waiting on a hung agent
/// for longer than `grace`.
pub(crate) fn shutdown_guest(client: Client, grace: Duration) {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let _ = tx.send(client.shutdown());
        });
    if spawned.is_ok() {
        match rx.recv_timeout(grace) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("agent shutdown: {e}"),
            Err(_) => tracing::debug!("agent shutdown: no answer within {grace:?}"),
        }
    }
}

/// The exec request for the spec's command, with the secrets released for it: the
/// workload's identity made explicit when it owns a secret file, and each
/// environment secret in its environment.
pub(crate) fn workload_request(spec: &RunSpec, secrets: &[Secret]) -> ExecRequest {
    let mut request = ExecRequest {
        argv: spec.argv.clone(),
        env: spec.env.clone(),
        cwd: spec.workdir.clone(),
        timeout_ms: spec.timeout_secs.map(|s| s.saturating_mul(1000)),
        uid: (!secrets.is_empty()).then_some(SECRET_OWNER),
        gid: (!secrets.is_empty()).then_some(SECRET_OWNER),
        ..ExecRequest::default()
    };
    for secret in secrets.iter().filter(|s| s.delivery == Delivery::Env) {
        // Checked at admission: UTF-8 without NUL.
        if let Some(value) = secret.env_value() {
            request.env.insert(secret.name.clone(), value);
        }
    }
    request
}

/// Copies `source` into the workload's stdin (see [`stdin_pump`]), then closes it.
fn forward_stdin(source: Box<dyn Read + Send>, writer: ExecStdin) -> Result<(), RunError> {
    stdin_pump::spawn("stdin", source, STDIN_CHUNK, move |data| {
        if data.is_empty() {
            // The process may have exited already; a failed close is moot.
            let _ = writer.close();
            return false;
        }
        writer
            .write(data)
            .map_err(|e| tracing::debug!("stdin: {e}"))
            .is_ok()
    })
    .map_err(RunError::io("starting the stdin thread"))
}

/// Runs `request` through `client` until the workload's status. Stdin is read only
/// when `mode` forwards it. A first Ctrl-C or SIGTERM is passed to the workload; after
/// the grace period, or at a second, the workload is killed and the run ends with
/// [`RunError::Interrupted`] (the caller stops the holder). Past the timeout and its
/// grace, the holder is killed here and the run ends with [`RunError::Timeout`].
pub(crate) fn run_command(
    client: &Client,
    request: &ExecRequest,
    (mode, stdin): (StdinMode, Option<Box<dyn Read + Send>>),
    sink: &mut dyn OutputSink,
    timeout_secs: Option<u64>,
    holder: &mut dyn Holder,
) -> Result<WorkloadStatus, RunError> {
    let forward = match (mode, stdin) {
        (StdinMode::Forward, Some(source)) => Some(source),
        _ => None,
    };
    let stdin_mode = if forward.is_some() {
        Stdin::Stream
    } else {
        Stdin::Null
    };
    let mut exec = client
        .exec(request, stdin_mode)
        .map_err(|e| holder.agent_error(&e))?;
    if let Some(source) = forward {
        forward_stdin(source, exec.stdin())?;
    }
    let host_deadline =
        timeout_secs.map(|s| Instant::now() + Duration::from_secs(s) + TIMEOUT_GRACE);
    let mut interrupts = Forwarder::new();
    loop {
        match interrupts.poll() {
            Action::None => {}
            Action::Forward(signal) => {
                tracing::info!(signal, "passing the signal to the workload");
                if let Err(e) = exec.signal(signal) {
                    tracing::warn!("forwarding signal {signal} to the workload: {e}");
                }
            }
            Action::Kill => {
                let _ = exec.signal(libc::SIGKILL);
                return Err(RunError::Interrupted);
            }
        }
        if host_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            holder.kill();
            return Err(RunError::Timeout(Duration::from_secs(
                timeout_secs.unwrap_or(0),
            )));
        }
        match exec.next_event_timeout(POLL) {
            Ok(Some(ExecEvent::Stdout(data))) => sink
                .stdout(&data)
                .map_err(RunError::io("writing the workload's stdout"))?,
            Ok(Some(ExecEvent::Stderr(data))) => sink
                .stderr(&data)
                .map_err(RunError::io("writing the workload's stderr"))?,
            Ok(Some(ExecEvent::Exit(status))) => {
                return Ok(WorkloadStatus {
                    code: status.code,
                    signal: status.signal,
                    timed_out: status.timed_out,
                })
            }
            Ok(None) => return Err(RunError::Agent("exec ended without a status".into())),
            Err(ClientError::Timeout(_)) => {
                if let Some(ended) = holder.ended() {
                    return Err(ended);
                }
            }
            Err(e) => return Err(holder.agent_error(&e)),
        }
    }
}

/// The run's workload on a connected agent, as the tiers without a VMM of mvm's run it
/// (`container`, `vz`): the secrets released for it delivered first, then the command
/// ([`run_command`]) or the session (on the connection `session` opens). Returns the
/// status and the client, for the caller to power the guest off; on Ctrl-C the guest is
/// told to power off and the holder killed here.
pub(crate) fn run_workload<H: Holder + super::session::VmProbe>(
    client: Client,
    spec: &RunSpec,
    workload: super::Workload<'_>,
    journal: &mut dyn super::RunJournal,
    holder: &mut H,
    session: impl FnOnce() -> std::io::Result<std::os::unix::net::UnixStream>,
) -> Result<(WorkloadStatus, Client), RunError> {
    // Written ahead: the verified start and each secret's release are on disk before
    // the workload starts.
    let secrets = journal.workload_starting()?;
    deliver_secrets(&client, &secrets).map_err(|e| holder.agent_error(&e))?;
    let status = match workload {
        super::Workload::Command { sink, stdin } => {
            let request = workload_request(spec, &secrets);
            drop(secrets);
            match run_command(
                &client,
                &request,
                (spec.stdin, stdin),
                sink,
                spec.timeout_secs,
                holder,
            ) {
                Ok(status) => status,
                Err(RunError::Interrupted) => {
                    shutdown_guest(client, Duration::from_millis(500));
                    holder.kill();
                    return Err(RunError::Interrupted);
                }
                Err(e) => return Err(e),
            }
        }
        super::Workload::Session(server) => {
            if secrets.iter().any(|s| s.delivery == Delivery::Env) {
                return Err(RunError::Missing(
                    "a session takes secrets as files only (--secret), not in an environment"
                        .into(),
                ));
            }
            drop(secrets);
            let stream =
                session().map_err(|e| RunError::Agent(format!("session connection: {e}")))?;
            server.serve(stream, journal, holder)?
        }
    };
    Ok((status, client))
}
