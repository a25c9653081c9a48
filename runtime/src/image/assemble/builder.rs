//! The builder VMs' own images: `images/builder` (a small Debian with
//! `erofs-utils`) and `images/nix-builder` (the same with Debian 13's Nix, for
//! flakes), embedded in this binary with their locks, built on this machine the
//! first time an image needs one, and found again by their lock's digest.
//!
//! Its first build has no builder to run in: it boots the base image's initramfs
//! (busybox and the agent) with the builder's command line, unpacks the essential
//! set there, lets the new tree's own `dpkg` configure it, and writes the filesystem
//! with the new tree's own `mkfs.erofs`. Every later build boots the builder image.
//!
//! Locks age ([`crate::image::lock`]): when Debian no longer serves an input of the
//! embedded lock and the cache does not have it, the builder is re-locked into the
//! data directory (`builder/mvm.lock`), said so, and built from that lock.

use std::path::PathBuf;

use super::{assemble, find_by_lock, say, AssembleError, AssembleOptions};
use crate::image::fetch::FetchError;
use crate::image::lock::{self, Lock, LockError};
use crate::image::spec::{self, LoadedSpec};
use crate::image::{ImageStore, StoredImage, DEFAULT_IMAGE};

/// A builder VM's image as shipped: its spec and lock embedded in this binary.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    /// The spec's text.
    pub spec: &'static str,
    /// The lock's text.
    pub lock: &'static str,
    /// Its directory in the repository (for messages) and, under the data directory,
    /// where a re-lock goes.
    pub dir: &'static str,
    /// Whether it is built on the bare initramfs (the builder itself) or in the
    /// builder VM (every other builder).
    pub bootstrap: bool,
}

/// The builder VM every image is assembled in (`images/builder`).
pub const BUILDER: Shipped = Shipped {
    spec: include_str!("../../../../images/builder/mvm.toml"),
    lock: include_str!("../../../../images/builder/mvm.lock"),
    dir: "builder",
    bootstrap: true,
};

/// The builder VM flakes are built in (`images/nix-builder`: Debian 13's Nix).
pub const NIX_BUILDER: Shipped = Shipped {
    spec: include_str!("../../../../images/nix-builder/mvm.toml"),
    lock: include_str!("../../../../images/nix-builder/mvm.lock"),
    dir: "nix-builder",
    bootstrap: false,
};

/// The builder image's name in the store.
pub const NAME: &str = "mvm-builder";

fn local_dir(shipped: &Shipped) -> Result<PathBuf, AssembleError> {
    Ok(crate::image::store::data_dir()?.join(shipped.dir))
}

/// The spec, from where a re-lock would write its lock.
fn loaded(shipped: &Shipped) -> Result<LoadedSpec, AssembleError> {
    let path = local_dir(shipped)?.join(spec::SPEC_FILE);
    let parsed = spec::parse(&path, shipped.spec.as_bytes())?;
    Ok(LoadedSpec {
        spec: parsed,
        path,
        bytes: shipped.spec.as_bytes().to_vec(),
    })
}

/// The lock to build from: a re-lock in the data directory made from this same
/// spec, else the shipped one.
fn current_lock(shipped: &Shipped, spec: &LoadedSpec) -> Result<(Lock, Vec<u8>), AssembleError> {
    if spec.lock_path().is_file() {
        if let Ok(found) = Lock::read_for(spec) {
            return Ok(found);
        }
    }
    let path = PathBuf::from(format!("images/{}/mvm.lock", shipped.dir));
    let lock = Lock::from_bytes(&path, shipped.lock.as_bytes())?;
    Ok((lock, shipped.lock.as_bytes().to_vec()))
}

fn is_not_served(e: &AssembleError) -> bool {
    matches!(
        e,
        AssembleError::Fetch(FetchError::Status {
            status: 404 | 410,
            ..
        })
    )
}

/// The builder image of the current lock: from the store, else built now.
pub fn ensure(options: &AssembleOptions) -> Result<StoredImage, AssembleError> {
    ensure_shipped(&BUILDER, options)
}

/// The Nix builder image of the current lock: from the store, else built now (in
/// the builder VM, made first if need be).
pub fn ensure_nix(options: &AssembleOptions) -> Result<StoredImage, AssembleError> {
    ensure_shipped(&NIX_BUILDER, options)
}

fn ensure_shipped(
    shipped: &Shipped,
    options: &AssembleOptions,
) -> Result<StoredImage, AssembleError> {
    let spec = loaded(shipped)?;
    let (lock, bytes) = current_lock(shipped, &spec)?;
    let store = ImageStore::open_default()?;
    let base = store.resolve(DEFAULT_IMAGE)?;
    let lock_digest = Lock::digest_of(&bytes);
    if let Some(found) = find_by_lock(&store, &lock_digest, &base.digest)? {
        return Ok(found);
    }
    // One that setup published for every user (docs/run.md, "Without root"), built from
    // the same lock on the same base image.
    if let Some(shared) = store.shared_store() {
        if let Some(found) = find_by_lock(&shared, &lock_digest, &base.digest)? {
            return Ok(found);
        }
    }
    let builder = if shipped.bootstrap {
        None
    } else {
        Some(ensure(options)?)
    };
    say(&format!(
        "building the {} VM's image (once per machine and lock)",
        spec.spec.image.name
    ));
    match assemble(&spec, &lock, &bytes, builder.as_ref(), options) {
        Ok(built) => Ok(built.image),
        Err(e) if is_not_served(&e) => {
            say(&format!(
                "{e}\nmvm: re-locking {} against Debian's current indexes ({})",
                spec.spec.image.name,
                spec.lock_path().display()
            ));
            std::fs::create_dir_all(local_dir(shipped)?).map_err(|source| AssembleError::Io {
                path: spec.lock_path(),
                source,
            })?;
            let made = lock::lock(&spec, &|s| say(s)).map_err(AssembleError::Lock)?;
            let (_, bytes) = lock::write(&spec, &made).map_err(AssembleError::Lock)?;
            Ok(assemble(&spec, &made, &bytes, builder.as_ref(), options)?.image)
        }
        Err(e) => Err(e),
    }
}

/// Whether the shipped lock was made from the shipped spec.
pub fn shipped_lock_matches(shipped: &Shipped) -> Result<bool, LockError> {
    let path = PathBuf::from(format!("images/{}/mvm.lock", shipped.dir));
    let lock = Lock::from_bytes(&path, shipped.lock.as_bytes())?;
    Ok(lock.spec_sha256
        == hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            shipped.spec.as_bytes(),
        )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_builder_locks_are_of_the_shipped_specs() {
        assert!(super::shipped_lock_matches(&super::BUILDER).unwrap());
        assert!(super::shipped_lock_matches(&super::NIX_BUILDER).unwrap());
    }
}
