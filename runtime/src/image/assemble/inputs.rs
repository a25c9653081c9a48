//! The builder VM's inputs disk: every pinned `.deb` (checked), the essential set
//! unpacked by [`crate::image::deb`] into one tar stream, the host files, the build
//! steps and the in-guest script, as a read-only ext4 image pinned by its dm-verity
//! tree. Made with `mke2fs -d` from a staging directory holding only files this code
//! wrote (no path from a package ever reaches the host's filesystem).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use mvm_loader::plan::PinnedDisk;
use mvm_loader::verity::{build_tree, BuildOptions, Salt, TREE_SUFFIX};

use super::AssembleError;
use crate::image::deb::{self, Limits, TreeOptions, TreeWriter};
use crate::image::lock::{Lock, LockedPackage};
use crate::image::spec::{self, LoadedSpec};
use crate::run::PinnedFile;

/// The in-guest assembly script.
pub const BUILD_SH: &str = include_str!("build.sh");

/// The filesystem UUID of every inputs disk (so its bytes depend on its content only).
const INPUTS_UUID: &str = "6d766d00-696e-7075-7473-000000000001";

/// A staged inputs disk.
#[derive(Debug)]
pub struct InputsDisk {
    /// The ext4 image, pinned.
    pub disk: PinnedFile,
    /// Bytes of all packages.
    pub package_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Hard-links `src` to `dst` (same filesystem), else copies it.
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), AssembleError> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map(|_| ()).map_err(io_err(dst))
}

/// Reads and checks one `.deb` against its lock entry; with `tree`, its data goes
/// into the essential set's tar stream, else through the same checks into nothing.
fn check_deb<W: std::io::Write>(
    package: &LockedPackage,
    path: &Path,
    tree: Option<&mut TreeWriter<W>>,
    options: &TreeOptions,
) -> Result<(), AssembleError> {
    let label = format!("{} {}", package.name, package.version);
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let deb_err = |source: deb::DebError| AssembleError::Deb {
        package: label.clone(),
        source,
    };
    let opened = deb::open_deb(&bytes, &options.limits).map_err(deb_err)?;
    let field = |name: &str| opened.control.fields.get(name).cloned().unwrap_or_default();
    if field("Package") != package.name || field("Version") != package.version {
        return Err(AssembleError::PackageMismatch {
            package: label.clone(),
            found: format!("{} {}", field("Package"), field("Version")),
        });
    }
    match tree {
        Some(tree) => tree.add_deb(&package.name, &opened).map(|_| ()),
        None => {
            let mut alone = TreeWriter::new(std::io::sink(), *options).map_err(io_err(path))?;
            alone
                .add_deb(&package.name, &opened)
                .and_then(|_| alone.finish().map(|_| ()))
        }
    }
    .map_err(deb_err)
}

/// Stages everything under `work/stage` and makes `work/inputs.ext4` (with its tree).
pub fn stage(
    spec: &LoadedSpec,
    lock: &Lock,
    debs: &[(LockedPackage, PathBuf)],
    target_mib: u64,
    work: &Path,
    progress: &dyn Fn(&str),
) -> Result<InputsDisk, AssembleError> {
    let stage = work.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    for dir in [stage.join("debs"), stage.join("files")] {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let options = TreeOptions {
        source_date_epoch: lock.source_date_epoch,
        merged_usr: true,
        limits: Limits::default(),
    };
    // The essential set, unpacked (checked) into base.tar; every other package
    // checked the same way, its data discarded.
    let base_path = stage.join("base.tar");
    let base = std::fs::File::create(&base_path).map_err(io_err(&base_path))?;
    let mut tree =
        TreeWriter::new(std::io::BufWriter::new(base), options).map_err(io_err(&base_path))?;
    let (mut essential, mut rest) = (String::new(), String::new());
    let mut package_bytes = 0u64;
    for (n, (package, path)) in debs.iter().enumerate() {
        progress(&format!("checking {} {}", package.name, package.version));
        let name = format!("{n:04}_{}.deb", package.name);
        link_or_copy(path, &stage.join("debs").join(&name))?;
        package_bytes = package_bytes.saturating_add(package.size);
        if package.essential {
            check_deb(package, path, Some(&mut tree), &options)?;
            let _ = writeln!(essential, "{name}");
        } else {
            check_deb::<std::io::Sink>(package, path, None, &options)?;
            let _ = writeln!(rest, "{name}");
        }
    }
    tree.finish().map_err(|source| AssembleError::Deb {
        package: "the essential set".into(),
        source,
    })?;
    // Host files, checked against the lock.
    let mut files = String::new();
    for (n, (entry, locked)) in spec.spec.files.iter().zip(&lock.files).enumerate() {
        let src = spec.dir().join(&entry.src);
        let (sha256, _) = crate::image::lock::file_digest(&src)?;
        if sha256 != locked.sha256 || entry.src != locked.src {
            return Err(AssembleError::Lock(
                crate::image::lock::LockError::FileChanged {
                    src: entry.src.clone(),
                    lock: spec.lock_path(),
                    now: sha256,
                    locked: locked.sha256.clone(),
                },
            ));
        }
        let dst = stage.join("files").join(n.to_string());
        std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
        let mode = entry
            .mode
            .as_deref()
            .and_then(spec::parse_mode)
            .unwrap_or(0o644);
        let _ = writeln!(files, "{n} {mode:o} {}", entry.dst);
    }
    let mut steps = String::new();
    for step in &spec.spec.image.build {
        let _ = writeln!(steps, "{step}");
    }
    let env = format!(
        "SOURCE_DATE_EPOCH={}\nFS_UUID={}\nTARGET_MIB={target_mib}\n",
        lock.source_date_epoch,
        fs_uuid(lock)
    );
    for (file, text) in [
        ("essential.list", essential.as_str()),
        ("rest.list", rest.as_str()),
        ("files.list", files.as_str()),
        ("steps.sh", steps.as_str()),
        ("build.env", env.as_str()),
        ("build.sh", BUILD_SH),
    ] {
        let path = stage.join(file);
        std::fs::write(&path, text).map_err(io_err(&path))?;
    }
    progress("making the inputs disk");
    let disk = seal(&stage, work, lock.source_date_epoch)?;
    Ok(InputsDisk {
        disk,
        package_bytes,
    })
}

/// The staged directory `stage` made into the read-only ext4 inputs disk
/// `work/inputs.ext4` (its files' times `epoch`), pinned by its dm-verity tree; the
/// staged directory is removed.
pub fn seal(stage: &Path, work: &Path, epoch: u64) -> Result<PinnedFile, AssembleError> {
    let disk = work.join("inputs.ext4");
    make_ext4(stage, &disk, epoch)?;
    let _ = std::fs::remove_dir_all(stage);
    let mut tree_path = disk.clone().into_os_string();
    tree_path.push(TREE_SUFFIX);
    let verity = build_tree(
        &disk,
        Path::new(&tree_path),
        &BuildOptions::new(Salt(vec![0x69; 32])),
    )
    .map_err(|e| AssembleError::Tool {
        tool: "dm-verity tree",
        reason: e.to_string(),
    })?;
    Ok(PinnedFile {
        path: disk,
        pin: PinnedDisk {
            name: "inputs".into(),
            verity,
        },
    })
}

/// The root filesystem's UUID: derived from the spec's digest, so equal locks give
/// equal bytes.
pub fn fs_uuid(lock: &Lock) -> String {
    uuid_from(lock.spec_sha256.as_bytes())
}

/// A filesystem UUID derived from `seed` (equal seeds, equal UUIDs).
pub fn uuid_from(seed: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"mvm rootfs uuid ");
    h.update(seed);
    let h = hex::encode(h.finalize());
    let part = |a: usize, b: usize| h.get(a..b).unwrap_or("0").to_owned();
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}

/// Total bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// `mke2fs -d STAGE` into `disk`, sized to fit, with fixed UUID, hash seed and time.
fn make_ext4(stage: &Path, disk: &Path, epoch: u64) -> Result<(), AssembleError> {
    let bytes = tree_bytes(stage);
    let mib = (bytes + bytes / 8) / (1 << 20) + 32;
    let _ = std::fs::remove_file(disk);
    let output = Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal"])
        .args(["-L", "mvm-inputs", "-U", INPUTS_UUID])
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={INPUTS_UUID}"))
        .arg("-d")
        .arg(stage)
        .arg(disk)
        .arg(format!("{mib}M"))
        .output()
        .map_err(|e| AssembleError::Tool {
            tool: "mke2fs",
            reason: format!("{e} (install e2fsprogs)"),
        })?;
    if !output.status.success() {
        return Err(AssembleError::Tool {
            tool: "mke2fs",
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
