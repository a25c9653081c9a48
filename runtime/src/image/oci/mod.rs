//! OCI images and `docker save` archives imported as mvm images (`mvm image import`).
//!
//! 1. [`archive`] finds the image in the archive (an OCI image layout, as a
//!    directory or a tar, or a `docker save` tar) and checks the manifest, the
//!    config and every layer against their digests and `diff_id`s.
//! 2. [`layers`] applies the layers in order on the host, in Rust that executes
//!    nothing and writes only into its own spool directory: whiteouts and opaque
//!    directories honoured, every entry checked (no `..`, no write through a
//!    symlink, no hard link out of the tree, no device node, bounded sizes), and the
//!    merged tree written as one tar.
//! 3. The builder VM (the same one, under the same admission and audit, as for
//!    images from a spec) turns that tar into an EROFS filesystem with `mkfs.erofs
//!    --tar`; the host checks it and computes its dm-verity tree, and the store gets
//!    an image like any other: the base image's kernel and initramfs, the root disk,
//!    and a manifest that records the archive's digests and the image's
//!    `Entrypoint`, `Cmd`, `Env`, `WorkingDir` and `User`.
//!
//! | module | job |
//! |---|---|
//! | [`archive`] | the archive read: manifest, config and layers found and checked by digest |
//! | [`layers`] | the layers applied in order into one tar stream (never onto the host) |
//! | [`user`] | the config's `User` resolved against the image's own `/etc/passwd` and `/etc/group` |

pub mod archive;
pub mod layers;
pub mod user;

use std::path::Path;

use sha2::{Digest, Sha256};

use self::archive::{Archive, ArchiveError, Image};
use self::layers::{LayerError, LayerTree};
use super::assemble::{self, builder, inputs, output, AssembleError, AssembleOptions};
use super::deb::Limits;
use super::manifest::{ImageConfig, ImageKind, Input, Manifest};
use super::{ImageError, ImageStore, StoredImage};

/// The in-guest script that writes the root filesystem.
pub const OCI_BUILD_SH: &str = include_str!("build.sh");
/// The version of the host's part of an import (the layer merge, the tar it writes,
/// the manifest): part of the build cache's key.
pub const IMPORT_VERSION: u32 = 1;

/// Why an archive could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The archive, its documents or a layer's digest.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A layer entry refused.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The config's `User` names no user of the image.
    #[error(transparent)]
    User(#[from] user::UserError),
    /// The builder VM or the store.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// The store.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The work directory.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `mvm image import` is asked.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The name the image is stored under.
    pub name: String,
    /// The builder VM's backend, time limit, progress.
    pub assemble: AssembleOptions,
    /// Bounds on the layers.
    pub limits: Limits,
}

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    /// The stored image.
    pub image: StoredImage,
    /// The image as the archive describes it.
    pub source: Image,
    /// Whether the build cache had it.
    pub cached: bool,
}

/// The build cache's key of an import: the image, the base and builder images and
/// the host and guest code that turn one into the other.
fn cache_key(image: &Image, base: &StoredImage, builder: &StoredImage) -> String {
    let mut key = Sha256::new();
    key.update(b"oci ");
    key.update(image.digest.as_bytes());
    key.update(base.digest.as_bytes());
    key.update(builder.digest.as_bytes());
    key.update(OCI_BUILD_SH.as_bytes());
    key.update(IMPORT_VERSION.to_le_bytes());
    hex::encode(key.finalize())
}

/// `mvm image import PATH`: the image in the archive at `path`, checked, merged on
/// the host, turned into a root disk in the builder VM, and stored as
/// `options.name`.
pub fn import(path: &Path, options: &ImportOptions) -> Result<Imported, ImportError> {
    let archive = Archive::open(path)?;
    let image = archive.image()?;
    let store = ImageStore::open_default()?;
    let base = store.resolve(super::DEFAULT_IMAGE)?;
    let builder = builder::ensure(&options.assemble)?;
    let key = cache_key(&image, &base, &builder);
    if !options.assemble.rebuild {
        if let Some(stored) = assemble::from_build_cache(&store, &options.name, &key)? {
            assemble::say(&format!(
                "{}: imported before from the same image, base and builder (build cache)",
                options.name
            ));
            return Ok(Imported {
                image: stored,
                source: image,
                cached: true,
            });
        }
    }
    let work = assemble::WorkDir::claim(&key)?;
    let result = import_in(
        &archive,
        &image,
        &store,
        &base,
        &builder,
        options,
        work.path(),
    );
    drop(work);
    let stored = result?;
    assemble::to_build_cache(&stored, &key);
    Ok(Imported {
        image: stored,
        source: image,
        cached: false,
    })
}

fn import_in(
    archive: &Archive,
    image: &Image,
    store: &ImageStore,
    base: &StoredImage,
    builder: &StoredImage,
    options: &ImportOptions,
    work: &Path,
) -> Result<StoredImage, ImportError> {
    let spool = work.join("spool");
    let stage = work.join("stage");
    for dir in [&spool, &stage] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut tree = LayerTree::new(&spool, options.limits);
    for (n, layer) in image.layers.iter().enumerate() {
        assemble::say(&format!(
            "layer {}/{}: {}",
            n + 1,
            image.layers.len(),
            layer.name()
        ));
        let compression = archive.verify_layer(layer, options.limits.max_total_bytes)?;
        tree.apply(layer.name(), archive.open_layer(layer)?, compression)?;
    }
    let (uid, gid) = user::resolve(image.run.user.as_deref(), &tree)?;
    let tar_path = stage.join("rootfs.tar");
    let file = std::fs::File::create(&tar_path).map_err(io_err(&tar_path))?;
    let stats = tree.write_tar(std::io::BufWriter::new(file), u64::MAX)?;
    drop(tree);
    let _ = std::fs::remove_dir_all(&spool);
    let uuid = inputs::uuid_from(image.digest.as_bytes());
    for (file, text) in [
        ("build.sh", OCI_BUILD_SH.to_owned()),
        ("build.env", format!("FS_UUID={uuid}\n")),
    ] {
        let path = stage.join(file);
        std::fs::write(&path, text).map_err(io_err(&path))?;
    }
    let inputs_disk = inputs::seal(&stage, work, 0)?;
    // EROFS is smaller than the tar; the margin covers metadata of tiny files.
    let out_mib =
        u32::try_from((stats.bytes + stats.bytes / 4) / (1 << 20) + 64 + stats.entries / 256)
            .unwrap_or(u32::MAX);
    let out = work.join("output.img");
    assemble::say(&format!(
        "writing {}'s root filesystem in a builder VM ({} entries, {} MiB)",
        options.name,
        stats.entries,
        stats.bytes.div_ceil(1 << 20)
    ));
    let plan_id = assemble::run_builder(
        builder,
        &builder.digest,
        &inputs_disk,
        &out,
        out_mib,
        &options.assemble,
    )?
    .plan_id;
    let len = output::erofs_len(&out)?;
    let rootfs = work.join(assemble::ROOTFS_FILE);
    let salt_seed = image.digest.trim_start_matches("sha256:");
    let verity = output::extract(&out, len, &rootfs, salt_seed)?;
    let _ = std::fs::remove_file(&out);
    let manifest = manifest_for(image, base, builder, uid, gid, verity);
    let stored = assemble::store_with_rootfs(store, &options.name, base, &manifest, &rootfs, None)?;
    assemble::record_build(&stored, &plan_id)?;
    Ok(stored)
}

/// The command line words that make the agent run workloads as `uid:gid`.
fn user_cmdline(uid: u32, gid: u32) -> String {
    let mut words = format!("mvm.agent.uid={uid} mvm.agent.gid={gid}");
    if uid == 0 || gid == 0 {
        words.push_str(" mvm.agent.allow_root=1");
    }
    words
}

/// The manifest of an imported image.
fn manifest_for(
    image: &Image,
    base: &StoredImage,
    builder: &StoredImage,
    uid: u32,
    gid: u32,
    verity: mvm_loader::verity::VerityParams,
) -> Manifest {
    let cmdline = format!(
        "{} {} {}",
        base.manifest.cmdline,
        assemble::ROOT_CMDLINE,
        user_cmdline(uid, gid)
    );
    let mut inputs = vec![
        Input {
            name: "base-image".into(),
            sha256: base.digest.clone(),
            version: None,
        },
        Input {
            name: "builder-image".into(),
            sha256: builder.digest.clone(),
            version: None,
        },
        Input {
            name: format!("{}:image", image.format.name()),
            sha256: image.digest.clone(),
            version: None,
        },
        Input {
            name: "oci:config".into(),
            sha256: image.config_digest.clone(),
            version: None,
        },
    ];
    inputs.extend(image.layers.iter().enumerate().map(|(n, l)| Input {
        name: format!("oci:layer:{n}"),
        sha256: l.diff_id.clone(),
        version: None,
    }));
    assemble::rootfs_manifest(
        base,
        cmdline,
        inputs,
        verity,
        None,
        ImageConfig {
            env: image.run.env.clone(),
            workdir: image.run.workdir.clone(),
            cmd: image.run.cmd.clone(),
            entrypoint: image.run.entrypoint.clone(),
            user: Some(format!("{uid}:{gid}")),
            nix: None,
            kind: ImageKind::Workload,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_needs_the_agent_to_allow_it() {
        assert_eq!(
            user_cmdline(1000, 1000),
            "mvm.agent.uid=1000 mvm.agent.gid=1000"
        );
        assert!(user_cmdline(0, 0).ends_with("mvm.agent.allow_root=1"));
        assert!(user_cmdline(1000, 0).ends_with("mvm.agent.allow_root=1"));
    }
}
