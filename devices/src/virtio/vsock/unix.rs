//! The host side of hybrid vsock: Unix sockets.
//!
//! A host process reaches a guest listener by connecting to the VM's socket and
//! writing `CONNECT <port>\n` (parsed by [`parse_connect_line`]); a guest reaches a
//! host listener on port P through the socket `<uds>_<P>` ([`connect_nonblocking`]).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Longest `CONNECT` line a host may send, newline included ("CONNECT 4294967295\r\n"
/// is 20 bytes). A longer line closes the socket.
pub const MAX_CONNECT_LINE: usize = 32;

/// Why a host's `CONNECT` line was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConnectLineError {
    /// The line does not start with `CONNECT `.
    #[error("vsock host line {0:?} is not `CONNECT <port>`")]
    NotConnect(String),
    /// The port is not a decimal u32.
    #[error("vsock host line has port {0:?}, not a decimal u32")]
    Port(String),
    /// No newline within [`MAX_CONNECT_LINE`] bytes.
    #[error("vsock host line longer than {MAX_CONNECT_LINE} bytes")]
    TooLong,
}

/// Parses one `CONNECT <port>` line (with its `\n`, optionally `\r\n`) into the port.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    if line.len() > MAX_CONNECT_LINE {
        return Err(ConnectLineError::TooLong);
    }
    let text = String::from_utf8_lossy(line);
    let body = text
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .ok_or_else(|| ConnectLineError::NotConnect(text.to_string()))?;
    let port = body
        .strip_prefix("CONNECT ")
        .ok_or_else(|| ConnectLineError::NotConnect(body.to_owned()))?
        .trim_start_matches(' ');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConnectLineError::Port(port.to_owned()));
    }
    port.parse::<u32>()
        .map_err(|_| ConnectLineError::Port(port.to_owned()))
}

/// The socket path a guest connection to host port `port` goes to: `<uds>_<port>`.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the Unix socket at `path` without blocking: a host listener whose
/// backlog is full gives `WouldBlock` instead of stalling the device thread. The
/// returned stream is non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // Leave room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long or has a NUL: {}", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: addr is a valid, initialised sockaddr_un and len is its size; connect
    // reads it and does not keep the pointer.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // A Unix stream connect either completes or fails at once; EINPROGRESS
        // does not happen for AF_UNIX, EAGAIN means the backlog is full.
        return Err(err);
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r\n"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Ok(u32::MAX));
        assert!(matches!(
            parse_connect_line(b"CONNECT 4294967296\n"),
            Err(ConnectLineError::Port(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT -1\n"),
            Err(ConnectLineError::Port(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT +5\n"),
            Err(ConnectLineError::Port(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT \n"),
            Err(ConnectLineError::Port(_))
        ));
        assert!(matches!(
            parse_connect_line(b"connect 5\n"),
            Err(ConnectLineError::NotConnect(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 5"),
            Err(ConnectLineError::NotConnect(_))
        ));
        assert!(matches!(
            parse_connect_line(b"\xff\xfe\n"),
            Err(ConnectLineError::NotConnect(_))
        ));
        assert_eq!(
            parse_connect_line(&[b' '; 40]),
            Err(ConnectLineError::TooLong)
        );
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            host_port_path(Path::new("/run/vm/v.sock"), 1024),
            PathBuf::from("/run/vm/v.sock_1024")
        );
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener_and_refuses_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        use std::io::{Read, Write};
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // Non-blocking: nothing to read is WouldBlock, not a hang.
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
