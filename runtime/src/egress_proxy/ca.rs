//! The per-sandbox CA: made for one run, kept in memory only, and name-constrained to
//! the run's bound hosts, so that even a guest that trusts it can be vouched to for no
//! other name. It issues the leaves (ECDSA P-256) the proxy shows the guest, one per name.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mvm_loader::measure::Sha256Digest;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ProxyError;

/// How long a CA (and so each of its leaves) is valid.
const VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// How far back validity starts, for guests whose clock lags the host's.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The most leaves kept; a guest sending ever new SNI names gets fresh, uncached ones.
const MAX_CACHED_LEAVES: usize = 64;

/// The most characters of a label that go into the CA's common name (64 in all).
const MAX_LABEL_CHARS: usize = 50;

/// A sandbox's CA: its key pair and self-signed certificate, in memory only.
pub struct SandboxCa {
    label: String,
    hosts: Vec<String>,
    /// When it was made (seconds since the epoch): its validity starts from here.
    created: u64,
    key: KeyPair,
    cert: rcgen::Certificate,
    cert_pem: String,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("label", &self.label)
            .field("cert_sha256", &self.cert_sha256())
            .finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A fresh CA for one sandbox: CN "mvm egress CA <label>", CA:true pathlen 0, key
    /// usage cert sign, valid from an hour ago for 30 days, and permitted DNS name
    /// constraints for exactly `hosts` (and their subdomains, as RFC 5280 has it), with
    /// every IP address excluded.
    pub fn generate(label: &str, hosts: &[String]) -> Result<Self, ProxyError> {
        let cert_err = |what: &str| {
            let what = format!("{what} (CA {label:?})");
            move |source| ProxyError::Certificate { what, source }
        };
        let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Self::build(label, hosts, created, key)
    }

    /// The CA [`Self::to_parts`] described, able to issue leaves that chain to the
    /// certificate the guest was given: the same name, key and validity (the
    /// self-signature is made again, so [`Self::cert_der`] differs; the leaves' issuer
    /// name and authority key identifier do not). For the test host side of the
    /// emulated tier, where the proxy runs beside the tap (docs/secrets.md).
    pub fn from_parts(parts: &CaParts) -> Result<Self, ProxyError> {
        let key = KeyPair::from_pem(&parts.key_pem).map_err(|source| ProxyError::Certificate {
            what: format!("reading the CA key (CA {:?})", parts.label),
            source,
        })?;
        Self::build(&parts.label, &parts.hosts, parts.created, key)
    }

    /// What [`Self::from_parts`] needs, the key among it: it crosses only to the test
    /// host that runs this CA's proxy.
    pub fn to_parts(&self) -> CaParts {
        CaParts {
            label: self.label.clone(),
            hosts: self.hosts.clone(),
            created: self.created,
            key_pem: self.key.serialize_pem(),
        }
    }

    fn build(
        label: &str,
        hosts: &[String],
        created: u64,
        key: KeyPair,
    ) -> Result<Self, ProxyError> {
        if hosts.is_empty() {
            return Err(ProxyError::NoHosts {
                label: label.to_owned(),
            });
        }
        let cert_err = |what: &str| {
            let what = format!("{what} (CA {label:?})");
            move |source| ProxyError::Certificate { what, source }
        };
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        let short_label: String = label.chars().take(MAX_LABEL_CHARS).collect();
        name.push(DnType::CommonName, format!("mvm egress CA {short_label}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let mut permitted: Vec<GeneralSubtree> = Vec::new();
        for host in hosts {
            let subtree = GeneralSubtree::DnsName(host.clone());
            if !permitted.contains(&subtree) {
                permitted.push(subtree);
            }
        }
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(created);
        params.not_before = now - BACKDATE;
        params.not_after = now + VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-signing the CA"))?;
        let cert_pem = cert.pem();
        Ok(Self {
            label: label.to_owned(),
            hosts: hosts.to_vec(),
            created,
            key,
            cert,
            cert_pem,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: what the guest image is given to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        self.cert.der()
    }

    /// sha256 of [`Self::cert_der`].
    pub fn cert_sha256(&self) -> Sha256Digest {
        Sha256Digest::of(self.cert_der())
    }

    /// The leaf for DNS name `name`, issued on first use and cached.
    pub(super) fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, ProxyError> {
        if let Some(cached) = self.cache().get(name) {
            return Ok(Arc::clone(cached));
        }
        let issued = Arc::new(self.issue(name)?);
        let mut cache = self.cache();
        if cache.len() < MAX_CACHED_LEAVES {
            cache.insert(name.to_owned(), Arc::clone(&issued));
        }
        Ok(issued)
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        // A poisoned cache still holds only whole entries.
        self.leaves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn issue(&self, name: &str) -> Result<CertifiedKey, ProxyError> {
        let cert_err = |what: &str| {
            let what = format!("{what} for {name:?}");
            move |source| ProxyError::Certificate { what, source }
        };
        if name.parse::<IpAddr>().is_ok() {
            // CertificateParams::new would make it an IP SAN; the CA excludes those.
            return Err(ProxyError::NotADnsName {
                name: name.to_owned(),
            });
        }
        let key = KeyPair::generate().map_err(cert_err("generating a leaf key"))?;
        let mut params =
            CertificateParams::new(vec![name.to_owned()]).map_err(cert_err("leaf parameters"))?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let ca_params = self.cert.params();
        params.not_before = ca_params.not_before;
        params.not_after = ca_params.not_after;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(cert_err("signing a leaf"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key =
            rustls::crypto::ring::sign::any_ecdsa_type(&key_der).map_err(|source| {
                ProxyError::Tls {
                    what: format!("loading the leaf key for {name:?}"),
                    source,
                }
            })?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
    }
}

/// A [`SandboxCa`] in transit to the test host: its label, hosts, creation time and
/// key (PEM). Never printed.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaParts {
    label: String,
    hosts: Vec<String>,
    created: u64,
    key_pem: String,
}

impl Drop for CaParts {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key_pem);
    }
}

impl fmt::Debug for CaParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaParts")
            .field("label", &self.label)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl PartialEq for CaParts {
    fn eq(&self, other: &Self) -> bool {
        self.label == other.label
            && self.hosts == other.hosts
            && self.created == other.created
            && self.key_pem == other.key_pem
    }
}

impl Eq for CaParts {}

/// Picks the leaf for a guest's TLS handshake: the SNI name's, else `default_host`'s;
/// with neither, the handshake fails.
#[derive(Debug)]
pub(super) struct LeafResolver {
    pub ca: Arc<SandboxCa>,
    /// The one host the destination's bindings name, for clients that send no SNI.
    pub default_host: Option<String>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = match client_hello.server_name() {
            Some(sni) => sni.to_ascii_lowercase(),
            None => self.default_host.clone()?,
        };
        match self.ca.leaf(&name) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy: no leaf for the guest's handshake");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        super::super::proxy::crypto_provider()
    }

    /// An in-memory handshake between a client trusting only `ca` and a server using
    /// the leaf `ca` issues for `name`.
    fn handshake(ca: &Arc<SandboxCa>, name: &str) -> Result<(), rustls::Error> {
        handshake_trusting(ca, ca, name)
    }

    /// [`handshake`] with a client trusting `trusted` and leaves from `ca`.
    fn handshake_trusting(
        trusted: &SandboxCa,
        ca: &Arc<SandboxCa>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(trusted.cert_der().to_vec()))
            .unwrap();
        let client_config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver {
                ca: Arc::clone(ca),
                default_host: None,
            }));
        let mut client = ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            if !wire.is_empty() {
                server.read_tls(&mut wire.as_slice()).unwrap();
                // The server's error is the client's alert; the client reports it below.
                let _ = server.process_new_packets();
            }
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            if !wire.is_empty() {
                client.read_tls(&mut wire.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn leaf_for_a_bound_host_verifies() {
        let ca = Arc::new(SandboxCa::generate("t", &["api.mvm.test".to_owned()]).unwrap());
        handshake(&ca, "api.mvm.test").unwrap();
    }

    #[test]
    fn name_constraints_forbid_other_hosts() {
        let ca = Arc::new(SandboxCa::generate("t", &["api.mvm.test".to_owned()]).unwrap());
        let err = handshake(&ca, "other.mvm.test").unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
        // A suffix that is not a subdomain is not permitted either.
        assert!(handshake(&ca, "evilapi.mvm.test").is_err());
    }

    #[test]
    fn leaves_are_cached_per_name() {
        let ca = SandboxCa::generate("t", &["api.mvm.test".to_owned()]).unwrap();
        let a = ca.leaf("api.mvm.test").unwrap();
        let b = ca.leaf("api.mvm.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.leaf("x.api.mvm.test").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(ca.leaf("10.0.0.1").is_err());
    }

    #[test]
    fn ca_certificate_shape() {
        let ca = SandboxCa::generate("run-1", &["api.mvm.test".to_owned()]).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca.cert_sha256(), Sha256Digest::of(ca.cert_der()));
        assert!(matches!(
            SandboxCa::generate("empty", &[]),
            Err(ProxyError::NoHosts { .. })
        ));
        assert!(format!("{ca:?}").contains("run-1"));
    }

    #[test]
    fn a_ca_rebuilt_from_its_parts_issues_leaves_the_original_vouches_for() {
        let hosts = vec!["api.mvm.test".to_owned()];
        let original = SandboxCa::generate("parts", &hosts).unwrap();
        let parts = original.to_parts();
        assert!(!format!("{parts:?}").contains("PRIVATE"), "{parts:?}");
        let wire = serde_json::to_string(&parts).unwrap();
        let back: CaParts = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, parts);
        let rebuilt = Arc::new(SandboxCa::from_parts(&back).unwrap());
        handshake_trusting(&original, &rebuilt, "api.mvm.test").unwrap();
        // Still constrained to the bound hosts, and another CA's leaves are not trusted.
        assert!(handshake_trusting(&original, &rebuilt, "other.mvm.test").is_err());
        let stranger = Arc::new(SandboxCa::generate("parts", &hosts).unwrap());
        assert!(handshake_trusting(&original, &stranger, "api.mvm.test").is_err());
        let mut bad = parts.clone();
        bad.key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
        assert!(SandboxCa::from_parts(&bad).is_err());
    }
}
