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
//! a second's pause before each boot, so a noisy machine slows them alike. Each
//! boot is timed from the outside the same way for every VMM: the console is a pipe read
//! by this process, which stamps the first byte, the line `mvm-test-init` prints when
//! userspace starts ([`MARKER`]), and the VMM's exit. For mvm the boot report adds the
//! phases inside the VMM. The case prints medians, minimums, and each phase's ratio of
//! medians to Firecracker's; it fails only on behaviour (a boot that did not reach
//! userspace or did not end by the guest's reboot), never on a time.

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

/// The boot benchmark (not in the default run).
pub const BENCH: &[Case] = &[Case::kvm("bench/boot", boot).limit_secs(2400)];

/// Rounds: each variant boots this many times.
const ROUNDS: usize = 5;
/// The pause before each boot.
const SETTLE: Duration = Duration::from_secs(1);
/// The test guest's mode: print a line, reboot.
const MODE: &str = "reboot";
/// Where `scripts/e2e` puts a Firecracker binary it was given.
pub const FIRECRACKER: &str = "firecracker";
/// Boot report phases shown per mvm variant, in order.
const REPORT_PHASES: [&str; 7] = [
    "args_parsed",
    "artifacts_measured",
    "kernel_loaded",
    "vm_created",
    "vcpus_ready",
    "first_kvm_run",
    "init_reached",
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
        String::from_utf8_lossy(&console).into_owned()
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= BOOT_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::new(format!(
                    "the VMM did not exit within {} s",
                    BOOT_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
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
fn mvm_command(vmm: &Path, kernel: &Path, initrd: &Path, report: &Path) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(test_cmdline(MODE))
        .args(["--vcpus", "1", "--mem-mib", "128", "--boot-report"])
        .arg(report);
    cmd
}

fn variants(ctx: &Context) -> Result<Vec<Variant>, Failure> {
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
                "boot_args": test_cmdline(MODE),
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
            let mut cmd = mvm_command(&v, &k, &i, &r);
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
            let setup = Setup::for_mode(&c, &format!("bench-{round}"), MODE)?;
            let envelope = setup.signed(&c)?;
            let mut cmd = mvm_command(&vmm, &kernel, &initrd, &r);
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
    let variants = variants(ctx)?;
    let mut results: Vec<Vec<Timed>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        // Each round starts with the next variant, so none always follows the same one.
        let mut order: Vec<usize> = (0..variants.len()).collect();
        order.rotate_left((round - 1) % variants.len().max(1));
        for i in order {
            let (Some(variant), Some(runs)) = (variants.get(i), results.get_mut(i)) else {
                continue;
            };
            // The host settles first: the last VM's teardown is not this boot's cost.
            std::thread::sleep(SETTLE);
            if let Some(r) = &variant.report {
                let _ = std::fs::remove_file(r);
            }
            let cmd = (variant.command)(round)?;
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
                let text =
                    read_bounded(path, 1 << 16).map_err(io(format!("read {}", path.display())))?;
                let report = BootReport::parse(&text)
                    .map_err(|e| Failure::new(format!("{}: boot report: {e}", variant.name)))?;
                timed.report = Some(report);
            }
            println!(
                "bench/boot {} round {round}: first byte {} s, userspace {} s, exit {} s",
                variant.name,
                secs(timed.first_byte),
                secs(timed.userspace),
                secs(Some(timed.exit))
            );
            runs.push(timed);
        }
    }
    print_table(&variants, &results);
    Ok(())
}

fn print_table(variants: &[Variant], results: &[Vec<Timed>]) {
    let base = variants
        .iter()
        .position(|v| v.name == "firecracker")
        .and_then(|i| results.get(i));
    println!(
        "bench/boot: median (min) of {ROUNDS} boots each, seconds; ratios of medians to Firecracker's"
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
    fn ratio_needs_a_baseline() {
        let d = Duration::from_millis;
        assert_eq!(ratio(Some(d(500)), Some(d(1000))), "0.50x");
        assert_eq!(ratio(Some(d(500)), None), "-");
        assert_eq!(ratio(Some(d(500)), Some(d(0))), "-");
    }
}
