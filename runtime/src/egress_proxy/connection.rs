//! One guest connection, from accept to close: its destination and bindings, the TLS
//! handshake with a leaf from the sandbox CA, the head and its judgement, the upstream,
//! the pump; with the answers (403, 502) and the observer's records along the way.

use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::server::NoServerSessionStorage;
use rustls::{ServerConfig, ServerConnection};
use zeroize::Zeroizing;

use super::ca::LeafResolver;
use super::head::{self, HeadBuffer, HeadProgress, Refused};
use super::original_dst::original_destination;
use super::pump::{pump, Endpoint, Plain, PumpEnd, Wake, CLOSE_TIMEOUT};
use super::scan::Scanner;
use super::upstream;
use super::{Binding, Destination, Refusal, Shared, HEAD_TIMEOUT, UPSTREAM_CONNECT_TIMEOUT};

/// Serves one accepted connection from the guest, to its end.
pub(super) fn serve(shared: &Shared, stream: TcpStream) {
    let address = match original_destination(&stream, shared.config.original_dst) {
        Ok(address) => address,
        Err(e) => {
            tracing::warn!(error = %e, "egress proxy: no original destination; connection closed");
            return;
        }
    };
    let serving: Vec<&Binding> = shared
        .config
        .bindings
        .iter()
        .filter(|b| b.serves(address))
        .collect();
    let Some(first) = serving.first() else {
        tracing::warn!(%address, "egress proxy: connection to an address no binding names; closed");
        return;
    };
    let default_host = serving
        .iter()
        .all(|b| b.host == first.host)
        .then(|| first.host.clone());
    let tls = match server_config(shared, default_host).and_then(ServerConnection::new) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "egress proxy: TLS server setup failed; connection closed");
            return;
        }
    };
    let mut guest = match Endpoint::new(stream, tls.into()) {
        Ok(guest) => guest,
        Err(e) => {
            tracing::warn!(error = %e, "egress proxy: guest socket setup failed");
            return;
        }
    };
    let stop = &shared.stop;
    let (head, rest) = match read_head(&mut guest, stop) {
        HeadRead::Head { head, rest } => (head, rest),
        HeadRead::Closed(why) => {
            tracing::debug!(%address, why, "egress proxy: connection ended before a request");
            return;
        }
        HeadRead::Refuse => {
            let host = sni(&guest);
            let refused = Refused {
                reason: Refusal::BadRequest,
                secret: None,
                host,
            };
            refuse(shared, &mut guest, refused, address);
            return;
        }
    };
    let forward = match head::judge(
        &head,
        sni(&guest).as_deref(),
        &shared.config.bindings,
        address,
    ) {
        Ok(forward) => forward,
        Err(refused) => {
            refuse(shared, &mut guest, refused, address);
            return;
        }
    };
    drop(head);
    relay(shared, &mut guest, address, forward, rest);
}

/// Sends a judged request upstream and pumps both ways: each substitution recorded once
/// the head is out; a refusal if the guest sends a placeholder later or the upstream
/// reflects a value. Dropping the endpoints at the end closes both sockets (after a
/// refusal without close_notify, so the guest sees a truncated stream, not a whole one).
fn relay(
    shared: &Shared,
    guest: &mut Endpoint,
    address: SocketAddrV4,
    forward: head::Forward,
    rest: Vec<u8>,
) {
    let stop = &shared.stop;
    let destination = Destination {
        host: Some(forward.host.clone()),
        address,
    };

    let mut upstream = match upstream::open(address, &forward.host, &shared.client_config, stop) {
        Ok(upstream) => upstream,
        Err(failure) => {
            tracing::warn!(%destination, %failure, "egress proxy: upstream failed");
            let body = failure.summary(&forward.host, address);
            answer(guest, stop, "502 Bad Gateway", &body);
            return;
        }
    };
    let sent = upstream.write_all_plain(
        &forward.head,
        stop,
        Instant::now() + UPSTREAM_CONNECT_TIMEOUT,
    );
    if let Err(e) = sent {
        tracing::warn!(%destination, error = %e, "egress proxy: sending the request head upstream failed");
        let body = format!("upstream {destination} failed while the request was sent");
        answer(guest, stop, "502 Bad Gateway", &body);
        return;
    }
    let substituted: Vec<&Binding> = forward
        .substituted
        .iter()
        .filter_map(|&i| shared.config.bindings.get(i))
        .collect();
    for binding in &substituted {
        tracing::info!(%destination, secret = %binding.secret, "egress proxy: value substituted");
        shared
            .observer
            .substituted(&binding.secret, &binding.value.digest(), &destination);
    }
    drop(forward);

    let bindings = &shared.config.bindings;
    let mut requests = Scanner::new(bindings.iter().map(|b| b.placeholder.as_bytes()), false);
    let mut responses = Scanner::new(substituted.iter().map(|b| b.value.expose()), true);
    let rest = Zeroizing::new(rest);
    let end = pump(
        guest,
        &mut upstream,
        stop,
        &rest,
        &mut requests,
        &mut responses,
    );
    let refused = |secret: Option<&str>, reason: Refusal| {
        tracing::warn!(%destination, secret, reason = reason.as_str(), "egress proxy: connection closed");
        shared.observer.refused(secret, &destination, reason);
    };
    match end {
        PumpEnd::Finished => {
            tracing::debug!(%destination, "egress proxy: request done");
            upstream.tls.send_close_notify();
            let _ = upstream.flush();
        }
        PumpEnd::PlaceholderInBody(i) => {
            let secret = bindings.get(i).map(|b| b.secret.as_str());
            refused(secret, Refusal::PlaceholderInBody);
        }
        PumpEnd::ValueReflected(i) => {
            let secret = substituted.get(i).map(|b| b.secret.as_str());
            refused(secret, Refusal::ValueReflected);
        }
        PumpEnd::Stopped => tracing::debug!(%destination, "egress proxy: closed on stop"),
        PumpEnd::Idle => tracing::info!(%destination, "egress proxy: idle connection closed"),
        PumpEnd::TooLong => {
            tracing::info!(%destination, "egress proxy: connection too long; closed")
        }
        PumpEnd::GuestFailed(e) => {
            tracing::debug!(%destination, error = %e, "egress proxy: guest side ended")
        }
        PumpEnd::UpstreamFailed(e) => {
            tracing::info!(%destination, error = %e, "egress proxy: upstream side failed");
        }
    }
}

/// The guest's TLS configuration for one connection: a leaf for the SNI name (else for
/// `default_host`), ALPN `http/1.1` only (a client offering only others fails), no
/// session resumption (every connection has its own configuration).
fn server_config(
    shared: &Shared,
    default_host: Option<String>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let resolver = LeafResolver {
        ca: Arc::clone(&shared.config.ca),
        default_host,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&shared.provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The guest's SNI, lowercase.
fn sni(guest: &Endpoint) -> Option<String> {
    match &guest.tls {
        rustls::Connection::Server(server) => server.server_name().map(str::to_ascii_lowercase),
        rustls::Connection::Client(_) => None,
    }
}

/// What the guest sent before its head was judged.
enum HeadRead {
    /// A whole head, and what followed it.
    Head { head: Vec<u8>, rest: Vec<u8> },
    /// No request: the handshake failed, the guest left, or the proxy stops.
    Closed(String),
    /// A head too large, too slow, or cut short: refused as a bad request.
    Refuse,
}

/// Completes the guest's handshake and reads its request head, within [`HEAD_TIMEOUT`].
fn read_head(guest: &mut Endpoint, stop: &UnixStream) -> HeadRead {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buffer = HeadBuffer::default();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if let Err(e) = guest.flush().and_then(|()| guest.fill()) {
            return HeadRead::Closed(format!("TLS with the guest failed: {e}"));
        }
        if guest.tls.is_handshaking() {
            if guest.at_eof() {
                return HeadRead::Closed("the guest left during the handshake".to_owned());
            }
        } else {
            loop {
                match guest.read_plain(&mut buf) {
                    Ok(Plain::Data(n)) => match buffer.push(buf.get(..n).unwrap_or_default()) {
                        HeadProgress::Incomplete => {}
                        HeadProgress::Complete { head, rest } => {
                            return HeadRead::Head { head, rest };
                        }
                        HeadProgress::TooLarge => return HeadRead::Refuse,
                    },
                    Ok(Plain::WouldBlock) => break,
                    Ok(Plain::End) if buffer.is_empty() => {
                        return HeadRead::Closed("the guest left before a request".to_owned());
                    }
                    Ok(Plain::End) => return HeadRead::Refuse,
                    Err(e) => return HeadRead::Closed(format!("TLS with the guest failed: {e}")),
                }
            }
        }
        if let Err(e) = guest.flush() {
            return HeadRead::Closed(format!("TLS with the guest failed: {e}"));
        }
        match super::pump::wait(&[&*guest], stop, deadline) {
            Wake::Ready => {}
            Wake::Stop => return HeadRead::Closed("the proxy is stopping".to_owned()),
            Wake::Timeout if guest.tls.is_handshaking() => {
                return HeadRead::Closed("the handshake timed out".to_owned());
            }
            Wake::Timeout => return HeadRead::Refuse,
        }
    }
}

/// Records a refusal and answers it with a 403.
fn refuse(shared: &Shared, guest: &mut Endpoint, refused: Refused, address: SocketAddrV4) {
    let destination = Destination {
        host: refused.host,
        address,
    };
    let reason = refused.reason;
    tracing::warn!(%destination, secret = refused.secret.as_deref(), reason = reason.as_str(),
        "egress proxy: request refused");
    shared
        .observer
        .refused(refused.secret.as_deref(), &destination, reason);
    let body = format!("mvm egress proxy: refused ({})", reason.as_str());
    answer(guest, &shared.stop, "403 Forbidden", &body);
}

/// Answers the guest with `status` and a one-line `body`, then closes.
fn answer(guest: &mut Endpoint, stop: &UnixStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}\n",
        body.len().saturating_add(1),
    );
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    if guest
        .write_all_plain(response.as_bytes(), stop, deadline)
        .is_ok()
    {
        guest.close(stop, deadline);
    }
}
