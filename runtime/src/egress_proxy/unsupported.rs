//! Hosts other than Linux have no egress proxy: it sits on the host end of the VM's tap,
//! behind nftables' redirect, and both are Linux's. Its types exist so that the run path
//! builds unchanged, but none can be made: [`SandboxCa::generate`], the first step of
//! every substitution, refuses, so nothing after it is reached.

use mvm_loader::measure::Sha256Digest;

/// Why the proxy could not start: here, always because this host has none.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Secret substitution needs the VM's tap and nftables.
    #[error("secret substitution's egress proxy is built for Linux hosts only (it needs the VM's tap and nftables)")]
    Unsupported,
}

/// The sandbox's CA: never made on this host.
#[derive(Debug)]
pub enum SandboxCa {}

impl SandboxCa {
    /// Refuses: this host has no egress proxy to use a CA.
    pub fn generate(_label: &str, _hosts: &[String]) -> Result<Self, ProxyError> {
        Err(ProxyError::Unsupported)
    }

    /// Unreachable: no CA exists.
    #[must_use]
    pub fn cert_sha256(&self) -> Sha256Digest {
        match *self {}
    }

    /// Unreachable: no CA exists.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        match *self {}
    }
}

/// What a test host's proxy would need: never made on this host.
#[derive(Debug)]
pub enum Handoff {}

/// A running proxy: never started on this host.
#[derive(Debug)]
pub enum EgressProxy {}

/// What a proxy would serve: never made on this host.
#[derive(Debug)]
pub enum ProxyConfig {}
