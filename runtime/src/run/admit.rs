//! Admission and the audited life of one admitted `mvm run`.
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
//! `vm_exited` (in the order [`super::vmm_events`] gives them), closes the
//! marker and, when asked, writes the signed receipt. So a VM killed mid-run
//! leaves `boot_verified`, `exec_started` and `vm_exited`, and a `mvm` killed
//! mid-run leaves an open marker that the next command closes with
//! `run_abandoned`.
//!
//! The audit key and the admission key never leave this process: the VMM (and,
//! for the emulated tier, the test host) gets the envelope and the admission
//! public key only, and hands its events back as a file.

use std::path::{Path, PathBuf};

use mvm_loader::plan::envelope::SignedPlan;
use mvm_loader::plan::{self, UtcTime};
use rand_core::{OsRng, RngCore};

use super::output_digest::OutputDigests;
use super::vmm_events::{closing_events, ended_status, measured, read_vmm_events_from, vm_ended};
use super::{exit, RunRequest};
use crate::admission::keys::config_dir;
use crate::admission::{
    admit, AdmissionRequest, AdmitError, Denial, HostKeys, ImageFacts, Policy, Rule,
};
use crate::audit::{self, AuditEvent, AuditLog, EventKind, OpenRun};
use crate::backend::scratch::ScratchDir;
use crate::backend::{PlanFiles, RunError, RunJournal, RunOutcome, SessionEvent, Tier};
use crate::image::{ImageStore, StoredImage};
use crate::receipt::{self, command_digest, AuditRange, RunPredicate};
use crate::secrets::store::SecretStore;
use crate::secrets::{Delivery, ReleasedSecret, Secret};

/// The replay store's file name in the data directory (the VMM's default too).
pub const REPLAY_STORE: &str = "replay-nonces";

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
        Tier::Container => plan::Tier::Container,
        Tier::Vz => plan::Tier::Delegated,
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
    request.forwards = run.forwards.clone();
    // The plan names each secret once, however many ways it goes in.
    for s in &run.secrets {
        if !request.secrets.contains(&s.name) {
            request.secrets.push(s.name.clone());
        }
    }
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
    /// The secrets the plan names, read from the store at admission; handed
    /// over only by [`RunJournal::workload_starting`], after a verified boot.
    secrets: Vec<Secret>,
    /// The secrets recorded as released (for the receipt).
    released: Vec<ReleasedSecret>,
    /// Substituted secrets and the egress proxy's socket (`None`: the proxy runs in the
    /// emulated tier's test host), until the boot is vouched for.
    substitution: Option<(super::substitute::Prepared, Option<std::net::TcpListener>)>,
    /// The egress proxy, from then on until the run's end.
    proxy: Option<crate::egress_proxy::EgressProxy>,
    /// What the test host's proxy needs, from then on until the backend takes it.
    handoff: Option<crate::egress_proxy::Handoff>,
    marker: Option<OpenRun>,
    /// The VM is restored from a snapshot: the VMM reports `snapshot_restored`, not
    /// `boot_verified`, and no secret is released again (they are in its memory).
    restore: bool,
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
    admit_in(config, data, run, image, tier, net, None)
}

/// Admission's one path: for a boot (`stored` is `None`), or for the restore of a VM
/// that `stored` booted ([`admit_restore_in`]).
fn admit_in(
    config: &Path,
    data: &Path,
    run: &RunRequest,
    image: &StoredImage,
    tier: Tier,
    net: Option<&mut crate::net::run::NetPrep>,
    stored: Option<SignedPlan>,
) -> Result<Admitted, RunError> {
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

    // The names the user's store gives the image, and those of the store it lies in (the
    // machine's shared store, for an image published there).
    let mut names: Vec<String> = ImageStore::at(data)
        .names()?
        .into_iter()
        .chain(ImageStore::holding(image).map_or(Ok(Vec::new()), |s| s.names())?)
        .filter(|(_, digest)| *digest == image.digest)
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names.dedup();
    let mut facts = ImageFacts::from_stored(image, &names)
        .map_err(|e| admission_error("image")(e.to_string()))?;
    // Before a plan is signed: a secret that is not there stops the run here. (A
    // restored VM's secrets are in its memory already: none is read or released again.)
    let store = SecretStore::at(config);
    let asked = if stored.is_some() {
        &[][..]
    } else {
        &run.secrets[..]
    };
    let secrets = asked
        .iter()
        .map(|asked| {
            let mut secret = store
                .get(&asked.name)
                .map_err(|e| RunError::Missing(format!("secret: {e}")))?;
            secret.delivery = asked.delivery;
            if secret.delivery == Delivery::Env && secret.env_value().is_none() {
                return Err(RunError::Missing(format!(
                    "secret: --secret-env {}: the value is not UTF-8 text without NUL bytes, which an environment variable needs; use --secret for a file",
                    asked.name
                )));
            }
            Ok(secret)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = secrets.iter().map(|s| s.value.len()).sum();
    if total > crate::secrets::MAX_RUN_BYTES {
        return Err(RunError::Missing(format!(
            "secret: {} secrets of {total} bytes together; a run may be given at most {} bytes",
            secrets.len(),
            crate::secrets::MAX_RUN_BYTES
        )));
    }
    // Secrets the guest sees only as placeholders: values read, hosts pinned, the
    // run's CA made, before the plan (which pins all but the values) is signed.
    let mut net = net;
    let mut substitution = None;
    if stored.is_none() && !run.substitutions.is_empty() {
        let Some(prep) = net.as_deref_mut() else {
            return Err(RunError::Missing(
                "secret: --secret NAME=PLACEHOLDER needs the VM's network (--for HOST gives it one)".into(),
            ));
        };
        let prepared = super::substitute::prepare(&run.substitutions, &store, |name| {
            prep.bound_addresses(name)
        })?;
        if let Some(prepared) = prepared {
            // The kvm tier set the host network up here, with the proxy's socket; the
            // emulated tier's inner `mvm` sets it up in the test host and runs the proxy
            // there.
            let listener = match prep.session {
                Some(_) => Some(prep.take_proxy_listener().ok_or_else(|| {
                    RunError::Missing(
                        "secret: the host network has no socket for the egress proxy".into(),
                    )
                })?),
                None => None,
            };
            substitution = Some((prepared, listener));
        }
    }
    let mut request = admission_request(run, &policy);
    request.substitution = substitution.as_ref().map(|(p, _)| p.section.clone());
    facts.disks.extend(run.disks.iter().map(|d| d.pin.clone()));
    request.scratch_disks = run.scratch_disks.iter().map(|d| d.disk.clone()).collect();
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
    let restore = stored.is_some();
    let signed = match stored {
        None => signed,
        Some(stored) => {
            // What today's plan pins, beside the stored one's: all but the identity,
            // window and nonce must agree.
            let mut today = signed.plan;
            today.plan_id.clone_from(&stored.plan.plan_id);
            today.not_before = stored.plan.not_before;
            today.not_after = stored.plan.not_after;
            today.nonce.clone_from(&stored.plan.nonce);
            if today != stored.plan {
                return Err(RunError::Missing(format!(
                    "restore not admitted: plan {} no longer matches what admission gives \
                     this sandbox today (its image, the policy or its resources changed)",
                    stored.plan.plan_id
                )));
            }
            stored
        }
    };
    check_tier(&log, &request, &signed, tier)?;
    let mut admitted = record_admission(
        Checked {
            keys,
            log,
            signed,
            secrets,
        },
        config,
        data,
        run,
        tier,
        restore,
    )?;
    admitted.substitution = substitution;
    Ok(admitted)
}

/// Admits restoring a VM from its sealed snapshot ([`admit_restore_in`] with the
/// user's config and data directories).
pub fn admit_restore(
    run: &RunRequest,
    image: &StoredImage,
    tier: Tier,
    stored_plan: &Path,
) -> Result<Admitted, RunError> {
    let config = config_dir().map_err(|e| admission_error("config directory")(e.to_string()))?;
    let data = crate::image::store::data_dir()?;
    admit_restore_in(&config, &data, run, image, tier, stored_plan)
}

/// Admits restoring a VM from its snapshot: `stored_plan`, the plan that booted it
/// (kept with the snapshot when it was taken), must be signed by this host's admission
/// key, and today's policy must still admit the same run for the same image: `run` is
/// admitted afresh (a denial is audited as `plan_denied` and refuses the restore) and the
/// two plans must pin the same things (artifacts, disks, resources, devices, guest
/// policy, secrets, tier), everything but their identity, window and nonce. The fresh
/// plan is only compared, never recorded or booted. The stored
/// plan is what the VMM verifies against the snapshot's seal; `plan_admitted` records
/// it again, with `restore: true`. No secret is read from the store: a restored VM's
/// secrets are in its memory already.
pub fn admit_restore_in(
    config: &Path,
    data: &Path,
    run: &RunRequest,
    image: &StoredImage,
    tier: Tier,
    stored_plan: &Path,
) -> Result<Admitted, RunError> {
    let refused = |why: String| RunError::Missing(format!("restore not admitted: {why}"));
    let envelope = std::fs::read(stored_plan)
        .map_err(|e| refused(format!("{}: {e}", stored_plan.display())))?;
    let (keys, _) = HostKeys::load_or_create(config)
        .map_err(|e| admission_error("host keys")(e.to_string()))?;
    let mut trusted = mvm_loader::dsse::TrustedKeys::new();
    trusted.add(keys.admission.verifying_key());
    let verified = mvm_loader::plan::envelope::verify_plan_for_restore(&envelope, &trusted)
        .map_err(|e| refused(format!("the stored plan: {e}")))?;
    let stored = SignedPlan {
        plan: verified.plan,
        envelope: mvm_loader::dsse::Envelope::from_json(&envelope)
            .map_err(|e| refused(format!("the stored plan: {e}")))?,
        digest: verified.digest,
    };
    admit_in(config, data, run, image, tier, None, Some(stored))
}

/// What admission checked and signed, before it is recorded.
struct Checked {
    keys: HostKeys,
    log: AuditLog,
    signed: SignedPlan,
    secrets: Vec<Secret>,
}

/// The plan names the weakest tier allowed to run it: refuses (audited) a weaker one.
fn check_tier(
    log: &AuditLog,
    request: &AdmissionRequest,
    signed: &SignedPlan,
    tier: Tier,
) -> Result<(), RunError> {
    let given = plan_tier(tier);
    if given < signed.plan.required_tier {
        let denial = Denial {
            rule: Rule::MinimumTier,
            reason: format!(
                "backend '{tier}' gives tier {given}, weaker than the plan's required tier {}",
                signed.plan.required_tier
            ),
        };
        return Err(deny(log, request, denial));
    }
    Ok(())
}

/// Records an admitted plan (`plan_admitted`, the open-run marker) and writes the
/// files the VMM is started with. `restore`: the plan is the one that booted a VM now
/// restored from its snapshot ([`admit_restore_in`]).
fn record_admission(
    checked: Checked,
    config: &Path,
    data: &Path,
    run: &RunRequest,
    tier: Tier,
    restore: bool,
) -> Result<Admitted, RunError> {
    let started = std::time::Instant::now();
    let Checked {
        keys,
        log,
        signed,
        secrets,
    } = checked;
    let vm_id = random_id("vm");
    // The marker first: a mvm killed from here on is found by the next command.
    let marker = OpenRun::create(data, &signed.plan.plan_id, &vm_id)
        .map_err(|e| admission_error("audit")(e.to_string()))?;
    let mut admitted_event = AuditEvent::plan_admitted(&signed);
    if restore {
        admitted_event = admitted_event.field("restore", true);
    }
    let admitted_seq = log
        .append(admitted_event)
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
        secrets,
        released: Vec::new(),
        substitution: None,
        proxy: None,
        handoff: None,
        marker: Some(marker),
        restore,
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

/// What [`Admitted::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The run's records: `plan_admitted` .. its last one.
    pub audit: AuditRange,
    /// The receipt file, if one was written.
    pub receipt: Option<PathBuf>,
}

impl Admitted {
    /// What the guest is given for secret substitution (the CA to trust and the bound
    /// names' addresses) and the placeholders as environment variables; `None`
    /// without substituted secrets.
    pub fn substitution_for_guest(
        &self,
    ) -> Option<(
        crate::secrets::guest_trust::GuestTrust,
        Vec<(String, String)>,
    )> {
        self.substitution
            .as_ref()
            .map(|(p, _)| (p.guest_trust(), p.placeholder_env()))
    }

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
            secrets: self.released.clone(),
            wall: Some(crate::backend::wall::of(
                self.tier,
                nix::unistd::Uid::effective().is_root(),
            )),
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
    fn restoring(&mut self, restore: bool) {
        self.restore = restore;
    }

    fn substitution_handoff(&mut self) -> Option<crate::egress_proxy::Handoff> {
        self.handoff.take()
    }

    fn substitution_observed(
        &mut self,
        observed: &crate::egress_proxy::Observed,
    ) -> Result<(), RunError> {
        let event = super::substitute::audit_event(observed, self.plan_id(), &self.vm_id);
        self.last_seq = self
            .log
            .append(event)
            .map_err(|e| RunError::Missing(format!("evidence: {e}")))?;
        Ok(())
    }

    /// Appends the VMM's events so far (its `boot_verified` among them: it
    /// writes it before the guest runs), then, when the boot's measurements
    /// are the plan's pins, `secret_released` for each secret the plan names,
    /// then `exec_started`; returns those secrets for the backend to deliver.
    fn workload_starting(&mut self) -> Result<Vec<Secret>, RunError> {
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
        // A boot is vouched for by `boot_verified`; a restore by `snapshot_restored`
        // (the seal, the plan and every file checked before the guest ran again).
        let vouching = if self.restore {
            EventKind::SnapshotRestored
        } else {
            EventKind::BootVerified
        };
        for event in events {
            if event.kind == vouching && self.boot.is_none() {
                self.boot = Some(event.clone());
            }
            self.last_seq = self.log.append(event).map_err(evidence)?;
        }
        if self.boot.is_none() {
            return Err(RunError::Missing(format!(
                "the VMM reported no {vouching} before its guest answered; the workload was not started"
            )));
        }
        let secrets = std::mem::take(&mut self.secrets);
        if !secrets.is_empty() || self.substitution.is_some() {
            // The VMM's word that it booted what the plan pins, checked field by
            // field against the signed plan: else no secret leaves this process.
            measured(self.boot.as_slice(), &self.signed).map_err(|e| {
                RunError::Missing(format!(
                    "no secret released: {e}; the workload was not started"
                ))
            })?;
        }
        for secret in &secrets {
            if !self.signed.plan.secrets.contains(&secret.name) {
                return Err(RunError::Missing(format!(
                    "no secret released: the signed plan does not name {:?}",
                    secret.name
                )));
            }
            let released = ReleasedSecret::of(secret);
            let event = AuditEvent::secret_released(&plan_id, &self.vm_id, &released);
            self.last_seq = self.log.append(event).map_err(evidence)?;
            self.released.push(released);
        }
        if let Some((prepared, listener)) = self.substitution.take() {
            let guest = self
                .signed
                .plan
                .devices
                .net
                .as_ref()
                .and_then(|n| n.interface.as_ref())
                .map(|i| i.address)
                .ok_or_else(|| {
                    RunError::Missing(
                        "no secret substituted: the plan names no guest address".into(),
                    )
                })?;
            let mut named = Vec::new();
            for binding in &prepared.bindings {
                if !named.contains(&binding.secret) {
                    named.push(binding.secret.clone());
                    self.released.push(ReleasedSecret {
                        name: binding.secret.clone(),
                        sha256: binding.value.digest(),
                        delivery: "substitution".to_owned(),
                    });
                }
            }
            match listener {
                Some(listener) => {
                    let proxy = super::substitute::arm(
                        prepared,
                        listener,
                        guest,
                        self.log.clone(),
                        (&plan_id, &self.vm_id),
                    )?;
                    self.proxy = Some(proxy);
                }
                None => self.handoff = Some(prepared.handoff()?),
            }
        }
        let started = AuditEvent::exec_started(&plan_id, &self.vm_id, &self.argv);
        self.last_seq = self.log.append(started).map_err(evidence)?;
        self.exec_started = true;
        Ok(secrets)
    }

    /// Appends what a sandbox's session did, in order with the run's records.
    fn session_event(&mut self, event: &SessionEvent) -> Result<(), RunError> {
        let record = AuditEvent::session(self.plan_id(), &self.vm_id, event);
        self.last_seq = self
            .log
            .append(record)
            .map_err(|e| RunError::Missing(format!("evidence: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::FieldValue;
    use crate::backend::{Timings, WorkloadStatus};
    use mvm_loader::measure::Sha256Digest;

    /// What `mvm run --cpus N -- sh -c "echo hi"` asks for.
    fn run_request(cpus: u8) -> RunRequest {
        RunRequest {
            image: crate::image::DEFAULT_IMAGE.into(),
            cpus,
            mem_mib: 256,
            timeout_secs: None,
            argv: ["sh", "-c", "echo hi"].map(String::from).to_vec(),
            secrets: Vec::new(),
            substitutions: Vec::new(),
            forwards: Vec::new(),
            disks: Vec::new(),
            scratch_disks: Vec::new(),
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
            plan_id: None,
            vmm_memory: None,
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

    fn file_secret(name: &str) -> crate::secrets::SecretRequest {
        crate::secrets::SecretRequest {
            name: name.into(),
            delivery: Delivery::File,
        }
    }

    /// A config directory whose policy allows `TOKEN`, with `TOKEN` stored.
    fn with_secret(config: &Path, value: &[u8]) {
        std::fs::create_dir_all(config).unwrap();
        std::fs::write(
            config.join(crate::admission::policy::POLICY_FILE),
            "[secrets]\nallow = [\"TOKEN\"]\n",
        )
        .unwrap();
        SecretStore::at(config)
            .set("TOKEN", &crate::secrets::SecretValue::new(value.to_vec()))
            .unwrap();
    }

    #[test]
    fn a_secret_is_released_after_the_verified_boot_and_only_its_digest_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        let value = b"tok-5f1d0c-VALUE";
        with_secret(&config, value);
        let mut args = run_request(1);
        args.secrets = vec![file_secret("TOKEN")];
        let mut admitted = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None).unwrap();
        assert_eq!(admitted.signed.plan.secrets, ["TOKEN"]);
        let (boot, exit) = vmm_events_for(&admitted.signed);
        std::fs::write(&admitted.files.events, &boot).unwrap();
        let secrets = admitted.workload_starting().unwrap();
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].value.expose(), value);
        let log = data.join(audit::AUDIT_FILE);
        let records = audit::read_records(&log, None).unwrap();
        let kinds: Vec<EventKind> = records.iter().map(|r| r.event).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PlanAdmitted,
                EventKind::BootVerified,
                EventKind::SecretReleased,
                EventKind::ExecStarted
            ]
        );
        assert_eq!(
            records[2].fields.get("value_sha256"),
            Some(&FieldValue::Text(Sha256Digest::of(value).to_string()))
        );
        std::fs::write(&admitted.files.events, format!("{boot}{exit}")).unwrap();
        let receipt_path = dir.path().join("receipt.json");
        let now = UtcTime::now();
        admitted
            .finish(
                &args.argv,
                &Ok(outcome(0)),
                no_output(),
                (now, now),
                Some(&receipt_path),
            )
            .unwrap();
        let receipt = std::fs::read_to_string(&receipt_path).unwrap();
        let keys = HostKeys::load(&config).unwrap();
        let mut trusted = mvm_loader::dsse::TrustedKeys::new();
        trusted.add(keys.audit.verifying_key());
        let verified = receipt::verify_receipt(receipt.as_bytes(), &trusted).unwrap();
        let listed = &verified.statement.predicate.secrets;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].name.as_str(),
                listed[0].sha256,
                listed[0].delivery.as_str()
            ),
            ("TOKEN", Sha256Digest::of(value), "file")
        );
        // The value itself is in neither the log nor the receipt (nor base64 of it).
        let b64 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(value)
        };
        for text in [std::fs::read_to_string(&log).unwrap(), receipt] {
            assert!(!text.contains("5f1d0c") && !text.contains(&b64), "{text}");
        }
    }

    #[test]
    fn an_env_secret_must_be_text_and_is_recorded_as_env() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        with_secret(&config, b"\xff\xfe binary");
        let mut args = run_request(1);
        args.secrets = vec![crate::secrets::SecretRequest {
            name: "TOKEN".into(),
            delivery: Delivery::Env,
        }];
        let e = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not UTF-8") && !e.contains("binary"), "{e}");

        with_secret(&config, b"text-value");
        // Asked both ways: the plan names it once, two releases are recorded.
        args.secrets.push(file_secret("TOKEN"));
        let mut admitted = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None).unwrap();
        assert_eq!(admitted.signed.plan.secrets, ["TOKEN"]);
        let (boot, _) = vmm_events_for(&admitted.signed);
        std::fs::write(&admitted.files.events, &boot).unwrap();
        let secrets = admitted.workload_starting().unwrap();
        let deliveries: Vec<Delivery> = secrets.iter().map(|s| s.delivery).collect();
        assert_eq!(deliveries, [Delivery::Env, Delivery::File]);
        let log = std::fs::read_to_string(data.join(audit::AUDIT_FILE)).unwrap();
        assert_eq!(log.matches("secret_released").count(), 2, "{log}");
        assert!(log.contains("\"delivery\":\"env\"") && !log.contains("text-value"));
    }

    #[test]
    fn no_secret_leaves_for_a_boot_that_is_not_the_plans() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        with_secret(&config, b"never-released");
        let mut args = run_request(1);
        args.secrets = vec![file_secret("TOKEN")];
        let mut admitted = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None).unwrap();
        // The VMM says it verified the plan but measured another initramfs.
        let (boot, _) = vmm_events_for(&admitted.signed);
        let other = Sha256Digest::of(b"a tampered initramfs").to_string();
        let planned = admitted
            .signed
            .plan
            .artifacts
            .initramfs
            .unwrap()
            .to_string();
        std::fs::write(&admitted.files.events, boot.replace(&planned, &other)).unwrap();
        let e = admitted.workload_starting().unwrap_err().to_string();
        assert!(e.contains("no secret released"), "{e}");
        let log = std::fs::read_to_string(data.join(audit::AUDIT_FILE)).unwrap();
        assert!(
            !log.contains("secret_released") && !log.contains("exec_started"),
            "{log}"
        );
    }

    #[test]
    fn a_secret_missing_from_the_store_or_the_policy_stops_the_run_before_a_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (config, data, image) = store_with_image(dir.path());
        let mut args = run_request(1);
        args.secrets = vec![file_secret("TOKEN")];
        let e = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("mvm secret set TOKEN"), "{e}");
        // Stored, but the policy does not allow it: denied and audited.
        SecretStore::at(&config)
            .set("TOKEN", &crate::secrets::SecretValue::new(b"v".to_vec()))
            .unwrap();
        let e = admit_run_in(&config, &data, &args, &image, Tier::Kvm, None)
            .err()
            .unwrap();
        assert!(matches!(e, RunError::Denied(_)), "{e}");
        let log = std::fs::read_to_string(data.join(audit::AUDIT_FILE)).unwrap();
        assert!(
            log.contains("plan_denied") && log.contains("secrets.allow"),
            "{log}"
        );
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
}
