//! `manifest.json`: what an image is made of and what it was made from.
//!
//! The manifest holds no timestamps and no host paths, so building the same
//! inputs twice gives the same manifest bytes, and the image digest (the
//! sha256 of those bytes) names the image's content.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest schema this code writes and reads.
pub const MANIFEST_SCHEMA: u32 = 1;
/// The file name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// `sha256:<hex>` of some bytes: the digest notation used by plans too.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One artifact of an image: a file in the image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// The file name inside the image directory.
    pub file: String,
    /// `sha256:<hex>` of the file's bytes.
    pub sha256: String,
    /// The file's length in bytes.
    pub size: u64,
}

impl Artifact {
    /// Describes `bytes` stored as `file`.
    pub fn of(file: &str, bytes: &[u8]) -> Self {
        Self {
            file: file.to_owned(),
            sha256: sha256_digest(bytes),
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
        }
    }
}

/// One pinned input the image was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// What the input is (`kernel`, `mvm-agent`, `busybox`, `kernel-source`, ...).
    pub name: String,
    /// `sha256:<hex>` of the input's bytes.
    pub sha256: String,
    /// A version string the input carries, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// What the image is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Workloads run in it as the unprivileged user.
    #[default]
    Workload,
    /// mvm's builder VM: its workload (the build) runs as root in the guest.
    Builder,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_SCHEMA`].
    pub schema: u32,
    /// The guest kernel (ELF vmlinux).
    pub kernel: Artifact,
    /// The initramfs (uncompressed newc cpio).
    pub initramfs: Artifact,
    /// The default kernel command line.
    pub cmdline: String,
    /// `sha256:<hex>` of the exact command line bytes, as a plan pins it.
    pub cmdline_sha256: String,
    /// The vsock port the guest agent listens on.
    pub agent_vsock_port: u32,
    /// The inputs, in a fixed order.
    pub inputs: Vec<Input>,
    /// The read-only root filesystem, when the image has one (built from a lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<Rootfs>,
    /// sha256 (hex) of the lock the image was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_sha256: Option<String>,
    /// Workload defaults the image's spec gives, and where a built image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageConfig>,
}

/// A flake image's provenance: the flake, its locked inputs, and the store paths of
/// what the build produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixBuild {
    /// The flake output built (`ATTR` of `PATH#ATTR`).
    pub attr: String,
    /// `sha256:<hex>` over the flake directory's files as the host copied them.
    pub source_sha256: String,
    /// `sha256:<hex>` of its `flake.lock`.
    pub lock_sha256: String,
    /// Every locked input of `flake.lock`.
    pub inputs: Vec<FlakeInput>,
    /// The output's store path.
    pub out_path: String,
    /// The store paths of its closure (the output's included), sorted.
    pub closure: Vec<String>,
}

/// One locked input of a `flake.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakeInput {
    /// The node's name in the lock.
    pub name: String,
    /// Its `locked.type` (`path`, `github`, `git`, `tarball`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its `locked.rev`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Its `locked.narHash` (SRI, `sha256-...`); none for a relative path input,
    /// which is part of the flake's own source (and so of its source digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_hash: Option<String>,
    /// Its `locked.path`, for a path input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// An image's root disk: a read-only filesystem image and its dm-verity tree
/// (`FILE.verity` beside it), pinned in a plan by the tree's root hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// The file name inside the image directory.
    pub file: String,
    /// `erofs`.
    pub fstype: String,
    /// Root hash, salt and geometry of the tree.
    pub verity: mvm_loader::verity::VerityParams,
}

/// Defaults for workloads in the image (from `[image]` in its spec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default command (the arguments after the entrypoint, when there is one).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// What every command runs through (an OCI image's `Entrypoint`): a run's
    /// command, or else `cmd`, is appended to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `uid:gid` workloads run as (an OCI image's `User`, resolved at import; the
    /// image's command line tells the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What a flake image was built from (`mvm image build --flake`). (Here and not
    /// beside `config` so that the base image's manifest code, whose source is one of
    /// the base image's inputs, need not change.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix: Option<NixBuild>,
    /// `workload` or `builder`.
    pub kind: ImageKind,
}

impl Manifest {
    /// The manifest's bytes as stored: pretty JSON with a trailing newline.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Parses stored manifest bytes; unknown fields are refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_notation() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let m = Manifest {
            schema: MANIFEST_SCHEMA,
            kernel: Artifact::of("vmlinux", b"k"),
            initramfs: Artifact::of("initramfs.cpio", b"i"),
            cmdline: "console=ttyS0".into(),
            cmdline_sha256: sha256_digest(b"console=ttyS0"),
            agent_vsock_port: 1024,
            inputs: vec![Input {
                name: "busybox".into(),
                sha256: sha256_digest(b"b"),
                version: Some("1.35".into()),
            }],
            rootfs: None,
            lock_sha256: None,
            config: None,
        };
        let bytes = m.to_bytes().unwrap();
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        value["surprise"] = serde_json::json!(1);
        assert!(Manifest::from_bytes(&serde_json::to_vec(&value).unwrap()).is_err());
    }
}
