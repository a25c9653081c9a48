//! `secret/mcp-substituted`: an AI agent's tool call with a secret it never sees.
//! `mvm mcp`'s `run_command` with `secrets_for` (docs/mcp.md): the command gets the
//! placeholder, its HTTPS request reaches the bound host with the value, and neither
//! the tool's answer nor anything on the host holds the value. A host the policy does
//! not bind the secret to is a tool error. The bound host and its test CA are
//! `secret/substituted`'s; the HTTPS client travels as base64 text in the tool call's
//! `stdin` (a tool call carries text only).

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdout, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use super::audit::Homes;
use super::run::{audit_records, events};
use super::secret::{absent, fresh_value, search_host, store_secret};
use super::secret_substitution::{
    fail, said, servers, substitutions_of, write_policy, HostsLine, BOUND, FORGED, NAME,
    PLACEHOLDER,
};
use crate::case::{Case, CaseResult, Context, Failure, HTTPS_GET};

/// The case: two tool calls, one VM.
pub const CASES: &[Case] = &[Case::kvm("secret/mcp-substituted", mcp_substituted).limit_secs(300)];

/// Reads the server's lines until the answer to request `id` (other messages are skipped).
fn answer(
    lines: &mut BufReader<ChildStdout>,
    id: u64,
    seen: &mut String,
) -> Result<Value, Failure> {
    loop {
        let mut line = String::new();
        let n = lines
            .read_line(&mut line)
            .map_err(fail("reading mvm mcp's output"))?;
        if n == 0 {
            return Err(
                Failure::new(format!("mvm mcp ended before answering request {id}"))
                    .with_detail(seen.clone()),
            );
        }
        seen.push_str(&line);
        let message: Value = serde_json::from_str(&line)
            .map_err(|e| Failure::new(format!("mvm mcp wrote a line that is not JSON: {e}")))?;
        if message.get("id") == Some(&json!(id)) {
            return Ok(message);
        }
    }
}

fn mcp_substituted(ctx: &Context) -> CaseResult {
    let _hosts = HostsLine::add()?;
    let servers = servers(ctx, "e2en-subm", "e2ev-subm")?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    write_policy(&homes, true)?;
    let client = std::fs::read(ctx.artifact(HTTPS_GET)?).map_err(fail("reading the client"))?;
    let client_b64 = base64::engine::general_purpose::STANDARD.encode(client);

    // stderr to a file: a pipe nobody reads while the calls run would fill and stop
    // the server.
    let stderr_path = ctx.work_file("mcp.stderr");
    let stderr = std::fs::File::create(&stderr_path).map_err(fail("creating mcp.stderr"))?;
    let mut command = homes.mvm(ctx, &["mcp"])?;
    command
        .env("SSL_CERT_FILE", &servers.ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm mcp: {e}")))?;
    let (Some(mut to_server), Some(from_server)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Failure::new("mvm mcp has no pipes"));
    };
    let mut lines = BufReader::new(from_server);
    let mut seen = String::new();
    let mut send = |message: Value| -> CaseResult {
        writeln!(to_server, "{message}").map_err(fail("writing to mvm mcp"))
    };
    let secret = |host: &str| json!([{"name": NAME, "placeholder": PLACEHOLDER, "host": host}]);
    send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "mvm-e2e", "version": "0"}}}),
    )?;
    answer(&mut lines, 1, &mut seen)?;
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
    let script = format!(
        "base64 -d > /tmp/get && chmod 755 /tmp/get || exit 90\n\
         echo \"env [${NAME}]\"\n\
         r=$(/tmp/get -H \"Authorization: Bearer ${NAME}\" https://{BOUND}/mcp 2>&1); echo \"bound [$r]\"\n"
    );
    send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "run_command", "arguments": {
            "command": ["sh", "-c", script], "stdin": client_b64,
            "secrets_for": secret(BOUND)}}}),
    )?;
    let ran = answer(&mut lines, 2, &mut seen)?;
    send(
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "run_command", "arguments": {
            "command": ["true"], "secrets_for": secret(FORGED)}}}),
    )?;
    let denied = answer(&mut lines, 3, &mut seen)?;
    // End of input: the server answers what it has and exits.
    drop(to_server);
    let status = child.wait().map_err(fail("waiting for mvm mcp"))?;
    let out = std::process::Output {
        status,
        stdout: seen.clone().into_bytes(),
        stderr: std::fs::read(&stderr_path).map_err(fail("reading mcp.stderr"))?,
    };
    let detail = || {
        format!(
            "{seen}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };

    let stdout = ran
        .pointer("/result/structuredContent/stdout")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if ran.pointer("/result/isError") != Some(&json!(false))
        || ran.pointer("/result/structuredContent/exit_code") != Some(&json!(0))
        || said(stdout, "env") != PLACEHOLDER
        || said(stdout, "bound") != "ok /mcp"
    {
        return Err(Failure::new(
            "run_command with secrets_for: want exit 0, the placeholder in $NAME and the bound host's answer",
        )
        .with_detail(detail()));
    }
    let bearer = format!("Authorization: Bearer {value}");
    let got: Vec<String> = servers
        .server
        .seen()
        .iter()
        .map(crate::tlsserve::Request::text)
        .collect();
    if got.len() != 1
        || !got
            .iter()
            .all(|t| t.contains(" /mcp") && t.contains(&bearer))
    {
        return Err(Failure::new(format!(
            "the bound host got {} request(s); want one /mcp carrying the value",
            got.len()
        )));
    }
    let why = denied
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if denied.pointer("/result/isError") != Some(&json!(true)) || !why.contains(FORGED) {
        return Err(Failure::new(format!(
            "a host the policy does not bind: want a tool error naming {FORGED}, got {denied}"
        ))
        .with_detail(detail()));
    }

    let records = audit_records(&homes.log())?;
    let substituted = substitutions_of(&records, &value);
    let kinds = events(&records);
    if substituted != 1 || kinds.iter().any(|k| k == "secret_released") {
        return Err(Failure::new(format!(
            "audit: {substituted} secret_substituted with the value's digest (want 1), and no secret_released: {kinds:?}"
        )));
    }
    absent(&value, "mvm mcp's answers", &seen)?;
    drop(servers);
    search_host(ctx, &homes, &value, &[&out])
}
