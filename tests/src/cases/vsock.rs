//! `vsock/*`: the virtio-vsock device moves bulk data intact, both ways, on a
//! host-initiated (`CONNECT <port>` through the VM's Unix socket) and a
//! guest-initiated (to `<uds>_<port>`) connection.

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::case::{Case, CaseResult, Context, Failure, KERNEL_ELF};
use crate::guest::vsock::{
    check_pattern, send_pattern, GUEST_PORT, HOST_PORT, SEED_GUEST_OUT, SEED_GUEST_TO_HOST,
    SEED_HOST_BACK, SEED_HOST_TO_GUEST, TRANSFER_BYTES, VSOCK_OK,
};

/// The vsock cases.
pub const CASES: &[Case] = &[Case::kvm("vsock/bulk-both-ways", bulk_both_ways)];

/// The guest's CID in these cases.
const GUEST_CID: u32 = 3;
/// How long the whole exchange may take under TCG (64 MiB in all).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(600);

/// When each step of the exchange finished, for the log and for failures.
#[derive(Clone)]
struct Timeline {
    start: Instant,
    steps: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            steps: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn mark(&self, what: &str) {
        let line = format!("{:7.1}s {what}", self.start.elapsed().as_secs_f64());
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(line);
        }
    }

    fn render(&self) -> String {
        self.steps.lock().map(|s| s.join("\n")).unwrap_or_default()
    }
}

/// The host-initiated half: connect, `CONNECT`, wait for `OK`, retrying while
/// the guest is not listening yet (the device closes the socket on its RST).
fn host_initiated(uds: PathBuf, deadline: Instant, t: Timeline) -> Result<String, String> {
    let (mut stream, ok) = loop {
        if Instant::now() > deadline {
            return Err("the guest never accepted CONNECT".into());
        }
        let Ok(mut s) = UnixStream::connect(&uds) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        if s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .is_err()
        {
            continue;
        }
        let mut line = String::new();
        let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.starts_with("OK ") => {
                // The OK line is all the device sends before guest data, and the
                // guest sends nothing before it has read everything: the reader
                // holds no extra bytes.
                break (s, line);
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    t.mark("host-initiated: OK received");
    send_pattern(&mut stream, SEED_HOST_TO_GUEST, TRANSFER_BYTES)
        .map_err(|e| format!("host-initiated send: {e}"))?;
    t.mark("host-initiated: host sent 16 MiB");
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    check_pattern(&mut stream, SEED_GUEST_TO_HOST, TRANSFER_BYTES)
        .map_err(|e| format!("host-initiated receive: {e}"))?;
    t.mark("host-initiated: host received 16 MiB");
    Ok(ok.trim_end().to_owned())
}

/// The guest-initiated half: accept on `<uds>_<HOST_PORT>`, check, answer.
fn guest_initiated(listener: UnixListener, deadline: Instant, t: Timeline) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected to the host".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    t.mark("guest-initiated: accepted");
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    check_pattern(&mut stream, SEED_GUEST_OUT, TRANSFER_BYTES)
        .map_err(|e| format!("guest-initiated receive: {e}"))?;
    t.mark("guest-initiated: host received 16 MiB");
    send_pattern(&mut stream, SEED_HOST_BACK, TRANSFER_BYTES)
        .map_err(|e| format!("guest-initiated send: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    t.mark("guest-initiated: host sent 16 MiB");
    Ok(())
}

fn joined<T>(h: JoinHandle<Result<T, String>>, what: &str) -> Result<T, Failure> {
    h.join()
        .map_err(|_| Failure::new(format!("{what} thread panicked")))?
        .map_err(|e| Failure::new(format!("{what}: {e}")))
}

/// The socket for guest connections to host port `port`.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// 16 MiB each way on a host-initiated and on a guest-initiated connection.
fn bulk_both_ways(ctx: &Context) -> CaseResult {
    let uds = ctx.work_file("v.sock");
    let listener = UnixListener::bind(port_path(&uds, HOST_PORT))
        .map_err(|e| Failure::new(format!("bind host listener: {e}")))?;
    // The jailed VMM connects as its unprivileged uid (docs/jail.md): it needs write access.
    std::fs::set_permissions(
        port_path(&uds, HOST_PORT),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .map_err(|e| Failure::new(format!("chmod host listener: {e}")))?;
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let t = Timeline::new();
    let host = {
        let (uds, t) = (uds.clone(), t.clone());
        std::thread::spawn(move || host_initiated(uds, deadline, t))
    };
    let guest = {
        let t = t.clone();
        std::thread::spawn(move || guest_initiated(listener, deadline, t))
    };
    let run = ctx
        .test_guest(KERNEL_ELF, "vsock")?
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()))
        .timeout(EXCHANGE_TIMEOUT)
        .run()?;
    t.mark("mvm-vmm exited");
    let evidence = || format!("{}\n{}", t.render(), run.evidence());
    let ok_line = joined(host, "host-initiated").map_err(|f| f.with_detail(evidence()))?;
    joined(guest, "guest-initiated").map_err(|f| f.with_detail(evidence()))?;
    let with_steps = |f: Failure| {
        let detail = format!("{}\n{}", t.render(), f.detail);
        f.with_detail(detail)
    };
    run.expect_exit(0).map_err(with_steps)?;
    run.expect_console(VSOCK_OK).map_err(with_steps)?;
    if !ok_line.starts_with("OK ") {
        return Err(run.fail(format!("CONNECT answered {ok_line:?}")));
    }
    if uds.exists() {
        return Err(run.fail(format!("{} left behind after exit", uds.display())));
    }
    for line in t.render().lines() {
        println!("    vsock| {line}");
    }
    println!(
        "    vsock| 4 x {} MiB intact (TCG: function, not performance)",
        TRANSFER_BYTES >> 20
    );
    Ok(())
}
