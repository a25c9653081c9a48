//! What the guest is given for secret substitution (docs/secrets.md), none of it
//! secret: the run's CA certificate to trust, and the bound names with the addresses
//! they were pinned to.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Where the guest finds the run's CA certificate; it is also appended to the
/// system bundle (`/etc/ssl/certs/ca-certificates.crt`).
pub const GUEST_CA_FILE: &str = "/etc/ssl/certs/mvm-egress-ca.pem";
/// The bundle OpenSSL, curl, Python and Go read on Debian-like systems.
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The environment a workload with substituted secrets gets: each placeholder as the
/// variable of its secret's name, and the variables common TLS clients read their
/// trust from pointed at the run's CA (Node) or at the bundle that holds it.
#[must_use]
pub fn workload_env(placeholders: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = placeholders.to_vec();
    env.push(("NODE_EXTRA_CA_CERTS".into(), GUEST_CA_FILE.into()));
    for var in ["SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"] {
        env.push((var.into(), GUEST_CA_BUNDLE.into()));
    }
    env
}

/// What the guest is given for substitution, none of it secret: the CA certificate to
/// trust, and the bound names with the addresses they were pinned to (for its
/// `/etc/hosts`: the guest needs no resolver to reach them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestTrust {
    /// The run's CA certificate, PEM.
    pub ca_pem: String,
    /// `(name, address)` lines for `/etc/hosts`.
    pub hosts: Vec<(String, Ipv4Addr)>,
}

/// `/etc/hosts` lines for `trust`.
#[must_use]
pub fn hosts_lines(trust: &GuestTrust) -> String {
    trust
        .hosts
        .iter()
        .map(|(name, address)| format!("{address} {name}\n"))
        .collect()
}
