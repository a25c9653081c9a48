//! The egress proxy of secret substitution: a guest holds only a placeholder for a
//! secret, and this proxy, on the host end of the VM's tap, puts the real value into the
//! request's header values on the way out, for the one host the secret is bound to.
//!
//! nftables redirects the VM's connections to a bound host's pinned addresses here. The
//! proxy terminates the guest's TLS with a leaf from a per-sandbox CA ([`SandboxCa`],
//! `ca.rs`), judges the HTTP/1.1 request head (`head.rs`), re-originates TLS to the
//! original destination with normal verification (`upstream.rs`), then pumps both ways
//! (`pump.rs`), refusing placeholders in the rest of the request and values reflected in
//! the response (`scan.rs`). Everything the guest sends is hostile input; a value is never
//! logged, printed or put in an error: only secret names, digests and placeholders are.
//!
//! Threads: one acceptor, and one per connection (at most [`MAX_CONNECTIONS`] live), each
//! running `connection.rs` from accept to close. All of them wait in poll(2) on their
//! sockets and on a stop socket, so [`EgressProxy::stop`] (or dropping the proxy) ends
//! every connection within milliseconds and joins them.

mod ca;
mod connection;
mod handoff;
mod head;
mod original_dst;
mod pump;
mod scan;
mod upstream;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mvm_loader::measure::Sha256Digest;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustls::crypto::CryptoProvider;

pub use ca::{CaParts, SandboxCa};
pub use handoff::{bindings, Handoff, Opened};
pub use head::header_safe;

/// The most connections served at once; the next one is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// How long the guest has for its TLS handshake and request head together.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the upstream has to accept the TCP connection, and again for its TLS handshake.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no byte moving either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// No connection lives longer than this.
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(600);

/// One secret bound to one host: the placeholder the guest sees, the value, the host.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The secret's name, e.g. `API_TOKEN`.
    pub secret: String,
    /// What the guest sees instead of the value: 8..=256 characters of `[A-Za-z0-9_.-]`
    /// (validated by the caller).
    pub placeholder: String,
    /// The value put in its place.
    pub value: crate::secrets::SecretValue,
    /// The DNS name the value may go to: lowercase ASCII, no trailing dot.
    pub host: String,
    /// What `host` was pinned to at admission.
    pub addresses: Vec<Ipv4Addr>,
    /// The port the value may go to (usually 443).
    pub port: u16,
}

impl Binding {
    /// Whether a connection to `destination` may carry this binding's value.
    fn serves(&self, destination: SocketAddrV4) -> bool {
        self.port == destination.port() && self.addresses.contains(destination.ip())
    }
}

/// Where a proxied request was going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The name the guest asked for (its Host header, else its SNI), if any.
    pub host: Option<String>,
    /// The original destination of the redirected connection.
    pub address: SocketAddrV4,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host} at {}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A placeholder in the request line (method, path, query) or in the Host header.
    PlaceholderInTarget,
    /// A placeholder in the request body or in anything sent after the head.
    PlaceholderInBody,
    /// A placeholder in a header name.
    PlaceholderInHeaderName,
    /// A placeholder in a header value of a request to a host or address it is not bound to.
    NotBound,
    /// The Host header names another host than the TLS SNI.
    HostMismatch,
    /// No Host header.
    NoHost,
    /// More than one Host header.
    DuplicateHost,
    /// A request head that is malformed, too large or too slow.
    BadRequest,
    /// The upstream's response contained a value substituted on this connection.
    ValueReflected,
    /// A value that cannot go into a header (control bytes, line breaks, empty).
    UnsafeValue,
}

impl Refusal {
    /// The snake_case name used in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlaceholderInTarget => "placeholder_in_target",
            Self::PlaceholderInBody => "placeholder_in_body",
            Self::PlaceholderInHeaderName => "placeholder_in_header_name",
            Self::NotBound => "not_bound",
            Self::HostMismatch => "host_mismatch",
            Self::NoHost => "no_host",
            Self::DuplicateHost => "duplicate_host",
            Self::BadRequest => "bad_request",
            Self::ValueReflected => "value_reflected",
            Self::UnsafeValue => "unsafe_value",
        }
    }

    /// One line saying what was refused.
    pub fn description(self) -> &'static str {
        match self {
            Self::PlaceholderInTarget => "a placeholder in the request line or Host header",
            Self::PlaceholderInBody => "a placeholder after the request head (body or pipelined)",
            Self::PlaceholderInHeaderName => "a placeholder in a header name",
            Self::NotBound => "a placeholder for a host or address it is not bound to",
            Self::HostMismatch => "a Host header naming another host than the TLS SNI",
            Self::NoHost => "a request without a Host header",
            Self::DuplicateHost => "a request with more than one Host header",
            Self::BadRequest => "a malformed, oversized or too slow request head",
            Self::ValueReflected => "a response that contained a substituted value",
            Self::UnsafeValue => "a value that cannot go into a header",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Told of each substitution and each refusal (the caller writes audit records). Never
/// given a value.
pub trait Observer: Send + Sync + 'static {
    /// `secret`'s value (whose sha256 is `value_sha256`) went in a request to `destination`.
    fn substituted(&self, secret: &str, value_sha256: &Sha256Digest, destination: &Destination);
    /// A request to `destination` was refused for `reason`, concerning `secret` if named.
    fn refused(&self, secret: Option<&str>, destination: &Destination, reason: Refusal);
}

/// Entry points for the fuzz target `egress_head` (`fuzz/src/egress_head.rs`), which
/// drives the proxy's first contact with a hostile guest. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddrV4;

    use super::head::{judge as judge_head, HeadBuffer, HeadProgress};
    use super::{Binding, Refusal};

    /// What `head::judge` decided: the head sent upstream, the host it is for and the
    /// bindings whose values went in; or the refusal.
    pub fn judge(
        head: &[u8],
        sni: Option<&str>,
        bindings: &[Binding],
        destination: SocketAddrV4,
    ) -> Result<(Vec<u8>, String, Vec<usize>), Refusal> {
        judge_head(head, sni, bindings, destination)
            .map(|f| (f.head.to_vec(), f.host, f.substituted))
            .map_err(|r| r.reason)
    }

    /// The head `HeadBuffer` finds in `chunks` pushed one by one, and what followed it;
    /// `None` while incomplete or when too large.
    pub fn split_head(chunks: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut buffer = HeadBuffer::default();
        let mut chunks = chunks.iter();
        for chunk in chunks.by_ref() {
            match buffer.push(chunk) {
                HeadProgress::Complete { head, mut rest } => {
                    rest.extend(chunks.flat_map(|c| c.iter().copied()));
                    return Some((head, rest));
                }
                HeadProgress::TooLarge => return None,
                HeadProgress::Incomplete => {}
            }
        }
        None
    }
}

/// What an [`Observer`] was told, as data: for a proxy whose audit log is in another
/// process (the emulated tier's test host tells the outer `mvm`). Never a value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Observed {
    /// [`Observer::substituted`].
    Substituted {
        /// The secret's name.
        secret: String,
        /// sha256 of its value.
        value_sha256: Sha256Digest,
        /// [`Destination`], as displayed.
        destination: String,
    },
    /// [`Observer::refused`].
    Refused {
        /// The secret concerned, if one is.
        secret: Option<String>,
        /// [`Destination`], as displayed.
        destination: String,
        /// [`Refusal::as_str`].
        reason: String,
    },
}

impl Observed {
    /// What [`Observer::substituted`] was told.
    #[must_use]
    pub fn substituted(
        secret: &str,
        value_sha256: &Sha256Digest,
        destination: &Destination,
    ) -> Self {
        Self::Substituted {
            secret: secret.to_owned(),
            value_sha256: *value_sha256,
            destination: destination.to_string(),
        }
    }

    /// What [`Observer::refused`] was told.
    #[must_use]
    pub fn refused(secret: Option<&str>, destination: &Destination, reason: Refusal) -> Self {
        Self::Refused {
            secret: secret.map(str::to_owned),
            destination: destination.to_string(),
            reason: reason.as_str().to_owned(),
        }
    }
}

/// How the proxy learns where a redirected connection was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalDst {
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the accepted socket (nftables `dnat`).
    Netfilter,
    /// Always this address (tests).
    Fixed(SocketAddrV4),
}

/// What one proxy serves.
#[derive(Debug)]
pub struct ProxyConfig {
    /// The address to listen on (the host end of the VM's tap), on an ephemeral port.
    pub listen: Ipv4Addr,
    /// The only peer address accepted (the guest's); others are closed at once.
    pub guest: Ipv4Addr,
    /// The secrets and where each may go.
    pub bindings: Vec<Binding>,
    /// The sandbox's CA, which issues the leaves the guest sees.
    pub ca: Arc<SandboxCa>,
    /// The roots the upstream's certificate is verified against.
    pub upstream_roots: Arc<rustls::RootCertStore>,
    /// How a connection's original destination is learnt.
    pub original_dst: OriginalDst,
}

/// Why the proxy could not start, or a CA or trust store could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A socket or thread operation failed.
    #[error("egress proxy: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// rcgen could not make a key or certificate.
    #[error("egress proxy CA: {what}: {source}")]
    Certificate {
        /// What was being made.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// rustls refused a configuration or key.
    #[error("egress proxy TLS: {what}: {source}")]
    Tls {
        /// What was being set up.
        what: String,
        /// rustls's error.
        source: rustls::Error,
    },
    /// A CA was asked for with no host to constrain it to (it would vouch for any name).
    #[error("egress proxy CA {label:?}: no hosts to constrain it to")]
    NoHosts {
        /// The CA's label.
        label: String,
    },
    /// A leaf was asked for a name that is not a DNS name (an IP address).
    #[error("egress proxy CA: {name:?} is not a DNS name")]
    NotADnsName {
        /// The name asked for.
        name: String,
    },
    /// No usable trust root was found for the upstream side.
    #[error("egress proxy: no trust roots for upstream TLS could be loaded ({detail})")]
    NoRoots {
        /// What rustls-native-certs reported.
        detail: String,
    },
}

/// The host's trust roots for the upstream side: the system's, or those named by
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`. An error if none load.
pub fn host_roots() -> Result<rustls::RootCertStore, ProxyError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        return Err(ProxyError::NoRoots {
            detail: if errors.is_empty() {
                format!("no certificates found, {ignored} unparsable")
            } else {
                errors.join("; ")
            },
        });
    }
    tracing::debug!(added, ignored, "egress proxy: upstream trust roots loaded");
    Ok(roots)
}

/// The TLS primitives on both sides: *ring*'s. rustls deprecates it for its lack of a
/// post-quantum key exchange: the guest's side is a local link, but the upstream side
/// carries the value over the network with X25519 or P-256 only (docs/secrets.md says
/// so). aws-lc-rs would add X25519MLKEM768 at the price of a C build of aws-lc in every
/// build of `mvm`; not taken yet.
#[allow(deprecated)]
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What every connection thread shares.
struct Shared {
    config: ProxyConfig,
    observer: Arc<dyn Observer>,
    provider: Arc<CryptoProvider>,
    client_config: Arc<rustls::ClientConfig>,
    /// Readable (EOF) once the proxy stops.
    stop: UnixStream,
    live: AtomicUsize,
}

/// A running egress proxy: one listening socket and its threads.
pub struct EgressProxy {
    port: u16,
    /// Dropping it wakes every thread of the proxy.
    stop: Option<UnixStream>,
    acceptor: Option<JoinHandle<()>>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Listens on `config.listen` (ephemeral port) and serves until stopped.
    pub fn start(config: ProxyConfig, observer: Arc<dyn Observer>) -> Result<Self, ProxyError> {
        let listener =
            TcpListener::bind(SocketAddrV4::new(config.listen, 0)).map_err(|source| {
                ProxyError::Io {
                    what: format!("listening on {}", config.listen),
                    source,
                }
            })?;
        Self::start_on(listener, config, observer)
    }

    /// Serves on `listener`, bound beforehand (connections made before this call wait in
    /// its queue); `config.listen` is not used.
    pub fn start_on(
        listener: TcpListener,
        config: ProxyConfig,
        observer: Arc<dyn Observer>,
    ) -> Result<Self, ProxyError> {
        let io_err = |what: &str| {
            let what = what.to_owned();
            move |source| ProxyError::Io { what, source }
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err("making the listener non-blocking"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the listening port"))?
            .port();
        let (stop_tx, stop_rx) = UnixStream::pair().map_err(io_err("creating the stop socket"))?;
        let provider = crypto_provider();
        let client_config =
            upstream::client_config(Arc::clone(&provider), Arc::clone(&config.upstream_roots))
                .map_err(|source| ProxyError::Tls {
                    what: "upstream client configuration".to_owned(),
                    source,
                })?;
        let shared = Arc::new(Shared {
            config,
            observer,
            provider,
            client_config,
            stop: stop_rx,
            live: AtomicUsize::new(0),
        });
        let acceptor = std::thread::Builder::new()
            .name("mvm-egress-accept".to_owned())
            .spawn(move || accept_loop(&listener, &shared))
            .map_err(io_err("starting the acceptor thread"))?;
        tracing::info!(port, "egress proxy: listening");
        Ok(Self {
            port,
            stop: Some(stop_tx),
            acceptor: Some(acceptor),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops accepting, closes live connections and joins every thread.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.join().is_err() {
                tracing::error!("egress proxy: the acceptor thread panicked");
            }
        }
    }
}

/// Accepts until the stop socket wakes it, then joins the connections' threads.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "egress proxy: poll on the listener failed; stopping");
                break;
            }
        }
        let [_, stop] = fds;
        if stop.revents().is_some_and(|r| !r.is_empty()) {
            break;
        }
        threads.retain(|t| !t.is_finished());
        loop {
            match listener.accept() {
                Ok((stream, peer)) => admit(stream, peer.ip(), shared, &mut threads),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ECONNABORTED, EMFILE and the like: this connection is lost, not the
                    // proxy. A pause, so that a listener left readable does not spin.
                    tracing::warn!(error = %e, "egress proxy: accept failed");
                    let mut stop = [PollFd::new(shared.stop.as_fd(), PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut stop, PollTimeout::from(100u16));
                    break;
                }
            }
        }
    }
    tracing::debug!("egress proxy: stopping");
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!("egress proxy: a connection thread panicked");
        }
    }
}

/// Starts serving one accepted connection, or closes it.
fn admit(
    stream: TcpStream,
    peer: std::net::IpAddr,
    shared: &Arc<Shared>,
    threads: &mut Vec<JoinHandle<()>>,
) {
    if peer != std::net::IpAddr::V4(shared.config.guest) {
        tracing::warn!(%peer, guest = %shared.config.guest, "egress proxy: connection from a peer other than the guest closed");
        return;
    }
    let live = LiveConnection::enter(shared);
    let Some(live) = live else {
        tracing::warn!(
            max = MAX_CONNECTIONS,
            "egress proxy: too many live connections; one closed"
        );
        return;
    };
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("mvm-egress-conn".to_owned())
        .spawn(move || {
            let _live = live;
            connection::serve(&thread_shared, stream);
        });
    match spawned {
        Ok(thread) => threads.push(thread),
        Err(e) => tracing::warn!(error = %e, "egress proxy: no thread for a connection; closed"),
    }
}

/// One slot of [`MAX_CONNECTIONS`], given back when dropped.
struct LiveConnection(Arc<Shared>);

impl LiveConnection {
    fn enter(shared: &Arc<Shared>) -> Option<Self> {
        let entered = shared
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n.saturating_add(1))
            })
            .is_ok();
        entered.then(|| Self(Arc::clone(shared)))
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}
