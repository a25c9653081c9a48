//! `boot/*`: a real Linux guest reaches userspace through `mvm-vmm`, and
//! every way it can end is an orderly exit.

use crate::boot_report::PHASES;
use crate::case::{Case, CaseResult, Context, Failure, KERNEL_BZIMAGE, KERNEL_ELF, VMM};
use crate::guest::modes::cpus_line;
use crate::guest::MARKER;
use crate::vm::{VmLaunch, VmRun};

/// The boot cases.
pub const CASES: &[Case] = &[
    Case::kvm("boot/elf-1cpu", elf_1cpu),
    Case::kvm("boot/elf-2cpu", elf_2cpu),
    Case::kvm("boot/bzimage", bzimage),
    Case::kvm("boot/poweroff", poweroff),
    Case::kvm("boot/reboot", reboot),
    Case::kvm("boot/panic", panic),
    Case::kvm("boot/report", report),
    Case::kvm("boot/user-namespace-jail", user_namespace_jail),
    Case::host("boot/bad-args", bad_args),
];

/// Words one of which a poweroff's reason line on stderr must contain.
const POWEROFF_WORDS: &[&str] = &["poweroff", "power off", "powered off", "power-off"];
/// Words one of which a reboot's (or panic's) reason line must contain.
const REBOOT_WORDS: &[&str] = &["reboot", "reset", "triple fault"];

/// Boot report `exit_reason` values for a guest reset (vmm/src/exit.rs).
const RESET_REASONS: &[&str] = &["reset_i8042", "triple_fault"];

/// Fails unless the boot report's exit reason is one of `reasons`.
fn expect_exit_reason(run: &VmRun, reasons: &[&str]) -> CaseResult {
    let got = run.report()?.exit_reason();
    if got.is_some_and(|r| reasons.contains(&r)) {
        Ok(())
    } else {
        Err(run.fail(format!(
            "boot report exit_reason {got:?}, expected one of {reasons:?}"
        )))
    }
}

/// 1 vCPU, 128 MiB, ELF vmlinux: the init prints the marker and powers off.
fn elf_1cpu(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_ELF, "marker")?.run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)
}

/// 2 vCPUs: the guest kernel brings up both.
fn elf_2cpu(ctx: &Context) -> CaseResult {
    // Two vCPUs on the test host's one emulated CPU boot several times slower.
    let run = ctx
        .test_guest(KERNEL_ELF, "nproc")?
        .vcpus(2)
        .timeout(std::time::Duration::from_secs(240))
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)?;
    run.expect_console(&cpus_line(2))
}

/// The same guest from a bzImage (16-bit setup header, compressed kernel).
fn bzimage(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_BZIMAGE, "marker")?.run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)
}

/// A guest poweroff ends the VMM with status 0 and says so on stderr.
fn poweroff(ctx: &Context) -> CaseResult {
    let run = ctx
        .test_guest(KERNEL_ELF, "poweroff")?
        .with_boot_report()
        .run()?;
    run.expect_exit(0)?;
    run.expect_console("powering off")?;
    run.expect_stderr_any(POWEROFF_WORDS)?;
    expect_exit_reason(&run, &["poweroff"])
}

/// A guest reboot (i8042 reset, `reboot=k`) ends the VMM with status 0.
fn reboot(ctx: &Context) -> CaseResult {
    let run = ctx
        .test_guest(KERNEL_ELF, "reboot")?
        .with_boot_report()
        .run()?;
    run.expect_exit(0)?;
    run.expect_console("rebooting")?;
    run.expect_stderr_any(REBOOT_WORDS)?;
    expect_exit_reason(&run, RESET_REASONS)
}

/// PID 1 exits, the kernel panics, `panic=-1` reboots at once: status 0
/// with a reason, not a hang.
fn panic(ctx: &Context) -> CaseResult {
    let run = ctx
        .test_guest(KERNEL_ELF, "panic")?
        .with_boot_report()
        .run()?;
    run.expect_exit(0)?;
    run.expect_console("Kernel panic")?;
    run.expect_stderr_any(REBOOT_WORDS)?;
    expect_exit_reason(&run, RESET_REASONS)
}

/// The boot report has every phase, in order, and an exit reason. `validate` checks
/// that the phases that happened are non-decreasing in the order they end
/// (`boot_report::SEQUENCE`): `args_parsed` used to be stamped after the jail, later than
/// `plan_verified` and `artifacts_measured`. This is a `--dev` boot, so those
/// two are null (`verify/valid-boots-then-replay` orders them for a signed boot).
fn report(ctx: &Context) -> CaseResult {
    let run = ctx
        .test_guest(KERNEL_ELF, "marker")?
        .with_boot_report()
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)?;
    let report = run.report()?;
    report.validate().map_err(|e| {
        run.fail(format!(
            "boot report: {e} (fields: {}; report: {})",
            PHASES.join(","),
            report.to_line()
        ))
    })?;
    for plan_phase in ["plan_verified", "artifacts_measured"] {
        if report.field(plan_phase).is_some_and(|v| !v.is_null()) {
            return Err(run.fail(format!(
                "boot report: {plan_phase} set for a --dev boot: {}",
                report.to_line()
            )));
        }
    }
    // The report is the measurement the docs quote; keep it in the log.
    println!("    report| {}", report.to_line());
    // The jail is on by default (the cases run as root on a host with cgroup v2):
    // an unprivileged uid, a PID namespace, a cgroup (docs/jail.md).
    let jail = report.field("jail").cloned().unwrap_or_default();
    let get = |k: &str| jail.get(k).cloned().unwrap_or_default();
    let jailed = get("uid").as_u64().is_some_and(|u| u != 0)
        && get("pid_namespace") == true
        && get("cgroup").is_string();
    if !jailed {
        return Err(run.fail(format!("boot report: jail not applied in full: {jail}")));
    }
    Ok(())
}

/// The ordinary user the user-namespace jail case starts the VMM as, and its group.
const USER: (u32, u32) = (4545, 4646);

/// Started by an ordinary user whose group may open `/dev/kvm`, `mvm-vmm` jails itself in a
/// user namespace (docs/jail.md) and a real guest boots inside it: the boot report's jail
/// is `user-namespace` with the user's uid. In the test host this takes the `switch_root`
/// path (an initramfs root) with the mounts a user namespace locks.
fn user_namespace_jail(ctx: &Context) -> CaseResult {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = USER;
    let home = ctx.work_file("user");
    let kvm_dir = ctx.work_file("user-kvm");
    let io = |what: &str, e: std::io::Error| Failure::new(format!("{what}: {e}"));
    for dir in [&home, &kvm_dir] {
        std::fs::create_dir(dir).map_err(|e| io(&format!("mkdir {}", dir.display()), e))?;
    }
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).map_err(|e| io("chown", e))?;
    // The user reaches its files through the case's directories.
    for dir in [ctx.work.as_path(), home.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("chmod", e))?;
    }
    let mut launch = VmLaunch::new(ctx.artifact(VMM)?, ctx.artifact(KERNEL_ELF)?, &home)
        .initrd(ctx.artifact(crate::case::INITRAMFS_TEST)?)
        .cmdline(&crate::case::test_cmdline("marker"))
        .with_boot_report()
        .as_user(uid, gid, &kvm_dir);
    launch = launch
        .arg("--jail-dir")
        .arg(home.join("jails").into_os_string());
    let run = launch.run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)?;
    let report = run.report()?;
    let jail = report.field("jail").cloned().unwrap_or_default();
    let kind_ok = jail.get("kind").and_then(|k| k.as_str()) == Some("user-namespace");
    let uid_ok = jail.get("uid").and_then(|u| u.as_u64()) == Some(u64::from(uid));
    if !(kind_ok && uid_ok) {
        return Err(run.fail(format!(
            "boot report: expected a user-namespace jail as uid {uid}: {jail}"
        )));
    }
    Ok(())
}

/// Bad arguments fail before any VM exists, with an error naming the
/// argument: a nonexistent kernel, a zero-byte kernel, 0 vCPUs, 1 MiB.
fn bad_args(ctx: &Context) -> CaseResult {
    let vmm = ctx.artifact(VMM)?;
    let kernel = ctx.artifact(KERNEL_ELF)?;
    let empty = ctx.work_file("empty-kernel");
    std::fs::write(&empty, b"")
        .map_err(|e| Failure::new(format!("write {}: {e}", empty.display())))?;
    let missing = ctx.work_file("no-such-kernel");
    let launches = [
        (
            "nonexistent kernel",
            VmLaunch::new(vmm.clone(), missing, &ctx.work),
            &["kernel"][..],
        ),
        (
            "zero-byte kernel",
            VmLaunch::new(vmm.clone(), empty, &ctx.work),
            &["kernel"][..],
        ),
        (
            "--vcpus 0",
            VmLaunch::new(vmm.clone(), kernel.clone(), &ctx.work).vcpus(0),
            &["vcpu"][..],
        ),
        (
            "--mem-mib 1",
            VmLaunch::new(vmm, kernel, &ctx.work).mem_mib(1),
            &["mem", "memory"][..],
        ),
    ];
    for (what, launch, words) in launches {
        let run = launch
            .label("bad")
            .with_boot_report()
            .timeout(std::time::Duration::from_secs(10))
            .run()?;
        if run.timed_out || run.status.success() || run.status.code().is_none() {
            return Err(run.fail(format!(
                "{what}: mvm-vmm {} , expected a non-zero exit",
                describe(&run)
            )));
        }
        run.expect_stderr_any(words)
            .map_err(|f| Failure::new(format!("{what}: {}", f.reason)).with_detail(f.detail))?;
        // The report is optional here, but if written it must show no VM.
        if let Some(Ok(report)) = &run.boot_report {
            if let Some(t) = report.micros("vm_created") {
                return Err(run.fail(format!(
                    "{what}: boot report has vm_created={t}, expected null"
                )));
            }
        }
    }
    Ok(())
}

fn describe(run: &VmRun) -> String {
    if run.timed_out {
        "was killed at the timeout".into()
    } else {
        format!("exited with {}", run.status)
    }
}
