//! The `kvm` backend: `mvm-vmm` on this host's KVM, the workload run through
//! the guest agent over the VMM's hybrid vsock socket.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use mvm_agent::protocol::WriteFileRequest;
use mvm_agent::transport::connect_hybrid_vsock;
use mvm_agent::{Client, ClientError};

use super::agent_exec::{deliver_secrets, shutdown_guest};
use super::interrupt;
use super::scratch::ScratchDir;
use super::session::{SessionSnapshots, SNAPSHOT_PLAN_FILE};
use super::vmm_process::{read_boot_report, vmm_args_with, SnapshotArgs, VmmProcess};
use super::warm::{self, Warm};
use super::{
    NoJournal, OutputSink, PlanFiles, RunArtifacts, RunError, RunJournal, RunOutcome, RunSpec,
    Tier, Timings, VmProbe, Workload, WorkloadStatus,
};
use crate::secrets::Delivery;

/// How often the run loop looks at Ctrl-C, deadlines and the VMM.
const POLL: Duration = Duration::from_millis(50);
/// Time the VM gets to power off after the agent acknowledged shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Connects to the agent: retries the hybrid-vsock handshake until the guest
/// listens, then exchanges hellos and pings. Gives up when the VMM dies, on
/// Ctrl-C, or after `timeout`.
fn wait_for_agent(
    vmm: &mut VmmProcess,
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(Client, Option<u64>), RunError> {
    let start = Instant::now();
    let mut last = String::from("the VMM has not created its vsock socket");
    loop {
        if interrupt::requested() {
            return Err(RunError::Interrupted);
        }
        if let Some(status) = vmm.try_exit() {
            return Err(vmm.died(status));
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(RunError::AgentNotReady {
                timeout,
                reason: last,
                log: vmm.log_tail(),
            });
        }
        let left = timeout.saturating_sub(elapsed).min(Duration::from_secs(5));
        if uds.exists() {
            match connect_hybrid_vsock(uds, port, left) {
                Ok(stream) => match Client::connect_with_timeout(stream, Some(left)) {
                    Ok(client) => match client.ping_timeout(Some(left)) {
                        Ok(info) => return Ok((client, Some(info.boot_ms))),
                        Err(e) => last = format!("ping: {e}"),
                    },
                    Err(e) => last = format!("hello: {e}"),
                },
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Secret substitution's guest side: the run's CA in its own file and appended to the
/// system bundle (created when the image has none), and the bound names' pinned
/// addresses appended to `/etc/hosts`. Nothing here is secret.
pub(crate) fn provision_trust(
    client: &Client,
    trust: &crate::secrets::guest_trust::GuestTrust,
) -> Result<(), ClientError> {
    use crate::secrets::guest_trust::{hosts_lines, GUEST_CA_BUNDLE, GUEST_CA_FILE};
    for dir in ["/etc/ssl", "/etc/ssl/certs"] {
        client.make_dir(&mvm_agent::protocol::MakeDirRequest {
            path: dir.to_owned(),
            mode: 0o755,
            uid: None,
            gid: None,
        })?;
    }
    let file = |path: &str, append: bool| WriteFileRequest {
        path: path.to_owned(),
        mode: if append { 0o644 } else { 0o444 },
        uid: None,
        gid: None,
        append,
        atomic: false,
    };
    let pem = trust.ca_pem.as_bytes();
    client.write_file_with(&file(GUEST_CA_FILE, false), pem)?;
    let mut bundled = b"\n".to_vec();
    bundled.extend_from_slice(pem);
    client.write_file_with(&file(GUEST_CA_BUNDLE, true), &bundled)?;
    client.write_file_with(&file("/etc/hosts", true), hosts_lines(trust).as_bytes())?;
    tracing::info!(
        hosts = trust.hosts.len(),
        "egress CA and bound hosts written into the guest"
    );
    Ok(())
}

/// Bytes of host entropy a restored guest gets.
const RESEED_BYTES: usize = 64;
/// How long the VMM gets to pause and write a snapshot.
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(120);

/// Tells a restored guest's agent, before anything else runs in it, its new entropy
/// (from this host's CSPRNG), its sandbox id and hostname, and the host's clock.
fn reseed(client: &Client, sandbox_id: &str) -> Result<(), ClientError> {
    use rand_core::{OsRng, RngCore};
    let mut entropy = vec![0u8; RESEED_BYTES];
    OsRng.fill_bytes(&mut entropy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok());
    let done = client.reseed(&mvm_agent::protocol::ReseedRequest {
        entropy,
        sandbox_id: sandbox_id.to_owned(),
        hostname: None,
        unix_time_ns: now,
    })?;
    tracing::info!(
        entropy_bits = done.entropy_bits,
        crng_reseeded = done.crng_reseeded,
        clock_step_ms = ?done.clock_step_ms,
        "restored guest reseeded"
    );
    Ok(())
}

/// Pauses the VM into `snapshots.write_to` (SIGUSR2; the VMM pauses, writes and exits
/// `snapshotted`) and copies the plan that booted it beside the snapshot. Any other
/// ending is an error: the sandbox is then not paused.
fn take_snapshot(
    vmm: &mut VmmProcess,
    report: &Path,
    plan: Option<&PlanFiles>,
    snapshots: &SessionSnapshots,
) -> Result<(), RunError> {
    let failed = |why: String, vmm: &VmmProcess| RunError::VmmDied {
        reason: format!("snapshot not taken: {why}"),
        log: vmm.log_tail(),
        exit: None,
    };
    vmm.signal(libc::SIGUSR2)
        .map_err(|e| failed(format!("signalling mvm-vmm: {e}"), vmm))?;
    let Some(status) = vmm.wait_for(SNAPSHOT_LIMIT) else {
        vmm.kill();
        return Err(failed(
            format!("mvm-vmm did not finish within {SNAPSHOT_LIMIT:?}"),
            vmm,
        ));
    };
    let reason = read_boot_report(report).and_then(|r| {
        r.get("exit_reason")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    if !status.success() || reason.as_deref() != Some("snapshotted") {
        return Err(failed(
            format!("mvm-vmm ended with {status}, exit reason {reason:?}"),
            vmm,
        ));
    }
    if let Some(plan) = plan {
        let to = snapshots.write_to.join(SNAPSHOT_PLAN_FILE);
        std::fs::copy(&plan.envelope, &to).map_err(RunError::io(format!(
            "copying the plan to {}",
            to.display()
        )))?;
    }
    Ok(())
}

/// Takes the image's warm snapshot from the VM that just answered: SIGUSR2, the VMM
/// writes it into `tmp` and goes on (`--snapshot-continue`), then it is sealed and kept
/// as `dir` (with no `dir`, left in `tmp` unsealed for the caller). A failure is logged,
/// `tmp` removed, and costs only the warm start of later runs.
fn take_warm_snapshot(vmm: &mut VmmProcess, tmp: &Path, dir: Option<&Path>) {
    let written = (|| {
        vmm.signal(libc::SIGUSR2)
            .map_err(|e| format!("signalling mvm-vmm: {e}"))?;
        let deadline = Instant::now() + SNAPSHOT_LIMIT;
        let manifest = tmp.join("manifest.json");
        while !std::fs::metadata(&manifest).is_ok_and(|m| m.len() > 0) {
            if vmm.try_exit().is_some() || Instant::now() > deadline {
                return Err("mvm-vmm wrote no snapshot".to_owned());
            }
            std::thread::sleep(POLL);
        }
        match dir {
            Some(dir) => warm::keep(tmp, dir),
            None => Ok(()),
        }
    })();
    match written {
        Ok(()) => tracing::info!(dir = %dir.unwrap_or(tmp).display(), "warm snapshot kept"),
        Err(e) => {
            tracing::warn!("warm snapshot not taken: {e}");
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// How long a broken agent connection waits for the VMM to be seen dead.
const DEATH_WAIT: Duration = Duration::from_secs(1);

fn agent_error(vmm: &mut VmmProcess, e: &ClientError) -> RunError {
    // A dead VMM explains a broken connection better than the connection does;
    // the connection may break a moment before its process can be reaped.
    let start = Instant::now();
    while start.elapsed() < DEATH_WAIT {
        if let Some(status) = vmm.try_exit() {
            return vmm.died(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    RunError::Agent(e.to_string())
}

/// Boots `artifacts.image` with `artifacts.vmm` in `--dev` mode (nothing
/// verified), runs `spec` through the agent, streams its output into `sink`,
/// and stops the VM. `stdin` is read only when `spec.stdin` is
/// [`super::StdinMode::Forward`].
pub fn run(
    spec: &RunSpec,
    artifacts: &RunArtifacts,
    sink: &mut dyn OutputSink,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<RunOutcome, RunError> {
    run_verified(
        spec,
        artifacts,
        None,
        &mut NoJournal,
        Workload::command(sink, stdin),
    )
}

/// The session's view of a local VMM.
struct LocalVm<'a>(&'a mut VmmProcess);

impl VmProbe for LocalVm<'_> {
    fn ended(&mut self) -> Option<String> {
        self.0
            .try_exit()
            .map(|status| format!("mvm-vmm exited ({status})"))
    }
}

impl super::agent_exec::Holder for LocalVm<'_> {
    fn ended(&mut self) -> Option<RunError> {
        let status = self.0.try_exit()?;
        Some(self.0.died(status))
    }

    fn kill(&mut self) {
        self.0.kill();
    }

    fn agent_error(&mut self, e: &ClientError) -> RunError {
        agent_error(self.0, e)
    }
}

/// [`run`], with the VMM verifying `plan` (signature, window, nonce,
/// measurements) before it creates the VM; `None` boots `--dev`. `journal`
/// hears when the workload is about to start (after the agent answered,
/// before exec is sent). A [`Workload::Session`] gets its own agent connection
/// instead of the spec's command, and the VM stops when it returns.
pub fn run_verified(
    spec: &RunSpec,
    artifacts: &RunArtifacts,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    workload: Workload<'_>,
) -> Result<RunOutcome, RunError> {
    let start = Instant::now();
    let scratch = ScratchDir::create().map_err(RunError::io("creating the run directory"))?;
    let uds = scratch.path().join("vsock");
    let log = scratch.path().join("vmm.log");
    let report = scratch.path().join("boot.json");
    let snapshots = match &workload {
        Workload::Session(server) => server.snapshots().cloned(),
        Workload::Command { .. } => None,
    };
    // A one-shot command, admitted and eligible, may start warm (`warm`).
    let plan_doc = plan.filter(|_| artifacts.warm.wanted()).and_then(|p| {
        std::fs::read(&p.envelope)
            .ok()
            .and_then(|e| mvm_loader::plan::envelope::decode_plan_unverified(&e).ok())
    });
    let mut warm = match (&workload, &plan_doc) {
        (Workload::Command { .. }, Some(doc)) if warm::eligible(doc) => {
            artifacts
                .warm
                .choose(&artifacts.image, &artifacts.vmm, spec)
        }
        _ => None,
    };
    let ready_timeout = Duration::from_secs(spec.ready_timeout_secs);
    let port = artifacts.image.manifest.agent_vsock_port;
    let (mut vmm, mut net, client, guest_boot_ms) = loop {
        let snapshot_args = match (&snapshots, &warm) {
            (Some(s), _) => s.vmm_args(),
            (None, Some(Warm::Restore(dir))) => SnapshotArgs {
                restore: Some((dir.clone(), 0)),
                ..SnapshotArgs::default()
            },
            (None, Some(Warm::Take { tmp, .. } | Warm::TakeUnsealed(tmp))) => SnapshotArgs {
                write_to: Some((tmp.clone(), 0)),
                continue_after: true,
                bind_artifacts: true,
                ..SnapshotArgs::default()
            },
            (None, None) => SnapshotArgs::default(),
        };
        // A sandbox's resume, or a warm start: the VMM will say `snapshot_restored`.
        journal.restoring(
            matches!(warm, Some(Warm::Restore(_)))
                || snapshots.as_ref().is_some_and(|s| s.restore.is_some()),
        );
        let mut args = vmm_args_with(&artifacts.image, spec, &uds, &report, plan, &snapshot_args);
        // netrt: --net (the host network is torn down when `net` drops, after the VMM).
        let net = crate::net::run::attach(spec, scratch.path(), plan.is_some(), &mut args)?;
        let _ = std::fs::remove_file(&uds);
        let mut vmm = VmmProcess::spawn(&artifacts.vmm, &args, &log)?;
        match wait_for_agent(&mut vmm, &uds, port, ready_timeout) {
            Ok((client, boot_ms)) => break (vmm, net, client, boot_ms),
            // A warm snapshot the VMM refuses (another VMM build, a changed file, a
            // plan that no longer pins the same) is dropped, and this run boots: its
            // plan's nonce was not spent by the refusal.
            Err(RunError::BootRefused { reason, .. }) if matches!(warm, Some(Warm::Restore(_))) => {
                if let Some(Warm::Restore(dir)) = warm.take() {
                    tracing::warn!(%reason, "warm snapshot refused; dropped, booting instead");
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Err(e) => {
                if let Some(w) = &warm {
                    warm::discard(w);
                }
                return Err(e);
            }
        }
    };
    match &warm {
        Some(Warm::Restore(_)) => {
            // Before anything else runs in it: this VM's own entropy, identity and clock.
            let id = plan_doc.as_ref().map_or("run", |d| d.plan_id.as_str());
            reseed(&client, id).map_err(|e| agent_error(&mut vmm, &e))?;
        }
        Some(Warm::Take { tmp, dir }) => take_warm_snapshot(&mut vmm, tmp, Some(dir)),
        Some(Warm::TakeUnsealed(dir)) => take_warm_snapshot(&mut vmm, dir, None),
        None => {}
    }
    if let Some(from) = snapshots.as_ref().and_then(|s| s.restore.as_ref()) {
        // Before anything else runs in it: this VM's own entropy, identity and clock.
        reseed(&client, &from.sandbox_id).map_err(|e| agent_error(&mut vmm, &e))?;
    }
    let warm_start = matches!(warm, Some(Warm::Restore(_)));
    let ready = Instant::now();

    // Written ahead: the boot, each secret's release and the workload's start
    // are on disk before exec; the secrets go in before the workload starts.
    let secrets = journal.workload_starting()?;
    // The emulated tier's test host: the egress proxy starts here, beside the tap.
    let proxy_listener = net
        .as_mut()
        .and_then(|n| n.session.as_mut())
        .and_then(crate::net::session::NetSession::take_proxy_listener);
    let guest = spec
        .net
        .as_ref()
        .and_then(|n| n.interface.as_ref())
        .map(|i| i.address);
    journal.serve_substitution(proxy_listener, guest)?;
    deliver_secrets(&client, &secrets).map_err(|e| agent_error(&mut vmm, &e))?;
    if let Some(trust) = &spec.egress_trust {
        provision_trust(&client, trust).map_err(|e| agent_error(&mut vmm, &e))?;
    }
    let request = super::agent_exec::workload_request(spec, &secrets);
    let env_secrets = secrets.iter().any(|s| s.delivery == Delivery::Env);
    drop(secrets);
    let (sink, stdin) = match workload {
        Workload::Command { sink, stdin } => (sink, stdin),
        Workload::Session(server) => {
            if env_secrets {
                return Err(RunError::Missing(
                    "a session takes secrets as files only (--secret), not in an environment"
                        .into(),
                ));
            }
            let stream = connect_hybrid_vsock(&uds, port, ready_timeout)
                .map_err(|e| RunError::Agent(format!("session connection: {e}")))?;
            let status = server.serve(stream, journal, &mut LocalVm(&mut vmm))?;
            if let (true, Some(snapshots)) = (server.pause_requested(), snapshots.as_ref()) {
                drop(client);
                let vmm_memory = super::vmm_memory::measure(vmm.pid());
                take_snapshot(&mut vmm, &report, plan, snapshots)?;
                drop(scratch);
                return Ok(RunOutcome {
                    status,
                    timings: Timings {
                        boot_ms: millis(ready.duration_since(start)),
                        exec_ms: millis(ready.elapsed()),
                        shutdown_ms: 0,
                        total_ms: millis(start.elapsed()),
                        guest_boot_ms,
                        host_boot_ms: None,
                        testhost_spare: false,
                        warm_unpack_ms: None,
                        warm_start: false,
                    },
                    tier: Tier::Kvm,
                    boot_report: read_boot_report(&report),
                    plan_id: None,
                    vmm_memory,
                });
            }
            return Ok(finish(
                client,
                &mut vmm,
                scratch,
                &report,
                (start, ready),
                guest_boot_ms,
                status,
            ));
        }
    };
    let status = match super::agent_exec::run_command(
        &client,
        &request,
        (spec.stdin, stdin),
        sink,
        spec.timeout_secs,
        &mut LocalVm(&mut vmm),
    ) {
        Ok(status) => status,
        Err(RunError::Interrupted) => {
            shutdown_guest(client, Duration::from_millis(500));
            vmm.kill();
            return Err(RunError::Interrupted);
        }
        Err(e) => return Err(e),
    };
    let mut outcome = finish(
        client,
        &mut vmm,
        scratch,
        &report,
        (start, ready),
        guest_boot_ms,
        status,
    );
    outcome.timings.warm_start = warm_start;
    Ok(outcome)
}

/// Powers the guest off, stops the VMM and puts the outcome together.
fn finish(
    client: Client,
    vmm: &mut VmmProcess,
    scratch: ScratchDir,
    report: &Path,
    (start, ready): (Instant, Instant),
    guest_boot_ms: Option<u64>,
    status: WorkloadStatus,
) -> RunOutcome {
    let exited = Instant::now();
    let vmm_memory = super::vmm_memory::measure(vmm.pid());
    shutdown_guest(client, SHUTDOWN_GRACE);
    if vmm.stop(SHUTDOWN_GRACE).is_none() {
        tracing::warn!("mvm-vmm did not exit after shutdown");
    }
    let stopped = Instant::now();
    let boot_report = read_boot_report(report);
    drop(scratch);
    RunOutcome {
        status,
        timings: Timings {
            boot_ms: millis(ready.duration_since(start)),
            exec_ms: millis(exited.duration_since(ready)),
            shutdown_ms: millis(stopped.duration_since(exited)),
            total_ms: millis(stopped.duration_since(start)),
            guest_boot_ms,
            host_boot_ms: None,
            testhost_spare: false,
            warm_unpack_ms: None,
            warm_start: false,
        },
        tier: Tier::Kvm,
        boot_report,
        plan_id: None,
        vmm_memory,
    }
}
