//! An HTTPS service for the secret substitution cases, run on a remote host of
//! [`crate::netbed`]: its own test CA (never a system one) and one server certificate
//! for the names it is given. It records every request exactly as it arrived (head and
//! body) and answers `ok <path>`, except `/echo-auth`, which answers with the request's
//! `Authorization` header (a server that reflects what it is sent). It stops when
//! dropped.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long one connection may stay silent.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the accept loop checks whether it should stop.
const POLL: Duration = Duration::from_millis(20);
/// Most bytes of one request kept.
const MAX_REQUEST: usize = 256 * 1024;

/// A test CA and the server certificate it signed.
pub struct TestPki {
    /// The CA certificate, PEM (what a client is told to trust).
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl TestPki {
    /// A fresh CA and a certificate for `names` (DNS names) and `ips`.
    pub fn new(names: &[&str], ips: &[IpAddr]) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "mvm e2e test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        leaf.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let leaf_cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            key: key.serialize_der(),
        })
    }

    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        // ring, as the runtime's egress proxy uses (its one provider without a C
        // build of aws-lc; no post-quantum key exchange, which a test server on a
        // namespace's veth does not need).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)?;
        Ok(Arc::new(config))
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// The server's own address the peer reached.
    pub local: SocketAddr,
    /// The request's bytes, head and body.
    pub raw: Vec<u8>,
}

impl Request {
    /// The request as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// A running HTTPS service. Dropping it stops it.
pub struct TlsServer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Request>>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsServer {
    /// Serves on `listener` (bound in the remote host's namespace) with `pki`'s
    /// certificate.
    pub fn start(listener: TcpListener, pki: &TestPki) -> io::Result<Self> {
        let config = pki.server_config().map_err(io::Error::other)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::Builder::new()
            .name("tlsserve".into())
            .spawn(move || accept_loop(&listener, &config, &s, &v))?;
        Ok(Self {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    config: &Arc<rustls::ServerConfig>,
    stop: &AtomicBool,
    seen: &Arc<Mutex<Vec<Request>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let config = Arc::clone(config);
                let seen = Arc::clone(seen);
                let _ = std::thread::Builder::new()
                    .name("tlsserve-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, config, &seen) {
                            eprintln!("tlsserve: {e}");
                        }
                    });
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn serve(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    seen: &Mutex<Vec<Request>>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // The head, then as much body as Content-Length says.
    let end = loop {
        if let Some(end) = head_end(&raw) {
            break end;
        }
        let n = tls.read(&mut buf)?;
        if n == 0 || raw.len() > MAX_REQUEST {
            record(seen, local, raw);
            return Ok(());
        }
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
    };
    let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).into_owned();
    let length: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while raw.len() < end.saturating_add(length) && raw.len() <= MAX_REQUEST {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
    record(seen, local, raw);
    let path = head
        .split_ascii_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let body = if path == "/echo-auth" {
        format!("{}\n", header(&head, "authorization").unwrap_or(""))
    } else {
        format!("ok {path}\n")
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(answer.as_bytes())?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn record(seen: &Mutex<Vec<Request>>, local: SocketAddr, raw: Vec<u8>) {
    if let Ok(mut v) = seen.lock() {
        v.push(Request { local, raw });
    }
}
