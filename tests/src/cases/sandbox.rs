//! `sandbox/*`: long-lived sandboxes through `mvm sandbox`, on the tier this
//! machine gives (no `--backend`), as a user drives them: create, cp a script
//! in, exec it, cp its output back, two execs at once, stdin, a `cp` killed
//! half-way, hostile paths and names, stop, a supervisor killed (stale, then
//! `rm`), a TTL that ends a sandbox by itself, and a TCP echo server in the
//! guest answering on a forwarded host port. Every sandbox a case made
//! is removed (`rm --force`) whatever the case's outcome.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code, image_store, mvm_with, output};

/// The cases. Each boots one sandbox on the user's tier.
pub const CASES: &[Case] = &[
    Case::user_host("sandbox/lifecycle", lifecycle).limit_secs(480),
    Case::user_host("sandbox/killed-supervisor", killed_supervisor).limit_secs(300),
    Case::user_host("sandbox/ttl", ttl).limit_secs(300),
    Case::user_host("sandbox/port-forward", port_forward).limit_secs(300),
    Case::user_host("sandbox/sdk-example", sdk_example).limit_secs(300),
    Case::user_host("sandbox/terminal", terminal).limit_secs(600),
    Case::user_host("sandbox/cp-directory", cp_directory).limit_secs(300),
];

/// `mvm sandbox ARGS` with the artifacts' binaries, image store, keys and
/// policy, and the case's own runtime directory.
pub(super) fn sandbox(ctx: &Context, args: &[&str]) -> Result<Command, Failure> {
    let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    command.arg("sandbox").args(args).stdin(Stdio::null());
    Ok(command)
}

pub(super) fn run(ctx: &Context, args: &[&str]) -> Result<Output, Failure> {
    output(sandbox(ctx, args)?)
}

/// Runs `mvm sandbox ARGS` and wants exit 0.
pub(super) fn ok(ctx: &Context, args: &[&str]) -> Result<Output, Failure> {
    let out = run(ctx, args)?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "mvm sandbox {} exited {:?}",
            args.join(" "),
            out.status.code()
        ))
        .with_detail(describe(&out)));
    }
    Ok(out)
}

/// Runs `mvm sandbox ARGS`, wants a failure whose message contains `want`.
pub(super) fn refused(ctx: &Context, args: &[&str], want: &str) -> CaseResult {
    let out = run(ctx, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains(want) {
        return Err(Failure::new(format!(
            "mvm sandbox {}: wanted a failure saying {want:?}",
            args.join(" ")
        ))
        .with_detail(describe(&out)));
    }
    Ok(())
}

/// Removes every sandbox of the case when dropped, running or not.
struct Cleanup<'a>(&'a Context);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for info in list(self.0).unwrap_or_default() {
            if let Some(id) = info.get("id").and_then(Value::as_str) {
                let _ = run(self.0, &["rm", "--force", id]);
            }
        }
    }
}

pub(super) fn list(ctx: &Context) -> Result<Vec<Value>, Failure> {
    let out = ok(ctx, &["ls", "--json"])?;
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(all)) => Ok(all),
        _ => {
            Err(Failure::new("mvm sandbox ls --json is not a JSON array")
                .with_detail(describe(&out)))
        }
    }
}

pub(super) fn field(info: &Value, key: &str) -> String {
    info.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The sandbox `id` as `ls --json` shows it.
fn listed(ctx: &Context, id: &str) -> Result<Value, Failure> {
    list(ctx)?
        .into_iter()
        .find(|i| field(i, "id") == id)
        .ok_or_else(|| Failure::new(format!("{id} is not in mvm sandbox ls")))
}

fn create(ctx: &Context, args: &[&str]) -> Result<String, Failure> {
    let mut all = vec!["create"];
    all.extend_from_slice(args);
    let out = ok(ctx, &all)?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !id.starts_with("sb-") {
        return Err(
            Failure::new(format!("create printed {id:?}, not an id")).with_detail(describe(&out))
        );
    }
    Ok(id)
}

fn write(path: &std::path::Path, data: &[u8]) -> CaseResult {
    std::fs::write(path, data).map_err(|e| Failure::new(format!("{}: {e}", path.display())))
}

fn expect_stdout(out: &Output, want: &[u8], what: &str) -> CaseResult {
    if out.stdout != want {
        return Err(Failure::new(format!(
            "{what}: stdout {:?}, wanted {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(want)
        ))
        .with_detail(describe(out)));
    }
    Ok(())
}

/// The audit log's records of the kinds given, as JSON.
pub(super) fn audit_records(ctx: &Context, kind: &str) -> Result<Vec<Value>, Failure> {
    let log = image_store(ctx)?.join("audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r.get("event").and_then(Value::as_str) == Some(kind))
        .collect())
}

/// The session: a script in, run, its output out; then the rough edges.
fn lifecycle(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let before_written = audit_records(ctx, "file_written")?.len();
    let id = create(ctx, &["--name", "life", "--ttl", "10m"])?;
    // A second sandbox of that name is refused before anything boots.
    refused(ctx, &["create", "--name", "life"], "already exists")?;

    let script = ctx.work_file("script.sh");
    write(
        &script,
        b"#!/bin/sh\nset -e\nn=$(cat /work/input.txt | wc -l)\nprintf '{\"lines\": %d, \"user\": \"%s\"}\\n' \"$n\" \"$(id -u)\" > /work/out.json\n",
    )?;
    let input = ctx.work_file("input.txt");
    write(&input, b"a\nb\nc\n")?;
    ok(ctx, &["cp", path(&script)?, &format!("{id}:/work/")])?;
    ok(ctx, &["cp", path(&input)?, "life:/work/input.txt"])?;
    let run = ok(ctx, &["exec", &id, "--", "sh", "/work/script.sh"])?;
    expect_stdout(&run, b"", "the script")?;
    let back = ctx.work_file("back");
    std::fs::create_dir_all(&back).map_err(|e| Failure::new(format!("{e}")))?;
    ok(ctx, &["cp", &format!("{id}:/work/out.json"), path(&back)?])?;
    let got = std::fs::read(back.join("out.json")).unwrap_or_default();
    if got != b"{\"lines\": 3, \"user\": \"1000\"}\n" {
        return Err(Failure::new(format!(
            "out.json copied back: {:?}",
            String::from_utf8_lossy(&got)
        )));
    }

    // State persists between calls; exit status, stderr and stdin carry.
    let out = run_with_stdin(
        sandbox(
            ctx,
            &[
                "exec",
                "life",
                "--",
                "sh",
                "-c",
                "cat > /work/in.txt; cat /work/in.txt /work/out.json >&2; exit 6",
            ],
        )?,
        b"piped\n",
    )?;
    expect_code(&out, 6)?;
    if !String::from_utf8_lossy(&out.stderr).contains("piped\n{\"lines\": 3") {
        return Err(Failure::new("stdin and stderr through exec").with_detail(describe(&out)));
    }

    // Two execs at once, both under way before either ends.
    let started = Instant::now();
    let slow = sandbox(
        ctx,
        &["exec", "life", "--", "sh", "-c", "sleep 3; echo slow"],
    )?
    .stdout(Stdio::piped())
    .spawn()
    .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    let fast = ok(ctx, &["exec", "life", "--", "echo", "fast"])?;
    expect_stdout(&fast, b"fast\n", "the fast exec")?;
    let slow = slow
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_stdout(&slow, b"slow\n", "the slow exec")?;
    if started.elapsed() > Duration::from_secs(60) {
        return Err(Failure::new(
            "two execs took a minute: they did not run at once",
        ));
    }

    // Binary-safe, both ways, and a cp killed half-way leaves no partial file.
    let blob = ctx.work_file("blob.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap_or(0))
        .collect();
    write(&blob, &data)?;
    ok(ctx, &["cp", path(&blob)?, "life:/work/blob.bin"])?;
    let blob_back = ctx.work_file("blob.back");
    ok(ctx, &["cp", "life:/work/blob.bin", path(&blob_back)?])?;
    if std::fs::read(&blob_back).unwrap_or_default() != data {
        return Err(Failure::new(
            "a 3 MB binary file did not come back byte for byte",
        ));
    }
    let big = ctx.work_file("big.bin");
    write(&big, &vec![0x5a; 48 << 20])?;
    let mut cp = sandbox(ctx, &["cp", path(&big)?, "life:/work/partial.bin"])?
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    std::thread::sleep(Duration::from_millis(400));
    let _ = cp.kill();
    let _ = cp.wait();
    let listing = ok(
        ctx,
        &["exec", "life", "--", "sh", "-c", "sleep 1; ls -a /work"],
    )?;
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    if names.contains("partial") {
        return Err(Failure::new(format!(
            "a cp killed half-way left a file in the guest: {names}"
        )));
    }

    // Hostile and mistaken input: clear errors.
    let huge = ctx.work_file("huge.bin");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(4 << 30))
        .map_err(|e| Failure::new(format!("a sparse 4 GiB file: {e}")))?;
    refused(
        ctx,
        &["cp", path(&huge)?, "life:/work/huge.bin"],
        "at most 1073741824 bytes",
    )?;
    refused(ctx, &["cp", path(&input)?, "life:/work/../etc/x"], "'..'")?;
    refused(
        ctx,
        &["cp", "life:/etc/../etc/passwd", path(&back)?],
        "'..'",
    )?;
    // A FIFO is neither a file to stream nor a directory to walk.
    ok(ctx, &["exec", "life", "--", "mkfifo", "/work/pipe"])?;
    refused(
        ctx,
        &["cp", "life:/work/pipe", path(&back)?],
        "not a regular file",
    )?;
    refused(
        ctx,
        &["exec", "no-such-sandbox", "--", "true"],
        "no sandbox",
    )?;
    refused(
        ctx,
        &["cp", path(&input)?, "relative/path"],
        "SANDBOX:/ABSOLUTE/PATH",
    )?;

    // Stop: then it refuses work, says so, and rm removes it.
    ok(ctx, &["stop", "life"])?;
    refused(ctx, &["exec", &id, "--", "true"], "is stopped")?;
    let info = listed(ctx, &id)?;
    if field(&info, "status") != "stopped" || field(&info, "reason") != "stop" {
        return Err(Failure::new(format!("after stop, ls shows {info}")));
    }
    // The audit log holds the transfers by path, size and digest.
    let written = audit_records(ctx, "file_written")?;
    let script_record = written.iter().skip(before_written).any(|r| {
        r.pointer("/fields/path").and_then(Value::as_str) == Some("/work/script.sh")
            && r.pointer("/fields/complete") == Some(&Value::Bool(true))
    });
    if !script_record {
        return Err(Failure::new(
            "no complete file_written record for /work/script.sh in the audit log",
        ));
    }
    let stopped = audit_records(ctx, "session_stopping")?;
    if !stopped
        .iter()
        .any(|r| r.pointer("/fields/reason").and_then(Value::as_str) == Some("stop"))
    {
        return Err(Failure::new("no session_stopping record with reason stop"));
    }
    ok(ctx, &["rm", "life"])?;
    if list(ctx)?.iter().any(|i| field(i, "id") == id) {
        return Err(Failure::new("rm left the sandbox in ls"));
    }
    Ok(())
}

fn path(p: &std::path::Path) -> Result<&str, Failure> {
    p.to_str()
        .ok_or_else(|| Failure::new(format!("{} is not UTF-8", p.display())))
}

fn run_with_stdin(mut command: Command, input: &[u8]) -> Result<Output, Failure> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| Failure::new(format!("writing stdin: {e}")))?;
    }
    child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))
}

/// Whether process `pid` still runs (a zombie, dead but not yet reaped by
/// whoever inherited it, does not).
fn alive(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .and_then(|rest| rest.split_whitespace().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

/// Waits until `check` holds or `limit` passes.
fn eventually(
    limit: Duration,
    mut check: impl FnMut() -> Result<bool, Failure>,
) -> Result<bool, Failure> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check()? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(false)
}

/// A supervisor killed with SIGKILL takes its VM along; the sandbox shows as
/// stale, refuses work with a clear error, and `rm` cleans it up.
fn killed_supervisor(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let id = create(ctx, &["--ttl", "10m"])?;
    let info = listed(ctx, &id)?;
    let pid = info
        .get("pid")
        .and_then(Value::as_i64)
        .ok_or_else(|| Failure::new(format!("ls --json shows no supervisor pid: {info}")))?;
    let children = descendants(pid);
    if children.is_empty() {
        return Err(Failure::new(format!(
            "the supervisor {pid} has no VM process under it"
        )));
    }
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status();
    if !killed.is_ok_and(|s| s.success()) {
        return Err(Failure::new(format!("kill -9 {pid} failed")));
    }
    let gone = eventually(Duration::from_secs(30), || {
        Ok(!alive(pid) && children.iter().all(|c| !alive(*c)))
    })?;
    if !gone {
        return Err(Failure::new(format!(
            "after kill -9 of the supervisor, its VM processes {children:?} are still there"
        )));
    }
    let info = listed(ctx, &id)?;
    if field(&info, "status") != "stale" {
        return Err(Failure::new(format!("ls shows {info}, not stale")));
    }
    refused(ctx, &["exec", &id, "--", "true"], "is stale")?;
    ok(ctx, &["rm", &id])?;
    if list(ctx)?.iter().any(|i| field(i, "id") == id) {
        return Err(Failure::new("rm left the stale sandbox in ls"));
    }
    Ok(())
}

/// Every process under `pid` (children, grandchildren, ...).
fn descendants(pid: i64) -> Vec<i64> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            break;
        };
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat.get(i + 2..))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i64>().ok());
            if ppid == Some(parent) {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

/// A sandbox whose TTL ends is stopped by its own supervisor, and says why.
fn ttl(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let id = create(ctx, &["--ttl", "5s"])?;
    let stopped = eventually(Duration::from_secs(120), || {
        let info = listed(ctx, &id)?;
        Ok(field(&info, "status") == "stopped")
    })?;
    let info = listed(ctx, &id)?;
    if !stopped || field(&info, "reason") != "ttl" {
        return Err(Failure::new(format!(
            "5 s after its TTL the sandbox shows {info}"
        )));
    }
    refused(ctx, &["exec", &id, "--", "true"], "is stopped (ttl)")?;
    ok(ctx, &["rm", &id])?;
    Ok(())
}

/// A free TCP port on the host's loopback (bound, then released).
fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Failure::new(format!("finding a free port: {e}")))
}

/// Sends `data` to `127.0.0.1:port`, half-closes, and reads everything back.
fn echo_through(port: u16, data: &[u8]) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let failed = |e: std::io::Error| Failure::new(format!("127.0.0.1:{port}: {e}"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(failed)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(failed)?;
    let mut writer = conn.try_clone().map_err(failed)?;
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&payload);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut back = Vec::new();
    conn.read_to_end(&mut back).map_err(failed)?;
    let _ = sender.join();
    Ok(back)
}

/// A TCP echo server started in a sandbox answers on the forwarded host port;
/// each connection is in the audit log; a host port in use fails `create`.
fn port_forward(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let port = free_port()?;
    let forward = format!("{port}:8080");
    let id = create(ctx, &["-p", &forward, "--ttl", "10m"])?;
    // Started in the background of one exec, it outlives it.
    ok(
        ctx,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "nc -ll -p 8080 -e cat </dev/null >/dev/null 2>&1 &",
        ],
    )?;
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let mut back = Vec::new();
    let answered = eventually(Duration::from_secs(30), || {
        back = echo_through(port, &data)?;
        Ok(!back.is_empty())
    })?;
    if !answered || back != data {
        return Err(Failure::new(format!(
            "the echo server on the forwarded port sent back {} of {} bytes",
            back.len(),
            data.len()
        )));
    }
    let closed = audit_records(ctx, "forward_closed")?;
    let recorded = closed.iter().any(|r| {
        r.pointer("/fields/port").and_then(Value::as_u64) == Some(8080)
            && r.pointer("/fields/from_guest_bytes")
                .and_then(Value::as_u64)
                == Some(2_000_000)
    });
    if !recorded {
        return Err(Failure::new(
            "no forward_closed record of 2000000 bytes for port 8080",
        ));
    }
    // The host port is the sandbox's: a second sandbox cannot have it.
    refused(
        ctx,
        &["create", "-p", &forward],
        &format!("127.0.0.1:{port}"),
    )?;
    ok(ctx, &["stop", &id])?;
    let closed = eventually(Duration::from_secs(15), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
    })?;
    if !closed {
        return Err(Failure::new("the forwarded port still accepts after stop"));
    }
    Ok(())
}

/// The SDK's sandbox example (`cargo run -p mvm-runtime --example sandbox`):
/// create, a script written in, run twice with its state carried, read back,
/// stopped; the example finds `mvm` through `MVM_BIN`.
fn sdk_example(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let run_dir = ctx.work_file("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Failure::new(format!("{e}")))?;
    let mut command = Command::new(ctx.artifact("sdk-sandbox")?);
    command
        .env("MVM_BIN", ctx.artifact("mvm")?)
        .env("MVM_DATA_DIR", image_store(ctx)?)
        .env("MVM_CONFIG_DIR", ctx.work_file("config"))
        .env("MVM_VMM", ctx.artifact(crate::case::VMM)?)
        .env("MVM_RUN_DIR", &run_dir)
        .stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, 0)?;
    expect_stdout(
        &out,
        b"run 1\nrun 2\n--- /work/log, read back ---\nrun 1\nrun 2\n\n",
        "the SDK sandbox example",
    )?;
    let listed = list(ctx)?;
    if !listed.iter().all(|i| field(i, "status") == "stopped") || listed.is_empty() {
        return Err(Failure::new(format!(
            "after the example, ls shows {listed:?}"
        )));
    }
    Ok(())
}

/// `mvm sandbox shell` and `mvm run -it`: a terminal in the guest. Driven twice:
/// with a script piped in (no terminal on the host side), and on a terminal
/// made here that `mvm` puts in raw mode.
fn terminal(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let id = create(ctx, &["--ttl", "10m"])?;
    let out = run_with_stdin(
        sandbox(ctx, &["shell", &id])?,
        b"tty; stty size; echo in-$((6*7)); exit 7\n",
    )?;
    expect_code(&out, 7)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains("/dev/pts/") || !text.contains("24 80") || !text.contains("in-42") {
        return Err(
            Failure::new("mvm sandbox shell: wanted a pts, 24 80 and in-42")
                .with_detail(describe(&out)),
        );
    }
    ok(ctx, &["stop", &id])?;

    // mvm run -it on a terminal made here, as a terminal emulator runs it:
    // the guest's terminal has the host's size, follows a resize (SIGWINCH)
    // and gives the shell's exit status back.
    let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    command.args(["run", "-it", "--", "sh"]);
    let mut term = Terminal::spawn(command, 30, 100)?;
    term.expect(b"$ ", Duration::from_secs(180))?;
    term.type_line(b"stty size")?;
    term.expect(b"30 100", Duration::from_secs(30))?;
    term.resize(40, 120)?;
    // The resize travels host SIGWINCH -> mvm -> agent -> guest pty; a
    // shell reading its next line sees the new size.
    std::thread::sleep(Duration::from_millis(500));
    term.type_line(b"stty size")?;
    term.expect(b"40 120", Duration::from_secs(30))?;
    term.type_line(b"[ -t 0 ] && echo term-ok; exit 5")?;
    let (code, seen) = term.wait(Duration::from_secs(60))?;
    if code != Some(5) || !seen.contains("term-ok") {
        return Err(Failure::new(format!(
            "mvm run -it exited {code:?}, wanted 5 after term-ok"
        ))
        .with_detail(crate::case::tail("terminal", &seen, 20)));
    }
    // The sandbox it ran in is gone.
    if !list(ctx)?.iter().all(|i| field(i, "id") == id) {
        return Err(Failure::new("mvm run -it left its sandbox behind"));
    }

    // mvm run -it killed (a terminal emulator's window closed hard): its
    // sandbox sees its only client leave, stops and is removed all the same.
    let mut command = mvm_with(ctx, &image_store(ctx)?, &ctx.work_file("config"))?;
    command.args(["run", "-it", "--", "sh"]);
    let mut term = Terminal::spawn(command, 24, 80)?;
    term.expect(b"$ ", Duration::from_secs(180))?;
    let others = |all: Vec<Value>| all.into_iter().filter(|i| field(i, "id") != id).count();
    if others(list(ctx)?) != 1 {
        return Err(Failure::new(
            "mvm run -it: wanted its sandbox in mvm sandbox ls",
        ));
    }
    drop(term);
    let start = Instant::now();
    while others(list(ctx)?) != 0 {
        if start.elapsed() > Duration::from_secs(90) {
            return Err(Failure::new(
                "mvm run -it killed: its sandbox was still there 90 s later",
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// A command on a terminal made here with openpty(3), in a session of its own
/// with that terminal as its controlling terminal: what a terminal emulator
/// gives `mvm run -it`. Everything the command writes is kept.
struct Terminal {
    master: std::os::fd::OwnedFd,
    child: std::process::Child,
    seen: Vec<u8>,
}

impl Terminal {
    fn spawn(mut command: Command, rows: u16, cols: u16) -> Result<Self, Failure> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fail = |what: &str, e: &dyn std::fmt::Display| Failure::new(format!("{what}: {e}"));
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).map_err(|e| fail("openpty", &e))?;
        // Neither end may leak into what mvm starts (its supervisor would
        // hold the terminal open after mvm has exited).
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|e| fail("fcntl", &e))?;
        }
        let clone = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(|e| fail("dup", &e));
        command
            .stdin(Stdio::from(clone(&pty.slave)?))
            .stdout(Stdio::from(clone(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (setsid, ioctl) on fd 0.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| fail("starting mvm", &e))?;
        // `command` holds the slave's copies; dropping it leaves the child as
        // the only holder, so the master reads EOF (EIO) once it has exited.
        drop(command);
        Ok(Self {
            master: pty.master,
            child,
            seen: Vec::new(),
        })
    }

    /// Reads what the command writes for up to `within`; false at EOF.
    fn read_some(&mut self, within: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::{AsFd, AsRawFd};
        let ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) == 0 {
            return true;
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(self.master.as_raw_fd(), &mut buf) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.seen
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                true
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits until the command has written `want`.
    fn expect(&mut self, want: &[u8], within: Duration) -> CaseResult {
        let deadline = Instant::now() + within;
        let start = self.seen.len();
        while Instant::now() < deadline {
            let fresh = self
                .seen
                .get(start.saturating_sub(want.len())..)
                .unwrap_or_default();
            if fresh.windows(want.len()).any(|w| w == want) {
                return Ok(());
            }
            if !self.read_some(Duration::from_millis(500)) {
                break;
            }
        }
        Err(Failure::new(format!(
            "the terminal did not show {:?} within {within:?}",
            String::from_utf8_lossy(want)
        ))
        .with_detail(crate::case::tail("terminal", &self.text(), 20)))
    }

    /// Types `line` and Enter, as a user at the keyboard does.
    fn type_line(&mut self, line: &[u8]) -> CaseResult {
        let mut bytes = line.to_vec();
        bytes.push(b'\r');
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let n = nix::unistd::write(&self.master, rest)
                .map_err(|e| Failure::new(format!("typing on the terminal: {e}")))?;
            rest = rest.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Resizes the terminal: the kernel sends SIGWINCH to the command.
    fn resize(&mut self, rows: u16, cols: u16) -> CaseResult {
        use std::os::fd::AsRawFd;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer; the
        // fd is the pty master this struct owns.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(Failure::new(format!(
                "TIOCSWINSZ: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Reads to EOF and waits for the command's exit, killing it after
    /// `within`. Returns its exit code and everything it wrote.
    fn wait(mut self, within: Duration) -> Result<(Option<i32>, String), Failure> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && self.read_some(Duration::from_millis(500)) {
            if let Ok(Some(status)) = self.child.try_wait() {
                while self.read_some(Duration::from_millis(100)) {}
                return Ok((status.code(), self.text()));
            }
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) if Instant::now() < deadline => Ok((status.code(), self.text())),
            _ => Err(
                Failure::new(format!("mvm run -it was still running after {within:?}"))
                    .with_detail(crate::case::tail("terminal", &self.text(), 20)),
            ),
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `mvm sandbox cp` of a directory tree in and back out: the same files and
/// bytes, owned by the workload in the guest; a link on either side is skipped
/// and named, never followed.
fn cp_directory(ctx: &Context) -> CaseResult {
    let _cleanup = Cleanup(ctx);
    let id = create(ctx, &["--ttl", "10m"])?;
    let fail = |e: std::io::Error| Failure::new(format!("making the tree: {e}"));
    let src = ctx.work_file("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).map_err(fail)?;
    std::fs::create_dir_all(src.join("empty")).map_err(fail)?;
    write(&src.join("a.txt"), b"alpha\n")?;
    let binary: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    write(&src.join("sub/b.bin"), &binary)?;
    write(&src.join("sub/deeper/c"), b"")?;
    std::os::unix::fs::symlink("/etc/passwd", src.join("link")).map_err(fail)?;

    // In: /work exists, so the tree lands as /work/tree (as cp -r does).
    let out = ok(ctx, &["cp", path(&src)?, &format!("{id}:/work")])?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    if !said.contains("3 file(s), 4 directories") || !said.contains("skipped 1") {
        return Err(
            Failure::new("cp of a tree in: wanted 3 files, 4 directories, 1 skipped")
                .with_detail(describe(&out)),
        );
    }
    let listing = ok(
        ctx,
        &[
            "exec", &id, "--", "sh", "-c",
            "cd /work/tree && find . | sort && stat -c %u sub/b.bin && md5sum sub/b.bin && test ! -e link",
        ],
    )?;
    let text = String::from_utf8_lossy(&listing.stdout).into_owned();
    let want_paths =
        ".\n./a.txt\n./empty\n./sub\n./sub/b.bin\n./sub/deeper\n./sub/deeper/c\n1000\n";
    if !text.starts_with(want_paths) {
        return Err(Failure::new("the tree in the guest").with_detail(describe(&listing)));
    }

    // The guest plants a link to a root-only file; out it comes without it.
    ok(
        ctx,
        &[
            "exec",
            &id,
            "--",
            "ln",
            "-s",
            "/etc/shadow",
            "/work/tree/sub/evil",
        ],
    )?;
    let back = ctx.work_file("back");
    let out = ok(ctx, &["cp", &format!("{id}:/work/tree"), path(&back)?])?;
    if !String::from_utf8_lossy(&out.stderr).contains("sub/evil") {
        return Err(
            Failure::new("cp of a tree out: wanted sub/evil named as skipped")
                .with_detail(describe(&out)),
        );
    }
    let same = |rel: &str| std::fs::read(src.join(rel)).ok() == std::fs::read(back.join(rel)).ok();
    let missing = ["a.txt", "sub/b.bin", "sub/deeper/c"]
        .into_iter()
        .find(|rel| !same(rel) || !back.join(rel).is_file());
    if let Some(rel) = missing {
        return Err(Failure::new(format!("{rel} did not come back the same")));
    }
    if !back.join("empty").is_dir() || back.join("sub/evil").symlink_metadata().is_ok() {
        return Err(Failure::new(
            "cp out: wanted empty/ made and sub/evil absent",
        ));
    }
    // A destination that cannot be a directory: a clear error, nothing written.
    let file = ctx.work_file("plain");
    write(&file, b"keep")?;
    refused(
        ctx,
        &["cp", &format!("{id}:/work/tree"), path(&file)?],
        "not a directory",
    )?;
    if std::fs::read(&file).ok().as_deref() != Some(b"keep".as_slice()) {
        return Err(Failure::new("a refused cp changed its destination"));
    }
    ok(ctx, &["stop", &id])?;
    Ok(())
}
