//! Secret substitution, the run's side (docs/secrets.md): at admission, the values
//! read from the store, the bound hosts pinned, a CA made for this run and the plan's
//! `substitution` section; once the VMM has vouched for the boot, the egress proxy
//! started on the socket the host network bound for it, its substitutions and refusals
//! written to the audit log; and what the guest is given (the CA to trust, the bound
//! names' addresses, the placeholders), none of it secret.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::{self, BoundHost, SubstitutedSecret};

use crate::audit::{AuditEvent, AuditLog};
use crate::backend::RunError;
use crate::egress_proxy::{
    header_safe, Binding, Destination, EgressProxy, Handoff, Observed, Observer, Refusal, SandboxCa,
};
#[cfg(target_os = "linux")]
use crate::egress_proxy::{OriginalDst, ProxyConfig};
use crate::secrets::guest_trust::GuestTrust;
use crate::secrets::store::SecretStore;
use crate::secrets::{SecretValue, SubstitutionRequest};

/// What admission made for a run with substituted secrets.
pub struct Prepared {
    /// The plan's section.
    pub section: plan::Substitution,
    /// The run's CA (its key only in this process).
    pub ca: Arc<SandboxCa>,
    /// Each secret and host, with the value.
    pub bindings: Vec<Binding>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("section", &self.section)
            .finish_non_exhaustive()
    }
}

fn refused(what: String) -> RunError {
    RunError::Missing(format!("secret: {what}"))
}

/// Each bound host becomes a destination the device lets through (`--allow
/// HOST:PORT`, its name pinned at admission as `--allow`'s are, the policy's egress cap
/// applying) whose connections the host turns towards the egress proxy.
pub fn bind_net(
    asked: &[SubstitutionRequest],
    net: &mut crate::net::run::NetFlags,
) -> Result<(), RunError> {
    for s in asked {
        for (host, port) in &s.hosts {
            let rule = crate::net::allow::parse_allow(&format!("{host}:{port}"))
                .map_err(|e| refused(e.to_string()))?;
            if !net.allow.contains(&rule) {
                net.allow.push(rule);
            }
            if !net.intercept.contains(&(host.clone(), *port)) {
                net.intercept.push((host.clone(), *port));
            }
        }
    }
    Ok(())
}

/// Reads each asked secret, checks its placeholder and value, pins its hosts
/// (`addresses_of`: the run's resolver, the answers `--allow` was pinned with), and
/// makes the run's CA, name-constrained to exactly the bound hosts.
pub fn prepare(
    asked: &[SubstitutionRequest],
    store: &SecretStore,
    mut addresses_of: impl FnMut(&str) -> Result<Vec<Ipv4Addr>, RunError>,
) -> Result<Option<Prepared>, RunError> {
    if asked.is_empty() {
        return Ok(None);
    }
    let mut secrets = Vec::new();
    let mut values: Vec<(String, SecretValue)> = Vec::new();
    for request in asked {
        plan::substitution::check_placeholder(&request.placeholder).map_err(refused)?;
        let secret = store
            .get(&request.name)
            .map_err(|e| RunError::Missing(format!("secret: {e}")))?;
        let value = secret.value.expose();
        if !header_safe(value) {
            return Err(refused(format!(
                "{}: its value is not a header value (visible ASCII, no line breaks), so it cannot be substituted",
                request.name
            )));
        }
        let placeholder = request.placeholder.as_bytes();
        if contains(value, placeholder) || contains(placeholder, value) {
            return Err(refused(format!(
                "{}: the placeholder and the value contain one another; choose another placeholder",
                request.name
            )));
        }
        let mut hosts = Vec::new();
        for (name, port) in &request.hosts {
            hosts.push(BoundHost {
                name: name.clone(),
                port: *port,
                addresses: addresses_of(name)?,
            });
        }
        secrets.push(SubstitutedSecret {
            name: request.name.clone(),
            placeholder: request.placeholder.clone(),
            hosts,
        });
        values.push((request.name.clone(), secret.value));
    }
    let mut names: Vec<String> = secrets
        .iter()
        .flat_map(|s| s.hosts.iter().map(|h| h.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    let ca = SandboxCa::generate(&random_label(), &names)
        .map_err(|e| refused(format!("making the run's CA: {e}")))?;
    let section = plan::Substitution {
        ca_sha256: ca.cert_sha256(),
        secrets,
    };
    let bindings = bindings_of(&section, &values)?;
    Ok(Some(Prepared {
        section,
        ca: Arc::new(ca),
        bindings,
    }))
}

/// Each secret of `section` bound to each of its hosts, with its value from `values`.
fn bindings_of(
    section: &plan::Substitution,
    values: &[(String, SecretValue)],
) -> Result<Vec<Binding>, RunError> {
    crate::egress_proxy::bindings(section, values).map_err(refused)
}

impl Prepared {
    /// The handoff for the test host: everything the proxy there needs, with the roots
    /// this host would verify upstreams against (`SSL_CERT_FILE` honoured).
    #[cfg(target_os = "linux")]
    pub fn handoff(&self) -> Result<Handoff, RunError> {
        let loaded = rustls_native_certs::load_native_certs();
        if loaded.certs.is_empty() {
            return Err(refused(format!(
                "no trust roots on this host for the egress proxy's upstream side ({} error(s) loading them)",
                loaded.errors.len()
            )));
        }
        let mut values: Vec<(String, SecretValue)> = Vec::new();
        for b in &self.bindings {
            if !values.iter().any(|(name, _)| *name == b.secret) {
                values.push((b.secret.clone(), b.value.clone()));
            }
        }
        Ok(Handoff::new(
            self.section.clone(),
            values,
            self.ca.to_parts(),
            &loaded.certs,
        ))
    }

    /// Unreachable on this host: no CA, so no `Prepared`.
    #[cfg(not(target_os = "linux"))]
    pub fn handoff(&self) -> Result<Handoff, RunError> {
        match *self.ca {}
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn random_label() -> String {
    use rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 6];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Prepared {
    /// What the guest is given.
    #[must_use]
    pub fn guest_trust(&self) -> GuestTrust {
        let mut hosts: Vec<(String, Ipv4Addr)> = self
            .section
            .secrets
            .iter()
            .flat_map(|s| {
                s.hosts
                    .iter()
                    .flat_map(|h| h.addresses.iter().map(|a| (h.name.clone(), *a)))
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        GuestTrust {
            ca_pem: self.ca.cert_pem().to_owned(),
            hosts,
        }
    }

    /// Each secret's placeholder, as the workload's environment variable of its name.
    #[must_use]
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        self.section
            .secrets
            .iter()
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect()
    }
}

/// The audit record of what the proxy saw, with the run's ids.
#[must_use]
pub fn audit_event(observed: &Observed, plan_id: &str, vm_id: &str) -> AuditEvent {
    match observed {
        Observed::Substituted {
            secret,
            value_sha256,
            destination,
        } => AuditEvent::secret_substituted(plan_id, vm_id, secret, value_sha256, destination),
        Observed::Refused {
            secret,
            destination,
            reason,
        } => {
            tracing::warn!(
                secret,
                destination,
                reason,
                "egress proxy refused a request"
            );
            AuditEvent::secret_refused(plan_id, vm_id, secret.as_deref(), destination, reason)
        }
    }
}

/// Writes the proxy's substitutions and refusals to the audit log, with the run's ids.
struct AuditObserver {
    log: AuditLog,
    plan_id: String,
    vm_id: String,
}

impl AuditObserver {
    fn record(&self, observed: &Observed) {
        if let Err(e) = self
            .log
            .append(audit_event(observed, &self.plan_id, &self.vm_id))
        {
            tracing::error!("{observed:?} not audited: {e}");
        }
    }
}

impl Observer for AuditObserver {
    fn substituted(&self, secret: &str, value_sha256: &Sha256Digest, destination: &Destination) {
        self.record(&Observed::substituted(secret, value_sha256, destination));
    }

    fn refused(&self, secret: Option<&str>, destination: &Destination, reason: Refusal) {
        self.record(&Observed::refused(secret, destination, reason));
    }
}

/// Starts the egress proxy on `listener` for the guest at `guest`: called once the
/// VMM has vouched for the boot, so no value is substituted for a guest that was not
/// measured (its connections wait in the socket's queue until then).
#[cfg(target_os = "linux")]
pub fn arm(
    prepared: Prepared,
    listener: TcpListener,
    guest: Ipv4Addr,
    log: AuditLog,
    ids: (&str, &str),
) -> Result<EgressProxy, RunError> {
    let roots = crate::egress_proxy::host_roots()
        .map_err(|e| refused(format!("the host's trust roots for the egress proxy: {e}")))?;
    let observer = Arc::new(AuditObserver {
        log,
        plan_id: ids.0.to_owned(),
        vm_id: ids.1.to_owned(),
    });
    let config = ProxyConfig {
        listen: guest,
        guest,
        bindings: prepared.bindings,
        ca: prepared.ca,
        upstream_roots: Arc::new(roots),
        original_dst: OriginalDst::Netfilter,
    };
    let proxy = EgressProxy::start_on(listener, config, observer)
        .map_err(|e| refused(format!("starting the egress proxy: {e}")))?;
    tracing::info!(port = proxy.port(), "egress proxy substituting");
    Ok(proxy)
}

/// Unreachable on this host: no CA, so no `Prepared`.
#[cfg(not(target_os = "linux"))]
pub fn arm(
    prepared: Prepared,
    _listener: TcpListener,
    _guest: Ipv4Addr,
    _log: AuditLog,
    _ids: (&str, &str),
) -> Result<EgressProxy, RunError> {
    match *prepared.ca {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::guest_trust::hosts_lines;

    #[test]
    fn header_safe_values() {
        assert!(header_safe(b"sk-abc_123"));
        assert!(header_safe(b"Bearer abc"));
        for bad in [
            &b""[..],
            b" abc",
            b"abc ",
            b"a\r\nX-Evil: 1",
            b"a\nb",
            b"a\0b",
            b"\xff",
        ] {
            assert!(!header_safe(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_placeholder_and_a_value_inside_one_another_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::at(dir.path());
        let put =
            |name: &str, value: &[u8]| store.set(name, &SecretValue::new(value.to_vec())).unwrap();
        put("A", b"value-MVM_PLACEHOLDER_A-x");
        put("B", b"sk-live-1234");
        put("C", b"line\r\nX-Evil: 1");
        let ask = |name: &str, placeholder: &str| SubstitutionRequest {
            name: name.into(),
            placeholder: placeholder.into(),
            hosts: vec![("api.example.com".into(), 443)],
        };
        let addresses = |_: &str| Ok(vec![Ipv4Addr::new(192, 0, 2, 7)]);
        assert!(prepare(&[ask("A", "MVM_PLACEHOLDER_A")], &store, addresses).is_err());
        assert!(prepare(&[ask("B", "sk-live-1234")], &store, addresses).is_err());
        assert!(prepare(&[ask("C", "MVM_PLACEHOLDER_C")], &store, addresses).is_err());
        assert!(prepare(&[ask("MISSING", "MVM_PLACEHOLDER_M")], &store, addresses).is_err());
        assert!(prepare(&[ask("B", "short")], &store, addresses).is_err());
        let ok = prepare(&[ask("B", "MVM_PLACEHOLDER_B")], &store, addresses)
            .unwrap()
            .unwrap();
        assert_eq!(
            ok.section.secrets[0].hosts[0].addresses,
            [Ipv4Addr::new(192, 0, 2, 7)]
        );
        assert_eq!(ok.section.ca_sha256, ok.ca.cert_sha256());
        assert_eq!(ok.bindings.len(), 1);
        assert!(!format!("{ok:?}").contains("sk-live-1234"));
        let trust = ok.guest_trust();
        assert_eq!(hosts_lines(&trust), "192.0.2.7 api.example.com\n");
        assert!(trust.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            ok.placeholder_env(),
            [("B".to_owned(), "MVM_PLACEHOLDER_B".to_owned())]
        );
    }
}
