//! The agent as a host process on a Unix socket, driven through the client library:
//! exec, stdin, streaming, timeouts, files, policy, and protocol abuse.

// A test crate: its helpers (outside #[test] functions) may fail loudly too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mvm_agent::protocol::{
    read_frame, write_frame, ErrorCode, ExecRequest, Hello, Message, PROTOCOL_MAJOR,
};
use mvm_agent::{Client, ClientError, ExecEvent, Stdin};
use sha2::{Digest, Sha256};

struct Agent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Workloads run as uid 1000 and use this directory too.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_mvm-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .args(["--log", "warn"])
            .args(extra)
            .spawn()
            .unwrap();
        Self::wait_for(child, socket, dir)
    }

    fn wait_for(child: Child, socket: PathBuf, dir: tempfile::TempDir) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind, a moment before listen: wait for a connection.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket, dir }
    }

    fn stream(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }

    fn client(&self) -> Client {
        Client::connect(self.stream()).unwrap()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn run(client: &Client, request: &ExecRequest) -> mvm_agent::ExecOutput {
    client
        .exec(request, Stdin::Null)
        .unwrap()
        .wait_output()
        .unwrap()
}

fn agent_error(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Agent(reply)) => reply.code,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

/// Whether any process is left in process group `pgid`.
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence; it takes plain integers.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn wait_group_gone(pgid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if !group_alive(pgid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn exec_separates_stdout_stderr_and_exit_code() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    assert_eq!(client.hello().major, PROTOCOL_MAJOR);
    let out = run(&client, &sh("echo out; echo err >&2; exit 7"));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(7));
    assert_eq!(out.status.signal, None);
    assert!(!out.status.timed_out);
    assert_eq!(out.status.shell_code(), 7);
}

#[test]
fn env_and_cwd_reach_the_process_and_nothing_else_leaks() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut request = sh("echo \"$FOO\"; pwd; echo \"${CARGO:-unset}\"");
    request.env.insert("FOO".into(), "bar baz".into());
    request.cwd = Some("/tmp".into());
    let out = run(&client, &request);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "bar baz\n/tmp\nunset\n"
    );
}

#[test]
fn stdin_bytes_and_stdin_stream() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let out = client
        .exec(
            &ExecRequest {
                argv: vec!["cat".into()],
                ..ExecRequest::default()
            },
            Stdin::Bytes(data.clone()),
        )
        .unwrap()
        .wait_output()
        .unwrap();
    assert_eq!(out.stdout, data);

    let exec = client.exec(&sh("wc -c"), Stdin::Stream).unwrap();
    for _ in 0..10 {
        exec.write_stdin(b"0123456789").unwrap();
    }
    exec.close_stdin().unwrap();
    let out = exec.wait_output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "100");

    // Without stdin, a reader sees end of file at once.
    let out = run(&client, &sh("cat; echo done"));
    assert_eq!(out.stdout, b"done\n");
}

#[test]
fn output_streams_before_the_process_ends() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let started = Instant::now();
    let mut exec = client
        .exec(&sh("echo first; sleep 1; echo second"), Stdin::Null)
        .unwrap();
    let first = exec.next_event().unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, ExecEvent::Stdout(b"first\n".to_vec()));
    assert!(
        first_at < Duration::from_millis(800),
        "first output after {first_at:?}"
    );
    let mut rest = Vec::new();
    while let Some(event) = exec.next_event().unwrap() {
        rest.push(event);
    }
    assert_eq!(rest.first(), Some(&ExecEvent::Stdout(b"second\n".to_vec())));
    assert!(matches!(rest.last(), Some(ExecEvent::Exit(s)) if s.code == Some(0)));
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[test]
fn large_output_arrives_intact() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let big = agent.path("big");
    // stdout: 64 MiB of random bytes; stderr: their digest, computed in the "guest".
    let script =
        format!("head -c 67108864 /dev/urandom > {big} && sha256sum < {big} >&2 && cat {big}");
    let started = Instant::now();
    let out = run(&client, &sh(&script));
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 64 << 20);
    let digest = hex_digest(&out.stdout);
    let reported = String::from_utf8(out.stderr).unwrap();
    assert_eq!(reported.split_whitespace().next(), Some(digest.as_str()));
    eprintln!("64 MiB exec output (incl. generating it) in {elapsed:?}");
}

/// SHA-256 of `data` in hex, by the host's `sha256sum` (the sha2 crate is slow in an
/// unoptimised test build), checked against the sha2 crate on a small sample.
fn hex_digest(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    hex.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn host_digest_tool_agrees_with_sha2() {
    let sample = b"mvm agent digest sample";
    let expected: String = Sha256::digest(sample)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex_digest(sample), expected);
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut request = sh("echo $$; sleep 60 & sleep 60");
    request.timeout_ms = Some(1000);
    let started = Instant::now();
    let out = run(&client, &request);
    let elapsed = started.elapsed();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert_eq!(out.status.code, None);
    assert!(
        elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let pgid: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_group_gone(pgid),
        "process group {pgid} survived the timeout"
    );
}

#[test]
fn background_processes_die_with_their_leader() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let started = Instant::now();
    let out = run(&client, &sh("echo $$; sleep 60 & exit 3"));
    assert_eq!(out.status.code, Some(3));
    assert!(started.elapsed() < Duration::from_secs(5));
    let pgid: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_group_gone(pgid));
}

#[test]
fn signal_reaches_the_process() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut exec = client
        .exec(&sh("echo ready; sleep 60"), Stdin::Null)
        .unwrap();
    assert_eq!(
        exec.next_event().unwrap(),
        Some(ExecEvent::Stdout(b"ready\n".to_vec()))
    );
    exec.signal(libc::SIGTERM).unwrap();
    let status = loop {
        if let Some(ExecEvent::Exit(status)) = exec.next_event().unwrap() {
            break status;
        }
    };
    assert_eq!(status.signal, Some(libc::SIGTERM));
    assert_eq!(status.shell_code(), 128 + libc::SIGTERM);
    assert!(!status.timed_out);
}

/// `mvm run`'s Ctrl-C: SIGINT reaches the workload's whole group, a workload that
/// traps it cleans up and its own exit status comes back (not a signal).
#[test]
fn a_workload_that_traps_sigint_exits_with_its_own_status() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut exec = client
        .exec(
            &sh("trap 'echo cleaning up; exit 3' INT; echo started; sleep 60 & wait"),
            Stdin::Null,
        )
        .unwrap();
    assert_eq!(
        exec.next_event().unwrap(),
        Some(ExecEvent::Stdout(b"started\n".to_vec()))
    );
    let sent = Instant::now();
    exec.signal(libc::SIGINT).unwrap();
    let mut stdout = Vec::new();
    let status = loop {
        match exec.next_event().unwrap() {
            Some(ExecEvent::Exit(status)) => break status,
            Some(ExecEvent::Stdout(data)) => stdout.extend_from_slice(&data),
            _ => {}
        }
    };
    assert_eq!(stdout, b"cleaning up\n");
    assert_eq!(status.code, Some(3), "{status:?}");
    assert_eq!(status.signal, None);
    assert!(sent.elapsed() < Duration::from_secs(10));
}

#[test]
fn closing_the_connection_kills_its_workloads() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut exec = client.exec(&sh("echo $$; sleep 60"), Stdin::Null).unwrap();
    let Some(ExecEvent::Stdout(pid)) = exec.next_event().unwrap() else {
        panic!("no pid")
    };
    let pgid: i32 = String::from_utf8(pid).unwrap().trim().parse().unwrap();
    assert!(group_alive(pgid));
    drop(exec);
    drop(client);
    assert!(wait_group_gone(pgid), "workload outlived its connection");
}

#[test]
fn requests_run_concurrently_on_one_connection() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let started = Instant::now();
    let slow = client.exec(&sh("sleep 1; echo slow"), Stdin::Null).unwrap();
    let fast = client.exec(&sh("echo fast"), Stdin::Null).unwrap();
    let fast_out = fast.wait_output().unwrap();
    assert_eq!(fast_out.stdout, b"fast\n");
    let ready = client.ping().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "fast work waited for slow work"
    );
    assert!(!ready.pid1);
    assert!(ready.uptime_ms >= ready.boot_ms);
    assert_eq!(slow.wait_output().unwrap().stdout, b"slow\n");
}

#[test]
fn bad_cwd_and_missing_binary_are_clear_errors() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut request = sh("true");
    request.cwd = Some("/does/not/exist".into());
    assert_eq!(
        agent_error(client.exec(&request, Stdin::Null).unwrap().wait_output()),
        ErrorCode::BadCwd
    );
    let request = ExecRequest {
        argv: vec!["no-such-program-mvm".into()],
        ..ExecRequest::default()
    };
    assert_eq!(
        agent_error(client.exec(&request, Stdin::Null).unwrap().wait_output()),
        ErrorCode::NotFound
    );
    // A relative path with a slash is looked up from the request's working directory.
    let mut relative = ExecRequest {
        argv: vec!["./true".into()],
        ..ExecRequest::default()
    };
    relative.cwd = Some("/bin".into());
    assert_eq!(run(&client, &relative).status.code, Some(0));
    relative.cwd = Some("/".into());
    assert_eq!(
        agent_error(client.exec(&relative, Stdin::Null).unwrap().wait_output()),
        ErrorCode::NotFound
    );
    let request = ExecRequest {
        argv: vec!["/nonexistent/bin".into()],
        ..ExecRequest::default()
    };
    assert_eq!(
        agent_error(client.exec(&request, Stdin::Null).unwrap().wait_output()),
        ErrorCode::NotFound
    );
    // The connection is still good.
    client.ping().unwrap();
}

#[test]
fn write_and_read_file_round_trip() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let path = agent.path("data.bin");
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| u8::try_from(i * 7 % 256).unwrap())
        .collect();
    let done = client.write_file(&path, 0o600, &data).unwrap();
    assert_eq!(done.size, 1_000_000);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    assert_eq!(client.read_file(&path).unwrap(), data);
    // Overwrite truncates.
    client.write_file(&path, 0o644, b"short").unwrap();
    assert_eq!(client.read_file(&path).unwrap(), b"short");
    // Empty file.
    client.write_file(&path, 0o644, b"").unwrap();
    assert_eq!(client.read_file(&path).unwrap(), b"");
    // Limits on the client side.
    client.write_file(&path, 0o644, &[1; 5000]).unwrap();
    assert!(matches!(
        client.read_file_limited(&path, 100),
        Err(ClientError::TooLarge { .. })
    ));
}

#[test]
fn file_errors_are_clear() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    assert_eq!(
        agent_error(client.read_file(&agent.path("missing"))),
        ErrorCode::NotFound
    );
    assert_eq!(
        agent_error(client.read_file(agent.dir.path().to_str().unwrap())),
        ErrorCode::BadRequest
    );
    assert_eq!(
        agent_error(client.write_file(&agent.path("no/such/dir/f"), 0o644, b"x")),
        ErrorCode::NotFound
    );
    // A refused write of many chunks still gets exactly one answer, and the connection
    // stays in step.
    assert_eq!(
        agent_error(client.write_file(&agent.path("no/dir/big"), 0o644, &vec![0; 4 << 20])),
        ErrorCode::NotFound
    );
    assert_eq!(run(&client, &sh("echo in step")).stdout, b"in step\n");
    // Writes never follow a symlink in the last component.
    let target = agent.path("target");
    std::fs::write(&target, b"original").unwrap();
    let link = agent.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(client.write_file(&link, 0o644, b"redirected").is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"original");
    // A FIFO (which nobody reads) neither blocks a write nor a read.
    let fifo = agent.path("fifo");
    let c_fifo = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: c_fifo is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0);
    assert!(client.write_file(&fifo, 0o644, b"x").is_err());
    assert_eq!(agent_error(client.read_file(&fifo)), ErrorCode::BadRequest);
    client.ping().unwrap();
}

#[test]
fn workloads_drop_to_an_unprivileged_user_with_no_new_privs() {
    // Needs root (uid changes, rlimits): without it this fails, never passes quietly.
    assert!(is_root(), "this test needs root");
    let agent = Agent::start(&[]);
    let client = agent.client();
    let out = run(
        &client,
        &sh("id -u; id -g; id -G; grep NoNewPrivs /proc/self/status; ulimit -n"),
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "1000\n1000\n1000\nNoNewPrivs:\t1\n4096\n"
    );
    let mut root = sh("id -u");
    root.uid = Some(0);
    assert_eq!(
        agent_error(client.exec(&root, Stdin::Null).unwrap().wait_output()),
        ErrorCode::PermissionDenied
    );
    let mut other = sh("id -u; id -g");
    other.uid = Some(1234);
    assert_eq!(run(&client, &other).stdout, b"1234\n1234\n");
}

#[test]
fn root_only_when_the_policy_allows_it() {
    // Needs root (uid changes, rlimits): without it this fails, never passes quietly.
    assert!(is_root(), "this test needs root");
    let agent = Agent::start(&["--allow-root"]);
    let client = agent.client();
    let mut root = sh("id -u");
    root.uid = Some(0);
    assert_eq!(run(&client, &root).stdout, b"0\n");
    // The default stays unprivileged.
    assert_eq!(run(&client, &sh("id -u")).stdout, b"1000\n");
}

/// Sends raw bytes after (optionally) a valid hello; returns what the agent answered.
fn raw_session(agent: &Agent, hello: bool, bytes: &[u8]) -> Vec<Message> {
    let mut stream = agent.stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    if hello {
        let hello = Hello {
            major: PROTOCOL_MAJOR,
            minor: 0,
            software: "test".into(),
        };
        write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    }
    stream.write_all(bytes).unwrap();
    let mut answers = Vec::new();
    // Read until the agent closes; a timeout here means it did not close.
    loop {
        match read_frame(&mut stream) {
            Ok(Some(frame)) => answers.push(frame.message),
            Ok(None) => break,
            Err(e) => panic!("after {answers:?}: {e}"),
        }
    }
    answers
}

fn error_code(message: &Message) -> ErrorCode {
    match message {
        Message::Error(reply) => reply.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn unknown_major_version_gets_an_error_then_close() {
    let agent = Agent::start(&[]);
    let mut bytes = Vec::new();
    let hello = Hello {
        major: PROTOCOL_MAJOR + 1,
        minor: 0,
        software: "future".into(),
    };
    write_frame(&mut bytes, 0, &Message::Hello(hello)).unwrap();
    let answers = raw_session(&agent, false, &bytes);
    assert_eq!(answers.len(), 1);
    assert_eq!(error_code(&answers[0]), ErrorCode::UnsupportedVersion);

    // The client library reports it as an agent error.
    let mut stream = agent.stream();
    let hello = Hello {
        major: 99,
        minor: 0,
        software: "x".into(),
    };
    write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    let frame = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(error_code(&frame.message), ErrorCode::UnsupportedVersion);
}

#[test]
fn a_request_before_hello_is_refused() {
    let agent = Agent::start(&[]);
    let mut bytes = Vec::new();
    write_frame(&mut bytes, 1, &Message::Ping).unwrap();
    let answers = raw_session(&agent, false, &bytes);
    assert_eq!(answers.len(), 1);
    assert_eq!(error_code(&answers[0]), ErrorCode::UnexpectedFrame);
}

#[test]
fn malformed_frames_close_the_connection_not_the_agent() {
    let agent = Agent::start(&[]);
    // Oversize length prefix: refused before any body is read.
    let answers = raw_session(&agent, true, &[0x7f, 0xff, 0xff, 0xff]);
    assert!(matches!(answers.first(), Some(Message::Hello(_))));
    assert_eq!(error_code(&answers[1]), ErrorCode::Oversize);
    assert_eq!(answers.len(), 2);
    // Unknown frame type.
    let answers = raw_session(&agent, true, &[0, 0, 0, 5, 0x99, 0, 0, 0, 1]);
    assert_eq!(error_code(&answers[1]), ErrorCode::UnknownType);
    // Bad JSON in an exec.
    let mut bytes = vec![0, 0, 0, 8, 0x10, 0, 0, 0, 1];
    bytes.extend_from_slice(b"{{{");
    let answers = raw_session(&agent, true, &bytes);
    assert_eq!(error_code(&answers[1]), ErrorCode::Malformed);
    // Truncated frame, then the peer closes its side.
    let mut stream = agent.stream();
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: 0,
        software: "t".into(),
    };
    write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    stream.write_all(&[0, 0, 1, 0, 0x13, 0, 0]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    // A frame a client must not send.
    let mut bytes = Vec::new();
    write_frame(&mut bytes, 1, &Message::Stdout(b"x".to_vec())).unwrap();
    let answers = raw_session(&agent, true, &bytes);
    assert_eq!(error_code(&answers[1]), ErrorCode::UnexpectedFrame);
    // After all that, the agent still serves.
    let client = agent.client();
    assert_eq!(run(&client, &sh("echo alive")).stdout, b"alive\n");
}

#[test]
fn request_ids_in_use_and_reserved_are_refused() {
    let agent = Agent::start(&[]);
    let mut stream = agent.stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: 0,
        software: "t".into(),
    };
    write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    assert!(matches!(
        read_frame(&mut stream).unwrap().unwrap().message,
        Message::Hello(_)
    ));
    write_frame(&mut stream, 5, &Message::Exec(sh("sleep 1"))).unwrap();
    write_frame(&mut stream, 5, &Message::Exec(sh("true"))).unwrap();
    let frame = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(frame.request_id, 5);
    assert_eq!(error_code(&frame.message), ErrorCode::RequestIdInUse);
    write_frame(&mut stream, 0, &Message::Exec(sh("true"))).unwrap();
    let frame = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(error_code(&frame.message), ErrorCode::BadRequest);
    let frame = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(frame.request_id, 5);
    assert!(matches!(frame.message, Message::Exit(s) if s.code == Some(0)));
}

#[test]
fn shutdown_ends_the_agent() {
    let mut agent = Agent::start(&[]);
    let client = agent.client();
    client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(client.ping().is_err());
}

#[test]
fn socket_path_is_what_the_agent_listens_on() {
    let agent = Agent::start(&[]);
    assert!(Path::new(&agent.socket).exists());
}

#[test]
fn large_stdin_flows_while_output_is_read() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    // 32 MiB through cat: stdin and stdout move at the same time, or both would stall.
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i ^ (i >> 11)).to_le_bytes()[0])
        .collect();
    let started = Instant::now();
    let out = client
        .exec(
            &ExecRequest {
                argv: vec!["cat".into()],
                ..ExecRequest::default()
            },
            Stdin::Bytes(data.clone()),
        )
        .unwrap()
        .wait_output()
        .unwrap();
    eprintln!("32 MiB through cat in {:?}", started.elapsed());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned different bytes");

    // The same with a stream written from another thread.
    let mut exec = client.exec(&sh("sha256sum"), Stdin::Stream).unwrap();
    let stdin = exec.stdin();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write(&sent).unwrap();
        stdin.close().unwrap();
    });
    let mut stdout = Vec::new();
    while let Some(event) = exec.next_event().unwrap() {
        if let ExecEvent::Stdout(chunk) = event {
            stdout.extend(chunk);
        }
    }
    writer.join().unwrap();
    let reported = String::from_utf8(stdout).unwrap();
    assert_eq!(
        reported.split_whitespace().next(),
        Some(hex_digest(&data).as_str())
    );
}

#[test]
fn a_dead_agent_ends_waits_with_an_error() {
    let mut agent = Agent::start(&[]);
    let client = agent.client();
    let mut exec = client.exec(&sh("echo $$; sleep 60"), Stdin::Null).unwrap();
    let Some(ExecEvent::Stdout(pid)) = exec.next_event().unwrap() else {
        panic!("no pid")
    };
    let pgid: i32 = String::from_utf8(pid).unwrap().trim().parse().unwrap();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let started = Instant::now();
    assert!(matches!(exec.next_event(), Err(ClientError::Closed(_))));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(client.ping(), Err(ClientError::Closed(_))));
    // A host-side agent's workloads outlive a SIGKILL of the agent; clean up.
    // SAFETY: kill takes plain integers; pgid is the group this test started.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

#[test]
fn connect_times_out_on_a_silent_peer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    let _accepted = listener.accept().unwrap();
    let started = Instant::now();
    let result = Client::connect_with_timeout(stream, Some(Duration::from_millis(300)));
    assert!(matches!(result, Err(ClientError::Timeout(_))));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_refused_write_answers_once() {
    let agent = Agent::start(&[]);
    let mut stream = agent.stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: 0,
        software: "t".into(),
    };
    write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    assert!(matches!(
        read_frame(&mut stream).unwrap().unwrap().message,
        Message::Hello(_)
    ));
    let request = mvm_agent::protocol::WriteFileRequest {
        path: agent.path("missing/dir/file"),
        mode: 0o644,
        uid: None,
        gid: None,
        append: false,
        atomic: false,
    };
    write_frame(&mut stream, 3, &Message::WriteFile(request)).unwrap();
    for _ in 0..3 {
        write_frame(&mut stream, 3, &Message::FileData(vec![1; 1000])).unwrap();
    }
    write_frame(&mut stream, 3, &Message::FileEnd).unwrap();
    write_frame(&mut stream, 4, &Message::Ping).unwrap();
    let first = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(first.request_id, 3);
    assert_eq!(error_code(&first.message), ErrorCode::NotFound);
    let second = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(second.request_id, 4, "extra frame: {:?}", second.message);
    assert!(matches!(second.message, Message::Ready(_)));
}

#[test]
fn exec_failures_after_fork_are_errors_not_crashes() {
    // Needs root (uid changes, rlimits): without it this fails, never passes quietly.
    assert!(is_root(), "this test needs root");
    let agent = Agent::start(&[]);
    let client = agent.client();
    // Executable for root, but inside a directory uid 1000 cannot enter: the exec in the
    // child fails with EACCES after the fork, which races the reaper every time.
    let private = agent.dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let program = private.join("prog");
    std::fs::write(&program, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let request = ExecRequest {
        argv: vec![program.to_str().unwrap().to_owned()],
        ..ExecRequest::default()
    };
    for _ in 0..30 {
        assert_eq!(
            agent_error(client.exec(&request, Stdin::Null).unwrap().wait_output()),
            ErrorCode::PermissionDenied
        );
    }
    // The agent survived and still reports statuses correctly.
    assert_eq!(run(&client, &sh("exit 4")).status.code, Some(4));
}

#[test]
fn workloads_start_with_default_signal_actions_and_no_mask() {
    // The test harness starts the agent through posix_spawn, which leaves signals ignored
    // that a workload must not inherit.
    let agent = Agent::start(&[]);
    let client = agent.client();
    assert_eq!(
        run(&client, &sh("grep -E '^Sig(Blk|Ign)' /proc/self/status")).stdout,
        b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
}

#[test]
fn limits_never_rise_above_the_agents_hard_limits() {
    // Needs root (uid changes, rlimits): without it this fails, never passes quietly.
    assert!(is_root(), "this test needs root");
    // As in a small guest, where the kernel derives init's RLIMIT_NPROC from its memory:
    // the policy's 4096 must be capped, not make every exec fail with EPERM.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mvm-agent"));
    command
        .arg("--listen-unix")
        .arg(&socket)
        .args(["--log", "warn"]);
    // SAFETY: setrlimit is async-signal-safe and `limit` lives in the closure.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let limit = libc::rlimit {
                rlim_cur: 500,
                rlim_max: 500,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    let agent = Agent::wait_for(child, socket, dir);
    let client = agent.client();
    let out = run(
        &client,
        &sh("awk '/^Max (processes|open files)/ {print $(NF-2), $(NF-1)}' /proc/self/limits"),
    );
    assert_eq!(out.status.code, Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "500 500\n4096 4096\n"
    );
}

#[test]
fn an_absurd_timeout_is_no_timeout_not_a_crash() {
    let agent = Agent::start(&[]);
    let client = agent.client();
    let mut request = sh("echo ok");
    request.timeout_ms = Some(u64::MAX);
    let out = run(&client, &request);
    assert_eq!(out.stdout, b"ok\n");
    assert!(!out.status.timed_out);
    client.ping().unwrap();
}

/// A connection that has said hello, for frame-level tests.
fn greeted(agent: &Agent) -> UnixStream {
    let mut stream = agent.stream();
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: 1,
        software: "t".into(),
    };
    write_frame(&mut stream, 0, &Message::Hello(hello)).unwrap();
    assert!(matches!(
        read_frame(&mut stream).unwrap().unwrap().message,
        Message::Hello(_)
    ));
    stream
}

fn atomic_write(path: String) -> Message {
    Message::WriteFile(mvm_agent::protocol::WriteFileRequest {
        path,
        mode: 0o600,
        uid: None,
        gid: None,
        append: false,
        atomic: true,
    })
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "agent.sock")
        .collect();
    names.sort();
    names
}

#[test]
fn an_atomic_write_is_whole_or_absent_and_replaces_a_link_without_following_it() {
    let agent = Agent::start(&[]);
    let mut stream = greeted(&agent);
    // Cancelled half-way (an error frame from the client): nothing is left.
    let target = agent.path("out.bin");
    write_frame(&mut stream, 1, &atomic_write(target.clone())).unwrap();
    write_frame(&mut stream, 1, &Message::FileData(vec![7; 4096])).unwrap();
    let cancel = mvm_agent::protocol::ErrorReply {
        code: ErrorCode::BadRequest,
        message: "cancelled".into(),
    };
    write_frame(&mut stream, 1, &Message::Error(cancel)).unwrap();
    write_frame(&mut stream, 2, &Message::Ping).unwrap();
    let answer = read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(answer.request_id, 2, "{:?}", answer.message);
    assert!(
        entries(agent.dir.path()).is_empty(),
        "{:?}",
        entries(agent.dir.path())
    );

    // A connection that closes mid-write leaves nothing either.
    let mut doomed = greeted(&agent);
    write_frame(&mut doomed, 1, &atomic_write(target.clone())).unwrap();
    write_frame(&mut doomed, 1, &Message::FileData(vec![7; 4096])).unwrap();
    drop(doomed);

    // Whole: the data lands at the end frame, over a symlink (replaced, not followed).
    let elsewhere = agent.path("elsewhere");
    std::fs::write(&elsewhere, b"keep").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
    write_frame(&mut stream, 3, &atomic_write(target.clone())).unwrap();
    write_frame(&mut stream, 3, &Message::FileData(b"new".to_vec())).unwrap();
    write_frame(&mut stream, 3, &Message::FileEnd).unwrap();
    let done = read_frame(&mut stream).unwrap().unwrap();
    assert!(
        matches!(done.message, Message::FileDone(_)),
        "{:?}",
        done.message
    );
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
    let deadline = Instant::now() + Duration::from_secs(5);
    while entries(agent.dir.path()) != ["elsewhere", "out.bin"] {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            entries(agent.dir.path())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_error_frame_from_the_client_cancels_a_running_process() {
    assert!(is_root(), "this test needs root");
    let agent = Agent::start(&[]);
    let mut stream = greeted(&agent);
    write_frame(&mut stream, 5, &Message::Exec(sh("sleep 30"))).unwrap();
    let cancel = mvm_agent::protocol::ErrorReply {
        code: ErrorCode::BadRequest,
        message: "cancelled".into(),
    };
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    write_frame(&mut stream, 5, &Message::Error(cancel)).unwrap();
    loop {
        let frame = read_frame(&mut stream).unwrap().unwrap();
        if let Message::Exit(status) = frame.message {
            assert_eq!(frame.request_id, 5);
            assert_eq!(status.signal, Some(libc::SIGKILL));
            break;
        }
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_reseed_is_refused_by_an_agent_that_is_not_the_guests_pid1() {
    // On the host the agent must not set the host's RNG, clock or hostname.
    let agent = Agent::start(&[]);
    let client = agent.client();
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let request = mvm_agent::protocol::ReseedRequest {
        entropy: vec![9; 64],
        sandbox_id: "sb-fork".into(),
        hostname: Some("not-this-host".into()),
        unix_time_ns: Some(0),
    };
    assert_eq!(
        agent_error(client.reseed(&request)),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
    // The connection goes on.
    assert_eq!(run(&client, &sh("echo on")).stdout, b"on\n");
}
