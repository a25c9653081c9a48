//! Launching `mvm-vmm` as a child process and collecting what it did.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::boot_report::BootReport;
use crate::case::{read_bounded, tail, Failure, BOOT_TIMEOUT};

/// The most console or stderr text a case reads back (bytes).
const OUTPUT_LIMIT: u64 = 4 << 20;
/// How often the runner polls a running VMM for exit.
const POLL: Duration = Duration::from_millis(10);

/// One `mvm-vmm` invocation: the base flags (`--kernel --initrd
/// --cmdline --vcpus --mem-mib --console-log --boot-report`) plus any extra
/// arguments a case adds.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    vcpus: u32,
    mem_mib: u32,
    boot_report: Option<PathBuf>,
    extra: Vec<OsString>,
    timeout: Duration,
    out_dir: PathBuf,
    label: String,
    /// Start as this uid and gid, with a `/dev/kvm` node at this directory ([`crate::as_user`]).
    user: Option<(u32, u32, PathBuf)>,
    /// `--restore DIR` in place of the kernel, initramfs, command line and resources.
    restore: Option<PathBuf>,
    /// Send this signal once this happens.
    signal_on: Option<(Trigger, i32)>,
    /// Note when the console first holds this text.
    time_to: Option<String>,
}

/// What makes [`VmLaunch::run`] send its signal.
#[derive(Debug, Clone)]
enum Trigger {
    /// A console line ends with this text.
    Console(String),
    /// This file exists (a case's other thread made it).
    File(PathBuf),
}

/// What a finished (or killed) VMM left behind.
#[derive(Debug)]
pub struct VmRun {
    /// The process's exit status.
    pub status: ExitStatus,
    /// Whether the runner killed it at the timeout.
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// The guest console (the VMM's stdout), bounded.
    pub console: String,
    /// The VMM's stderr, bounded.
    pub stderr: String,
    /// The boot report, when one was asked for and parsed.
    pub boot_report: Option<Result<BootReport, String>>,
    /// When the console first held [`VmLaunch::time_to_console`]'s text.
    pub console_at: Option<Duration>,
}

impl VmLaunch {
    /// A launch of `vmm` booting `kernel` with 1 vCPU and 128 MiB, writing
    /// its outputs under `out_dir`.
    pub fn new(vmm: PathBuf, kernel: PathBuf, out_dir: &Path) -> Self {
        Self {
            vmm,
            kernel,
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 128,
            boot_report: None,
            extra: Vec::new(),
            timeout: BOOT_TIMEOUT,
            out_dir: out_dir.to_path_buf(),
            label: "vm".into(),
            user: None,
            restore: None,
            signal_on: None,
            time_to: None,
        }
    }

    /// Notes how long after the spawn a console line first ends with `needle`
    /// ([`VmRun::console_at`]), to within the poll interval.
    #[must_use]
    pub fn time_to_console(mut self, needle: &str) -> Self {
        self.time_to = Some(needle.to_owned());
        self
    }

    /// Starts from the snapshot in `dir` (`--restore DIR`) instead of booting: the kernel,
    /// initramfs, command line, vCPUs and memory are the snapshot's.
    #[must_use]
    pub fn restore_from(mut self, dir: &Path) -> Self {
        self.restore = Some(dir.to_path_buf());
        self
    }

    /// Sends `signal` to the VMM (once) when a line of its console first ends with
    /// `needle` (a whole line's end: `count: 5` is not `count: 50`).
    #[must_use]
    pub fn signal_on_console(mut self, needle: &str, signal: i32) -> Self {
        self.signal_on = Some((Trigger::Console(needle.to_owned()), signal));
        self
    }

    /// Sends `signal` to the VMM (once) when `path` exists: a case's other thread,
    /// talking to the guest, decides when.
    #[must_use]
    pub fn signal_on_file(mut self, path: &Path, signal: i32) -> Self {
        self.signal_on = Some((Trigger::File(path.to_path_buf()), signal));
        self
    }

    /// Sets `--initrd`.
    #[must_use]
    pub fn initrd(mut self, path: PathBuf) -> Self {
        self.initrd = Some(path);
        self
    }

    /// Sets `--cmdline`.
    #[must_use]
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = Some(cmdline.to_owned());
        self
    }

    /// Sets `--vcpus`.
    #[must_use]
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// Sets `--mem-mib`.
    #[must_use]
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Asks for `--boot-report` into the output directory.
    #[must_use]
    pub fn with_boot_report(mut self) -> Self {
        self.boot_report = Some(
            self.out_dir
                .join(format!("{}.boot-report.json", self.label)),
        );
        self
    }

    /// Adds arguments after the standard ones.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Sets how long the VMM may run before it is killed.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the VMM as `uid`/`gid` instead of the runner's user, with a `/dev/kvm` that
    /// group may open, on a tmpfs at `kvm_dir` in the VMM's own mount namespace.
    #[must_use]
    pub fn as_user(mut self, uid: u32, gid: u32, kvm_dir: &Path) -> Self {
        self.user = Some((uid, gid, kvm_dir.to_path_buf()));
        self
    }

    /// Names this VM's output files (for cases that boot several).
    #[must_use]
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.to_owned();
        if self.boot_report.is_some() {
            self = self.with_boot_report();
        }
        self
    }

    /// The full argument list, for logs and failure messages.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(dir) = &self.restore {
            args.push("--restore".into());
            args.push(dir.clone().into());
        } else {
            args.push("--kernel".into());
            args.push(self.kernel.clone().into());
            if let Some(initrd) = &self.initrd {
                args.push("--initrd".into());
                args.push(initrd.clone().into());
            }
            if let Some(cmdline) = &self.cmdline {
                args.push("--cmdline".into());
                args.push(cmdline.into());
            }
            args.push("--vcpus".into());
            args.push(self.vcpus.to_string().into());
            args.push("--mem-mib".into());
            args.push(self.mem_mib.to_string().into());
        }
        if let Some(report) = &self.boot_report {
            args.push("--boot-report".into());
            args.push(report.clone().into());
        }
        args.extend(self.extra.iter().cloned());
        // Without a signed plan, mvm-vmm boots only in its (unverified) --dev mode.
        if !self.extra.iter().any(|a| a == "--plan") {
            args.push("--dev".into());
        }
        args
    }

    /// Where [`VmLaunch::run`] writes the guest console (readable while it runs).
    pub fn console_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}.console", self.label))
    }

    /// Every tenth poll, while a signal is waiting for its trigger: sends it once the
    /// trigger happened.
    fn maybe_signal(
        &self,
        signal_on: &mut Option<(Trigger, i32)>,
        console: &Path,
        pid: u32,
        polls: &mut u32,
    ) {
        *polls = polls.wrapping_add(1);
        if *polls % 10 != 0 {
            return;
        }
        let Some((trigger, signal)) = signal_on.as_ref() else {
            return;
        };
        let seen = match trigger {
            Trigger::Console(needle) => {
                read_bounded(console, OUTPUT_LIMIT).is_ok_and(|text| text.contains(needle.as_str()))
            }
            Trigger::File(path) => path.exists(),
        };
        if seen {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: signalling the child this launch spawned and has not reaped.
                unsafe { libc::kill(pid, *signal) };
            }
            *signal_on = None;
        }
    }

    /// Runs the VMM to exit or timeout. Fails only when the VMM could not
    /// be started or its outputs not read; the exit status is the case's to
    /// judge.
    pub fn run(&self) -> Result<VmRun, Failure> {
        let console_path = self.console_path();
        let stderr_path = self.out_dir.join(format!("{}.stderr", self.label));
        let io_err = |what: &str, path: &Path, e: std::io::Error| {
            Failure::new(format!("{what} {}: {e}", path.display()))
        };
        let console =
            File::create(&console_path).map_err(|e| io_err("create", &console_path, e))?;
        let stderr = File::create(&stderr_path).map_err(|e| io_err("create", &stderr_path, e))?;
        if let Some(report) = &self.boot_report {
            // A stale report from an earlier run must not pass for this one.
            let _ = std::fs::remove_file(report);
        }

        let mut cmd = Command::new(&self.vmm);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr);
        if let Some((uid, gid, kvm_dir)) = &self.user {
            crate::as_user::apply(&mut cmd, *uid, *gid, kvm_dir)?;
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|e| io_err("spawn", &self.vmm, e))?;
        let mut signal_on = self.signal_on.clone();
        let mut polls = 0u32;
        let mut console_at = None;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() >= self.timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    match child.wait() {
                        Ok(status) => break status,
                        Err(e) => return Err(Failure::new(format!("wait for mvm-vmm: {e}"))),
                    }
                }
                Ok(None) => {
                    std::thread::sleep(POLL);
                    self.maybe_signal(&mut signal_on, &console_path, child.id(), &mut polls);
                    if let (Some(needle), None) = (&self.time_to, console_at) {
                        if read_bounded(&console_path, OUTPUT_LIMIT)
                            .is_ok_and(|t| line_ends_with(&t, needle))
                        {
                            console_at = Some(start.elapsed());
                        }
                    }
                }
                Err(e) => return Err(Failure::new(format!("wait for mvm-vmm: {e}"))),
            }
        };
        let elapsed = start.elapsed();

        let console = read_bounded(&console_path, OUTPUT_LIMIT)
            .map_err(|e| io_err("read", &console_path, e))?;
        let stderr = read_bounded(&stderr_path, OUTPUT_LIMIT)
            .map_err(|e| io_err("read", &stderr_path, e))?;
        let boot_report = self.boot_report.as_ref().map(|path| {
            read_bounded(path, OUTPUT_LIMIT)
                .map_err(|e| format!("read boot report {}: {e}", path.display()))
                .and_then(|text| BootReport::parse(&text))
        });
        Ok(VmRun {
            status,
            timed_out,
            elapsed,
            console,
            stderr,
            boot_report,
            console_at,
        })
    }
}

/// Whether a whole line of `text` (ended by `\n`, its `\r` dropped: a guest's serial
/// console ends lines with `\r\n`) ends with `needle`. A line still being written does
/// not count.
fn line_ends_with(text: &str, needle: &str) -> bool {
    let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    complete
        .split('\n')
        .any(|l| l.trim_end_matches('\r').ends_with(needle))
}

impl VmRun {
    /// Console and stderr tails, for a failure's detail.
    pub fn evidence(&self) -> String {
        let mut out = tail("console", &self.console, 15);
        out.push_str(&tail("stderr", &self.stderr, 15));
        if out.is_empty() {
            out.push_str("    (console and stderr empty)\n");
        }
        out
    }

    /// A failure with `reason` and this run's evidence.
    pub fn fail(&self, reason: impl Into<String>) -> Failure {
        Failure::new(reason).with_detail(self.evidence())
    }

    /// Fails unless the VMM exited by itself with `code`.
    pub fn expect_exit(&self, code: i32) -> Result<(), Failure> {
        if self.timed_out {
            return Err(self.fail(format!(
                "mvm-vmm still running after {:.1}s (killed)",
                self.elapsed.as_secs_f64()
            )));
        }
        match self.status.code() {
            Some(c) if c == code => Ok(()),
            Some(c) => Err(self.fail(format!("mvm-vmm exited {c}, expected {code}"))),
            None => Err(self.fail(format!(
                "mvm-vmm killed by a signal ({}), expected exit {code}",
                self.status
            ))),
        }
    }

    /// Fails unless the console holds a line containing `needle`.
    pub fn expect_console(&self, needle: &str) -> Result<(), Failure> {
        if self.console.lines().any(|l| l.contains(needle)) {
            Ok(())
        } else {
            Err(self.fail(format!("console has no line with {needle:?}")))
        }
    }

    /// Fails unless stderr holds a line containing any of `needles`
    /// (compared case-insensitively).
    pub fn expect_stderr_any(&self, needles: &[&str]) -> Result<(), Failure> {
        let lower = self.stderr.to_lowercase();
        if needles.iter().any(|n| lower.contains(&n.to_lowercase())) {
            Ok(())
        } else {
            Err(self.fail(format!("stderr mentions none of {needles:?}")))
        }
    }

    /// The parsed boot report, or a failure saying why there is none.
    pub fn report(&self) -> Result<&BootReport, Failure> {
        match &self.boot_report {
            Some(Ok(report)) => Ok(report),
            Some(Err(e)) => Err(self.fail(e.clone())),
            None => Err(Failure::new("no boot report was asked for")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::line_ends_with;

    #[test]
    fn a_line_ends_with_the_needle_only_once_it_is_whole() {
        let text = "a: count: 5\r\nb: count: 50\r\nc: count: 6";
        assert!(line_ends_with(text, "count: 5"));
        assert!(line_ends_with(text, "count: 50"));
        assert!(!line_ends_with(text, "count: 6"));
        assert!(!line_ends_with("count: 50\n", "count: 5"));
        assert!(line_ends_with("count: 6\n", "count: 6"));
        assert!(!line_ends_with("", "x"));
    }
}
