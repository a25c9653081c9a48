//! The builder VM's own image: `images/builder` (a small Debian with `erofs-utils`),
//! embedded in this binary with its lock, built on this machine the first time an
//! image needs it, and found again by its lock's digest.
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

/// The builder's spec, as shipped.
pub const SPEC: &str = include_str!("../../../../images/builder/mvm.toml");
/// Its lock, as shipped.
pub const LOCK: &str = include_str!("../../../../images/builder/mvm.lock");
/// The builder image's name in the store.
pub const NAME: &str = "mvm-builder";

fn local_dir() -> Result<PathBuf, AssembleError> {
    Ok(crate::image::store::data_dir()?.join("builder"))
}

/// The builder's spec, from where a re-lock would write its lock.
fn loaded() -> Result<LoadedSpec, AssembleError> {
    let path = local_dir()?.join(spec::SPEC_FILE);
    let parsed = spec::parse(&path, SPEC.as_bytes())?;
    Ok(LoadedSpec {
        spec: parsed,
        path,
        bytes: SPEC.as_bytes().to_vec(),
    })
}

/// The lock to build from: a re-lock in the data directory made from this same
/// spec, else the shipped one.
fn current_lock(spec: &LoadedSpec) -> Result<(Lock, Vec<u8>), AssembleError> {
    if spec.lock_path().is_file() {
        if let Ok(found) = Lock::read_for(spec) {
            return Ok(found);
        }
    }
    let lock = Lock::from_bytes(&PathBuf::from("images/builder/mvm.lock"), LOCK.as_bytes())?;
    Ok((lock, LOCK.as_bytes().to_vec()))
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
    let spec = loaded()?;
    let (lock, bytes) = current_lock(&spec)?;
    let store = ImageStore::open_default()?;
    let base = store.resolve(DEFAULT_IMAGE)?;
    if let Some(found) = find_by_lock(&store, &Lock::digest_of(&bytes), &base.digest)? {
        return Ok(found);
    }
    say("building the builder VM's image (once per machine and lock)");
    match assemble(&spec, &lock, &bytes, None, options) {
        Ok(built) => Ok(built.image),
        Err(e) if is_not_served(&e) => {
            say(&format!(
                "{e}\nmvm: re-locking the builder image against Debian's current indexes ({})",
                spec.lock_path().display()
            ));
            std::fs::create_dir_all(local_dir()?).map_err(|source| AssembleError::Io {
                path: spec.lock_path(),
                source,
            })?;
            let made = lock::lock(&spec, &|s| say(s)).map_err(AssembleError::Lock)?;
            let (_, bytes) = lock::write(&spec, &made).map_err(AssembleError::Lock)?;
            Ok(assemble(&spec, &made, &bytes, None, options)?.image)
        }
        Err(e) => Err(e),
    }
}

/// Whether the shipped lock was made from the shipped spec.
pub fn shipped_lock_matches() -> Result<bool, LockError> {
    let lock = Lock::from_bytes(&PathBuf::from("images/builder/mvm.lock"), LOCK.as_bytes())?;
    Ok(lock.spec_sha256 == hex::encode(<sha2::Sha256 as sha2::Digest>::digest(SPEC.as_bytes())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_builder_lock_is_of_the_shipped_spec() {
        assert!(super::shipped_lock_matches().unwrap());
    }
}
