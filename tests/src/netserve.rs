//! Services the `net/*` cases start on their remote hosts: a TCP echo (one line in,
//! `echo: <line>` out), a TCP source (sends a known pseudo-random stream, then closes),
//! a TCP sink (reads to EOF, answers with the sha256 of what it read), and a UDP DNS
//! responder (every A query gets [`DNS_ANSWER`]). Each records what it saw; each stops
//! when dropped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The address the DNS responder gives for every name.
pub const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 77);
/// How often a server checks whether it should stop.
const POLL: Duration = Duration::from_millis(20);
/// How long one connection may stay silent.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What one connection or query did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The server's own address the peer reached (which remote host).
    pub local: SocketAddr,
    /// Bytes read from the peer (TCP) or the query's length (UDP).
    pub bytes_in: u64,
    /// Bytes sent to the peer.
    pub bytes_out: u64,
    /// sha256 (hex) of what was read (sink) or sent (source); empty otherwise.
    pub sha256: String,
    /// From accept to the end of the exchange.
    pub elapsed: Duration,
}

/// A running service. Dropping it stops its thread.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Everything recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Exchanges that reached local address `ip`.
    pub fn seen_at(&self, ip: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.local.ip().to_string() == ip)
            .collect()
    }

    fn spawn(
        name: &str,
        serve: impl FnMut(&AtomicBool, &Mutex<Vec<Seen>>) + Send + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (Arc::clone(&stop), Arc::clone(&seen));
        let mut serve = serve;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(&s, &v))?;
        Ok(Self {
            stop,
            seen,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn record(seen: &Mutex<Vec<Seen>>, s: Seen) {
    if let Ok(mut v) = seen.lock() {
        v.push(s);
    }
}

/// Accepts on `listener` (non-blocking) until `stop`, handling one connection at a time.
fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    seen: &Mutex<Vec<Seen>>,
    mut handle: impl FnMut(TcpStream) -> io::Result<(u64, u64, String)>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let start = Instant::now();
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                let ready = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
                    .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
                if ready.is_err() {
                    continue;
                }
                let (bytes_in, bytes_out, sha256) = handle(stream).unwrap_or_default();
                record(
                    seen,
                    Seen {
                        local,
                        bytes_in,
                        bytes_out,
                        sha256,
                        elapsed: start.elapsed(),
                    },
                );
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A listener bound in the current thread's network namespace.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Echo: reads one line, answers `echo: <line>`.
pub fn echo(listener: TcpListener) -> io::Result<Server> {
    Server::spawn("net-echo", move |stop, seen| {
        accept_loop(&listener, stop, seen, |stream| {
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone()?);
            let n = reader.read_line(&mut line)?;
            let answer = format!("echo: {}\n", line.trim_end());
            (&stream).write_all(answer.as_bytes())?;
            Ok((n as u64, answer.len() as u64, String::new()))
        });
    })
}

/// The stream the source sends: xorshift64 from a fixed seed, so both ends can name it.
#[derive(Debug, Clone)]
pub struct PatternStream {
    state: u64,
}

impl Default for PatternStream {
    fn default() -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl PatternStream {
    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            let bytes = x.to_le_bytes();
            for (dst, src) in chunk.iter_mut().zip(bytes) {
                *dst = src;
            }
        }
    }
}

/// sha256 (hex) of the first `len` bytes of [`PatternStream`] (`len` a multiple of 8).
pub fn pattern_sha256(len: u64) -> String {
    let mut p = PatternStream::default();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(0);
        let Some(chunk) = buf.get_mut(..n) else { break };
        p.fill(chunk);
        h.update(&*chunk);
        left = left.saturating_sub(n as u64);
    }
    hex::encode(h.finalize())
}

/// Source: on each connection, sends `len` bytes of [`PatternStream`] and closes.
pub fn source(listener: TcpListener, len: u64) -> io::Result<Server> {
    Server::spawn("net-source", move |stop, seen| {
        accept_loop(&listener, stop, seen, |mut stream| {
            let mut p = PatternStream::default();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut sent = 0u64;
            while sent < len {
                let n = usize::try_from((len - sent).min(buf.len() as u64)).unwrap_or(0);
                let Some(chunk) = buf.get_mut(..n) else { break };
                p.fill(chunk);
                stream.write_all(chunk)?;
                h.update(&*chunk);
                sent = sent.saturating_add(n as u64);
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            // Wait for the peer to close, so the whole stream was taken.
            let mut rest = Vec::new();
            let _ = stream.take(1 << 10).read_to_end(&mut rest);
            Ok((0, sent, hex::encode(h.finalize())))
        });
    })
}

/// Sink: reads to EOF, answers with `<sha256 hex> <bytes>\n` and closes.
pub fn sink(listener: TcpListener) -> io::Result<Server> {
    Server::spawn("net-sink", move |stop, seen| {
        accept_loop(&listener, stop, seen, |mut stream| {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(buf.get(..n).unwrap_or_default());
                got = got.saturating_add(n as u64);
            }
            let digest = hex::encode(h.finalize());
            let answer = format!("{digest} {got}\n");
            stream.write_all(answer.as_bytes())?;
            Ok((got, answer.len() as u64, digest))
        });
    })
}

/// The answer to a DNS query: the question echoed, and for an A question of class IN
/// one answer, [`DNS_ANSWER`]; `None` for what is not a standard query with one question.
pub fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let flags = u16::from_be_bytes([*header.get(2)?, *header.get(3)?]);
    let qdcount = u16::from_be_bytes([*header.get(4)?, *header.get(5)?]);
    if flags & 0x8000 != 0 || qdcount != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12usize;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        at = at.checked_add(len)?.checked_add(1)?;
    }
    let end = at.checked_add(5)?;
    let question = query.get(12..end)?;
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    let qclass = u16::from_be_bytes([*query.get(at + 3)?, *query.get(at + 4)?]);
    let answer_a = qtype == 1 && qclass == 1;
    let mut out = Vec::with_capacity(end + 16);
    out.extend_from_slice(header.get(..2)?);
    // QR, opcode 0, AA, RD copied, RA; NOERROR.
    let rd = flags & 0x0100;
    out.extend_from_slice(&(0x8480 | rd).to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer_a).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    if answer_a {
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&DNS_ANSWER.octets());
    }
    Some(out)
}

/// DNS: answers every query on `socket` with [`dns_answer`].
pub fn dns(socket: UdpSocket) -> io::Result<Server> {
    socket.set_read_timeout(Some(POLL))?;
    Server::spawn("net-dns", move |stop, seen| {
        let mut buf = [0u8; 512];
        let Ok(local) = socket.local_addr() else {
            return;
        };
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let start = Instant::now();
            let query = buf.get(..n).unwrap_or_default();
            let mut out = 0u64;
            if let Some(answer) = dns_answer(query) {
                if socket.send_to(&answer, peer).is_ok() {
                    out = answer.len() as u64;
                }
            }
            record(
                seen,
                Seen {
                    local,
                    bytes_in: n as u64,
                    bytes_out: out,
                    sha256: String::new(),
                    elapsed: start.elapsed(),
                },
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).unwrap());
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn dns_answers_a_queries_with_the_fixed_address() {
        let q = query("svc.test", 1);
        let a = dns_answer(&q).unwrap();
        assert_eq!(&a[..2], &[0x12, 0x34], "id kept");
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(&a[6..8], &[0, 1], "one answer");
        assert_eq!(&a[12..q.len()], &q[12..], "question echoed");
        assert_eq!(&a[a.len() - 4..], &DNS_ANSWER.octets());
    }

    #[test]
    fn dns_answers_other_types_with_no_data_and_refuses_junk() {
        let a = dns_answer(&query("svc.test", 28)).unwrap();
        assert_eq!(&a[6..8], &[0, 0]);
        assert!(dns_answer(&[0u8; 5]).is_none());
        let mut q = query("svc.test", 1);
        q.truncate(q.len() - 2);
        assert!(dns_answer(&q).is_none(), "truncated question");
        let mut r = query("svc.test", 1);
        r[2] |= 0x80;
        assert!(dns_answer(&r).is_none(), "a response is not a query");
    }

    #[test]
    fn pattern_digest_matches_the_stream() {
        let mut p = PatternStream::default();
        let mut buf = vec![0u8; 4096];
        p.fill(&mut buf);
        assert_eq!(pattern_sha256(4096), hex::encode(Sha256::digest(&buf)));
        assert_ne!(buf[..8], buf[8..16]);
    }

    fn wait_seen(server: &Server) -> Vec<Seen> {
        for _ in 0..200 {
            let seen = server.seen();
            if !seen.is_empty() {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the server recorded nothing");
    }

    #[test]
    fn source_and_sink_over_loopback() {
        let len = 1u64 << 20;
        let want = pattern_sha256(len);
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let src = source(l, len).unwrap();
        let mut got = Vec::new();
        TcpStream::connect(addr)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got.len() as u64, len);
        assert_eq!(hex::encode(Sha256::digest(&got)), want);
        let seen = wait_seen(&src);
        assert_eq!(
            (seen[0].bytes_out, seen[0].sha256.as_str()),
            (len, want.as_str())
        );

        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let snk = sink(l).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&got).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("{want} {len}\n"));
        let seen = wait_seen(&snk);
        assert_eq!(seen[0].bytes_in, len);
        assert_eq!(seen[0].local, addr);
    }

    #[test]
    fn echo_answers_one_line() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let e = echo(l).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"hello\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "echo: hello\n");
        assert_eq!(wait_seen(&e).len(), 1);
        assert_eq!(e.seen_at("127.0.0.1").len(), 1);
        assert!(e.seen_at("10.99.0.3").is_empty());
    }
}
