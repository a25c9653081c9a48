//! `net/*`: the virtio-net device and its egress filter on a real tap.
//!
//! Each case builds its own network: a tap for the guest (the gateway side,
//! [`GATEWAY`]), a namespace behind a veth pair holding two "remote hosts"
//! ([`REMOTE`], allowed, and [`OTHER`], not), routed by the machine the cases run on,
//! and the services it needs there (`netserve`). The guest is busybox with a script
//! as `/init` (`netbed`), booted by `mvm-vmm --net tap=..,mac=..,policy=..`; it reports
//! on its console with `NET: <key> ...` lines.
//!
//! `bench/net-*` (run only when named: `scripts/e2e bench/net`) move the same stream
//! with the policy's one exact rule, with an allow-all rule set, and with no check at all
//! (`policy=off`, a `--dev`-only switch), and print MiB/s.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::case::{tail, Case, CaseResult, Context, Failure, KERNEL_ELF};
use crate::netbed::{
    said, write_guest_initramfs, HostTap, Remote, GATEWAY, GUEST_MAC, OTHER, REMOTE,
};
use crate::netserve::{self, pattern_sha256, DNS_ANSWER};
use crate::vm::{VmLaunch, VmRun};

/// The net cases.
pub const CASES: &[Case] = &[
    Case::kvm("net/policy", policy),
    Case::kvm("net/bulk-64mib", bulk_64mib).limit_secs(900),
    Case::kvm("net/runs-leave-nothing", runs_leave_nothing).limit_secs(600),
];

/// The throughput benchmark (not in the default run: `scripts/e2e bench/net`).
pub const BENCH: &[Case] = &[
    Case::kvm("bench/net-policy", bench_policy).limit_secs(900),
    Case::kvm("bench/net-allow-all", bench_allow_all).limit_secs(900),
    Case::kvm("bench/net-off", bench_off).limit_secs(900),
];

/// The allowed echo port.
const ECHO_PORT: u16 = 7007;
/// A port with a listener that the policy does not allow.
const DENIED_PORT: u16 = 7008;
/// The sink (guest to host) and source (host to guest) ports.
const SINK_PORT: u16 = 9000;
const SOURCE_PORT: u16 = 9001;
/// The bulk transfer, each way.
const BULK_BYTES: u64 = 64 << 20;
/// The benchmark's transfer, each way.
const BENCH_BYTES: u64 = 16 << 20;
/// Guest RAM: the bulk stream sits in the guest's tmpfs.
const BULK_MEM_MIB: u32 = 384;
/// How long the bulk guest may run (TCG; 128 MiB through a nested guest).
const BULK_TIMEOUT: Duration = Duration::from_secs(900);

fn io(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

/// The policy file `mvm-vmm --net ..,policy=` reads.
fn write_policy(path: &Path, allow: &str, resolvers: &[&str]) -> Result<(), Failure> {
    let resolvers: Vec<String> = resolvers.iter().map(|r| format!("\"{r}\"")).collect();
    let text = format!(
        "{{\"allow\":[{allow}],\"resolvers\":[{}],\"gateways\":[\"{GATEWAY}\"]}}\n",
        resolvers.join(",")
    );
    std::fs::write(path, text).map_err(io("write the policy"))
}

/// A guest on `tap` running `script`, with the policy file (`None`: `policy=off`, no
/// check) and an events file.
fn guest(
    ctx: &Context,
    tap: &HostTap,
    script: &str,
    policy: Option<&Path>,
) -> Result<VmLaunch, Failure> {
    let policy = policy.map_or_else(|| "off".to_owned(), |p| p.display().to_string());
    let initrd = ctx.work_file("net-guest.cpio");
    let stage = ctx.work_file("net-guest");
    write_guest_initramfs(&ctx.artifact("mvm")?, &stage, &initrd, script)?;
    Ok(VmLaunch::new(
        ctx.artifact(crate::case::VMM)?,
        ctx.artifact(KERNEL_ELF)?,
        &ctx.work,
    )
    .initrd(initrd)
    .cmdline("console=ttyS0 quiet panic=-1 reboot=k")
    .arg("--net")
    .arg(format!(
        "tap={},mac={GUEST_MAC},policy={policy}",
        tap.name()
    ))
    .arg("--events")
    .arg(ctx.work_file("events.jsonl"))
    .with_boot_report())
}

/// A counter of the net device from the run's boot report (`"net"`, written as the VMM
/// exits).
fn net_counter(run: &VmRun, name: &str) -> Result<u64, Failure> {
    let report = match run.boot_report.as_ref() {
        Some(Ok(report)) => report,
        Some(Err(e)) => return Err(run.fail(format!("boot report: {e}"))),
        None => return Err(run.fail("no boot report")),
    };
    report
        .field("net")
        .and_then(|net| net.get(name))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            run.fail(format!("the boot report has no net.{name}"))
                .with_detail(report.to_line())
        })
}

/// The guest's `NET: <key>` line, or a failure with the console attached.
fn line<'a>(run: &'a VmRun, key: &str) -> Result<&'a str, Failure> {
    said(&run.console, key)
        .ok_or_else(|| run.fail(format!("the guest printed no 'NET: {key}' line")))
}

/// `egress_dropped` events naming `destination`.
fn drops_to(events: &str, destination: &str) -> usize {
    events
        .lines()
        .filter(|l| l.contains("\"egress_dropped\"") && l.contains(&format!("\"{destination}")))
        .count()
}

fn policy(ctx: &Context) -> CaseResult {
    let tap = HostTap::create("e2et-pol")?;
    let remote = Remote::create("e2en-pol", "e2ev-pol")?;
    let (echo, denied_port, dns_ok, dns_other) = remote.within(|| {
        Ok((
            netserve::echo(netserve::listen(([0, 0, 0, 0], ECHO_PORT).into())?)?,
            netserve::echo(netserve::listen(([0, 0, 0, 0], DENIED_PORT).into())?)?,
            netserve::dns(UdpSocket::bind((REMOTE, 53))?)?,
            netserve::dns(UdpSocket::bind((OTHER, 53))?)?,
        ))
    })?;
    let policy_file = ctx.work_file("policy.json");
    write_policy(
        &policy_file,
        &format!("{{\"host\":\"{REMOTE}\",\"port\":{ECHO_PORT},\"protocol\":\"tcp\"}}"),
        &[REMOTE],
    )?;
    let script = format!(
        "{prelude}
r=$(echo hello-from-guest | timeout 30 nc {REMOTE} {ECHO_PORT} 2>&1); say \"allowed [$r]\"
r=$(echo x | timeout 8 nc -w 6 {REMOTE} {DENIED_PORT} 2>&1); say \"denied-port [$r]\"
r=$(echo x | timeout 8 nc -w 6 {OTHER} {ECHO_PORT} 2>&1); say \"denied-host [$r]\"
r=$(timeout 20 nslookup svc.test {REMOTE} 2>&1 | tr '\\n' ' '); say \"dns-allowed [$r]\"
r=$(timeout 10 nslookup svc.test {OTHER} 2>&1 | tr '\\n' ' '); say \"dns-other [$r]\"
",
        prelude = crate::netbed::guest_prelude()
    );
    let run = guest(ctx, &tap, &script, Some(&policy_file))?.run()?;
    run.expect_exit(0)?;
    let events = std::fs::read_to_string(ctx.work_file("events.jsonl")).unwrap_or_default();
    let evidence = || tail("events", &events, 20);

    let allowed = line(&run, "allowed")?;
    if allowed != "[echo: hello-from-guest]" {
        return Err(run.fail(format!(
            "the allowed service's answer was {allowed}, not [echo: hello-from-guest]"
        )));
    }
    let echoed = echo.seen_at(REMOTE);
    if echoed.len() != 1 {
        return Err(run.fail(format!(
            "the allowed service saw {} connections, expected 1",
            echoed.len()
        )));
    }
    for (what, key, server_seen, destination) in [
        (
            "a disallowed port on the allowed host",
            "denied-port",
            denied_port.seen().len(),
            format!("{REMOTE}:{DENIED_PORT}/tcp"),
        ),
        (
            "a disallowed host",
            "denied-host",
            echo.seen_at(OTHER).len(),
            format!("{OTHER}:{ECHO_PORT}/tcp"),
        ),
    ] {
        let said = line(&run, key)?;
        if said.contains("echo:") {
            return Err(run.fail(format!("{what} answered the guest: {said}")));
        }
        if server_seen != 0 {
            return Err(run.fail(format!(
                "{what}: its server saw {server_seen} connections, expected none"
            )));
        }
        if drops_to(&events, &destination) != 1 {
            return Err(run
                .fail(format!(
                    "{what}: expected one egress_dropped event for {destination}"
                ))
                .with_detail(evidence()));
        }
    }
    let answer = DNS_ANSWER.to_string();
    let dns_allowed = line(&run, "dns-allowed")?;
    if !dns_allowed.contains(&answer) || dns_ok.seen().is_empty() {
        return Err(run.fail(format!(
            "DNS to the allowed resolver: guest saw {dns_allowed}, resolver got {} queries",
            dns_ok.seen().len()
        )));
    }
    let dns_denied = line(&run, "dns-other")?;
    if dns_denied.contains(&answer) || !dns_other.seen().is_empty() {
        return Err(run.fail(format!(
            "DNS to another resolver passed: guest saw {dns_denied}, resolver got {} queries",
            dns_other.seen().len()
        )));
    }
    if drops_to(&events, &format!("{OTHER}:53/udp")) != 1 {
        return Err(run
            .fail(format!(
                "expected one egress_dropped event for {OTHER}:53/udp"
            ))
            .with_detail(evidence()));
    }
    // The device counted what it dropped: at least one frame for each of the three
    // denied destinations, and it passed the allowed traffic.
    let denied = net_counter(&run, "tx_denied")?;
    if denied < 3 {
        return Err(run.fail(format!(
            "the device counted {denied} denied frames; three destinations were denied"
        )));
    }
    if net_counter(&run, "tx_frames")? == 0 {
        return Err(run.fail("the device counted no passed frames"));
    }
    drop((echo, denied_port, dns_ok, dns_other, remote, tap));
    Ok(())
}

/// What one bulk exchange measured.
struct Bulk {
    down_mib_s: f64,
    up_mib_s: f64,
}

/// Moves `bytes` host to guest (the source), then the same bytes guest to host (the
/// sink); checks the sha256 at both ends of both directions.
/// `allow` is the policy's rules; `None` runs the device with no check (`policy=off`).
fn bulk(ctx: &Context, bytes: u64, allow: Option<&str>, label: &str) -> Result<Bulk, Failure> {
    let tap = HostTap::create(&format!("e2et-{label}"))?;
    let remote = Remote::create(&format!("e2en-{label}"), &format!("e2ev-{label}"))?;
    let (source, sink) = remote.within(|| {
        Ok((
            netserve::source(netserve::listen(([0, 0, 0, 0], SOURCE_PORT).into())?, bytes)?,
            netserve::sink(netserve::listen(([0, 0, 0, 0], SINK_PORT).into())?)?,
        ))
    })?;
    let policy_file = ctx.work_file("policy.json");
    if let Some(allow) = allow {
        write_policy(&policy_file, allow, &[])?;
    }
    let script = format!(
        "{prelude}
timeout 800 nc {REMOTE} {SOURCE_PORT} </dev/null > /tmp/blob
say \"down $(wc -c < /tmp/blob) $(sha256sum < /tmp/blob | cut -d' ' -f1)\"
r=$(timeout 800 nc {REMOTE} {SINK_PORT} < /tmp/blob); say \"up [$r]\"
",
        prelude = crate::netbed::guest_prelude()
    );
    let run = guest(ctx, &tap, &script, allow.map(|_| policy_file.as_path()))?
        .mem_mib(BULK_MEM_MIB)
        .timeout(BULK_TIMEOUT)
        .run()?;
    run.expect_exit(0)?;
    let want = pattern_sha256(bytes);
    let sent = source.seen_at(REMOTE);
    let Some(sent) = sent.first() else {
        return Err(run.fail("the source served no connection"));
    };
    if sent.bytes_out != bytes || sent.sha256 != want {
        return Err(run.fail(format!(
            "the source sent {} bytes sha256 {}, expected {bytes} bytes sha256 {want}",
            sent.bytes_out, sent.sha256
        )));
    }
    let down = line(&run, "down")?;
    if down != format!("{bytes} {want}") {
        return Err(run.fail(format!(
            "host to guest: the guest got '{down}', expected '{bytes} {want}'"
        )));
    }
    let received = sink.seen_at(REMOTE);
    let Some(received) = received.first() else {
        return Err(run.fail("the sink served no connection"));
    };
    if received.bytes_in != bytes || received.sha256 != want {
        return Err(run.fail(format!(
            "guest to host: the sink got {} bytes sha256 {}, expected {bytes} bytes sha256 {want}",
            received.bytes_in, received.sha256
        )));
    }
    let up = line(&run, "up")?;
    if up != format!("[{want} {bytes}]") {
        return Err(run.fail(format!("guest to host: the guest heard back '{up}'")));
    }
    let mib = bytes as f64 / f64::from(1u32 << 20);
    let rate = |d: Duration| mib / d.as_secs_f64().max(1e-3);
    let result = Bulk {
        down_mib_s: rate(sent.elapsed),
        up_mib_s: rate(received.elapsed),
    };
    println!(
        "  {label}: {mib:.0} MiB host->guest {:.2} MiB/s ({:.1}s), guest->host {:.2} MiB/s ({:.1}s)",
        result.down_mib_s,
        sent.elapsed.as_secs_f64(),
        result.up_mib_s,
        received.elapsed.as_secs_f64()
    );
    drop((source, sink, remote, tap));
    Ok(result)
}

fn exact_rule() -> String {
    format!(
        "{{\"host\":\"{REMOTE}\",\"port\":{SINK_PORT},\"last_port\":{SOURCE_PORT},\"protocol\":\"tcp\"}}"
    )
}

fn bulk_64mib(ctx: &Context) -> CaseResult {
    bulk(ctx, BULK_BYTES, Some(&exact_rule()), "bulk").map(|_| ())
}

fn bench_policy(ctx: &Context) -> CaseResult {
    bulk(ctx, BENCH_BYTES, Some(&exact_rule()), "bpol").map(|_| ())
}

/// Every TCP and UDP port on every IPv4 address: the check still runs on each frame,
/// but nothing is refused.
fn bench_allow_all(ctx: &Context) -> CaseResult {
    let all = "{\"host\":\"0.0.0.0/0\",\"port\":1,\"last_port\":65535,\"protocol\":\"tcp\"},\
               {\"host\":\"0.0.0.0/0\",\"port\":1,\"last_port\":65535,\"protocol\":\"udp\"}";
    bulk(ctx, BENCH_BYTES, Some(all), "ball").map(|_| ())
}

/// No egress check at all (`policy=off`): the device's cost without the policy.
fn bench_off(ctx: &Context) -> CaseResult {
    bulk(ctx, BENCH_BYTES, None, "boff").map(|_| ())
}

/// `mvm run --net` invocations in the runs case.
const RUNS: usize = 20;
/// The run whose VMM is killed with SIGKILL (1-based).
const KILLED_RUN: usize = 10;
/// How long one `mvm run` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Taps `mvm run --net` made (`mvm<pid>-<n>`), as `ip -o link` lists them.
fn mvm_taps() -> Result<Vec<String>, Failure> {
    let out = crate::netbed::ip(&["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| {
            name.strip_prefix("mvm")
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_digit())
        })
        .collect())
}

/// nftables tables `mvm run --net` made (`mvm-<tap>`), and how many rules the whole
/// ruleset holds in them.
fn mvm_tables() -> Result<Vec<String>, Failure> {
    let out = crate::netbed::run("nft", &["list", "tables"])?;
    Ok(out
        .lines()
        .filter(|l| l.contains(" mvm"))
        .map(|l| l.trim().to_owned())
        .collect())
}

/// Processes whose parent chain reaches `ancestor` and whose name is `comm`.
fn descendants_named(ancestor: u32, comm: &str) -> Vec<u32> {
    let stat = |pid: u32| -> Option<(String, u32)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let name = text.get(open + 1..close)?.to_owned();
        let ppid = text.get(close + 2..)?.split(' ').nth(1)?.parse().ok()?;
        Some((name, ppid))
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((name, mut parent)) = stat(pid) else {
            continue;
        };
        if name != comm {
            continue;
        }
        for _ in 0..16 {
            if parent == ancestor {
                out.push(pid);
                break;
            }
            match stat(parent) {
                Some((_, p)) if parent > 1 => parent = p,
                _ => break,
            }
        }
    }
    out
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<i32>, Failure> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code()),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::new(format!(
                    "mvm run still running after {}s",
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(Failure::new(format!("wait for mvm: {e}"))),
        }
    }
}

/// 20 `mvm run --net` invocations (the first reaches an allowed service through the
/// network `mvm run` set up; one has its VMM killed with SIGKILL) leave no tap and no
/// nftables table behind.
fn runs_leave_nothing(ctx: &Context) -> CaseResult {
    let remote = Remote::create("e2en-runs", "e2ev-runs")?;
    let echo =
        remote.within(|| netserve::echo(netserve::listen(([0, 0, 0, 0], ECHO_PORT).into())?))?;
    let before = (mvm_taps()?, mvm_tables()?);
    if !before.0.is_empty() || !before.1.is_empty() {
        return Err(Failure::new(format!(
            "leftovers before the first run: taps {:?}, tables {:?}",
            before.0, before.1
        )));
    }
    let data = crate::cases::run::image_store(ctx)?;
    let config = ctx.work_file("config");
    // The admission policy (docs/policy.md) denies all egress unless it lists it.
    std::fs::create_dir_all(&config).map_err(io("create the config directory"))?;
    std::fs::write(
        config.join("policy.toml"),
        format!("[egress]\nallow = [\"{REMOTE}:{ECHO_PORT}\"]\n"),
    )
    .map_err(io("write policy.toml"))?;
    let allow = format!("{REMOTE}:{ECHO_PORT}");
    for i in 1..=RUNS {
        let guest_cmd = if i == 1 {
            format!("echo run-{i} | nc {REMOTE} {ECHO_PORT}")
        } else if i == KILLED_RUN {
            "sleep 600".to_owned()
        } else {
            "true".to_owned()
        };
        let mut command = crate::cases::run::mvm_with(ctx, &data, &config)?;
        command
            .arg("run")
            .args(["--backend", "kvm", "--net", "--allow", &allow, "--"])
            .args(["sh", "-c", &guest_cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if i == KILLED_RUN {
            let mut child = command
                .spawn()
                .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
            let mvm_pid = child.id();
            let start = Instant::now();
            let killed = loop {
                let taps = mvm_taps()?;
                let vmms = descendants_named(mvm_pid, "mvm-vmm");
                if !vmms.is_empty() && taps.iter().any(|t| t.starts_with(&format!("mvm{mvm_pid}")))
                {
                    for pid in &vmms {
                        // SAFETY: kill(2) with a pid and a signal number; no memory.
                        unsafe { libc::kill(i32::try_from(*pid).unwrap_or(-1), libc::SIGKILL) };
                    }
                    break vmms;
                }
                if start.elapsed() > RUN_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Failure::new(format!(
                        "run {i}: no mvm-vmm with its tap within {}s (taps {taps:?})",
                        RUN_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let code = wait_with_timeout(&mut child, RUN_TIMEOUT)?;
            if code == Some(0) {
                return Err(Failure::new(format!(
                    "run {i}: mvm run exited 0 after its VMM {killed:?} was killed"
                )));
            }
            continue;
        }
        let out = command
            .output()
            .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(0) {
            return Err(Failure::new(format!(
                "run {i} ({guest_cmd}): mvm run exited {:?}",
                out.status.code()
            ))
            .with_detail(format!(
                "{}{}",
                tail("stdout", &stdout, 10),
                tail("stderr", &String::from_utf8_lossy(&out.stderr), 20)
            )));
        }
        if i == 1 && !stdout.contains("echo: run-1") {
            return Err(Failure::new(format!(
                "run 1: the allowed service's answer is missing from stdout {stdout:?}"
            )));
        }
    }
    if echo.seen_at(REMOTE).len() != 1 {
        return Err(Failure::new(format!(
            "the echo service saw {} connections, expected 1",
            echo.seen_at(REMOTE).len()
        )));
    }
    let after = (mvm_taps()?, mvm_tables()?);
    if !after.0.is_empty() || !after.1.is_empty() {
        return Err(Failure::new(format!(
            "after {RUNS} runs (run {KILLED_RUN} killed): taps {:?}, nftables tables {:?} left",
            after.0, after.1
        )));
    }
    drop((echo, remote));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_matched_by_whole_destination() {
        let events = concat!(
            r#"{"event":"egress_dropped","fields":{"destination":"10.99.0.3:7007/tcp"}}"#,
            "\n",
            r#"{"event":"egress_dropped","fields":{"destination":"10.99.0.2:7008/tcp"}}"#,
            "\n",
            r#"{"event":"vm_exit","fields":{}}"#,
            "\n"
        );
        assert_eq!(drops_to(events, "10.99.0.3:7007/tcp"), 1);
        assert_eq!(drops_to(events, "10.99.0.2:7007/tcp"), 0);
        assert_eq!(drops_to(events, "10.99.0.3:53/udp"), 0);
    }

    #[test]
    fn policy_file_names_rules_resolvers_and_gateway() {
        let dir = std::env::temp_dir().join(format!("mvm-net-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.json");
        write_policy(&p, &exact_rule(), &[REMOTE]).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["allow"][0]["last_port"], SOURCE_PORT);
        assert_eq!(v["resolvers"][0], REMOTE);
        assert_eq!(v["gateways"][0], GATEWAY);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
