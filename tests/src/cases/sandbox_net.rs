//! `sandbox/network`: a sandbox with a network and a secret it sees only as a
//! placeholder (`mvm sandbox create --allow DEST --secret NAME=PLACEHOLDER --for HOST`).
//! Its execs reach the allowed echo service and not another host; an HTTPS request
//! with the placeholder (the sandbox's `$NAME`) reaches the bound host with the value;
//! pausing it is refused (its network and egress proxy would not come back); the value
//! is nowhere on the host. The remote hosts and the bound HTTPS server (its own CA) are
//! `secret/substituted`'s.

use std::process::{Command, Output};

use super::audit::Homes;
use super::run::{audit_records, describe, expect_code, output};
use super::secret::{absent, fresh_value, search_host, store_secret};
use super::secret_substitution::{
    fail, said, servers, substitutions_of, HostsLine, BOUND, NAME, PLACEHOLDER,
};
use crate::case::{Case, CaseResult, Context, Failure, HTTPS_GET};
use crate::netbed::{OTHER, REMOTE};
use crate::netserve;

/// The cases: one sandbox each, in the test host's KVM and on the machine's own tier
/// (the emulated one here, whose test host reaches out through its uplink).
pub const CASES: &[Case] = &[
    Case::kvm("sandbox/network", network_kvm).limit_secs(420),
    Case::user_host("tier/sandbox-network", network_here).limit_secs(420),
];

/// In the test host: the bound name in its own `/etc/hosts`.
fn network_kvm(ctx: &Context) -> CaseResult {
    let _hosts = HostsLine::add()?;
    network(ctx, &["--backend", "kvm"], None)
}

/// On this machine: the bound name in a hosts file only the `mvm` under test sees.
fn network_here(ctx: &Context) -> CaseResult {
    let hosts = ctx.work_file("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{REMOTE} {BOUND}\n"))
        .map_err(fail("writing the hosts file"))?;
    network(ctx, &[], Some(&hosts))
}

/// The echo service's port on the remote hosts.
const ECHO_PORT: u16 = 7312;

/// Removes the case's sandbox whatever happened.
struct Removed<'a>(&'a Context, &'a Homes);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        if let Ok(command) = self.1.mvm(self.0, &["sandbox", "rm", "--force", "netsb"]) {
            let _ = output(command);
        }
    }
}

fn sandbox(ctx: &Context, homes: &Homes, args: &[&str]) -> Result<Command, Failure> {
    let mut all = vec!["sandbox"];
    all.extend_from_slice(args);
    homes.mvm(ctx, &all)
}

fn ok(command: Command, what: &str) -> Result<Output, Failure> {
    let out = output(command)?;
    expect_code(&out, 0)
        .map_err(|e| Failure::new(format!("{what}: {e:?}")).with_detail(describe(&out)))?;
    Ok(out)
}

fn network(ctx: &Context, backend: &[&str], hosts: Option<&std::path::Path>) -> CaseResult {
    let servers = servers(ctx, "e2en-sbn", "e2ev-sbn")?;
    let echo = servers
        .remote
        .within(|| netserve::echo(netserve::listen(([0, 0, 0, 0], ECHO_PORT).into())?))?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    std::fs::write(
        homes.config.join("policy.toml"),
        format!(
            "[egress]\nallow = [\"{BOUND}:443\", \"{REMOTE}:{ECHO_PORT}\"]\n\
             [secrets]\nallow = [\"{NAME}\"]\n[secrets.hosts]\n{NAME} = [\"{BOUND}\"]\n"
        ),
    )
    .map_err(fail("writing the policy"))?;
    let _removed = Removed(ctx, &homes);

    let secret_arg = format!("{NAME}={PLACEHOLDER}");
    let allow = format!("{REMOTE}:{ECHO_PORT}");
    let mut args = vec![
        "create",
        "--name",
        "netsb",
        "--secret",
        &secret_arg,
        "--for",
        BOUND,
        "--allow",
        &allow,
    ];
    args.extend_from_slice(backend);
    let mut create = sandbox(ctx, &homes, &args)?;
    create.env("SSL_CERT_FILE", &servers.ca_file);
    if let Some(hosts) = hosts {
        super::tier_net::with_hosts_file(&mut create, hosts);
    }
    let created = ok(create, "sandbox create")?;
    let client = ctx.artifact(HTTPS_GET)?.display().to_string();
    let copied = ok(
        sandbox(ctx, &homes, &["cp", &client, "netsb:/work/get"])?,
        "sandbox cp",
    )?;
    let script = format!(
        "chmod 755 /work/get || exit 90\n\
         echo \"env [${NAME}]\"\n\
         echo sandbox | timeout 20 nc {REMOTE} {ECHO_PORT}\n\
         r=$(/work/get -H \"Authorization: Bearer ${NAME}\" https://{BOUND}/sandbox 2>&1); echo \"bound [$r]\"\n\
         echo other | timeout 5 nc {OTHER} {ECHO_PORT}\n\
         echo done\n"
    );
    let ran = ok(
        sandbox(ctx, &homes, &["exec", "netsb", "--", "sh", "-c", &script])?,
        "sandbox exec",
    )?;
    let stdout = String::from_utf8_lossy(&ran.stdout).into_owned();
    let detail = || describe(&ran);
    if said(&stdout, "env") != PLACEHOLDER
        || !stdout.contains("echo: sandbox")
        || said(&stdout, "bound") != "ok /sandbox"
        || !stdout.contains("done")
    {
        return Err(Failure::new(
            "the sandbox's exec: want its placeholder in $NAME, the echo service's answer and the bound host's",
        )
        .with_detail(detail()));
    }
    if stdout.contains("echo: other") || !echo.seen_at(OTHER).is_empty() {
        return Err(
            Failure::new("a host the plan does not allow was reached").with_detail(detail())
        );
    }

    // Its network would not survive a pause.
    let paused = output(sandbox(ctx, &homes, &["pause", "netsb"])?)?;
    if paused.status.success() || !String::from_utf8_lossy(&paused.stderr).contains("not pausable")
    {
        return Err(
            Failure::new("pausing a sandbox with a network was not refused")
                .with_detail(describe(&paused)),
        );
    }
    let stopped = ok(sandbox(ctx, &homes, &["stop", "netsb"])?, "sandbox stop")?;

    let bearer = format!("Authorization: Bearer {value}");
    let seen: Vec<String> = servers
        .server
        .seen()
        .iter()
        .map(crate::tlsserve::Request::text)
        .collect();
    if seen.len() != 1
        || !seen
            .iter()
            .all(|t| t.contains(" /sandbox") && t.contains(&bearer))
    {
        return Err(Failure::new(format!(
            "the bound host got {} request(s); want one /sandbox carrying the value",
            seen.len()
        )));
    }
    let records = audit_records(&homes.log())?;
    let at = |event: &str| {
        records
            .iter()
            .position(|r| r.pointer("/event") == Some(&event.into()))
    };
    let substituted = substitutions_of(&records, &value);
    // Appended as it happened: inside the session, before its end.
    let in_session = matches!(
        (at("secret_substituted"), at("session_stopping")),
        (Some(s), Some(e)) if s < e
    );
    if substituted != 1 || !in_session {
        return Err(Failure::new(format!(
            "{substituted} secret_substituted records with the value's digest (want 1), before session_stopping: {in_session}"
        )));
    }
    absent(&value, "the exec's output", &stdout)?;
    drop((echo, servers));
    search_host(
        ctx,
        &homes,
        &value,
        &[&created, &copied, &ran, &paused, &stopped],
    )
}
