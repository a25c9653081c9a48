//! The test host side (`mvm __testhost-guest`): find the ports, read the
//! request, run it with the `kvm` backend, and write the report.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mvm_loader::measure::Sha256Digest;

use super::protocol::*;
use crate::backend::interrupt;
use crate::backend::snapshot_seal;
use crate::backend::warm::{Warm, WarmSource};
use crate::backend::{
    kvm, NoJournal, OutputSink, PlanFiles, RunArtifacts, RunError, RunJournal, SessionServer,
    StdinMode, VmProbe, Workload, WorkloadStatus,
};
use crate::egress_proxy::{Destination, EgressProxy, Handoff, Observed, Observer, Refusal};
use crate::image::StoredImage;
use crate::secrets::Secret;

/// The test host's nonce store. Its root is a fresh initramfs on every boot, so
/// the store lives for one boot only: replay across runs is caught by the
/// outer host (each run is a new plan with a new nonce, signed there), not here.
const GUEST_REPLAY_STORE: &str = "/tmp/mvm-replay-nonces";

/// How long the test host's ports may take to appear: the driver learns
/// their names from QEMU over its control queue, after `/init` has started.
const PORT_WAIT: Duration = Duration::from_secs(20);

/// The `/dev` node of the virtio-serial port called `name`, found through
/// `/sys/class/virtio-ports/<vportNpM>/name` (no udev in the test host).
fn find_port_once(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    entries.flatten().find_map(|entry| {
        let label = std::fs::read_to_string(entry.path().join("name")).ok()?;
        let node = Path::new("/dev").join(entry.file_name());
        (label.trim() == name && node.exists()).then_some(node)
    })
}

/// [`find_port_once`], retried until the port shows up or [`PORT_WAIT`] passes.
fn find_port(name: &str) -> std::io::Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(node) = find_port_once(name) {
            return Ok(node);
        }
        if start.elapsed() > PORT_WAIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {name} under /sys/class/virtio-ports after {PORT_WAIT:?}"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes output into a port and counts it.
struct PortSink {
    out: std::fs::File,
    err: std::fs::File,
    out_bytes: u64,
    err_bytes: u64,
}

impl OutputSink for PortSink {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(data)?;
        self.out_bytes = self
            .out_bytes
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.err.write_all(data)?;
        self.err_bytes = self
            .err_bytes
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        Ok(())
    }
}

/// Where the run's disks appear inside the test host, as `N` (and `N.verity`).
const DISK_DIR: &str = "/testhost/disks";

/// How long the test host waits for its disks to show up after `virtio_blk` loads.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// The virtio-blk disks of the test host, by serial (`/sys/block/vdX/serial`).
fn disks_by_serial() -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) {
            found.insert(serial.trim().to_owned(), name);
        }
    }
    found
}

/// The `/dev` node of the test host's disk with serial `serial`, waited for until
/// `deadline`.
fn find_disk(serial: &str, deadline: Instant) -> std::io::Result<PathBuf> {
    loop {
        if let Some(dev) = disks_by_serial().get(serial) {
            return Ok(Path::new("/dev").join(dev));
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("disk {serial} did not appear in the test host"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run's `--disk` values with each host path replaced by the test host's disk
/// of the same serial (see [`super::qemu::disk_drives`]), linked under `dir` as `N`,
/// its tree as `N.verity` beside it, where the VMM looks for it.
fn map_disks(disks: &[String], dir: &Path) -> std::io::Result<Vec<String>> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir)?;
    let deadline = Instant::now() + DISK_WAIT;
    let mut mapped = Vec::new();
    for (n, disk) in disks.iter().enumerate() {
        let (_, read_only) = crate::backend::parse_disk(disk).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("--disk {disk:?}"))
        })?;
        let mut wanted = vec![(format!("mvmd{n}"), dir.join(n.to_string()))];
        if read_only {
            wanted.push((
                format!("mvmt{n}"),
                dir.join(format!("{n}{}", mvm_loader::verity::TREE_SUFFIX)),
            ));
        }
        for (serial, link) in wanted {
            let device = find_disk(&serial, deadline)?;
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(device, &link)?;
        }
        let mode = if read_only { "ro" } else { "rw" };
        mapped.push(format!("path={},{mode}", dir.join(n.to_string()).display()));
    }
    Ok(mapped)
}

/// The inner side: `mvm __testhost-guest IMAGE_DIR` inside the test host.
/// Returns an error only when it cannot even report one.
pub fn guest_main(image_dir: &Path) -> std::io::Result<()> {
    let open_rw = |name: &str| -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(find_port(name)?)
    };
    let ctl = open_rw(PORT_CTL)?;
    let mut ctl_writer = ctl.try_clone()?;
    let mut reader = BufReader::new(ctl);
    let line = read_ctl_line(&mut reader)?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no request on mvm.ctl")
    })?;
    let mut request: GuestRequest = serde_json::from_str(line.trim_end())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    request.spec.disks = map_disks(&request.spec.disks, Path::new(DISK_DIR))?;
    write_json_line(&mut ctl_writer, &GuestRecord::Started)?;
    let (proceed, resealed) = listen_to_host(reader)?;

    let mut sink = PortSink {
        out: open_rw(PORT_OUT)?,
        err: open_rw(PORT_ERR)?,
        out_bytes: 0,
        err_bytes: 0,
    };
    let mut relay = None;
    let stdin: Option<Box<dyn Read + Send>> = match request.spec.stdin {
        _ if request.session => {
            relay = Some(PortRelay {
                port: open_rw(PORT_IN)?,
            });
            None
        }
        StdinMode::Forward => Some(Box::new(FramedStdin::new(std::fs::File::open(find_port(
            PORT_IN,
        )?)?))),
        StdinMode::Null => None,
    };
    let plan_dir = std::env::temp_dir().join(format!("mvm-plan-{}", std::process::id()));
    let warm_dir = std::env::temp_dir().join(format!("mvm-warm-{}", std::process::id()));
    let unpacking = Instant::now();
    let (warm_source, mut warm_end) = carried_in(
        request.warm.as_ref(),
        &warm_dir,
        request.spec.mem_mib,
        (&mut ctl_writer, &resealed),
    );
    let unpack_ms = matches!(warm_source, WarmSource::Given(Warm::Restore(_)))
        .then(|| u64::try_from(unpacking.elapsed().as_millis()).unwrap_or(u64::MAX));
    let plan = request
        .plan
        .as_ref()
        .map(|bundle| write_plan_files(bundle, &plan_dir))
        .transpose();
    let result = plan.and_then(|plan| {
        if request.spec.net.is_some() {
            super::uplink::bring_up()?;
        }
        let image = StoredImage::open_dir(image_dir)?;
        let vmm = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("mvm-vmm")))
            .ok_or_else(|| RunError::Missing("no mvm-vmm beside mvm".into()))?;
        // A warm start only as the host carries one in or out: this test host's files
        // end with it.
        let artifacts = RunArtifacts {
            image,
            vmm,
            warm: warm_source.clone(),
        };
        let mut ahead;
        let mut none = NoJournal;
        let journal: &mut dyn RunJournal = match (&plan, request.journal) {
            (plan, true) => {
                ahead = HostJournal {
                    // A --dev session has no events: the file never exists.
                    events: plan
                        .as_ref()
                        .map_or_else(|| plan_dir.join("vmm-events.jsonl"), |f| f.events.clone()),
                    ctl: ctl_writer.try_clone().map_err(RunError::io("mvm.ctl"))?,
                    proceed: &proceed,
                    handoff: None,
                    proxy: None,
                    restore: false,
                };
                &mut ahead
            }
            _ => &mut none,
        };
        let workload = match relay.as_mut() {
            Some(relay) => Workload::Session(relay),
            None => Workload::command(&mut sink, stdin),
        };
        let result = kvm::run_verified(&request.spec, &artifacts, plan.as_ref(), journal, workload);
        Ok((result, plan))
    });
    let (mut result, vmm_events) = match result {
        Ok((result, plan)) => {
            let events = plan.map(|p| read_events(&p.events)).unwrap_or_default();
            (result, events)
        }
        Err(e) => (Err(e), String::new()),
    };
    let _ = std::fs::remove_dir_all(&plan_dir);
    if let Ok(outcome) = &mut result {
        warm_end = carried_out(request.warm.as_ref(), &warm_dir, outcome).or(warm_end);
        outcome.timings.warm_unpack_ms = unpack_ms;
    }
    let _ = std::fs::remove_dir_all(&warm_dir);
    let _ = sink.out.flush();
    let _ = sink.err.flush();
    let record = match result {
        Ok(outcome) => GuestRecord::Report {
            outcome: Some(outcome),
            error: None,
            stdout_bytes: sink.out_bytes,
            stderr_bytes: sink.err_bytes,
            refusal: None,
            vmm_events,
            vm_exit: None,
            warm: warm_end,
        },
        Err(e) => GuestRecord::Report {
            vm_exit: match &e {
                RunError::VmmDied { exit, .. } => *exit,
                _ => None,
            },
            outcome: None,
            error: Some((error_kind(&e), e.to_string())),
            stdout_bytes: sink.out_bytes,
            stderr_bytes: sink.err_bytes,
            refusal: match e {
                RunError::BootRefused {
                    reason,
                    status,
                    detail,
                } => Some(GuestRefusal {
                    reason,
                    status,
                    detail,
                }),
                _ => None,
            },
            vmm_events,
            warm: warm_end,
        },
    };
    write_json_line(&mut ctl_writer, &record)
}

/// The warm start the host asked for, made ready in `dir`: a directory for the snapshot
/// to be taken into, or the pack on the `mvmwarm` disk unpacked into it with the host's
/// seal beside it (at most `mem_mib` of memory), sealed again naming the unpacked memory
/// file when the host vouches for the disk ([`reseal`]; over `host`: the control port
/// and the `resealed` answers). Returns what the run gets and what to report if it ends
/// before saying more (a pack that does not unpack is refused, and the run boots).
fn carried_in(
    warm: Option<&WarmRequest>,
    dir: &Path,
    mem_mib: u32,
    host: (&mut std::fs::File, &mpsc::Receiver<Option<String>>),
) -> (WarmSource, Option<WarmEnd>) {
    use std::os::unix::fs::DirBuilderExt;
    let Some(warm) = warm else {
        return (WarmSource::Off, None);
    };
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(dir) {
        tracing::warn!("no warm start: {}: {e}", dir.display());
        return (WarmSource::Off, Some(WarmEnd::Unused));
    }
    match warm {
        WarmRequest::Take => (
            WarmSource::Given(Warm::TakeUnsealed(dir.to_owned())),
            Some(WarmEnd::Unused),
        ),
        WarmRequest::Restore { seal, vouched } => {
            let unpacked = (|| -> Result<u64, String> {
                let disk = find_disk(super::warm::SERIAL, Instant::now() + DISK_WAIT)
                    .map_err(|e| e.to_string())?;
                read_ahead(&disk, READ_AHEAD_KB);
                let file =
                    std::fs::File::open(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
                // Smaller than a piece of the unpack (1 MiB), so the data is read straight into it.
                let mut reader = BufReader::with_capacity(64 << 10, file);
                let bytes =
                    super::snapshot_pack::unpack(&mut reader, dir, u64::from(mem_mib) << 20)
                        .map_err(|e| e.to_string())?;
                std::fs::write(dir.join(snapshot_seal::SEAL_FILE), seal)
                    .map_err(|e| format!("writing the seal: {e}"))?;
                if *vouched {
                    reseal(dir, host.0, host.1);
                }
                Ok(bytes)
            })();
            match unpacked {
                Ok(bytes) => {
                    tracing::info!(bytes, "warm snapshot unpacked");
                    (
                        WarmSource::Given(Warm::Restore(dir.to_owned())),
                        Some(WarmEnd::Unused),
                    )
                }
                Err(e) => {
                    tracing::warn!("warm snapshot refused: {e}");
                    eprintln!(
                        "mvm: warning: the warm snapshot's disk was refused ({e}); booting instead"
                    );
                    let _ = std::fs::remove_dir_all(dir);
                    (WarmSource::Off, Some(WarmEnd::Refused))
                }
            }
        }
    }
}

/// How long the test host waits for the host's `resealed`.
const RESEAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells the host the identity of the memory file unpacked in `dir` (once the clock has
/// passed its change time, so a later write moves it) and writes the seal it answers
/// with, naming that file: the VMM then finds it unchanged since sealed and does not hash
/// it. Without an answer the seal stays the original one, and the VMM hashes the file.
fn reseal(dir: &Path, ctl: &mut std::fs::File, resealed: &mpsc::Receiver<Option<String>>) {
    use mvm_loader::file_identity::{boot_id, identity, wait_past};
    let asked = (|| -> Result<(), String> {
        let boot = boot_id().ok_or("no boot id")?;
        let memory = std::fs::File::open(dir.join("memory")).map_err(|e| e.to_string())?;
        let memory_file = identity(&memory, &boot).map_err(|e| e.to_string())?;
        if !wait_past(&memory_file) {
            return Err("the clock did not pass the memory file's change time".into());
        }
        write_json_line(ctl, &GuestRecord::Unpacked { memory_file }).map_err(|e| e.to_string())
    })();
    if let Err(e) = asked {
        tracing::warn!("warm snapshot not sealed again: {e}");
        return;
    }
    match resealed.recv_timeout(RESEAL_TIMEOUT) {
        Ok(Some(seal)) => {
            if let Err(e) = std::fs::write(dir.join(snapshot_seal::SEAL_FILE), seal) {
                tracing::warn!("writing the seal again: {e}");
            }
        }
        Ok(None) => tracing::info!("the host does not vouch for the warm snapshot's disk"),
        Err(e) => tracing::warn!("no resealed from the host: {e}"),
    }
}

/// The read-ahead the warm snapshot's disk is read with: the whole pack is read once,
/// in order, and a larger read-ahead asks QEMU for it in fewer, larger virtio-blk
/// requests (the default is 128 KiB). Measured, it did not move the unpack beyond the
/// run-to-run noise (docs/snapshots.md); it is kept as the read pattern's right setting.
const READ_AHEAD_KB: u32 = 16 << 10;

/// Sets the read-ahead of the block device `disk` (`/dev/NAME`) through sysfs; a failure
/// only costs speed.
fn read_ahead(disk: &Path, kb: u32) {
    let Some(name) = disk.file_name() else { return };
    let knob = Path::new("/sys/block")
        .join(name)
        .join("queue/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, kb.to_string()) {
        tracing::debug!("{}: {e}", knob.display());
    }
}

/// After a run: the snapshot taken into `dir` packed onto the `mvmwarm` disk (flushed),
/// or whether the restore asked for happened. `None` leaves what [`carried_in`] said.
fn carried_out(
    warm: Option<&WarmRequest>,
    dir: &Path,
    outcome: &crate::backend::RunOutcome,
) -> Option<WarmEnd> {
    match warm? {
        WarmRequest::Restore { .. } if outcome.timings.warm_start => Some(WarmEnd::Restored),
        // The kvm backend boots instead of a restore only when the VMM refused it.
        WarmRequest::Restore { .. } if dir.exists() => None,
        WarmRequest::Restore { .. } => Some(WarmEnd::Refused),
        WarmRequest::Take => {
            if !std::fs::metadata(dir.join("manifest.json")).is_ok_and(|m| m.len() > 0) {
                return Some(WarmEnd::Unused);
            }
            let written = (|| -> Result<u64, String> {
                let disk = find_disk(super::warm::SERIAL, Instant::now() + DISK_WAIT)
                    .map_err(|e| e.to_string())?;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&disk)
                    .map_err(|e| format!("{}: {e}", disk.display()))?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                let n = super::snapshot_pack::pack(dir, &mut out).map_err(|e| e.to_string())?;
                let file = out.into_inner().map_err(|e| e.to_string())?;
                file.sync_all()
                    .map_err(|e| format!("flushing {}: {e}", disk.display()))?;
                Ok(n)
            })();
            match written {
                Ok(bytes) => {
                    tracing::info!(bytes, "warm snapshot packed onto its disk");
                    Some(WarmEnd::Kept)
                }
                Err(e) => {
                    tracing::warn!("warm snapshot not carried out: {e}");
                    Some(WarmEnd::Unused)
                }
            }
        }
    }
}

/// How long the inner side waits for the host's `proceed`.
const PROCEED_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads the host's lines after the request on a thread: a `signal` is
/// delivered here as if it had arrived at this process; each `proceed` (with
/// its secrets) and each `resealed` is passed on through the returned channels.
fn listen_to_host(
    mut reader: BufReader<std::fs::File>,
) -> std::io::Result<(mpsc::Receiver<Proceed>, mpsc::Receiver<Option<String>>)> {
    let (tx, rx) = mpsc::channel();
    let (resealed_tx, resealed_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("host-ctl".into())
        .spawn(move || loop {
            match read_ctl_line(&mut reader) {
                Ok(Some(line)) => match serde_json::from_str::<HostRecord>(line.trim_end()) {
                    Ok(HostRecord::Signal { signal }) => interrupt::deliver(signal),
                    Ok(HostRecord::Stop) => STOP.store(true, Ordering::SeqCst),
                    Ok(HostRecord::Resealed { seal }) => {
                        let _ = resealed_tx.send(seal);
                    }
                    Ok(HostRecord::Proceed {
                        secrets,
                        substitution,
                    }) => {
                        if tx.send((secrets, substitution.map(|b| *b))).is_err() {
                            return;
                        }
                    }
                    // Where, not what: the line may hold a secret.
                    Err(e) => tracing::warn!(
                        "bad line from the host ({:?} error at column {})",
                        e.classify(),
                        e.column()
                    ),
                },
                Ok(None) | Err(_) => return,
            }
        })?;
    Ok((rx, resealed_rx))
}

/// Set when the host sends `stop`: the session relay ends.
static STOP: AtomicBool = AtomicBool::new(false);

/// The inner side of a session: `mvm.in` relayed byte for byte to a fresh
/// agent connection, both ways, until the host says `stop`, the agent closes
/// the connection or the VM ends. The frames are the outer host's business.
struct PortRelay {
    port: std::fs::File,
}

/// Copies `from` into `to` until either ends; then sets `done`.
fn copy_thread(
    name: &str,
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    done: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Some(data) = buf.get(..n) else { break };
                        if to.write_all(data).and_then(|()| to.flush()).is_err() {
                            break;
                        }
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
        })
        .map(drop)
}

impl SessionServer for PortRelay {
    fn serve(
        &mut self,
        agent: std::os::unix::net::UnixStream,
        _journal: &mut dyn RunJournal,
        vm: &mut dyn VmProbe,
    ) -> Result<WorkloadStatus, RunError> {
        let io = RunError::io("session relay");
        let done = Arc::new(AtomicBool::new(false));
        copy_thread(
            "relay-in",
            self.port.try_clone().map_err(RunError::io("mvm.in"))?,
            agent
                .try_clone()
                .map_err(RunError::io("agent connection"))?,
            Arc::clone(&done),
        )
        .map_err(RunError::io("starting the relay"))?;
        copy_thread(
            "relay-out",
            agent
                .try_clone()
                .map_err(RunError::io("agent connection"))?,
            self.port.try_clone().map_err(RunError::io("mvm.in"))?,
            Arc::clone(&done),
        )
        .map_err(io)?;
        while !STOP.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
            if let Some(why) = vm.ended() {
                tracing::warn!("session: {why}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = agent.shutdown(std::net::Shutdown::Both);
        Ok(WorkloadStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        })
    }
}

/// What the host's `proceed` carries: the secrets to put into the guest, and what
/// the egress proxy here needs for secret substitution.
type Proceed = (Vec<Secret>, Option<Handoff>);

/// The inner side of the outer host's journal: sends `booted` with the VMM's
/// events so far and waits for the host to say it has written them.
struct HostJournal<'a> {
    events: PathBuf,
    ctl: std::fs::File,
    proceed: &'a mpsc::Receiver<Proceed>,
    /// Secret substitution's makings, from `proceed` until the proxy starts.
    handoff: Option<Handoff>,
    /// The egress proxy, until the run ends (dropping it stops it, before the report).
    proxy: Option<EgressProxy>,
    /// The VMM restores a snapshot (a warm start) rather than boots: its events vouch
    /// with `snapshot_restored`.
    restore: bool,
}

/// Tells the host what the egress proxy here substituted and refused, for its audit
/// log, as `observed` lines on `mvm.ctl`.
struct CtlObserver {
    ctl: Mutex<std::fs::File>,
}

impl CtlObserver {
    fn send(&self, observed: Observed) {
        let mut ctl = self
            .ctl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = write_json_line(&mut *ctl, &GuestRecord::Observed(observed)) {
            tracing::error!("egress proxy: not reported to the host: {e}");
        }
    }
}

impl Observer for CtlObserver {
    fn substituted(&self, secret: &str, value_sha256: &Sha256Digest, destination: &Destination) {
        self.send(Observed::substituted(secret, value_sha256, destination));
    }

    fn refused(&self, secret: Option<&str>, destination: &Destination, reason: Refusal) {
        self.send(Observed::refused(secret, destination, reason));
    }
}

impl RunJournal for HostJournal<'_> {
    fn restoring(&mut self, restore: bool) {
        self.restore = restore;
    }

    fn serve_substitution(
        &mut self,
        listener: Option<std::net::TcpListener>,
        guest: Option<std::net::Ipv4Addr>,
    ) -> Result<(), RunError> {
        let Some(handoff) = self.handoff.take() else {
            return Ok(());
        };
        let (Some(listener), Some(guest)) = (listener, guest) else {
            return Err(RunError::Missing(
                "secret substitution: the test host's network has no socket for the egress proxy"
                    .into(),
            ));
        };
        let observer = Arc::new(CtlObserver {
            ctl: Mutex::new(self.ctl.try_clone().map_err(RunError::io("mvm.ctl"))?),
        });
        let proxy = handoff
            .open()
            .and_then(|opened| opened.start(listener, guest, observer))
            .map_err(|e| {
                RunError::Missing(format!("secret substitution: the egress proxy: {e}"))
            })?;
        tracing::info!(
            port = proxy.port(),
            "egress proxy substituting in the test host"
        );
        self.proxy = Some(proxy);
        Ok(())
    }

    fn workload_starting(&mut self) -> Result<Vec<Secret>, RunError> {
        let booted = GuestRecord::Booted {
            vmm_events: read_events(&self.events),
            restored: self.restore,
        };
        write_json_line(&mut self.ctl, &booted).map_err(RunError::io("sending booted"))?;
        let start = Instant::now();
        loop {
            if interrupt::requested() {
                return Err(RunError::Interrupted);
            }
            match self.proceed.recv_timeout(Duration::from_millis(100)) {
                Ok((secrets, handoff)) => {
                    self.handoff = handoff;
                    return Ok(secrets);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < PROCEED_TIMEOUT => {}
                Err(_) => {
                    return Err(RunError::Agent(
                        "the host did not confirm the run's records".into(),
                    ))
                }
            }
        }
    }
}

/// Writes the envelope and the trusted key where the inner VMM reads them; the
/// replay store is the test host's (per boot), the events file per run.
fn write_plan_files(bundle: &PlanBundle, dir: &Path) -> Result<PlanFiles, RunError> {
    std::fs::create_dir_all(dir).map_err(RunError::io(format!("creating {}", dir.display())))?;
    let files = PlanFiles {
        envelope: dir.join("plan.dsse.json"),
        trust: dir.join("admission.pub"),
        replay_store: PathBuf::from(GUEST_REPLAY_STORE),
        events: dir.join("vmm-events.jsonl"),
    };
    for (path, text) in [
        (&files.envelope, &bundle.envelope),
        (&files.trust, &bundle.trust),
    ] {
        std::fs::write(path, text).map_err(RunError::io(format!("writing {}", path.display())))?;
    }
    Ok(files)
}

/// The VMM's events file, at most [`MAX_VMM_EVENTS`] bytes of whole lines.
fn read_events(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    cut_events(text)
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn a_verified_request_carries_the_envelope_and_key_and_events_come_back() {
        let request = GuestRequest {
            spec: spec(),
            plan: Some(PlanBundle {
                envelope: "{\"payloadType\":\"x\"}".into(),
                trust: "mvm-ed25519-public AAAA\n".into(),
            }),
            journal: true,
            session: false,
            warm: Some(WarmRequest::Restore {
                seal: "{\"payloadType\":\"s\"}".into(),
                vouched: true,
            }),
        };
        let line = serde_json::to_string(&request).unwrap();
        let back: GuestRequest = serde_json::from_str(&line).unwrap();
        assert_eq!(back, request);
        // A request without a plan (older host) is a --dev run.
        let dev: GuestRequest = serde_json::from_str(
            &serde_json::to_string(&serde_json::json!({"spec": spec()})).unwrap(),
        )
        .unwrap();
        assert!(dev.plan.is_none());

        let dir = tempfile::tempdir().unwrap();
        let files = write_plan_files(request.plan.as_ref().unwrap(), dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.trust).unwrap(),
            "mvm-ed25519-public AAAA\n"
        );
        assert_eq!(files.replay_store, Path::new(GUEST_REPLAY_STORE));
        assert_eq!(read_events(&files.events), "", "no events file yet");
        std::fs::write(&files.events, "a\nb\n").unwrap();
        assert_eq!(read_events(&files.events), "a\nb\n");
    }
}
