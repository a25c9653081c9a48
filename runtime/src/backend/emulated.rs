//! The `emulated` backend: the same `mvm-vmm` and image, run by a static
//! `mvm` inside the project's QEMU-TCG test host (`scripts/build-testhost`),
//! whose emulated AMD SVM gives it a real KVM. Slow; the outer wall is
//! QEMU's emulator. See `docs/run.md`.
//!
//! Host side ([`run`]): QEMU boots the test host kernel with its
//! `base.cpio` followed by an overlay archive holding `/testhost/run`, the
//! static `mvm` and `mvm-vmm`, and the image. Four virtio-serial ports
//! connect to Unix sockets this process listens on:
//!
//! | port       | direction   | carries                                        |
//! |------------|-------------|------------------------------------------------|
//! | `mvm.ctl`  | both        | request, then `proceed` and `signal` (JSON lines) in; `started`, `booted` and the final report (JSON lines) out |
//! | `mvm.in`   | host→guest  | the workload's stdin, closed at its end         |
//! | `mvm.out`  | guest→host  | the workload's stdout                           |
//! | `mvm.err`  | guest→host  | the workload's stderr                           |
//!
//! Test host side ([`guest_main`], `mvm __testhost-guest`): reads the
//! request, runs it with the `kvm` backend, and writes the report with the
//! outcome (or the error, by kind, so exit codes carry across) and the byte
//! counts of stdout and stderr, so the host knows when it has everything.
//!
//! Written ahead: for an audited run the inner `mvm` sends `booted` with the
//! VMM's events so far (its `boot_verified`) once the inner agent answered, and
//! waits for the host's `proceed`, which the host sends after appending them and
//! `exec_started` to its audit log; only then does the workload start. Ctrl-C
//! on the host travels as `signal` and is handled inside as a local one would be
//! (passed to the workload, the VM killed after the grace period).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::interrupt::{self, Action, Forwarder};
use super::scratch::ScratchDir;
use super::{
    kvm, locate, NoJournal, OutputSink, PlanFiles, ProcessEnd, RunArtifacts, RunError, RunJournal,
    RunOutcome, RunSpec, StdinMode, Tier,
};
use crate::image::cpio::Archive;
use crate::image::manifest::MANIFEST_FILE;
use crate::image::StoredImage;

/// The virtio-serial port names, as the test host sees them in
/// `/sys/class/virtio-ports/*/name`.
pub const PORT_CTL: &str = "mvm.ctl";
pub const PORT_IN: &str = "mvm.in";
pub const PORT_OUT: &str = "mvm.out";
pub const PORT_ERR: &str = "mvm.err";
/// Where the overlay puts things inside the test host.
const GUEST_BIN_DIR: &str = "testhost/bin";
const GUEST_IMAGE_DIR: &str = "testhost/image";
/// The longest control line either side accepts.
const MAX_CTL_LINE: u64 = 1 << 20;
/// The test host's memory beyond what the inner VM gets: its own kernel, the
/// initramfs (which holds the image and binaries) and the VMM.
const TESTHOST_OVERHEAD_MIB: u32 = 768;
/// The least memory the test host gets.
const TESTHOST_MIN_MIB: u32 = 1024;
/// How long the test host may take to boot and start the inner `mvm`.
const TESTHOST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the report the output ports may still be draining.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Beyond the workload and ready timeouts, what the outer watchdog allows.
const WATCHDOG_SLACK: Duration = Duration::from_secs(60);
/// Bump when the overlay layout changes, so cached initramfs files are rebuilt.
const OVERLAY_FORMAT: &str = "mvm-emulated-overlay-2";
/// The test host modules the virtio-serial ports need, in load order.
const VIRTIO_MODULES: &str =
    "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console";

/// The most of the VMM's events file the test host sends back (whole lines;
/// the rest is cut and says so in the log).
const MAX_VMM_EVENTS: usize = 512 << 10;
/// The test host's nonce store. Its root is a fresh initramfs on every boot, so
/// the store lives for one boot only: replay across runs is caught by the
/// outer host (each run is a new plan with a new nonce, signed there), not here.
const GUEST_REPLAY_STORE: &str = "/tmp/mvm-replay-nonces";

/// The request the host sends on `mvm.ctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    /// What to run.
    pub spec: RunSpec,
    /// The signed plan and the key to check it with; `None` boots `--dev`.
    /// Admission and the keys stay on the outer host: only the envelope and
    /// the admission public key travel.
    #[serde(default)]
    pub plan: Option<PlanBundle>,
    /// Whether the host writes the run's records ahead: the inner side then
    /// sends `booted` and waits for `proceed` before the workload starts.
    #[serde(default)]
    pub journal: bool,
}

/// A line the host sends on `mvm.ctl` after the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HostRecord {
    /// The host appended what `booted` reported: start the workload.
    Proceed,
    /// The host's `mvm` got this signal (Ctrl-C, SIGTERM, SIGHUP).
    Signal {
        /// The signal number.
        signal: i32,
    },
}

/// A signed plan in transit to the test host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBundle {
    /// The DSSE envelope, as signed.
    pub envelope: String,
    /// The admission public key file's text.
    pub trust: String,
}

/// A boot the inner VMM refused, carried out by its parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRefusal {
    /// The VMM's reason name.
    pub reason: String,
    /// The VMM's exit status.
    pub status: i32,
    /// The VMM's message.
    pub detail: String,
}

/// Why the inner run failed, by kind, so the host maps it to the same exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestErrorKind {
    NoBackend,
    Image,
    Missing,
    VmmDied,
    BootRefused,
    AgentNotReady,
    Timeout,
    Interrupted,
    Agent,
    Io,
}

/// One line the test host sends on `mvm.ctl`.
// One report per run crosses the port: its size on the stack does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum GuestRecord {
    /// The inner `mvm` read the request (the test host is up).
    Started,
    /// The inner agent answered; the workload waits for the host's `proceed`.
    Booted {
        /// The inner VMM's events file so far (its `boot_verified`).
        vmm_events: String,
    },
    /// The run ended; the counts say how much output the host should have.
    Report {
        outcome: Option<RunOutcome>,
        error: Option<(GuestErrorKind, String)>,
        stdout_bytes: u64,
        stderr_bytes: u64,
        /// The refusal, when the error kind is `boot_refused`.
        #[serde(default)]
        refusal: Option<GuestRefusal>,
        /// The inner VMM's events file (JSON lines), for the outer audit log.
        #[serde(default)]
        vmm_events: String,
        /// How the inner VMM process ended, when it died early.
        #[serde(default)]
        vm_exit: Option<ProcessEnd>,
    },
}

fn error_kind(e: &RunError) -> GuestErrorKind {
    match e {
        RunError::NoBackend(_) => GuestErrorKind::NoBackend,
        // Checked on the outer host before the test host starts.
        RunError::Resources(_) => GuestErrorKind::Missing,
        // Admission happens on the outer host; the test host never denies.
        RunError::Denied(_) => GuestErrorKind::Missing,
        RunError::Image(_) => GuestErrorKind::Image,
        RunError::Missing(_) => GuestErrorKind::Missing,
        RunError::VmmDied { .. } => GuestErrorKind::VmmDied,
        RunError::BootRefused { .. } => GuestErrorKind::BootRefused,
        RunError::AgentNotReady { .. } => GuestErrorKind::AgentNotReady,
        RunError::Timeout(_) => GuestErrorKind::Timeout,
        RunError::Interrupted => GuestErrorKind::Interrupted,
        RunError::Agent(_) => GuestErrorKind::Agent,
        RunError::Io { .. } => GuestErrorKind::Io,
        // netrt: the test host runs mvm as root; a --net failure there is mvm's own.
        RunError::Net(_) => GuestErrorKind::Missing,
    }
}

/// Rebuilds an inner error on the host side, keeping its kind.
fn error_from_guest(
    kind: GuestErrorKind,
    message: String,
    refusal: Option<GuestRefusal>,
    vm_exit: Option<ProcessEnd>,
    spec: &RunSpec,
) -> RunError {
    let inside = format!("inside the test host: {message}");
    match kind {
        GuestErrorKind::BootRefused => match refusal {
            Some(r) => RunError::BootRefused {
                reason: r.reason,
                status: r.status,
                detail: r.detail,
            },
            None => RunError::VmmDied {
                reason: inside,
                log: String::new(),
                exit: None,
            },
        },
        GuestErrorKind::NoBackend => RunError::NoBackend(inside),
        GuestErrorKind::Image | GuestErrorKind::Missing => RunError::Missing(inside),
        GuestErrorKind::VmmDied => RunError::VmmDied {
            reason: inside,
            log: String::new(),
            exit: vm_exit,
        },
        GuestErrorKind::AgentNotReady => RunError::AgentNotReady {
            timeout: Duration::from_secs(spec.ready_timeout_secs),
            reason: inside,
            log: String::new(),
        },
        GuestErrorKind::Timeout => {
            RunError::Timeout(Duration::from_secs(spec.timeout_secs.unwrap_or(0)))
        }
        GuestErrorKind::Interrupted => RunError::Interrupted,
        GuestErrorKind::Agent => RunError::Agent(inside),
        GuestErrorKind::Io => RunError::Io {
            what: "inside the test host".into(),
            source: std::io::Error::other(message),
        },
    }
}

/// Reads one control line of at most [`MAX_CTL_LINE`] bytes; `None` at EOF.
fn read_ctl_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.take(MAX_CTL_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control line longer than {MAX_CTL_LINE} bytes or cut short"),
        ));
    }
    Ok(Some(line))
}

/// Parses one control line from the test host.
pub fn parse_record(line: &str) -> Result<GuestRecord, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

/// The cache directory for derived test host files: `$MVM_CACHE`, else
/// `$XDG_CACHE_HOME/mvm`, else `~/.cache/mvm` (as the build scripts use).
fn cache_root() -> Result<PathBuf, RunError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("MVM_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("mvm")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/mvm")))
        .ok_or_else(|| RunError::Missing("no cache directory: set MVM_CACHE or HOME".into()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(RunError::io(format!("reading {}", path.display())))
}

/// The archive appended to the test host's `base.cpio`: `/testhost/run`
/// (which the test host's init runs), the static binaries and the image.
pub fn overlay_archive(mvm: &[u8], vmm: &[u8], image: &StoredImage) -> Result<Archive, RunError> {
    let cpio =
        |e: crate::image::cpio::CpioError| RunError::Missing(format!("test host overlay: {e}"));
    let mut archive = Archive::new();
    // The test host kernel has virtio as modules; scripts/build-testhost
    // copies them to /lib/modules and this script loads them (in dependency
    // order; one that is built in or missing is skipped).
    let run = format!(
        "#!/bin/sh\n\
         for m in {VIRTIO_MODULES}; do\n\
         \x20 [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null\n\
         done\n\
         exec /{GUEST_BIN_DIR}/mvm __testhost-guest /{GUEST_IMAGE_DIR}\n"
    );
    archive
        .add_file("testhost/run", 0o755, run.into_bytes())
        .map_err(cpio)?;
    archive
        .add_file(&format!("{GUEST_BIN_DIR}/mvm"), 0o755, mvm.to_vec())
        .map_err(cpio)?;
    archive
        .add_file(&format!("{GUEST_BIN_DIR}/mvm-vmm"), 0o755, vmm.to_vec())
        .map_err(cpio)?;
    let manifest = read_file(&image.dir.join(MANIFEST_FILE))?;
    archive
        .add_file(
            &format!("{GUEST_IMAGE_DIR}/{MANIFEST_FILE}"),
            0o644,
            manifest,
        )
        .map_err(cpio)?;
    for artifact in [&image.manifest.kernel, &image.manifest.initramfs] {
        let bytes = read_file(&image.dir.join(&artifact.file))?;
        archive
            .add_file(
                &format!("{GUEST_IMAGE_DIR}/{}", artifact.file),
                0o644,
                bytes,
            )
            .map_err(cpio)?;
    }
    Ok(archive)
}

/// The test host's initramfs for this image and these binaries, built once
/// and cached under the digest of its inputs.
fn testhost_initramfs(
    testhost: &Path,
    mvm: &Path,
    vmm: &Path,
    image: &StoredImage,
) -> Result<PathBuf, RunError> {
    let base = read_file(&testhost.join("base.cpio"))?;
    let mvm_bytes = read_file(mvm)?;
    let vmm_bytes = read_file(vmm)?;
    let mut key = Sha256::new();
    for part in [
        OVERLAY_FORMAT.as_bytes(),
        &Sha256::digest(&base),
        &Sha256::digest(&mvm_bytes),
        &Sha256::digest(&vmm_bytes),
        image.digest.as_bytes(),
    ] {
        key.update(Sha256::digest(part));
    }
    let key = hex::encode(key.finalize());
    let dir = cache_root()?.join("emulated");
    let path = dir.join(format!("{}.cpio", key.get(..32).unwrap_or(&key)));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(RunError::io(format!("creating {}", dir.display())))?;
    let overlay = overlay_archive(&mvm_bytes, &vmm_bytes, image)?
        .to_newc()
        .map_err(|e| RunError::Missing(format!("test host overlay: {e}")))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut bytes = base;
    bytes.extend_from_slice(&overlay);
    std::fs::write(&tmp, &bytes).map_err(RunError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(RunError::io(format!("writing {}", path.display())))?;
    prune_cache(&dir, &path);
    Ok(path)
}

/// How many test host initramfs files the cache keeps (each holds the image
/// and two binaries, tens of MiB).
const CACHE_KEEP: usize = 3;

/// Removes all but the [`CACHE_KEEP`] newest cached initramfs files.
/// A running QEMU has its file open already, so removal does not disturb it.
fn prune_cache(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpio") && p != keep)
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort();
    let surplus = files.len().saturating_sub(CACHE_KEEP.saturating_sub(1));
    for (_, path) in files.into_iter().take(surplus) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!("pruning {}: {e}", path.display());
        }
    }
}

/// The test host's memory (QEMU's `-m`) for a guest of `guest_mib`: what the
/// host must back, and what `backend::resources` checks before starting QEMU.
pub fn testhost_memory_mib(guest_mib: u32) -> u32 {
    guest_mib
        .saturating_add(TESTHOST_OVERHEAD_MIB)
        .max(TESTHOST_MIN_MIB)
}

/// The QEMU arguments: the test host machine of `scripts/e2e`, its serial
/// console into `console_log`, and the four ports on sockets in `sockets`.
pub fn qemu_args(
    testhost: &Path,
    initramfs: &Path,
    console_log: &Path,
    sockets: &Path,
    spec: &RunSpec,
) -> Vec<String> {
    let mem = testhost_memory_mib(spec.mem_mib);
    let mut args: Vec<String> = [
        "-M",
        "q35",
        "-cpu",
        "max",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-m",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(mem.to_string());
    args.push("-kernel".into());
    args.push(testhost.join("vmlinuz").display().to_string());
    args.push("-initrd".into());
    args.push(initramfs.display().to_string());
    args.push("-append".into());
    args.push("console=ttyS0 quiet panic=-1".into());
    args.push("-serial".into());
    args.push(format!("file:{}", console_log.display()));
    args.push("-device".into());
    args.push("virtio-serial-pci,id=mvmser".into());
    for (id, name) in [
        ("ctl", PORT_CTL),
        ("in", PORT_IN),
        ("out", PORT_OUT),
        ("err", PORT_ERR),
    ] {
        args.push("-chardev".into());
        args.push(format!(
            "socket,id={id},path={}",
            sockets.join(id).display()
        ));
        args.push("-device".into());
        args.push(format!(
            "virtserialport,bus=mvmser.0,chardev={id},name={name}"
        ));
    }
    args
}

/// QEMU, killed and reaped on drop.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_qemu(qemu: &Path, args: &[String], log: &Path) -> Result<Qemu, RunError> {
    use std::os::unix::process::CommandExt;
    let log_file =
        std::fs::File::create(log).map_err(RunError::io(format!("creating {}", log.display())))?;
    let mut command = Command::new(qemu);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0);
    // SAFETY: runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| RunError::VmmDied {
        reason: format!("cannot start {}: {e}", qemu.display()),
        log: String::new(),
        exit: None,
    })?;
    Ok(Qemu { child })
}

/// Accepts QEMU's connection on `listener`, watching QEMU and Ctrl-C.
fn accept_from(
    listener: &UnixListener,
    qemu: &mut Qemu,
    logs: &[&Path],
    timeout: Duration,
) -> Result<UnixStream, RunError> {
    listener
        .set_nonblocking(true)
        .map_err(RunError::io("listening for QEMU"))?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(RunError::io("accepting QEMU"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(RunError::io("accepting QEMU")(e)),
        }
        if interrupt::requested() {
            return Err(RunError::Interrupted);
        }
        if let Ok(Some(status)) = qemu.child.try_wait() {
            return Err(RunError::VmmDied {
                reason: format!("qemu exited at start with {status}"),
                log: read_logs(logs),
                exit: Some(status.into()),
            });
        }
        if start.elapsed() > timeout {
            return Err(RunError::VmmDied {
                reason: "qemu did not connect its serial ports".into(),
                log: read_logs(logs),
                exit: None,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_logs(logs: &[&Path]) -> String {
    logs.iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .collect::<Vec<_>>()
        .join("\n")
}

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
fn pump_stdin(mut source: Box<dyn Read + Send>, mut port: UnixStream) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("testhost-in".into())
        .spawn(move || {
            let mut buf = vec![0u8; STDIN_FRAME_MAX];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                let Some(data) = buf.get(..n) else { return };
                let len = u32::try_from(n).unwrap_or(0).to_le_bytes();
                if port
                    .write_all(&len)
                    .and_then(|()| port.write_all(data))
                    .is_err()
                    || n == 0
                {
                    return;
                }
            }
        })
        .map(drop)
}

/// The largest stdin frame.
const STDIN_FRAME_MAX: usize = 64 << 10;

/// The test host's end of the stdin port: `[u32 LE length][bytes]` frames,
/// the empty frame meaning end of input. A virtio-serial port has no
/// reliable end of file: the host closing its socket reaches the guest on
/// the control queue, which can overtake the last data on the port's own
/// queue, so the end travels in band.
pub struct FramedStdin<R> {
    inner: R,
    left: usize,
    ended: bool,
}

impl<R: Read> FramedStdin<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            ended: false,
        }
    }
}

impl<R: Read> Read for FramedStdin<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len)?;
            let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
            if len == 0 {
                self.ended = true;
                return Ok(0);
            }
            if len > STDIN_FRAME_MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("stdin frame of {len} bytes (at most {STDIN_FRAME_MAX})"),
                ));
            }
            self.left = len;
        }
        let want = buf.len().min(self.left);
        let slot = buf.get_mut(..want).unwrap_or_default();
        let n = self.inner.read(slot)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stdin port closed inside a frame",
            ));
        }
        self.left = self.left.saturating_sub(n);
        Ok(n)
    }
}

/// Runs `spec` inside the test host with QEMU `qemu`.
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

pub fn run(
    spec: &RunSpec,
    image: &StoredImage,
    qemu_bin: &Path,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    sink: &mut dyn OutputSink,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<RunOutcome, RunError> {
    let start = Instant::now();
    let bundle = plan.map(plan_bundle).transpose()?;
    if let Some(disk) = spec.disks.first() {
        return Err(RunError::Missing(format!(
            "--disk {disk}: the emulated backend cannot attach disks yet (the file would have to travel into the test host); use --backend kvm on a host with hardware KVM"
        )));
    }
    let testhost = locate::testhost_dir()?;
    let (mvm, vmm) = locate::static_binaries()?;
    let initramfs = testhost_initramfs(&testhost, &mvm, &vmm, image)?;

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
    let args = qemu_args(&testhost, &initramfs, &console, scratch.path(), spec);
    tracing::debug!("starting {} {}", qemu_bin.display(), args.join(" "));
    let mut qemu = spawn_qemu(qemu_bin, &args, &qemu_log)?;
    let logs = [console.as_path(), qemu_log.as_path()];
    let mut streams = Vec::new();
    for listener in &listeners {
        streams.push(accept_from(
            listener,
            &mut qemu,
            &logs,
            Duration::from_secs(30),
        )?);
    }
    drop(listeners);
    let mut streams = streams.into_iter();
    let (Some(ctl), Some(input), Some(out), Some(err)) = (
        streams.next(),
        streams.next(),
        streams.next(),
        streams.next(),
    ) else {
        return Err(RunError::Agent("test host ports missing".into()));
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
        journal: bundle.is_some(),
        plan: bundle,
    };
    write_json_line(&mut ctl_writer, &request)
        .map_err(RunError::io("sending the request to the test host"))?;
    if let (StdinMode::Forward, Some(source)) = (spec.stdin, stdin) {
        let port = input
            .try_clone()
            .map_err(RunError::io("test host stdin port"))?;
        pump_stdin(source, port).map_err(RunError::io("starting the stdin thread"))?;
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
    loop {
        // Until the inner mvm runs, a signal stops everything; then it is the
        // inner mvm's to handle, as a local run would.
        if testhost_ready_ms.is_none() && report.is_none() {
            if interrupt::requested() {
                return Err(RunError::Interrupted);
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
                Action::Kill => return Err(RunError::Interrupted),
            }
        }
        let now = Instant::now();
        if boot_deadline.is_some_and(|d| now > d) {
            return Err(RunError::AgentNotReady {
                timeout: TESTHOST_BOOT_TIMEOUT,
                reason: "the test host did not start mvm".into(),
                log: read_logs(&logs),
            });
        }
        if watchdog.is_some_and(|d| now > d) {
            return Err(RunError::Timeout(Duration::from_secs(
                spec.timeout_secs.unwrap_or(0),
            )));
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
                )));
            }
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Chunk::Out(data)) => {
                got_out = got_out.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                sink.stdout(&data)
                    .map_err(RunError::io("writing the workload's stdout"))?;
            }
            Ok(Chunk::Err(data)) => {
                got_err = got_err.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                sink.stderr(&data)
                    .map_err(RunError::io("writing the workload's stderr"))?;
            }
            Ok(Chunk::Ctl(line)) => match parse_record(&line) {
                Ok(GuestRecord::Started) => {
                    boot_deadline = None;
                    testhost_ready_ms =
                        Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
                Ok(GuestRecord::Booted { vmm_events }) => {
                    // Where a local VMM writes them, then appended ahead by the journal.
                    if let Some(p) = plan {
                        std::fs::write(&p.events, cut_events(vmm_events).as_bytes())
                            .map_err(RunError::io(format!("writing {}", p.events.display())))?;
                    }
                    journal.workload_starting()?;
                    write_json_line(&mut ctl_writer, &HostRecord::Proceed)
                        .map_err(RunError::io("answering the test host"))?;
                }
                Ok(GuestRecord::Report {
                    outcome,
                    error,
                    stdout_bytes,
                    stderr_bytes,
                    refusal,
                    vmm_events,
                    vm_exit,
                }) => {
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
                    return Err(RunError::Agent(format!(
                        "bad record from the test host: {e}"
                    )))
                }
            },
            Ok(Chunk::CtlClosed(reason)) if report.is_none() => {
                return Err(RunError::VmmDied {
                    reason: format!(
                        "the test host closed its control port before reporting{}",
                        reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    log: read_logs(&logs),
                    exit: qemu.child.try_wait().ok().flatten().map(Into::into),
                });
            }
            Ok(Chunk::CtlClosed(_)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if report.is_none() {
                    if let Ok(Some(status)) = qemu.child.try_wait() {
                        return Err(RunError::VmmDied {
                            reason: format!("the test host (qemu) exited with {status}"),
                            log: read_logs(&logs),
                            exit: Some(status.into()),
                        });
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(RunError::VmmDied {
                    reason: "the test host's ports all closed".into(),
                    log: read_logs(&logs),
                    exit: qemu.child.try_wait().ok().flatten().map(Into::into),
                });
            }
        }
    }

    // The test host powers itself off after reporting; give it a moment.
    let stop_start = Instant::now();
    while stop_start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = qemu.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(qemu);
    drop(scratch);

    let Some(FinalReport {
        outcome,
        error,
        refusal,
        vm_exit,
        ..
    }) = report
    else {
        return Err(RunError::Agent("no report from the test host".into()));
    };
    match (outcome, error) {
        (Some(mut outcome), _) => {
            outcome.tier = Tier::Emulated;
            outcome.timings.total_ms =
                u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            outcome.timings.host_boot_ms = testhost_ready_ms;
            Ok(outcome)
        }
        (None, Some((kind, message))) => {
            Err(error_from_guest(kind, message, refusal, vm_exit, spec))
        }
        (None, None) => Err(RunError::Agent("empty report from the test host".into())),
    }
}

// ---------------------------------------------------------------------------
// Test host side.
// ---------------------------------------------------------------------------

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
    let request: GuestRequest = serde_json::from_str(line.trim_end())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_json_line(&mut ctl_writer, &GuestRecord::Started)?;
    let proceed = listen_to_host(reader)?;

    let mut sink = PortSink {
        out: open_rw(PORT_OUT)?,
        err: open_rw(PORT_ERR)?,
        out_bytes: 0,
        err_bytes: 0,
    };
    let stdin: Option<Box<dyn Read + Send>> = match request.spec.stdin {
        StdinMode::Forward => Some(Box::new(FramedStdin::new(std::fs::File::open(find_port(
            PORT_IN,
        )?)?))),
        StdinMode::Null => None,
    };
    let plan_dir = std::env::temp_dir().join(format!("mvm-plan-{}", std::process::id()));
    let plan = request
        .plan
        .as_ref()
        .map(|bundle| write_plan_files(bundle, &plan_dir))
        .transpose();
    let result = plan.and_then(|plan| {
        let image = StoredImage::open_dir(image_dir)?;
        let vmm = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("mvm-vmm")))
            .ok_or_else(|| RunError::Missing("no mvm-vmm beside mvm".into()))?;
        let artifacts = RunArtifacts { image, vmm };
        let mut ahead;
        let mut none = NoJournal;
        let journal: &mut dyn RunJournal = match (&plan, request.journal) {
            (Some(files), true) => {
                ahead = HostJournal {
                    events: files.events.clone(),
                    ctl: ctl_writer.try_clone().map_err(RunError::io("mvm.ctl"))?,
                    proceed: &proceed,
                };
                &mut ahead
            }
            _ => &mut none,
        };
        let result = kvm::run_verified(
            &request.spec,
            &artifacts,
            plan.as_ref(),
            journal,
            &mut sink,
            stdin,
        );
        Ok((result, plan))
    });
    let (result, vmm_events) = match result {
        Ok((result, plan)) => {
            let events = plan.map(|p| read_events(&p.events)).unwrap_or_default();
            (result, events)
        }
        Err(e) => (Err(e), String::new()),
    };
    let _ = std::fs::remove_dir_all(&plan_dir);
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
        },
    };
    write_json_line(&mut ctl_writer, &record)
}

/// How long the inner side waits for the host's `proceed`.
const PROCEED_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads the host's lines after the request on a thread: a `signal` is
/// delivered here as if it had arrived at this process; each `proceed` is
/// passed on through the returned channel.
fn listen_to_host(mut reader: BufReader<std::fs::File>) -> std::io::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("host-ctl".into())
        .spawn(move || loop {
            match read_ctl_line(&mut reader) {
                Ok(Some(line)) => match serde_json::from_str::<HostRecord>(line.trim_end()) {
                    Ok(HostRecord::Signal { signal }) => interrupt::deliver(signal),
                    Ok(HostRecord::Proceed) => {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("bad line from the host: {e}"),
                },
                Ok(None) | Err(_) => return,
            }
        })?;
    Ok(rx)
}

/// The inner side of the outer host's journal: sends `booted` with the VMM's
/// events so far and waits for the host to say it has written them.
struct HostJournal<'a> {
    events: PathBuf,
    ctl: std::fs::File,
    proceed: &'a mpsc::Receiver<()>,
}

impl RunJournal for HostJournal<'_> {
    fn workload_starting(&mut self) -> Result<(), RunError> {
        let booted = GuestRecord::Booted {
            vmm_events: read_events(&self.events),
        };
        write_json_line(&mut self.ctl, &booted).map_err(RunError::io("sending booted"))?;
        let start = Instant::now();
        loop {
            if interrupt::requested() {
                return Err(RunError::Interrupted);
            }
            match self.proceed.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(()),
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

fn cut_events(mut text: String) -> String {
    if text.len() > MAX_VMM_EVENTS {
        let end = text
            .as_bytes()
            .get(..MAX_VMM_EVENTS)
            .and_then(|head| head.iter().rposition(|&b| b == b'\n'))
            .map_or(0, |i| i + 1);
        tracing::warn!(
            "VMM events are {} bytes; only the first {end} are sent back",
            text.len()
        );
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: Default::default(),
            workdir: None,
            cpus: 1,
            mem_mib: 128,
            timeout_secs: Some(2),
            stdin: StdinMode::Null,
            disks: vec![],
            ready_timeout_secs: 30,
            net: None,
        }
    }

    #[test]
    fn records_round_trip_and_refuse_junk() {
        let report = GuestRecord::Report {
            outcome: None,
            error: Some((GuestErrorKind::Timeout, "slow".into())),
            stdout_bytes: 3,
            stderr_bytes: 0,
            refusal: None,
            vmm_events: "{\"event\":\"vm_exit\"}\n".into(),
            vm_exit: Some(ProcessEnd {
                code: Some(1),
                signal: None,
            }),
        };
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(parse_record(&line).unwrap(), report);
        assert_eq!(parse_record("\"started\"\n").unwrap(), GuestRecord::Started);
        let booted = GuestRecord::Booted {
            vmm_events: "{\"event\":\"boot_verified\"}\n".into(),
        };
        let line = serde_json::to_string(&booted).unwrap();
        assert_eq!(parse_record(&line).unwrap(), booted);
        for host in [HostRecord::Proceed, HostRecord::Signal { signal: 2 }] {
            let line = serde_json::to_string(&host).unwrap();
            assert_eq!(serde_json::from_str::<HostRecord>(&line).unwrap(), host);
        }
        assert_eq!(
            serde_json::to_string(&HostRecord::Signal { signal: 2 }).unwrap(),
            r#"{"signal":{"signal":2}}"#
        );
        assert!(parse_record("{\"report\":{\"bogus\":1}}").is_err());
        assert!(parse_record("").is_err());
    }

    #[test]
    fn inner_errors_keep_their_kind() {
        let e = error_from_guest(GuestErrorKind::Timeout, "t".into(), None, None, &spec());
        assert!(matches!(e, RunError::Timeout(d) if d == Duration::from_secs(2)));
        let end = ProcessEnd {
            code: None,
            signal: Some(9),
        };
        let e = error_from_guest(
            GuestErrorKind::VmmDied,
            "boom".into(),
            None,
            Some(end),
            &spec(),
        );
        assert!(matches!(e, RunError::VmmDied { exit: Some(x), .. } if x == end));
        assert!(matches!(e, RunError::VmmDied { .. }));
        assert!(e.to_string().contains("inside the test host: boom"));
        assert_eq!(
            error_kind(&RunError::Interrupted),
            GuestErrorKind::Interrupted
        );
        let refusal = GuestRefusal {
            reason: "kernel_mismatch".into(),
            status: 20,
            detail: "kernel digest mismatch".into(),
        };
        let e = error_from_guest(
            GuestErrorKind::BootRefused,
            "x".into(),
            Some(refusal),
            None,
            &spec(),
        );
        assert!(
            matches!(&e, RunError::BootRefused { reason, status: 20, .. } if reason == "kernel_mismatch"),
            "{e}"
        );
    }

    #[test]
    fn a_verified_request_carries_the_envelope_and_key_and_events_come_back() {
        let request = GuestRequest {
            spec: spec(),
            plan: Some(PlanBundle {
                envelope: "{\"payloadType\":\"x\"}".into(),
                trust: "mvm-ed25519-public AAAA\n".into(),
            }),
            journal: true,
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

    #[test]
    fn events_sent_back_are_cut_at_a_line() {
        let line = format!("{}\n", "x".repeat(1000));
        let text = line.repeat(MAX_VMM_EVENTS / 1000 + 10);
        let cut = cut_events(text);
        assert!(cut.len() <= MAX_VMM_EVENTS);
        assert!(cut.ends_with('\n'));
        assert_eq!(cut.len() % line.len(), 0);
        assert_eq!(cut_events("short\n".into()), "short\n");
    }

    #[test]
    fn control_lines_are_bounded() {
        let long = vec![b'x'; usize::try_from(MAX_CTL_LINE).unwrap() + 10];
        let mut reader = BufReader::new(long.as_slice());
        assert!(read_ctl_line(&mut reader).is_err());
        let mut ok = BufReader::new(&b"\"started\"\n"[..]);
        assert_eq!(
            read_ctl_line(&mut ok).unwrap().as_deref(),
            Some("\"started\"\n")
        );
        assert_eq!(read_ctl_line(&mut ok).unwrap(), None);
    }

    #[test]
    fn stdin_frames_carry_bytes_and_an_in_band_end() {
        let mut wire = Vec::new();
        for chunk in [&b"piped "[..], &b"stdin\n"[..], &b""[..]] {
            wire.extend_from_slice(&u32::try_from(chunk.len()).unwrap().to_le_bytes());
            wire.extend_from_slice(chunk);
        }
        // Bytes after the end frame are never read.
        wire.extend_from_slice(b"junk");
        let mut out = String::new();
        FramedStdin::new(wire.as_slice())
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "piped stdin\n");

        let mut oversize = (u32::try_from(STDIN_FRAME_MAX).unwrap() + 1)
            .to_le_bytes()
            .to_vec();
        oversize.extend_from_slice(&[0; 8]);
        let err = FramedStdin::new(oversize.as_slice())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

        let mut cut = 10u32.to_le_bytes().to_vec();
        cut.extend_from_slice(b"abc");
        let err = FramedStdin::new(cut.as_slice())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

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

    #[test]
    fn the_cache_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..5 {
            let p = dir.path().join(format!("{i}.cpio"));
            std::fs::write(&p, b"x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            paths.push(p);
        }
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        prune_cache(dir.path(), &paths[0]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // The one in use plus the two newest others; non-cpio files stay.
        assert_eq!(left, ["0.cpio", "3.cpio", "4.cpio", "other.txt"]);
    }

    #[test]
    fn qemu_gets_four_named_ports_and_enough_memory() {
        let args = qemu_args(
            Path::new("/th"),
            Path::new("/c/i.cpio"),
            Path::new("/s/console.log"),
            Path::new("/s"),
            &spec(),
        );
        let joined = args.join(" ");
        for name in [PORT_CTL, PORT_IN, PORT_OUT, PORT_ERR] {
            assert!(joined.contains(&format!("name={name}")), "{joined}");
        }
        assert!(joined.contains("-kernel /th/vmlinuz -initrd /c/i.cpio"));
        assert!(joined.contains("socket,id=ctl,path=/s/ctl"));
        let m = args.iter().position(|a| a == "-m").unwrap();
        assert_eq!(args[m + 1], "1024");
        assert!(joined.contains("-accel tcg"));
    }

    #[test]
    fn overlay_carries_run_script_binaries_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let Some(inputs) = crate::image::build::tests::fake_inputs(dir.path()) else {
            return;
        };
        let store = crate::image::ImageStore::at(dir.path());
        let image = store
            .put("t", &crate::image::build(&inputs).unwrap())
            .unwrap();
        let bytes = overlay_archive(b"mvm", b"vmm", &image)
            .unwrap()
            .to_newc()
            .unwrap();
        let entries = crate::image::cpio::parse_newc(&bytes).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "testhost/run",
            "testhost/bin/mvm",
            "testhost/bin/mvm-vmm",
            "testhost/image/manifest.json",
            "testhost/image/vmlinux",
            "testhost/image/initramfs.cpio",
        ] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
        let run = entries.iter().find(|e| e.path == "testhost/run").unwrap();
        let crate::image::cpio::EntryKind::File(script) = &run.kind else {
            panic!("run is not a file");
        };
        let script = String::from_utf8(script.clone()).unwrap();
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert!(script.contains("insmod /lib/modules/$m.ko"), "{script}");
        assert!(script.contains("virtio_console"), "{script}");
        assert!(
            script.contains("exec /testhost/bin/mvm __testhost-guest /testhost/image\n"),
            "{script}"
        );
        // The carried image opens and verifies as the same digest.
        let out = dir.path().join("carried");
        std::fs::create_dir(&out).unwrap();
        for e in &entries {
            if let (Some(name), crate::image::cpio::EntryKind::File(data)) =
                (e.path.strip_prefix("testhost/image/"), &e.kind)
            {
                std::fs::write(out.join(name), data).unwrap();
            }
        }
        let carried = StoredImage::open_dir(&out).unwrap();
        assert_eq!(carried.digest, image.digest);
        carried.verify().unwrap();
    }
}
