//! `mvm sandbox fork`: a new sandbox from a running one's moment.
//!
//! The source is paused (its VM snapshotted and sealed), the snapshot is shared with a
//! new sandbox (hard links: the memory file is mapped privately by each VM that restores
//! from it and never written again; a later pause writes a new file), and both are
//! resumed from it. Each restore is admitted and audited on its own, and each guest is
//! reseeded with its own entropy and its own sandbox id before anything runs in it: the
//! two go on from the same instant with the same files and processes, and different
//! random bytes. The source is paused for as long as the snapshot and its restore take.
//! The links move the memory file's change time past the one its seal names, so the file
//! is hashed once here and its identity sealed again in both directories
//! ([`crate::backend::snapshot_seal::reattest_shared`]): neither restore hashes it.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use mvm_loader::plan::UtcTime;

use super::state::{self, Sandbox, SandboxConfig, SandboxState, Status};
use super::{info_of, new_id, pause, resume, SandboxError, SandboxInfo, PAUSE_WAIT};

/// Links every file of `from` into a new directory `to`.
fn share_snapshot(from: &Path, to: &Path) -> Result<(), SandboxError> {
    let fail = |what: &Path, e| SandboxError::io(format!("sharing {}", what.display()), e);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(to)
        .map_err(|e| fail(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| fail(from, e))? {
        let entry = entry.map_err(|e| fail(from, e))?;
        let kind = entry.file_type().map_err(|e| fail(&entry.path(), e))?;
        if !kind.is_file() {
            return Err(fail(
                &entry.path(),
                std::io::Error::other("not a regular file in a snapshot"),
            ));
        }
        std::fs::hard_link(entry.path(), to.join(entry.file_name()))
            .map_err(|e| fail(&entry.path(), e))?;
    }
    Ok(())
}

/// The shared memory file hashed once here and its identity sealed again in both
/// directories, so neither restore hashes it (the links moved its change time). On
/// failure both restores hash it, as before: said in the log, not an error.
fn reattest(source: &Path, fork: &Path) {
    #[cfg(target_os = "linux")]
    match crate::backend::snapshot_seal::reattest_shared(&[source, fork]) {
        Ok(true) => tracing::debug!("fork: the shared memory file's identity sealed again"),
        Ok(false) => tracing::info!("fork: the shared memory file changed or could not be re-attested; its restores hash it"),
        Err(e) => tracing::warn!("fork: re-attesting the shared memory file: {e}; its restores hash it"),
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (source, fork);
}

/// Forks the ready sandbox `reference` names into a new one (named `name`, if given),
/// and waits until both are ready again. The source's host ports are its own: a
/// sandbox with forwarded ports is not forked.
pub fn fork(
    reference: &str,
    name: Option<String>,
    ready_timeout: std::time::Duration,
) -> Result<SandboxInfo, SandboxError> {
    if let Some(name) = &name {
        state::check_name(name)?;
    }
    let root = state::root();
    let source = Sandbox::find_in(&root, reference)?;
    let config = source.config()?;
    if !config.ports.is_empty() {
        return Err(SandboxError::NotRunning {
            id: config.id,
            state: "not forkable".into(),
            reason: Some("its forwarded host ports cannot be shared with a fork".into()),
        });
    }
    pause(reference, PAUSE_WAIT)?;
    let paused = source
        .state()?
        .ok_or_else(|| SandboxError::NotFound(config.id.clone()))?;
    let forked_config = SandboxConfig {
        id: new_id(),
        name,
        created: UtcTime::now(),
        ephemeral: false,
        ..config.clone()
    };
    let made = Sandbox::create_in(&root, &forked_config).and_then(|fork| {
        share_snapshot(&source.snapshot_dir(), &fork.snapshot_dir())?;
        reattest(&source.snapshot_dir(), &fork.snapshot_dir());
        fork.set_state(&SandboxState {
            status: Status::Paused,
            reason: Some(format!("forked from {}", config.id)),
            ..paused.clone()
        })?;
        Ok(fork)
    });
    // The source goes on whatever became of the fork.
    let resumed = resume(&config.id, ready_timeout);
    let fork = match made {
        Ok(fork) => fork,
        Err(e) => {
            let _ = Sandbox::find_in(&root, &forked_config.id).map(|f| f.remove(&root));
            return Err(e);
        }
    };
    let forked = resume(&forked_config.id, ready_timeout);
    resumed?;
    forked?;
    info_of(&fork)
}
