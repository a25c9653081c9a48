//! The agent side of the protocol: one thread per connection reads frames and starts
//! requests; each exec and file read then runs on its own thread and writes its frames
//! back through the connection's shared writer.

mod connection;
mod dirs;
mod exec;
mod files;
pub mod policy;
pub mod reaper;
mod reply;
pub mod reseed;
mod tunnel;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use policy::{Limits, Policy};
use reaper::Reaper;

use crate::protocol::{ReadyInfo, ShutdownRequest, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use crate::transport::{Duplex, VsockListener};

/// Connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Requests in flight on one connection.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 64;

/// The agent's name and version as sent in hello and ready frames.
pub fn software() -> String {
    format!("mvm-agent {}", env!("CARGO_PKG_VERSION"))
}

/// What a shutdown request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Sync and power the guest off (the agent is PID 1).
    Guest,
    /// Sync and exit the agent process (host-side testing).
    ExitProcess,
    /// Exit the agent process, PID 1 of a container: the kernel then ends every other
    /// process of its PID namespace. No sync: the page cache is the host's, so what the
    /// container wrote outlives it without one (and a sync would flush the whole host's).
    Container,
}

/// Shared state of one agent process.
pub struct Agent {
    policy: Policy,
    reaper: Arc<Reaper>,
    started: Instant,
    boot_ms: u64,
    pid1: bool,
    power: PowerAction,
    connections: AtomicUsize,
}

/// Kernel uptime in milliseconds (`CLOCK_BOOTTIME`).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let millis = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000;
    secs.saturating_mul(1000).saturating_add(millis)
}

impl Agent {
    /// Creates the agent and starts its reaper.
    pub fn new(policy: Policy, pid1: bool, power: PowerAction) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            policy,
            reaper: Reaper::start()?,
            started: Instant::now(),
            boot_ms: uptime_ms(),
            pid1,
            power,
            connections: AtomicUsize::new(0),
        }))
    }

    /// The policy requests are checked against.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn ready_info(&self) -> ReadyInfo {
        ReadyInfo {
            software: software(),
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            pid1: self.pid1,
            boot_ms: self.boot_ms,
            uptime_ms: uptime_ms(),
            agent_uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn power_off(&self, request: ShutdownRequest) {
        match self.power {
            PowerAction::Guest => crate::init::power::power_off(request.reboot),
            PowerAction::ExitProcess => {
                // SAFETY: sync() has no arguments and cannot fail.
                unsafe { libc::sync() };
                tracing::info!("shutdown requested: exiting");
                std::process::exit(0);
            }
            PowerAction::Container => {
                if request.reboot {
                    tracing::info!("shutdown requested (a container cannot reboot): exiting");
                } else {
                    tracing::info!("shutdown requested: ending the container");
                }
                std::process::exit(0);
            }
        }
    }

    /// Serves connections from `accept` forever, one thread each.
    pub fn serve_forever<S, F>(self: &Arc<Self>, mut accept: F) -> io::Result<()>
    where
        S: Duplex,
        F: FnMut() -> io::Result<S>,
    {
        loop {
            let stream = match accept() {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Only a broken listener ends the loop; anything else (a connection reset
                // before accept, no fds or memory for now) concerns one connection.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
                    ) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    tracing::warn!("accept: {e}; continuing");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            let agent = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("connection".to_owned())
                .spawn(move || agent.serve_connection(stream));
            if let Err(e) = spawned {
                tracing::warn!("cannot start a connection thread: {e}");
            }
        }
    }

    /// Serves vsock connections on `port` forever. `on_listening` runs once the socket
    /// listens (PID 1 reports readiness to the VMM there).
    pub fn serve_vsock(self: &Arc<Self>, port: u32, on_listening: impl FnOnce()) -> io::Result<()> {
        let listener = VsockListener::bind(port)?;
        tracing::info!("listening on vsock port {port}");
        on_listening();
        self.serve_forever(|| listener.accept())
    }

    /// Serves one connection until the peer closes it or breaks the protocol.
    pub fn serve_connection<S: Duplex>(self: &Arc<Self>, stream: S) {
        let count = self.connections.fetch_add(1, Ordering::SeqCst);
        if count >= MAX_CONNECTIONS {
            connection::refuse(stream, count);
        } else {
            connection::serve(Arc::clone(self), stream);
        }
        self.connections.fetch_sub(1, Ordering::SeqCst);
    }
}
