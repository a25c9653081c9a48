//! `snapshot/forks-reseeded`: two VMs restored side by side from one snapshot of a
//! booted guest (the default image, `mvm-agent` as PID 1) are made two before
//! anything runs in them again, while the VM they came from runs on.
//!
//! The source VM boots, the case writes a file in it through the agent, and SIGUSR2
//! snapshots it (`--snapshot-continue`: it runs on, its agent connection intact).
//! Both restores then start from that one snapshot (its memory file mapped privately
//! by each), and in each the case reads 32 bytes of `/dev/urandom` (what a workload
//! would get without a reseed), reseeds it through the agent (host entropy, a new
//! sandbox id and hostname, the host's clock), and reads again. After the reseed the
//! two must read different bytes, each must know its own id, and the file written
//! before the snapshot must be in both; the source must still answer on its old
//! connection, with the file and no fork's id.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use mvm_agent::protocol::{ExecRequest, ReseedRequest, Reseeded, AGENT_VSOCK_PORT};
use mvm_agent::transport::connect_hybrid_vsock;
use mvm_agent::{Client, Stdin};
use mvm_loader::dsse::format_public_key;
use serde_json::Value;

use super::seal;
use crate::case::{CaseResult, Context, Failure, VMM};
use crate::vm::{VmLaunch, VmRun};

/// How long each VM may run.
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// Bytes of host entropy each fork gets.
const ENTROPY_BYTES: usize = 64;
/// 32 bytes of the guest's `/dev/urandom`, as hex on one line.
const READ_RANDOM: &str = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
/// What the case writes in the source VM, before the snapshot.
const BEFORE: &str = "written-before-the-snapshot";
/// How far a fork's clock may be from the host's after the reseed, in seconds.
const CLOCK_SLACK_SECS: i64 = 120;

/// The default image's kernel, initramfs and command line.
struct Image {
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
}

fn default_image(ctx: &Context) -> Result<Image, Failure> {
    let images = crate::cases::run::image_store(ctx)?.join("images");
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Failure::new(format!(
            "the default image in {}: {what}: {e}",
            images.display()
        ))
    };
    let name = std::fs::read_to_string(images.join("names").join("default"))
        .map_err(|e| fail("names/default", &e))?;
    let hex = name
        .trim()
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| fail("names/default", &format!("{name:?} is not a digest")))?;
    let dir = images.join(hex);
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .map_err(|e| fail("manifest.json", &e))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| fail("manifest.json", &e))?;
    let field = |path: &[&str]| -> Result<String, Failure> {
        let mut v = &manifest;
        for key in path {
            v = v.get(key).unwrap_or(&Value::Null);
        }
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| fail("manifest.json", &format!("no {}", path.join("."))))
    };
    Ok(Image {
        kernel: dir.join(field(&["kernel", "file"])?),
        initramfs: dir.join(field(&["initramfs", "file"])?),
        cmdline: field(&["cmdline"])?,
    })
}

/// Connects to the agent through the VM's vsock socket, retrying until `deadline`.
fn agent(uds: &Path, deadline: Instant) -> Result<Client, String> {
    let mut last = String::from("the VMM has not made its vsock socket");
    while Instant::now() < deadline {
        if uds.exists() {
            let attempt = connect_hybrid_vsock(uds, AGENT_VSOCK_PORT, Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .and_then(|stream| {
                    Client::connect_with_timeout(stream, Some(Duration::from_secs(20)))
                        .map_err(|e| format!("hello: {e}"))
                })
                .and_then(|client| {
                    client
                        .ping_timeout(Some(Duration::from_secs(20)))
                        .map(|_| client)
                        .map_err(|e| format!("ping: {e}"))
                });
            match attempt {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("the agent never answered: {last}"))
}

/// Runs `script` with `sh -c` in the guest; its stdout, trimmed, if it exits 0.
fn sh(client: &Client, script: &str) -> Result<String, String> {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(60_000),
        ..ExecRequest::default()
    };
    let out = client
        .exec(&request, Stdin::Null)
        .and_then(|exec| exec.wait_output())
        .map_err(|e| format!("{script:?}: {e}"))?;
    if out.status.code != Some(0) {
        return Err(format!(
            "{script:?} ended {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What one fork showed.
struct ForkSaw {
    /// `/dev/urandom` before the reseed.
    before: String,
    /// `/dev/urandom` after it.
    after: String,
    /// The agent's answer to the reseed.
    reseeded: Reseeded,
    /// `/run/mvm/sandbox-id`, `hostname`, the file written before the snapshot and
    /// `date +%s`, one per line.
    identity: Vec<String>,
}

fn host_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Talks to one restored VM: urandom, reseed, urandom, identity; then powers it off.
fn fork_session(uds: &Path, name: &str, deadline: Instant) -> Result<ForkSaw, String> {
    let client = agent(uds, deadline)?;
    let before = sh(&client, READ_RANDOM)?;
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(|e| format!("host entropy: {e}"))?;
    let reseeded = client
        .reseed(&ReseedRequest {
            entropy,
            sandbox_id: name.to_owned(),
            hostname: Some(name.to_owned()),
            unix_time_ns: u64::try_from(host_now().as_nanos()).ok(),
        })
        .map_err(|e| format!("reseed: {e}"))?;
    let after = sh(&client, READ_RANDOM)?;
    let identity = sh(
        &client,
        "cat /run/mvm/sandbox-id; hostname; cat /work/before; date +%s",
    )?;
    if let Err(e) = client.shutdown() {
        return Err(format!("shutdown: {e}"));
    }
    Ok(ForkSaw {
        before,
        after,
        reseeded,
        identity: identity.lines().map(str::to_owned).collect(),
    })
}

fn joined<T>(handle: JoinHandle<T>, what: &str) -> Result<T, Failure> {
    handle
        .join()
        .map_err(|_| Failure::new(format!("the {what} thread panicked")))
}

/// Checks one fork's run and what it saw.
fn check_fork(name: &str, run: &VmRun, saw: Result<ForkSaw, String>) -> Result<ForkSaw, Failure> {
    let saw = saw.map_err(|e| run.fail(format!("{name}: {e}")))?;
    run.expect_exit(0)?;
    let now = i64::try_from(host_now().as_secs()).unwrap_or(0);
    let clock: i64 = saw
        .identity
        .get(3)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let want = [name, name, BEFORE];
    if saw.identity.get(..3) != Some(&want.map(str::to_owned)[..])
        || (clock - now).abs() > CLOCK_SLACK_SECS
    {
        return Err(run.fail(format!(
            "{name}: id, hostname, file and clock {:?} (host clock {now})",
            saw.identity
        )));
    }
    let bits = u32::try_from(ENTROPY_BYTES * 8).unwrap_or(0);
    if saw.reseeded.entropy_bits != bits
        || !saw.reseeded.crng_reseeded
        || saw.reseeded.clock_step_ms.is_none_or(|ms| ms <= 0)
    {
        return Err(run.fail(format!("{name}: the reseed answered {:?}", saw.reseeded)));
    }
    Ok(saw)
}

/// Boot, write a file, snapshot and go on; two restores, each reseeded: they differ,
/// and the source is still itself.
pub(super) fn reseeded(ctx: &Context) -> CaseResult {
    let image = default_image(ctx)?;
    let vmm = ctx.artifact(VMM)?;
    let snap = ctx.work_file("snap");
    std::fs::create_dir(&snap).map_err(|e| Failure::new(format!("snapshot dir: {e}")))?;
    let launch = |label: &str, uds: &Path| {
        VmLaunch::new(vmm.clone(), image.kernel.clone(), &ctx.work)
            .label(label)
            .with_boot_report()
            .timeout(RUN_LIMIT)
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
    };

    // The source VM: ready, a file written, then snapshotted with its connection open;
    // with --snapshot-continue it runs on beside its forks.
    let uds = ctx.work_file("source.vsock");
    let marker = ctx.work_file("snapshot-now");
    let source = launch("source", &uds)
        .initrd(image.initramfs.clone())
        .cmdline(&image.cmdline)
        .arg("--snapshot-dir")
        .arg(&snap)
        .arg("--snapshot-continue")
        .signal_on_file(&marker, libc::SIGUSR2);
    let source_run = std::thread::spawn(move || source.run());
    let deadline = Instant::now() + RUN_LIMIT;
    let client = match agent(&uds, deadline) {
        Ok(client) => client,
        Err(e) => {
            let run = joined(source_run, "source")??;
            return Err(run.fail(format!("the source VM: {e}")));
        }
    };
    if let Err(e) = sh(&client, &format!("echo {BEFORE} > /work/before")) {
        let _ = client.shutdown();
        let run = joined(source_run, "source")??;
        return Err(run.fail(format!("before the snapshot: {e}")));
    }
    std::fs::write(&marker, b"").map_err(|e| Failure::new(format!("marker: {e}")))?;
    let manifest = snap.join("manifest.json");
    while !std::fs::metadata(&manifest).is_ok_and(|m| m.len() > 0) {
        if Instant::now() > deadline || source_run.is_finished() {
            let _ = client.shutdown();
            let run = joined(source_run, "source")??;
            return Err(run.fail("the source VM wrote no snapshot"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let key = SigningKey::from_bytes(&[29; 32]);
    seal(&snap, &key)?;
    let trust = ctx.work_file("seal.pub");
    std::fs::write(&trust, format_public_key(&key.verifying_key()))
        .map_err(|e| Failure::new(format!("trust file: {e}")))?;

    // Both restores at once, from the one snapshot.
    let mut forks = Vec::new();
    for name in ["fork-a", "fork-b"] {
        let uds = ctx.work_file(&format!("{name}.vsock"));
        let restore = launch(name, &uds)
            .restore_from(&snap)
            .arg("--trust")
            .arg(&trust);
        let deadline = Instant::now() + RUN_LIMIT;
        let handle = std::thread::spawn(move || {
            let talker = std::thread::spawn(move || fork_session(&uds, name, deadline));
            let run = restore.run();
            let saw = talker
                .join()
                .unwrap_or_else(|_| Err("the session thread panicked".into()));
            (run, saw)
        });
        forks.push((name, handle));
    }
    let mut saws = Vec::new();
    for (name, handle) in forks {
        let (run, saw) = joined(handle, name)?;
        let run = run?;
        saws.push(check_fork(name, &run, saw)?);
    }
    // The source ran on through all of it, on the connection it had before the
    // snapshot, and was never reseeded: no sandbox id of a fork's.
    let source_saw = sh(
        &client,
        "cat /work/before; cat /run/mvm/sandbox-id 2>/dev/null || echo no-id",
    );
    let _ = client.shutdown();
    let source = joined(source_run, "source")??;
    let source_saw =
        source_saw.map_err(|e| source.fail(format!("the source after the forks: {e}")))?;
    source.expect_exit(0)?;
    if source_saw != format!("{BEFORE}\nno-id") {
        return Err(source.fail(format!("the source after the forks said {source_saw:?}")));
    }
    let [a, b] = saws.as_slice() else {
        return Err(Failure::new("expected two forks"));
    };
    if a.after == b.after || a.after.len() != 64 {
        return Err(Failure::new(format!(
            "after the reseed both forks read {:?} / {:?} from /dev/urandom",
            a.after, b.after
        )));
    }
    println!(
        "    forks| before the reseed the two forks read {} bytes from /dev/urandom \
         ({} / {}); after it, different ones; clocks stepped by {:?} / {:?} ms",
        if a.before == b.before {
            "the same"
        } else {
            "different"
        },
        a.before,
        b.before,
        a.reseeded.clock_step_ms,
        b.reseeded.clock_step_ms
    );
    Ok(())
}
