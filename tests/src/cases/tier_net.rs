//! `tier/egress`: `mvm run --allow` on the machine the user has, through the tier it
//! gives. On the emulated tier the test host reaches the outside through QEMU's user
//! network (`runtime/src/backend/emulated/uplink.rs`); the plan's allow list still
//! decides, and QEMU's own host alias (this machine's loopback) stays out of reach
//! even when a plan allows it.
//!
//! `tier/secret-substitution`: a secret the guest sees only as a placeholder, on the
//! same tier: on the emulated tier the egress proxy runs in the test host, beside the
//! tap, with what the outer `mvm` hands it once the boot is vouched for, and reports
//! each substitution and refusal back for the outer audit log.
//!
//! The "remote hosts" are a network namespace on this machine behind a veth pair
//! (`crate::netbed::Remote`), so nothing leaves the machine. The bound name resolves
//! through an `/etc/hosts` seen only by the `mvm` under test (a private mount namespace
//! with a file bound over it), so this machine's own file is never touched.

use std::process::Stdio;

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code, output};
use crate::cases::tier::mvm;
use crate::netbed::{Remote, OTHER, REMOTE};
use crate::netserve;

/// The cases: one `mvm run` each (a test host boot on the emulated tier).
pub const CASES: &[Case] = &[
    Case::user_host("tier/egress", egress).limit_secs(420),
    Case::user_host("tier/secret-substitution", secret_substitution).limit_secs(420),
];

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

/// Runs `command` with `hosts` bound over `/etc/hosts` in a mount namespace of its own.
pub(super) fn with_hosts_file(command: &mut std::process::Command, hosts: &std::path::Path) {
    use std::os::unix::process::CommandExt as _;
    let hosts = hosts.to_owned();
    // SAFETY: between fork and exec only async-signal-safe calls are made: unshare(2)
    // and mount(2) with paths prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some(hosts.as_path()),
                "/etc/hosts",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
}

/// The bound request reaches the HTTPS server with the value; the placeholder in a
/// query is refused (audited, through the test host's report on the emulated tier);
/// another allowed host gets the placeholder only; the value is nowhere on the host.
fn secret_substitution(ctx: &Context) -> CaseResult {
    use crate::cases::audit::Homes;
    use crate::cases::run::audit_records;
    use crate::cases::secret::{absent, fresh_value, search_host, store_secret};
    use crate::cases::secret_substitution::{
        said, servers, substitutions_of, write_policy, BOUND, NAME, PLACEHOLDER,
    };
    let servers = servers(ctx, "e2en-tsub", "e2ev-tsub")?;
    let hosts = ctx.work_file("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{REMOTE} {BOUND}\n"))
        .map_err(|e| Failure::new(format!("writing the hosts file: {e}")))?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    write_policy(&homes, true)?;
    let get = "/tmp/get";
    let auth = format!("-H \"Authorization: Bearer ${NAME}\"");
    let script = format!(
        "cat > {get} && chmod 755 {get} || exit 90\n\
         echo \"env [${NAME}]\"\n\
         r=$({get} {auth} https://{BOUND}/bound 2>&1); echo \"bound [$r]\"\n\
         r=$({get} \"https://{BOUND}/query?k=${NAME}\" 2>&1); echo \"query [$r]\"\n\
         r=$({get} --insecure {auth} https://{OTHER}/other 2>&1); echo \"other [$r]\"\n"
    );
    let secret_arg = format!("{NAME}={PLACEHOLDER}");
    let allow_other = format!("{OTHER}:443");
    let mut command = homes.mvm(
        ctx,
        &[
            "run",
            "--secret",
            &secret_arg,
            "--for",
            BOUND,
            "--allow",
            &allow_other,
            "--",
            "sh",
            "-c",
            &script,
        ],
    )?;
    command
        .env("SSL_CERT_FILE", &servers.ca_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    with_hosts_file(&mut command, &hosts);
    let client = std::fs::File::open(ctx.artifact(crate::case::HTTPS_GET)?)
        .map_err(|e| Failure::new(format!("opening the HTTPS client: {e}")))?;
    command.stdin(client);
    let out = output(command)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let detail = || describe(&out);
    for (key, want) in [
        ("env", PLACEHOLDER),
        ("bound", "ok /bound"),
        ("query", "status 403"),
        ("other", "ok /other"),
    ] {
        if said(&stdout, key) != want {
            return Err(Failure::new(format!(
                "the guest said {key} [{}], want [{want}]",
                said(&stdout, key)
            ))
            .with_detail(detail()));
        }
    }
    let seen: Vec<String> = servers
        .server
        .seen()
        .iter()
        .map(crate::tlsserve::Request::text)
        .collect();
    let bearer_value = format!("Authorization: Bearer {value}");
    let carried: Vec<&String> = seen.iter().filter(|t| t.contains(&value)).collect();
    if carried.len() != 1
        || !carried
            .iter()
            .all(|t| t.contains(" /bound") && t.contains(&bearer_value))
    {
        return Err(Failure::new(format!(
            "{} request(s) carried the value; want /bound only (the server saw {})",
            carried.len(),
            seen.len()
        ))
        .with_detail(detail()));
    }
    if seen.iter().any(|t| t.contains(" /query")) {
        return Err(Failure::new(
            "the request with the placeholder in its query reached the server",
        ));
    }
    let records = audit_records(&homes.log())?;
    let event = |kind: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r.pointer("/event") == Some(&kind.into()))
            .collect()
    };
    let substituted = event("secret_substituted");
    let refused = event("secret_refused");
    if substituted.len() != 1
        || substitutions_of(&records, &value) != 1
        || !refused
            .iter()
            .any(|r| r.pointer("/fields/reason") == Some(&"placeholder_in_target".into()))
        || !event("secret_released").is_empty()
    {
        return Err(Failure::new(format!(
            "audit: secret_substituted {substituted:?}, secret_refused {refused:?} (want one substitution with the value's digest, a refusal placeholder_in_target, no release)"
        )));
    }
    absent(&value, "the workload's output", &stdout)?;
    drop(servers);
    search_host(ctx, &homes, &value, &[&out])
}
