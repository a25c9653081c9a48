//! `selftest/*`: the runner's own checks, run only when named (`mvm-e2e
//! selftest`; `tests/tests/runner_limits.rs` does). `selftest/hang` never ends
//! and leaves a detached grandchild behind, to prove that a case past its time
//! limit is reported by name, that everything it started is killed, and that
//! the run goes on to `selftest/after-hang`.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::case::{Case, CaseResult, Context, Failure};

/// The self-test cases.
pub const CASES: &[Case] = &[
    Case::host("selftest/hang", hang).limit_secs(3),
    Case::host("selftest/after-hang", after_hang),
];

/// Where `selftest/hang` writes its grandchild's pid.
pub const GRANDCHILD_PID_FILE: &str = "grandchild.pid";

fn hang(ctx: &Context) -> CaseResult {
    // In its own process group, so the runner's group kill misses it and only
    // its sweep of reparented orphans can end it.
    let grandchild = Command::new("sleep")
        .arg("3600")
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::new(format!("spawn sleep: {e}")))?;
    std::fs::write(
        ctx.work_file(GRANDCHILD_PID_FILE),
        grandchild.id().to_string(),
    )
    .map_err(|e| Failure::new(format!("write pid file: {e}")))?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn after_hang(_: &Context) -> CaseResult {
    Ok(())
}
