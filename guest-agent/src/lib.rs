//! The vsock RPC protocol spoken between the runtime and the guest agent, the agent that
//! serves it (the guest's PID 1), and the client the runtime uses.
//!
//! - [`protocol`]: frames and messages; [`protocol::decode`] is the whole parsing surface.
//! - [`client`]: the host side ([`client::Client`]).
//! - [`agent`]: the guest side: exec, files, policy, the child reaper.
//! - [`init`]: what the agent does only as PID 1 (mounts, power, boot signals).
//! - [`container`]: what it does instead as PID 1 of a container (`--container`).
//! - [`transport`]: vsock and Unix streams, and the hybrid vsock handshake.

//!
//! The guest side ([`agent`], [`init`], [`container`], [`netif`] and the vsock listener)
//! is built for Linux only; the protocol, the client and the hybrid vsock connection
//! build on every Unix, macOS among them (the `vz` backend's host side).

#[cfg(target_os = "linux")]
pub mod agent;
pub mod client;
#[cfg(target_os = "linux")]
pub mod container;
#[cfg(target_os = "linux")]
pub mod init;
pub mod net_config;
#[cfg(target_os = "linux")]
pub mod netif;
pub mod protocol;
pub mod transport;

pub use client::{
    Client, ClientError, Exec, ExecEvent, ExecOutput, ExecStdin, Stdin, Tunnel, TunnelWriter,
};
