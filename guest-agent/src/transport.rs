//! The byte streams the protocol runs on: vsock in the guest, Unix sockets on the host
//! (directly, or through the VMM's Firecracker-compatible hybrid vsock socket).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[cfg(target_os = "linux")]
pub use vsock::{VsockListener, VsockStream};

/// A connected, bidirectional byte stream that can be split between threads.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Ends the connection in both directions, waking any thread blocked on it.
    fn shutdown_both(&self) -> io::Result<()>;
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Both)
    }
}

/// `AF_VSOCK` sockets: the guest's end (Linux guests only).
#[cfg(target_os = "linux")]
mod vsock {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::sys::socket::{
        accept4, bind, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag,
        SockType, VsockAddr,
    };

    use super::Duplex;

    /// A connected `AF_VSOCK` stream socket.
    #[derive(Debug)]
    pub struct VsockStream {
        file: File,
    }

    impl Read for VsockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.file.read(buf)
        }
    }

    impl Write for VsockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.file.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Duplex for VsockStream {
        fn try_clone(&self) -> io::Result<Self> {
            Ok(Self {
                file: self.file.try_clone()?,
            })
        }
        fn shutdown_both(&self) -> io::Result<()> {
            shutdown(self.file.as_raw_fd(), Shutdown::Both).map_err(io::Error::from)
        }
    }

    /// A listening `AF_VSOCK` socket bound to any CID.
    #[derive(Debug)]
    pub struct VsockListener {
        fd: OwnedFd,
    }

    impl VsockListener {
        /// Listens on `port` for connections from the host.
        pub fn bind(port: u32) -> io::Result<Self> {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
            listen(&fd, Backlog::new(16)?)?;
            Ok(Self { fd })
        }

        /// Waits for the next connection.
        pub fn accept(&self) -> io::Result<VsockStream> {
            let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
            // SAFETY: accept4 just returned this descriptor, so it is open and nothing else
            // owns it; the OwnedFd becomes its only owner.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            Ok(VsockStream {
                file: File::from(fd),
            })
        }
    }
}

/// Why a hybrid-vsock connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HybridConnectError {
    /// The Unix socket could not be reached.
    #[error("connecting to vsock socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The handshake failed on the socket.
    #[error("vsock handshake for port {port}: {source}")]
    Io {
        /// The guest port.
        port: u32,
        /// The error.
        source: io::Error,
    },
    /// The VMM did not answer `OK <port>`.
    #[error("vsock handshake for port {port}: unexpected answer {answer:?}")]
    Refused {
        /// The guest port.
        port: u32,
        /// What came back instead (at most 64 bytes).
        answer: String,
    },
}

/// Connects to guest vsock `port` through a VMM's hybrid vsock Unix socket: writes
/// `CONNECT <port>\n` and expects `OK <host port>\n`. The returned stream then carries the
/// connection's bytes.
pub fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HybridConnectError> {
    let mut stream = UnixStream::connect(uds).map_err(|source| HybridConnectError::Connect {
        path: uds.display().to_string(),
        source,
    })?;
    let io_err = |source| HybridConnectError::Io { port, source };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    // Byte by byte: the connection's own data follows the line immediately.
    let mut line = Vec::with_capacity(64);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).map_err(io_err)?;
        if n == 0 || line.len() >= 64 {
            return Err(HybridConnectError::Refused {
                port,
                answer: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        if byte == [b'\n'] {
            break;
        }
        line.extend_from_slice(&byte);
    }
    let text = String::from_utf8_lossy(&line);
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|rest| rest.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(HybridConnectError::Refused {
            port,
            answer: text.into_owned(),
        });
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the VMM's end of the hybrid vsock socket.
    fn fake_vmm(answer: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut stream = stream;
            stream.write_all(answer).unwrap();
        });
        (dir, path)
    }

    #[test]
    fn hybrid_connect_leaves_the_data_after_ok_in_the_stream() {
        let (_dir, path) = fake_vmm(b"OK 1073741824\nhello");
        let mut stream = connect_hybrid_vsock(&path, 1024, Duration::from_secs(5)).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
    }

    #[test]
    fn hybrid_connect_refusals_are_errors() {
        let (_dir, path) = fake_vmm(b"");
        assert!(matches!(
            connect_hybrid_vsock(&path, 1024, Duration::from_secs(5)),
            Err(HybridConnectError::Refused { .. })
        ));
        let (_dir, path) = fake_vmm(b"NO\n");
        match connect_hybrid_vsock(&path, 1024, Duration::from_secs(5)) {
            Err(HybridConnectError::Refused { answer, .. }) => assert_eq!(answer, "NO"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let (_dir, path) = fake_vmm(&[b'x'; 100]);
        assert!(matches!(
            connect_hybrid_vsock(&path, 1024, Duration::from_secs(5)),
            Err(HybridConnectError::Refused { .. })
        ));
        assert!(matches!(
            connect_hybrid_vsock(Path::new("/nonexistent/sock"), 1024, Duration::from_secs(1)),
            Err(HybridConnectError::Connect { .. })
        ));
    }
}
