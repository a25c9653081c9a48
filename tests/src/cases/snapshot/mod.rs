//! `snapshot/*`: a Linux guest snapshotted and restored by `mvm-vmm` on a real KVM.
//!
//! The guest (`mvm-test-init` in its `snapshot` mode) counts, doing a virtio-blk write
//! and read each count, and answers on vsock. The VMM is jailed and filtered as always,
//! with a read-write disk and a vsock device; SIGUSR2 at the fifth count writes the
//! snapshot and ends it. The case seals the manifest as the runtime will (a key the
//! restore is told to trust), restores it with the same devices, and reads the console:
//! the count must go on from the next number with every disk round intact, and a new
//! vsock connection must be answered with the count and the file written before the
//! snapshot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mvm_loader::dsse::{format_public_key, Envelope};

use crate::case::{Case, CaseResult, Context, Failure, KERNEL_ELF};
use crate::guest::snapshot::{FILE_TEXT, PORT, SAY_ANSWERED, SAY_COUNT, SAY_DISK_ERROR};
use crate::vm::VmRun;

mod forks;
pub(crate) mod warm;

/// The snapshot cases.
pub const CASES: &[Case] = &[
    Case::kvm("snapshot/linux-guest", linux_guest).limit_secs(480),
    Case::kvm("snapshot/forks-reseeded", forks::reseeded).limit_secs(480),
    Case::kvm("run/warm-start", warm::warm_start).limit_secs(600),
];

/// The count at which the first VM is snapshotted.
const SNAPSHOT_AT: u64 = 5;
/// How many more the restored VM must count.
const MORE: u64 = 5;
/// How long each VM may run.
const RUN_LIMIT: Duration = Duration::from_secs(200);
/// The snapshot's payload type and files (`vmm/src/snapshot`).
const PAYLOAD_TYPE: &str = "application/vnd.mvm.snapshot+json";
const UNSIGNED: &str = "manifest.json";
const SEALED: &str = "snapshot.dsse.json";

/// The counts the console says, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split(SAY_COUNT).nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Seals the unsigned manifest in `snap` with `key`, as the runtime does.
pub(super) fn seal(snap: &Path, key: &SigningKey) -> Result<(), Failure> {
    let manifest = std::fs::read(snap.join(UNSIGNED))
        .map_err(|e| Failure::new(format!("read {UNSIGNED}: {e}")))?;
    if manifest.is_empty() {
        return Err(Failure::new(
            "the VMM wrote no manifest: no snapshot was taken",
        ));
    }
    let envelope = Envelope::sign(PAYLOAD_TYPE, &manifest, key);
    std::fs::write(snap.join(SEALED), envelope.to_json())
        .map_err(|e| Failure::new(format!("write {SEALED}: {e}")))
}

/// Asks the guest over vsock (`CONNECT <PORT>` through the VM's socket), retrying until
/// `deadline`: its answer line.
fn ask(uds: PathBuf, deadline: Instant) -> Result<String, String> {
    let mut last = String::from("never connected");
    while Instant::now() < deadline {
        let attempt = (|| -> Result<String, String> {
            let mut s = UnixStream::connect(&uds).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {PORT}\n").as_bytes())
                .map_err(|e| format!("CONNECT: {e}"))?;
            let mut reader = BufReader::new(s);
            let mut ok = String::new();
            reader
                .read_line(&mut ok)
                .map_err(|e| format!("OK line: {e}"))?;
            if !ok.starts_with("OK ") {
                return Err(format!("CONNECT answered {ok:?}"));
            }
            let mut answer = String::new();
            reader
                .read_line(&mut answer)
                .map_err(|e| format!("answer: {e}"))?;
            if answer.is_empty() {
                return Err("the guest closed without answering".into());
            }
            Ok(answer.trim_end().to_owned())
        })();
        match attempt {
            Ok(answer) => return Ok(answer),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

pub(super) fn check_report(run: &VmRun, want: &str) -> CaseResult {
    let report = run.report()?;
    if report.exit_reason() != Some(want) {
        return Err(run.fail(format!(
            "exit reason {:?}, expected {want}",
            report.exit_reason()
        )));
    }
    Ok(())
}

/// Boot, count to five, snapshot; seal; restore: the count, the disk and vsock go on.
fn linux_guest(ctx: &Context) -> CaseResult {
    let disk = ctx.work_file("disk.img");
    let file = std::fs::File::create(&disk).map_err(|e| Failure::new(format!("disk: {e}")))?;
    file.set_len(1 << 20)
        .map_err(|e| Failure::new(format!("disk: {e}")))?;
    let uds = ctx.work_file("v.sock");
    let snap = ctx.work_file("snap");
    std::fs::create_dir(&snap).map_err(|e| Failure::new(format!("snapshot dir: {e}")))?;
    let devices = |launch: crate::vm::VmLaunch| {
        launch
            .arg("--disk")
            .arg(format!("path={},rw", disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
    };

    let first = devices(ctx.test_guest(KERNEL_ELF, "snapshot")?)
        .arg("--snapshot-dir")
        .arg(&snap)
        .label("boot")
        .with_boot_report()
        .time_to_console(&format!("{SAY_COUNT}1"))
        .timeout(RUN_LIMIT)
        .signal_on_console(&format!("{SAY_COUNT}{SNAPSHOT_AT}"), libc::SIGUSR2)
        .run()?;
    first.expect_exit(0)?;
    check_report(&first, "snapshotted")?;
    let before = counts(&first.console);
    let last = before.last().copied().unwrap_or(0);
    let expected: Vec<u64> = (1..=last).collect();
    if last < SNAPSHOT_AT || before != expected {
        return Err(first.fail(format!("counted {before:?} before the snapshot")));
    }

    let key = SigningKey::from_bytes(&[23; 32]);
    seal(&snap, &key)?;
    let trust = ctx.work_file("seal.pub");
    std::fs::write(&trust, format_public_key(&key.verifying_key()))
        .map_err(|e| Failure::new(format!("trust file: {e}")))?;

    let target = last + MORE;
    let restore = devices(ctx.test_guest(KERNEL_ELF, "snapshot")?)
        .restore_from(&snap)
        .arg("--trust")
        .arg(&trust)
        .label("restored")
        .with_boot_report()
        .timeout(RUN_LIMIT)
        .time_to_console(&format!("{SAY_COUNT}{}", last + 1))
        .signal_on_console(SAY_ANSWERED, libc::SIGTERM);
    // Once the restored guest has counted MORE, ask it over vsock; its answer is what
    // ends the run.
    let asker = {
        let (uds, console) = (uds.clone(), restore.console_path());
        let needle = format!("{SAY_COUNT}{target}");
        let deadline = Instant::now() + RUN_LIMIT;
        std::thread::spawn(move || {
            while !std::fs::read_to_string(&console).is_ok_and(|t| t.contains(&needle)) {
                if Instant::now() > deadline {
                    return Err(format!("the restored guest never counted to {target}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            ask(uds, deadline)
        })
    };
    let restored = restore.run()?;
    let answer = asker
        .join()
        .map_err(|_| Failure::new("the vsock thread panicked"))?;
    restored.expect_exit(128 + libc::SIGTERM)?;
    if restored.console.contains(SAY_DISK_ERROR) {
        return Err(restored.fail("a disk round failed after the restore"));
    }
    let after = counts(&restored.console);
    let want: Vec<u64> = (last + 1..=last + after.len() as u64).collect();
    if after.len() < usize::try_from(MORE).unwrap_or(5) || after != want {
        return Err(restored.fail(format!(
            "after the snapshot at {last} the restored guest counted {after:?}"
        )));
    }
    let answer = answer.map_err(|e| restored.fail(format!("vsock after the restore: {e}")))?;
    let count: u64 = answer
        .strip_prefix("count=")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if count <= last || !answer.ends_with(&format!("file={FILE_TEXT}")) {
        return Err(restored.fail(format!(
            "vsock answer {answer:?} (the snapshot was at {last})"
        )));
    }
    println!(
        "    snapshot| counted 1..{last}, snapshot, restored, counted to {}; vsock: {answer}",
        last + after.len() as u64
    );
    if let Ok(report) = restored.report() {
        let phases: Vec<String> = [
            "args_parsed",
            "artifacts_measured",
            "vm_created",
            "vcpus_ready",
            "first_kvm_run",
            "first_serial_byte",
        ]
        .iter()
        .filter_map(|p| {
            report
                .micros(p)
                .map(|us| format!("{p} {:.3} s", us as f64 / 1e6))
        })
        .collect();
        println!("    snapshot| the restore's report: {}", phases.join(", "));
    }
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!(
        "    snapshot| VMM start to the first count: boot {:.2} s, restore {:.2} s (the count \
         ticks every {} ms; TCG: function, not performance)",
        secs(first.console_at),
        secs(restored.console_at),
        crate::guest::snapshot::TICK_MS
    );
    Ok(())
}
