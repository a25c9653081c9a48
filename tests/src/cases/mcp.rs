//! `mcp/*`: `mvm mcp` driven by the official Python MCP client (`tests/mcp/client.py`,
//! its pinned packages installed by `scripts/setup`), on this machine's tier: the
//! handshake, the tool list, `run_command` with stdin, environment, both output streams
//! and an exit code, `host_info`, bad arguments and an unknown tool. A missing client is
//! a failure, not a skip.

use std::process::{Command, Stdio};

use crate::case::{Case, CaseResult, Context, Failure, VMM};
use crate::cases::run::{describe, expect_code, image_store, output};

/// The cases. Two `run_command` calls boot two VMs on the user's tier.
pub const CASES: &[Case] = &[Case::user_host("mcp/client", client).limit_secs(420)];

fn client(ctx: &Context) -> CaseResult {
    let python = ctx.artifacts.join("mcp-python");
    if !python.exists() {
        return Err(Failure::new(
            "no MCP client venv (artifact mcp-python): run scripts/setup, which installs it",
        ));
    }
    let run_dir = ctx.work_file("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Failure::new(format!("{e}")))?;
    let mut command = Command::new(&python);
    command
        .arg(ctx.artifact("mcp-client.py")?)
        .arg(ctx.artifact("mvm")?)
        .env("MVM_DATA_DIR", image_store(ctx)?)
        .env("MVM_CONFIG_DIR", ctx.work_file("config"))
        .env("MVM_VMM", ctx.artifact(VMM)?)
        .env("MVM_RUN_DIR", &run_dir)
        .stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, 0)?;
    if !String::from_utf8_lossy(&out.stdout).contains("PASS mcp client") {
        return Err(Failure::new("the MCP client did not report PASS").with_detail(describe(&out)));
    }
    Ok(())
}
