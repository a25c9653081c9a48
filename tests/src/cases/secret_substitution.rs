//! `secret/substituted` and `secret/substitution-refused`: a secret the guest sees
//! only as a placeholder (`mvm run --secret NAME=PLACEHOLDER --for HOST`). The bound
//! host is an HTTPS server on a remote host of [`crate::netbed`] (its own test CA,
//! which only `mvm`'s egress proxy is told to trust, through `SSL_CERT_FILE`), named
//! by a line this case adds to the test host's `/etc/hosts` for the run (and removes).
//! An HTTPS client that verifies (`mvm-https-get`, piped into the guest: busybox's
//! `wget` sends no signature_algorithms, which rustls requires) sends the placeholder in
//! every place a workload could put it; what reaches each server, what the guest got back, the audit records and
//! the receipt are checked, and the value is searched for on the host.

use std::net::IpAddr;
use std::path::Path;
use std::process::Output;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::audit::Homes;
use super::run::{audit_records, describe, events, expect_code, image_store, last_run, output};
use super::secret::{
    absent, copy_default_image, fresh_value, receipt_statement, search_host, store_secret,
};
use crate::case::{Case, CaseResult, Context, Failure, HTTPS_GET};
use crate::netbed::{Remote, OTHER, REMOTE};
use crate::tlsserve::{TestPki, TlsServer};

/// The substitution cases.
pub const CASES: &[Case] = &[
    Case::kvm("secret/substituted", substituted).limit_secs(420),
    Case::kvm("secret/substitution-refused", substitution_refused).limit_secs(300),
];

/// The secret's name (stored, allowed).
pub(super) const NAME: &str = "API_TOKEN";
/// What the guest sees.
pub(super) const PLACEHOLDER: &str = "MVM_PLACEHOLDER_API_TOKEN_e2e";
/// The bound host's name (on [`REMOTE`]).
pub(super) const BOUND: &str = "api.mvm.test";
/// Another name the server's certificate carries (a forged `Host`).
pub(super) const FORGED: &str = "other.mvm.test";
/// HTTPS.
const PORT: u16 = 443;
/// Exit status of a denied plan, and of a refused boot (runtime/src/run/exit.rs).
const EXIT_DENIED: i32 = 119;
const EXIT_BOOT_REFUSED: i32 = 118;

pub(super) fn fail(what: &str) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The test host's `/etc/hosts` with the bound name added; restored on drop.
pub(super) struct HostsLine {
    before: Option<String>,
}

impl HostsLine {
    pub(super) fn add() -> Result<Self, Failure> {
        let path = Path::new("/etc/hosts");
        let before = std::fs::read_to_string(path).ok();
        let mut text = before.clone().unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{REMOTE} {BOUND}\n"));
        // The test host's initramfs may have no /etc at all.
        std::fs::create_dir_all("/etc").map_err(fail("creating /etc"))?;
        std::fs::write(path, text).map_err(fail("adding the bound name to /etc/hosts"))?;
        Ok(Self { before })
    }
}

impl Drop for HostsLine {
    fn drop(&mut self) {
        let path = Path::new("/etc/hosts");
        let _ = match &self.before {
            Some(text) => std::fs::write(path, text),
            None => std::fs::remove_file(path),
        };
    }
}

/// The remote hosts with an HTTPS server each side (one listener on both addresses),
/// and the test CA written for `mvm` to trust.
pub(super) struct Servers {
    pub(super) server: TlsServer,
    pub(super) ca_file: String,
    pub(super) remote: Remote,
}

pub(super) fn servers(ctx: &Context, ns: &str, veth: &str) -> Result<Servers, Failure> {
    let remote = Remote::create(ns, veth)?;
    let ips: Vec<IpAddr> = [REMOTE, OTHER]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let pki = TestPki::new(&[BOUND, FORGED], &ips)
        .map_err(|e| Failure::new(format!("making the test CA: {e}")))?;
    let listener = remote.within(|| std::net::TcpListener::bind(("0.0.0.0", PORT)))?;
    let server = TlsServer::start(listener, &pki).map_err(fail("starting the HTTPS server"))?;
    let ca_path = ctx.work_file("test-ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).map_err(fail("writing the test CA"))?;
    Ok(Servers {
        server,
        ca_file: ca_path.display().to_string(),
        remote,
    })
}

/// The policy: the secret allowed, substituted only for [`BOUND`], egress to the bound
/// host and to [`OTHER`]'s HTTPS.
pub(super) fn write_policy(homes: &Homes, hosts: bool) -> CaseResult {
    let hosts = if hosts {
        format!("[secrets.hosts]\n{NAME} = [\"{BOUND}\"]\n")
    } else {
        String::new()
    };
    std::fs::write(
        homes.config.join("policy.toml"),
        format!(
            "[egress]\nallow = [\"{BOUND}:{PORT}\", \"{OTHER}:{PORT}\"]\n\
             [secrets]\nallow = [\"{NAME}\"]\n{hosts}"
        ),
    )
    .map_err(fail("writing the policy"))
}

/// The guest's script: the HTTPS client from stdin to `/tmp/get`, then the placeholder
/// in each place a workload could put it. The client verifies the server against the
/// guest's bundle (which holds only what the run gave it), except for [`OTHER`]
/// (`--insecure`: its test CA is not the guest's to trust).
fn script() -> String {
    let get = "/tmp/get";
    let auth = format!("-H \"Authorization: Bearer ${NAME}\"");
    format!(
        "cat > {get} && chmod 755 {get} || exit 90\n\
         echo \"env [${NAME}]\"\n\
         r=$({get} {auth} https://{BOUND}/bound 2>&1); echo \"bound [$r]\"\n\
         r=$({get} --split-at 40 {auth} https://{BOUND}/split 2>&1); echo \"split [$r]\"\n\
         r=$({get} \"https://{BOUND}/query?k=${NAME}\" 2>&1); echo \"query [$r]\"\n\
         r=$({get} -H \"Host: {FORGED}\" {auth} https://{BOUND}/forged 2>&1); echo \"forged [$r]\"\n\
         r=$({get} --data \"token=${NAME}\" https://{BOUND}/body 2>&1); echo \"body [$r]\"\n\
         r=$({get} {auth} https://{BOUND}/echo-auth 2>&1); echo \"echo [$r]\"\n\
         r=$({get} --insecure {auth} https://{OTHER}/other 2>&1); echo \"other [$r]\"\n\
         echo \"ca [$(grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/mvm-egress-ca.pem) $(grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt)]\"\n"
    )
}

/// How many `secret_substituted` records carry the digest of `value`.
pub(super) fn substitutions_of(records: &[Value], value: &str) -> usize {
    let digest = Value::from(format!("sha256:{}", sha256_hex(value.as_bytes())));
    records
        .iter()
        .filter(|r| r.pointer("/event") == Some(&"secret_substituted".into()))
        .filter(|r| r.pointer("/fields/value_sha256") == Some(&digest))
        .count()
}

/// The value of the line `key [...]` the guest printed.
pub(super) fn said<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} [")))
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or("<missing>")
}

/// The run: the bound request arrives with the value, every other placement is
/// refused or reaches its server with the placeholder only, and the guest never
/// gets the value back.
fn substituted(ctx: &Context) -> CaseResult {
    let _hosts = HostsLine::add()?;
    let servers = servers(ctx, "e2en-sub", "e2ev-sub")?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    write_policy(&homes, true)?;
    let receipt = ctx.work_file("receipt.json");
    let receipt_arg = receipt.display().to_string();
    let secret_arg = format!("{NAME}={PLACEHOLDER}");
    let allow_other = format!("{OTHER}:{PORT}");
    let script = script();
    let mut command = homes.run(
        ctx,
        &[
            "--receipt",
            &receipt_arg,
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
    command.env("SSL_CERT_FILE", &servers.ca_file);
    let client =
        std::fs::File::open(ctx.artifact(HTTPS_GET)?).map_err(fail("opening the HTTPS client"))?;
    command.stdin(client);
    let out = output(command)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let detail = || describe(&out);
    let seen = servers.server.seen();
    let at = |path: &str| -> Vec<String> {
        seen.iter()
            .map(crate::tlsserve::Request::text)
            .filter(|t| t.contains(&format!(" {path}")))
            .collect()
    };

    // What the guest saw.
    let bearer_value = format!("Authorization: Bearer {value}");
    let bearer_placeholder = format!("Authorization: Bearer {PLACEHOLDER}");
    let checks: [(&str, bool, &str); 7] = [
        (
            "env",
            said(&stdout, "env") == PLACEHOLDER,
            "its variable holds the placeholder",
        ),
        (
            "bound",
            said(&stdout, "bound") == "ok /bound",
            "the bound request answered",
        ),
        (
            "split",
            said(&stdout, "split") == "ok /split",
            "the request sent in two parts answered",
        ),
        (
            "query",
            said(&stdout, "query") == "status 403",
            "the placeholder in a query refused",
        ),
        (
            "forged",
            said(&stdout, "forged") == "status 403",
            "a forged Host refused",
        ),
        (
            "other",
            said(&stdout, "other") == "ok /other",
            "the other host answered",
        ),
        (
            "ca",
            said(&stdout, "ca") == "1 1",
            "the run's CA in its file and in the bundle",
        ),
    ];
    for (key, ok, what) in checks {
        if !ok {
            return Err(Failure::new(format!(
                "{what}: the guest said {key} [{}]",
                said(&stdout, key)
            ))
            .with_detail(detail()));
        }
    }
    for key in ["body", "echo"] {
        if said(&stdout, key).starts_with("ok ") {
            return Err(Failure::new(format!(
                "{key}: the guest got an answer: {}",
                said(&stdout, key)
            ))
            .with_detail(detail()));
        }
    }

    // What the servers received.
    for path in ["/bound", "/split"] {
        let got = at(path);
        if got.len() != 1 || !got.iter().all(|t| t.contains(&bearer_value)) {
            return Err(Failure::new(format!(
                "the bound host got {} {path} requests; want 1 carrying the value",
                got.len()
            )));
        }
    }
    for path in ["/query", "/forged"] {
        if !at(path).is_empty() {
            return Err(Failure::new(format!("{path} reached the server")));
        }
    }
    let other = at("/other");
    if other.len() != 1 || !other.iter().all(|t| t.contains(&bearer_placeholder)) {
        return Err(Failure::new(format!(
            "the other host got {} /other requests; want 1 carrying the placeholder",
            other.len()
        )));
    }
    let with_value: Vec<String> = seen
        .iter()
        .map(crate::tlsserve::Request::text)
        .filter(|t| t.contains(&value))
        .map(|t| t.lines().next().unwrap_or_default().to_owned())
        .collect();
    let carried = |path: &str| with_value.iter().any(|l| l.contains(path));
    if with_value.len() != 3 || !carried("/bound") || !carried("/split") || !carried("/echo-auth") {
        return Err(Failure::new(format!(
            "requests that carried the value: {with_value:?}; want /bound, /split and /echo-auth only"
        )));
    }

    // The records.
    let records = last_run(&audit_records(&homes.log())?)?;
    let kinds = events(&records);
    let digest = format!("sha256:{}", sha256_hex(value.as_bytes()));
    let substituted: Vec<&Value> = records
        .iter()
        .filter(|r| r.pointer("/event") == Some(&"secret_substituted".into()))
        .collect();
    let good = |r: &&Value| {
        r.pointer("/fields/name") == Some(&NAME.into())
            && r.pointer("/fields/value_sha256") == Some(&digest.clone().into())
            && r.pointer("/fields/destination")
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains(BOUND))
    };
    if substituted.len() != 3 || !substituted.iter().all(good) {
        return Err(Failure::new(format!(
            "secret_substituted records: {substituted:?} (want 3, for {BOUND}, with the value's digest)"
        )));
    }
    let reasons: Vec<&str> = records
        .iter()
        .filter(|r| r.pointer("/event") == Some(&"secret_refused".into()))
        .filter_map(|r| r.pointer("/fields/reason").and_then(Value::as_str))
        .collect();
    for want in [
        "placeholder_in_target",
        "host_mismatch",
        "placeholder_in_body",
        "value_reflected",
    ] {
        if !reasons.contains(&want) {
            return Err(Failure::new(format!(
                "no secret_refused for {want}: {reasons:?} ({kinds:?})"
            )));
        }
    }
    if kinds.iter().any(|k| k == "secret_released") {
        return Err(Failure::new(format!(
            "a substituted secret was recorded as released into the guest: {kinds:?}"
        )));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;

    // The receipt says how the run had the secret.
    let (statement, payload) = receipt_statement(&receipt)?;
    let listed = statement
        .pointer("/predicate/secrets/0")
        .cloned()
        .unwrap_or_default();
    if listed.pointer("/name") != Some(&NAME.into())
        || listed.pointer("/sha256") != Some(&digest.into())
        || listed.pointer("/delivery") != Some(&"substitution".into())
    {
        return Err(Failure::new(format!("the receipt's secrets: {statement}")));
    }
    absent(&value, "the receipt", &String::from_utf8_lossy(&payload))?;
    absent(&value, "the workload's output", &stdout)?;
    drop(servers);
    search_host(ctx, &homes, &value, &[&out])
}

/// No value goes out when the policy does not bind the secret to the host (denied at
/// admission, exit 119), nor when the VMM refuses the boot (a changed initramfs, exit
/// 118): no `secret_substituted`, no request reaches the server, the value is nowhere.
/// The case's image store is its own copy, with one byte of the initramfs changed.
fn substitution_refused(ctx: &Context) -> CaseResult {
    let _hosts = HostsLine::add()?;
    let servers = servers(ctx, "e2en-subr", "e2ev-subr")?;
    // The case's own store with the changed image, made before `Homes` would link the
    // shared one in its place (step 1 is denied before any boot, so it may use it too).
    copy_default_image(
        &image_store(ctx)?.join("images"),
        &ctx.work_file("data").join("images"),
    )?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    let secret_arg = format!("{NAME}={PLACEHOLDER}");
    let wget = format!(
        "cat > /tmp/get && chmod 755 /tmp/get && /tmp/get -H \"Authorization: Bearer ${NAME}\" https://{BOUND}/x"
    );
    let run = |homes: &Homes| -> Result<Output, Failure> {
        let mut command = homes.run(
            ctx,
            &[
                "--secret",
                &secret_arg,
                "--for",
                BOUND,
                "--",
                "sh",
                "-c",
                &wget,
            ],
        )?;
        command.env("SSL_CERT_FILE", &servers.ca_file);
        let client = std::fs::File::open(ctx.artifact(HTTPS_GET)?)
            .map_err(fail("opening the HTTPS client"))?;
        command.stdin(client);
        output(command)
    };

    // 1. The policy allows the secret but binds it to no host.
    write_policy(&homes, false)?;
    let denied = run(&homes)?;
    expect_code(&denied, EXIT_DENIED)?;
    let stderr = String::from_utf8_lossy(&denied.stderr);
    if !stderr.contains("[secrets.hosts]") {
        return Err(
            Failure::new("the denial does not name [secrets.hosts]").with_detail(describe(&denied))
        );
    }

    // 2. Bound, but the image's initramfs changed after it was built.
    write_policy(&homes, true)?;
    let refused = run(&homes)?;
    expect_code(&refused, EXIT_BOOT_REFUSED)?;
    let records = last_run(&audit_records(&homes.log())?)?;
    let kinds = events(&records);
    if !kinds.iter().any(|k| k == "boot_refused")
        || kinds
            .iter()
            .any(|k| k == "secret_substituted" || k == "exec_started")
    {
        return Err(Failure::new(format!(
            "a refused boot's records: {kinds:?} (want boot_refused, no secret_substituted)"
        )));
    }
    if !servers.server.seen().is_empty() {
        return Err(Failure::new("a request reached the bound host"));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;
    drop(servers);
    search_host(ctx, &homes, &value, &[&denied, &refused])
}
