//! Sealing a snapshot the VMM wrote: its unsigned manifest signed, byte for byte, with
//! the host's admission key (the key the VMM is told to trust when it restores), the
//! envelope written beside it. A sandbox's pause and a warm start both seal this way.

use std::io::Read;
use std::path::Path;

use mvm_loader::dsse::Envelope;
use mvm_loader::plan::SNAPSHOT_PAYLOAD_TYPE;

use crate::admission::keys::{config_dir, HostKeys};

/// The VMM's unsigned manifest and the seal written beside it, and the memory file
/// (vmm/src/snapshot).
const MANIFEST_FILE: &str = "manifest.json";
#[cfg(target_os = "linux")]
const MEMORY_FILE: &str = "memory";
pub const SEAL_FILE: &str = "snapshot.dsse.json";
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
    replace(dir, SEAL_FILE, &seal_manifest(&manifest)?)
}

/// The seal of a manifest the VMM wrote (its exact bytes), signed with the host's
/// admission key: the DSSE envelope's JSON. An empty manifest (no snapshot was taken) is
/// an error.
pub fn seal_manifest(manifest: &[u8]) -> Result<Vec<u8>, String> {
    if manifest.is_empty() {
        return Err("the VMM wrote no manifest: no snapshot was taken".to_owned());
    }
    Ok(Envelope::sign(SNAPSHOT_PAYLOAD_TYPE, manifest, &admission_key()?).to_json())
}

/// The host's admission key, which seals snapshots.
fn admission_key() -> Result<ed25519_dalek::SigningKey, String> {
    let config = config_dir().map_err(|e| e.to_string())?;
    let (keys, _) = HostKeys::load_or_create(&config).map_err(|e| e.to_string())?;
    Ok(keys.admission)
}

/// `payload` signed with the host's admission key as a DSSE envelope of
/// `payload_type` (what else the host vouches for beside a snapshot).
pub fn sign_with_host_key(payload_type: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    Ok(Envelope::sign(payload_type, payload, &admission_key()?).to_json())
}

/// The payload of `envelope`, if the host's admission key signed it as `payload_type`.
pub fn verified_by_host_key(payload_type: &str, envelope: &[u8]) -> Result<Vec<u8>, String> {
    let mut trusted = mvm_loader::dsse::TrustedKeys::new();
    trusted.add(admission_key()?.verifying_key());
    Envelope::from_json(envelope)
        .and_then(|e| e.verify(payload_type, &trusted))
        .map(|v| v.payload)
        .map_err(|e| e.to_string())
}

/// The seal `sealed` (the host's own, checked) made again over the same manifest with
/// `memory_file` as the memory file's sealed identity: for a copy of the sealed memory
/// file the host vouches for (an emulated warm start's, `emulated::warm`).
#[cfg(target_os = "linux")]
pub fn reseal_naming(
    sealed: &[u8],
    memory_file: &mvm_loader::file_identity::FileIdentity,
) -> Result<Vec<u8>, String> {
    let manifest = verified_by_host_key(SNAPSHOT_PAYLOAD_TYPE, sealed)
        .map_err(|e| format!("the seal: {e}"))?;
    let manifest = naming(&manifest, memory_file)?;
    seal_manifest(&manifest)
}

/// `manifest` with `memory_file` as its memory file's identity.
#[cfg(target_os = "linux")]
fn naming(
    manifest: &[u8],
    memory_file: &mvm_loader::file_identity::FileIdentity,
) -> Result<Vec<u8>, String> {
    let mut doc: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("the manifest: {e}"))?;
    let map = doc.as_object_mut().ok_or("the manifest is not an object")?;
    map.insert(
        "memory_file".into(),
        serde_json::to_value(memory_file).map_err(|e| e.to_string())?,
    );
    serde_json::to_vec(&doc).map_err(|e| e.to_string())
}

/// Writes `bytes` to `dir/name` through a new file renamed into place, so a name that
/// was a hard link (a fork's) stops sharing the old file instead of writing into it.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", dir.join(name).display())
        })
}

/// The memory file of a snapshot shared by hard links (a fork's), checked once more and
/// its identity sealed again in every directory of `dirs` (the first is the one the
/// links came from), so that their restores find it unchanged and need not each hash
/// it: a new link moves the file's change time past the one the VMM sealed.
///
/// The seal is checked first (the host's own key, over the exact manifest), and the
/// file's identity is read, the clock waited past its change time, the file's index made
/// as the VMM makes one (each 1 MiB chunk that is not zeros, hashed), and its identity
/// read again: only the same identity both times, and the sealed index digest, are
/// sealed again. A write before the first read is in what was hashed; one after it
/// moves the change time, and then the restores hash the file, as they would have.
/// Returns whether the identity was sealed again; an error leaves every seal as it was.
#[cfg(target_os = "linux")]
pub fn reattest_shared(dirs: &[&Path]) -> Result<bool, String> {
    let config = config_dir().map_err(|e| e.to_string())?;
    let (keys, _) = HostKeys::load_or_create(&config).map_err(|e| e.to_string())?;
    reattest_with(dirs, &keys.admission)
}

/// [`reattest_shared`] with the host's admission key given.
#[cfg(target_os = "linux")]
fn reattest_with(dirs: &[&Path], key: &ed25519_dalek::SigningKey) -> Result<bool, String> {
    use mvm_loader::dsse::TrustedKeys;
    use mvm_loader::file_identity::{boot_id, identity, wait_past};
    use mvm_loader::snapshot_memory::index_of;
    use std::os::unix::fs::OpenOptionsExt;

    let Some(first) = dirs.first() else {
        return Ok(false);
    };
    let Some(boot) = boot_id() else {
        return Ok(false);
    };
    let mut trusted = TrustedKeys::new();
    trusted.add(key.verifying_key());
    let mut sealed = Vec::new();
    std::fs::File::open(first.join(SEAL_FILE))
        .and_then(|f| f.take(MAX_MANIFEST_BYTES).read_to_end(&mut sealed))
        .map_err(|e| format!("reading the seal: {e}"))?;
    let manifest = Envelope::from_json(&sealed)
        .and_then(|e| e.verify(SNAPSHOT_PAYLOAD_TYPE, &trusted))
        .map_err(|e| format!("the seal: {e}"))?
        .payload;
    let doc: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| format!("the manifest: {e}"))?;
    let memory = doc
        .get("memory")
        .cloned()
        .ok_or("the manifest names no memory file")?;
    let (Some(bytes), Some(digest)) = (
        memory.get("bytes").and_then(serde_json::Value::as_u64),
        memory.get("sha256").and_then(serde_json::Value::as_str),
    ) else {
        return Err("the manifest's memory entry is not bytes and sha256".into());
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(first.join(MEMORY_FILE))
        .map_err(|e| format!("opening the memory file: {e}"))?;
    let before = identity(&file, &boot).map_err(|e| format!("fstat: {e}"))?;
    if before.bytes != bytes || !wait_past(&before) {
        return Ok(false);
    }
    // The index of what the file holds now, as the VMM builds one (its digest is the
    // one sealed): the same digest is the same content.
    let measured = index_of(&mut std::io::BufReader::new(&file), bytes)
        .map_err(|e| format!("reading the memory file: {e}"))?
        .digest();
    let after = identity(&file, &boot).map_err(|e| format!("fstat: {e}"))?;
    if digest.parse().ok() != Some(measured) || after != before {
        return Ok(false);
    }
    let manifest = naming(&manifest, &before)?;
    let seal = Envelope::sign(SNAPSHOT_PAYLOAD_TYPE, &manifest, key).to_json();
    for dir in dirs {
        replace(dir, MANIFEST_FILE, &manifest)?;
        replace(dir, SEAL_FILE, &seal)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_loader::file_identity::{boot_id, identity, unchanged_since_written, FileIdentity};
    use std::os::unix::fs::FileExt;

    /// A sealed snapshot directory: a memory file and a manifest naming its digest.
    fn sealed_dir(root: &Path, key: &ed25519_dalek::SigningKey) -> std::path::PathBuf {
        let dir = root.join("source");
        std::fs::create_dir(&dir).unwrap();
        let memory = vec![7u8; 3 * 4096];
        std::fs::write(dir.join(MEMORY_FILE), &memory).unwrap();
        let manifest = serde_json::json!({
            "format": 1,
            "memory": {
                "bytes": memory.len(),
                "sha256": mvm_loader::snapshot_memory::index_of(&mut &memory[..], memory.len() as u64)
                    .unwrap()
                    .digest()
                    .to_string(),
            },
            "memory_file": null,
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), &bytes).unwrap();
        let seal = Envelope::sign(SNAPSHOT_PAYLOAD_TYPE, &bytes, key).to_json();
        std::fs::write(dir.join(SEAL_FILE), seal).unwrap();
        dir
    }

    fn link_all(from: &Path, to: &Path) {
        std::fs::create_dir(to).unwrap();
        for name in [MEMORY_FILE, MANIFEST_FILE, SEAL_FILE] {
            std::fs::hard_link(from.join(name), to.join(name)).unwrap();
        }
    }

    fn sealed_identity(dir: &Path, key: &ed25519_dalek::SigningKey) -> Option<FileIdentity> {
        let mut trusted = mvm_loader::dsse::TrustedKeys::new();
        trusted.add(key.verifying_key());
        let payload = Envelope::from_json(&std::fs::read(dir.join(SEAL_FILE)).unwrap())
            .unwrap()
            .verify(SNAPSHOT_PAYLOAD_TYPE, &trusted)
            .unwrap()
            .payload;
        assert_eq!(payload, std::fs::read(dir.join(MANIFEST_FILE)).unwrap());
        let doc: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        serde_json::from_value(doc["memory_file"].clone()).unwrap()
    }

    #[test]
    fn a_forks_links_are_sealed_again_with_the_files_identity_after_one_hash() {
        let root = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let source = sealed_dir(root.path(), &key);
        let fork = root.path().join("fork");
        link_all(&source, &fork);
        assert!(reattest_with(&[&source, &fork], &key).unwrap());
        let boot = boot_id().unwrap();
        for dir in [&source, &fork] {
            let sealed = sealed_identity(dir, &key).expect("an identity sealed");
            let file = std::fs::File::open(dir.join(MEMORY_FILE)).unwrap();
            assert_eq!(sealed, identity(&file, &boot).unwrap());
            assert!(unchanged_since_written(&file, &sealed, Some(&boot)));
        }
        // The manifests and seals are each directory's own files now.
        std::fs::write(fork.join(MANIFEST_FILE), b"{}").unwrap();
        assert_ne!(std::fs::read(source.join(MANIFEST_FILE)).unwrap(), b"{}");

        // One byte of memory changed: nothing is sealed again, and the old identity no
        // longer matches, so the restores hash (and refuse) it.
        let sealed = sealed_identity(&source, &key).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(source.join(MEMORY_FILE))
            .unwrap();
        file.write_all_at(&[8], 4096).unwrap();
        drop(file);
        std::fs::write(
            fork.join(MANIFEST_FILE),
            std::fs::read(source.join(MANIFEST_FILE)).unwrap(),
        )
        .unwrap();
        assert!(!reattest_with(&[&source, &fork], &key).unwrap());
        assert_eq!(sealed_identity(&source, &key).unwrap(), sealed);
        let file = std::fs::File::open(source.join(MEMORY_FILE)).unwrap();
        assert!(!unchanged_since_written(&file, &sealed, Some(&boot)));
    }

    #[test]
    fn a_seal_by_another_key_is_not_sealed_again() {
        let root = tempfile::tempdir().unwrap();
        let other = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
        let source = sealed_dir(root.path(), &other);
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let err = reattest_with(&[&source], &key).unwrap_err();
        assert!(err.contains("seal"), "{err}");
        assert!(std::fs::read_to_string(source.join(MANIFEST_FILE))
            .unwrap()
            .contains("\"memory_file\":null"));
    }
}
