//! End to end, in process: a guest-side rustls client trusting only the sandbox CA, the
//! proxy, and an HTTPS upstream on 127.0.0.1 with its own test CA. Real sockets, real TLS.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_loader::measure::Sha256Digest;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme, StreamOwned,
};

use super::proxy::crypto_provider;
use super::*;
use crate::secrets::SecretValue;

const PH: &str = "MVM_PLACEHOLDER_API_TOKEN_1f2e";
const VALUE: &str = "tok-9f8e7d6c5b4a3210";
const HOST: &str = "api.mvm.test";
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the observer was told, as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Substituted {
        secret: String,
        sha256: Sha256Digest,
        destination: String,
    },
    Refused {
        secret: Option<String>,
        destination: String,
        reason: Refusal,
    },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

impl Observer for Recorder {
    fn substituted(&self, secret: &str, value_sha256: &Sha256Digest, destination: &Destination) {
        self.0.lock().unwrap().push(Event::Substituted {
            secret: secret.to_owned(),
            sha256: *value_sha256,
            destination: destination.to_string(),
        });
    }

    fn refused(&self, secret: Option<&str>, destination: &Destination, reason: Refusal) {
        self.0.lock().unwrap().push(Event::Refused {
            secret: secret.map(str::to_owned),
            destination: destination.to_string(),
            reason,
        });
    }
}

/// An HTTPS server on 127.0.0.1 with a leaf for `cert_name` from its own CA: it records
/// each request it receives (head, and a body as long as Content-Length says) and
/// answers what `respond` makes of it.
struct Upstream {
    address: SocketAddrV4,
    roots: Arc<RootCertStore>,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    _thread: JoinHandle<()>,
}

fn upstream(cert_name: &str, respond: fn(&[u8]) -> Vec<u8>) -> Upstream {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "upstream test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![cert_name.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = Arc::new(
        ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap(),
    );
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        panic!()
    };
    let received = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (rec, conns) = (Arc::clone(&received), Arc::clone(&connections));
    let thread = std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            conns.fetch_add(1, Ordering::SeqCst);
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.set_nodelay(true).unwrap();
            let tls = ServerConnection::new(Arc::clone(&config)).unwrap();
            let mut tls = StreamOwned::new(tls, stream);
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let complete = |r: &[u8]| {
                let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return false;
                };
                let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                r.len() >= end + 4 + length
            };
            while !complete(&request) {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        request.extend_from_slice(&buf[..n]);
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            }
            if complete(&request) {
                // In small records, a pause between: the proxy sees a value's start
                // before its end, and a possible start (held back) at the very end.
                for piece in respond(&request).chunks(7) {
                    let _ = tls.write_all(piece).and_then(|()| tls.flush());
                    std::thread::sleep(Duration::from_millis(2));
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    Upstream {
        address,
        roots: Arc::new(roots),
        received,
        connections,
        _thread: thread,
    }
}

/// Answers a body that ends with a prefix of the value: held back, then flushed at EOF.
fn answer_ok(_: &[u8]) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nhello tok".to_vec()
}

/// Answers with the request's Authorization header value in the body.
fn answer_echo(request: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(request);
    let auth = text
        .lines()
        .find_map(|l| l.strip_prefix("Authorization: "))
        .unwrap_or("");
    let body = format!("you sent: {auth}; bye\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn binding(up: &Upstream) -> Binding {
    Binding {
        secret: "API_TOKEN".to_owned(),
        placeholder: PH.to_owned(),
        value: SecretValue::new(VALUE.as_bytes().to_vec()),
        host: HOST.to_owned(),
        addresses: vec![LOCALHOST],
        port: up.address.port(),
    }
}

struct Running {
    proxy: EgressProxy,
    ca: Arc<SandboxCa>,
    recorder: Arc<Recorder>,
}

fn proxy(up: &Upstream, guest: Ipv4Addr) -> Running {
    let ca = Arc::new(SandboxCa::generate("test", &[HOST.to_owned()]).unwrap());
    let recorder = Arc::new(Recorder::default());
    let config = ProxyConfig {
        listen: LOCALHOST,
        guest,
        bindings: vec![binding(up)],
        ca: Arc::clone(&ca),
        upstream_roots: Arc::clone(&up.roots),
        original_dst: OriginalDst::Fixed(up.address),
    };
    let observer: Arc<dyn Observer> = Arc::clone(&recorder) as Arc<dyn Observer>;
    let proxy = EgressProxy::start(config, observer).unwrap();
    Running {
        proxy,
        ca,
        recorder,
    }
}

/// A guest client trusting only the sandbox CA.
fn guest_config(ca: &SandboxCa) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Accepts any certificate (but checks handshake signatures).
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_config() -> ClientConfig {
    let provider = crypto_provider();
    ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth()
}

/// What a guest client got back.
#[derive(Debug)]
struct Exchange {
    received: Vec<u8>,
    /// How the stream ended, if not with close_notify.
    error: Option<io::Error>,
    alpn: Option<Vec<u8>>,
}

impl Exchange {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Connects to the proxy as the guest, sends each of `writes` as its own TLS record (a
/// pause between), and reads until the proxy ends the stream.
fn exchange(port: u16, sni: &str, config: ClientConfig, writes: &[&[u8]]) -> Exchange {
    let sock = TcpStream::connect((LOCALHOST, port)).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(TIMEOUT)).unwrap();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = StreamOwned::new(conn, sock);
    let mut error = None;
    for (i, write) in writes.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = tls.write_all(write).and_then(|()| tls.flush()) {
            error = Some(e);
            break;
        }
    }
    let mut received = Vec::new();
    if error.is_none() {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "timed out");
                    error = Some(e);
                    break;
                }
            }
        }
    }
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    Exchange {
        received,
        error,
        alpn,
    }
}

fn request(target: &str, auth: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {auth}\r\n\
         Connection: keep-alive\r\nAccept-Encoding: gzip\r\n\r\n"
    )
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn destination(up: &Upstream, host: &str) -> String {
    format!("{host} at {}", up.address)
}

fn substituted_event(up: &Upstream) -> Event {
    Event::Substituted {
        secret: "API_TOKEN".to_owned(),
        sha256: Sha256Digest::of(VALUE.as_bytes()),
        destination: destination(up, HOST),
    }
}

fn assert_substituted(up: &Upstream, run: &Running, got: &Exchange) {
    assert!(got.error.is_none(), "{:?}", got.error);
    assert!(
        got.text().starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        got.text()
    );
    assert!(got.text().ends_with("\r\n\r\nhello tok"), "{}", got.text());
    assert!(!contains(&got.received, VALUE));
    let sent = up.received.lock().unwrap().clone();
    let sent = String::from_utf8(sent).unwrap();
    assert!(
        sent.contains(&format!("\r\nAuthorization: Bearer {VALUE}\r\n")),
        "{sent}"
    );
    assert!(!sent.contains(PH));
    assert!(sent.contains("\r\nConnection: close\r\n"));
    assert!(!sent.contains("keep-alive"));
    assert!(sent.contains("\r\nAccept-Encoding: identity\r\n"));
    assert!(!sent.contains("gzip"));
    assert_eq!(run.recorder.events(), vec![substituted_event(up)]);
}

#[test]
fn a_placeholder_in_a_header_arrives_upstream_as_the_value() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let mut config = guest_config(&run.ca);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let got = exchange(
        run.proxy.port(),
        HOST,
        config,
        &[request("/v1/me", PH).as_bytes()],
    );
    assert_eq!(got.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_substituted(&up, &run, &got);
    assert!(up
        .received
        .lock()
        .unwrap()
        .starts_with(b"GET /v1/me HTTP/1.1\r\n"));
}

#[test]
fn a_placeholder_split_across_records_is_substituted() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let whole = request("/", PH);
    let split = whole.find(PH).unwrap() + 12;
    let (first, second) = whole.split_at(split);
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[first.as_bytes(), second.as_bytes()],
    );
    assert_substituted(&up, &run, &got);
}

#[test]
fn tls12_without_sni_is_served_for_the_bound_host() {
    // An old client: TLS 1.2 and no SNI; the leaf is the one bound host's.
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(run.ca.cert_der().to_vec()))
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_sni = false;
    let got = exchange(
        run.proxy.port(),
        HOST,
        config,
        &[request("/", PH).as_bytes()],
    );
    assert_substituted(&up, &run, &got);
}

#[test]
fn a_placeholder_in_the_query_is_refused_before_any_upstream_connection() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let req = format!("GET /search?key={PH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[req.as_bytes()],
    );
    let text = got.text();
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(text.contains("\r\nConnection: close\r\n"));
    assert!(text.contains("\r\nContent-Type: text/plain\r\n"));
    assert!(text.ends_with("\r\n\r\nmvm egress proxy: refused (placeholder_in_target)\n"));
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    assert!(up.received.lock().unwrap().is_empty());
    assert_eq!(
        run.recorder.events(),
        vec![Event::Refused {
            secret: Some("API_TOKEN".to_owned()),
            destination: destination(&up, HOST),
            reason: Refusal::PlaceholderInTarget,
        }]
    );
}

/// other.mvm.test resolves to the bound address: a verifying guest cannot even complete
/// the handshake (the CA's name constraints make the leaf invalid); one that accepts any
/// certificate gets as far as the head, and is refused `not_bound`.
#[test]
fn a_placeholder_for_another_host_is_not_bound() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let other = "other.mvm.test";
    let req = format!("GET / HTTP/1.1\r\nHost: {other}\r\nAuthorization: Bearer {PH}\r\n\r\n");
    let got = exchange(
        run.proxy.port(),
        other,
        guest_config(&run.ca),
        &[req.as_bytes()],
    );
    let error = got.error.expect("a verifying client refuses the leaf");
    let tls_error = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(
        matches!(tls_error, Some(rustls::Error::InvalidCertificate(_))),
        "{error:?}"
    );
    assert!(got.received.is_empty());

    let got = exchange(
        run.proxy.port(),
        other,
        accept_any_config(),
        &[req.as_bytes()],
    );
    assert!(
        got.text().starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{}",
        got.text()
    );
    assert!(got.text().ends_with("refused (not_bound)\n"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    assert_eq!(
        run.recorder.events(),
        vec![Event::Refused {
            secret: Some("API_TOKEN".to_owned()),
            destination: destination(&up, other),
            reason: Refusal::NotBound,
        }]
    );
}

#[test]
fn an_upstream_certificate_for_another_name_is_a_502() {
    let up = upstream("wrong.mvm.test", answer_ok);
    let run = proxy(&up, LOCALHOST);
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[request("/", PH).as_bytes()],
    );
    let text = got.text();
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nupstream certificate not valid for api.mvm.test\n"),
        "{text}"
    );
    assert!(up.received.lock().unwrap().is_empty());
    assert!(run.recorder.events().is_empty());
}

#[test]
fn a_value_reflected_by_the_upstream_never_reaches_the_guest() {
    let up = upstream(HOST, answer_echo);
    let run = proxy(&up, LOCALHOST);
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[request("/", PH).as_bytes()],
    );
    // The stream was cut, not ended: the guest sees a truncation.
    assert!(got.error.is_some());
    let full = answer_echo(format!("Authorization: Bearer {VALUE}\r\n").as_bytes());
    let value_at = full
        .windows(VALUE.len())
        .position(|w| w == VALUE.as_bytes())
        .unwrap();
    // Whatever arrived is the response up to, and never into, the value.
    assert!(got.received.len() <= value_at, "{}", got.text());
    assert!(full.starts_with(&got.received));
    assert_eq!(
        run.recorder.events(),
        vec![
            substituted_event(&up),
            Event::Refused {
                secret: Some("API_TOKEN".to_owned()),
                destination: destination(&up, HOST),
                reason: Refusal::ValueReflected,
            },
        ]
    );
}

#[test]
fn a_placeholder_in_the_body_closes_the_connection() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let body = format!("{{\"token\":\"{PH}\"}}");
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (start, end) = body.split_at(15);
    let writes = [head.as_bytes(), start.as_bytes(), end.as_bytes()];
    let got = exchange(run.proxy.port(), HOST, guest_config(&run.ca), &writes);
    assert!(
        got.error.is_some() || got.received.is_empty(),
        "{}",
        got.text()
    );
    assert!(!got.text().contains("200 OK"));
    assert!(!contains(&up.received.lock().unwrap(), PH));
    assert_eq!(
        run.recorder.events(),
        vec![Event::Refused {
            secret: Some("API_TOKEN".to_owned()),
            destination: destination(&up, HOST),
            reason: Refusal::PlaceholderInBody,
        }]
    );
}

#[test]
fn a_huge_head_is_a_bad_request_and_the_answer_arrives() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let filler = format!("X-Filler: {}\r\n", "f".repeat(1000)).repeat(70);
    let req = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n{filler}\r\n");
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[req.as_bytes()],
    );
    assert!(
        got.text().starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{:?}",
        got
    );
    assert!(got.text().ends_with("refused (bad_request)\n"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    assert_eq!(
        run.recorder.events(),
        vec![Event::Refused {
            secret: None,
            destination: HOST.to_owned() + " at " + &up.address.to_string(),
            reason: Refusal::BadRequest,
        }]
    );
}

#[test]
fn a_destination_no_binding_serves_is_closed() {
    let up = upstream(HOST, answer_ok);
    let ca = Arc::new(SandboxCa::generate("test", &[HOST.to_owned()]).unwrap());
    let recorder = Arc::new(Recorder::default());
    let config = ProxyConfig {
        listen: LOCALHOST,
        guest: LOCALHOST,
        bindings: vec![binding(&up)],
        ca: Arc::clone(&ca),
        upstream_roots: Arc::clone(&up.roots),
        // The bound address, another port.
        original_dst: OriginalDst::Fixed(SocketAddrV4::new(LOCALHOST, up.address.port() ^ 1)),
    };
    let observer: Arc<dyn Observer> = Arc::clone(&recorder) as Arc<dyn Observer>;
    let proxy = EgressProxy::start(config, observer).unwrap();
    let got = exchange(
        proxy.port(),
        HOST,
        guest_config(&ca),
        &[request("/", PH).as_bytes()],
    );
    assert!(got.error.is_some());
    assert!(got.received.is_empty());
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    assert!(recorder.events().is_empty());
}

#[test]
fn a_client_offering_only_h2_fails_the_handshake() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let mut config = guest_config(&run.ca);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let got = exchange(
        run.proxy.port(),
        HOST,
        config,
        &[request("/", PH).as_bytes()],
    );
    assert!(got.error.is_some());
    assert!(got.received.is_empty());
    assert!(run.recorder.events().is_empty());
}

#[test]
fn a_peer_other_than_the_guest_is_closed() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, Ipv4Addr::new(127, 0, 0, 2));
    let got = exchange(
        run.proxy.port(),
        HOST,
        guest_config(&run.ca),
        &[request("/", PH).as_bytes()],
    );
    assert!(got.error.is_some());
    assert!(got.received.is_empty());
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    assert!(run.recorder.events().is_empty());
}

#[test]
fn the_65th_connection_is_closed_and_stop_ends_the_rest_promptly() {
    let up = upstream(HOST, answer_ok);
    let run = proxy(&up, LOCALHOST);
    let port = run.proxy.port();
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| TcpStream::connect((LOCALHOST, port)).unwrap())
        .collect();
    let mut extra = TcpStream::connect((LOCALHOST, port)).unwrap();
    extra.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    let start = Instant::now();
    let closed = match extra.read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && start.elapsed() < TIMEOUT,
        "the 65th connection was served"
    );

    let start = Instant::now();
    run.proxy.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        start.elapsed()
    );
    for mut sock in held {
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        assert!(matches!(sock.read(&mut byte), Ok(0) | Err(_)));
    }
}

#[test]
fn host_roots_reads_ssl_cert_file() {
    // The variables are process-wide; only this test touches them, and puts them back.
    let ca = SandboxCa::generate("roots", &[HOST.to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let saved: Vec<_> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .map(|name| (name, std::env::var_os(name)))
        .collect();
    std::env::set_var("SSL_CERT_FILE", &bundle);
    std::env::remove_var("SSL_CERT_DIR");
    let one = host_roots().map(|roots| roots.len());
    std::fs::write(&bundle, "no certificates here\n").unwrap();
    let none = host_roots();
    for (name, value) in saved {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
    assert_eq!(one.unwrap(), 1);
    assert!(matches!(none, Err(ProxyError::NoRoots { .. })), "{none:?}");
}
