//! A proxy's makings in transit: the emulated tier's outer `mvm` admits the run and
//! makes the CA, but the proxy must run beside the tap, in the test host. Once the VMM
//! vouched for the boot, the outer `mvm` sends this with `proceed`; the values, the
//! CA's key and the roots to verify upstreams with cross the test host's control port,
//! as released secrets do (docs/secrets.md).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mvm_loader::plan;
use rustls::pki_types::CertificateDer;

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;

use super::{
    bindings, CaParts, EgressProxy, Observer, OriginalDst, ProxyConfig, ProxyError, SandboxCa,
};
use crate::secrets::{Delivery, Secret, SecretValue};

/// What the test host's proxy needs. Never printed.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// The plan's section (names, placeholders, pinned hosts).
    section: plan::Substitution,
    /// Each secret's value (base64 on the wire; the delivery is not used).
    #[serde(with = "crate::secrets::wire")]
    values: Vec<Secret>,
    /// The run's CA, key included.
    ca: CaParts,
    /// The trust roots for the upstream side, DER, base64.
    roots: Vec<String>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("section", &self.section)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// A handoff, opened.
#[derive(Debug)]
pub struct Opened {
    /// The plan's section.
    pub section: plan::Substitution,
    /// Each secret's name and value.
    pub values: Vec<(String, SecretValue)>,
    /// The run's CA, rebuilt: its leaves chain to the certificate the guest trusts.
    pub ca: SandboxCa,
    /// The roots upstream certificates are verified against.
    pub roots: rustls::RootCertStore,
}

impl Handoff {
    /// Packs a proxy's makings.
    #[must_use]
    pub fn new(
        section: plan::Substitution,
        values: Vec<(String, SecretValue)>,
        ca: CaParts,
        roots: &[CertificateDer<'_>],
    ) -> Self {
        Self {
            section,
            values: values
                .into_iter()
                .map(|(name, value)| Secret {
                    name,
                    value,
                    delivery: Delivery::Env,
                })
                .collect(),
            ca,
            roots: roots.iter().map(|c| STANDARD.encode(c.as_ref())).collect(),
        }
    }

    /// Rebuilds the CA and the root store; an error names what did not fit.
    pub fn open(self) -> Result<Opened, String> {
        let ca = SandboxCa::from_parts(&self.ca).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        let ders = self
            .roots
            .iter()
            .filter_map(|r| STANDARD.decode(r).ok().map(CertificateDer::from));
        let (added, _) = roots.add_parsable_certificates(ders);
        if added == 0 {
            return Err("no usable trust root for the upstream side".into());
        }
        let values = self
            .values
            .iter()
            .map(|s| (s.name.clone(), s.value.clone()))
            .collect();
        Ok(Opened {
            section: self.section.clone(),
            values,
            ca,
            roots,
        })
    }
}

impl Opened {
    /// Starts the proxy on `listener` (bound beside the tap, the guest's connections
    /// to the bound hosts turned towards it) for the guest at `guest`.
    pub fn start(
        self,
        listener: TcpListener,
        guest: Ipv4Addr,
        observer: Arc<dyn Observer>,
    ) -> Result<EgressProxy, String> {
        let bindings = bindings(&self.section, &self.values)?;
        let config = ProxyConfig {
            listen: guest,
            guest,
            bindings,
            ca: Arc::new(self.ca),
            upstream_roots: Arc::new(self.roots),
            original_dst: OriginalDst::Netfilter,
        };
        EgressProxy::start_on(listener, config, observer).map_err(|e: ProxyError| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_loader::plan::{BoundHost, SubstitutedSecret};

    fn section(ca: &SandboxCa) -> plan::Substitution {
        plan::Substitution {
            ca_sha256: ca.cert_sha256(),
            secrets: vec![SubstitutedSecret {
                name: "API_TOKEN".into(),
                placeholder: "MVM_PLACEHOLDER_API".into(),
                hosts: vec![BoundHost {
                    name: "api.mvm.test".into(),
                    port: 443,
                    addresses: vec![Ipv4Addr::new(192, 0, 2, 7)],
                }],
            }],
        }
    }

    #[test]
    fn crosses_as_json_and_opens_with_its_bindings_and_roots() {
        let ca = SandboxCa::generate("h", &["api.mvm.test".to_owned()]).unwrap();
        let root = CertificateDer::from(ca.cert_der().to_vec());
        let value = SecretValue::new(b"sk-live-handoff".to_vec());
        let handoff = Handoff::new(
            section(&ca),
            vec![("API_TOKEN".into(), value)],
            ca.to_parts(),
            &[root],
        );
        let debug = format!("{handoff:?}");
        assert!(
            !debug.contains("sk-live") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        let wire = serde_json::to_string(&handoff).unwrap();
        assert!(!wire.contains("sk-live-handoff"), "values cross as base64");
        let back: Handoff = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, handoff);
        let opened = back.open().unwrap();
        let bound = bindings(&opened.section, &opened.values).unwrap();
        assert_eq!(bound.len(), 1);
        assert_eq!(bound[0].value.expose(), b"sk-live-handoff");
        assert_eq!(bound[0].addresses, [Ipv4Addr::new(192, 0, 2, 7)]);
        assert_eq!(opened.roots.len(), 1);
    }

    #[test]
    fn a_handoff_without_a_value_or_a_root_does_not_open() {
        let ca = SandboxCa::generate("h", &["api.mvm.test".to_owned()]).unwrap();
        let root = CertificateDer::from(ca.cert_der().to_vec());
        let no_value = Handoff::new(section(&ca), Vec::new(), ca.to_parts(), &[root]);
        let opened = no_value.open().unwrap();
        let err = bindings(&opened.section, &opened.values).unwrap_err();
        assert!(err.contains("API_TOKEN"), "{err}");
        let value = SecretValue::new(b"v-123456".to_vec());
        let no_root = Handoff::new(
            section(&ca),
            vec![("API_TOKEN".into(), value)],
            ca.to_parts(),
            &[],
        );
        assert!(no_root.open().unwrap_err().contains("trust root"));
    }
}
