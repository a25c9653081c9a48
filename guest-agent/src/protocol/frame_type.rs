//! The frame type byte: what a frame carries.

/// What a frame carries. The numeric values are the wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Versioned handshake, both ways (JSON [`super::Hello`]).
    Hello = 0x01,
    /// A request failed, or (request id 0) the connection is being closed (JSON).
    Error = 0x02,
    /// Readiness probe (empty body).
    Ping = 0x03,
    /// Answer to a ping (JSON [`super::ReadyInfo`]).
    Ready = 0x04,
    /// Start a process (JSON [`super::ExecRequest`]).
    Exec = 0x10,
    /// Bytes for a process's stdin (raw).
    Stdin = 0x11,
    /// End of a process's stdin (empty body).
    StdinClose = 0x12,
    /// Bytes a process wrote to stdout (raw).
    Stdout = 0x13,
    /// Bytes a process wrote to stderr (raw).
    Stderr = 0x14,
    /// A process ended (JSON [`super::ExitStatus`]).
    Exit = 0x15,
    /// Send a signal to a running process's group (JSON [`super::ExecSignal`]).
    Signal = 0x16,
    /// Change a process's terminal size (JSON [`super::TtySize`]; protocol 1.1).
    Resize = 0x17,
    /// Open a file for writing (JSON [`super::WriteFileRequest`]).
    WriteFile = 0x20,
    /// File contents, either direction (raw).
    FileData = 0x21,
    /// End of the contents of a written file (empty body).
    FileEnd = 0x22,
    /// Read a whole file (JSON [`super::ReadFileRequest`]).
    ReadFile = 0x23,
    /// A file transfer completed (JSON [`super::FileDone`]).
    FileDone = 0x24,
    /// Make a directory (JSON [`super::MakeDirRequest`]; protocol 1.1), answered by
    /// a file-done of size 0.
    MakeDir = 0x25,
    /// List a directory (JSON [`super::ListDirRequest`]; protocol 1.1), answered by
    /// dir-entries frames and a file-done whose size is the number of entries.
    ListDir = 0x26,
    /// Some entries of a listed directory (JSON [`super::DirEntries`]).
    DirEntries = 0x27,
    /// Open a TCP connection to a port on the guest's loopback (JSON
    /// [`super::ConnectRequest`]; protocol 1.1).
    Connect = 0x40,
    /// The connection is open (empty body).
    Connected = 0x41,
    /// Bytes of an open connection, either direction (raw).
    Data = 0x42,
    /// No more bytes in this direction (empty body); from the agent it ends the
    /// request.
    DataEnd = 0x43,
    /// Sync and power off (JSON [`super::ShutdownRequest`]).
    Shutdown = 0x30,
    /// The agent is about to power off (empty body).
    ShutdownAck = 0x31,
    /// A sandbox's control socket only: snapshot the VM to disk and end the session
    /// (empty body; protocol 1.2), answered by shutdown-ack. An agent refuses it.
    Pause = 0x32,
    /// After a restore: fresh entropy, a new identity and the host's clock (JSON
    /// [`super::ReseedRequest`]; protocol 1.2).
    Reseed = 0x50,
    /// The reseed was applied (JSON [`super::Reseeded`]).
    Reseeded = 0x51,
}

impl FrameType {
    /// The frame type for a wire byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Hello,
            0x02 => Self::Error,
            0x03 => Self::Ping,
            0x04 => Self::Ready,
            0x10 => Self::Exec,
            0x11 => Self::Stdin,
            0x12 => Self::StdinClose,
            0x13 => Self::Stdout,
            0x14 => Self::Stderr,
            0x15 => Self::Exit,
            0x16 => Self::Signal,
            0x17 => Self::Resize,
            0x20 => Self::WriteFile,
            0x21 => Self::FileData,
            0x22 => Self::FileEnd,
            0x23 => Self::ReadFile,
            0x24 => Self::FileDone,
            0x25 => Self::MakeDir,
            0x26 => Self::ListDir,
            0x27 => Self::DirEntries,
            0x40 => Self::Connect,
            0x41 => Self::Connected,
            0x42 => Self::Data,
            0x43 => Self::DataEnd,
            0x30 => Self::Shutdown,
            0x31 => Self::ShutdownAck,
            0x32 => Self::Pause,
            0x50 => Self::Reseed,
            0x51 => Self::Reseeded,
            _ => return None,
        })
    }
}
