//! `mvm-vmm` as a child process: one process per VM, supervised by the run.
//!
//! The child gets its own process group (a terminal's Ctrl-C reaches `mvm`,
//! which stops the workload and the VM in order) and `PR_SET_PDEATHSIG`, so
//! the VM dies with `mvm` even if `mvm` itself is killed. Its console and
//! logs go to a file in the run's scratch directory, never into the
//! workload's output.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{PlanFiles, RunError, RunSpec};
use crate::image::StoredImage;

/// The guest CID of a VM (the first one available to guests).
pub const GUEST_CID: u32 = 3;
/// The most of the VM log kept for error messages.
const LOG_TAIL_BYTES: u64 = 16 << 10;

/// The VMM's exit statuses for a refused boot (`mvm-vmm --help`; the
/// constants live in `vmm/src/verified_boot.rs`, which the runtime does not link).
pub const REFUSAL_STATUSES: std::ops::RangeInclusive<i32> = 10..=25;
/// How the VMM starts the line that explains a refusal.
const REFUSAL_PREFIX: &str = "mvm-vmm: boot refused (";

/// The `mvm-vmm` arguments for `spec` on `image`, with its vsock socket at
/// `uds` and its boot report written to `report`: verified against `plan`
/// when given, else `--dev` (nothing verified). The command line passed is the
/// manifest's, byte for byte: the one admission pinned in the plan (the VMM
/// appends its `virtio_mmio.device=` entries after comparing it).
pub fn vmm_args(
    image: &StoredImage,
    spec: &RunSpec,
    uds: &Path,
    report: &Path,
    plan: Option<&PlanFiles>,
) -> Vec<String> {
    vmm_args_with(image, spec, uds, report, plan, &SnapshotArgs::default())
}

/// What a VMM is asked to do with snapshots.
#[derive(Debug, Clone, Default)]
pub struct SnapshotArgs {
    /// `--snapshot-dir` and `--snapshot-epoch`: where SIGUSR2 writes one.
    pub write_to: Option<(PathBuf, u64)>,
    /// `--snapshot-continue`: the VM goes on after it.
    pub continue_after: bool,
    /// `--snapshot-bind-artifacts`: bound to the measured artifacts (a warm start's).
    pub bind_artifacts: bool,
    /// `--restore` and `--restore-min-epoch`: start from this sealed snapshot.
    pub restore: Option<(PathBuf, u64)>,
    /// `--trust` for the seal when there is no plan (a development restore).
    pub trust: Option<PathBuf>,
}

/// [`vmm_args`], with snapshots: `--snapshot-dir` (its epoch, whether the VM goes on,
/// what it is bound to) so that SIGUSR2 writes one, and, to start from one, `--restore`
/// in place of the kernel, initramfs, command line and resources (the snapshot's).
pub fn vmm_args_with(
    image: &StoredImage,
    spec: &RunSpec,
    uds: &Path,
    report: &Path,
    plan: Option<&PlanFiles>,
    snapshot: &SnapshotArgs,
) -> Vec<String> {
    let mut args = match plan {
        Some(p) => vec![
            "--plan".to_owned(),
            p.envelope.display().to_string(),
            "--trust".to_owned(),
            p.trust.display().to_string(),
            "--replay-store".to_owned(),
            p.replay_store.display().to_string(),
            "--events".to_owned(),
            p.events.display().to_string(),
        ],
        None => {
            let mut args = vec!["--dev".to_owned()];
            if let (Some(_), Some(trust)) = (&snapshot.restore, &snapshot.trust) {
                args.extend(["--trust".to_owned(), trust.display().to_string()]);
            }
            args
        }
    };
    match &snapshot.restore {
        Some((dir, min_epoch)) => args.extend([
            "--restore".to_owned(),
            dir.display().to_string(),
            "--restore-min-epoch".to_owned(),
            min_epoch.to_string(),
        ]),
        None => args.extend([
            "--kernel".to_owned(),
            image.kernel_path().display().to_string(),
            "--initrd".to_owned(),
            image.initramfs_path().display().to_string(),
            "--cmdline".to_owned(),
            image.manifest.cmdline.clone(),
            "--vcpus".to_owned(),
            spec.cpus.to_string(),
            "--mem-mib".to_owned(),
            spec.mem_mib.to_string(),
        ]),
    }
    if let Some((dir, epoch)) = &snapshot.write_to {
        args.extend([
            "--snapshot-dir".to_owned(),
            dir.display().to_string(),
            "--snapshot-epoch".to_owned(),
            epoch.to_string(),
        ]);
        if snapshot.continue_after {
            args.push("--snapshot-continue".to_owned());
        }
        if snapshot.bind_artifacts {
            args.push("--snapshot-bind-artifacts".to_owned());
        }
    }
    args.extend([
        "--vsock".to_owned(),
        format!("cid={GUEST_CID},uds={}", uds.display()),
        "--boot-report".to_owned(),
        report.display().to_string(),
    ]);
    for disk in &spec.disks {
        args.push("--disk".to_owned());
        args.push(disk.clone());
    }
    args
}

/// The largest boot report read back.
const MAX_BOOT_REPORT: u64 = 1 << 20;

/// Reads the VMM's JSON boot report, if it wrote one.
pub fn read_boot_report(path: &Path) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_BOOT_REPORT)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A running `mvm-vmm`; killed and reaped on drop.
#[derive(Debug)]
pub struct VmmProcess {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl VmmProcess {
    /// Starts `vmm` with `args`, its stdout and stderr going to `log`.
    pub fn spawn(vmm: &Path, args: &[String], log: &Path) -> Result<Self, RunError> {
        let log_file = std::fs::File::create(log).map_err(RunError::io(format!(
            "creating the VM log {}",
            log.display()
        )))?;
        let log_err = log_file
            .try_clone()
            .map_err(RunError::io("duplicating the VM log"))?;
        let mut command = Command::new(vmm);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        own_group_dies_with_us(&mut command);
        tracing::debug!("starting {} {}", vmm.display(), args.join(" "));
        let child = command.spawn().map_err(|e| RunError::VmmDied {
            reason: format!("cannot start {}: {e}", vmm.display()),
            log: String::new(),
            exit: None,
        })?;
        Ok(Self {
            child,
            log: log.to_owned(),
            exited: None,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the child ended, if it has.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The end of the VM log, for error messages.
    pub fn log_tail(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.log) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A [`RunError::VmmDied`] for an exit that came too early, or
    /// [`RunError::BootRefused`] when the VMM refused the plan.
    pub fn died(&self, status: ExitStatus) -> RunError {
        let log = self.log_tail();
        if let Some(refused) = status
            .code()
            .filter(|c| REFUSAL_STATUSES.contains(c))
            .and_then(|code| refusal_from_log(code, &log))
        {
            return refused;
        }
        RunError::VmmDied {
            reason: format!("mvm-vmm (pid {}) exited early with {status}", self.pid()),
            log,
            exit: Some(status.into()),
        }
    }

    /// Waits up to `grace` for the child to end on its own, then kills it.
    /// Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// Sends `signal` to the child, if it has not exited.
    pub fn signal(&mut self, signal: i32) -> std::io::Result<()> {
        if self.try_exit().is_some() {
            return Err(std::io::Error::other("mvm-vmm has exited"));
        }
        let pid = i32::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) on the child this process spawned and has not reaped (so the
        // pid is still its).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `limit` for the child to end on its own; `None` if it has not.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the child now and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
        self.exited
    }
}

/// The refusal the VMM explained in its log (`mvm-vmm: boot refused (REASON):
/// DETAIL`), if it did.
pub fn refusal_from_log(status: i32, log: &str) -> Option<RunError> {
    let line = log.lines().rev().find(|l| l.starts_with(REFUSAL_PREFIX))?;
    let rest = line.get(REFUSAL_PREFIX.len()..)?;
    let (reason, detail) = rest.split_once("): ")?;
    Some(RunError::BootRefused {
        reason: reason.to_owned(),
        status,
        detail: detail.to_owned(),
    })
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Puts the child `command` will start in its own process group (a terminal's Ctrl-C
/// reaches `mvm`, which stops the run in order, not the child directly) and has the
/// kernel kill it when `mvm` dies (`PR_SET_PDEATHSIG`), so a killed `mvm` leaves no VMM
/// or test host behind. Used for every VMM and QEMU the runtime starts.
pub(crate) fn own_group_dies_with_us(command: &mut Command) {
    command.process_group(0);
    // Linux's alone; the runtime starts VMMs and QEMU only there.
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_exits_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let args = vec!["-c".to_owned(), "echo kvm: boom; exit 3".to_owned()];
        let mut vmm = VmmProcess::spawn(Path::new("/bin/sh"), &args, &log).unwrap();
        let status = vmm.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(3));
        let err = vmm.died(status).to_string();
        assert!(err.contains("kvm: boom"), "{err}");
    }

    #[test]
    fn a_refusal_is_read_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let args = vec![
            "-c".to_owned(),
            "echo 'mvm-vmm: boot refused (kernel_mismatch): kernel digest mismatch: plan sha256:aa, measured sha256:bb'; exit 20".to_owned(),
        ];
        let mut vmm = VmmProcess::spawn(Path::new("/bin/sh"), &args, &log).unwrap();
        let status = vmm.stop(Duration::from_secs(5)).unwrap();
        match vmm.died(status) {
            RunError::BootRefused {
                reason,
                status,
                detail,
            } => {
                assert_eq!(reason, "kernel_mismatch");
                assert_eq!(status, 20);
                assert!(detail.starts_with("kernel digest mismatch"), "{detail}");
            }
            other => panic!("not a refusal: {other}"),
        }
        // A refusal status without the VMM's line is only a death.
        assert!(refusal_from_log(20, "segfault").is_none());
    }

    #[test]
    fn a_hanging_child_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let args = vec!["-c".to_owned(), "sleep 60".to_owned()];
        let mut vmm =
            VmmProcess::spawn(Path::new("/bin/sh"), &args, &dir.path().join("log")).unwrap();
        let pid = vmm.pid();
        let start = Instant::now();
        let status = vmm.stop(Duration::from_millis(50)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(status.code().is_none(), "killed by a signal");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        assert!(nix::sys::signal::kill(pid, None).is_err(), "reaped");
    }

    #[test]
    fn vmm_arguments_carry_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::image::ImageStore::at(dir.path());
        let inputs = crate::image::build::tests::fake_inputs(dir.path());
        let image = store
            .put("t", &crate::image::build(&inputs).unwrap())
            .unwrap();
        let spec = RunSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            cpus: 2,
            mem_mib: 256,
            timeout_secs: None,
            stdin: super::super::StdinMode::Null,
            disks: vec!["/tmp/d.img,ro".into()],
            ready_timeout_secs: 30,
            net: None,
            egress_trust: None,
        };
        let args = vmm_args(
            &image,
            &spec,
            Path::new("/run/x/v.sock"),
            Path::new("/run/x/boot.json"),
            None,
        );
        assert_eq!(args[0], "--dev");
        let plan = PlanFiles {
            envelope: "/run/x/plan.json".into(),
            trust: "/c/admission.pub".into(),
            replay_store: "/d/replay-nonces".into(),
            events: "/run/x/events.jsonl".into(),
        };
        let verified = vmm_args(
            &image,
            &spec,
            Path::new("/run/x/v.sock"),
            Path::new("/run/x/boot.json"),
            Some(&plan),
        );
        assert_eq!(
            verified.get(..8).unwrap().join(" "),
            "--plan /run/x/plan.json --trust /c/admission.pub \
             --replay-store /d/replay-nonces --events /run/x/events.jsonl"
        );
        assert!(!verified.contains(&"--dev".to_owned()));
        assert_eq!(verified.get(8..).unwrap(), args.get(1..).unwrap());
        let joined = args.join(" ");
        assert!(joined.contains("--vcpus 2 --mem-mib 256"), "{joined}");
        assert!(
            joined.contains("--vsock cid=3,uds=/run/x/v.sock"),
            "{joined}"
        );
        assert!(joined.ends_with("--disk /tmp/d.img,ro"), "{joined}");
        let cmdline_at = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(args[cmdline_at + 1], image.manifest.cmdline);
    }
}
