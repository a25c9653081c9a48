//! `tier/emulated-warm`: warm starts on the emulated tier
//! (`runtime/src/backend/emulated/warm.rs`), the policy allowing them. The first run
//! boots and leaves the image's snapshot on a disk kept on this host, its manifest
//! sealed here; the next runs attach that disk to a fresh test host, which restores from
//! it, each run admitted with its own plan and reseeded (different `/dev/urandom` bytes,
//! its own id), `snapshot_restored` in the audit log where a boot has `boot_verified`;
//! `--cold` boots; the unpacked memory file is sealed again naming it (the host vouches
//! for the disk), so no restore hashes it. A byte of the kept memory changed (the disk
//! written) is refused before the guest runs (`memory_mismatch`, in the audit log), the
//! run boots instead and the snapshot is dropped. Then `mvm bench --warm` on the tier.

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::image_store;
use crate::cases::snapshot::warm::{
    allow_warm_starts, bench_and_print, memory_unchanged, refused_then_booted, warm_then_cold,
};

/// The case: about ten emulated runs, each a test host boot.
pub const CASES: &[Case] = &[Case::user_host("tier/emulated-warm", emulated_warm).limit_secs(900)];

/// The kept snapshots' directories (a seal and a disk in each).
fn kept(ctx: &Context) -> Result<Vec<std::path::PathBuf>, Failure> {
    let root = image_store(ctx)?.join("warm-emulated");
    Ok(std::fs::read_dir(&root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("snapshot.dsse.json").is_file() && p.join("disk").is_file())
                .collect()
        })
        .unwrap_or_default())
}

fn emulated_warm(ctx: &Context) -> CaseResult {
    // The image store is shared with other cases: none of this case's snapshots is left
    // in it, before or after.
    let root = image_store(ctx)?.join("warm-emulated");
    let _ = std::fs::remove_dir_all(&root);
    let result = warm_starts(ctx);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn warm_starts(ctx: &Context) -> CaseResult {
    allow_warm_starts(ctx)?;
    let count = || kept(ctx).map_or(0, |k| k.len());
    let runs = warm_then_cold(ctx, "emulated", &count)?;
    // The memory file each test host unpacked from the disk this host vouches for, sealed
    // again naming it: not hashed.
    memory_unchanged(ctx, &runs)?;

    // One byte of the kept memory changed (the last data byte of the pack, the memory
    // file's): refused before the guest runs, the run boots, the snapshot is dropped.
    let dirs = kept(ctx)?;
    let [dir] = dirs.as_slice() else {
        return Err(Failure::new(format!(
            "one kept snapshot expected: {dirs:?}"
        )));
    };
    let disk = dir.join("disk");
    let mut bytes =
        std::fs::read(&disk).map_err(|e| Failure::new(format!("{}: {e}", disk.display())))?;
    let end = b"{\"kind\":\"end\"}\n";
    let at = bytes
        .windows(end.len())
        .rposition(|w| w == end)
        .and_then(|i| i.checked_sub(1))
        .ok_or_else(|| Failure::new("no end line in the kept pack"))?;
    if let Some(byte) = bytes.get_mut(at) {
        *byte ^= 0x5a;
    }
    std::fs::write(&disk, &bytes).map_err(|e| Failure::new(format!("{}: {e}", disk.display())))?;
    refused_then_booted(ctx, "emulated")?;
    if dir.exists() {
        return Err(Failure::new("the refused snapshot is still kept"));
    }

    // `mvm bench --warm` on this tier: cold runs against warm starts, side by side (its
    // first run takes the snapshot again).
    bench_and_print(ctx, "emulated", &runs)
}
