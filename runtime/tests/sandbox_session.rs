//! A sandbox's session end to end without a guest kernel: the `kvm` backend
//! boots the fake VMM (see `common`: a real, in-process `mvm-agent` behind the
//! hybrid-vsock handshake), hands the session's agent connection to the real
//! multiplexer, and real agent-protocol clients use the control socket: execs
//! at once from two clients, files in and out, a client that dies mid-exec, a
//! client that sends garbage, a transfer past the limit, stop and TTL. Every
//! request's record is checked in the journal.
//!
//! A custom harness (`harness = false`), as `kvm_backend`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_clean, fake_vmm, set_role, setup, spec, Setup, ROLE};
use mvm_agent::protocol::{
    read_frame, write_frame, ErrorCode, ExecRequest, Hello, Message, ReseedRequest, PROTOCOL_MAJOR,
};
use mvm_agent::{Client, ClientError, ExecEvent, Stdin};
use mvm_runtime::backend::{
    kvm, RunError, RunJournal, RunOutcome, SessionEvent, Workload, WorkloadStatus,
};
use mvm_runtime::sandbox::mux::Mux;
use mvm_runtime::secrets::Secret;

/// Keeps what a session records.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<SessionEvent>>>);

impl RunJournal for Recorder {
    fn workload_starting(&mut self) -> Result<Vec<Secret>, RunError> {
        Ok(Vec::new())
    }
    fn session_event(&mut self, event: &SessionEvent) -> Result<(), RunError> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

impl Recorder {
    fn events(&self) -> Vec<SessionEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// A session running on its own thread, and its control socket.
struct Session {
    socket: PathBuf,
    recorder: Recorder,
    done: mpsc::Receiver<Result<RunOutcome, RunError>>,
}

fn start(s: &Setup, name: &str, ttl: Duration, limit: u64) -> Session {
    set_role("agent");
    let socket = s.dir.path().join(format!("{name}.sock"));
    let recorder = Recorder::default();
    let (ready_tx, ready) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let artifacts = s.artifacts.clone();
    let mut journal = recorder.clone();
    let path = socket.clone();
    std::thread::spawn(move || {
        let mut mux = Mux::new(
            path,
            ttl,
            Box::new(move |_| {
                let _ = ready_tx.send(());
            }),
        )
        .transfer_limit(limit)
        .forwarded_ports(vec![FORWARDED]);
        let result = kvm::run_verified(
            &spec(&["mvm-sandbox", "test"]),
            &artifacts,
            None,
            &mut journal,
            Workload::Session(&mut mux),
        );
        let _ = done_tx.send(result);
    });
    ready
        .recv_timeout(Duration::from_secs(20))
        .expect("the session did not become ready");
    Session {
        socket,
        recorder,
        done,
    }
}

impl Session {
    fn client(&self) -> Client {
        Client::connect(UnixStream::connect(&self.socket).unwrap()).unwrap()
    }

    fn end(&self) -> RunOutcome {
        self.done
            .recv_timeout(Duration::from_secs(30))
            .expect("the session did not end")
            .expect("the session failed")
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn count(events: &[SessionEvent], pick: fn(&SessionEvent) -> bool) -> usize {
    events.iter().filter(|e| pick(e)).count()
}

fn requests_are_shared_recorded_and_cleaned_up(s: &Setup) {
    let session = start(s, "shared", Duration::from_secs(60), 1 << 30);
    let (a, b) = (session.client(), session.client());
    // Two execs at once from two clients, both under way before either ends.
    let started = Instant::now();
    let slow = a.exec(&sh("sleep 1; echo slow"), Stdin::Null).unwrap();
    let fast = b.exec(&sh("echo fast; exit 3"), Stdin::Null).unwrap();
    let fast = fast.wait_output().unwrap();
    assert_eq!(
        (fast.stdout.as_slice(), fast.status.code),
        (&b"fast\n"[..], Some(3))
    );
    let slow = slow.wait_output().unwrap();
    assert_eq!(slow.stdout, b"slow\n");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A file in and back out (the agent here writes host paths).
    let path = s.dir.path().join("data.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let request = mvm_agent::protocol::WriteFileRequest {
        path: path.to_str().unwrap().to_owned(),
        mode: 0o644,
        uid: None,
        gid: None,
        append: false,
        atomic: false, // the multiplexer makes it atomic anyway
    };
    a.write_file_with(&request, &data).unwrap();
    assert_eq!(b.read_file(path.to_str().unwrap()).unwrap(), data);

    // A client that dies mid-exec: its process is killed, its end recorded.
    let marker = s.dir.path().join("survived");
    let doomed = session.client();
    let mut running = doomed
        .exec(
            &sh(&format!("echo up; sleep 3; touch {}", marker.display())),
            Stdin::Null,
        )
        .unwrap();
    assert!(matches!(
        running.next_event().unwrap(),
        Some(ExecEvent::Stdout(_))
    ));
    drop(running);
    drop(doomed);

    // Garbage from a client: it is dropped, the others go on.
    let mut rude = UnixStream::connect(&session.socket).unwrap();
    let hello = Hello {
        major: PROTOCOL_MAJOR,
        minor: 1,
        software: "rude".into(),
    };
    write_frame(&mut rude, 0, &Message::Hello(hello)).unwrap();
    assert!(matches!(
        read_frame(&mut rude).unwrap().unwrap().message,
        Message::Hello(_)
    ));
    rude.write_all(&[0, 0, 0, 9, 0xee, 0, 0, 0, 1, 1, 2, 3, 4])
        .unwrap();
    assert!(matches!(
        read_frame(&mut rude).unwrap().unwrap().message,
        Message::Error(_)
    ));
    let ok = a
        .exec(&sh("true"), Stdin::Null)
        .unwrap()
        .wait_output()
        .unwrap();
    assert_eq!(ok.status.code, Some(0));

    // A client does not reseed the guest: that is the supervisor's, after a restore.
    let refused = a.reseed(&ReseedRequest {
        entropy: vec![1; 32],
        sandbox_id: "sb-other".into(),
        hostname: None,
        unix_time_ns: None,
    });
    assert!(
        matches!(&refused, Err(ClientError::Agent(e)) if e.code == ErrorCode::PermissionDenied),
        "{refused:?}"
    );

    // A session without snapshots (the emulated tier's) cannot pause; it goes on.
    let refused = a.pause();
    assert!(
        matches!(&refused, Err(ClientError::Agent(e)) if e.message.contains("kvm backend")),
        "{refused:?}"
    );
    a.ping().unwrap();

    // Stop: the session ends, the VM with it.
    b.shutdown().unwrap();
    let outcome = session.end();
    assert_eq!(outcome.status.code, Some(0));
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!marker.exists(), "a dead client's process ran on");

    let events = session.recorder.events();
    assert_eq!(
        count(&events, |e| matches!(e, SessionEvent::ExecStarted { .. })),
        4,
        "{events:#?}"
    );
    assert_eq!(
        count(&events, |e| matches!(e, SessionEvent::ExecExited { .. })),
        4,
        "{events:#?}"
    );
    let killed = events.iter().any(|e| {
        matches!(
            e,
            SessionEvent::ExecExited {
                status: Some(137),
                ..
            }
        )
    });
    assert!(killed, "the dead client's process: {events:#?}");
    let digest = mvm_loader::measure::Sha256Digest::of(&data);
    assert!(events.iter().any(|e| matches!(e,
        SessionEvent::FileWritten { data: (d, 300_000), complete: true, .. } if *d == digest)));
    assert!(events.iter().any(|e| matches!(e,
        SessionEvent::FileRead { data: (d, 300_000), complete: true, .. } if *d == digest)));
    assert!(matches!(
        events.last(),
        Some(SessionEvent::Stopping { reason }) if reason == "stop"
    ));
    assert!(!session.socket.exists(), "the control socket is removed");
}

fn a_transfer_past_the_limit_is_cut_and_leaves_nothing(s: &Setup) {
    let session = start(s, "limit", Duration::from_secs(60), 100_000);
    let client = session.client();
    let path = s.dir.path().join("big.bin");
    let big = vec![9u8; 400_000];
    let err = client
        .write_file(path.to_str().unwrap(), 0o644, &big)
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Agent(r) if r.message.contains("transfer limit")),
        "{err}"
    );
    let small = s.dir.path().join("small.bin");
    std::fs::write(&small, vec![1u8; 200_000]).unwrap();
    let err = client.read_file(small.to_str().unwrap()).unwrap_err();
    assert!(format!("{err}").contains("transfer limit"), "{err}");
    // The session goes on.
    let ok = client
        .exec(&sh("true"), Stdin::Null)
        .unwrap()
        .wait_output()
        .unwrap();
    assert_eq!(ok.status.code, Some(0));
    client.shutdown().unwrap();
    session.end();
    assert!(!path.exists(), "a cut write left {}", path.display());
    let leftovers = leftovers(s.dir.path());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let events = session.recorder.events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            SessionEvent::FileWritten {
                complete: false,
                ..
            }
        )),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            SessionEvent::FileRead {
                complete: false,
                ..
            }
        )),
        "{events:#?}"
    );
}

/// Every path under `root` (relative, sorted), with a file's bytes.
fn tree(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut all = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
                all.push((rel, None));
            } else if meta.is_file() {
                all.push((rel, Some(std::fs::read(&path).unwrap())));
            }
        }
    }
    all.sort();
    all
}

fn directories_copy_both_ways_and_no_link_is_followed(s: &Setup) {
    use mvm_runtime::sandbox::copy::Copier;
    let session = start(s, "dirs", Duration::from_secs(60), 1 << 30);
    let client = session.client();
    let copier = Copier::new(&client, None);
    // A host tree with a nested binary file, an empty directory, and a link.
    let src = s.dir.path().join("dir-src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    let binary: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("sub/b.bin"), &binary).unwrap();
    std::fs::write(src.join("sub/deeper/c"), b"").unwrap();
    std::os::unix::fs::symlink("/etc", src.join("link")).unwrap();

    // In: the agent here writes this machine's files, so the "guest" is a directory.
    let guest = s.dir.path().join("dir-guest");
    let stats = copier.copy_in(&src, guest.to_str().unwrap()).unwrap();
    assert_eq!(
        (stats.files, stats.dirs, stats.skipped.clone()),
        (3, 4, vec!["link".to_owned()])
    );
    assert_eq!(stats.bytes, 6 + 300_000);
    assert_eq!(tree(&guest), tree(&src));
    assert!(!guest.join("link").exists());
    assert!(copier.is_dir(guest.to_str().unwrap()).unwrap());
    assert!(!copier
        .is_dir(guest.join("a.txt").to_str().unwrap())
        .unwrap());

    // The guest plants links; the host destination has one planted too.
    std::os::unix::fs::symlink("/etc/passwd", guest.join("sub/evil")).unwrap();
    nix::unistd::mkfifo(&guest.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let outside = s.dir.path().join("dir-outside");
    std::fs::create_dir_all(&outside).unwrap();
    let trapped = s.dir.path().join("dir-trapped");
    std::fs::create_dir_all(&trapped).unwrap();
    std::os::unix::fs::symlink(&outside, trapped.join("sub")).unwrap();
    let err = copier
        .copy_out(guest.to_str().unwrap(), &trapped)
        .unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written through a link"
    );

    // Out, into a fresh destination: the same tree, links and the FIFO skipped.
    let out = s.dir.path().join("dir-out");
    let stats = copier.copy_out(guest.to_str().unwrap(), &out).unwrap();
    let mut skipped = stats.skipped.clone();
    skipped.sort();
    assert_eq!(skipped, vec!["fifo".to_owned(), "sub/evil".to_owned()]);
    assert_eq!((stats.files, stats.dirs), (3, 4));
    assert_eq!(tree(&out), tree(&src));
    // A file alone, onto an existing one: replaced whole.
    std::fs::write(out.join("a.txt"), b"old").unwrap();
    copier
        .copy_out(
            guest.join("sub/b.bin").to_str().unwrap(),
            &out.join("a.txt"),
        )
        .unwrap();
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), binary);
    let leftovers: Vec<_> = tree(&out)
        .into_iter()
        .filter(|(p, _)| p.contains("mvm-cp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Each file went through the audit trail, in and out.
    let events = session.recorder.events();
    assert_eq!(
        count(&events, |e| matches!(
            e,
            SessionEvent::FileWritten { complete: true, .. }
        )),
        3
    );
    // Out: a.txt into the trapped destination (before its `sub` stopped the
    // copy), the three of the tree, and the file alone.
    assert_eq!(
        count(&events, |e| matches!(
            e,
            SessionEvent::FileRead { complete: true, .. }
        )),
        5
    );
    client.shutdown().unwrap();
    session.end();
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("mvm-part"))
        .collect()
}

fn the_ttl_ends_the_session(s: &Setup) {
    let session = start(s, "ttl", Duration::from_secs(1), 1 << 20);
    let outcome = session.end();
    assert_eq!(
        outcome.status,
        WorkloadStatus {
            code: None,
            signal: None,
            timed_out: true
        }
    );
    assert!(matches!(
        session.recorder.events().last(),
        Some(SessionEvent::Stopping { reason }) if reason == "ttl"
    ));
    assert!(UnixStream::connect(&session.socket).is_err());
}

fn a_terminal_has_a_size_that_follows_resizes(s: &Setup) {
    let session = start(s, "tty", Duration::from_secs(60), 1 << 20);
    let client = session.client();
    let request = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "tty; stty size; read line; stty size; echo got-$line".into(),
        ],
        tty: Some(mvm_agent::protocol::TtySize { rows: 24, cols: 80 }),
        ..ExecRequest::default()
    };
    let mut exec = client.exec(&request, Stdin::Stream).unwrap();
    let mut seen = Vec::new();
    let wait_for = |exec: &mut mvm_agent::Exec, seen: &mut Vec<u8>, want: &str| {
        while !String::from_utf8_lossy(seen).contains(want) {
            match exec.next_event().unwrap() {
                Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => seen.extend_from_slice(&d),
                other => panic!(
                    "{other:?} before {want:?}: {}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    };
    wait_for(&mut exec, &mut seen, "24 80");
    assert!(String::from_utf8_lossy(&seen).contains("/dev/pts/"));
    exec.resize(30, 100).unwrap();
    exec.write_stdin(b"x\n").unwrap();
    wait_for(&mut exec, &mut seen, "got-x");
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.contains("30 100"), "{text}");
    // The terminal turns newlines into CR LF, as a terminal does.
    assert!(text.contains("got-x\r\n"), "{text:?}");
    loop {
        if let Some(ExecEvent::Exit(status)) = exec.next_event().unwrap() {
            assert_eq!(status.code, Some(0));
            break;
        }
    }
    // The end of stdin reaches a terminal program as Ctrl-D: `cat` ends.
    let cat = ExecRequest {
        argv: vec!["cat".into()],
        tty: Some(mvm_agent::protocol::TtySize { rows: 5, cols: 5 }),
        ..ExecRequest::default()
    };
    let out = client
        .exec(&cat, Stdin::Bytes(b"hi\n".to_vec()))
        .unwrap()
        .wait_output()
        .unwrap();
    assert_eq!(out.status.code, Some(0));
    client.shutdown().unwrap();
    session.end();
}

/// The guest port the sessions here forward (the agent's "guest" is this host).
const FORWARDED: u16 = 47_811;

fn only_the_plans_ports_are_reached_and_bytes_are_counted(s: &Setup) {
    let session = start(s, "ports", Duration::from_secs(60), 1 << 20);
    let server = std::net::TcpListener::bind(("127.0.0.1", FORWARDED)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut got).unwrap();
        conn.write_all(&got).unwrap();
    });
    let client = session.client();
    let mut tunnel = client.connect_port(FORWARDED).unwrap();
    let writer = tunnel.writer();
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    writer.write(&sent).unwrap();
    writer.close().unwrap();
    let mut back = Vec::new();
    while let Some(data) = tunnel.read().unwrap() {
        back.extend_from_slice(&data);
    }
    assert_eq!(back, sent);
    echo.join().unwrap();
    // A port the plan does not forward is refused by the host side.
    let err = client
        .connect_port(22)
        .err()
        .expect("port 22 is not forwarded");
    assert!(err.to_string().contains("not forwarded"), "{err}");
    client.shutdown().unwrap();
    session.end();
    let events = session.recorder.events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            SessionEvent::ForwardClosed {
                port: FORWARDED,
                to_guest: 200_000,
                from_guest: 200_000,
                ..
            }
        )),
        "{events:#?}"
    );
}

type Case = fn(&Setup);

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        fake_vmm(&role);
    }
    let s = setup();
    std::env::set_var("MVM_RUN_DIR", &s.run_dir);
    let cases: [(&str, Case); 6] = [
        (
            "directories_copy_both_ways_and_no_link_is_followed",
            directories_copy_both_ways_and_no_link_is_followed,
        ),
        (
            "a_terminal_has_a_size_that_follows_resizes",
            a_terminal_has_a_size_that_follows_resizes,
        ),
        (
            "only_the_plans_ports_are_reached_and_bytes_are_counted",
            only_the_plans_ports_are_reached_and_bytes_are_counted,
        ),
        (
            "requests_are_shared_recorded_and_cleaned_up",
            requests_are_shared_recorded_and_cleaned_up,
        ),
        (
            "a_transfer_past_the_limit_is_cut_and_leaves_nothing",
            a_transfer_past_the_limit_is_cut_and_leaves_nothing,
        ),
        ("the_ttl_ends_the_session", the_ttl_ends_the_session),
    ];
    for (name, case) in cases {
        let started = Instant::now();
        case(&s);
        assert_clean(&s.run_dir);
        println!("test {name} ... ok ({:?})", started.elapsed());
    }
    println!("test result: ok. {} passed", cases.len());
}
