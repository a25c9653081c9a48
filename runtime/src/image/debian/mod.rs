//! Debian archive metadata: from signed archive indexes to a resolved set of
//! packages, each pinned by version, file name, size and sha256.
//!
//! The flow, with the caller doing all downloads:
//! 1. [`verify_inrelease`] checks a suite's `InRelease` with `gpgv` against
//!    the archive keyring ([`DEFAULT_KEYRING`]) and returns the signed
//!    payload;
//! 2. [`parse_release`] reads the payload; [`Release::check`] checks each
//!    downloaded `Packages` file against its size and sha256;
//! 3. [`parse_packages`] reads the (decompressed) `Packages` files;
//! 4. [`Universe::new`] gathers the entries of every suite and component for
//!    amd64, and [`resolve`] closes a set of root packages over `Pre-Depends`
//!    and `Depends`.
//!
//! Versions compare by Debian policy ([`compare_versions`]). The resolver
//! ignores `Conflicts`, `Breaks`, `Recommends` and `Suggests` (see
//! [`resolve`](mod@resolve)). This module does no network I/O.

pub mod index;
pub mod resolve;
pub mod version;

use std::path::PathBuf;

pub use index::{
    format_alternatives, parse_packages, parse_release, parse_rfc2822, verify_inrelease, Dep,
    PackageEntry, Release, ARCH, DEFAULT_KEYRING,
};
pub use resolve::{resolve, Universe};
pub use version::{compare_versions, satisfies, Relation};

/// Errors of Debian index parsing, signature checking and resolution.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// deb822 text that is not a list of `Field: value` stanzas.
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    /// A `Packages` stanza without a required field.
    #[error("package {package}: missing field {field}")]
    MissingField {
        package: String,
        field: &'static str,
    },
    /// A `Packages` stanza with an unusable field value.
    #[error("package {package}: field {field}: {reason}")]
    BadField {
        package: String,
        field: &'static str,
        reason: String,
    },
    /// A Release payload with a missing or unusable field.
    #[error("Release of suite {suite}: field {field}: {reason}")]
    Release {
        suite: String,
        field: &'static str,
        reason: String,
    },
    /// A downloaded index that does not match its Release entry.
    #[error("suite {suite}: index {path}: {reason}")]
    Integrity {
        suite: String,
        path: String,
        reason: String,
    },
    /// `gpgv` is not installed.
    #[error("gpgv not found (install gpgv)")]
    GpgvNotFound,
    /// `gpgv` did not accept the signature (its messages, trimmed).
    #[error("signature check of {path} failed: {reason}")]
    Gpgv { path: PathBuf, reason: String },
    /// A signature check without any keyring to check against.
    #[error("no keyring given to check {path}")]
    NoKeyring { path: PathBuf },
    /// A file that could not be read, or a program that could not be run.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A root that names no package, real or virtual.
    #[error("no package named {name:?}{}", did_you_mean(.suggestion))]
    UnknownPackage {
        name: String,
        suggestion: Option<String>,
    },
    /// A dependency no package can satisfy.
    #[error("{package} depends on {dependency}, which cannot be satisfied: {reason}")]
    Unsatisfiable {
        package: String,
        dependency: String,
        reason: String,
    },
    /// An error in a named input (e.g. `bookworm-security main/binary-amd64/Packages`).
    #[error("{input}: {source}")]
    In {
        input: String,
        source: Box<DebianError>,
    },
}

impl DebianError {
    /// Names the input the error came from, e.g.
    /// `parse_packages(text).map_err(|e| e.within("bookworm main/binary-amd64/Packages"))`.
    pub fn within(self, input: impl Into<String>) -> Self {
        Self::In {
            input: input.into(),
            source: Box::new(self),
        }
    }
}

/// ` (did you mean "x"?)` when there is a suggestion.
fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|name| format!(" (did you mean {name:?}?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_input() {
        let error = parse_packages("Package: foo\nVersion: 1\n")
            .unwrap_err()
            .within("bookworm main/binary-amd64/Packages");
        assert_eq!(
            error.to_string(),
            "bookworm main/binary-amd64/Packages: package foo: missing field Architecture"
        );
        let error = DebianError::UnknownPackage {
            name: "Bash".to_owned(),
            suggestion: Some("bash".to_owned()),
        };
        assert_eq!(
            error.to_string(),
            "no package named \"Bash\" (did you mean \"bash\"?)"
        );
    }
}
