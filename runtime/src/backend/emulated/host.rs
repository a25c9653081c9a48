//! The host side of an emulated run: start QEMU on the test host with the
//! run's overlay, send the request, relay stdin, stdout, stderr and
//! signals, write the run's records ahead when the test host says it booted,
//! and turn its report back into an outcome or an error.

use std::collections::VecDeque;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::overlay::{read_file, testhost_initramfs};
use super::protocol::*;
use super::qemu::{accept_from, qemu_args, read_logs, spawn_qemu, Drive, Qemu};
use super::spare::{self, Claimed};
use super::stall::{self, StallWatch};
use super::warm::Carried;
use crate::backend::interrupt::{self, Action, Forwarder};
use crate::backend::scratch::ScratchDir;
use crate::backend::stdin_pump;
use crate::backend::{
    locate, OutputSink, PlanFiles, ProcessEnd, RunError, RunJournal, RunOutcome, RunSpec,
    SessionServer, StdinMode, Tier, VmProbe, Workload,
};
use crate::egress_proxy::Observed;
use crate::image::StoredImage;

/// How long the test host may take to boot and start the inner `mvm`.
const TESTHOST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the report the output ports may still be draining.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Beyond the workload and ready timeouts, what the outer watchdog allows.
const WATCHDOG_SLACK: Duration = Duration::from_secs(60);

/// The test host's last word, as the run loop keeps it.
struct FinalReport {
    outcome: Option<RunOutcome>,
    error: Option<(GuestErrorKind, String)>,
    stdout_bytes: u64,
    stderr_bytes: u64,
    refusal: Option<GuestRefusal>,
    vm_exit: Option<ProcessEnd>,
}

/// How much longer than the workload's own grace period the host waits for
/// the test host's report after forwarding a signal (TCG is slow).
const SIGNAL_SLACK: Duration = Duration::from_secs(30);

/// What the reader threads hand the run loop.
enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Ctl(String),
    CtlClosed(Option<String>),
}

fn pump_bytes(
    mut stream: UnixStream,
    tx: mpsc::SyncSender<Chunk>,
    wrap: fn(Vec<u8>) -> Chunk,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("testhost-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = stream.read(&mut buf) {
                let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
                    return;
                };
                if tx.send(wrap(data.to_vec())).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}

fn pump_ctl(stream: UnixStream, tx: mpsc::SyncSender<Chunk>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("testhost-ctl".into())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            loop {
                match read_ctl_line(&mut reader) {
                    Ok(Some(line)) => {
                        if tx.send(Chunk::Ctl(line)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Chunk::CtlClosed(None));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Chunk::CtlClosed(Some(e.to_string())));
                        return;
                    }
                }
            }
        })
        .map(drop)
}

/// Copies `source` into the stdin port as frames (see [`FramedStdin`]),
/// ending with the empty frame. The caller keeps another handle on the
/// socket open until the run ends: closing it would race the last frames.
fn pump_stdin(source: Box<dyn Read + Send>, mut port: UnixStream) -> std::io::Result<()> {
    stdin_pump::spawn("testhost-in", source, STDIN_FRAME_MAX, move |data| {
        let len = u32::try_from(data.len()).unwrap_or(0).to_le_bytes();
        port.write_all(&len)
            .and_then(|()| port.write_all(data))
            .is_ok()
    })
}

/// Reads the plan files a verified run sends into the test host.
fn plan_bundle(plan: &PlanFiles) -> Result<PlanBundle, RunError> {
    let text = |path: &Path| {
        String::from_utf8(read_file(path)?)
            .map_err(|_| RunError::Missing(format!("{}: not UTF-8 text", path.display())))
    };
    Ok(PlanBundle {
        envelope: text(&plan.envelope)?,
        trust: text(&plan.trust)?,
    })
}

/// The test host of this run: booted for it now, or a spare booted ahead ([`spare`]).
enum TestHost {
    /// QEMU, and the run directory of its sockets and logs (removed after QEMU is gone).
    Cold {
        qemu: Qemu,
        _dir: ScratchDir,
    },
    Spare(Claimed),
}

impl TestHost {
    /// QEMU's process id, when known.
    fn qemu_pid(&self) -> Option<u32> {
        match self {
            Self::Cold { qemu, .. } => Some(qemu.child.id()),
            Self::Spare(claimed) => claimed.qemu_pid(),
        }
    }

    /// Whether QEMU has exited: how, and its status when known.
    fn exited(&mut self) -> Option<(String, Option<ProcessEnd>)> {
        match self {
            Self::Cold { qemu, .. } => qemu
                .child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| (format!("exited with {status}"), Some(status.into()))),
            Self::Spare(claimed) => claimed.ended().map(|how| (how, None)),
        }
    }

    /// Waits up to `limit` for QEMU to end on its own.
    fn wait_ended(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.exited().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A session's view of the test host: the control port's lines it reads
/// while checking are kept for the run loop, which handles them afterwards.
struct TestHostVm<'a> {
    rx: &'a mpsc::Receiver<Chunk>,
    stash: &'a mut VecDeque<Chunk>,
    host: &'a mut TestHost,
    watch: Option<&'a mut StallWatch>,
    /// The test host's egress proxy's reports, until the session takes them.
    observed: Vec<Observed>,
}

impl VmProbe for TestHostVm<'_> {
    fn observed(&mut self) -> Vec<Observed> {
        std::mem::take(&mut self.observed)
    }

    fn ended(&mut self) -> Option<String> {
        let mut why = None;
        while let Ok(chunk) = self.rx.try_recv() {
            if let Chunk::Ctl(line) = &chunk {
                if let Ok(GuestRecord::Observed(observed)) = parse_record(line) {
                    self.observed.push(observed);
                    continue;
                }
            }
            match &chunk {
                Chunk::Ctl(line)
                    if matches!(parse_record(line), Ok(GuestRecord::Report { .. })) =>
                {
                    why = Some("the test host reported the end of its run".to_owned());
                }
                Chunk::CtlClosed(_) => {
                    why = Some("the test host closed its control port".to_owned());
                }
                _ => {}
            }
            self.stash.push_back(chunk);
        }
        if why.is_none() {
            if let Some((how, _)) = self.host.exited() {
                why = Some(format!("the test host (qemu) {how}"));
            }
        }
        if why.is_none() {
            if let Some(still) = self.watch.as_mut().and_then(|w| w.stalled(Instant::now())) {
                why = Some(format!(
                    "the test host stopped: its QEMU used no CPU time and wrote nothing for {} s",
                    still.as_secs()
                ));
            }
        }
        why
    }
}

/// Where a session's (absent) output goes.
struct NoOutput;

impl OutputSink for NoOutput {
    fn stdout(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn stderr(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots a test host for this run: QEMU started now, its four ports accepted on sockets in
/// a new run directory. Returns it, the ports (`ctl`, `in`, `out`, `err`) and the two logs.
fn boot_cold(
    qemu_bin: &Path,
    testhost: &Path,
    initramfs: &Path,
    spec: &RunSpec,
    extra: &[Drive],
) -> Result<(TestHost, Vec<UnixStream>, [std::path::PathBuf; 2]), RunError> {
    let scratch = ScratchDir::create().map_err(RunError::io("creating the run directory"))?;
    let mut listeners = Vec::new();
    for id in ["ctl", "in", "out", "err"] {
        let path = scratch.path().join(id);
        let listener = UnixListener::bind(&path)
            .map_err(RunError::io(format!("listening on {}", path.display())))?;
        listeners.push(listener);
    }
    let console = scratch.path().join("console.log");
    let qemu_log = scratch.path().join("qemu.log");
    let args = qemu_args(testhost, initramfs, &console, scratch.path(), spec, extra);
    tracing::debug!("starting {} {}", qemu_bin.display(), args.join(" "));
    let mut qemu = spawn_qemu(qemu_bin, &args, &qemu_log)?;
    let mut ports = Vec::new();
    for listener in &listeners {
        ports.push(accept_from(
            listener,
            &mut qemu,
            &[console.as_path(), qemu_log.as_path()],
            Duration::from_secs(30),
        )?);
    }
    let host = TestHost::Cold {
        qemu,
        _dir: scratch,
    };
    Ok((host, ports, [console, qemu_log]))
}

/// How many fresh test hosts a run boots, one after another, when QEMU stalls
/// before its workload started ([`stall`](super::stall)).
const FRESH_HOSTS: u32 = 2;

/// Why one attempt at a run ended without an outcome.
enum Failed {
    Run(RunError),
    /// QEMU stalled and was killed; `retry` when the workload had not started (no
    /// `proceed` sent, no byte of stdin taken), so a fresh test host can run it.
    Stalled {
        still: Duration,
        retry: bool,
        log: String,
    },
}

impl From<RunError> for Failed {
    fn from(e: RunError) -> Self {
        Self::Run(e)
    }
}

/// What stays the same across a run's attempts.
struct Setup<'a> {
    spec: &'a RunSpec,
    plan: Option<&'a PlanFiles>,
    bundle: Option<PlanBundle>,
    qemu_bin: &'a Path,
    testhost: PathBuf,
    initramfs: PathBuf,
    session: bool,
    start: Instant,
    stall_limit: Option<Duration>,
    /// The warm snapshot's disk and what the test host is asked to do with it.
    warm: Option<Carried>,
}

/// What one attempt takes from the run and may leave for the next.
struct Parts<'a, 'b> {
    journal: &'b mut dyn RunJournal,
    sink: &'b mut dyn OutputSink,
    stdin: Option<Box<dyn Read + Send>>,
    server: Option<&'a mut dyn SessionServer>,
    spare_key: Option<String>,
    /// What the last test host said of the warm start.
    warm_end: Option<WarmEnd>,
}

/// Runs `spec` inside the test host with QEMU `qemu`: its command, or a
/// session served on the test host's `mvm.in` port. A test host whose QEMU
/// stalls before the workload started is replaced by a fresh one (up to
/// [`FRESH_HOSTS`] times); after, the run fails. With `warm` (the policy allows
/// it, no `--cold`), an eligible command starts from the image's warm snapshot,
/// or leaves it ([`super::warm`]).
pub fn run(
    spec: &RunSpec,
    image: &StoredImage,
    qemu_bin: &Path,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    workload: Workload<'_>,
    warm: bool,
) -> Result<RunOutcome, RunError> {
    let start = Instant::now();
    if let Some(interface) = spec.net.as_ref().and_then(|n| n.interface.as_ref()) {
        super::uplink::check_pool(interface.address, interface.prefix_len)?;
    }
    let mut no_output = NoOutput;
    let session = workload.is_session();
    let (sink, stdin, server): (&mut dyn OutputSink, _, _) = match workload {
        Workload::Command { sink, stdin } => (sink, stdin, None),
        Workload::Session(server) => (&mut no_output, None, Some(server)),
    };
    let bundle = plan.map(plan_bundle).transpose()?;
    let testhost = locate::testhost_dir()?;
    let (mvm, vmm) = locate::static_binaries()?;
    let initramfs = testhost_initramfs(&testhost, &mvm, &vmm, image)?;
    let carried = match plan {
        Some(plan) if warm && !session && super::warm::eligible(plan) => {
            super::warm::choose(&initramfs, spec)
        }
        _ => None,
    };
    let extra = Carried::drives(carried.as_ref());
    let spare_key =
        spare::enabled().then(|| spare::key(qemu_bin, &testhost, &initramfs, spec, &extra));
    let setup = Setup {
        spec,
        plan,
        bundle,
        qemu_bin,
        testhost,
        initramfs,
        session,
        start,
        stall_limit: stall::limit_from_env(),
        warm: carried,
    };
    let mut parts = Parts {
        journal,
        sink,
        stdin,
        server,
        spare_key,
        warm_end: None,
    };
    let result = attempts(&setup, &mut parts);
    if let Some(carried) = setup.warm {
        carried.finish(parts.warm_end);
    }
    result
}

/// [`attempt`], again in a fresh test host after a stall, up to [`FRESH_HOSTS`] times.
fn attempts(setup: &Setup<'_>, parts: &mut Parts<'_, '_>) -> Result<RunOutcome, RunError> {
    let mut fresh = 0;
    loop {
        match attempt(setup, parts, fresh == 0) {
            Ok(outcome) => return Ok(outcome),
            Err(Failed::Run(e)) => return Err(e),
            Err(Failed::Stalled { still, retry, log }) => {
                let what = format!(
                    "the test host stopped: its QEMU used no CPU time and wrote nothing for {} s (QEMU's TCG stalls now and then, docs/run.md) and was killed",
                    still.as_secs()
                );
                if retry && fresh < FRESH_HOSTS {
                    fresh += 1;
                    tracing::warn!("{what}; booting a fresh test host");
                    eprintln!(
                        "mvm: warning: {what}; the workload had not started, so it runs in a fresh test host"
                    );
                    continue;
                }
                let when = if retry {
                    format!(" ({fresh} fresh test hosts stalled too)")
                } else {
                    " after the workload started".to_owned()
                };
                return Err(RunError::VmmDied {
                    reason: format!("{what}{when}"),
                    log,
                    exit: None,
                });
            }
        }
    }
}

/// One test host's try at the run: booted cold (or a spare claimed, when `claim`),
/// the request sent, and everything relayed until its report.
fn attempt(
    setup: &Setup<'_>,
    parts: &mut Parts<'_, '_>,
    claim: bool,
) -> Result<RunOutcome, Failed> {
    let Setup {
        spec,
        plan,
        session,
        start,
        ..
    } = *setup;
    let qemu_bin = setup.qemu_bin;
    let mut session_status = None;
    let claimed = if claim {
        parts.spare_key.as_deref().and_then(spare::claim)
    } else {
        None
    };
    let spare_used = claimed.is_some();
    let (mut host, ports, logs) = match claimed {
        Some(mut claimed) => {
            tracing::info!("emulated: a spare test host, booted ahead");
            let ports = std::mem::take(&mut claimed.ports);
            let logs = claimed.logs();
            (TestHost::Spare(claimed), ports, logs)
        }
        None => {
            let extra = Carried::drives(setup.warm.as_ref());
            boot_cold(qemu_bin, &setup.testhost, &setup.initramfs, spec, &extra)?
        }
    };
    let mut watch = match (setup.stall_limit, host.qemu_pid()) {
        (Some(limit), Some(pid)) => Some(StallWatch::new(pid, &logs[0], limit)),
        _ => None,
    };
    let logs = [logs[0].as_path(), logs[1].as_path()];
    let mut streams = ports.into_iter();
    let (Some(ctl), Some(input), Some(out), Some(err)) = (
        streams.next(),
        streams.next(),
        streams.next(),
        streams.next(),
    ) else {
        return Err(RunError::Agent("test host ports missing".into()).into());
    };

    let (tx, rx) = mpsc::sync_channel(16);
    let mut ctl_writer = ctl
        .try_clone()
        .map_err(RunError::io("test host control port"))?;
    pump_ctl(ctl, tx.clone()).map_err(RunError::io("starting a reader thread"))?;
    pump_bytes(out, tx.clone(), Chunk::Out).map_err(RunError::io("starting a reader thread"))?;
    pump_bytes(err, tx, Chunk::Err).map_err(RunError::io("starting a reader thread"))?;
    let request = GuestRequest {
        spec: spec.clone(),
        // A session starts at `booted` too, written ahead or not.
        journal: setup.bundle.is_some() || session,
        plan: setup.bundle.clone(),
        session,
        warm: setup.warm.as_ref().map(|c| c.request.clone()),
    };
    write_json_line(&mut ctl_writer, &request)
        .map_err(RunError::io("sending the request to the test host"))?;
    // Written ahead, the workload starts at `proceed`, and so does its stdin: a test
    // host that stalls before then has taken none of it, and a fresh one gets it all.
    let mut workload_started = false;
    if !request.journal {
        start_stdin(spec, &mut parts.stdin, &input)?;
        workload_started = spec.stdin == StdinMode::Forward;
    }

    let mut boot_deadline = Some(start + TESTHOST_BOOT_TIMEOUT);
    let mut testhost_ready_ms = None;
    let watchdog = spec.timeout_secs.map(|t| {
        start
            + TESTHOST_BOOT_TIMEOUT
            + Duration::from_secs(spec.ready_timeout_secs.saturating_add(t))
            + WATCHDOG_SLACK
    });
    let (mut got_out, mut got_err) = (0u64, 0u64);
    let mut report: Option<FinalReport> = None;
    let mut drain_deadline = None;
    let mut interrupts = Forwarder::new();
    let mut stash = VecDeque::new();
    loop {
        // Until the inner mvm runs, a signal stops everything; then it is the
        // inner mvm's to handle, as a local run would.
        if testhost_ready_ms.is_none() && report.is_none() {
            if interrupt::requested() {
                return Err(RunError::Interrupted.into());
            }
        } else {
            match interrupts.poll_with(interrupt::GRACE + SIGNAL_SLACK) {
                Action::None => {}
                Action::Forward(signal) => {
                    if let Err(e) = write_json_line(&mut ctl_writer, &HostRecord::Signal { signal })
                    {
                        tracing::warn!("forwarding signal {signal} to the test host: {e}");
                    }
                }
                Action::Kill => return Err(RunError::Interrupted.into()),
            }
        }
        let now = Instant::now();
        if report.is_none() {
            if let Some(still) = watch.as_mut().and_then(|w| w.stalled(now)) {
                let log = read_logs(&logs);
                drop(host);
                return Err(Failed::Stalled {
                    still,
                    retry: !workload_started,
                    log,
                });
            }
        }
        if boot_deadline.is_some_and(|d| now > d) {
            return Err(RunError::AgentNotReady {
                timeout: TESTHOST_BOOT_TIMEOUT,
                reason: "the test host did not start mvm".into(),
                log: read_logs(&logs),
            }
            .into());
        }
        if watchdog.is_some_and(|d| now > d) {
            return Err(
                RunError::Timeout(Duration::from_secs(spec.timeout_secs.unwrap_or(0))).into(),
            );
        }
        if let Some(FinalReport {
            stdout_bytes: want_out,
            stderr_bytes: want_err,
            ..
        }) = report
        {
            if got_out >= want_out && got_err >= want_err {
                break;
            }
            if drain_deadline.is_some_and(|d| now > d) {
                return Err(RunError::Agent(format!(
                    "output lost between test host and host: stdout {got_out}/{want_out} bytes, stderr {got_err}/{want_err} bytes"
                ))
                .into());
            }
        }
        let next = match stash.pop_front() {
            Some(chunk) => Ok(chunk),
            None => rx.recv_timeout(Duration::from_millis(100)),
        };
        match next {
            Ok(Chunk::Out(data)) => {
                workload_started = true;
                got_out = got_out.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                parts
                    .sink
                    .stdout(&data)
                    .map_err(RunError::io("writing the workload's stdout"))?;
            }
            Ok(Chunk::Err(data)) => {
                workload_started = true;
                got_err = got_err.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                parts
                    .sink
                    .stderr(&data)
                    .map_err(RunError::io("writing the workload's stderr"))?;
            }
            Ok(Chunk::Ctl(line)) => match parse_record(&line) {
                Ok(GuestRecord::Started) => {
                    boot_deadline = None;
                    if !request.journal {
                        // Not written ahead: the inner mvm starts the workload as soon as
                        // its VM is up, without asking.
                        workload_started = true;
                    }
                    // The next run's spare boots while this run's inner VM does: once this
                    // test host is up, not beside its boot, which it would slow on a small
                    // machine.
                    // A run that takes the warm snapshot starts none: the next run's disk
                    // is not there yet.
                    let extra = match &setup.warm {
                        None => Some(Vec::new()),
                        Some(carried) => carried.spare_drive().map(|d| vec![d.clone()]),
                    };
                    if let (Some(key), Some(extra)) = (parts.spare_key.take(), extra) {
                        let started = locate::mvm_binary().and_then(|mvm| {
                            spare::start(
                                &mvm,
                                qemu_bin,
                                &setup.testhost,
                                &setup.initramfs,
                                spec,
                                &extra,
                                &key,
                            )
                        });
                        if let Err(e) = started {
                            tracing::warn!("starting a spare test host: {e}");
                        }
                    }
                    testhost_ready_ms =
                        Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
                Ok(GuestRecord::Booted {
                    vmm_events,
                    restored,
                }) => {
                    // A warm start is vouched for by `snapshot_restored`, not `boot_verified`.
                    parts.journal.restoring(restored);
                    // Where a local VMM writes them, then appended ahead by the journal.
                    if let Some(p) = plan {
                        std::fs::write(&p.events, cut_events(vmm_events).as_bytes())
                            .map_err(RunError::io(format!("writing {}", p.events.display())))?;
                    }
                    workload_started = true;
                    let secrets = parts.journal.workload_starting()?;
                    let substitution = parts.journal.substitution_handoff().map(Box::new);
                    let proceed = HostRecord::Proceed {
                        secrets,
                        substitution,
                    };
                    write_json_line(&mut ctl_writer, &proceed)
                        .map_err(RunError::io("answering the test host"))?;
                    drop(proceed);
                    start_stdin(spec, &mut parts.stdin, &input)?;
                    if let Some(server) = parts.server.take() {
                        let agent = input
                            .try_clone()
                            .map_err(RunError::io("test host agent port"))?;
                        let mut vm = TestHostVm {
                            rx: &rx,
                            stash: &mut stash,
                            host: &mut host,
                            watch: watch.as_mut(),
                            observed: Vec::new(),
                        };
                        let served = server.serve(agent, parts.journal, &mut vm);
                        // Whatever the session's end, the test host stops and reports.
                        let _ = write_json_line(&mut ctl_writer, &HostRecord::Stop);
                        let _ = input.shutdown(std::net::Shutdown::Write);
                        session_status = Some(served?);
                    }
                }
                Ok(GuestRecord::Unpacked { memory_file }) => {
                    let seal = setup.warm.as_ref().and_then(|c| c.reseal(&memory_file));
                    write_json_line(&mut ctl_writer, &HostRecord::Resealed { seal })
                        .map_err(RunError::io("answering the test host"))?;
                }
                Ok(GuestRecord::Observed(observed)) => {
                    parts.journal.substitution_observed(&observed)?;
                }
                Ok(GuestRecord::Report {
                    outcome,
                    error,
                    stdout_bytes,
                    stderr_bytes,
                    refusal,
                    vmm_events,
                    vm_exit,
                    warm,
                }) => {
                    parts.warm_end = warm;
                    boot_deadline = None;
                    // The events go where a local VMM would have written them,
                    // before anything else can fail.
                    if let Some(p) = plan {
                        std::fs::write(&p.events, vmm_events.as_bytes())
                            .map_err(RunError::io(format!("writing {}", p.events.display())))?;
                    }
                    report = Some(FinalReport {
                        outcome,
                        error,
                        stdout_bytes,
                        stderr_bytes,
                        refusal,
                        vm_exit,
                    });
                    drain_deadline = Some(now + DRAIN_TIMEOUT);
                }
                Err(e) => {
                    return Err(
                        RunError::Agent(format!("bad record from the test host: {e}")).into(),
                    )
                }
            },
            Ok(Chunk::CtlClosed(reason)) if report.is_none() => {
                return Err(RunError::VmmDied {
                    reason: format!(
                        "the test host closed its control port before reporting{}",
                        reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    log: read_logs(&logs),
                    exit: host.exited().and_then(|(_, end)| end),
                }
                .into());
            }
            Ok(Chunk::CtlClosed(_)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if report.is_none() {
                    if let Some((how, end)) = host.exited() {
                        return Err(RunError::VmmDied {
                            reason: format!("the test host (qemu) {how}"),
                            log: read_logs(&logs),
                            exit: end,
                        }
                        .into());
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(RunError::VmmDied {
                    reason: "the test host's ports all closed".into(),
                    log: read_logs(&logs),
                    exit: host.exited().and_then(|(_, end)| end),
                }
                .into());
            }
        }
    }

    // The test host powers itself off after reporting; give it a moment.
    host.wait_ended(Duration::from_secs(5));
    drop(host);

    let Some(FinalReport {
        outcome,
        error,
        refusal,
        vm_exit,
        ..
    }) = report
    else {
        return Err(RunError::Agent("no report from the test host".into()).into());
    };
    match (outcome, error) {
        (Some(mut outcome), _) => {
            outcome.tier = Tier::Emulated;
            if let Some(status) = session_status {
                outcome.status = status;
            }
            outcome.timings.total_ms =
                u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            outcome.timings.host_boot_ms = testhost_ready_ms;
            outcome.timings.testhost_spare = spare_used;
            Ok(outcome)
        }
        (None, Some((kind, message))) => {
            Err(error_from_guest(kind, message, refusal, vm_exit, spec).into())
        }
        (None, None) => Err(RunError::Agent("empty report from the test host".into()).into()),
    }
}

/// Starts copying the workload's stdin into the test host's `mvm.in` port, when the
/// spec forwards it (once: the source is taken).
fn start_stdin(
    spec: &RunSpec,
    stdin: &mut Option<Box<dyn Read + Send>>,
    input: &UnixStream,
) -> Result<(), RunError> {
    if spec.stdin != StdinMode::Forward {
        return Ok(());
    }
    let Some(source) = stdin.take() else {
        return Ok(());
    };
    let port = input
        .try_clone()
        .map_err(RunError::io("test host stdin port"))?;
    pump_stdin(source, port).map_err(RunError::io("starting the stdin thread"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pumped_stdin_reads_back_through_the_framing() {
        let (host, guest) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        pump_stdin(Box::new(std::io::Cursor::new(data.clone())), host).unwrap();
        let mut got = Vec::new();
        FramedStdin::new(guest).read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
    }
}
