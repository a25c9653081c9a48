//! Secrets: values a user keeps on the host ([`store`]) and a run may be given, by name,
//! only once its VM is measured.
//!
//! A secret's value lives in a [`SecretValue`]: it prints as `<redacted>`, is wiped from
//! memory when dropped, and is known everywhere else (audit records, receipts, `--json`,
//! plans, errors) by its name and [`SecretValue::digest`] only. The plan names the
//! secrets a run may receive; admission checks the names against the policy; the run's
//! journal hands the values to the backend only after the VMM reported `boot_verified`
//! for that plan with measurements equal to its pins, and writes `secret_released` for
//! each first. The guest's agent puts each in `/run/secrets/NAME` (its own tmpfs), mode
//! 0400, owned by the workload's uid. `docs/secrets.md` says what this protects against.

pub mod guest_trust;
pub mod store;

use std::fmt;

use mvm_loader::measure::Sha256Digest;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Where a released secret goes in the guest: `/run/secrets/<name>`.
pub const GUEST_DIR: &str = "/run/secrets";

/// The most bytes one secret's value may have (a token, a key, a certificate chain).
pub const MAX_VALUE_BYTES: usize = 16 << 10;

/// The most bytes of secrets one run may be given, all values together (so that they
/// cross the emulated tier's control port, base64 in one line of at most 1 MiB).
pub const MAX_RUN_BYTES: usize = 256 << 10;

/// A secret's value: never printed, wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wraps `bytes` (the caller's copy is the caller's to wipe).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The value itself: for delivery into a measured guest, nothing else.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// sha256 of the value: what records and listings show of it.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.0)
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How a released secret goes into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The file `/run/secrets/NAME`, 0400, owned by the workload's uid (`--secret`).
    #[default]
    File,
    /// The environment variable `NAME` of the workload (`--secret-env`): seen by the
    /// workload, its children and anything of its uid that reads `/proc/PID/environ`.
    Env,
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::File => "file",
            Self::Env => "env",
        })
    }
}

/// A secret a run asks for: its name and how it is to go in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRequest {
    /// The stored secret's name.
    pub name: String,
    /// File or environment variable.
    pub delivery: Delivery,
}

/// A secret a run asks to have substituted on egress: the guest sees `placeholder`,
/// and requests to `hosts` get the value in its place (`--secret NAME=PLACEHOLDER
/// --for HOST[:PORT]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstitutionRequest {
    /// The stored secret's name.
    pub name: String,
    /// What the guest sees instead of the value.
    pub placeholder: String,
    /// The hosts (lowercase DNS names) and ports the value may go to.
    pub hosts: Vec<(String, u16)>,
}

/// The port `--for HOST` means.
pub const HTTPS_PORT: u16 = 443;

/// `--secret` values split: the names to release (`NAME`), and the placeholder secrets
/// (`NAME=PLACEHOLDER`) each with its `--for` hosts.
pub fn split_secret_args(
    secrets: &[String],
    for_hosts: &[String],
) -> Result<(Vec<String>, Vec<SubstitutionRequest>), String> {
    let released = secrets
        .iter()
        .filter(|v| !v.contains('='))
        .cloned()
        .collect();
    let placeholders: Vec<(String, String)> = secrets
        .iter()
        .filter_map(|v| v.split_once('='))
        .map(|(n, p)| (n.to_owned(), p.to_owned()))
        .collect();
    Ok((released, pair_substitutions(&placeholders, for_hosts)?))
}

/// Pairs `--secret NAME=PLACEHOLDER` values with `--for [NAME=]HOST[:PORT]` values: a
/// `--for` without `NAME=` binds the one placeholder secret (an error with several).
/// Every placeholder secret needs a host, and every `--for` a placeholder secret.
pub fn pair_substitutions(
    placeholders: &[(String, String)],
    for_hosts: &[String],
) -> Result<Vec<SubstitutionRequest>, String> {
    let mut out: Vec<SubstitutionRequest> = placeholders
        .iter()
        .map(|(name, placeholder)| SubstitutionRequest {
            name: name.clone(),
            placeholder: placeholder.clone(),
            hosts: Vec::new(),
        })
        .collect();
    for value in for_hosts {
        let (name, host) = match value.split_once('=') {
            Some((name, host)) => (Some(name), host),
            None => (None, value.as_str()),
        };
        let (host, port) = match host.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("--for {value}: {p:?} is not a port"))?,
            ),
            None => (host, HTTPS_PORT),
        };
        let host = host.to_ascii_lowercase();
        if !mvm_loader::plan::substitution::is_dns_name(&host) {
            return Err(format!(
                "--for {value}: {host:?} is not a DNS name (the value goes only to a host whose certificate carries its name)"
            ));
        }
        let target = match name {
            Some(name) => out
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("--for {value}: no --secret {name}=PLACEHOLDER to bind"))?,
            None => match out.as_mut_slice() {
                [only] => only,
                [] => {
                    return Err(format!(
                        "--for {value}: no --secret NAME=PLACEHOLDER to bind it to"
                    ))
                }
                _ => {
                    return Err(format!(
                        "--for {value}: several placeholder secrets; say which: --for NAME={host}"
                    ))
                }
            },
        };
        if !target.hosts.contains(&(host.clone(), port)) {
            target.hosts.push((host, port));
        }
    }
    if let Some(unbound) = out.iter().find(|s| s.hosts.is_empty()) {
        return Err(format!(
            "--secret {}={}: no --for HOST says where the value may go",
            unbound.name, unbound.placeholder
        ));
    }
    Ok(out)
}

/// A secret, named, with its value: what a run's journal hands the backend to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// Its name (`plan::check_secret_name`).
    pub name: String,
    /// Its value.
    pub value: SecretValue,
    /// How it goes into the guest.
    pub delivery: Delivery,
}

impl Secret {
    /// Where the agent writes it in the guest (file delivery).
    pub fn guest_path(&self) -> String {
        format!("{GUEST_DIR}/{}", self.name)
    }

    /// The value as an environment variable's (env delivery): UTF-8 text without NUL.
    pub fn env_value(&self) -> Option<String> {
        std::str::from_utf8(self.value.expose())
            .ok()
            .filter(|s| !s.contains('\0'))
            .map(str::to_owned)
    }
}

/// A released secret as the receipt lists it: the name, the digest, how it went in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedSecret {
    /// The secret's name.
    pub name: String,
    /// sha256 of its value.
    pub sha256: Sha256Digest,
    /// How the guest got it: `file` (`/run/secrets/NAME`) or `env`.
    pub delivery: String,
}

impl ReleasedSecret {
    /// The record of `secret`.
    pub fn of(secret: &Secret) -> Self {
        Self {
            name: secret.name.clone(),
            sha256: secret.value.digest(),
            delivery: secret.delivery.to_string(),
        }
    }
}

/// Carries secrets across the emulated tier's control port as base64 strings; a value
/// is still never printed (the wire type's `Debug` is the redacting one).
pub mod wire {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Delivery, Secret, SecretValue, MAX_VALUE_BYTES};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OnWire {
        name: String,
        value: String,
        #[serde(default)]
        delivery: Delivery,
    }

    /// `serde(with = "secrets::wire")` for a `Vec<Secret>`.
    pub fn serialize<S: Serializer>(secrets: &[Secret], s: S) -> Result<S::Ok, S::Error> {
        let on_wire: Vec<OnWire> = secrets
            .iter()
            .map(|secret| OnWire {
                name: secret.name.clone(),
                value: STANDARD.encode(secret.value.expose()),
                delivery: secret.delivery,
            })
            .collect();
        on_wire.serialize(s)
    }

    /// The other half of [`serialize`]; a name or value that could not have been sent is
    /// refused.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
        use serde::de::Error;
        let on_wire = Vec::<OnWire>::deserialize(d)?;
        on_wire
            .into_iter()
            .map(|w| {
                mvm_loader::plan::check_secret_name(&w.name).map_err(D::Error::custom)?;
                let bytes = zeroize::Zeroizing::new(
                    STANDARD
                        .decode(w.value.as_bytes())
                        .map_err(|_| D::Error::custom(format!("secret {}: not base64", w.name)))?,
                );
                if bytes.len() > MAX_VALUE_BYTES {
                    return Err(D::Error::custom(format!("secret {}: too large", w.name)));
                }
                Ok(Secret {
                    name: w.name,
                    value: SecretValue::new(bytes.to_vec()),
                    delivery: w.delivery,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn for_values_bind_placeholder_secrets() {
        let one = vec![("A".to_owned(), "MVM_PLACEHOLDER_A".to_owned())];
        let bound = pair_substitutions(&one, &["API.example.com".into()]).unwrap();
        assert_eq!(bound[0].hosts, [("api.example.com".to_owned(), 443)]);
        let bound = pair_substitutions(&one, &["A=x.example:8443".into()]).unwrap();
        assert_eq!(bound[0].hosts, [("x.example".to_owned(), 8443)]);
        let two = vec![
            ("A".to_owned(), "MVM_PLACEHOLDER_A".to_owned()),
            ("B".to_owned(), "MVM_PLACEHOLDER_B".to_owned()),
        ];
        assert!(
            pair_substitutions(&two, &["a.example".into()]).is_err(),
            "which one"
        );
        assert!(
            pair_substitutions(&two, &["A=a.example".into()]).is_err(),
            "B unbound"
        );
        let both = pair_substitutions(&two, &["A=a.example".into(), "B=b.example".into()]).unwrap();
        assert_eq!(both[1].hosts, [("b.example".to_owned(), 443)]);
        for bad in [
            "C=a.example",
            "a.example:0",
            "a.example:x",
            "192.0.2.7",
            "a_b.example",
            "",
        ] {
            assert!(pair_substitutions(&one, &[bad.into()]).is_err(), "{bad}");
        }
        assert!(pair_substitutions(&one, &[]).is_err(), "no --for");
        assert!(
            pair_substitutions(&[], &["a.example".into()]).is_err(),
            "no secret"
        );
        assert!(pair_substitutions(&[], &[]).unwrap().is_empty());
    }

    use super::*;

    #[test]
    fn a_value_never_prints() {
        let s = Secret {
            name: "TOKEN".into(),
            value: SecretValue::new(b"hunter2-value".to_vec()),
            delivery: Delivery::File,
        };
        let shown = format!("{s:?} {:?}", vec![s.clone()]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("TOKEN") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert_eq!(s.guest_path(), "/run/secrets/TOKEN");
        assert_eq!(s.value.digest(), Sha256Digest::of(b"hunter2-value"));
    }

    #[test]
    fn the_wire_form_round_trips_and_refuses_bad_names_and_sizes() {
        #[derive(Serialize, Deserialize)]
        struct Carrier {
            #[serde(with = "wire")]
            secrets: Vec<Secret>,
        }
        let secrets = vec![
            Secret {
                name: "A_B".into(),
                value: SecretValue::new(vec![0, 1, 2, 255]),
                delivery: Delivery::File,
            },
            Secret {
                name: "C".into(),
                value: SecretValue::new(b"text".to_vec()),
                delivery: Delivery::Env,
            },
        ];
        assert_eq!(secrets[0].env_value(), None);
        assert_eq!(secrets[1].env_value().as_deref(), Some("text"));
        let text = serde_json::to_string(&Carrier {
            secrets: secrets.clone(),
        })
        .unwrap();
        let back: Carrier = serde_json::from_str(&text).unwrap();
        assert_eq!(back.secrets, secrets);
        for bad in [
            r#"{"secrets":[{"name":"../x","value":""}]}"#,
            r#"{"secrets":[{"name":"A","value":"!!"}]}"#,
        ] {
            assert!(serde_json::from_str::<Carrier>(bad).is_err(), "{bad}");
        }
        use base64::Engine as _;
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_VALUE_BYTES + 1]);
        let text = format!(r#"{{"secrets":[{{"name":"A","value":"{big}"}}]}}"#);
        assert!(serde_json::from_str::<Carrier>(&text).is_err());
    }
}
