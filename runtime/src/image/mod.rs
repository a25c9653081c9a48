//! Guest images: the built-in base (kernel + a deterministic initramfs with
//! `mvm-agent` as `/init` and busybox), images with a root filesystem built from
//! a spec and its lock in a builder VM, `manifest.json`, and the store under the
//! user's data directory.
//!
//! An image is the kernel (`vmlinux`), the initramfs (`initramfs.cpio`,
//! uncompressed newc), for a built image a read-only root filesystem with its
//! dm-verity tree, and `manifest.json`, whose sha256 is the image digest. Built
//! twice from the same inputs, an image has the same digest (`docs/images.md`).
//!
//! | module | job |
//! |---|---|
//! | [`spec`] | `mvm.toml`, checked |
//! | [`lock`] | `mvm.lock`: the spec resolved against Debian's signed indexes |
//! | [`debian`] | Debian's index formats, versions, dependency resolution |
//! | [`fetch`] | inputs by digest into the content-addressed cache |
//! | [`deb`] | `.deb` files read and checked, unpacked into one tar stream (never onto the host) |
//! | [`assemble`] | the builder VM's inputs, its run, its output checked and stored |
//! | [`flake`] | Nix flakes built in the Nix builder VM |
//! | [`oci`] | OCI layouts and `docker save` archives: layers checked and merged on the host |

/// Image inputs compressed with xz or zstd are read only where images are built: on
/// Linux hosts (the builder VM runs on the kvm backend). Elsewhere such an input is
/// refused with this error, and `mvm` is built without liblzma and zstd.
#[cfg(not(target_os = "linux"))]
pub(crate) fn compression_unsupported(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!(
            "{what}-compressed image inputs are read on Linux hosts only, where images are built"
        ),
    )
}

pub mod assemble;
pub mod build;
pub mod cpio;
pub mod deb;
pub mod debian;
pub mod elf;
pub mod fetch;
pub mod flake;
pub mod lock;
pub mod manifest;
pub mod oci;
pub mod spec;
pub mod store;

use std::path::PathBuf;

pub use build::{build, BuildInputs, BuiltImage};
pub use manifest::Manifest;
pub use store::{ImageStore, StoredImage, DEFAULT_IMAGE};

/// Errors of the image builder and store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A build input is unusable.
    #[error("image input {name} ({path}): {reason}")]
    Input {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The initramfs could not be laid out.
    #[error("initramfs: {0}")]
    Cpio(#[from] cpio::CpioError),
    /// A stored file no longer matches its digest.
    #[error("digest mismatch for {file}: manifest {manifest}, measured {measured}")]
    DigestMismatch {
        file: PathBuf,
        manifest: String,
        measured: String,
    },
    /// A manifest that cannot be read or trusted.
    #[error("bad manifest {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    /// An image name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("bad image name {0:?}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with '.')")]
    BadName(String),
    /// No image answers to the reference.
    #[error(
        "no image {reference:?} in {store} (build one: mvm image build, or scripts/build-image)"
    )]
    NotFound { reference: String, store: PathBuf },
    /// A digest prefix that matches several images.
    #[error("image reference {0:?} matches several images; give more digits")]
    Ambiguous(String),
    /// Neither `MVM_DATA_DIR`, `XDG_DATA_HOME` nor `HOME` is set.
    #[error("no data directory: set MVM_DATA_DIR, XDG_DATA_HOME or HOME")]
    NoDataDir,
    /// Neither `MVM_CACHE`, `XDG_CACHE_HOME` nor `HOME` is set.
    #[error("no cache directory: set MVM_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
}
