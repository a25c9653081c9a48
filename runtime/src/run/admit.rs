//! Admission, audit and the receipt around one `mvm run`.
//!
//! [`admit_run`] turns the command line into an [`AdmissionRequest`], checks it
//! against the host policy, signs the plan with the host admission key and
//! writes the files `mvm-vmm --plan --trust --replay-store --events` reads; a
//! denial is audited as `plan_denied` and the run stops there.
//!
//! The run's records are written ahead, in the order things happen:
//! `plan_admitted` before launch (with the run's marker in `open-runs/`, see
//! [`crate::audit::open_runs`]); the VMM's events so far (its `boot_verified`)
//! and `exec_started` when the guest answered and before the workload starts
//! ([`Admitted`] is the backend's [`RunJournal`]); after the backend returns,
//! [`Admitted::finish`] appends the VMM's later events, `exec_exited` and
//! `vm_exited` (the VMM's, or one saying why the VM ended: `vm_process_died`
//! with the status or signal, `boot_refused`, `stopped_by_mvm`), closes the
//! marker and, when asked, writes the signed receipt. So a VM killed mid-run
//! leaves `boot_verified`, `exec_started` and `vm_exited`, and a `mvm` killed
//! mid-run leaves an open marker that the next command closes with
//! `run_abandoned`.
//!
//! The audit key and the admission key never leave this process: the VMM (and,
//! for the emulated tier, the test host) gets the envelope and the admission
//! public key only, and hands its events back as a file.

use std::io::Read;
use std::path::{Path, PathBuf};

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::SignedPlan;
use mvm_loader::plan::{self, UtcTime};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use super::{exit, RunRequest};
use crate::admission::keys::config_dir;
use crate::admission::{
    admit, AdmissionRequest, AdmitError, Denial, HostKeys, ImageFacts, Policy, Rule,
};
use crate::audit::vmm_events::vmm_event;
use crate::audit::{self, AuditEvent, AuditLog, EventKind, OpenRun};
use crate::backend::scratch::ScratchDir;
use crate::backend::{OutputSink, PlanFiles, RunError, RunJournal, RunOutcome, Tier};
use crate::image::{ImageStore, StoredImage};
use crate::receipt::{self, command_digest, AuditRange, Measurements, RunPredicate};

/// The replay store's file name in the data directory (the VMM's default too).
pub const REPLAY_STORE: &str = "replay-nonces";
/// The most of a VMM events file read back.
const MAX_EVENTS_FILE: u64 = 16 << 20;

/// `--dev` skips admission, not the policy's memory maximum: a development run
/// may not ask the host for more than its owner allows any VM. Not audited
/// (`--dev` writes nothing to the log); the denial is the run's error.
pub fn check_dev_memory(mem_mib: u32) -> Result<(), RunError> {
    let config = config_dir().map_err(|e| admission_error("config directory")(e.to_string()))?;
    let policy =
        Policy::load_or_default(&config).map_err(|e| admission_error("policy")(e.to_string()))?;
    crate::admission::check_memory_rule(mem_mib, &policy).map_err(RunError::Denied)
}

/// The plan tier a backend gives.
pub fn plan_tier(tier: Tier) -> plan::Tier {
    match tier {
        Tier::Kvm => plan::Tier::Hardware,
        Tier::Emulated => plan::Tier::Emulated,
    }
}

fn admission_error(what: &str) -> impl FnOnce(String) -> RunError + '_ {
    move |e| RunError::Missing(format!("admission: {what}: {e}"))
}

/// The request a run makes. Without `--timeout` the workload gets the
/// policy's longest timeout, and that is what the plan records and the run
/// enforces.
pub fn admission_request(run: &RunRequest, policy: &Policy) -> AdmissionRequest {
    let mut request = AdmissionRequest::new(&run.image);
    request.vcpus = run.cpus;
    request.memory_mib = run.mem_mib;
    request.timeout_secs = run
        .timeout_secs
        .map_or(policy.limits.max_timeout_secs, |t| {
            u32::try_from(t).unwrap_or(u32::MAX)
        });
    request
}

fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    OsRng.fill_bytes(&mut bytes);
    format!("{prefix}-{}", hex::encode(bytes))
}

/// A run that admission signed: its plan, its VM id and the files for the VMM.
pub struct Admitted {
    keys: HostKeys,
    log: AuditLog,
    /// The signed plan.
    pub signed: SignedPlan,
    /// The VM id the supervisor gave this run.
    pub vm_id: String,
    /// What the VMM is started with.
    pub files: PlanFiles,
    /// The tier the run uses.
    pub tier: Tier,
    /// The command, hashed into `exec_started` (never logged).
    argv: Vec<String>,
    admitted_seq: u64,
    last_seq: u64,
    /// How far the VMM's events file has been appended.
    events_read: u64,
    /// The VMM's `boot_verified`, once appended.
    boot: Option<AuditEvent>,
    /// Whether `exec_started` is in the log.
    exec_started: bool,
    marker: Option<OpenRun>,
    _dir: ScratchDir,
}

/// Admits `run` for `image` on `tier`: loads (or creates) the host keys and
/// the policy, checks, signs, audits `plan_admitted` (or `plan_denied`), and
/// writes the envelope for the VMM. Nothing is launched.
pub fn admit_run(
    run: &RunRequest,
    image: &StoredImage,
    tier: Tier,
    net: Option<&mut crate::net::run::NetPrep>,
) -> Result<Admitted, RunError> {
    let config = config_dir().map_err(|e| admission_error("config directory")(e.to_string()))?;
    let data = crate::image::store::data_dir()?;
    admit_run_in(&config, &data, run, image, tier, net)
}

/// [`admit_run`] with the config directory (keys, policy) and the data
/// directory (image names, audit log, replay store) given.
pub fn admit_run_in(
    config: &Path,
    data: &Path,
    run: &RunRequest,
    image: &StoredImage,
    tier: Tier,
    net: Option<&mut crate::net::run::NetPrep>,
) -> Result<Admitted, RunError> {
    let started = std::time::Instant::now();
    let (keys, created) = HostKeys::load_or_create(config)
        .map_err(|e| admission_error("host keys")(e.to_string()))?;
    if created {
        eprintln!(
            "mvm: created the host's admission and audit keys in {}",
            config.display()
        );
    }
    let policy =
        Policy::load_or_default(config).map_err(|e| admission_error("policy")(e.to_string()))?;
    let log = AuditLog::new(data.join(audit::AUDIT_FILE), keys.audit.clone());
    report_abandoned(&log, data);

    let names: Vec<String> = ImageStore::at(data)
        .names()?
        .into_iter()
        .filter(|(_, digest)| *digest == image.digest)
        .map(|(name, _)| name)
        .collect();
    let mut facts = ImageFacts::from_stored(image, &names)
        .map_err(|e| admission_error("image")(e.to_string()))?;
    let mut request = admission_request(run, &policy);
    // netrt: --net's egress cap, the plan's net section and the pinned mvm.net= word.
    let mut policy = policy;
    if let Some(net) = net {
        let applied =
            crate::net::run::apply_to_admission(net, &mut request, &mut facts, &mut policy);
        if let Err(denial) = applied {
            return Err(deny(&log, &request, denial));
        }
    }
    let signed = match admit(&request, &facts, &policy, &keys.admission, UtcTime::now()) {
        Ok(signed) => signed,
        Err(AdmitError::Denied(denial)) => return Err(deny(&log, &request, denial)),
        Err(e) => return Err(admission_error("plan")(e.to_string())),
    };
    // The plan names the weakest tier allowed to run it.
    let given = plan_tier(tier);
    if given < signed.plan.required_tier {
        let denial = Denial {
            rule: Rule::MinimumTier,
            reason: format!(
                "backend '{tier}' gives tier {given}, weaker than the plan's required tier {}",
                signed.plan.required_tier
            ),
        };
        return Err(deny(&log, &request, denial));
    }
    let vm_id = random_id("vm");
    // The marker first: a mvm killed from here on is found by the next command.
    let marker = OpenRun::create(data, &signed.plan.plan_id, &vm_id)
        .map_err(|e| admission_error("audit")(e.to_string()))?;
    let admitted_seq = log
        .append(AuditEvent::plan_admitted(&signed))
        .map_err(|e| admission_error("audit")(e.to_string()))?;

    let dir = ScratchDir::create().map_err(RunError::io("creating the plan directory"))?;
    let envelope = dir.path().join("plan.dsse.json");
    std::fs::write(&envelope, signed.envelope.to_json())
        .map_err(RunError::io(format!("writing {}", envelope.display())))?;
    let files = PlanFiles {
        envelope,
        trust: config.join("admission.pub"),
        replay_store: data.join(REPLAY_STORE),
        events: dir.path().join("vmm-events.jsonl"),
    };
    tracing::info!(
        plan = %signed.plan.plan_id,
        digest = %signed.digest,
        admission_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "admitted (keys, policy, plan signed, plan_admitted appended)"
    );
    Ok(Admitted {
        keys,
        log,
        signed,
        vm_id,
        files,
        tier,
        argv: run.argv.clone(),
        admitted_seq,
        last_seq: admitted_seq,
        events_read: 0,
        boot: None,
        exec_started: false,
        marker: Some(marker),
        _dir: dir,
    })
}

/// Closes the runs whose `mvm` died ([`audit::close_abandoned`]) and says so on
/// stderr; a failure is reported, not fatal (the command goes on).
pub fn report_abandoned(log: &AuditLog, data: &Path) {
    match audit::close_abandoned(log, data) {
        Ok(closed) => {
            for run in closed {
                eprintln!(
                    "mvm: run {} (vm {}) was abandoned: its mvm (pid {}) is gone; run_abandoned appended (seq {})",
                    run.marker.plan_id, run.marker.vm_id, run.marker.pid, run.seq
                );
            }
        }
        Err(e) => eprintln!("mvm: closing abandoned runs: {e}"),
    }
}

/// Audits a denial (a log that cannot be written does not turn a denial into
/// an admission) and returns it as the run's error.
fn deny(log: &AuditLog, request: &AdmissionRequest, denial: Denial) -> RunError {
    if let Err(e) = log.append(AuditEvent::plan_denied(&request.image_ref, &denial)) {
        eprintln!("mvm: error: the denial could not be audited: {e}");
    }
    RunError::Denied(denial)
}

/// Passes output on and keeps its sha256 and size.
pub struct DigestSink<'a> {
    inner: &'a mut dyn OutputSink,
    stdout: (Sha256, u64),
    stderr: (Sha256, u64),
}

impl<'a> DigestSink<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn OutputSink) -> Self {
        Self {
            inner,
            stdout: (Sha256::new(), 0),
            stderr: (Sha256::new(), 0),
        }
    }

    /// `(stdout, stderr)` digests and sizes so far.
    pub fn digests(&self) -> OutputDigests {
        let done = |(h, n): &(Sha256, u64)| {
            let bytes: [u8; 32] = h.clone().finalize().into();
            (Sha256Digest(bytes), *n)
        };
        OutputDigests {
            stdout: done(&self.stdout),
            stderr: done(&self.stderr),
        }
    }
}

fn count(state: &mut (Sha256, u64), data: &[u8]) {
    state.0.update(data);
    state.1 = state
        .1
        .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
}

impl OutputSink for DigestSink<'_> {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        count(&mut self.stdout, data);
        self.inner.stdout(data)
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        count(&mut self.stderr, data);
        self.inner.stderr(data)
    }
}

/// Digests and sizes of what the workload wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputDigests {
    /// stdout.
    pub stdout: (Sha256Digest, u64),
    /// stderr.
    pub stderr: (Sha256Digest, u64),
}

/// What [`Admitted::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The run's records: `plan_admitted` .. its last one.
    pub audit: AuditRange,
    /// The receipt file, if one was written.
    pub receipt: Option<PathBuf>,
}

/// How a run ended, as far as the audit log is concerned.
fn ended_status(result: &Result<RunOutcome, RunError>) -> Option<(i32, Option<&'static str>)> {
    match result {
        Ok(outcome) => Some((exit::for_status(&outcome.status), None)),
        Err(RunError::Timeout(_)) => Some((exit::TIMEOUT, Some("timed_out"))),
        Err(RunError::Interrupted) => Some((exit::INTERRUPTED, Some("interrupted"))),
        Err(RunError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Some((exit::BROKEN_PIPE, Some("output_closed")))
        }
        Err(_) => None,
    }
}

/// Reads the VMM's events file (what is there: a VMM that died mid-run still
/// wrote some) and turns each line into an event for `vm_id` and `plan_id`.
/// A line without a plan id gets the admitted one: the supervisor knows which
/// plan it handed this VMM even when the VMM refused it before trusting it.
pub fn read_vmm_events(path: &Path, plan_id: &str, vm_id: &str) -> Vec<AuditEvent> {
    read_vmm_events_from(path, 0, false, plan_id, vm_id).0
}

/// [`read_vmm_events`] from byte `offset` on; also returns the offset after
/// what was read (where the next read starts). While the VMM runs
/// (`running`), a last line without its newline is being written and is left
/// for the next read.
pub fn read_vmm_events_from(
    path: &Path,
    offset: u64,
    running: bool,
    plan_id: &str,
    vm_id: &str,
) -> (Vec<AuditEvent>, u64) {
    use std::io::{Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let read = file.seek(SeekFrom::Start(offset)).and_then(|_| {
            file.take(MAX_EVENTS_FILE.saturating_sub(offset))
                .read_to_end(&mut bytes)
        });
        if let Err(e) = read {
            tracing::warn!("VMM events {}: {e}", path.display());
        }
    }
    if running {
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(whole);
    }
    let whole = bytes.len();
    let next = offset.saturating_add(u64::try_from(whole).unwrap_or(u64::MAX));
    let text = String::from_utf8_lossy(&bytes);
    let events = text
        .lines()
        .filter_map(|line| {
            let event = vmm_event(line, vm_id);
            if event.is_none() {
                tracing::warn!(
                    line = %crate::terminal::escape_controls(&line.chars().take(200).collect::<String>()),
                    "VMM event not recorded"
                );
            }
            event
        })
        .map(|mut event| {
            if event.plan_id.as_deref().is_none_or(str::is_empty) {
                event.plan_id = Some(plan_id.to_owned());
            }
            event
        })
        .collect();
    (events, next)
}

/// The `vm_exited` mvm writes when the VMM reported none: why the VM ended,
/// as far as `mvm` can tell from how the run ended. `vmm_reported` says
/// whether the VMM wrote any event (it writes `boot_verified` or
/// `boot_refused` before a guest runs): without one, a run that failed for
/// another reason never had a VM (`not_started`).
pub fn vm_ended(
    result: &Result<RunOutcome, RunError>,
    vmm_reported: bool,
    plan_id: &str,
    vm_id: &str,
) -> AuditEvent {
    match result {
        Err(RunError::VmmDied { exit, .. }) => {
            let status = exit.and_then(|e| e.code).unwrap_or(-1);
            let event = AuditEvent::vm_exited(plan_id, vm_id, "vm_process_died", status);
            match exit.and_then(|e| e.signal) {
                Some(signal) => event.field("signal", signal),
                None => event,
            }
        }
        Err(RunError::BootRefused { status, .. }) => {
            AuditEvent::vm_exited(plan_id, vm_id, "boot_refused", *status)
        }
        Ok(_) => AuditEvent::vm_exited(plan_id, vm_id, "stopped_by_mvm", -1),
        Err(e) if !vmm_reported => AuditEvent::vm_exited(plan_id, vm_id, "not_started", -1)
            .field("cause", exit::error_kind(e)),
        Err(e) => AuditEvent::vm_exited(plan_id, vm_id, "stopped_by_mvm", -1)
            .field("cause", exit::error_kind(e)),
    }
}

/// The records that close a run, in the order they happened: the VMM's later
/// events, with `exec_exited` before the VMM's `vm_exited`; when the VMM
/// reported no exit, `exec_exited` and then `fallback`.
pub fn closing_events(
    vmm: Vec<AuditEvent>,
    exec_exited: Option<AuditEvent>,
    fallback: AuditEvent,
) -> Vec<AuditEvent> {
    let mut exited = exec_exited;
    let mut saw_exit = false;
    let mut out = Vec::new();
    for event in vmm {
        if event.kind == EventKind::VmExited && !saw_exit {
            saw_exit = true;
            out.extend(exited.take());
        }
        out.push(event);
    }
    out.extend(exited);
    if !saw_exit {
        out.push(fallback);
    }
    out
}

/// The measurements the VMM reported in `boot_verified`, checked against the
/// plan it was given: a receipt states what was measured, and they must agree.
fn measured(events: &[AuditEvent], signed: &SignedPlan) -> Result<Measurements, String> {
    let boot = events
        .iter()
        .find(|e| e.kind == EventKind::BootVerified)
        .ok_or("the VMM reported no verified boot")?;
    let want = Measurements::of_plan(&signed.plan);
    let text = |name: &str| match boot.fields.get(name) {
        Some(audit::FieldValue::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let check = |name: &str, pinned: Option<String>| {
        if text(name) == pinned {
            Ok(())
        } else {
            Err(format!(
                "boot_verified {name} {:?} differs from the plan's {:?}",
                text(name),
                pinned
            ))
        }
    };
    check("kernel", Some(want.kernel.to_string()))?;
    check("initramfs", want.initramfs.map(|d| d.to_string()))?;
    check("cmdline", Some(want.cmdline.to_string()))?;
    check("plan_digest", Some(signed.digest.to_string()))?;
    for (name, root) in &want.disks {
        check(&format!("disk_{name}_root_hash"), Some(root.to_string()))?;
    }
    Ok(want)
}

impl Admitted {
    /// The plan id.
    pub fn plan_id(&self) -> &str {
        &self.signed.plan.plan_id
    }

    /// Appends the run's records and, if `receipt` is given and the workload
    /// ran to an end, writes the signed receipt there. `argv` is hashed, never
    /// logged. Returns the audit range, or why the evidence is incomplete.
    pub fn finish(
        mut self,
        argv: &[String],
        result: &Result<RunOutcome, RunError>,
        output: OutputDigests,
        times: (UtcTime, UtcTime),
        receipt: Option<&Path>,
    ) -> Result<Evidence, String> {
        let plan_id = self.plan_id().to_owned();
        let vm_id = self.vm_id.clone();
        let (vmm, _) = read_vmm_events_from(
            &self.files.events,
            self.events_read,
            false,
            &plan_id,
            &vm_id,
        );
        if self.boot.is_none() {
            self.boot = vmm
                .iter()
                .find(|e| e.kind == EventKind::BootVerified)
                .cloned();
        }
        let measurements = measured(self.boot.as_slice(), &self.signed);
        // Only a workload that started can have ended.
        let exec_exited =
            ended_status(result)
                .filter(|_| self.exec_started)
                .map(|(status, how)| {
                    let event = AuditEvent::exec_exited(
                        &plan_id,
                        &vm_id,
                        status,
                        output.stdout,
                        output.stderr,
                    );
                    match how {
                        Some(how) => event.field(how, true),
                        None => event,
                    }
                });
        let vmm_reported = self.events_read > 0 || !vmm.is_empty();
        let ended = vm_ended(result, vmm_reported, &plan_id, &vm_id);
        let events = closing_events(vmm, exec_exited, ended);
        let mut last_seq = self.last_seq;
        for event in events {
            last_seq = self.log.append(event).map_err(|e| e.to_string())?;
        }
        // Closed in the log: no longer open. (On an error above the marker
        // stays, and the next command closes the run with run_abandoned.)
        if let Some(marker) = self.marker.take() {
            marker.close();
        }
        let audit = AuditRange {
            first_seq: self.admitted_seq,
            last_seq,
        };
        let Some(path) = receipt else {
            return Ok(Evidence {
                audit,
                receipt: None,
            });
        };
        let outcome = result
            .as_ref()
            .map_err(|e| format!("no receipt written: the run did not finish ({e})"))?;
        let measurements = measurements.map_err(|e| format!("no receipt written: {e}"))?;
        let predicate = RunPredicate {
            plan_id,
            vm_id,
            tier: plan_tier(self.tier),
            measurements,
            command_sha256: command_digest(argv),
            exit_status: exit::for_status(&outcome.status),
            stdout_sha256: output.stdout.0,
            stdout_bytes: output.stdout.1,
            stderr_sha256: output.stderr.0,
            stderr_bytes: output.stderr.1,
            started_at: times.0,
            finished_at: times.1,
            audit,
        };
        let statement = receipt::statement(self.signed.digest, predicate);
        let envelope =
            receipt::sign_receipt(&statement, &self.keys.audit).map_err(|e| e.to_string())?;
        std::fs::write(path, envelope.to_json())
            .map_err(|e| format!("no receipt written: {}: {e}", path.display()))?;
        Ok(Evidence {
            audit,
            receipt: Some(path.to_owned()),
        })
    }
}

impl RunJournal for Admitted {
    /// Appends the VMM's events so far (its `boot_verified` among them: it
    /// writes it before the guest runs) and `exec_started`.
    fn workload_starting(&mut self) -> Result<(), RunError> {
        let plan_id = self.plan_id().to_owned();
        let (events, next) = read_vmm_events_from(
            &self.files.events,
            self.events_read,
            true,
            &plan_id,
            &self.vm_id,
        );
        self.events_read = next;
        let evidence = |e: audit::AuditError| RunError::Missing(format!("evidence: {e}"));
        for event in events {
            if event.kind == EventKind::BootVerified && self.boot.is_none() {
                self.boot = Some(event.clone());
            }
            self.last_seq = self.log.append(event).map_err(evidence)?;
        }
        if self.boot.is_none() {
            return Err(RunError::Missing(
                "the VMM reported no verified boot before its guest answered; the workload was not started".into(),
            ));
        }
        let started = AuditEvent::exec_started(&plan_id, &self.vm_id, &self.argv);
        self.last_seq = self.log.append(started).map_err(evidence)?;
        self.exec_started = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::FieldValue;
    use crate::backend::{Timings, WorkloadStatus};

    fn events(kinds: &[EventKind]) -> Vec<AuditEvent> {
        kinds
            .iter()
            .map(|k| AuditEvent::new(*k).plan("p").vm("v"))
            .collect()
    }

    fn kinds(events: &[AuditEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn closing_records_are_in_the_order_they_happened() {
        let exited = AuditEvent::exec_exited(
            "p",
            "v",
            0,
            (Sha256Digest::of(b""), 0),
            (Sha256Digest::of(b""), 0),
        );
        let fallback = AuditEvent::vm_exited("p", "v", "stopped_by_mvm", -1);
        // The VMM's own exit comes after the workload's.
        let out = closing_events(
            events(&[EventKind::DeviceError, EventKind::VmExited]),
            Some(exited.clone()),
            fallback.clone(),
        );
        assert_eq!(
            kinds(&out),
            [
                EventKind::DeviceError,
                EventKind::ExecExited,
                EventKind::VmExited
            ]
        );
        assert!(!out.last().unwrap().fields.contains_key("cause"));
        // No exit from the VMM: mvm's, after the workload's.
        let out = closing_events(Vec::new(), Some(exited), fallback.clone());
        assert_eq!(kinds(&out), [EventKind::ExecExited, EventKind::VmExited]);
        assert_eq!(
            out.last().unwrap().fields["reason"],
            FieldValue::from("stopped_by_mvm")
        );
        // A refused boot: the refusal, and the VM's end.
        let out = closing_events(events(&[EventKind::BootRefused]), None, fallback);
        assert_eq!(kinds(&out), [EventKind::BootRefused, EventKind::VmExited]);
    }

    #[test]
    fn a_vm_that_died_is_recorded_with_its_signal_or_status() {
        let killed: Result<RunOutcome, RunError> = Err(RunError::VmmDied {
            reason: "x".into(),
            log: String::new(),
            exit: Some(crate::backend::ProcessEnd {
                code: None,
                signal: Some(9),
            }),
        });
        let e = vm_ended(&killed, true, "p", "v");
        assert_eq!(e.kind, EventKind::VmExited);
        assert_eq!(e.fields["reason"], FieldValue::from("vm_process_died"));
        assert_eq!(e.fields["signal"], FieldValue::from(9));
        assert_eq!(e.fields["status"], FieldValue::from(-1));
        let exited: Result<RunOutcome, RunError> = Err(RunError::VmmDied {
            reason: "x".into(),
            log: String::new(),
            exit: Some(crate::backend::ProcessEnd {
                code: Some(1),
                signal: None,
            }),
        });
        let e = vm_ended(&exited, true, "p", "v");
        assert_eq!(e.fields["status"], FieldValue::from(1));
        assert!(!e.fields.contains_key("signal"));
        let e = vm_ended(&Err(RunError::Interrupted), true, "p", "v");
        assert_eq!(e.fields["reason"], FieldValue::from("stopped_by_mvm"));
        assert_eq!(e.fields["cause"], FieldValue::from("interrupted"));
        assert!(e.validate().is_ok());
        // Stopped before the VMM said anything: there was no VM.
        let e = vm_ended(&Err(RunError::Interrupted), false, "p", "v");
        assert_eq!(e.fields["reason"], FieldValue::from("not_started"));
        let missing = Err(RunError::Missing("no mvm-vmm".into()));
        let e = vm_ended(&missing, false, "p", "v");
        assert_eq!(e.fields["cause"], FieldValue::from("missing"));
    }

    #[test]
    fn vmm_events_are_read_in_whole_lines_from_where_the_last_read_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let boot = r#"{"event":"boot_verified","plan_id":"p","fields":{"kernel":"sha256:00"}}"#;
        let exit = r#"{"event":"vm_exit","plan_id":"p","fields":{"reason":"poweroff","status":0}}"#;
        // The VMM is halfway through its second line.
        std::fs::write(&path, format!("{boot}\n{}", &exit[..10])).unwrap();
        let (first, at) = read_vmm_events_from(&path, 0, true, "p", "v");
        assert_eq!(kinds(&first), [EventKind::BootVerified]);
        assert_eq!(at, u64::try_from(boot.len() + 1).unwrap());
        // Ended, its last line without a newline: read all the same.
        std::fs::write(&path, format!("{boot}\n{exit}")).unwrap();
        let (rest, end) = read_vmm_events_from(&path, at, false, "p", "v");
        assert_eq!(kinds(&rest), [EventKind::VmExited]);
        assert_eq!(end, std::fs::metadata(&path).unwrap().len());
        assert!(read_vmm_events_from(&path, end, false, "p", "v")
            .0
            .is_empty());
    }

    #[test]
    fn vmm_events_get_the_vm_and_the_admitted_plan_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"event":"boot_refused","fields":{"reason":"untrusted_key","detail":"no trusted signature","status":10}}"#,
                "\n",
                "garbage\n",
                r#"{"event":"vm_exit","plan_id":"plan-x","fields":{"reason":"poweroff","status":0}}"#,
                "\n"
            ),
        )
        .unwrap();
        let out = read_vmm_events(&path, "plan-1", "vm-1");
        assert_eq!(kinds(&out), [EventKind::BootRefused, EventKind::VmExited]);
        assert_eq!(out[0].plan_id.as_deref(), Some("plan-1"));
        assert_eq!(out[0].vm_id.as_deref(), Some("vm-1"));
        // An id the VMM gave is kept (and would show a mismatch in the log).
        assert_eq!(out[1].plan_id.as_deref(), Some("plan-x"));
        assert!(read_vmm_events(&dir.path().join("none"), "p", "v").is_empty());
    }

    #[test]
    fn digest_sink_passes_output_on_and_hashes_it() {
        #[derive(Default)]
        struct Keep(Vec<u8>, Vec<u8>);
        impl OutputSink for Keep {
            fn stdout(&mut self, d: &[u8]) -> std::io::Result<()> {
                self.0.extend_from_slice(d);
                Ok(())
            }
            fn stderr(&mut self, d: &[u8]) -> std::io::Result<()> {
                self.1.extend_from_slice(d);
                Ok(())
            }
        }
        let mut keep = Keep::default();
        let mut sink = DigestSink::new(&mut keep);
        sink.stdout(b"hel").unwrap();
        sink.stdout(b"lo").unwrap();
        sink.stderr(b"e").unwrap();
        let d = sink.digests();
        assert_eq!(d.stdout, (Sha256Digest::of(b"hello"), 5));
        assert_eq!(d.stderr, (Sha256Digest::of(b"e"), 1));
        assert_eq!(keep.0, b"hello");
    }

    /// What `mvm run --cpus N -- sh -c "echo hi"` asks for.
    fn run_request(cpus: u8) -> RunRequest {
        RunRequest {
            image: crate::image::DEFAULT_IMAGE.into(),
            cpus,
            mem_mib: 256,
            timeout_secs: None,
            argv: ["sh", "-c", "echo hi"].map(String::from).to_vec(),
        }
    }

    fn outcome(code: i32) -> RunOutcome {
        RunOutcome {
            status: WorkloadStatus {
                code: Some(code),
                signal: None,
                timed_out: false,
            },
            timings: Timings::default(),
            tier: Tier::Kvm,
            boot_report: None,
        }
    }

    fn no_output() -> OutputDigests {
        OutputDigests {
            stdout: (Sha256Digest::of(b""), 0),
            stderr: (Sha256Digest::of(b""), 0),
        }
    }

    /// What a VMM that verified `signed` writes to its events file: the
    /// lines before the guest runs, and its exit.
    fn vmm_events_for(signed: &SignedPlan) -> (String, String) {
        let a = &signed.plan.artifacts;
        let boot = serde_json::json!({
            "time": "2026-11-29T00:00:00Z", "event": "boot_verified",
            "plan_id": signed.plan.plan_id,
            "fields": {
                "kernel": a.kernel.to_string(),
                "initramfs": a.initramfs.map(|d| d.to_string()),
                "cmdline": a.cmdline.to_string(),
                "plan_digest": signed.digest.to_string(),
                "keyid": "sha256:00",
            }
        });
        let exit = serde_json::json!({
            "time": "2026-11-29T00:00:02Z", "event": "vm_exit",
            "plan_id": signed.plan.plan_id,
            "fields": { "reason": "poweroff", "status": 0 }
        });
        (format!("{boot}\n"), format!("{exit}\n"))
    }

    /// A store under `dir` with a built (fake) default image (fails without
    /// busybox-static).
    fn store_with_image(dir: &Path) -> (PathBuf, PathBuf, StoredImage) {
        let (config, data) = (dir.join("config"), dir.join("data"));
        let inputs = crate::image::build::tests::fake_inputs(dir);
        let image = ImageStore::at(&data)
            .put("default", &crate::image::build(&inputs).unwrap())
            .unwrap();
        (config, data, image)
    }

    #[test]
    fn an_admitted_run_leaves_a_verifiable_log_and_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        let args = run_request(2);
        let admitted = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None).unwrap();
        // The files the VMM gets: the envelope verifies with admission.pub.
        let trusted_text = std::fs::read_to_string(&admitted.files.trust).unwrap();
        let mut trusted = mvm_loader::dsse::TrustedKeys::new();
        trusted.add_public_key_file(&trusted_text).unwrap();
        let envelope = std::fs::read(&admitted.files.envelope).unwrap();
        let v = mvm_loader::plan::envelope::verify_plan(
            &envelope,
            &trusted,
            UtcTime::now(),
            mvm_loader::plan::CLOCK_SKEW,
        )
        .unwrap();
        assert_eq!(v.plan.resources.vcpus, 2);
        assert_eq!(
            v.plan.artifacts.cmdline,
            Sha256Digest::of(image.manifest.cmdline.as_bytes())
        );
        assert_eq!(v.plan.resources.timeout_secs, 3600, "the policy's longest");
        assert_eq!(admitted.files.replay_store, data.join(REPLAY_STORE));

        // The VMM verified and booted; the guest answered: written ahead.
        let (boot, exit) = vmm_events_for(&admitted.signed);
        std::fs::write(&admitted.files.events, &boot).unwrap();
        let mut admitted = admitted;
        admitted.workload_starting().unwrap();
        let log = data.join(audit::AUDIT_FILE);
        let ahead: Vec<EventKind> = audit::read_records(&log, None)
            .unwrap()
            .iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(
            ahead,
            [
                EventKind::PlanAdmitted,
                EventKind::BootVerified,
                EventKind::ExecStarted
            ]
        );
        let markers = data.join(crate::audit::open_runs::OPEN_RUNS_DIR);
        assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 1, "open");
        std::fs::write(&admitted.files.events, format!("{boot}{exit}")).unwrap();
        let digest = admitted.signed.digest;
        let vm_id = admitted.vm_id.clone();
        let argv: Vec<String> = ["sh", "-c", "echo hi"].map(String::from).to_vec();
        let output = OutputDigests {
            stdout: (Sha256Digest::of(b"hi\n"), 3),
            stderr: (Sha256Digest::of(b""), 0),
        };
        let receipt_path = dir.path().join("receipt.json");
        let now = UtcTime::now();
        let evidence = admitted
            .finish(
                &argv,
                &Ok(outcome(7)),
                output,
                (now, now),
                Some(&receipt_path),
            )
            .unwrap();
        assert_eq!(evidence.audit.first_seq, 1);
        assert_eq!(evidence.audit.last_seq, 5);
        assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 0, "closed");

        let keys = HostKeys::load(&config).unwrap();
        audit::verify_log(&log, &keys.audit.verifying_key()).unwrap();
        let records = audit::read_records(&log, None).unwrap();
        let kinds: Vec<EventKind> = records.iter().map(|r| r.event).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PlanAdmitted,
                EventKind::BootVerified,
                EventKind::ExecStarted,
                EventKind::ExecExited,
                EventKind::VmExited
            ]
        );
        assert!(records
            .iter()
            .skip(1)
            .all(|r| r.vm_id.as_deref() == Some(vm_id.as_str())));
        assert!(!std::fs::read_to_string(&log).unwrap().contains("echo hi"));

        let mut trusted = mvm_loader::dsse::TrustedKeys::new();
        trusted.add(keys.audit.verifying_key());
        let r = receipt::verify_receipt(&std::fs::read(&receipt_path).unwrap(), &trusted).unwrap();
        assert_eq!(r.plan_digest, digest);
        let p = &r.statement.predicate;
        assert_eq!(p.exit_status, 7);
        assert_eq!(p.command_sha256, command_digest(&argv));
        assert_eq!(p.stdout_sha256, Sha256Digest::of(b"hi\n"));
        assert_eq!(p.tier, plan::Tier::Hardware);
        assert_eq!((p.audit.first_seq, p.audit.last_seq), (1, 5));
    }

    #[test]
    fn a_denial_is_audited_and_a_refused_boot_gets_no_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        let err = admit_run_in(&config, &data, &run_request(5), &image, Tier::Kvm, None)
            .err()
            .unwrap();
        assert!(
            matches!(&err, RunError::Denied(d) if d.rule == Rule::MaxVcpus),
            "{err}"
        );
        assert_eq!(exit::for_error(&err), exit::DENIED);
        let log = data.join(audit::AUDIT_FILE);
        let records = audit::read_records(&log, None).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event, EventKind::PlanDenied);
        assert_eq!(
            records[0].fields["rule"],
            FieldValue::from("limits.max_vcpus")
        );

        // Refused by the VMM: its event is logged with the admitted plan id, no
        // exec records, no receipt.
        let admitted =
            admit_run_in(&config, &data, &run_request(1), &image, Tier::Kvm, None).unwrap();
        let plan_id = admitted.plan_id().to_owned();
        std::fs::write(
            &admitted.files.events,
            r#"{"event":"boot_refused","fields":{"reason":"kernel_mismatch","detail":"kernel digest mismatch","status":20}}"#,
        )
        .unwrap();
        let refused = Err(RunError::BootRefused {
            reason: "kernel_mismatch".into(),
            status: 20,
            detail: "kernel digest mismatch".into(),
        });
        let receipt_path = dir.path().join("receipt.json");
        let now = UtcTime::now();
        let e = admitted
            .finish(
                &["true".to_owned()],
                &refused,
                no_output(),
                (now, now),
                Some(&receipt_path),
            )
            .unwrap_err();
        assert!(e.contains("no receipt"), "{e}");
        assert!(!receipt_path.exists());
        let records = audit::read_records(&log, None).unwrap();
        let last = records.last().unwrap();
        assert_eq!(last.event, EventKind::VmExited);
        assert_eq!(last.fields["reason"], FieldValue::from("boot_refused"));
        assert_eq!(last.fields["status"], FieldValue::from(20));
        let refused = &records[records.len() - 2];
        assert_eq!(refused.event, EventKind::BootRefused);
        assert_eq!(refused.plan_id.as_deref(), Some(plan_id.as_str()));
        assert_eq!(records.len(), 4, "denied, admitted, refused, vm exited");
    }

    /// A run whose mvm died after booting: its records so far stay, and the
    /// next admission closes it with `run_abandoned`; the log verifies.
    #[test]
    fn a_run_whose_mvm_died_is_closed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        let mut admitted =
            admit_run_in(&config, &data, &run_request(1), &image, Tier::Kvm, None).unwrap();
        let (boot, _) = vmm_events_for(&admitted.signed);
        std::fs::write(&admitted.files.events, &boot).unwrap();
        admitted.workload_starting().unwrap();
        let plan_id = admitted.plan_id().to_owned();
        // SIGKILL: finish never runs (dropping closes nothing). The marker
        // then names a process that is gone.
        drop(admitted);
        let markers = data.join(crate::audit::open_runs::OPEN_RUNS_DIR);
        let marker_path = markers.join(format!("{plan_id}.json"));
        let mut marker: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&marker_path).unwrap()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        marker["pid"] = child.id().into();
        child.wait().unwrap();
        std::fs::write(&marker_path, marker.to_string()).unwrap();

        let next = admit_run_in(&config, &data, &run_request(1), &image, Tier::Kvm, None).unwrap();
        let log = data.join(audit::AUDIT_FILE);
        let records = audit::read_records(&log, None).unwrap();
        let kinds: Vec<EventKind> = records.iter().map(|r| r.event).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PlanAdmitted,
                EventKind::BootVerified,
                EventKind::ExecStarted,
                EventKind::RunAbandoned,
                EventKind::PlanAdmitted
            ]
        );
        assert_eq!(records[3].plan_id.as_deref(), Some(plan_id.as_str()));
        let keys = HostKeys::load(&config).unwrap();
        audit::verify_log(&log, &keys.audit.verifying_key()).unwrap();
        // Only the live run's marker is left.
        assert!(!marker_path.exists());
        assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 1);
        drop(next);
    }

    #[test]
    fn a_backend_weaker_than_the_policy_minimum_is_denied() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(
            config.join(crate::admission::policy::POLICY_FILE),
            "[tier]\nminimum = \"hardware\"\n",
        )
        .unwrap();
        let err = admit_run_in(
            &config,
            &data,
            &run_request(1),
            &image,
            Tier::Emulated,
            None,
        )
        .err()
        .unwrap();
        assert!(
            matches!(&err, RunError::Denied(d) if d.rule == Rule::MinimumTier),
            "{err}"
        );
        assert!(admit_run_in(&config, &data, &run_request(1), &image, Tier::Kvm, None).is_ok());
    }

    #[test]
    fn a_run_ending_is_classified_for_the_log() {
        let ok: Result<RunOutcome, RunError> = Ok(RunOutcome {
            status: WorkloadStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            },
            timings: Timings::default(),
            tier: Tier::Kvm,
            boot_report: None,
        });
        assert_eq!(ended_status(&ok), Some((3, None)));
        let t = Err(RunError::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(ended_status(&t), Some((exit::TIMEOUT, Some("timed_out"))));
        let refused = Err(RunError::BootRefused {
            reason: "expired".into(),
            status: 15,
            detail: String::new(),
        });
        assert_eq!(ended_status(&refused), None);
    }
}
