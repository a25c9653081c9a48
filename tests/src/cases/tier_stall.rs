//! `tier/stall-*`: QEMU's stall on the emulated tier
//! (`runtime/src/backend/emulated/stall.rs`), made on purpose. QEMU 7.2's TCG now
//! and then stops for good (`docs/e2e.md`); a QEMU stopped with SIGSTOP looks the
//! same from outside (no CPU time, nothing on the console) and can be made at a chosen
//! moment. The watch's limit is shortened to a few seconds (`MVM_TESTHOST_STALL_SECS`).
//! Both cases force the emulated tier (the only one with a test host) and boot cold.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code};
use crate::cases::tier::{mvm, qemus_naming};

/// The cases: two or three test host boots each.
pub const CASES: &[Case] = &[
    Case::user_host("tier/stall-before-workload", before_workload).limit_secs(420),
    Case::user_host("tier/stall-after-start", after_start).limit_secs(300),
];

/// The stall watch's limit in these cases, in seconds.
const STALL_SECS: &str = "6";
/// `mvm run`'s exit code when the VM died before the workload ended.
const VMM_DIED: i32 = 122;

/// QEMU stopped while the test host boots, before the workload: the run kills it, says
/// so, and runs the workload in a fresh test host; the user gets the workload's output
/// and exit code as if nothing happened, and the stopped QEMU is gone.
fn before_workload(ctx: &Context) -> CaseResult {
    let run_dir = ctx.work_file("run");
    let mut command = mvm(
        ctx,
        "run",
        &["--backend", "emulated", "--json", "--", "echo", "survived"],
    )?;
    let child = stalling(&mut command)
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let mut child = Reaped(Some(child));
    let stopped = stop_qemu_once_it_printed(&run_dir, &mut child)?;
    let out = child.finish()?;
    expect_code(&out, 0)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("runs in a fresh test host") {
        return Err(
            Failure::new("the run did not say it replaced the stalled test host")
                .with_detail(describe(&out)),
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json output is not JSON: {e}")).with_detail(describe(&out))
    })?;
    if value.get("stdout") != Some(&"survived\n".into())
        || value.get("tier") != Some(&"emulated".into())
    {
        return Err(Failure::new(format!("unexpected result: {value}")));
    }
    no_qemu_left(&run_dir, stopped)
}

/// QEMU stopped after the workload printed: the run cannot be replayed (the workload
/// ran), so it fails with the VM's exit code (122) and an error naming the stall, and
/// the stopped QEMU is gone.
fn after_start(ctx: &Context) -> CaseResult {
    let run_dir = ctx.work_file("run");
    let mut command = mvm(
        ctx,
        "run",
        &[
            "--backend",
            "emulated",
            "--",
            "sh",
            "-c",
            "echo started; sleep 600",
        ],
    )?;
    let child = stalling(&mut command)
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let mut child = Reaped(Some(child));
    let stdout = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| Failure::new("no stdout pipe"))?;
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| Failure::new(format!("reading mvm's stdout: {e}")))?;
    if first != "started\n" {
        let out = child.finish()?;
        return Err(
            Failure::new(format!("the workload's first line was {first:?}"))
                .with_detail(describe(&out)),
        );
    }
    let pids = qemus_naming(&run_dir.display().to_string());
    let [pid] = pids.as_slice() else {
        return Err(Failure::new(format!(
            "expected one QEMU of this run, found {pids:?}"
        )));
    };
    stop(*pid)?;
    let out = child.finish()?;
    expect_code(&out, VMM_DIED)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("no CPU time") || !stderr.contains("after the workload started") {
        return Err(
            Failure::new("the error does not name the stall after the workload started")
                .with_detail(describe(&out)),
        );
    }
    no_qemu_left(&run_dir, *pid)
}

/// The run's command with the short stall limit, cold boots, and its output piped.
fn stalling(command: &mut std::process::Command) -> &mut std::process::Command {
    command
        .env("MVM_TESTHOST_STALL_SECS", STALL_SECS)
        .env_remove("MVM_TESTHOST_SPARE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
}

/// A child killed and reaped if the case ends before it did.
struct Reaped(Option<Child>);

impl Reaped {
    /// Waits for the child's end and takes what it wrote.
    fn finish(&mut self) -> Result<std::process::Output, Failure> {
        let child = self
            .0
            .take()
            .ok_or_else(|| Failure::new("mvm already reaped"))?;
        child
            .wait_with_output()
            .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops the run's first QEMU with SIGSTOP once its firmware wrote to the console (its
/// serial ports are connected by then, and the test host is seconds from starting
/// `mvm`). Returns its pid.
fn stop_qemu_once_it_printed(run_dir: &Path, child: &mut Reaped) -> Result<u32, Failure> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for pid in qemus_naming(&run_dir.display().to_string()) {
            if console_of(pid).is_some_and(|c| std::fs::metadata(c).is_ok_and(|m| m.len() > 0)) {
                stop(pid)?;
                return Ok(pid);
            }
        }
        if let Some(status) = child.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(Failure::new(format!(
                "mvm ended ({status}) before its QEMU could be stopped"
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::new("no QEMU of this run printed within 120 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The serial console file of QEMU `pid` (`-serial file:PATH`).
fn console_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline
        .split(|b| *b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .find_map(|arg| arg.strip_prefix("file:"))
        .map(PathBuf::from)
}

fn stop(pid: u32) -> CaseResult {
    let pid = i32::try_from(pid).map_err(|_| Failure::new(format!("pid {pid}")))?;
    // SAFETY: kill has no memory preconditions; the pid is a QEMU of this case's run.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return Err(Failure::new(format!(
            "SIGSTOP to QEMU {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// No QEMU of the run is left, the stopped one included.
fn no_qemu_left(run_dir: &Path, stopped: u32) -> CaseResult {
    let left = qemus_naming(&run_dir.display().to_string());
    if !left.is_empty() || Path::new(&format!("/proc/{stopped}")).exists() {
        return Err(Failure::new(format!(
            "QEMU left after the run: {left:?} (the stopped one was {stopped})"
        )));
    }
    Ok(())
}
