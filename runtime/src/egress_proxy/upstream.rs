//! The upstream side: a non-blocking TCP connect to the original destination, then TLS
//! verified against the configured roots for the name the guest asked for.

use std::fmt;
use std::io;
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::pump::{timeout_until, wait, Endpoint, EndpointError, Wake};
use super::UPSTREAM_CONNECT_TIMEOUT;

/// The TLS client configuration for every upstream: normal verification against
/// `roots`, ALPN `http/1.1` only.
pub(super) fn client_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why the upstream could not be reached.
#[derive(Debug)]
pub(super) enum UpstreamFailure {
    /// The TCP connect failed.
    Unreachable(io::Error),
    /// The connect or handshake took longer than [`UPSTREAM_CONNECT_TIMEOUT`].
    TimedOut,
    /// The proxy is stopping.
    Stopped,
    /// The host is not a name TLS can verify.
    BadName,
    /// The upstream's certificate does not verify for the host.
    Certificate(rustls::Error),
    /// The TLS handshake failed otherwise.
    Handshake(EndpointError),
}

impl UpstreamFailure {
    /// The one line the guest's 502 says: the class of failure, not its details.
    pub fn summary(&self, host: &str, address: SocketAddrV4) -> String {
        match self {
            Self::Unreachable(e) => {
                format!("upstream {host} at {address} unreachable ({})", e.kind())
            }
            Self::TimedOut => format!("upstream {host} at {address} did not answer in time"),
            Self::Stopped => "egress proxy stopping".to_owned(),
            Self::BadName => format!("{host} is not a name upstream TLS can verify"),
            Self::Certificate(_) => format!("upstream certificate not valid for {host}"),
            Self::Handshake(_) => format!("upstream TLS handshake with {host} failed"),
        }
    }
}

impl fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "connect: {e}"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Stopped => f.write_str("proxy stopping"),
            Self::BadName => f.write_str("not a valid TLS server name"),
            Self::Certificate(e) => write!(f, "certificate: {e}"),
            Self::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

/// Connects to `address` and completes a TLS handshake that verifies it as `host`.
pub(super) fn open(
    address: SocketAddrV4,
    host: &str,
    config: &Arc<ClientConfig>,
    stop: &UnixStream,
) -> Result<Endpoint, UpstreamFailure> {
    let sock = connect(address, stop, Instant::now() + UPSTREAM_CONNECT_TIMEOUT)?;
    let name = ServerName::try_from(host.to_owned()).map_err(|_| UpstreamFailure::BadName)?;
    let tls = ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| UpstreamFailure::Handshake(e.into()))?;
    let mut upstream = Endpoint::new(sock, tls.into()).map_err(UpstreamFailure::Unreachable)?;
    let deadline = Instant::now() + UPSTREAM_CONNECT_TIMEOUT;
    let failed = |e: EndpointError| match e {
        EndpointError::Tls(e @ rustls::Error::InvalidCertificate(_)) => {
            UpstreamFailure::Certificate(e)
        }
        e => UpstreamFailure::Handshake(e),
    };
    loop {
        upstream.flush().map_err(failed)?;
        upstream.fill().map_err(failed)?;
        if !upstream.tls.is_handshaking() {
            return Ok(upstream);
        }
        upstream.flush().map_err(failed)?;
        if upstream.at_eof() {
            return Err(failed(io::Error::from(io::ErrorKind::UnexpectedEof).into()));
        }
        match wait(&[&upstream], stop, deadline) {
            Wake::Ready => {}
            Wake::Stop => return Err(UpstreamFailure::Stopped),
            Wake::Timeout => return Err(UpstreamFailure::TimedOut),
        }
    }
}

/// A TCP connection to `address`, made without blocking past `deadline` or the stop.
fn connect(
    address: SocketAddrV4,
    stop: &UnixStream,
    deadline: Instant,
) -> Result<TcpStream, UpstreamFailure> {
    let sock = start_connect(address).map_err(UpstreamFailure::Unreachable)?;
    let stream = TcpStream::from(sock);
    loop {
        let mut fds = [
            PollFd::new(std::os::fd::AsFd::as_fd(stop), PollFlags::POLLIN),
            PollFd::new(std::os::fd::AsFd::as_fd(&stream), PollFlags::POLLOUT),
        ];
        match nix::poll::poll(&mut fds, timeout_until(deadline)) {
            Ok(0) if Instant::now() >= deadline => return Err(UpstreamFailure::TimedOut),
            Ok(_) => {
                let [stop_fd, sock_fd] = fds;
                if stop_fd.revents().is_some_and(|r| !r.is_empty()) {
                    return Err(UpstreamFailure::Stopped);
                }
                if sock_fd.revents().is_some_and(|r| !r.is_empty()) {
                    return match stream.take_error() {
                        Ok(None) => Ok(stream),
                        Ok(Some(e)) | Err(e) => Err(UpstreamFailure::Unreachable(e)),
                    };
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(UpstreamFailure::Unreachable(e.into())),
        }
    }
}

/// A non-blocking IPv4 TCP socket with a connect to `address` under way (or done).
fn start_connect(address: SocketAddrV4) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes no pointers; its result is checked before any use.
    let raw = unsafe { libc::socket(libc::AF_INET, flags, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket(2): an open descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).map_err(io::Error::other)?,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*address.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>())
        .map_err(io::Error::other)?;
    // SAFETY: `sock` is open; `sockaddr` is an initialised sockaddr_in that outlives the
    // call, and `len` is its exact size.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::from_ref(&sockaddr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc == 0 {
        return Ok(sock);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(sock)
    } else {
        Err(error)
    }
}
