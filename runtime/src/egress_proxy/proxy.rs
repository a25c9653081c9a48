//! The running proxy: its listening socket, the acceptor and one thread per connection
//! (`connection.rs`), the TLS provider, the host's trust roots for the upstream side.

use std::fmt;
use std::io;
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustls::crypto::CryptoProvider;

use super::{connection, upstream, Observer, ProxyConfig, Shared, MAX_CONNECTIONS};

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
pub(super) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
