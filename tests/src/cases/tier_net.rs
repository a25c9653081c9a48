//! `tier/egress`: `mvm run --allow` on the machine the user has, through the tier it
//! gives. On the emulated tier the test host reaches the outside through QEMU's user
//! network (`runtime/src/backend/emulated/uplink.rs`); the plan's allow list still
//! decides, and QEMU's own host alias (this machine's loopback) stays out of reach
//! even when a plan allows it.
//!
//! The "remote hosts" are a network namespace on this machine behind a veth pair
//! (`crate::netbed::Remote`), so nothing leaves the machine.

use std::process::Stdio;

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code, output};
use crate::cases::tier::mvm;
use crate::netbed::{Remote, OTHER, REMOTE};
use crate::netserve;

/// The case: one `mvm run` (a test host boot on the emulated tier).
pub const CASES: &[Case] = &[Case::user_host("tier/egress", egress).limit_secs(420)];

/// The echo service's port in the namespace.
const ECHO_PORT: u16 = 7311;
/// QEMU's alias for this machine's loopback, seen from the test host.
const SLIRP_HOST: &str = "10.0.2.2";

/// An allowed host answers; a host the plan does not allow, and QEMU's alias for this
/// machine's loopback (allowed by the plan on purpose), see no connection.
fn egress(ctx: &Context) -> CaseResult {
    let remote = Remote::create("e2en-tier", "e2ev-tier")?;
    let echo =
        remote.within(|| netserve::echo(netserve::listen(([0, 0, 0, 0], ECHO_PORT).into())?))?;
    // A service on this machine's loopback: what QEMU's host alias would reach.
    let canary_listener = netserve::listen(([127, 0, 0, 1], 0).into())
        .map_err(|e| Failure::new(format!("binding the loopback canary: {e}")))?;
    let canary_port = canary_listener
        .local_addr()
        .map_err(|e| Failure::new(format!("the canary's address: {e}")))?
        .port();
    let canary = netserve::echo(canary_listener)
        .map_err(|e| Failure::new(format!("starting the loopback canary: {e}")))?;
    let allowed = format!("{REMOTE}:{ECHO_PORT}");
    let alias = format!("{SLIRP_HOST}:{canary_port}");
    let config = ctx.work_file("config");
    std::fs::create_dir_all(&config)
        .and_then(|()| {
            std::fs::write(
                config.join("policy.toml"),
                format!("[egress]\nallow = [\"{allowed}\", \"{alias}\"]\n"),
            )
        })
        .map_err(|e| Failure::new(format!("writing the policy: {e}")))?;
    // Each attempt has its own limit: a connection the device drops never opens.
    let script = format!(
        "echo tier | timeout 20 nc {REMOTE} {ECHO_PORT}; \
         echo other | timeout 5 nc {OTHER} {ECHO_PORT}; \
         echo canary | timeout 5 nc {SLIRP_HOST} {canary_port}; \
         echo done"
    );
    let mut command = mvm(
        ctx,
        "run",
        &[
            "--allow", &allowed, "--allow", &alias, "--", "sh", "-c", &script,
        ],
    )?;
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = output(command)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detail = || describe(&out);
    if !stdout.contains("echo: tier") || !stdout.contains("done") {
        return Err(
            Failure::new("the allowed host's answer is missing from stdout").with_detail(detail()),
        );
    }
    if stdout.contains("echo: other") || !echo.seen_at(OTHER).is_empty() {
        return Err(Failure::new(format!(
            "a host the plan does not allow was reached ({} connection(s) at {OTHER})",
            echo.seen_at(OTHER).len()
        ))
        .with_detail(detail()));
    }
    if echo.seen_at(REMOTE).len() != 1 {
        return Err(Failure::new(format!(
            "the echo service saw {} connection(s) at {REMOTE}, expected 1",
            echo.seen_at(REMOTE).len()
        ))
        .with_detail(detail()));
    }
    if stdout.contains("echo: canary") || !canary.seen().is_empty() {
        return Err(Failure::new(format!(
            "the guest reached this machine's loopback through {SLIRP_HOST} ({} connection(s))",
            canary.seen().len()
        ))
        .with_detail(detail()));
    }
    drop((echo, canary, remote));
    Ok(())
}
