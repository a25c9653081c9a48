//! The test host's initramfs for one run: its `base.cpio` followed by an
//! overlay archive with `/testhost/run`, the static `mvm` and `mvm-vmm` and
//! the image, cached under the digest of its inputs.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::backend::RunError;
use crate::image::cpio::Archive;
use crate::image::manifest::MANIFEST_FILE;
use crate::image::StoredImage;

/// Where the overlay puts things inside the test host.
const GUEST_BIN_DIR: &str = "testhost/bin";
const GUEST_IMAGE_DIR: &str = "testhost/image";
/// Bump when the overlay layout changes, so cached initramfs files are rebuilt.
const OVERLAY_FORMAT: &str = "mvm-emulated-overlay-3";
/// The test host modules the virtio-serial ports, the disks and the uplink
/// (`uplink`, for `--net`) need, in load order.
const VIRTIO_MODULES: &str =
    "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
     virtio_console virtio_blk failover net_failover virtio_net";

/// The cache directory (`crate::image::store::cache_dir`).
fn cache_root() -> Result<PathBuf, RunError> {
    crate::image::store::cache_dir().map_err(|e| RunError::Missing(e.to_string()))
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(RunError::io(format!("reading {}", path.display())))
}

/// The archive appended to the test host's `base.cpio`: `/testhost/run`
/// (which the test host's init runs), the static binaries and the image.
pub fn overlay_archive(mvm: &[u8], vmm: &[u8], image: &StoredImage) -> Result<Archive, RunError> {
    let cpio =
        |e: crate::image::cpio::CpioError| RunError::Missing(format!("test host overlay: {e}"));
    let mut archive = Archive::new();
    // The test host kernel has virtio as modules; scripts/build-testhost
    // copies them to /lib/modules and this script loads them (in dependency
    // order; one that is built in or missing is skipped).
    let run = format!(
        "#!/bin/sh\n\
         for m in {VIRTIO_MODULES}; do\n\
         \x20 [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null\n\
         done\n\
         exec /{GUEST_BIN_DIR}/mvm __testhost-guest /{GUEST_IMAGE_DIR}\n"
    );
    archive
        .add_file("testhost/run", 0o755, run.into_bytes())
        .map_err(cpio)?;
    archive
        .add_file(&format!("{GUEST_BIN_DIR}/mvm"), 0o755, mvm.to_vec())
        .map_err(cpio)?;
    archive
        .add_file(&format!("{GUEST_BIN_DIR}/mvm-vmm"), 0o755, vmm.to_vec())
        .map_err(cpio)?;
    let manifest = read_file(&image.dir.join(MANIFEST_FILE))?;
    archive
        .add_file(
            &format!("{GUEST_IMAGE_DIR}/{MANIFEST_FILE}"),
            0o644,
            manifest,
        )
        .map_err(cpio)?;
    for artifact in [&image.manifest.kernel, &image.manifest.initramfs] {
        let bytes = read_file(&image.dir.join(&artifact.file))?;
        archive
            .add_file(
                &format!("{GUEST_IMAGE_DIR}/{}", artifact.file),
                0o644,
                bytes,
            )
            .map_err(cpio)?;
    }
    Ok(archive)
}

/// The test host's initramfs for this image and these binaries, built once
/// and cached under the digest of its inputs.
pub(super) fn testhost_initramfs(
    testhost: &Path,
    mvm: &Path,
    vmm: &Path,
    image: &StoredImage,
) -> Result<PathBuf, RunError> {
    let base = read_file(&testhost.join("base.cpio"))?;
    let mvm_bytes = read_file(mvm)?;
    let vmm_bytes = read_file(vmm)?;
    let mut key = Sha256::new();
    for part in [
        OVERLAY_FORMAT.as_bytes(),
        &Sha256::digest(&base),
        &Sha256::digest(&mvm_bytes),
        &Sha256::digest(&vmm_bytes),
        image.digest.as_bytes(),
    ] {
        key.update(Sha256::digest(part));
    }
    let key = hex::encode(key.finalize());
    let dir = cache_root()?.join("emulated");
    let path = dir.join(format!("{}.cpio", key.get(..32).unwrap_or(&key)));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(RunError::io(format!("creating {}", dir.display())))?;
    let overlay = overlay_archive(&mvm_bytes, &vmm_bytes, image)?
        .to_newc()
        .map_err(|e| RunError::Missing(format!("test host overlay: {e}")))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut bytes = base;
    bytes.extend_from_slice(&overlay);
    std::fs::write(&tmp, &bytes).map_err(RunError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(RunError::io(format!("writing {}", path.display())))?;
    prune_cache(&dir, &path);
    Ok(path)
}

/// How many test host initramfs files the cache keeps (each holds the image
/// and two binaries, tens of MiB).
const CACHE_KEEP: usize = 3;

/// Removes all but the [`CACHE_KEEP`] newest cached initramfs files.
/// A running QEMU has its file open already, so removal does not disturb it.
fn prune_cache(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpio") && p != keep)
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort();
    let surplus = files.len().saturating_sub(CACHE_KEEP.saturating_sub(1));
    for (_, path) in files.into_iter().take(surplus) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!("pruning {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_cache_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..5 {
            let p = dir.path().join(format!("{i}.cpio"));
            std::fs::write(&p, b"x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            paths.push(p);
        }
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        prune_cache(dir.path(), &paths[0]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // The one in use plus the two newest others; non-cpio files stay.
        assert_eq!(left, ["0.cpio", "3.cpio", "4.cpio", "other.txt"]);
    }

    #[test]
    fn overlay_carries_run_script_binaries_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = crate::image::build::tests::fake_inputs(dir.path());
        let store = crate::image::ImageStore::at(dir.path());
        let image = store
            .put("t", &crate::image::build(&inputs).unwrap())
            .unwrap();
        let bytes = overlay_archive(b"mvm", b"vmm", &image)
            .unwrap()
            .to_newc()
            .unwrap();
        let entries = crate::image::cpio::parse_newc(&bytes).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "testhost/run",
            "testhost/bin/mvm",
            "testhost/bin/mvm-vmm",
            "testhost/image/manifest.json",
            "testhost/image/vmlinux",
            "testhost/image/initramfs.cpio",
        ] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
        let run = entries.iter().find(|e| e.path == "testhost/run").unwrap();
        let crate::image::cpio::EntryKind::File(script) = &run.kind else {
            panic!("run is not a file");
        };
        let script = String::from_utf8(script.clone()).unwrap();
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert!(script.contains("insmod /lib/modules/$m.ko"), "{script}");
        assert!(script.contains("virtio_console"), "{script}");
        assert!(
            script.contains("exec /testhost/bin/mvm __testhost-guest /testhost/image\n"),
            "{script}"
        );
        // The carried image opens and verifies as the same digest.
        let out = dir.path().join("carried");
        std::fs::create_dir(&out).unwrap();
        for e in &entries {
            if let (Some(name), crate::image::cpio::EntryKind::File(data)) =
                (e.path.strip_prefix("testhost/image/"), &e.kind)
            {
                std::fs::write(out.join(name), data).unwrap();
            }
        }
        let carried = StoredImage::open_dir(&out).unwrap();
        assert_eq!(carried.digest, image.digest);
        carried.verify().unwrap();
    }
}
