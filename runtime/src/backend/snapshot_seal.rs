//! Sealing a snapshot the VMM wrote: its unsigned manifest signed, byte for byte, with
//! the host's admission key (the key the VMM is told to trust when it restores), the
//! envelope written beside it. A sandbox's pause and a warm start both seal this way.

use std::io::Read;
use std::path::Path;

use mvm_loader::dsse::Envelope;
use mvm_loader::plan::SNAPSHOT_PAYLOAD_TYPE;

use crate::admission::keys::{config_dir, HostKeys};

/// The VMM's unsigned manifest and the seal written beside it (vmm/src/snapshot).
const MANIFEST_FILE: &str = "manifest.json";
const SEAL_FILE: &str = "snapshot.dsse.json";
/// The largest manifest sealed.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Whether `dir` holds a sealed snapshot.
pub fn is_sealed(dir: &Path) -> bool {
    dir.join(SEAL_FILE).is_file()
}

/// Signs `dir`'s manifest with the host's admission key; an empty manifest (no snapshot
/// was taken) is an error.
pub fn seal(dir: &Path) -> Result<(), String> {
    let path = dir.join(MANIFEST_FILE);
    let mut manifest = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES).read_to_end(&mut manifest))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if manifest.is_empty() {
        return Err("the VMM wrote no manifest: no snapshot was taken".to_owned());
    }
    let config = config_dir().map_err(|e| e.to_string())?;
    let (keys, _) = HostKeys::load_or_create(&config).map_err(|e| e.to_string())?;
    let envelope = Envelope::sign(SNAPSHOT_PAYLOAD_TYPE, &manifest, &keys.admission);
    let seal = dir.join(SEAL_FILE);
    std::fs::write(&seal, envelope.to_json())
        .map_err(|e| format!("writing {}: {e}", seal.display()))
}
