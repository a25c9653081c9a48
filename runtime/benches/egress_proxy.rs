//! What secret substitution costs a workload: the same HTTPS requests sent straight to
//! a server and through the egress proxy (`runtime/src/egress_proxy/`), which
//! terminates the client's TLS with the run's CA, judges the head, puts the value in
//! place of the placeholder and opens its own verified TLS connection upstream. Real
//! sockets on loopback, real TLS both sides, one request per connection (the proxy
//! closes each after one exchange, by design), measured in the same run:
//!
//! - `GET`: a fresh connection, handshake, a small request with the placeholder in a
//!   header, a small answer: the latency a request pays;
//! - `POST 8 MiB`: the same with an 8 MiB body (scanned by the proxy for the
//!   placeholder as it passes): the throughput.
//!
//! `cargo bench -p mvm-runtime --bench egress_proxy` (`-- N` for N requests per mode).

// A benchmark harness, not guest-facing code: a setup failure should stop it loudly.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
// The proxy itself uses rustls's *ring* provider (docs/secrets.md says why).
#![allow(deprecated)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_runtime::egress_proxy::{
    Binding, Destination, EgressProxy, Observer, OriginalDst, ProxyConfig, Refusal, SandboxCa,
};
use mvm_runtime::secrets::SecretValue;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{StreamOwned, DEFAULT_VERSIONS};

const HOST: &str = "api.bench.test";
const PLACEHOLDER: &str = "MVM_PLACEHOLDER_BENCH_TOKEN";
const VALUE: &str = "sk-bench-0123456789abcdef";
const BODY_BYTES: usize = 8 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS server on loopback with its own CA: reads a head and `Content-Length` bytes,
/// answers 200 with a short body, closes. Returns its address and the client roots.
fn server() -> (SocketAddrV4, Arc<RootCertStore>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench upstream CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(DEFAULT_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap(),
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = Arc::clone(&config);
            std::thread::spawn(move || serve_one(stream, config));
        }
    });
    (address, Arc::new(roots))
}

fn serve_one(stream: TcpStream, config: Arc<ServerConfig>) {
    stream.set_nodelay(true).unwrap();
    let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), stream);
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let (end, length) = loop {
        let n = match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            break (end + 4, length);
        }
    };
    let mut left = (end + length).saturating_sub(head.len());
    while left > 0 {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

struct Quiet;

impl Observer for Quiet {
    fn substituted(&self, _: &str, _: &mvm_loader::measure::Sha256Digest, _: &Destination) {}
    fn refused(&self, _: Option<&str>, destination: &Destination, reason: Refusal) {
        panic!("the proxy refused a benchmark request to {destination}: {reason:?}");
    }
}

/// One request on a fresh connection to `port`, trusting `roots`; returns its time.
fn request(port: u16, roots: &Arc<RootCertStore>, body: &[u8]) -> Duration {
    let start = Instant::now();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(DEFAULT_VERSIONS)
        .unwrap()
        .with_root_certificates(Arc::clone(roots))
        .with_no_client_auth();
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let name = ServerName::try_from(HOST).unwrap();
    let conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = StreamOwned::new(conn, stream);
    let head = format!(
        "{} /v1/things HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {PLACEHOLDER}\r\nContent-Length: {}\r\n\r\n",
        if body.is_empty() { "GET" } else { "POST" },
        body.len()
    );
    tls.write_all(head.as_bytes()).unwrap();
    for chunk in body.chunks(64 << 10) {
        tls.write_all(chunk).unwrap();
    }
    tls.flush().unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "answer: {}",
        String::from_utf8_lossy(&answer)
    );
    start.elapsed()
}

fn stats(mut times: Vec<Duration>) -> (Duration, Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (times[0], at(0.5), at(0.95))
}

fn main() {
    let runs: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(100);
    let (upstream, upstream_roots) = server();
    let ca = Arc::new(SandboxCa::generate("bench", &[HOST.to_owned()]).unwrap());
    let config = ProxyConfig {
        listen: Ipv4Addr::LOCALHOST,
        guest: Ipv4Addr::LOCALHOST,
        bindings: vec![Binding {
            secret: "BENCH_TOKEN".to_owned(),
            placeholder: PLACEHOLDER.to_owned(),
            value: SecretValue::new(VALUE.as_bytes().to_vec()),
            host: HOST.to_owned(),
            addresses: vec![Ipv4Addr::LOCALHOST],
            port: upstream.port(),
        }],
        ca: Arc::clone(&ca),
        upstream_roots: Arc::clone(&upstream_roots),
        original_dst: OriginalDst::Fixed(upstream),
    };
    let proxy = EgressProxy::start(config, Arc::new(Quiet)).unwrap();
    let mut guest_roots = RootCertStore::empty();
    guest_roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    let guest_roots = Arc::new(guest_roots);
    let body = vec![b'x'; BODY_BYTES];

    println!(
        "egress proxy: {runs} requests per mode (GET), {} (POST 8 MiB); direct and proxied in turn",
        runs / 10 + 1
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "mode", "direct min", "median", "p95", "proxy min", "median", "p95", "ratio"
    );
    for (mode, body, n) in [
        ("GET", &[][..], runs),
        ("POST 8 MiB", &body[..], runs / 10 + 1),
    ] {
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        for _ in 0..n {
            direct.push(request(upstream.port(), &upstream_roots, body));
            proxied.push(request(proxy.port(), &guest_roots, body));
        }
        let (d, p) = (stats(direct), stats(proxied));
        let ms = |t: Duration| format!("{:.2}ms", t.as_secs_f64() * 1e3);
        println!(
            "{mode:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7.2}x",
            ms(d.0),
            ms(d.1),
            ms(d.2),
            ms(p.0),
            ms(p.1),
            ms(p.2),
            p.1.as_secs_f64() / d.1.as_secs_f64()
        );
        if !body.is_empty() {
            let mib_s = |t: Duration| body.len() as f64 / (1 << 20) as f64 / t.as_secs_f64();
            println!(
                "{:<12} direct {:.0} MiB/s, proxied {:.0} MiB/s (medians)",
                "",
                mib_s(d.1),
                mib_s(p.1)
            );
        }
    }
    proxy.stop();
}
