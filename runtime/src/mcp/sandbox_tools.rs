//! The sandbox tools of `mvm mcp`: an agent creates a sandbox once and calls into it
//! many times (files and processes persist between calls), through the SDK's
//! [`crate::sandbox`], the same code as `mvm sandbox`.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mvm_agent::protocol::ExecRequest;
use mvm_agent::Stdin;
use serde_json::{json, Value};

use super::args::Args;
use super::{cut, MAX_OUTPUT, MAX_TIMEOUT_SECS};
use crate::sandbox::{self, SandboxOptions};

/// The longest TTL a tool call may ask for.
const MAX_TTL_SECS: u64 = 24 * 3600;

/// The tools' definitions, for `tools/list`.
pub(super) fn definitions() -> Vec<Value> {
    let sandbox = json!({"type": "string", "description": "The sandbox's id or name (from sandbox_create or sandbox_list)."});
    vec![
        json!({
            "name": "sandbox_create",
            "title": "Create a long-lived microVM sandbox",
            "description": "Boots a microVM that stays up across calls until sandbox_stop or its TTL: files written and processes started in it persist between sandbox_exec calls. Returns its id. /work is its working directory, owned by the user commands run as.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "description": "The image, by name or digest (default: default)."},
                    "name": {"type": "string", "description": "A unique name to refer to it by."},
                    "ttl_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_SECS, "description": "Stop it after this many seconds (default 900)."},
                    "allow": {"type": "array", "items": {"type": "string"}, "description": "Destinations it may reach, as HOST_OR_CIDR:PORT[-PORT][/tcp|/udp] (the host's policy caps them). Without it, it has no network."},
                    "secrets_for": super::secrets_for_schema()
                },
                "additionalProperties": false
            },
            "outputSchema": info_schema()
        }),
        json!({
            "name": "sandbox_exec",
            "title": "Run a command in a sandbox",
            "description": "Runs a command in a running sandbox (cwd /work unless given) and returns its exit code, stdout and stderr. For a shell line use [\"sh\", \"-c\", \"...\"].",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox,
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "The program and its arguments."},
                    "stdin": {"type": "string", "description": "Text for the command's standard input."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "workdir": {"type": "string", "description": "Absolute working directory."},
                    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECS, "description": "Kill the command after this many seconds (default 120)."}
                },
                "required": ["sandbox", "command"],
                "additionalProperties": false
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "exit_code": {"type": "integer"},
                    "stdout": {"type": "string"},
                    "stderr": {"type": "string"},
                    "timed_out": {"type": "boolean"}
                },
                "required": ["exit_code", "stdout", "stderr", "timed_out"]
            }
        }),
        json!({
            "name": "sandbox_write_file",
            "title": "Write a file into a sandbox",
            "description": "Writes a file in a running sandbox (whole or not at all), owned by the user commands run as. Give text as content, or bytes as content_base64.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox,
                    "path": {"type": "string", "description": "Absolute path in the sandbox, e.g. /work/main.py."},
                    "content": {"type": "string", "description": "The file's text."},
                    "content_base64": {"type": "string", "description": "The file's bytes, base64."},
                    "mode": {"type": "integer", "minimum": 0, "maximum": 511, "description": "Permission bits (default 0644 = 420)."}
                },
                "required": ["sandbox", "path"],
                "additionalProperties": false
            },
            "outputSchema": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "size": {"type": "integer"}},
                "required": ["path", "size"]
            }
        }),
        json!({
            "name": "sandbox_read_file",
            "title": "Read a file from a sandbox",
            "description": format!("Reads a file from a running sandbox (at most {MAX_OUTPUT} bytes): its text, or base64 when it is not UTF-8."),
            "inputSchema": {
                "type": "object",
                "properties": {"sandbox": sandbox, "path": {"type": "string", "description": "Absolute path in the sandbox."}},
                "required": ["sandbox", "path"],
                "additionalProperties": false
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "size": {"type": "integer"},
                    "encoding": {"type": "string", "enum": ["utf-8", "base64"]},
                    "content": {"type": "string"}
                },
                "required": ["path", "size", "encoding", "content"]
            }
        }),
        json!({
            "name": "sandbox_list",
            "title": "List sandboxes",
            "description": "Lists this user's sandboxes: ready, starting, stopped, failed, or stale (its supervisor was killed).",
            "inputSchema": {"type": "object", "properties": {}, "additionalProperties": false},
            "outputSchema": {
                "type": "object",
                "properties": {"sandboxes": {"type": "array", "items": info_schema()}},
                "required": ["sandboxes"]
            }
        }),
        json!({
            "name": "sandbox_stop",
            "title": "Stop a sandbox",
            "description": "Stops a sandbox: its VM powers off and everything in it is gone.",
            "inputSchema": {
                "type": "object",
                "properties": {"sandbox": sandbox},
                "required": ["sandbox"],
                "additionalProperties": false
            },
            "outputSchema": info_schema()
        }),
    ]
}

fn info_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": ["string", "null"]},
            "image": {"type": "string"},
            "status": {"type": "string"},
            "tier": {"type": ["string", "null"]},
            "expires": {"type": ["string", "null"]}
        },
        "required": ["id", "status"]
    })
}

/// Runs tool `name`, if it is one of these: its text and structured result, or
/// why it failed (a tool error the agent reads).
pub(super) fn call(name: &str, args: &Value) -> Option<Result<(String, Value), String>> {
    Some(match name {
        "sandbox_create" => create(args),
        "sandbox_exec" => exec(args),
        "sandbox_write_file" => write_file(args),
        "sandbox_read_file" => read_file(args),
        "sandbox_list" => Args::new(args, &[]).map(|_| {
            let all = sandbox::list();
            (
                format!("{} sandboxes", all.len()),
                json!({ "sandboxes": all }),
            )
        }),
        "sandbox_stop" => stop(args),
        _ => return None,
    })
}

fn create(args: &Value) -> Result<(String, Value), String> {
    let options = create_options(args)?;
    let info = sandbox::create(&options).map_err(|e| e.to_string())?;
    let value = json!(info);
    Ok((format!("sandbox {} is ready", info.id), value))
}

/// `sandbox_create`'s arguments as the sandbox's options.
fn create_options(args: &Value) -> Result<SandboxOptions, String> {
    let args = Args::new(args, &["image", "name", "ttl_secs", "allow", "secrets_for"])?;
    let mut options = SandboxOptions::default();
    if let Some(image) = args.text("image")? {
        options.image = image;
    }
    options.name = args.text("name")?;
    options.ttl = Duration::from_secs(args.number("ttl_secs", 1..=MAX_TTL_SECS, 900)?);
    options.net.allow = args
        .texts("allow")?
        .iter()
        .map(|d| crate::net::allow::parse_allow(d).map_err(|e| format!("allow: {e}")))
        .collect::<Result<_, _>>()?;
    // One call, so that two entries for one secret are checked together.
    let asked = args.substitutions("secrets_for")?;
    let secrets: Vec<String> = asked
        .iter()
        .map(|s| format!("{}={}", s.name, s.placeholder))
        .collect();
    let hosts: Vec<String> = asked
        .iter()
        .map(|s| format!("{}={}", s.name, s.host))
        .collect();
    options.substitutions = crate::secrets::split_secret_args(&secrets, &hosts)
        .map(|(_, substitutions)| substitutions)
        .map_err(|e| format!("secrets_for: {e}"))?;
    Ok(options)
}

fn exec(args: &Value) -> Result<(String, Value), String> {
    let args = Args::new(
        args,
        &[
            "sandbox",
            "command",
            "stdin",
            "env",
            "workdir",
            "timeout_secs",
        ],
    )?;
    let id = args.required_text("sandbox")?;
    let request = ExecRequest {
        argv: args.command("command")?,
        env: args.env("env")?.into_iter().collect(),
        cwd: args.text("workdir")?,
        timeout_ms: Some(
            args.number("timeout_secs", 1..=MAX_TIMEOUT_SECS, 120)?
                .saturating_mul(1000),
        ),
        ..ExecRequest::default()
    };
    let stdin = args.text("stdin")?;
    let client = sandbox::connect(&id).map_err(|e| e.to_string())?;
    let mode = if stdin.is_some() {
        Stdin::Bytes(stdin.unwrap_or_default().into_bytes())
    } else {
        Stdin::Null
    };
    let output = client
        .exec(&request, mode)
        .map_err(|e| e.to_string())?
        .wait_output()
        .map_err(|e| e.to_string())?;
    let stdout = cut(&output.stdout);
    let stderr = cut(&output.stderr);
    let code = output.status.shell_code();
    let text = format!(
        "exit code {code}{}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        if output.status.timed_out {
            " (timed out)"
        } else {
            ""
        }
    );
    Ok((
        text,
        json!({"exit_code": code, "stdout": stdout, "stderr": stderr, "timed_out": output.status.timed_out}),
    ))
}

fn write_file(args: &Value) -> Result<(String, Value), String> {
    let args = Args::new(
        args,
        &["sandbox", "path", "content", "content_base64", "mode"],
    )?;
    let id = args.required_text("sandbox")?;
    let path = args.required_text("path")?;
    let bytes = match (args.text("content")?, args.text("content_base64")?) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("content_base64: {e}"))?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => return Err("give content or content_base64, not both".into()),
    };
    let mode = u32::try_from(args.number("mode", 0..=0o777, 0o644)?).unwrap_or(0o644);
    let client = sandbox::connect(&id).map_err(|e| e.to_string())?;
    let size = client
        .write_file(&path, mode, &mut bytes.as_slice())
        .map_err(|e| e.to_string())?;
    let value = json!({"path": path, "size": size});
    Ok((format!("wrote {size} bytes to {path}"), value))
}

fn read_file(args: &Value) -> Result<(String, Value), String> {
    let args = Args::new(args, &["sandbox", "path"])?;
    let id = args.required_text("sandbox")?;
    let path = args.required_text("path")?;
    let client = sandbox::connect(&id).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    let mut limited = LimitedSink {
        inner: &mut bytes,
        left: MAX_OUTPUT,
    };
    client
        .read_file(&path, &mut limited)
        .map_err(|e| e.to_string())?;
    let size = bytes.len();
    let (encoding, content) = match String::from_utf8(bytes) {
        Ok(text) => ("utf-8", text),
        Err(e) => ("base64", STANDARD.encode(e.as_bytes())),
    };
    let value = json!({"path": path, "size": size, "encoding": encoding, "content": content});
    let text = match encoding {
        "utf-8" => content_text_of(&value),
        _ => format!("{size} bytes (not UTF-8), base64 in the structured result"),
    };
    Ok((text, value))
}

fn content_text_of(value: &Value) -> String {
    value
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn stop(args: &Value) -> Result<(String, Value), String> {
    let args = Args::new(args, &["sandbox"])?;
    let id = args.required_text("sandbox")?;
    let info = sandbox::stop(&id).map_err(|e| e.to_string())?;
    Ok((
        format!("sandbox {} is {}", info.id, info.status),
        json!(info),
    ))
}

/// A writer that refuses more than `left` bytes: a read that would not fit in a
/// tool result fails instead of filling memory.
struct LimitedSink<'a> {
    inner: &'a mut Vec<u8>,
    left: usize,
}

impl std::io::Write for LimitedSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.len() > self.left {
            return Err(std::io::Error::other(format!(
                "the file is larger than the {MAX_OUTPUT} bytes a tool result carries; use mvm sandbox cp"
            )));
        }
        self.left = self.left.saturating_sub(data.len());
        self.inner.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_takes_a_network_and_placeholder_secrets() {
        let options = create_options(&json!({
            "allow": ["192.0.2.7:443", "10.1.0.0/16:8000-8080/udp"],
            "secrets_for": [
                {"name": "API_TOKEN", "placeholder": "MVM_PLACEHOLDER_API", "host": "api.example.com"}
            ]
        }))
        .unwrap();
        assert_eq!(options.net.allow.len(), 2);
        assert_eq!(options.substitutions.len(), 1);
        assert_eq!(options.substitutions[0].placeholder, "MVM_PLACEHOLDER_API");
        assert_eq!(
            options.substitutions[0].hosts,
            [("api.example.com".to_owned(), 443)]
        );
        let plain = create_options(&json!({})).unwrap();
        assert!(!plain.net.wanted() && plain.substitutions.is_empty());
        for (bad, names) in [
            (json!({"allow": ["nowhere"]}), "allow"),
            (json!({"allow": "192.0.2.7:443"}), "allow"),
            (
                json!({"secrets_for": [
                    {"name": "A", "placeholder": "MVM_PLACEHOLDER_1", "host": "a.example"},
                    {"name": "A", "placeholder": "MVM_PLACEHOLDER_2", "host": "b.example"}
                ]}),
                "secrets_for",
            ),
            (
                json!({"secrets_for": [{"name": "A", "placeholder": "P", "host": "not a host"}]}),
                "secrets_for",
            ),
        ] {
            let err = create_options(&bad).unwrap_err();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }
}
