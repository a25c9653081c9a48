//! `hostile/*`: the guest attacks the device model. Its init unbinds a
//! virtio-mmio device, drives the registers through `/dev/mem` and builds broken rings in
//! its own pages (`guest/hostile/`). Each boot runs many scenarios; the guest prints one
//! PASS or FAIL line per scenario after checking the device's answer, its own canaries and
//! a bystander disk. Here the host checks that every scenario passed, that the VMM stayed
//! up and exited cleanly, that the attacked disk files hold exactly what the one valid
//! write could produce, and that the attacked device worked again under its Linux driver.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::case::{check, Case, CaseResult, Context, Failure, KERNEL_ELF};
use crate::guest::blk::fill_pattern;
use crate::guest::hostile::vsock::{
    HOST_BYTES, HOST_SEED, PORT_DATA, PORT_RECOVER, PORT_SINK, RECOVER_ANSWER, RECOVER_HELLO,
};
use crate::guest::hostile::{
    blk, transport, vsock, Scenario, BYSTANDER_ID, BYSTANDER_SEED, DISK_BYTES, RO_ID, RO_SEED,
    RW_ID, RW_SEED, SAY_DONE, SAY_FAIL, SAY_PASS, SAY_RECOVERED, VALID_SECTOR, VALID_SEED,
};
use crate::vm::VmRun;

/// The hostile cases.
pub const CASES: &[Case] = &[
    Case::kvm("hostile/blk", hostile_blk).limit_secs(450),
    Case::kvm("hostile/vsock", hostile_vsock),
];

/// Under TCG one boot plus ~40 scenarios (one of them 65 664 requests).
const TIMEOUT: Duration = Duration::from_secs(600);
/// The guest's CID.
const GUEST_CID: u32 = 3;

fn disk_with_pattern(ctx: &Context, name: &str, seed: u8) -> Result<PathBuf, Failure> {
    let path = ctx.work_file(name);
    let mut bytes = vec![0u8; usize::try_from(DISK_BYTES).unwrap_or(0)];
    fill_pattern(seed, 0, &mut bytes);
    std::fs::write(&path, &bytes)
        .map_err(|e| Failure::new(format!("write {}: {e}", path.display())))?;
    Ok(path)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::new(format!("read {}: {e}", path.display())))
}

/// Every scenario in `names` has a PASS line, none a FAIL line, and the guest finished.
fn check_scenarios<B>(run: &VmRun, names: &[Scenario<B>]) -> CaseResult {
    let failed: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.contains(SAY_FAIL) || l.contains("hostile recovery failed"))
        .collect();
    if !failed.is_empty() {
        return Err(run.fail(format!(
            "{} scenario(s) failed: {}",
            failed.len(),
            failed.join(" | ")
        )));
    }
    for (name, _) in names {
        let line = format!("{SAY_PASS}{name}");
        if !run.console.lines().any(|l| l.trim_end().ends_with(&line)) {
            return Err(run.fail(format!("scenario {name} did not report PASS")));
        }
    }
    run.expect_console(SAY_DONE)?;
    run.expect_console(SAY_RECOVERED)?;
    for line in run.console.lines().filter(|l| l.contains("hostile ")) {
        println!("    hostile| {}", line.trim_end());
    }
    Ok(())
}

/// The VMM's stderr names each of `reasons` (its log of guest errors: the device marked
/// NEEDS_RESET, or the connection reset, and why).
fn expect_reasons(run: &VmRun, reasons: &[&str]) -> CaseResult {
    let logged = run
        .stderr
        .lines()
        .filter(|l| l.contains("needs reset") || l.contains("resetting"))
        .count();
    for reason in reasons {
        run.expect_stderr_any(&[reason])?;
    }
    println!(
        "    hostile| mvm-vmm logged {logged} guest errors, naming all {} expected reasons",
        reasons.len()
    );
    Ok(())
}

fn hostile_blk(ctx: &Context) -> CaseResult {
    let rw = disk_with_pattern(ctx, "rw.img", RW_SEED)?;
    let ro = disk_with_pattern(ctx, "ro.img", RO_SEED)?;
    let by = disk_with_pattern(ctx, "bystander.img", BYSTANDER_SEED)?;
    let (ro_before, by_before) = (sha256(&read(&ro)?), sha256(&read(&by)?));
    let run = ctx
        .test_guest(KERNEL_ELF, "hostile-blk")?
        .timeout(TIMEOUT)
        .arg("--disk")
        .arg(format!("path={},rw,id={RW_ID}", rw.display()))
        .arg("--disk")
        .arg(format!("path={},ro,id={RO_ID}", ro.display()))
        .arg("--disk")
        .arg(format!("path={},ro,id={BYSTANDER_ID}", by.display()))
        .run()?;
    // The VMM stays up through every scenario and ends at the guest's poweroff.
    run.expect_exit(0)?;
    let mut all: Vec<Scenario<blk::BlkBench>> = transport::SCENARIOS.to_vec();
    all.extend_from_slice(blk::SCENARIOS);
    check_scenarios(&run, &all)?;
    // The guest errors were reported, each naming what the guest did wrong.
    expect_reasons(
        &run,
        &[
            "rings outside guest memory",
            "is not a power of two",
            "status transition",
            "notified before DRIVER_OK",
            "notify of queue 7, which does not exist",
            "config write refused",
            "register write of 1 bytes",
            "read-only or unknown register",
            "does not end within the queue",
            "available ring",
            "status descriptor at",
        ],
    )?;
    // The read-write disk: its pattern with exactly the one valid sector written.
    let mut want = vec![0u8; usize::try_from(DISK_BYTES).unwrap_or(0)];
    fill_pattern(RW_SEED, 0, &mut want);
    let at = usize::try_from(VALID_SECTOR * 512).unwrap_or(0);
    if let Some(sector) = want.get_mut(at..at + 512) {
        fill_pattern(VALID_SEED, VALID_SECTOR * 512, sector);
    }
    let got = read(&rw)?;
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        return Err(run.fail(format!(
            "read-write disk differs from what the valid write could produce (len {}, first \
             differing byte {first:?})",
            got.len()
        )));
    }
    check(sha256(&read(&ro)?) == ro_before, || {
        "read-only disk file changed".into()
    })?;
    check(sha256(&read(&by)?) == by_before, || {
        "bystander disk file changed".into()
    })
}

/// The socket for guest connections to host port `port`.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

fn listen(uds: &Path, port: u32) -> Result<UnixListener, Failure> {
    let path = port_path(uds, port);
    let listener = UnixListener::bind(&path)
        .map_err(|e| Failure::new(format!("bind {}: {e}", path.display())))?;
    // The jailed VMM connects as its unprivileged uid (docs/jail.md): it needs write access.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| Failure::new(format!("chmod {}: {e}", path.display())))?;
    Ok(listener)
}

/// Serves the guest's host ports until the VMM is gone (the threads are detached; their
/// sockets die with the case's work directory).
fn serve_host_ports(uds: &Path) -> Result<(), Failure> {
    let data = listen(uds, PORT_DATA)?;
    let sink = listen(uds, PORT_SINK)?;
    let recover = listen(uds, PORT_RECOVER)?;
    std::thread::spawn(move || {
        let bytes: Vec<u8> = (0..HOST_BYTES)
            .map(|i| crate::guest::vsock::pattern(HOST_SEED, i))
            .collect();
        for mut s in data.incoming().map_while(Result::ok) {
            let _ = s.write_all(&bytes);
            // Kept open (not read) so the guest decides when the connection ends.
            std::mem::forget(s);
        }
    });
    std::thread::spawn(move || {
        // Accepted and never read: the guest floods into a full socket.
        for s in sink.incoming().map_while(Result::ok) {
            std::mem::forget(s);
        }
    });
    std::thread::spawn(move || {
        for s in recover.incoming().map_while(Result::ok) {
            let mut line = String::new();
            let mut reader = BufReader::new(&s);
            if reader.read_line(&mut line).is_ok() && line == RECOVER_HELLO {
                let _ = (&s).write_all(RECOVER_ANSWER.as_bytes());
            }
        }
    });
    Ok(())
}

fn hostile_vsock(ctx: &Context) -> CaseResult {
    let by = disk_with_pattern(ctx, "bystander.img", BYSTANDER_SEED)?;
    let by_before = sha256(&read(&by)?);
    let uds = ctx.work_file("v.sock");
    serve_host_ports(&uds)?;
    let run = ctx
        .test_guest(KERNEL_ELF, "hostile-vsock")?
        .timeout(TIMEOUT)
        .arg("--disk")
        .arg(format!("path={},ro,id={BYSTANDER_ID}", by.display()))
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()))
        .run()?;
    run.expect_exit(0)?;
    check_scenarios(&run, vsock::SCENARIOS)?;
    expect_reasons(
        &run,
        &[
            "TX available ring",
            "RX available ring",
            "guest sent past its credit",
        ],
    )?;
    check(sha256(&read(&by)?) == by_before, || {
        "bystander disk file changed".into()
    })
}
