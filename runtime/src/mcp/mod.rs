//! `mvm mcp`: a Model Context Protocol server on stdio, so an AI agent's tool calls run in
//! fresh microVMs. JSON-RPC 2.0, one message per line; the handshake revisions
//! ([`PROTOCOL_VERSIONS`]), the `tools` capability.
//!
//! Tools:
//! - `run_command`: runs a command (with optional stdin, image, environment, timeout, and
//!   secrets it sees only as placeholders) in a fresh microVM through the SDK
//!   ([`crate::sdk::Run`]): admitted against the host's policy, verified, audited, as
//!   `mvm run`. Returns exit code, stdout, stderr. Secrets are never released into the
//!   VM here: the agent wrote the command, so anything the VM holds can reach it.
//! - `host_info`: which backend this host gives and the wall each backend puts around a
//!   workload (`mvm doctor`'s table), so the agent knows what it is running behind.
//! - `sandbox_create`, `sandbox_exec`, `sandbox_write_file`, `sandbox_read_file`,
//!   `sandbox_list`, `sandbox_stop`: long-lived sandboxes through the SDK's
//!   [`crate::sandbox`] ([`sandbox_tools`]), so state carries across calls.
//!
//! Bad input is answered, never fatal: a line that is not JSON is a parse error (-32700),
//! a message that is not a request an invalid request (-32600), an unknown method -32601,
//! an unknown tool or bad arguments -32602; a run that fails (denied, refused, no
//! backend) is a tool result with `isError`. Each tool call runs on its own thread, so
//! `ping` and other calls are answered while a VM runs. Logs go to stderr.

use std::io::{BufRead, Read, Write};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

mod args;
mod sandbox_tools;

use crate::backend::detect::{judge, HostFacts};
use crate::backend::wall;
use crate::sdk::Run;
use args::Args;

/// The protocol revisions this server speaks, newest first (the initialize handshake).
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// The longest line read (a request with a large stdin fits).
const MAX_LINE: usize = 8 << 20;
/// The most of a command's stdout or stderr returned (the rest is cut, and says so).
const MAX_OUTPUT: usize = 1 << 20;
/// The longest timeout a tool call may ask for.
const MAX_TIMEOUT_SECS: u64 = 3600;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// Serves `input` (stdin) until it ends, answering on `output` (stdout). Returns the
/// process exit status.
pub fn serve(input: impl BufRead, output: impl Write + Send + 'static) -> i32 {
    let out = Arc::new(Mutex::new(output));
    let mut workers = Vec::new();
    for line in LimitedLines::new(input) {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                send(&out, &error(Value::Null, PARSE_ERROR, &e));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                send(
                    &out,
                    &error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}")),
                );
                continue;
            }
        };
        match classify(&message) {
            Message::Notification => {}
            Message::Invalid(id, why) => send(&out, &error(id, INVALID_REQUEST, &why)),
            Message::Request { id, method, params } if method == "tools/call" => {
                let out = Arc::clone(&out);
                let spawned = std::thread::Builder::new()
                    .name("mcp-tool".into())
                    .spawn(move || send(&out, &call_tool(id, &params)));
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => tracing::error!("starting a tool thread: {e}"),
                }
            }
            Message::Request { id, method, params } => {
                send(&out, &answer(id, &method, &params));
            }
        }
    }
    // Input ended: let calls in flight answer before exiting.
    for worker in workers {
        let _ = worker.join();
    }
    0
}

enum Message {
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    Notification,
    Invalid(Value, String),
}

fn classify(message: &Value) -> Message {
    let Some(obj) = message.as_object() else {
        return Message::Invalid(Value::Null, "a message is a JSON object".into());
    };
    let id = obj.get("id").cloned();
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return Message::Invalid(id.unwrap_or(Value::Null), "jsonrpc must be \"2.0\"".into());
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        // A response to us (we send no requests) or garbage.
        return match id {
            Some(id) => Message::Invalid(id, "no method".into()),
            None => Message::Notification,
        };
    };
    match id {
        None => Message::Notification,
        Some(id) if id.is_string() || id.is_i64() || id.is_u64() => Message::Request {
            id,
            method: method.to_owned(),
            params: obj.get("params").cloned().unwrap_or(Value::Null),
        },
        Some(_) => Message::Invalid(Value::Null, "id must be a string or an integer".into()),
    }
}

fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn send<W: Write>(out: &Mutex<W>, message: &Value) {
    let mut line = message.to_string();
    line.push('\n');
    if let Ok(mut out) = out.lock() {
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            tracing::warn!("mcp: the client's end of stdout is closed");
        }
    }
}

/// Every method but `tools/call`.
fn answer(id: Value, method: &str, params: &Value) -> Value {
    match method {
        "initialize" => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = asked
                .filter(|v| PROTOCOL_VERSIONS.contains(v))
                .unwrap_or(PROTOCOL_VERSIONS[0]);
            result(
                id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "mvm", "title": "mvm microVM sandbox", "version": env!("CARGO_PKG_VERSION")},
                    "instructions": "Each run_command call runs in a fresh microVM (its own kernel, no network unless the host's policy gives one), admitted and audited by the host. host_info says which wall this host gives.",
                }),
            )
        }
        "ping" => result(id, json!({})),
        "tools/list" => result(id, json!({"tools": tools()})),
        other => error(id, METHOD_NOT_FOUND, &format!("unknown method {other:?}")),
    }
}

fn tools() -> Value {
    let one_shot = json!([
        {
            "name": "run_command",
            "title": "Run a command in a fresh microVM",
            "description": "Runs a command in a new microVM (Linux; busybox userland in the default image, Debian 12 with python3 and pip in the image \"python\") and returns its exit code, stdout and stderr. Nothing persists between calls. Give the program and its arguments as a list; for a shell line use [\"sh\", \"-c\", \"...\"]. stdin, if given, is the command's standard input.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "The program and its arguments."},
                    "stdin": {"type": "string", "description": "Text for the command's standard input."},
                    "image": {"type": "string", "description": "The image, by name or digest (default: default; \"python\" has python3)."},
                    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECS, "description": "Stop the command after this many seconds (default 120)."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Environment variables for the command."},
                    "secrets_for": secrets_for_schema()
                },
                "required": ["command"],
                "additionalProperties": false
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "exit_code": {"type": "integer"},
                    "stdout": {"type": "string"},
                    "stderr": {"type": "string"},
                    "timed_out": {"type": "boolean"},
                    "tier": {"type": "string"}
                },
                "required": ["exit_code", "stdout", "stderr", "timed_out", "tier"]
            }
        },
        {
            "name": "host_info",
            "title": "What wall this host gives",
            "description": "Which backend runs the microVMs on this host and, for every backend, the wall it puts around a workload (hardware virtualization, who verifies the boot, jail, seccomp, egress enforcement).",
            "inputSchema": {"type": "object", "properties": {}, "additionalProperties": false}
        }
    ]);
    let mut all = match one_shot {
        Value::Array(tools) => tools,
        _ => Vec::new(),
    };
    all.extend(sandbox_tools::definitions());
    Value::Array(all)
}

/// The schema of `secrets_for` (run_command, sandbox_create).
pub(super) fn secrets_for_schema() -> Value {
    json!({
        "type": "array",
        "description": "Stored secrets the command sees only as placeholders: the command (in a sandbox, every exec) gets $NAME = placeholder, and the host puts the real value in its place in the headers of HTTPS requests to host (port 443), and nowhere else. The host's policy decides which secrets and hosts are allowed. The value never enters the VM, so it never appears in this tool's output.",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "The stored secret's name (mvm secret set NAME)."},
                "placeholder": {"type": "string", "description": "What the command sees instead of the value."},
                "host": {"type": "string", "description": "The DNS name whose HTTPS requests get the value."}
            },
            "required": ["name", "placeholder", "host"],
            "additionalProperties": false
        }
    })
}

/// A tool's answer: its text, its structured content, whether it is an error.
fn tool_result(id: Value, text: String, structured: Option<Value>, is_error: bool) -> Value {
    let mut body = Map::new();
    body.insert("content".into(), json!([{"type": "text", "text": text}]));
    if let Some(s) = structured {
        body.insert("structuredContent".into(), s);
    }
    body.insert("isError".into(), is_error.into());
    result(id, Value::Object(body))
}

fn call_tool(id: Value, params: &Value) -> Value {
    let name = params.get("name").and_then(Value::as_str).unwrap_or("");
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    match name {
        "run_command" => match RunCommand::parse(&args) {
            Ok(call) => call.run(id),
            Err(why) => tool_result(id, format!("run_command: {why}"), None, true),
        },
        "host_info" => host_info(id),
        other => match sandbox_tools::call(other, &args) {
            Some(Ok((text, structured))) => tool_result(id, text, Some(structured), false),
            Some(Err(why)) => tool_result(id, format!("{other}: {why}"), None, true),
            None => error(id, INVALID_PARAMS, &format!("unknown tool {other:?}")),
        },
    }
}

/// `run_command`'s arguments, checked.
struct RunCommand {
    command: Vec<String>,
    stdin: Option<String>,
    image: Option<String>,
    timeout_secs: u64,
    env: Vec<(String, String)>,
    secrets_for: Vec<args::Substitution>,
}

impl RunCommand {
    fn parse(args: &Value) -> Result<Self, String> {
        let args = Args::new(
            args,
            &[
                "command",
                "stdin",
                "image",
                "timeout_secs",
                "env",
                "secrets_for",
            ],
        )?;
        Ok(Self {
            command: args.command("command")?,
            stdin: args.text("stdin")?,
            image: args.text("image")?,
            timeout_secs: args.number("timeout_secs", 1..=MAX_TIMEOUT_SECS, 120)?,
            env: args.env("env")?,
            secrets_for: args.substitutions("secrets_for")?,
        })
    }

    fn run(self, id: Value) -> Value {
        let mut run = Run::new(self.command).timeout_secs(self.timeout_secs);
        if let Some(image) = self.image {
            run = run.image(image);
        }
        for (k, v) in self.env {
            run = run.env(k, v);
        }
        for s in self.secrets_for {
            run = run.secret_for(s.name, s.placeholder, s.host);
        }
        if let Some(stdin) = self.stdin {
            run = run.stdin(std::io::Cursor::new(stdin.into_bytes()));
        }
        match run.output() {
            Ok(out) => {
                let stdout = cut(&out.stdout);
                let stderr = cut(&out.stderr);
                let text = format!(
                    "exit code {}{}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
                    out.exit_code,
                    if out.timed_out { " (timed out)" } else { "" }
                );
                let structured = json!({
                    "exit_code": out.exit_code,
                    "stdout": stdout,
                    "stderr": stderr,
                    "timed_out": out.timed_out,
                    "tier": out.tier.to_string(),
                });
                tool_result(id, text, Some(structured), false)
            }
            Err(e) => tool_result(id, format!("the run failed: {e}"), None, true),
        }
    }
}

/// `bytes` as text, cut at [`MAX_OUTPUT`] (and saying so).
pub(crate) fn cut(bytes: &[u8]) -> String {
    let kept = bytes.get(..MAX_OUTPUT).unwrap_or(bytes);
    let mut text = String::from_utf8_lossy(kept).into_owned();
    if bytes.len() > MAX_OUTPUT {
        text.push_str(&format!(
            "\n[{} more bytes cut]\n",
            bytes.len() - MAX_OUTPUT
        ));
    }
    text
}

fn host_info(id: Value) -> Value {
    let detection = judge(&HostFacts::probe());
    let as_root = nix::unistd::Uid::effective().is_root();
    let walls: Vec<Value> = wall::all(as_root)
        .into_iter()
        .map(|w| serde_json::to_value(w).unwrap_or(Value::Null))
        .collect();
    let chosen = detection.chosen.map(|t| t.to_string());
    let text = match &chosen {
        Some(t) => format!(
            "runs go to the {t} backend here; walls: {}",
            Value::from(walls.clone())
        ),
        None => "no backend can run a microVM on this host".to_owned(),
    };
    tool_result(
        id,
        text,
        Some(json!({"backend": chosen, "walls": walls})),
        false,
    )
}

/// Lines of at most [`MAX_LINE`] bytes; a longer one is skipped whole and reported.
struct LimitedLines<R> {
    input: R,
}

impl<R: BufRead> LimitedLines<R> {
    fn new(input: R) -> Self {
        Self { input }
    }
}

impl<R: BufRead> Iterator for LimitedLines<R> {
    type Item = Result<String, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
        match self.input.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) if line.last() != Some(&b'\n') && line.len() >= MAX_LINE => {
                // Drop the rest of this line.
                let mut rest = Vec::new();
                let _ = self.input.read_until(b'\n', &mut rest);
                Some(Err(format!("a message longer than {MAX_LINE} bytes")))
            }
            Ok(_) => {
                Some(String::from_utf8(line).map_err(|_| "a message that is not UTF-8".to_owned()))
            }
            Err(e) => {
                tracing::warn!("mcp: reading stdin: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `input` and returns the answers, one JSON value per line.
    fn exchange(input: &str) -> Vec<Value> {
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        assert_eq!(serve(input.as_bytes(), out.clone()), 0);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn handshake_list_and_ping() {
        let answers = exchange(concat!(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":"b","method":"tools/list"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":4,"method":"initialize","params":{"protocolVersion":"1999-01-01"}}"#,
            "\n",
        ));
        assert_eq!(answers.len(), 4, "{answers:?}");
        assert_eq!(answers[0]["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(answers[0]["result"]["serverInfo"]["name"], "mvm");
        let tools = answers[1]["result"]["tools"].as_array().unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "run_command",
                "host_info",
                "sandbox_create",
                "sandbox_exec",
                "sandbox_write_file",
                "sandbox_read_file",
                "sandbox_list",
                "sandbox_stop"
            ]
        );
        for tool in tools {
            assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
            assert_eq!(tool["inputSchema"]["additionalProperties"], false, "{tool}");
        }
        assert_eq!(answers[1]["id"], "b");
        assert_eq!(answers[2]["result"], json!({}));
        // A version this server does not speak: it offers its newest.
        assert_eq!(
            answers[3]["result"]["protocolVersion"],
            PROTOCOL_VERSIONS[0]
        );
    }

    #[test]
    fn bad_input_is_answered_and_never_fatal() {
        let answers = exchange(concat!(
            "{not json\n",
            "[1,2]\n",
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":2,"method":"resources/list"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"rm_rf","arguments":{}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"run_command","arguments":{"command":[]}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"run_command","arguments":{"command":["true"],"timeout_secs":0}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"run_command","arguments":{"command":"ls","bogus":1}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#,
            "\n",
        ));
        let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).cloned().unwrap();
        let code = |a: &Value| a["error"]["code"].as_i64();
        assert_eq!(code(&answers[0]), Some(PARSE_ERROR));
        assert_eq!(code(&answers[1]), Some(INVALID_REQUEST));
        assert_eq!(code(&by_id(json!(1))), Some(INVALID_REQUEST));
        assert_eq!(code(&by_id(json!(2))), Some(METHOD_NOT_FOUND));
        assert_eq!(code(&by_id(json!(3))), Some(INVALID_PARAMS));
        for id in [4, 5, 6] {
            let a = by_id(json!(id));
            assert_eq!(a["result"]["isError"], true, "{a}");
        }
        assert!(by_id(json!(6))["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("unknown argument"));
        assert_eq!(by_id(json!(7))["result"], json!({}));
        assert_eq!(answers.len(), 10, "{answers:?}");
    }

    #[test]
    fn output_is_cut_and_says_so() {
        let big = vec![b'a'; MAX_OUTPUT + 10];
        let text = cut(&big);
        assert!(text.ends_with("[10 more bytes cut]\n"));
        assert_eq!(cut(b"ok\n"), "ok\n");
    }
}
