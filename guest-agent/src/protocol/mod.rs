//! The RPC protocol between the runtime (client) and the guest agent (server).
//!
//! Every message is one frame: a big-endian `u32` length, then a one-byte frame type and a
//! big-endian `u32` request id, then the body. Data frames (stdin, stdout, stderr, file
//! contents) carry raw bytes; control frames carry JSON. The length is checked against
//! [`MAX_FRAME_LEN`] before anything is allocated, so a peer cannot make the other side
//! buffer more than one maximal frame per connection.
//!
//! A connection starts with a [`Hello`] from the client and one from the agent. An agent that
//! does not speak the client's major version answers with an error frame and closes.

mod error;
mod frame;
mod frame_type;
mod io;
mod message;

pub use error::{DecodeError, EncodeError};
pub use frame::{decode, encode, peek_len, Frame};
pub use frame_type::FrameType;
pub use io::{read_frame, write_frame, ReadError, WriteError};
pub use message::{
    ConnectRequest, DirEntries, DirEntry, EntryKind, ErrorCode, ErrorReply, ExecRequest,
    ExecSignal, ExitStatus, FileDone, Hello, ListDirRequest, MakeDirRequest, Message,
    ReadFileRequest, ReadyInfo, ReseedRequest, Reseeded, ShutdownRequest, TtySize,
    WriteFileRequest, MAX_DIR_ENTRIES, RESEED_ENTROPY,
};

/// The vsock port the agent listens on in the guest (host side: `CONNECT 1024`).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol major version: a client with another major version is refused.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Protocol minor version: additions that an older peer may ignore.
pub const PROTOCOL_MINOR: u16 = 2;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the header that follows the length prefix: frame type (1) and request id (4).
pub const HEADER_LEN: usize = 5;
/// The largest value the length prefix may hold (header plus body).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The largest body any frame may carry.
pub const MAX_BODY_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// How much raw data a sender puts in one data frame. Smaller than the maximum so that
/// control frames of other requests interleave with a large transfer.
pub const DATA_CHUNK: usize = 128 * 1024;

/// The unprivileged uid and gid a workload runs as unless its exec request says otherwise
/// (the agent's default policy; the host gives secrets and files to this owner).
pub const DEFAULT_WORKLOAD_ID: u32 = 1000;

/// The request id of frames that concern the whole connection (hello, connection errors).
pub const CONNECTION_REQUEST_ID: u32 = 0;
