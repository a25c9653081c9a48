//! Moving bytes between the guest's TLS and the upstream's: non-blocking sockets, a
//! rustls connection on each, and poll(2). [`pump`] runs after the head went upstream,
//! with the scanners between the two sides.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use zeroize::Zeroizing;

use super::scan::Scanner;
use super::{IDLE_TIMEOUT, MAX_CONNECTION_TIME};

/// The most plaintext read from one side before it is handed to the other.
const CHUNK: usize = 16 << 10;

/// One side of the proxy: a non-blocking socket and its TLS session.
pub(super) struct Endpoint {
    pub sock: TcpStream,
    pub tls: rustls::Connection,
    /// The socket's read side reached EOF.
    tcp_eof: bool,
    /// Bytes moved on the socket since [`Endpoint::take_moved`] last asked.
    moved: bool,
}

/// Why an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum EndpointError {
    /// The socket.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The TLS session (the peer's alert, a bad record, a certificate).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// What [`Endpoint::read_plain`] got.
pub(super) enum Plain {
    /// This many bytes.
    Data(usize),
    /// Nothing for now.
    WouldBlock,
    /// The peer ended its side (close_notify, or TCP EOF without it).
    End,
}

impl Endpoint {
    /// `sock` (made non-blocking) carrying `tls`.
    pub fn new(sock: TcpStream, tls: rustls::Connection) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        Ok(Self {
            sock,
            tls,
            tcp_eof: false,
            moved: false,
        })
    }

    /// Feeds rustls what the socket holds, while rustls wants it.
    pub fn fill(&mut self) -> Result<(), EndpointError> {
        while !self.tcp_eof && self.tls.wants_read() {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => self.tcp_eof = true,
                Ok(_) => {
                    self.moved = true;
                    if let Err(e) = self.tls.process_new_packets() {
                        // Send the alert rustls queued, if the socket takes it.
                        let _ = self.flush();
                        return Err(e.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes what rustls has for the socket, while the socket takes it.
    pub fn flush(&mut self) -> Result<(), EndpointError> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => self.moved = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads decrypted bytes into `buf`.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> Result<Plain, EndpointError> {
        match self.tls.reader().read(buf) {
            Ok(0) => Ok(Plain::End),
            Ok(n) => Ok(Plain::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Plain::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Plain::End),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands rustls as much of `data` as it buffers now; how much that was.
    pub fn write_plain(&mut self, data: &[u8]) -> Result<usize, EndpointError> {
        if data.is_empty() {
            return Ok(0);
        }
        Ok(self.tls.writer().write(data)?)
    }

    /// Whether the socket's read side reached EOF.
    pub fn at_eof(&self) -> bool {
        self.tcp_eof
    }

    /// Whether bytes moved on the socket since the last call.
    fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }

    /// What to wait for on the socket.
    fn interest(&self) -> PollFlags {
        let mut flags = PollFlags::empty();
        if !self.tcp_eof && self.tls.wants_read() {
            flags |= PollFlags::POLLIN;
        }
        if self.tls.wants_write() {
            flags |= PollFlags::POLLOUT;
        }
        flags
    }

    /// Writes all of `data` through TLS by `deadline`.
    pub fn write_all_plain(
        &mut self,
        mut data: &[u8],
        stop: &UnixStream,
        deadline: Instant,
    ) -> Result<(), Ended> {
        loop {
            let n = self.write_plain(data).map_err(Ended::Failed)?;
            data = data.get(n..).unwrap_or_default();
            self.flush().map_err(Ended::Failed)?;
            if data.is_empty() && !self.tls.wants_write() {
                return Ok(());
            }
            match wait(&[&*self], stop, deadline) {
                Wake::Ready => {}
                Wake::Stop => return Err(Ended::Stopped),
                Wake::Timeout => return Err(Ended::TimedOut),
            }
        }
    }

    /// Ends the session politely: close_notify, flushed by `deadline`, then the socket's
    /// write side shut, and what the peer still sends read and dropped until it closes
    /// (so that unread bytes do not turn the close into a reset that loses the answer).
    pub fn close(&mut self, stop: &UnixStream, deadline: Instant) {
        self.tls.send_close_notify();
        while self.flush().is_ok() && self.tls.wants_write() {
            if !matches!(wait(&[&*self], stop, deadline), Wake::Ready) {
                return;
            }
        }
        if self.sock.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        loop {
            match self.sock.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                        PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                    ];
                    match nix::poll::poll(&mut fds, timeout_until(deadline)) {
                        Ok(0) => return,
                        Ok(_) if !fds.first().is_some_and(readiness) => {}
                        _ => return,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// How a bounded wait for an endpoint ended early.
#[derive(Debug)]
pub(super) enum Ended {
    /// The proxy is stopping.
    Stopped,
    /// The deadline passed.
    TimedOut,
    /// The endpoint failed.
    Failed(EndpointError),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped => f.write_str("the proxy is stopping"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// What [`wait`] woke for.
pub(super) enum Wake {
    /// A socket is ready (or a signal came): look again.
    Ready,
    /// The proxy is stopping.
    Stop,
    /// `deadline` passed.
    Timeout,
}

/// Waits until one of `endpoints` can move bytes, the proxy stops, or `deadline` (a
/// deadline already past polls once, without waiting).
pub(super) fn wait(endpoints: &[&Endpoint], stop: &UnixStream, deadline: Instant) -> Wake {
    let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    for endpoint in endpoints {
        let interest = endpoint.interest();
        // A socket with nothing to wait for is left out: its hang-up would wake the
        // loop again and again.
        if !interest.is_empty() {
            fds.push(PollFd::new(endpoint.sock.as_fd(), interest));
        }
    }
    match nix::poll::poll(&mut fds, timeout_until(deadline)) {
        Ok(_) if fds.first().is_some_and(readiness) => Wake::Stop,
        Ok(0) if Instant::now() >= deadline => Wake::Timeout,
        Ok(_) | Err(nix::errno::Errno::EINTR) => Wake::Ready,
        Err(e) => {
            tracing::warn!(error = %e, "egress proxy: poll failed; closing a connection");
            Wake::Stop
        }
    }
}

fn readiness(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// poll(2)'s timeout for `deadline`, rounded up to whole milliseconds.
pub(super) fn timeout_until(deadline: Instant) -> PollTimeout {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return PollTimeout::ZERO;
    }
    let millis = left.as_millis().saturating_add(1);
    i32::try_from(millis)
        .ok()
        .and_then(|ms| PollTimeout::try_from(ms).ok())
        .unwrap_or(PollTimeout::MAX)
}

/// How a pump ended.
#[derive(Debug)]
pub(super) enum PumpEnd {
    /// The upstream ended and everything it sent reached the guest.
    Finished,
    /// The guest sent this placeholder (index in the request scanner's needles).
    PlaceholderInBody(usize),
    /// The upstream sent this value (index in the response scanner's needles).
    ValueReflected(usize),
    /// The proxy is stopping.
    Stopped,
    /// Nothing moved for [`IDLE_TIMEOUT`].
    Idle,
    /// The connection reached [`MAX_CONNECTION_TIME`].
    TooLong,
    /// The guest's side failed.
    GuestFailed(EndpointError),
    /// The upstream's side failed.
    UpstreamFailed(EndpointError),
}

/// Moves bytes both ways until the upstream ends (then the guest gets close_notify) or
/// something goes wrong. `first` is what the guest sent after its head. Guest bytes go
/// through `requests` (placeholders; nothing held back), upstream bytes through
/// `responses` (values; their possible starts held back).
pub(super) fn pump(
    guest: &mut Endpoint,
    upstream: &mut Endpoint,
    stop: &UnixStream,
    first: &[u8],
    requests: &mut Scanner,
    responses: &mut Scanner,
) -> PumpEnd {
    let started = Instant::now();
    let give_up = started + MAX_CONNECTION_TIME;
    let mut last_progress = started;
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    let mut to_upstream = Vec::new();
    let mut to_guest = Vec::new();
    if let Err(found) = requests.push(first, &mut to_upstream) {
        return PumpEnd::PlaceholderInBody(found.needle);
    }
    let mut guest_done = false;
    let mut upstream_done = false;
    let mut closing = false;
    loop {
        let mut progress = false;
        if let Err(e) = guest.fill() {
            return PumpEnd::GuestFailed(e);
        }
        if let Err(e) = upstream.fill() {
            return PumpEnd::UpstreamFailed(e);
        }

        while !guest_done && to_upstream.len() < CHUNK {
            match guest.read_plain(&mut buf) {
                Ok(Plain::Data(n)) => {
                    progress = true;
                    let chunk = buf.get(..n).unwrap_or_default();
                    if let Err(found) = requests.push(chunk, &mut to_upstream) {
                        return PumpEnd::PlaceholderInBody(found.needle);
                    }
                }
                Ok(Plain::WouldBlock) => break,
                Ok(Plain::End) => guest_done = true,
                Err(e) => return PumpEnd::GuestFailed(e),
            }
        }
        if upstream_done {
            // Nobody is left to read it.
            to_upstream.clear();
        }
        match upstream.write_plain(&to_upstream) {
            Ok(n) => {
                to_upstream.drain(..n.min(to_upstream.len()));
            }
            Err(e) => return PumpEnd::UpstreamFailed(e),
        }

        while !upstream_done && to_guest.len() < CHUNK {
            match upstream.read_plain(&mut buf) {
                Ok(Plain::Data(n)) => {
                    progress = true;
                    let chunk = buf.get(..n).unwrap_or_default();
                    if let Err(found) = responses.push(chunk, &mut to_guest) {
                        return PumpEnd::ValueReflected(found.needle);
                    }
                }
                Ok(Plain::WouldBlock) => break,
                Ok(Plain::End) => {
                    upstream_done = true;
                    responses.finish(&mut to_guest);
                }
                Err(e) => return PumpEnd::UpstreamFailed(e),
            }
        }
        match guest.write_plain(&to_guest) {
            Ok(n) => {
                to_guest.drain(..n.min(to_guest.len()));
            }
            Err(e) => return PumpEnd::GuestFailed(e),
        }
        if upstream_done && to_guest.is_empty() && !closing {
            guest.tls.send_close_notify();
            closing = true;
        }

        if let Err(e) = guest.flush() {
            return PumpEnd::GuestFailed(e);
        }
        if let Err(e) = upstream.flush() {
            if !upstream_done {
                return PumpEnd::UpstreamFailed(e);
            }
        }
        if closing && !guest.tls.wants_write() {
            return PumpEnd::Finished;
        }

        progress |= guest.take_moved() | upstream.take_moved();
        let now = Instant::now();
        if progress {
            last_progress = now;
        }
        let deadline = if progress {
            now
        } else {
            (last_progress + IDLE_TIMEOUT).min(give_up)
        };
        match wait(&[&*guest, &*upstream], stop, deadline) {
            Wake::Stop => return PumpEnd::Stopped,
            Wake::Timeout if !progress => {
                return if Instant::now() >= give_up {
                    PumpEnd::TooLong
                } else {
                    PumpEnd::Idle
                };
            }
            Wake::Timeout | Wake::Ready => {}
        }
        if now >= give_up {
            return PumpEnd::TooLong;
        }
    }
}

/// The bounded time a refusal's answer or a close may take.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
