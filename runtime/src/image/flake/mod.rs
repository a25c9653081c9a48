//! Nix flakes built into mvm images (`mvm image build --flake PATH#ATTR`).
//!
//! Host Nix is never used, and the host need not have it. The host copies the flake's
//! directory (bounded, no special files) onto the inputs disk; the Nix builder VM
//! (`images/nix-builder`: Debian 13's Nix 2.26, built by mvm in its builder VM,
//! admitted, verified and audited like any run, with no network) locks the flake when
//! asked, builds `ATTR`, and writes the output tree (and the rest of its closure under
//! `/nix/store`) as an EROFS filesystem; the host checks it, computes its dm-verity
//! tree and stores the image with the flake's locked inputs and the closure's store
//! paths in its manifest.
//!
//! An unlocked flake (no `flake.lock`) is refused unless `--lock` is given; the lock
//! made in the VM is then written beside `flake.nix`. The flake's inputs must be
//! reachable offline: path inputs inside the flake's directory.

pub mod lockfile;
pub mod source;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::assemble::{self, builder, inputs, output, AssembleError, AssembleOptions};
use super::manifest::{sha256_digest, Artifact, ImageConfig, ImageKind, Input, Manifest, NixBuild};
use super::{ImageError, ImageStore, StoredImage};

/// The in-guest build script.
pub const FLAKE_BUILD_SH: &str = include_str!("build.sh");
/// The version of the host's part of a flake build: part of the build cache's key.
pub const FLAKE_VERSION: u32 = 1;
/// How much of the Nix builder's memory the assembled tree may take.
const TARGET_MIB: u64 = 1024;
/// Where on the output disk the kernel of a kernel-plus-root-filesystem output goes
/// (past the largest filesystem image the tree can make).
const KERNEL_OFFSET_MIB: u64 = TARGET_MIB + 64;
/// The largest such kernel.
const KERNEL_MAX_MIB: u64 = 128;

/// Why a flake could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FlakeError {
    /// `PATH#ATTR` is not one.
    #[error("flake reference {0:?}: {1}")]
    Reference(String, &'static str),
    /// The flake's directory.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// The flake has no lock and none was asked for.
    #[error("{0}: the flake has no flake.lock; pass --lock to lock it (in the builder VM; the lock is written beside flake.nix)")]
    Unlocked(PathBuf),
    /// Its `flake.lock`, or what the builder reported.
    #[error(transparent)]
    Lock(#[from] lockfile::LockfileError),
    /// What the builder reported is not what it should be.
    #[error("the Nix builder's report: {0}")]
    Report(String),
    /// The builder VM or the store.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// The store.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FlakeError + '_ {
    move |source| FlakeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `PATH#ATTR`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef {
    /// The flake's directory (holding `flake.nix`).
    pub dir: PathBuf,
    /// The output to build (`rootfs`, `packages.x86_64-linux.rootfs`, ...).
    pub attr: String,
}

impl FlakeRef {
    /// Parses `PATH#ATTR`; `PATH` may name the directory or its `flake.nix`. The
    /// attribute is letters, digits and `._+-` only (it reaches a shell in the VM).
    pub fn parse(reference: &str) -> Result<Self, FlakeError> {
        let bad = |why| FlakeError::Reference(reference.chars().take(200).collect(), why);
        let (path, attr) = reference
            .rsplit_once('#')
            .ok_or_else(|| bad("expected PATH#ATTR"))?;
        if attr.is_empty()
            || attr.len() > 200
            || !attr
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
            || attr.starts_with(['.', '-'])
        {
            return Err(bad(
                "ATTR must be letters, digits and ._+- (an attribute path)",
            ));
        }
        let path = Path::new(if path.is_empty() { "." } else { path });
        let dir = if path.file_name().is_some_and(|n| n == "flake.nix") {
            path.parent().unwrap_or(Path::new(".")).to_owned()
        } else {
            path.to_owned()
        };
        Ok(Self {
            dir,
            attr: attr.to_owned(),
        })
    }
}

/// What `mvm image build --flake` is asked.
#[derive(Debug, Clone, Default)]
pub struct FlakeOptions {
    /// The name the image is stored under.
    pub name: String,
    /// Lock an unlocked flake (in the VM), writing `flake.lock` beside `flake.nix`.
    pub lock: bool,
    /// The builder VMs' backend, time limit, progress; `rebuild`.
    pub assemble: AssembleOptions,
}

/// What a flake build produced.
#[derive(Debug)]
pub struct BuiltFlake {
    /// The stored image.
    pub image: StoredImage,
    /// Whether the build cache had it.
    pub cached: bool,
    /// The lock written beside `flake.nix`, when one was made.
    pub wrote_lock: Option<PathBuf>,
}

/// `mvm image build --flake PATH#ATTR`.
pub fn build_flake(reference: &FlakeRef, options: &FlakeOptions) -> Result<BuiltFlake, FlakeError> {
    let lock_path = reference.dir.join("flake.lock");
    if !reference.dir.join("flake.nix").is_file() {
        return Err(FlakeError::Io {
            path: reference.dir.join("flake.nix"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no flake.nix here"),
        });
    }
    let locked = lock_path.exists();
    if !locked && !options.lock {
        return Err(FlakeError::Unlocked(reference.dir.clone()));
    }
    let store = ImageStore::open_default()?;
    let base = store.resolve(super::DEFAULT_IMAGE)?;
    let nix_builder = builder::ensure_nix(&options.assemble)?;
    // The key of a locked flake's build; an unlocked one is always built (its lock
    // is made in the VM).
    let digest = source::digest(&reference.dir)?;
    let key = {
        let mut key = Sha256::new();
        key.update(b"flake ");
        key.update(digest.as_bytes());
        key.update(reference.attr.as_bytes());
        key.update(base.digest.as_bytes());
        key.update(nix_builder.digest.as_bytes());
        key.update(FLAKE_BUILD_SH.as_bytes());
        key.update(FLAKE_VERSION.to_le_bytes());
        hex::encode(key.finalize())
    };
    if locked && !options.assemble.rebuild {
        if let Some(image) = assemble::from_build_cache(&store, &options.name, &key)? {
            assemble::say(&format!(
                "{}: built before from the same flake, base and builder (build cache)",
                options.name
            ));
            return Ok(BuiltFlake {
                image,
                cached: true,
                wrote_lock: None,
            });
        }
    }
    let work = assemble::WorkDir::claim(&key)?;
    let result = build_in(
        reference,
        options,
        &store,
        &base,
        &nix_builder,
        &digest,
        work.path(),
    );
    drop(work);
    let (image, made_lock) = result?;
    let wrote_lock = match made_lock {
        Some(bytes) => Some(write_lock(&lock_path, &bytes)?),
        None => None,
    };
    if locked {
        assemble::to_build_cache(&image, &key);
    }
    Ok(BuiltFlake {
        image,
        cached: false,
        wrote_lock,
    })
}

/// Writes the lock the VM made beside `flake.nix`, unless one appeared meanwhile.
fn write_lock(path: &Path, bytes: &[u8]) -> Result<PathBuf, FlakeError> {
    let tmp = path.with_extension(format!("lock.tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    // hard_link fails if the target exists: a lock written meanwhile is kept.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(io_err(path))?;
    Ok(path.to_owned())
}

/// The build in `work`: the image, and the lock the VM made (when it made one).
fn build_in(
    reference: &FlakeRef,
    options: &FlakeOptions,
    store: &ImageStore,
    base: &StoredImage,
    nix_builder: &StoredImage,
    digest: &str,
    work: &Path,
) -> Result<(StoredImage, Option<Vec<u8>>), FlakeError> {
    let stage = work.join("stage");
    let copied = source::copy(&reference.dir, &stage.join("flake"))?;
    if copied != digest {
        return Err(FlakeError::Report(format!(
            "{} changed while it was copied",
            reference.dir.display()
        )));
    }
    let uuid = inputs::uuid_from(format!("{digest} {}", reference.attr).as_bytes());
    let env = format!(
        "FLAKE_ATTR={}\nLOCK={}\nFS_UUID={uuid}\nTARGET_MIB={TARGET_MIB}\n\
         KERNEL_OFFSET_MIB={KERNEL_OFFSET_MIB}\nKERNEL_MAX_MIB={KERNEL_MAX_MIB}\n",
        reference.attr,
        u8::from(options.lock)
    );
    for (file, text) in [("build.sh", FLAKE_BUILD_SH), ("build.env", env.as_str())] {
        let path = stage.join(file);
        std::fs::write(&path, text).map_err(io_err(&path))?;
    }
    let inputs_disk = inputs::seal(&stage, work, 0)?;
    let out = work.join("output.img");
    let out_mib = u32::try_from(KERNEL_OFFSET_MIB + KERNEL_MAX_MIB).unwrap_or(u32::MAX);
    assemble::say(&format!(
        "building {}#{} in the Nix builder VM",
        reference.dir.display(),
        reference.attr
    ));
    let run = assemble::run_builder(
        nix_builder,
        &nix_builder.digest,
        &inputs_disk,
        &out,
        out_mib,
        &options.assemble,
    )?;
    let report = lockfile::Report::parse(&run.results)?;
    let (lock_bytes, made_lock) = match (&report.lock, reference.dir.join("flake.lock")) {
        (Some(made), _) => (made.clone(), Some(made.clone())),
        (None, path) => (std::fs::read(&path).map_err(io_err(&path))?, None),
    };
    let flake_inputs = lockfile::inputs(&lock_bytes)?;
    let len = output::erofs_len(&out)?;
    let kernel = match report.kernel_bytes {
        Some(size) => Some(read_kernel(&out, len, size, &work.join("vmlinux"))?),
        None => None,
    };
    let rootfs = work.join(assemble::ROOTFS_FILE);
    let verity = output::extract(&out, len, &rootfs, digest.trim_start_matches("sha256:"))?;
    let _ = std::fs::remove_file(&out);
    let nix = NixBuild {
        attr: reference.attr.clone(),
        source_sha256: digest.to_owned(),
        lock_sha256: sha256_digest(&lock_bytes),
        inputs: flake_inputs,
        out_path: report.out.clone(),
        closure: report.closure.clone(),
    };
    let mut manifest = manifest_for(base, nix_builder, nix, verity);
    if let Some((_, bytes)) = &kernel {
        manifest.kernel = Artifact::of(&base.manifest.kernel.file, bytes);
    }
    let stored = assemble::store_with_rootfs(
        store,
        &options.name,
        base,
        &manifest,
        &rootfs,
        kernel.as_ref().map(|(path, _)| path.as_path()),
    )?;
    assemble::record_build(&stored, &run.plan_id)?;
    Ok((stored, made_lock))
}

/// The kernel the VM wrote at [`KERNEL_OFFSET_MIB`] of the output disk: `size`
/// bytes, past the filesystem image (`erofs_len`), an ELF64 file; written to `dest`.
fn read_kernel(
    out: &Path,
    erofs_len: u64,
    size: u64,
    dest: &Path,
) -> Result<(PathBuf, Vec<u8>), FlakeError> {
    let offset = KERNEL_OFFSET_MIB << 20;
    if erofs_len > offset {
        return Err(FlakeError::Report(format!(
            "the filesystem image ({erofs_len} bytes) runs into the kernel at {offset}"
        )));
    }
    if size > KERNEL_MAX_MIB << 20 {
        return Err(FlakeError::Report(format!(
            "a kernel of {size} bytes (at most {KERNEL_MAX_MIB} MiB)"
        )));
    }
    let file = std::fs::File::open(out).map_err(io_err(out))?;
    let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(0)];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, offset).map_err(io_err(out))?;
    crate::image::elf::check_elf64(&bytes)
        .map_err(|e| FlakeError::Report(format!("the flake's vmlinux: {e}")))?;
    std::fs::write(dest, &bytes).map_err(io_err(dest))?;
    Ok((dest.to_owned(), bytes))
}

fn manifest_for(
    base: &StoredImage,
    nix_builder: &StoredImage,
    nix: NixBuild,
    verity: mvm_loader::verity::VerityParams,
) -> Manifest {
    let cmdline = format!("{} {}", base.manifest.cmdline, assemble::ROOT_CMDLINE);
    let mut inputs = vec![
        Input {
            name: "base-image".into(),
            sha256: base.digest.clone(),
            version: None,
        },
        Input {
            name: "nix-builder-image".into(),
            sha256: nix_builder.digest.clone(),
            version: None,
        },
        Input {
            name: "flake:source".into(),
            sha256: nix.source_sha256.clone(),
            version: Some(nix.attr.clone()),
        },
        Input {
            name: "flake:lock".into(),
            sha256: nix.lock_sha256.clone(),
            version: None,
        },
    ];
    inputs.extend(nix.inputs.iter().filter_map(|i| {
        Some(Input {
            name: format!("flake-input:{}", i.name),
            sha256: lockfile::nar_hash_digest(i.nar_hash.as_deref()?)?,
            version: Some(match &i.rev {
                Some(rev) => format!("{} {rev}", i.kind),
                None => i.kind.clone(),
            }),
        })
    }));
    assemble::rootfs_manifest(
        base,
        cmdline,
        inputs,
        verity,
        None,
        ImageConfig {
            nix: Some(nix),
            kind: ImageKind::Workload,
            ..ImageConfig::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_path_hash_attr() {
        let r = FlakeRef::parse("./my/flake#rootfs").unwrap();
        assert_eq!(r.dir, PathBuf::from("./my/flake"));
        assert_eq!(r.attr, "rootfs");
        let r = FlakeRef::parse("/x/flake.nix#packages.x86_64-linux.default").unwrap();
        assert_eq!(r.dir, PathBuf::from("/x"));
        assert_eq!(FlakeRef::parse("#rootfs").unwrap().dir, PathBuf::from("."));
        for bad in [
            "./flake",
            "./f#",
            "./f#a b",
            "./f#$(reboot)",
            "./f#a;b",
            "./f#-x",
            "./f#a\"b",
        ] {
            assert!(FlakeRef::parse(bad).is_err(), "{bad}");
        }
    }
}
