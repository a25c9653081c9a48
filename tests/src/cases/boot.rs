//! `boot/*`: a real Linux guest reaches userspace through `mvm-vmm`, and
//! every way it can end is an orderly exit (issue 2).

use crate::boot_report::PHASES;
use crate::case::{Case, CaseResult, Context, KERNEL_BZIMAGE, KERNEL_ELF};
use crate::guest::modes::cpus_line;
use crate::guest::MARKER;

/// The boot cases.
pub const CASES: &[Case] = &[
    Case {
        name: "boot/elf-1cpu",
        needs_kvm: true,
        run: elf_1cpu,
    },
    Case {
        name: "boot/elf-2cpu",
        needs_kvm: true,
        run: elf_2cpu,
    },
    Case {
        name: "boot/bzimage",
        needs_kvm: true,
        run: bzimage,
    },
    Case {
        name: "boot/poweroff",
        needs_kvm: true,
        run: poweroff,
    },
    Case {
        name: "boot/reboot",
        needs_kvm: true,
        run: reboot,
    },
    Case {
        name: "boot/panic",
        needs_kvm: true,
        run: panic,
    },
    Case {
        name: "boot/report",
        needs_kvm: true,
        run: report,
    },
];

/// Words one of which a poweroff's reason line on stderr must contain.
const POWEROFF_WORDS: &[&str] = &["poweroff", "power off", "powered off", "power-off"];
/// Words one of which a reboot's (or panic's) reason line must contain.
const REBOOT_WORDS: &[&str] = &["reboot", "reset", "triple fault"];

/// 1 vCPU, 128 MiB, ELF vmlinux: the init prints the marker and powers off.
fn elf_1cpu(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_ELF, "marker")?.run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)
}

/// 2 vCPUs: the guest kernel brings up both.
fn elf_2cpu(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_ELF, "nproc")?.vcpus(2).run()?;
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
    let run = ctx.test_guest(KERNEL_ELF, "poweroff")?.run()?;
    run.expect_exit(0)?;
    run.expect_console("powering off")?;
    run.expect_stderr_any(POWEROFF_WORDS)
}

/// A guest reboot (i8042 reset, `reboot=k`) ends the VMM with status 0.
fn reboot(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_ELF, "reboot")?.run()?;
    run.expect_exit(0)?;
    run.expect_console("rebooting")?;
    run.expect_stderr_any(REBOOT_WORDS)
}

/// PID 1 exits, the kernel panics, `panic=-1` reboots at once: status 0
/// with a reason, not a hang.
fn panic(ctx: &Context) -> CaseResult {
    let run = ctx.test_guest(KERNEL_ELF, "panic")?.run()?;
    run.expect_exit(0)?;
    run.expect_console("Kernel panic")?;
    run.expect_stderr_any(REBOOT_WORDS)
}

/// The boot report has every phase, in order, and an exit reason.
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
    // The report is the measurement the docs quote; keep it in the log.
    println!("    report| {}", report.to_line());
    Ok(())
}
