//! `run/*`: the whole journey through `mvm run --backend kvm`:
//! output on the right streams, exit status, stdin, timeout, bulk output
//! that streams, and nothing left behind after many runs.
//!
//! Artifacts these cases need beside `mvm-vmm` (scripts/e2e provides them):
//! a static `mvm`, and an image store `mvm-data/` holding the `default`
//! image (`MVM_DATA_DIR=$art/mvm-data mvm image build --kernel vmlinux
//! --agent mvm-agent`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use sha2::{Digest, Sha256};

use crate::case::{tail, Case, CaseResult, Context, Failure, VMM};

/// The run cases.
pub const CASES: &[Case] = &[
    Case::kvm("run/exit-and-streams", exit_and_streams),
    Case::kvm("run/stdin", stdin),
    Case::kvm("run/json", json),
    Case::kvm("run/timeout", timeout),
    Case::kvm("run/bulk-stdout-streams", bulk_stdout_streams).limit_secs(450),
    Case::kvm("run/sequential-16", sequential_16).limit_secs(600),
    Case::kvm("run/sigint", sigint),
    Case::kvm("run/unprivileged-user", unprivileged_user),
];

/// The `mvm` binary among the artifacts.
pub const MVM: &str = "mvm";
/// The image store among the artifacts.
const DATA_DIR: &str = "mvm-data";
/// `mvm run`'s exit code for `--timeout` (runtime/src/run/exit.rs).
const EXIT_TIMEOUT: i32 = 124;
/// Bytes of the bulk-output case.
const BULK_BYTES: u64 = 64 << 20;

/// `mvm run --backend kvm` with the artifacts' VMM and image store, and its
/// run directories and host keys (created on first use) under this case's work
/// directory. The audit log and the replay store go to the image store's data
/// directory.
fn mvm(ctx: &Context, args: &[&str]) -> Result<Command, Failure> {
    let data = image_store(ctx)?;
    let mut command = mvm_with(ctx, &data, &ctx.work_file("config"))?;
    command
        .arg("run")
        .args(["--backend", "kvm"])
        .args(args)
        .stdin(Stdio::null());
    Ok(command)
}

/// `mvm` (any subcommand) with `data` as its data directory (images, audit log,
/// replay store), `config` as its config directory (keys, policy), the
/// artifacts' VMM, and run directories under the case's work directory.
pub fn mvm_with(ctx: &Context, data: &Path, config: &Path) -> Result<Command, Failure> {
    let run_dir = ctx.work_file("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Failure::new(format!("{e}")))?;
    let mut command = Command::new(ctx.artifact(MVM)?);
    command
        .env("MVM_DATA_DIR", data)
        .env("MVM_CONFIG_DIR", config)
        .env("MVM_VMM", ctx.artifact(VMM)?)
        .env("MVM_RUN_DIR", &run_dir);
    Ok(command)
}

/// The artifacts' image store, or a failure saying scripts/e2e builds it.
pub fn image_store(ctx: &Context) -> Result<PathBuf, Failure> {
    let data = ctx.artifacts.join(DATA_DIR);
    if data.is_dir() {
        Ok(data)
    } else {
        Err(Failure::new(format!(
            "artifact {} missing (scripts/e2e builds it)",
            data.display()
        )))
    }
}

pub fn output(mut command: Command) -> Result<Output, Failure> {
    command
        .output()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))
}

pub fn describe(out: &Output) -> String {
    format!(
        "{}{}",
        tail("stdout", &String::from_utf8_lossy(&out.stdout), 10),
        tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)
    )
}

pub fn expect_code(out: &Output, want: i32) -> CaseResult {
    match out.status.code() {
        Some(code) if code == want => Ok(()),
        other => Err(
            Failure::new(format!("mvm run exited {other:?}, expected {want}"))
                .with_detail(describe(out)),
        ),
    }
}

/// Run directories left in `dir` (each run's sockets and logs).
/// The ordinary user `run/unprivileged-user` runs `mvm` as, and its group (which may open
/// `/dev/kvm`, as the `kvm` group may on a distribution's host).
const USER: (u32, u32) = (4545, 4646);

/// An ordinary user runs `mvm run` on the kvm tier: its own keys, policy, audit log and
/// (empty) image store, the `default` image found in the machine's shared store
/// (`MVM_SYSTEM_DIR`, here the artifacts' store, as `scripts/setup` publishes it), and
/// `mvm-vmm` started as that user, jailed in a user namespace (the boot report says so);
/// the workload's `/proc/self/status` comes back and the run is in the user's audit log.
fn unprivileged_user(ctx: &Context) -> CaseResult {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = USER;
    let io = |what: String| move |e: std::io::Error| Failure::new(format!("{what}: {e}"));
    let home = ctx.work_file("user");
    let kvm_dir = ctx.work_file("user-kvm");
    for dir in [&home, &kvm_dir] {
        std::fs::create_dir(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    }
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).map_err(io("chown".into()))?;
    std::fs::set_permissions(&ctx.work, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod".into()))?;
    let mut command = Command::new(ctx.artifact(MVM)?);
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &home)
        .env("MVM_SYSTEM_DIR", image_store(ctx)?)
        .env("MVM_VMM", ctx.artifact(VMM)?)
        .args([
            "run",
            "--backend",
            "kvm",
            "--json",
            "--",
            "cat",
            "/proc/self/status",
        ])
        .stdin(Stdio::null());
    crate::as_user::apply(&mut command, uid, gid, &kvm_dir)?;
    let out = output(command)?;
    expect_code(&out, 0)?;
    let value: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json printed no JSON object: {e}")).with_detail(describe(&out))
    })?;
    let jail = value
        .pointer("/boot_report/jail")
        .cloned()
        .unwrap_or_default();
    let stdout = value
        .pointer("/stdout")
        .and_then(Value::as_str)
        .unwrap_or("");
    let audit = home.join(".local/share/mvm/audit.jsonl");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    let checks = [
        (
            jail.pointer("/kind") == Some(&"user-namespace".into()),
            "the boot report's jail is user-namespace",
        ),
        (
            jail.pointer("/uid") == Some(&uid.into()),
            "mvm-vmm ran as the user",
        ),
        (
            stdout.contains("Name:\tcat"),
            "the workload's status came back",
        ),
        (
            audited.contains("\"exec_started\""),
            "the run is in the user's audit log",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(Failure::new(format!("{what}: not so")).with_detail(format!(
                "jail: {jail}\n{}\naudit ({}): {} bytes",
                describe(&out),
                audit.display(),
                audited.len()
            )));
        }
    }
    Ok(())
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `out` on stdout, `err` on stderr, exit 7.
fn exit_and_streams(ctx: &Context) -> CaseResult {
    let out = output(mvm(ctx, &["--", "sh", "-c", STREAMS_SCRIPT])?)?;
    expect_streams(&out)
}

/// A workload that writes one line to each stream and exits 7.
pub const STREAMS_SCRIPT: &str = "echo out; echo err >&2; exit 7";

/// What [`STREAMS_SCRIPT`] must give: exit 7, exactly `out` on stdout, `err`
/// on stderr and no stdout there.
pub fn expect_streams(out: &Output) -> CaseResult {
    expect_code(out, 7)?;
    if out.stdout != b"out\n" {
        return Err(Failure::new(format!(
            "stdout {:?}, expected \"out\\n\"",
            String::from_utf8_lossy(&out.stdout)
        ))
        .with_detail(describe(out)));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.lines().any(|l| l == "err") || stderr.contains("out\n") {
        return Err(
            Failure::new("stderr lacks \"err\" or carries stdout").with_detail(describe(out))
        );
    }
    Ok(())
}

/// Piped stdin reaches the command.
fn stdin(ctx: &Context) -> CaseResult {
    let mut command = mvm(ctx, &["--", "sh", "-c", "cat; echo end"])?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let payload: Vec<u8> = (0..100_000u32)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(&payload)
            .map_err(|e| Failure::new(format!("writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 0)?;
    let mut want = payload;
    want.extend_from_slice(b"end\n");
    if out.stdout != want {
        return Err(Failure::new(format!(
            "stdout is {} bytes, expected the {} stdin bytes then \"end\"",
            out.stdout.len(),
            want.len()
        ))
        .with_detail(tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)));
    }
    Ok(())
}

/// `--json`: one object with the output, the status and timings.
fn json(ctx: &Context) -> CaseResult {
    let out = output(mvm(ctx, &["--json", "--", "sh", "-c", "echo hi; exit 3"])?)?;
    expect_code(&out, 3)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json printed no JSON object: {e}")).with_detail(describe(&out))
    })?;
    let checks = [
        (
            value.pointer("/stdout") == Some(&"hi\n".into()),
            "stdout \"hi\\n\"",
        ),
        (
            value.pointer("/exit_status") == Some(&3.into()),
            "exit_status 3",
        ),
        (value.pointer("/tier") == Some(&"kvm".into()), "tier kvm"),
        (
            value
                .pointer("/timings/boot_ms")
                .is_some_and(|v| v.is_u64()),
            "timings.boot_ms",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(Failure::new(format!("--json object lacks {what}: {value}")));
        }
    }
    Ok(())
}

/// `--timeout 2 -- sleep 60` ends in about 2 s of workload time with 124.
fn timeout(ctx: &Context) -> CaseResult {
    let start = Instant::now();
    let out = output(mvm(
        ctx,
        &["--json", "--timeout", "2", "--", "sleep", "60"],
    )?)?;
    let wall = start.elapsed();
    expect_code(&out, EXIT_TIMEOUT)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(format!("--json: {e}")).with_detail(describe(&out)))?;
    let exec_ms = value
        .pointer("/timings/exec_ms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(u64::MAX);
    if !(1900..=5000).contains(&exec_ms) {
        return Err(Failure::new(format!(
            "the workload ran {exec_ms} ms under --timeout 2 (wall {wall:?})"
        )));
    }
    if value.pointer("/timed_out") != Some(&true.into()) {
        return Err(Failure::new(format!("timed_out is not true: {value}")));
    }
    Ok(())
}

/// 64 MiB on stdout arrives intact, and the first bytes come before the end.
fn bulk_stdout_streams(ctx: &Context) -> CaseResult {
    let script = format!("head -c {BULK_BYTES} /dev/zero | tr '\\0' 'x'; sleep 2; echo tail");
    let mut command = mvm(ctx, &["--", "sh", "-c", &script])?;
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child: Child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Failure::new("no stdout pipe"))?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut first_at = None;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdout
            .read(&mut buf)
            .map_err(|e| Failure::new(format!("reading stdout: {e}")))?;
        if n == 0 {
            break;
        }
        first_at.get_or_insert_with(Instant::now);
        hash.update(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(u64::try_from(n).unwrap_or(0));
    }
    let eof_at = Instant::now();
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 0)?;
    let mut want = Sha256::new();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..(BULK_BYTES >> 20) {
        want.update(&chunk);
    }
    want.update(b"tail\n");
    let (got, want) = (hex::encode(hash.finalize()), hex::encode(want.finalize()));
    if got != want {
        return Err(Failure::new(format!(
            "stdout ({total} bytes) sha256 {got}, expected {want}"
        )));
    }
    // The command sleeps 2 s after the bulk: streamed output was seen first.
    let lead = first_at
        .map(|t| eof_at.duration_since(t))
        .unwrap_or_default();
    if lead < Duration::from_secs(2) {
        return Err(Failure::new(format!(
            "the first stdout bytes came only {lead:?} before the end: output is not streamed"
        )));
    }
    Ok(())
}

/// Runs one after another all succeed and leave no run directory and no VMM
/// behind. 16, not 64: a leak shows after the first run (the checks below
/// would see it), and no pool on a run's path (vsock CID, run directory
/// names, nonces) wraps within 64 runs either, so 48 more boots (6-8 minutes
/// under TCG on a loaded machine) proved nothing the first 16 do not.
const SEQUENTIAL_RUNS: usize = 16;

fn sequential_16(ctx: &Context) -> CaseResult {
    for i in 0..SEQUENTIAL_RUNS {
        let out = output(mvm(ctx, &["--", "true"])?)?;
        expect_code(&out, 0)
            .map_err(|f| Failure::new(format!("run {i}: {}", f.reason)).with_detail(f.detail))?;
    }
    let left = leftovers(&ctx.work_file("run"));
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "run directories left behind: {left:?}"
        )));
    }
    // From /proc, not pgrep: a missing tool must not pass the check.
    let vmms: Vec<u32> = processes()?
        .into_iter()
        .filter(|p| p.comm == VMM && p.state != 'Z')
        .map(|p| p.pid)
        .collect();
    if !vmms.is_empty() {
        return Err(Failure::new(format!("mvm-vmm processes left: {vmms:?}")));
    }
    Ok(())
}

/// How long a workload may take to print its first line: one boot inside the
/// test host (TCG) takes 10-60 s on a loaded machine.
pub const FIRST_OUTPUT: Duration = Duration::from_secs(200);

/// A started `mvm` whose stdout and stderr are read on threads as they come,
/// so a case can wait for a line and then act on the running process.
pub struct Watched {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn read_into(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
                return;
            };
            if let Ok(mut all) = into.lock() {
                all.extend_from_slice(data);
            }
        }
    })
}

impl Watched {
    /// Starts `command` with its stdout and stderr piped to this process.
    pub fn spawn(mut command: Command) -> Result<Self, Failure> {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(read_into(out, stdout.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(read_into(err, stderr.clone()));
        }
        Ok(Self {
            child,
            stdout,
            stderr,
            readers,
        })
    }

    /// `mvm`'s pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
        buf.lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until stdout holds the line `line`; fails (and kills `mvm`)
    /// if `mvm` exits first or `timeout` passes.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> CaseResult {
        let start = Instant::now();
        loop {
            if Self::text(&self.stdout).lines().any(|l| l == line) {
                return Ok(());
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(Failure::new(format!(
                    "no line {line:?} on stdout after {:?} (mvm {})",
                    start.elapsed(),
                    exited.map_or_else(|| "still running, killed".to_owned(), |s| s.to_string())
                ))
                .with_detail(format!(
                    "{}{}",
                    tail("stdout", &Self::text(&self.stdout), 10),
                    tail("stderr", &Self::text(&self.stderr), 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to `mvm`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> CaseResult {
        nix::sys::signal::kill(pid_of(self.pid()), signal)
            .map_err(|e| Failure::new(format!("kill -{signal} mvm: {e}")))
    }

    /// Waits for `mvm` to exit (killing it after `timeout`) and returns its
    /// status and everything it printed.
    pub fn wait(mut self, timeout: Duration) -> Result<Output, Failure> {
        let start = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() > timeout => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(Failure::new(format!(
                        "mvm did not exit within {timeout:?}; killed"
                    ))
                    .with_detail(tail(
                        "stderr",
                        &Self::text(&self.stderr),
                        20,
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(Failure::new(format!("waiting for mvm: {e}"))),
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let take = |buf: &Arc<Mutex<Vec<u8>>>| buf.lock().map(|b| b.clone()).unwrap_or_default();
        Ok(Output {
            status,
            stdout: take(&self.stdout),
            stderr: take(&self.stderr),
        })
    }
}

fn pid_of(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// Its state letter (`Z` for a zombie).
    pub state: char,
    /// Its command name (at most 15 bytes).
    pub comm: String,
}

/// Reads `/proc/PID/stat`: `PID (COMM) STATE PPID ..`, COMM may hold spaces
/// and parentheses, so it ends at the last `)`.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open.checked_add(1)?..close)?.to_owned();
    let mut rest = text.get(close.checked_add(1)?..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        ppid,
        state,
        comm,
    })
}

/// Every process (from `/proc`; a missing `/proc` is a failure, not an empty list).
pub fn processes() -> Result<Vec<ProcStat>, Failure> {
    let entries =
        std::fs::read_dir("/proc").map_err(|e| Failure::new(format!("listing /proc: {e}")))?;
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect())
}

/// The processes below `pid` (children, their children, ..).
pub fn descendants(pid: u32) -> Result<Vec<ProcStat>, Failure> {
    let all = processes()?;
    let mut found: Vec<ProcStat> = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            parents.push(p.pid);
            found.push(p.clone());
        }
    }
    Ok(found)
}

/// Whether `pid` still runs (exists and is not a zombie).
pub fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|p| p.state != 'Z')
}

/// The audit log's records (JSON lines), parsed.
pub fn audit_records(log: &Path) -> Result<Vec<Value>, Failure> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| Failure::new(format!("reading {}: {e}", log.display())))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Failure::new(format!("audit log line {}: {e}", i + 1)))
        })
        .collect()
}

/// The records of the last run admitted in `records`: its `plan_admitted` and
/// every later record with its plan id.
pub fn last_run(records: &[Value]) -> Result<Vec<Value>, Failure> {
    let plan = records
        .iter()
        .rev()
        .find(|r| r.pointer("/event") == Some(&"plan_admitted".into()))
        .and_then(|r| r.pointer("/plan_id"))
        .cloned()
        .ok_or_else(|| Failure::new("no plan_admitted in the audit log"))?;
    Ok(records
        .iter()
        .filter(|r| r.pointer("/plan_id") == Some(&plan))
        .cloned()
        .collect())
}

/// The event names of `records`.
pub fn events(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r.pointer("/event")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// Ctrl-C: a workload that traps SIGINT gets it, cleans up and exits 3; `mvm`
/// exits 3 (the workload's status, not 130), and the log has `exec_exited`
/// with status 3 and the VM's `vm_exited`.
fn sigint(ctx: &Context) -> CaseResult {
    let script = "trap 'echo caught INT; exit 3' INT; echo started; sleep 120 & wait";
    let mut run = Watched::spawn(mvm(ctx, &["--", "sh", "-c", script])?)?;
    run.wait_for_line("started", FIRST_OUTPUT)?;
    let sent = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGINT)?;
    let out = run.wait(Duration::from_secs(60))?;
    let took = sent.elapsed();
    expect_code(&out, 3)?;
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == "caught INT")
    {
        return Err(Failure::new("the workload's trap did not run").with_detail(describe(&out)));
    }
    // Within the grace period: the workload ended it, not the escalation.
    if took > Duration::from_secs(30) {
        return Err(Failure::new(format!(
            "mvm took {took:?} to exit after SIGINT"
        )));
    }
    let log = image_store(ctx)?.join("audit.jsonl");
    let records = last_run(&audit_records(&log)?)?;
    let kinds = events(&records);
    let exited = records
        .iter()
        .find(|r| r.pointer("/event") == Some(&"exec_exited".into()));
    if exited.and_then(|r| r.pointer("/fields/exit_status")) != Some(&3.into()) {
        return Err(Failure::new(format!(
            "no exec_exited with exit_status 3 in the run's records {kinds:?}: {exited:?}"
        )));
    }
    if kinds.last().map(String::as_str) != Some("vm_exited") {
        return Err(Failure::new(format!(
            "the run's records {kinds:?} do not end with vm_exited"
        )));
    }
    Ok(())
}
