//! A sandbox's snapshots on disk: where the running VM's next one is written, how
//! it is sealed once written, and how it replaces the last one.
//!
//! The VMM writes `snapshot-next/` (memory, state, an unsigned manifest) when the
//! sandbox is paused, and the runtime copies the plan that booted the VM beside it.
//! The supervisor then seals the manifest with the host's admission key (the key the
//! VMM is told to trust when it restores) and renames the directory over `snapshot/`:
//! there is one snapshot per sandbox, the latest, and a half-written one never
//! replaces a whole one.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use super::state::Sandbox;
use super::SandboxError;
use crate::admission::keys::{config_dir, HostKeys};

fn host_keys() -> Result<(HostKeys, PathBuf), SandboxError> {
    let key_error = |e: crate::admission::keys::KeyError| {
        SandboxError::io("the host keys", std::io::Error::other(e.to_string()))
    };
    let config = config_dir().map_err(key_error)?;
    let (keys, _) = HostKeys::load_or_create(&config).map_err(key_error)?;
    Ok((keys, config))
}

/// The admission public key file the VMM trusts for seals and plans, the host keys
/// made first if this user has none yet.
pub fn trust_file() -> Result<PathBuf, SandboxError> {
    Ok(host_keys()?.1.join("admission.pub"))
}

/// Makes `sandbox`'s next-snapshot directory empty (mode 0700), for the VMM.
pub fn prepare_next(sandbox: &Sandbox) -> Result<PathBuf, SandboxError> {
    let next = sandbox.next_snapshot_dir();
    match std::fs::remove_dir_all(&next) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SandboxError::io(format!("clearing {}", next.display()), e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&next)
        .map_err(|e| SandboxError::io(format!("creating {}", next.display()), e))?;
    Ok(next)
}

/// Seals the snapshot the VMM wrote into the next-snapshot directory and makes it the
/// sandbox's snapshot (replacing the one before).
pub fn seal_and_keep(sandbox: &Sandbox) -> Result<(), SandboxError> {
    let next = sandbox.next_snapshot_dir();
    crate::backend::snapshot_seal::seal(&next).map_err(|e| {
        SandboxError::io(
            format!("sealing {}", next.display()),
            std::io::Error::other(e),
        )
    })?;
    let kept = sandbox.snapshot_dir();
    match std::fs::remove_dir_all(&kept) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SandboxError::io(format!("removing {}", kept.display()), e)),
    }
    std::fs::rename(&next, &kept)
        .map_err(|e| SandboxError::io(format!("keeping {}", kept.display()), e))
}
