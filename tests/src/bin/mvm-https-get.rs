//! A small HTTPS client for test guests (`secret/*` cases): one request, the response
//! body on stdout. Unlike the guest's busybox `wget` (whose TLS sends no
//! signature_algorithms and verifies nothing), it verifies the server's certificate
//! against a CA bundle, as a real workload's client does, so a case shows the guest
//! trusts what the run gave it. The case pipes it into the guest (`cat > /tmp/get`).
//!
//! ```text
//! mvm-https-get [--ca FILE] [--insecure] [-H 'Name: value']... [--data BODY]
//!               [--split-at N] URL
//! ```
//!
//! `--ca` defaults to `/etc/ssl/certs/ca-certificates.crt`; `--insecure` skips
//! verification (for a server the guest is not meant to trust); `--split-at N` sends the
//! request's first N bytes, waits, then the rest (two TLS records, two TCP segments).
//! Exit 0 with the body for a 200, 22 with `status N` for another status, 1 with an
//! error on stderr.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

const DEFAULT_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
const TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    ca: String,
    insecure: bool,
    headers: Vec<String>,
    data: Option<String>,
    split_at: Option<usize>,
    url: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        ca: DEFAULT_CA.to_owned(),
        insecure: false,
        headers: Vec::new(),
        data: None,
        split_at: None,
        url: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--ca" => args.ca = value("--ca")?,
            "--insecure" => args.insecure = true,
            "-H" | "--header" => args.headers.push(value("-H")?),
            "--data" => args.data = Some(value("--data")?),
            "--split-at" => {
                args.split_at = Some(
                    value("--split-at")?
                        .parse()
                        .map_err(|e| format!("--split-at: {e}"))?,
                );
            }
            url if !url.starts_with('-') && args.url.is_empty() => url.clone_into(&mut args.url),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.url.is_empty() {
        return Err("no URL".into());
    }
    Ok(args)
}

/// Accepts any certificate (`--insecure` only).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
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

fn config(args: &Args) -> Result<rustls::ClientConfig, String> {
    // ring, as the runtime's proxy and the test server use (see runtime/src/egress_proxy).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if args.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(&args.ca).map_err(|e| format!("{}: {e}", args.ca))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", args.ca))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", args.ca))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn run(args: &Args) -> Result<(u16, Vec<u8>), String> {
    let rest = args
        .url
        .strip_prefix("https://")
        .ok_or("only https:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|e| format!("port: {e}"))?),
        None => (authority, 443),
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let tcp =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config(args)?), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);

    let has_host = args
        .headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"));
    let mut request = format!(
        "{} {path} HTTP/1.1\r\n",
        if args.data.is_some() { "POST" } else { "GET" }
    );
    if !has_host {
        request.push_str(&format!("Host: {authority}\r\n"));
    }
    for h in &args.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    let body = args.data.clone().unwrap_or_default();
    if args.data.is_some() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("Connection: close\r\n\r\n");
    request.push_str(&body);
    let bytes = request.as_bytes();
    let split = args.split_at.unwrap_or(bytes.len()).min(bytes.len());
    let (first, second) = bytes.split_at(split);
    tls.write_all(first).map_err(|e| format!("sending: {e}"))?;
    tls.flush().map_err(|e| format!("sending: {e}"))?;
    if !second.is_empty() {
        std::thread::sleep(Duration::from_millis(200));
        tls.write_all(second).map_err(|e| format!("sending: {e}"))?;
        tls.flush().map_err(|e| format!("sending: {e}"))?;
    }
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A server (or proxy) that closes without close_notify after a whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(format!("reading: {e}")),
    }
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no response head")?;
    let head = String::from_utf8_lossy(response.get(..end).unwrap_or_default()).into_owned();
    let status = head
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status")?;
    Ok((status, response.get(end + 4..).unwrap_or_default().to_vec()))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mvm-https-get: {e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok((200, body)) => {
            let _ = std::io::stdout().write_all(&body);
        }
        Ok((status, _)) => {
            println!("status {status}");
            std::process::exit(22);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
