//! `bench/boot` (run only when named: `scripts/bench-boot [FIRECRACKER]`): cold boots,
//! launch to the guest's reboot, of the same kernel, initramfs (`mvm-test-init` in mode
//! `reboot`) and command line, 1 vCPU and 128 MiB, under:
//!
//! - `mvm-dev`: `mvm-vmm --dev`, jailed (as it runs for `mvm run`);
//! - `mvm-signed`: `mvm-vmm` jailed with a signed plan verified, a fresh nonce and every
//!   artifact measured (one pass over each file as it is read);
//! - `firecracker`: when the artifacts hold a `firecracker` binary
//!   (`MVM_BENCH_FIRECRACKER=PATH scripts/e2e bench/boot` puts one there), with
//!   `--no-api --no-seccomp`, the configuration of `../shared/bench/`.
//!
//! The variants take turns, round after round, each round starting with the next one, and
//! before each boot 320 MiB of fresh memory (64 MiB of it in small pages) is written and
//! freed ([`scrub`]) and the host gets a second's pause, so a noisy machine slows them
//! alike. Each boot is timed from the outside the same way for every VMM: the console is a
//! pipe read by this process, which stamps the first byte, the line `mvm-test-init` prints
//! when userspace starts ([`MARKER`]), and the VMM's exit. For mvm the boot report adds the
//! phases inside the VMM. The case prints medians, minimums, and each phase's ratio of
//! medians to Firecracker's; it fails only on behaviour (a boot that did not reach
//! userspace or did not end by the guest's reboot), never on a time.
//!
//! `bench/trace-boot` (`scripts/bench-boot --trace`) boots the same VMMs in the test
//! init's mode `dmesg` and prints the guest's kernel log under each, side by side, aligned
//! by message; `scripts/bench-boot --rounds N` sets the rounds ([`ROUNDS_FILE`]).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::boot_report::BootReport;
use crate::case::{read_bounded, test_cmdline, Case, CaseResult, Context, Failure, BOOT_TIMEOUT};
use crate::cases::verify::Setup;
use crate::guest::MARKER;

/// The boot benchmark and its trace (not in the default run).
pub const BENCH: &[Case] = &[
    Case::kvm("bench/boot", boot).limit_secs(2400),
    Case::kvm("bench/trace-boot", trace).limit_secs(1200),
];

/// Rounds unless told otherwise: each variant boots this many times.
const ROUNDS: usize = 5;
/// The most rounds the case takes (it must end inside its time limit).
const MAX_ROUNDS: usize = 40;
/// Where `scripts/e2e` puts `MVM_BENCH_ROUNDS` (`scripts/bench-boot --rounds N`).
pub const ROUNDS_FILE: &str = "bench-rounds";
/// The pause before each boot.
const SETTLE: Duration = Duration::from_secs(1);
/// How much fresh memory [`scrub`] writes before each boot: twice the guest's RAM.
const SCRUB_BYTES: usize = 256 << 20;
/// And how much of it in small pages only.
const SCRUB_SMALL_BYTES: usize = 64 << 20;
/// The test guest's mode: print a line, reboot.
const MODE: &str = "reboot";
/// The trace's mode: print the kernel's log, reboot.
const TRACE_MODE: &str = "dmesg";
/// Rounds of the trace: a fresh test host's first boot differs from later ones.
const TRACE_ROUNDS: usize = 2;
/// Where `scripts/e2e` puts a Firecracker binary it was given.
pub const FIRECRACKER: &str = "firecracker";
/// Boot report phases shown per mvm variant, in order.
const REPORT_PHASES: [&str; 9] = [
    "args_parsed",
    "plan_verified",
    "artifacts_measured",
    "kernel_loaded",
    "vm_created",
    "vcpus_ready",
    "first_kvm_run",
    "init_reached",
    "exit",
];

/// One boot, seen from outside the VMM.
#[derive(Debug, Clone)]
struct Timed {
    /// Launch to the console's first byte.
    first_byte: Option<Duration>,
    /// Launch to [`MARKER`] on the console.
    userspace: Option<Duration>,
    /// Launch to the VMM's exit.
    exit: Duration,
    /// mvm's boot report, when asked for.
    report: Option<BootReport>,
}

/// A VMM to boot: its name in the table and how to start it.
struct Variant {
    name: &'static str,
    /// Builds the command for round `round` (a signed plan needs a fresh nonce each time).
    command: Box<dyn Fn(usize) -> Result<Command, Failure>>,
    /// The boot report this VMM writes, if any.
    report: Option<PathBuf>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Failure {
    move |e| Failure::new(format!("{what}: {e}"))
}

/// What the console reader saw, stamped as it arrived.
enum Seen {
    FirstByte(Instant),
    Marker(Instant),
}

/// Runs `cmd` with its console on a pipe, stamping what arrives, until it exits (or is
/// killed at [`BOOT_TIMEOUT`]). Returns the timings and the console text.
fn timed_boot(mut cmd: Command, stderr: &Path) -> Result<(Timed, String, i32), Failure> {
    let err_file =
        std::fs::File::create(stderr).map_err(io(format!("create {}", stderr.display())))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_file)
        .spawn()
        .map_err(io("spawn the VMM".into()))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Failure::new("the VMM's stdout is not a pipe"))?;
    let (tx, rx) = mpsc::channel();
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut console = Vec::new();
        let mut buf = [0u8; 4096];
        let mut marker_seen = false;
        while let Ok(n) = stdout.read(&mut buf) {
            let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
                break;
            };
            let now = Instant::now();
            if console.is_empty() {
                let _ = tx.send(Seen::FirstByte(now));
            }
            // Bounded: a flooding guest cannot make the bench allocate without end.
            if console.len() < 1 << 20 {
                console.extend_from_slice(chunk);
            }
            if !marker_seen && String::from_utf8_lossy(&console).contains(MARKER) {
                marker_seen = true;
                let _ = tx.send(Seen::Marker(now));
            }
        }
        let _ = closed_tx.send(());
        String::from_utf8_lossy(&console).into_owned()
    });
    // Asleep until the console closes, which it does as the VMM exits: this process must
    // not wake while the guest boots. It used to poll for the exit every millisecond,
    // and in the test host's one CPU each wakeup was a timer interrupt taken in the
    // middle of the guest, a VM exit each (docs/boot-time.md, "The bench's own noise").
    let killed = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        Failure::new(format!(
            "the VMM did not exit within {} s",
            BOOT_TIMEOUT.as_secs()
        ))
    };
    if closed_rx.recv_timeout(BOOT_TIMEOUT).is_err() {
        return Err(killed(&mut child));
    }
    // The console is closed; the exit follows at once (a VMM that closed it and lives on
    // is waited for up to the same limit).
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= BOOT_TIMEOUT => return Err(killed(&mut child)),
            Ok(None) => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => return Err(Failure::new(format!("wait for the VMM: {e}"))),
        }
    };
    let exit = start.elapsed();
    let console = reader
        .join()
        .map_err(|_| Failure::new("the console reader panicked"))?;
    let mut timed = Timed {
        first_byte: None,
        userspace: None,
        exit,
        report: None,
    };
    for seen in rx.try_iter() {
        match seen {
            Seen::FirstByte(t) => timed.first_byte = Some(t.duration_since(start)),
            Seen::Marker(t) => timed.userspace = Some(t.duration_since(start)),
        }
    }
    Ok((timed, console, status.code().unwrap_or(-1)))
}

/// `mvm-vmm` with the bench's kernel, initramfs, command line and size.
fn mvm_command(vmm: &Path, kernel: &Path, initrd: &Path, mode: &str, report: &Path) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(test_cmdline(mode))
        .args(["--vcpus", "1", "--mem-mib", "128", "--boot-report"])
        .arg(report);
    cmd
}

/// The VMMs to compare, booting the test guest in `mode`.
fn variants(ctx: &Context, mode: &'static str) -> Result<Vec<Variant>, Failure> {
    let vmm = ctx.artifact(crate::case::VMM)?;
    let kernel = ctx.artifact(crate::case::KERNEL_ELF)?;
    let initrd = ctx.artifact(crate::case::INITRAMFS_TEST)?;
    let mut out = Vec::new();

    let fc = ctx.artifacts.join(FIRECRACKER);
    if fc.is_file() {
        let config = ctx.work_file("firecracker.json");
        let json = serde_json::json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "initrd_path": initrd,
                "boot_args": test_cmdline(mode),
            },
            "drives": [],
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        });
        std::fs::write(&config, json.to_string())
            .map_err(io(format!("write {}", config.display())))?;
        out.push(Variant {
            name: "firecracker",
            command: Box::new(move |_| {
                let mut cmd = Command::new(&fc);
                cmd.args([
                    "--no-api",
                    "--no-seccomp",
                    "--level",
                    "Error",
                    "--config-file",
                ])
                .arg(&config);
                Ok(cmd)
            }),
            report: None,
        });
    }

    let dev_report = ctx.work_file("mvm-dev.boot-report.json");
    let (v, k, i, r) = (
        vmm.clone(),
        kernel.clone(),
        initrd.clone(),
        dev_report.clone(),
    );
    out.push(Variant {
        name: "mvm-dev",
        command: Box::new(move |_| {
            let mut cmd = mvm_command(&v, &k, &i, mode, &r);
            cmd.arg("--dev");
            Ok(cmd)
        }),
        report: Some(dev_report),
    });

    let signed_report = ctx.work_file("mvm-signed.boot-report.json");
    let (r, c) = (signed_report.clone(), ctx.clone());
    out.push(Variant {
        name: "mvm-signed",
        command: Box::new(move |round| {
            let setup = Setup::for_mode(&c, &format!("bench-{mode}-{round}"), mode)?;
            let envelope = setup.signed(&c)?;
            let mut cmd = mvm_command(&vmm, &kernel, &initrd, mode, &r);
            let extra: Vec<OsString> = setup.verify_args(&envelope);
            cmd.args(extra);
            Ok(cmd)
        }),
        report: Some(signed_report),
    });
    Ok(out)
}

/// The median of `values` (the lower middle one for an even count).
fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    let mid = values.len().checked_sub(1)? / 2;
    values.get(mid).copied()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.3}", d.as_secs_f64()))
}

fn ratio(d: Option<Duration>, base: Option<Duration>) -> String {
    match (d, base) {
        (Some(d), Some(b)) if !b.is_zero() => format!("{:.2}x", d.as_secs_f64() / b.as_secs_f64()),
        _ => "-".to_owned(),
    }
}

/// The phases compared across VMMs, as a function of one boot.
type PhaseOf = fn(&Timed) -> Option<Duration>;
const OUTSIDE: [(&str, PhaseOf); 4] = [
    ("launch->first console byte", |t| t.first_byte),
    ("launch->userspace", |t| t.userspace),
    ("userspace->exit", |t| {
        t.userspace.map(|u| t.exit.saturating_sub(u))
    }),
    ("launch->exit (total)", |t| Some(t.exit)),
];

fn boot(ctx: &Context) -> CaseResult {
    let rounds = rounds(ctx)?;
    let variants = variants(ctx, MODE)?;
    let mut results: Vec<Vec<Timed>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, variant) in in_turn(&variants, round) {
            let (timed, _) = boot_once(ctx, variant, round)?;
            if let Some(runs) = results.get_mut(i) {
                runs.push(timed);
            }
        }
    }
    print_table(&variants, &results, rounds);
    Ok(())
}

/// How many rounds: [`ROUNDS_FILE`] among the artifacts when it is there, else [`ROUNDS`].
fn rounds(ctx: &Context) -> Result<usize, Failure> {
    let path = ctx.artifacts.join(ROUNDS_FILE);
    if !path.exists() {
        return Ok(ROUNDS);
    }
    let text = read_bounded(&path, 64).map_err(io(format!("read {}", path.display())))?;
    parse_rounds(&text).ok_or_else(|| {
        Failure::new(format!(
            "{}: {:?} is not a number of rounds from 1 to {MAX_ROUNDS}",
            path.display(),
            text.trim()
        ))
    })
}

fn parse_rounds(text: &str) -> Option<usize> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| (1..=MAX_ROUNDS).contains(n))
}

/// `bench/trace-boot` (`scripts/bench-boot --trace`): each VMM boots the guest `quiet` in
/// mode `dmesg`, which prints the kernel's log at the end. The boot is not slowed by the
/// serial port, and the log's times are the guest's own clock from its first line. For
/// each round it prints every message with its time under each VMM, aligned by text, the
/// first VMM's order; then the messages only the others printed.
fn trace(ctx: &Context) -> CaseResult {
    let variants = variants(ctx, TRACE_MODE)?;
    for round in 1..=TRACE_ROUNDS {
        let mut logs = Vec::new();
        for (i, variant) in in_turn(&variants, round) {
            let (_, console) = boot_once(ctx, variant, round)?;
            let log = kernel_log(&console);
            if log.is_empty() {
                return Err(Failure::new(format!(
                    "{} round {round}: the guest printed no kernel log",
                    variant.name
                ))
                .with_detail(crate::case::tail("console", &console, 10)));
            }
            logs.push((i, log));
        }
        logs.sort_by_key(|(i, _)| *i);
        let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
        let logs: Vec<Vec<(Duration, String)>> = logs.into_iter().map(|(_, l)| l).collect();
        print!("{}", aligned(round, &names, &logs));
    }
    Ok(())
}

/// The variants in round `round`'s order: each round starts with the next one, so none
/// always follows the same one.
fn in_turn(variants: &[Variant], round: usize) -> Vec<(usize, &Variant)> {
    let mut order: Vec<(usize, &Variant)> = variants.iter().enumerate().collect();
    order.rotate_left(round.saturating_sub(1) % variants.len().max(1));
    order
}

/// Writes [`SCRUB_BYTES`] of fresh memory, a byte a page, and frees it; then
/// [`SCRUB_SMALL_BYTES`] more that no huge page may back.
///
/// The pages the last VM freed are the first the kernel hands out again. Under the
/// QEMU-TCG test host they still hold code QEMU translated for the last guest, and the
/// first write to each pays for throwing those translations away (docs/boot-time.md, "The
/// stall, found"): 0.2 s or more of whichever boot comes next, on whichever VMM. Taking
/// them here, before the pause, leaves every VMM's boot the memory a host without that
/// emulator cost would give it. The first buffer takes the free huge pages (the next
/// guest's RAM comes from those), the second the small ones (the next VMM's heap, stacks
/// and page tables, and KVM's). On a real KVM host it is a quick memset.
fn scrub() {
    touch_fresh(SCRUB_BYTES, false);
    touch_fresh(SCRUB_SMALL_BYTES, true);
}

/// Allocates `bytes`, writes a byte a page (after advising no huge pages, when
/// `small_pages`), and frees them.
fn touch_fresh(bytes: usize, small_pages: bool) {
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; bytes];
    // The whole pages inside the buffer; a large allocation is its own mapping.
    let start = buf.as_ptr().align_offset(PAGE);
    if small_pages && start < bytes {
        let len = (bytes - start) / PAGE * PAGE;
        // SAFETY: advice on whole pages of a live buffer this function owns; it changes
        // how they are backed, not their contents or their mapping.
        let _ = unsafe {
            libc::madvise(
                buf.as_mut_ptr().add(start).cast(),
                len,
                libc::MADV_NOHUGEPAGE,
            )
        };
    }
    buf.iter_mut().step_by(PAGE).for_each(|b| *b = 1);
    std::hint::black_box(&buf);
}

/// Boots `variant` once (after [`SETTLE`]), checks it reached userspace and rebooted, and
/// prints its times. Returns them with the console text.
fn boot_once(ctx: &Context, variant: &Variant, round: usize) -> Result<(Timed, String), Failure> {
    // The command first (a signed plan is made and its artifacts hashed here), then the
    // host settles: neither the last VM's teardown nor this work is this boot's cost.
    if let Some(r) = &variant.report {
        let _ = std::fs::remove_file(r);
    }
    let cmd = (variant.command)(round)?;
    scrub();
    std::thread::sleep(SETTLE);
    let stderr = ctx.work_file(&format!("{}.stderr", variant.name));
    let (mut timed, console, status) = timed_boot(cmd, &stderr)?;
    let evidence = || {
        let err = read_bounded(&stderr, 1 << 16).unwrap_or_default();
        crate::case::tail("console", &console, 10) + &crate::case::tail("stderr", &err, 10)
    };
    if status != 0 || timed.userspace.is_none() || !console.contains("rebooting") {
        return Err(Failure::new(format!(
            "{} round {round}: exit status {status}, userspace {}, reboot line {}",
            variant.name,
            if timed.userspace.is_some() {
                "reached"
            } else {
                "not reached"
            },
            if console.contains("rebooting") {
                "printed"
            } else {
                "missing"
            },
        ))
        .with_detail(evidence()));
    }
    if let Some(path) = &variant.report {
        let text = read_bounded(path, 1 << 16).map_err(io(format!("read {}", path.display())))?;
        let report = BootReport::parse(&text)
            .map_err(|e| Failure::new(format!("{}: boot report: {e}", variant.name)))?;
        timed.report = Some(report);
    }
    // The VMM's own phases for this boot, to tell a slow start from a slow guest.
    let inside = timed.report.as_ref().map_or_else(String::new, |r| {
        let at = |p: &str| secs(r.micros(p).map(Duration::from_micros));
        format!(
            " (report: first_kvm_run {} s, init_reached {} s)",
            at("first_kvm_run"),
            at("init_reached")
        )
    });
    println!(
        "bench/boot {} round {round}: first byte {} s, userspace {} s, exit {} s{inside}",
        variant.name,
        secs(timed.first_byte),
        secs(timed.userspace),
        secs(Some(timed.exit))
    );
    Ok((timed, console))
}

/// The kernel log mode `dmesg` printed after [`MARKER`]: `(time, text)` per record.
fn kernel_log(console: &str) -> Vec<(Duration, String)> {
    let Some((_, after)) = console.split_once(MARKER) else {
        return Vec::new();
    };
    after
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?;
            let (time, text) = rest.split_once(']')?;
            let secs: f64 = time.trim().parse().ok()?;
            Some((
                Duration::try_from_secs_f64(secs).ok()?,
                text.trim().to_owned(),
            ))
        })
        .collect()
}

/// The logs side by side: one line per message of the first log, with its time under each
/// VMM (`-` where that VMM's log lacks it), matched by text and occurrence; then each other
/// log's messages the first lacks.
fn aligned(round: usize, names: &[&str], logs: &[Vec<(Duration, String)>]) -> String {
    use std::collections::HashMap;
    use std::fmt::Write;
    // Each message keyed by (text, nth occurrence), in its log's order, once.
    let keys: Vec<Vec<((&str, usize), Duration)>> = logs
        .iter()
        .map(|log| {
            let mut seen: HashMap<&str, usize> = HashMap::new();
            log.iter()
                .map(|(t, text)| {
                    let n = seen.entry(text.as_str()).or_default();
                    *n += 1;
                    ((text.as_str(), *n), *t)
                })
                .collect()
        })
        .collect();
    let keyed: Vec<HashMap<(&str, usize), Duration>> =
        keys.iter().map(|k| k.iter().copied().collect()).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench/trace-boot round {round}: guest clock, seconds; {}",
        names.join(" | ")
    );
    let row = |out: &mut String, key: (&str, usize)| {
        let cells: Vec<String> = keyed
            .iter()
            .map(|k| {
                k.get(&key).map_or_else(
                    || "      -".to_owned(),
                    |t| format!("{:7.3}", t.as_secs_f64()),
                )
            })
            .collect();
        let _ = writeln!(out, "  {}  {}", cells.join(" "), key.0);
    };
    let (Some(first), Some(first_keyed)) = (keys.first(), keyed.first()) else {
        return out;
    };
    for (key, _) in first {
        row(&mut out, *key);
    }
    for (name, log) in names.iter().zip(&keys).skip(1) {
        let extra: Vec<(&str, usize)> = log
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| !first_keyed.contains_key(key))
            .collect();
        if extra.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  only under {name}:");
        for key in extra {
            row(&mut out, key);
        }
    }
    out
}

fn print_table(variants: &[Variant], results: &[Vec<Timed>], rounds: usize) {
    let base = variants
        .iter()
        .position(|v| v.name == "firecracker")
        .and_then(|i| results.get(i));
    println!(
        "bench/boot: median (min) of {rounds} boots each, seconds; ratios of medians to Firecracker's"
    );
    for (name, phase) in OUTSIDE {
        let base_median = base.and_then(|runs| median(runs.iter().filter_map(phase).collect()));
        let cells: Vec<String> = variants
            .iter()
            .zip(results)
            .map(|(v, runs)| {
                let m = median(runs.iter().filter_map(phase).collect());
                let min = runs.iter().filter_map(phase).min();
                if v.name == "firecracker" {
                    format!("{} {} ({})", v.name, secs(m), secs(min))
                } else {
                    let r = ratio(m, base_median);
                    format!("{} {} ({}) {r}", v.name, secs(m), secs(min))
                }
            })
            .collect();
        println!("  {name:<28} {}", cells.join("  "));
    }
    if base.is_none() {
        println!("  (no Firecracker: give one with scripts/bench-boot FIRECRACKER for the ratios)");
    }
    println!("bench/boot: mvm's boot report, medians, seconds since process start");
    for (v, runs) in variants.iter().zip(results) {
        if v.report.is_none() {
            continue;
        }
        let cells: Vec<String> = REPORT_PHASES
            .iter()
            .map(|p| {
                let m = median(
                    runs.iter()
                        .filter_map(|t| t.report.as_ref()?.micros(p))
                        .map(Duration::from_micros)
                        .collect(),
                );
                format!("{p} {}", secs(m))
            })
            .collect();
        println!("  {:<12} {}", v.name, cells.join("  "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_lower_middle() {
        let d = Duration::from_millis;
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![d(3), d(1), d(2)]), Some(d(2)));
        assert_eq!(median(vec![d(4), d(1), d(3), d(2)]), Some(d(2)));
    }

    #[test]
    fn rounds_are_a_bounded_number() {
        assert_eq!(parse_rounds("12\n"), Some(12));
        assert_eq!(parse_rounds("1"), Some(1));
        assert_eq!(parse_rounds(&MAX_ROUNDS.to_string()), Some(MAX_ROUNDS));
        for bad in ["0", "41", "-3", "five", ""] {
            assert_eq!(parse_rounds(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_kernel_log_is_what_follows_the_marker() {
        let console = format!(
            "[    0.100000] printed before userspace\n{MARKER}\n\
             [    0.000000] Linux version 6.12\n\
             noise without a time\n\
             [    1.250000] Run /init as init process\n\
             [ not a time] skipped\n"
        );
        let log = kernel_log(&console);
        assert_eq!(
            log,
            vec![
                (Duration::ZERO, "Linux version 6.12".to_owned()),
                (
                    Duration::from_millis(1250),
                    "Run /init as init process".to_owned()
                ),
            ]
        );
        assert!(kernel_log("[    0.1] no marker").is_empty());
    }

    #[test]
    fn logs_are_aligned_by_text_and_occurrence() {
        let s = Duration::from_millis;
        let first = vec![
            (s(0), "Linux".to_owned()),
            (s(10), "MPTABLE".to_owned()),
            (s(50), "MPTABLE".to_owned()),
            (s(900), "i8042 probe".to_owned()),
        ];
        let second = vec![
            (s(0), "Linux".to_owned()),
            (s(20), "MPTABLE".to_owned()),
            (s(30), "MPTABLE".to_owned()),
            (s(40), "No controller".to_owned()),
        ];
        let out = aligned(2, &["fc", "mvm"], &[first, second]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                "bench/trace-boot round 2: guest clock, seconds; fc | mvm",
                "    0.000   0.000  Linux",
                "    0.010   0.020  MPTABLE",
                "    0.050   0.030  MPTABLE",
                "    0.900       -  i8042 probe",
                "  only under mvm:",
                "        -   0.040  No controller",
            ]
        );
    }

    #[test]
    fn ratio_needs_a_baseline() {
        let d = Duration::from_millis;
        assert_eq!(ratio(Some(d(500)), Some(d(1000))), "0.50x");
        assert_eq!(ratio(Some(d(500)), None), "-");
        assert_eq!(ratio(Some(d(500)), Some(d(0))), "-");
    }
}
