//! Measures an agent: ping round trip, exec latency, stdout and stdin throughput.
//!
//! ```text
//! cargo run --release -p mvm-agent --example agent_bench -- --unix /tmp/agent.sock
//! agent_bench --vsock-uds /run/vm/vsock.sock [--port 1024] [--pings 1000] [--mib 64]
//!             [--connect-timeout SECS] [--smoke] [--shutdown]
//! ```
//!
//! `--smoke` first checks exec basics (stdout, stderr, exit status, uid, stdin);
//! `--shutdown` asks the agent to power the guest off at the end.
//!
//! Prints one JSON object on stdout (for scripts) and a summary on stderr.

use std::error::Error;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mvm_agent::protocol::{ExecRequest, AGENT_VSOCK_PORT};
use mvm_agent::transport::connect_hybrid_vsock;
use mvm_agent::{Client, ExecEvent, Stdin};

struct Args {
    unix: Option<PathBuf>,
    vsock_uds: Option<PathBuf>,
    port: u32,
    pings: usize,
    mib: usize,
    connect_timeout: u64,
    smoke: bool,
    shutdown: bool,
}

fn parse() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        unix: None,
        vsock_uds: None,
        port: AGENT_VSOCK_PORT,
        pings: 1000,
        mib: 64,
        connect_timeout: 10,
        smoke: false,
        shutdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--unix" => args.unix = Some(value()?.into()),
            "--vsock-uds" => args.vsock_uds = Some(value()?.into()),
            "--port" => args.port = value()?.parse()?,
            "--pings" => args.pings = value()?.parse()?,
            "--mib" => args.mib = value()?.parse()?,
            "--connect-timeout" => args.connect_timeout = value()?.parse()?,
            "--smoke" => args.smoke = true,
            "--shutdown" => args.shutdown = true,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(args)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse()?;
    let started = Instant::now();
    // Retry until the agent listens (a guest may still be booting).
    let deadline = started
        .checked_add(Duration::from_secs(args.connect_timeout))
        .ok_or("--connect-timeout is too large")?;
    let client = loop {
        let attempt: Result<Client, Box<dyn Error>> = match (&args.unix, &args.vsock_uds) {
            (Some(path), None) => UnixStream::connect(path)
                .map_err(Into::into)
                .and_then(|s| Client::connect(s).map_err(Into::into)),
            (None, Some(uds)) => connect_hybrid_vsock(uds, args.port, Duration::from_secs(5))
                .map_err(Into::into)
                .and_then(|s| Client::connect(s).map_err(Into::into)),
            _ => return Err("give exactly one of --unix PATH or --vsock-uds PATH".into()),
        };
        match attempt {
            Ok(client) => break client,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let connect_us = micros(started.elapsed());
    if args.smoke {
        smoke(&client)?;
    }

    let mut rtts: Vec<f64> = Vec::with_capacity(args.pings);
    for _ in 0..args.pings.max(1) {
        let t = Instant::now();
        client.ping()?;
        rtts.push(micros(t.elapsed()));
    }
    rtts.sort_by(f64::total_cmp);
    // The value at `percent` of the sorted samples.
    let pct = |percent: usize| -> f64 {
        let last = rtts.len().saturating_sub(1);
        let at = last.saturating_mul(percent) / 100;
        rtts.get(at.min(last)).copied().unwrap_or(0.0)
    };

    let mut exec_ms: Vec<f64> = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = client
            .exec(
                &ExecRequest {
                    argv: vec!["true".into()],
                    ..ExecRequest::default()
                },
                Stdin::Null,
            )?
            .wait_output()?;
        if out.status.code != Some(0) {
            return Err(format!("true exited {:?}", out.status).into());
        }
        exec_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    exec_ms.sort_by(f64::total_cmp);
    let exec_median = exec_ms.get(exec_ms.len() / 2).copied().unwrap_or(0.0);

    let bytes = args.mib << 20;
    let t = Instant::now();
    let mut exec = client.exec(&sh(&format!("head -c {bytes} /dev/zero")), Stdin::Null)?;
    let mut received = 0usize;
    let mut first_byte_ms = None;
    while let Some(event) = exec.next_event()? {
        if let ExecEvent::Stdout(data) = event {
            first_byte_ms.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
            received += data.len();
        }
    }
    let stdout_s = t.elapsed().as_secs_f64();
    if received != bytes {
        return Err(format!("stdout: got {received} bytes of {bytes}").into());
    }

    let data = vec![0x5au8; bytes];
    let t = Instant::now();
    let out = client
        .exec(&sh("wc -c"), Stdin::Bytes(data))?
        .wait_output()?;
    let stdin_s = t.elapsed().as_secs_f64();
    let counted: usize = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    if counted != bytes {
        return Err(format!("stdin: wc counted {counted} bytes of {bytes}").into());
    }

    let result = serde_json::json!({
        "connect_us": connect_us,
        "ping_us": {"min": pct(0), "median": pct(50), "p99": pct(99), "max": pct(100)},
        "exec_true_ms_median": exec_median,
        "stdout_mib_per_s": args.mib as f64 / stdout_s,
        "stdout_first_byte_ms": first_byte_ms,
        "stdin_mib_per_s": args.mib as f64 / stdin_s,
        "mib": args.mib,
    });
    eprintln!(
        "ping median {:.0} µs (p99 {:.0}), exec true {:.1} ms, stdout {:.0} MiB/s, stdin {:.0} MiB/s",
        pct(50),
        pct(99),
        exec_median,
        args.mib as f64 / stdout_s,
        args.mib as f64 / stdin_s
    );
    println!("{result}");
    if args.shutdown {
        client.shutdown()?;
        eprintln!("shutdown acknowledged");
    }
    Ok(())
}

/// Exec basics, each checked: a failure names what was seen.
fn smoke(client: &Client) -> Result<(), Box<dyn Error>> {
    let hello = client.hello();
    let ready = client.ping()?;
    eprintln!(
        "agent {} (protocol {}.{}), pid1 {}, boot {} ms, up {} ms",
        hello.software, hello.major, hello.minor, ready.pid1, ready.boot_ms, ready.uptime_ms
    );
    let out = client
        .exec(&sh("uname -a; id -u"), Stdin::Null)?
        .wait_output()?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let out = client
        .exec(&sh("echo out; echo err >&2; exit 7"), Stdin::Null)?
        .wait_output()?;
    if out.stdout != b"out\n" || out.stderr != b"err\n" || out.status.code != Some(7) {
        return Err(format!("exec check: {out:?}").into());
    }
    let out = client
        .exec(&sh("cat"), Stdin::Bytes(b"piped".to_vec()))?
        .wait_output()?;
    if out.stdout != b"piped" {
        return Err(format!("stdin check: {out:?}").into());
    }
    let mut timed = sh("sleep 60");
    timed.timeout_ms = Some(1000);
    let out = client.exec(&timed, Stdin::Null)?.wait_output()?;
    if !out.status.timed_out {
        return Err(format!("timeout check: {out:?}").into());
    }
    client.write_file("/tmp/smoke", 0o600, b"file")?;
    if client.read_file("/tmp/smoke")? != b"file" {
        return Err("file round trip differs".into());
    }
    eprintln!("smoke: ok");
    Ok(())
}
