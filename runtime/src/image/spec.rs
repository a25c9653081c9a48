//! `mvm.toml`: what an image is made of, as a person writes it.
//!
//! ```toml
//! [image]
//! name = "python"
//! suite = "bookworm"                 # the Debian release the packages come from
//! packages = ["python3", "python3-pip"]
//! workdir = "/work"
//! cmd = ["python3"]
//! build = ["python3 -c 'import compileall'"]   # run as root inside the builder VM
//!
//! [image.env]
//! LANG = "C.UTF-8"
//!
//! [[file]]
//! src = "config/app.toml"            # relative to the spec's directory
//! dst = "/etc/app.toml"
//! mode = "0644"
//!
//! [[deb]]
//! path = "vendor/tool_1.0_all.deb"   # a package of your own, pinned by digest in the lock
//! ```
//!
//! A spec is locked ([`super::lock`]) before it is built: the lock, not the spec, is
//! what a build reads. Every field is checked here, before anything is fetched.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The spec's file name in a directory.
pub const SPEC_FILE: &str = "mvm.toml";
/// The lock's file name, beside the spec.
pub const LOCK_FILE: &str = "mvm.lock";
/// Most packages one spec may name (dependencies come on top).
pub const MAX_PACKAGES: usize = 512;
/// Most build steps.
pub const MAX_STEPS: usize = 64;
/// Most files copied in.
pub const MAX_FILES: usize = 256;
/// Largest file copied in from the host.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The Debian suites an image may be built from (each with its `-updates` and
/// `-security` suites).
pub const SUITES: &[&str] = &["bookworm", "trixie"];

pub use super::manifest::ImageKind;

/// A whole `mvm.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The image.
    pub image: ImageSection,
    /// Files copied in from the host.
    #[serde(default, rename = "file")]
    pub files: Vec<FileEntry>,
    /// `.deb` files from the host, installed like Debian's (their dependencies must
    /// be in `packages`).
    #[serde(default, rename = "deb")]
    pub debs: Vec<LocalDeb>,
}

/// `[[deb]]`: a package file next to the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDeb {
    /// Relative to the spec's directory; must stay inside it.
    pub path: String,
}

/// `[image]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// The image's name in the store.
    pub name: String,
    /// The Debian suite.
    pub suite: String,
    /// Packages, besides Debian's essential set (always included).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Environment of every workload.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The workload's working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The command `mvm run --image NAME` runs when given none.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Shell commands run in order, as root, in the image being built, inside the
    /// builder VM (no network).
    #[serde(default)]
    pub build: Vec<String>,
    /// What the image is for.
    #[serde(default)]
    pub kind: ImageKind,
}

/// `[[file]]`: a host file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the spec's directory; must stay inside it.
    pub src: String,
    /// Absolute path in the image.
    pub dst: String,
    /// Octal permission bits, default `0644`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Why a spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The spec.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not TOML, or not this schema.
    #[error("{path}: {reason}")]
    Parse {
        /// The spec.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A field's value is refused.
    #[error("{path}: {field}: {reason}")]
    Field {
        /// The spec.
        path: PathBuf,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

/// A spec read from disk, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    /// The parsed spec.
    pub spec: Spec,
    /// The spec file.
    pub path: PathBuf,
    /// Its exact bytes (their digest is in the lock).
    pub bytes: Vec<u8>,
}

impl LoadedSpec {
    /// The directory the spec's relative paths start from.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Where the lock lives: `mvm.lock` beside the spec.
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_file_name(LOCK_FILE)
    }
}

/// Reads `path` (a spec file, or a directory holding [`SPEC_FILE`]) and checks it.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
    let path = if path.is_dir() {
        path.join(SPEC_FILE)
    } else {
        path.to_owned()
    };
    let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    let spec = parse(&path, &bytes)?;
    Ok(LoadedSpec { spec, path, bytes })
}

/// Parses and checks spec bytes (`path` names it in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Spec, SpecError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SpecError::Parse {
        path: path.to_owned(),
        reason: "not UTF-8".into(),
    })?;
    let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    check(path, &spec)?;
    Ok(spec)
}

fn field_err(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Field {
        path: path.to_owned(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// A Debian package name (policy 5.6.7): lowercase letters, digits, `+ - .`,
/// at least two characters, starting alphanumeric.
pub fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// An absolute, normalized path in the image (no `.`/`..`, no empty parts).
pub fn valid_image_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 4096
        && !p.contains('\0')
        && p.split('/')
            .skip(1)
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn check(path: &Path, spec: &Spec) -> Result<(), SpecError> {
    let image = &spec.image;
    super::store::check_name(&image.name)
        .map_err(|e| field_err(path, "image.name", e.to_string()))?;
    if !SUITES.contains(&image.suite.as_str()) {
        return Err(field_err(
            path,
            "image.suite",
            format!("{:?} is not one of {}", image.suite, SUITES.join(", ")),
        ));
    }
    if image.packages.len() > MAX_PACKAGES {
        return Err(field_err(path, "image.packages", "too many"));
    }
    for p in &image.packages {
        if !valid_package_name(p) {
            return Err(field_err(
                path,
                "image.packages",
                format!("{p:?} is not a Debian package name"),
            ));
        }
    }
    for (k, v) in &image.env {
        let ok_key = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes().first().is_some_and(u8::is_ascii_digit);
        if !ok_key || v.contains('\0') {
            return Err(field_err(
                path,
                format!("image.env.{k}"),
                "bad name or value",
            ));
        }
    }
    if let Some(w) = &image.workdir {
        if !valid_image_path(w) {
            return Err(field_err(
                path,
                "image.workdir",
                "an absolute, normalized path",
            ));
        }
    }
    if image.cmd.iter().any(|a| a.contains('\0')) {
        return Err(field_err(path, "image.cmd", "NUL in an argument"));
    }
    if image.build.len() > MAX_STEPS || image.build.iter().any(|s| s.contains('\0')) {
        return Err(field_err(
            path,
            "image.build",
            format!("at most {MAX_STEPS} steps, no NUL"),
        ));
    }
    if spec.files.len() > MAX_FILES {
        return Err(field_err(path, "file", "too many"));
    }
    if spec.debs.len() > MAX_FILES {
        return Err(field_err(path, "deb", "too many"));
    }
    for (i, d) in spec.debs.iter().enumerate() {
        if !inside_dir(&d.path) {
            return Err(field_err(
                path,
                format!("deb[{i}].path"),
                "a relative path inside the spec's directory",
            ));
        }
    }
    for (i, f) in spec.files.iter().enumerate() {
        if !inside_dir(&f.src) {
            return Err(field_err(
                path,
                format!("file[{i}].src"),
                "a relative path inside the spec's directory",
            ));
        }
        if !valid_image_path(&f.dst) || f.dst == "/" {
            return Err(field_err(
                path,
                format!("file[{i}].dst"),
                "an absolute, normalized path in the image",
            ));
        }
        if let Some(mode) = &f.mode {
            parse_mode(mode)
                .ok_or_else(|| field_err(path, format!("file[{i}].mode"), "octal, at most 0777"))?;
        }
    }
    Ok(())
}

/// A relative path that stays inside the directory it starts from.
fn inside_dir(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// `"0644"` → 0o644 (permission bits only: no setuid from a spec).
pub fn parse_mode(mode: &str) -> Option<u32> {
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Spec, SpecError> {
        parse(Path::new("mvm.toml"), text.as_bytes())
    }

    #[test]
    fn a_full_spec_parses() {
        let spec = p(r#"
            [image]
            name = "python"
            suite = "bookworm"
            packages = ["python3", "python3-pip"]
            workdir = "/work"
            cmd = ["python3"]
            build = ["true"]
            [image.env]
            LANG = "C.UTF-8"
            [[file]]
            src = "a/b.txt"
            dst = "/etc/b.txt"
            mode = "0600"
        "#)
        .unwrap();
        assert_eq!(spec.image.packages.len(), 2);
        assert_eq!(spec.image.kind, ImageKind::Workload);
        assert_eq!(spec.files.len(), 1);
    }

    #[test]
    fn bad_fields_are_named() {
        for (text, field) in [
            ("[image]\nname='x'\nsuite='sid'", "image.suite"),
            (
                "[image]\nname='x'\nsuite='bookworm'\npackages=['Py']",
                "image.packages",
            ),
            ("[image]\nname='../x'\nsuite='bookworm'", "image.name"),
            (
                "[image]\nname='x'\nsuite='bookworm'\nworkdir='work'",
                "image.workdir",
            ),
            (
                "[image]\nname='x'\nsuite='bookworm'\n[[file]]\nsrc='../etc/passwd'\ndst='/x'",
                "file[0].src",
            ),
            (
                "[image]\nname='x'\nsuite='bookworm'\n[[file]]\nsrc='a'\ndst='/x/../y'",
                "file[0].dst",
            ),
            (
                "[image]\nname='x'\nsuite='bookworm'\n[[file]]\nsrc='a'\ndst='/x'\nmode='4755'",
                "file[0].mode",
            ),
        ] {
            let err = p(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(p("[image]\nname='x'\nsuite='bookworm'\nsurprise=1").is_err());
    }
}
