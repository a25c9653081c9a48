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

//!
//! This file holds what the proxy is told and tells (bindings, destinations, refusals,
//! observations), which every host builds; the running proxy (`proxy.rs`) and its TLS
//! are built for Linux only, where the VM's tap and nftables are. Elsewhere
//! (`unsupported.rs`) its types are uninhabited and making a CA is refused.

#[cfg(target_os = "linux")]
mod ca;
#[cfg(target_os = "linux")]
mod connection;
#[cfg(target_os = "linux")]
mod handoff;
mod head;
#[cfg(target_os = "linux")]
mod original_dst;
#[cfg(target_os = "linux")]
mod proxy;
#[cfg(target_os = "linux")]
mod pump;
mod scan;
#[cfg(not(target_os = "linux"))]
mod unsupported;
#[cfg(target_os = "linux")]
mod upstream;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

#[cfg(target_os = "linux")]
use std::os::unix::net::UnixStream;
#[cfg(target_os = "linux")]
use std::sync::atomic::AtomicUsize;
#[cfg(target_os = "linux")]
use std::sync::Arc;

use mvm_loader::measure::Sha256Digest;
#[cfg(target_os = "linux")]
use rustls::crypto::CryptoProvider;

#[cfg(target_os = "linux")]
pub use ca::{CaParts, SandboxCa};
#[cfg(target_os = "linux")]
pub use handoff::{Handoff, Opened};
pub use head::header_safe;
#[cfg(target_os = "linux")]
pub use proxy::{host_roots, EgressProxy, ProxyError};
#[cfg(not(target_os = "linux"))]
pub use unsupported::{EgressProxy, Handoff, ProxyConfig, ProxyError, SandboxCa};

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

/// Each secret of `section` bound to each of its hosts, with its value from `values`;
/// an error names a secret without a value.
pub fn bindings(
    section: &mvm_loader::plan::Substitution,
    values: &[(String, crate::secrets::SecretValue)],
) -> Result<Vec<Binding>, String> {
    let mut bindings = Vec::new();
    for secret in &section.secrets {
        let value = values
            .iter()
            .find(|(name, _)| *name == secret.name)
            .map(|(_, value)| value)
            .ok_or_else(|| format!("{}: no value to substitute", secret.name))?;
        bindings.extend(secret.hosts.iter().map(|host| Binding {
            secret: secret.name.clone(),
            placeholder: secret.placeholder.clone(),
            value: value.clone(),
            host: host.name.clone(),
            addresses: host.addresses.clone(),
            port: host.port,
        }));
    }
    Ok(bindings)
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
#[cfg(target_os = "linux")]
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

/// What every connection thread shares.
#[cfg(target_os = "linux")]
struct Shared {
    config: ProxyConfig,
    observer: Arc<dyn Observer>,
    provider: Arc<CryptoProvider>,
    client_config: Arc<rustls::ClientConfig>,
    /// Readable (EOF) once the proxy stops.
    stop: UnixStream,
    live: AtomicUsize,
}
