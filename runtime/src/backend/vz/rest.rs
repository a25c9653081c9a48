//! vfkit's REST service on its Unix socket (`--restful-uri unix://...`): the VM's
//! state (`GET /vm/state`) and state changes (`POST /vm/state`, `{"state": "Stop"}`).
//!
//! One request per connection (`Connection: close`), HTTP/1.1 by hand: two requests
//! do not earn an HTTP client. The answer is read from a process that runs beside a
//! guest, so it is bounded (size, time) and parsed strictly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The largest answer read.
const MAX_RESPONSE: u64 = 64 * 1024;
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The VM's state as vfkit names it (Virtualization.framework's `VZVirtualMachineState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Not started, or stopped.
    Stopped,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Failed: Virtualization.framework stopped it with an error.
    Error,
    /// Between two states (starting, pausing, resuming, stopping, saving, restoring).
    Changing(String),
}

impl VmState {
    /// Reads vfkit's name (`VirtualMachineStateRunning`, ...); an unknown one is an error.
    pub fn parse(name: &str) -> Result<Self, RestError> {
        let short = name.strip_prefix("VirtualMachineState").unwrap_or(name);
        Ok(match short {
            "Stopped" => Self::Stopped,
            "Running" => Self::Running,
            "Paused" => Self::Paused,
            "Error" => Self::Error,
            "Starting" | "Pausing" | "Resuming" | "Stopping" | "Saving" | "Restoring" => {
                Self::Changing(short.to_owned())
            }
            _ => return Err(RestError::Answer(format!("unknown VM state {name:?}"))),
        })
    }
}

/// A state change vfkit accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Ask the guest to power off (ACPI-like request).
    Stop,
    /// Power the VM off at once.
    HardStop,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Self::Stop => "Stop",
            Self::HardStop => "HardStop",
        }
    }
}

/// Why a REST call failed.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// The socket could not be reached or the exchange broke.
    #[error("vfkit REST socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// vfkit answered something this client does not accept.
    #[error("vfkit REST: {0}")]
    Answer(String),
}

/// One request; returns the status code and the body.
fn exchange(socket: &Path, request: &str) -> Result<(u16, Vec<u8>), RestError> {
    let io = |source| RestError::Io {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(io)?;
    if u64::try_from(raw.len()).unwrap_or(u64::MAX) > MAX_RESPONSE {
        return Err(RestError::Answer(format!(
            "an answer larger than {MAX_RESPONSE} bytes"
        )));
    }
    parse_response(&raw)
}

/// Splits an HTTP/1.1 answer into its status and body (the body as `Content-Length`
/// says, else up to the end of the connection).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), RestError> {
    let bad = |why: &str| RestError::Answer(why.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(raw.get(..end).unwrap_or_default())
        .map_err(|_| bad("headers not UTF-8"))?;
    let body = raw.get(end.saturating_add(4)..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(RestError::Answer(format!(
            "not an HTTP/1 answer: {:?}",
            status_line.chars().take(64).collect::<String>()
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| bad("no status code"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("a header line without a colon"));
        };
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| bad("a Content-Length that is not a number"))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("a chunked answer (vfkit sends Content-Length)"));
        }
    }
    let body = match length {
        Some(n) => body
            .get(..n)
            .ok_or_else(|| bad("a body shorter than its Content-Length"))?,
        None => body,
    };
    Ok((status, body.to_vec()))
}

/// `GET /vm/state`.
pub fn state(socket: &Path) -> Result<VmState, RestError> {
    let (status, body) = exchange(
        socket,
        "GET /vm/state HTTP/1.1\r\nHost: vfkit\r\nConnection: close\r\n\r\n",
    )?;
    if status != 200 {
        return Err(RestError::Answer(format!("GET /vm/state: status {status}")));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        state: String,
    }
    let answer: Answer = serde_json::from_slice(&body)
        .map_err(|e| RestError::Answer(format!("GET /vm/state: {e}")))?;
    VmState::parse(&answer.state)
}

/// `POST /vm/state` with `change`.
pub fn change(socket: &Path, change: Change) -> Result<(), RestError> {
    let body = format!("{{\"state\":\"{}\"}}", change.name());
    let request = format!(
        "POST /vm/state HTTP/1.1\r\nHost: vfkit\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _) = exchange(socket, &request)?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(RestError::Answer(format!(
            "POST /vm/state {}: status {status}",
            change.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// Serves one connection on a fresh socket: returns the request it read (head and
    /// body) through the join handle, after writing `answer`.
    fn serve_once(answer: &'static [u8]) -> (tempfile::TempDir, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("rest.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.strip_prefix("Content-Length: ") {
                    length = v.trim().parse().unwrap();
                }
                request.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            request.push_str(&String::from_utf8(body).unwrap());
            let mut stream = stream;
            stream.write_all(answer).unwrap();
            request
        });
        (dir, handle)
    }

    #[test]
    fn the_state_is_read_and_a_stop_is_posted_as_json() {
        let (dir, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 38\r\n\r\n{\"state\":\"VirtualMachineStateRunning\"}",
        );
        let socket = dir.path().join("rest.sock");
        assert_eq!(state(&socket).unwrap(), VmState::Running);
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /vm/state HTTP/1.1\r\n"));

        let (dir, server) = serve_once(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
        change(&dir.path().join("rest.sock"), Change::Stop).unwrap();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /vm/state HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with("\r\n\r\n{\"state\":\"Stop\"}"),
            "{request}"
        );
    }

    #[test]
    fn hostile_or_odd_answers_are_errors() {
        for answer in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"VirtualMachineStateExploded\"}",
            b"HTTP/1.1 200 OK\r\n\r\n{\"state\": 3}",
            b"HTTP/1.1 500 Internal Server Error\r\n\r\n",
            b"HTTP/1.1 200 OK",
        ] {
            let (dir, _server) = serve_once(answer);
            let err = state(&dir.path().join("rest.sock")).unwrap_err();
            assert!(matches!(err, RestError::Answer(_)), "{answer:?}: {err}");
        }
        let (dir, _server) = serve_once(b"HTTP/1.1 500 Internal Server Error\r\n\r\n");
        assert!(change(&dir.path().join("rest.sock"), Change::HardStop).is_err());
        let missing = tempfile::tempdir().unwrap();
        let err = state(&missing.path().join("none.sock")).unwrap_err();
        assert!(matches!(err, RestError::Io { .. }), "{err}");
    }

    #[test]
    fn every_state_name_vfkit_reports_is_read() {
        assert_eq!(
            VmState::parse("VirtualMachineStateStopped").unwrap(),
            VmState::Stopped
        );
        assert_eq!(
            VmState::parse("VirtualMachineStateStarting").unwrap(),
            VmState::Changing("Starting".into())
        );
        assert_eq!(VmState::parse("Paused").unwrap(), VmState::Paused);
        assert!(VmState::parse("").is_err());
    }
}
