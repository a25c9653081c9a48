//! Typed frame bodies: raw bytes for data, JSON for control.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{DecodeError, EncodeError};
use super::frame_type::FrameType;

/// The handshake body, sent first by the client and answered by the agent.
///
/// Unknown fields are accepted here (and only here) so that a newer peer's hello still
/// decodes far enough to be told which version this side speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol major version.
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
    /// Name and version of the software on that side, for logs.
    pub software: String,
}

/// Machine-readable reason in an error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer's major protocol version is not supported.
    UnsupportedVersion,
    /// A frame could not be decoded (truncated, bad body).
    Malformed,
    /// A frame exceeded the maximum size.
    Oversize,
    /// A frame had an unknown type.
    UnknownType,
    /// A frame arrived that makes no sense in this state (e.g. no hello yet).
    UnexpectedFrame,
    /// The request was well formed but not acceptable.
    BadRequest,
    /// The request id is already used by a request in flight.
    RequestIdInUse,
    /// The program to run does not exist.
    NotFound,
    /// The working directory does not exist or is not a directory.
    BadCwd,
    /// The agent's policy refuses the request (e.g. root).
    PermissionDenied,
    /// An I/O error in the guest.
    Io,
    /// A limit of the agent was reached (connections, requests in flight).
    Limit,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

/// The body of an error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// What kind of error.
    pub code: ErrorCode,
    /// A human-readable explanation that names the thing and the value.
    pub message: String,
}

/// The agent's answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyInfo {
    /// Agent name and version.
    pub software: String,
    /// Protocol major version.
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
    /// Whether the agent runs as the guest's PID 1.
    pub pid1: bool,
    /// Kernel uptime (CLOCK_BOOTTIME) when the agent started, in milliseconds: the guest's
    /// boot time as seen from inside.
    pub boot_ms: u64,
    /// Kernel uptime now, in milliseconds.
    pub uptime_ms: u64,
    /// Time since the agent started, in milliseconds.
    pub agent_uptime_ms: u64,
}

/// Start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has no slash.
    pub argv: Vec<String>,
    /// Extra environment, over the agent's minimal default (PATH, HOME).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User id (default: the agent policy's unprivileged uid).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group id (default: the agent policy's unprivileged gid).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Whether stdin frames follow (ended by a stdin-close frame); otherwise stdin is empty.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run the process on a new pseudo-terminal of this size (its stdin, stdout and
    /// stderr; output arrives as stdout frames, and resize frames change the size).
    /// (Protocol 1.1; not sent when absent.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Leave the rest of the process's group running when it exits (a server started
    /// in the background of a sandbox's command); by default the group dies with it.
    /// (Protocol 1.1; not sent when false.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_children: bool,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows (1..=4096).
    pub rows: u16,
    /// Columns (1..=4096).
    pub cols: u16,
}

impl TtySize {
    fn check(&self, frame_type: FrameType) -> Result<(), DecodeError> {
        let ok = |n: u16| (1..=4096).contains(&n);
        if ok(self.rows) && ok(self.cols) {
            Ok(())
        } else {
            Err(bad(
                frame_type,
                format!("terminal size {}x{} is out of range", self.rows, self.cols),
            ))
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
    /// Wall time from spawn to exit, in milliseconds.
    pub duration_ms: u64,
}

impl ExitStatus {
    /// The status a shell would report: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128_i32.saturating_add(signal),
            (None, None) => 255,
        }
    }
}

/// Send a signal to a running process's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSignal {
    /// Signal number (1..=64).
    pub signal: i32,
}

/// Open a file for writing; its contents follow as file-data frames, then a file-end frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits (default 0o644).
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    /// Owner uid after writing (default: unchanged, i.e. root).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Owner gid after writing (default: unchanged).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Append instead of truncating.
    #[serde(default)]
    pub append: bool,
    /// Write into a temporary file beside `path` and rename it over `path` only at the
    /// end frame: readers see the old file or the whole new one, and a write cancelled or
    /// cut off leaves no partial file. Not with `append`. (Protocol 1.1; not sent when
    /// false, so a 1.0 agent still reads every other request.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub atomic: bool,
}

fn default_file_mode() -> u32 {
    0o644
}

/// Read a whole file; it arrives as file-data frames, then a file-done frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    pub path: String,
}

/// A file transfer completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDone {
    /// Bytes transferred.
    pub size: u64,
}

/// Open a TCP connection to `127.0.0.1:port` in the guest; its bytes then travel as
/// data frames both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// The guest port (1..=65535).
    pub port: u16,
}

/// Make one directory (its parent must exist). A directory already there is
/// left as it is; anything else there is an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MakeDirRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits of a new directory (default 0o755).
    #[serde(default = "default_dir_mode")]
    pub mode: u32,
    /// Owner uid of a new directory (default: root).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Owner gid of a new directory (default: root).
    #[serde(default)]
    pub gid: Option<u32>,
}

fn default_dir_mode() -> u32 {
    0o755
}

/// List one directory: its entries as they are (symbolic links not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDirRequest {
    /// Absolute path in the guest.
    pub path: String,
}

/// The most entries one directory listing may have.
pub const MAX_DIR_ENTRIES: usize = 100_000;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: a device, FIFO, socket, or a name that is not UTF-8.
    Other,
}

/// One entry of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// Its name in the directory (never `.` or `..`; lossy when not UTF-8, and
    /// then of kind `other`).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its size in bytes (a file's length).
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// A batch of a directory's entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntries {
    /// The entries, in no particular order.
    pub entries: Vec<DirEntry>,
}

/// Sync the guest's filesystems, then power off (or reboot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Reboot instead of powering off.
    #[serde(default)]
    pub reboot: bool,
}

/// How many bytes of entropy a reseed request carries.
pub const RESEED_ENTROPY: std::ops::RangeInclusive<usize> = 32..=256;

/// After a restore, before any workload runs again: bytes from the host's CSPRNG
/// for the guest kernel's RNG, the identity the VM has from now on, and the host's
/// wall clock. Two VMs restored from one snapshot continue with the same kernel
/// RNG state, the same identity and a clock stopped at the snapshot; this is what
/// makes each its own. (Protocol 1.2.)
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReseedRequest {
    /// Bytes from the host's CSPRNG ([`RESEED_ENTROPY`] long), mixed into the
    /// kernel's input pool and credited, then the kernel's CRNG reseeded from it.
    pub entropy: Vec<u8>,
    /// The sandbox id from now on (1 to 64 of `A-Z a-z 0-9 . _ -`), written to
    /// `/run/mvm/sandbox-id` for the workload to read.
    pub sandbox_id: String,
    /// The guest's hostname from now on (1 to 64 of `A-Z a-z 0-9 . -`); unchanged
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The host's wall clock (nanoseconds since the Unix epoch); the guest's
    /// `CLOCK_REALTIME` is set to it. Unchanged when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_time_ns: Option<u64>,
}

impl std::fmt::Debug for ReseedRequest {
    // The entropy seeds the guest's RNG: it never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReseedRequest")
            .field("entropy", &format_args!("<{} bytes>", self.entropy.len()))
            .field("sandbox_id", &self.sandbox_id)
            .field("hostname", &self.hostname)
            .field("unix_time_ns", &self.unix_time_ns)
            .finish()
    }
}

/// What a reseed did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reseeded {
    /// Bits of entropy credited to the kernel's input pool.
    pub entropy_bits: u32,
    /// Whether the kernel's CRNG was reseeded at once (`RNDRESEEDCRNG`); false only
    /// on a kernel without that ioctl, where it reseeds on its own schedule.
    pub crng_reseeded: bool,
    /// How far the guest's wall clock was stepped, in milliseconds (positive:
    /// forward), when a time was given.
    pub clock_step_ms: Option<i64>,
}

/// Whether `name` is 1 to 64 of ASCII letters, digits and `extra`.
fn is_name(name: &str, extra: &[char]) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

impl ReseedRequest {
    fn validate(&self) -> Result<(), DecodeError> {
        let t = FrameType::Reseed;
        if !RESEED_ENTROPY.contains(&self.entropy.len()) {
            return Err(bad(
                t,
                format!(
                    "{} bytes of entropy; a reseed takes {} to {}",
                    self.entropy.len(),
                    RESEED_ENTROPY.start(),
                    RESEED_ENTROPY.end()
                ),
            ));
        }
        if !is_name(&self.sandbox_id, &['.', '_', '-']) {
            return Err(bad(
                t,
                format!(
                    "sandbox id {:?} is not 1 to 64 of A-Z a-z 0-9 . _ -",
                    self.sandbox_id
                ),
            ));
        }
        if let Some(hostname) = &self.hostname {
            if !is_name(hostname, &['.', '-']) {
                return Err(bad(
                    t,
                    format!("hostname {hostname:?} is not 1 to 64 of A-Z a-z 0-9 . -"),
                ));
            }
        }
        if let Some(ns) = self.unix_time_ns {
            if i64::try_from(ns).is_err() {
                return Err(bad(t, format!("time {ns} ns is out of range")));
            }
        }
        Ok(())
    }
}

/// Everything a frame can say.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Handshake.
    Hello(Hello),
    /// A request failed, or the connection is closing.
    Error(ErrorReply),
    /// Readiness probe.
    Ping,
    /// Answer to a ping.
    Ready(ReadyInfo),
    /// Start a process.
    Exec(ExecRequest),
    /// Stdin bytes.
    Stdin(Vec<u8>),
    /// End of stdin.
    StdinClose,
    /// Stdout bytes.
    Stdout(Vec<u8>),
    /// Stderr bytes.
    Stderr(Vec<u8>),
    /// A process ended.
    Exit(ExitStatus),
    /// Signal a process group.
    Signal(ExecSignal),
    /// Change a process's terminal size.
    Resize(TtySize),
    /// Open a file for writing.
    WriteFile(WriteFileRequest),
    /// File contents.
    FileData(Vec<u8>),
    /// End of a written file.
    FileEnd,
    /// Read a file.
    ReadFile(ReadFileRequest),
    /// A file transfer completed.
    FileDone(FileDone),
    /// Make a directory.
    MakeDir(MakeDirRequest),
    /// List a directory.
    ListDir(ListDirRequest),
    /// Entries of a listed directory.
    DirEntries(DirEntries),
    /// Open a connection to a guest port.
    Connect(ConnectRequest),
    /// The connection is open.
    Connected,
    /// Connection bytes.
    Data(Vec<u8>),
    /// End of one direction of a connection.
    DataEnd,
    /// Power off.
    Shutdown(ShutdownRequest),
    /// Power-off acknowledged.
    ShutdownAck,
    /// Pause a sandbox (its supervisor's; an agent refuses it).
    Pause,
    /// Fresh entropy, identity and clock after a restore.
    Reseed(ReseedRequest),
    /// A reseed was applied.
    Reseeded(Reseeded),
}

fn json<T: DeserializeOwned>(frame_type: FrameType, body: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(body).map_err(|e| DecodeError::BadBody {
        frame_type,
        reason: e.to_string(),
    })
}

fn empty(frame_type: FrameType, body: &[u8]) -> Result<(), DecodeError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::BadBody {
            frame_type,
            reason: format!("expected an empty body, got {} bytes", body.len()),
        })
    }
}

fn bad(frame_type: FrameType, reason: String) -> DecodeError {
    DecodeError::BadBody { frame_type, reason }
}

/// Strings that reach execve or a path syscall cannot contain NUL.
fn check_no_nul(frame_type: FrameType, what: &str, value: &str) -> Result<(), DecodeError> {
    if value.contains('\0') {
        return Err(bad(
            frame_type,
            format!("{what} {value:?} contains a NUL byte"),
        ));
    }
    Ok(())
}

fn check_abs_path(frame_type: FrameType, path: &str) -> Result<(), DecodeError> {
    check_no_nul(frame_type, "path", path)?;
    if !path.starts_with('/') {
        return Err(bad(frame_type, format!("path {path:?} is not absolute")));
    }
    Ok(())
}

impl ExecRequest {
    fn validate(&self) -> Result<(), DecodeError> {
        let t = FrameType::Exec;
        let Some(program) = self.argv.first() else {
            return Err(bad(t, "argv is empty".to_owned()));
        };
        if program.is_empty() {
            return Err(bad(t, "argv[0] is empty".to_owned()));
        }
        for arg in &self.argv {
            check_no_nul(t, "argument", arg)?;
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') {
                return Err(bad(
                    t,
                    format!("environment name {key:?} is empty or has '='"),
                ));
            }
            check_no_nul(t, "environment name", key)?;
            check_no_nul(t, "environment value", value)?;
        }
        if let Some(cwd) = &self.cwd {
            check_abs_path(t, cwd)?;
        }
        if let Some(size) = &self.tty {
            size.check(t)?;
        }
        Ok(())
    }
}

impl Message {
    /// The frame type that carries this message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::Error(_) => FrameType::Error,
            Self::Ping => FrameType::Ping,
            Self::Ready(_) => FrameType::Ready,
            Self::Exec(_) => FrameType::Exec,
            Self::Stdin(_) => FrameType::Stdin,
            Self::StdinClose => FrameType::StdinClose,
            Self::Stdout(_) => FrameType::Stdout,
            Self::Stderr(_) => FrameType::Stderr,
            Self::Exit(_) => FrameType::Exit,
            Self::Signal(_) => FrameType::Signal,
            Self::Resize(_) => FrameType::Resize,
            Self::WriteFile(_) => FrameType::WriteFile,
            Self::FileData(_) => FrameType::FileData,
            Self::FileEnd => FrameType::FileEnd,
            Self::ReadFile(_) => FrameType::ReadFile,
            Self::FileDone(_) => FrameType::FileDone,
            Self::MakeDir(_) => FrameType::MakeDir,
            Self::ListDir(_) => FrameType::ListDir,
            Self::DirEntries(_) => FrameType::DirEntries,
            Self::Connect(_) => FrameType::Connect,
            Self::Connected => FrameType::Connected,
            Self::Data(_) => FrameType::Data,
            Self::DataEnd => FrameType::DataEnd,
            Self::Shutdown(_) => FrameType::Shutdown,
            Self::ShutdownAck => FrameType::ShutdownAck,
            Self::Pause => FrameType::Pause,
            Self::Reseed(_) => FrameType::Reseed,
            Self::Reseeded(_) => FrameType::Reseeded,
        }
    }

    /// Parses and validates a body of the given frame type.
    pub fn from_body(frame_type: FrameType, body: &[u8]) -> Result<Self, DecodeError> {
        let t = frame_type;
        Ok(match frame_type {
            FrameType::Hello => Self::Hello(json(t, body)?),
            FrameType::Error => Self::Error(json(t, body)?),
            FrameType::Ping => {
                empty(t, body)?;
                Self::Ping
            }
            FrameType::Ready => Self::Ready(json(t, body)?),
            FrameType::Exec => {
                let request: ExecRequest = json(t, body)?;
                request.validate()?;
                Self::Exec(request)
            }
            FrameType::Stdin => Self::Stdin(body.to_vec()),
            FrameType::StdinClose => {
                empty(t, body)?;
                Self::StdinClose
            }
            FrameType::Stdout => Self::Stdout(body.to_vec()),
            FrameType::Stderr => Self::Stderr(body.to_vec()),
            FrameType::Exit => Self::Exit(json(t, body)?),
            FrameType::Signal => {
                let signal: ExecSignal = json(t, body)?;
                if !(1..=64).contains(&signal.signal) {
                    return Err(bad(t, format!("signal {} is out of range", signal.signal)));
                }
                Self::Signal(signal)
            }
            FrameType::Resize => {
                let size: TtySize = json(t, body)?;
                size.check(t)?;
                Self::Resize(size)
            }
            FrameType::WriteFile => {
                let request: WriteFileRequest = json(t, body)?;
                check_abs_path(t, &request.path)?;
                if request.atomic && request.append {
                    return Err(bad(t, "atomic and append exclude each other".to_owned()));
                }
                if request.mode > 0o7777 {
                    return Err(bad(
                        t,
                        format!("mode {:o} has bits beyond 0o7777", request.mode),
                    ));
                }
                Self::WriteFile(request)
            }
            FrameType::FileData => Self::FileData(body.to_vec()),
            FrameType::FileEnd => {
                empty(t, body)?;
                Self::FileEnd
            }
            FrameType::ReadFile => {
                let request: ReadFileRequest = json(t, body)?;
                check_abs_path(t, &request.path)?;
                Self::ReadFile(request)
            }
            FrameType::FileDone => Self::FileDone(json(t, body)?),
            FrameType::MakeDir => {
                let request: MakeDirRequest = json(t, body)?;
                check_abs_path(t, &request.path)?;
                if request.mode > 0o7777 {
                    return Err(bad(
                        t,
                        format!("mode {:o} has bits beyond 0o7777", request.mode),
                    ));
                }
                Self::MakeDir(request)
            }
            FrameType::ListDir => {
                let request: ListDirRequest = json(t, body)?;
                check_abs_path(t, &request.path)?;
                Self::ListDir(request)
            }
            FrameType::DirEntries => Self::DirEntries(json(t, body)?),
            FrameType::Connect => {
                let request: ConnectRequest = json(t, body)?;
                if request.port == 0 {
                    return Err(bad(t, "port 0".to_owned()));
                }
                Self::Connect(request)
            }
            FrameType::Connected => {
                empty(t, body)?;
                Self::Connected
            }
            FrameType::Data => Self::Data(body.to_vec()),
            FrameType::DataEnd => {
                empty(t, body)?;
                Self::DataEnd
            }
            FrameType::Shutdown => Self::Shutdown(json(t, body)?),
            FrameType::ShutdownAck => {
                empty(t, body)?;
                Self::ShutdownAck
            }
            FrameType::Pause => {
                empty(t, body)?;
                Self::Pause
            }
            FrameType::Reseed => {
                let request: ReseedRequest = json(t, body)?;
                request.validate()?;
                Self::Reseed(request)
            }
            FrameType::Reseeded => Self::Reseeded(json(t, body)?),
        })
    }

    /// The body bytes of this message.
    pub fn body(&self) -> Result<Cow<'_, [u8]>, EncodeError> {
        let frame_type = self.frame_type();
        let to_json = |result: Result<Vec<u8>, serde_json::Error>| {
            result
                .map(Cow::Owned)
                .map_err(|source| EncodeError::Json { frame_type, source })
        };
        match self {
            Self::Hello(v) => to_json(serde_json::to_vec(v)),
            Self::Error(v) => to_json(serde_json::to_vec(v)),
            Self::Ready(v) => to_json(serde_json::to_vec(v)),
            Self::Exec(v) => to_json(serde_json::to_vec(v)),
            Self::Exit(v) => to_json(serde_json::to_vec(v)),
            Self::Signal(v) => to_json(serde_json::to_vec(v)),
            Self::Resize(v) => to_json(serde_json::to_vec(v)),
            Self::WriteFile(v) => to_json(serde_json::to_vec(v)),
            Self::ReadFile(v) => to_json(serde_json::to_vec(v)),
            Self::FileDone(v) => to_json(serde_json::to_vec(v)),
            Self::MakeDir(v) => to_json(serde_json::to_vec(v)),
            Self::ListDir(v) => to_json(serde_json::to_vec(v)),
            Self::DirEntries(v) => to_json(serde_json::to_vec(v)),
            Self::Shutdown(v) => to_json(serde_json::to_vec(v)),
            Self::Connect(v) => to_json(serde_json::to_vec(v)),
            Self::Reseed(v) => to_json(serde_json::to_vec(v)),
            Self::Reseeded(v) => to_json(serde_json::to_vec(v)),
            Self::Stdin(data)
            | Self::Stdout(data)
            | Self::Stderr(data)
            | Self::FileData(data)
            | Self::Data(data) => Ok(Cow::Borrowed(data.as_slice())),
            Self::Ping
            | Self::StdinClose
            | Self::FileEnd
            | Self::ShutdownAck
            | Self::Pause
            | Self::Connected
            | Self::DataEnd => Ok(Cow::Borrowed(&[])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reseed() -> ReseedRequest {
        ReseedRequest {
            entropy: vec![7; 64],
            sandbox_id: "sb-1a2b3c4d".into(),
            hostname: Some("fork-1".into()),
            unix_time_ns: Some(1_780_000_000_000_000_000),
        }
    }

    fn decode_reseed(request: &ReseedRequest) -> Result<Message, DecodeError> {
        let body = serde_json::to_vec(request).unwrap();
        Message::from_body(FrameType::Reseed, &body)
    }

    #[test]
    fn a_reseed_round_trips_and_its_debug_hides_the_entropy() {
        let request = reseed();
        assert_eq!(
            decode_reseed(&request).unwrap(),
            Message::Reseed(request.clone())
        );
        let shown = format!("{request:?}");
        assert!(shown.contains("<64 bytes>"), "{shown}");
        assert!(!shown.contains("7, 7"), "{shown}");
        let done = Message::Reseeded(Reseeded {
            entropy_bits: 512,
            crng_reseeded: true,
            clock_step_ms: Some(-3),
        });
        let body = done.body().unwrap();
        assert_eq!(
            Message::from_body(FrameType::Reseeded, &body).unwrap(),
            done
        );
    }

    #[test]
    fn a_reseed_out_of_bounds_is_refused_with_the_reason() {
        let cases: Vec<(ReseedRequest, &str)> = vec![
            (
                ReseedRequest {
                    entropy: vec![1; 31],
                    ..reseed()
                },
                "31 bytes of entropy",
            ),
            (
                ReseedRequest {
                    entropy: vec![1; 257],
                    ..reseed()
                },
                "257 bytes of entropy",
            ),
            (
                ReseedRequest {
                    sandbox_id: String::new(),
                    ..reseed()
                },
                "sandbox id \"\"",
            ),
            (
                ReseedRequest {
                    sandbox_id: "../etc/passwd".into(),
                    ..reseed()
                },
                "sandbox id \"../etc/passwd\"",
            ),
            (
                ReseedRequest {
                    sandbox_id: "x".repeat(65),
                    ..reseed()
                },
                "is not 1 to 64",
            ),
            (
                ReseedRequest {
                    hostname: Some("a_b".into()),
                    ..reseed()
                },
                "hostname \"a_b\"",
            ),
            (
                ReseedRequest {
                    unix_time_ns: Some(u64::MAX),
                    ..reseed()
                },
                "out of range",
            ),
        ];
        for (request, want) in cases {
            let err = decode_reseed(&request).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want:?})");
        }
        let unknown = br#"{"entropy":[],"sandbox_id":"a","extra":1}"#;
        assert!(Message::from_body(FrameType::Reseed, unknown).is_err());
    }
}
