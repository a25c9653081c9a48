//! `mvm image build|ls|inspect`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{ImageBuildArgs, ImageCommand};
use crate::backend::locate;
use crate::image::assemble::{self, AssembleOptions};
use crate::image::cpio::Archive;
use crate::image::{build, lock, spec, BuildInputs, ImageStore};

/// The kernel to build with: `--kernel`, else `$MVM_KERNEL`, else the
/// `vmlinux` in the directory `scripts/build-kernel` prints.
fn kernel_path(args: &ImageBuildArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.kernel {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("MVM_KERNEL").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let dir = locate::run_build_script("build-kernel")
        .context("no --kernel given and scripts/build-kernel did not provide one")?;
    Ok(dir.join("vmlinux"))
}

/// The agent to build with: `--agent`, else `$MVM_AGENT`, else the
/// `mvm-agent` beside this `mvm`.
fn agent_path(args: &ImageBuildArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.agent {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("MVM_AGENT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("mvm-agent")))
        .filter(|p| p.is_file());
    match beside {
        Some(path) => Ok(path),
        None => bail!(
            "no --agent given and no mvm-agent beside mvm: build a static one \
             (scripts/build-image does) or pass --agent"
        ),
    }
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB {
        format!("{}.{} MiB", bytes / MIB, (bytes % MIB) * 10 / MIB)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Runs an image command.
pub fn main(command: &ImageCommand) -> anyhow::Result<()> {
    let store = ImageStore::open_default()?;
    match command {
        ImageCommand::Build(args) => match &args.path {
            Some(path) => build_spec(path, args)?,
            None => {
                let inputs = BuildInputs {
                    kernel: kernel_path(args)?,
                    agent: agent_path(args)?,
                    busybox: args.busybox.clone(),
                    cmdline: args.cmdline.clone(),
                };
                let image = build(&inputs)?;
                let stored = store.put(&args.name, &image)?;
                eprintln!(
                    "mvm: image {} built: kernel {}, initramfs {} ({})",
                    args.name,
                    human(stored.manifest.kernel.size),
                    human(stored.manifest.initramfs.size),
                    stored.dir.display()
                );
                println!("{}", stored.digest);
            }
        },
        ImageCommand::Lock { path, json } => {
            let spec = spec::load(path)?;
            let made = lock::lock(&spec, &|s| eprintln!("mvm: {s}"))?;
            let (written, bytes) = lock::write(&spec, &made)?;
            let digest = lock::Lock::digest_of(&bytes);
            let total: u64 = made.packages.iter().map(|p| p.size).sum();
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "lock": written,
                        "lock_sha256": digest,
                        "packages": made.packages.len(),
                        "package_bytes": total,
                        "source_date_epoch": made.source_date_epoch,
                    })
                );
            } else {
                eprintln!(
                    "mvm: locked {} packages ({}) into {}",
                    made.packages.len(),
                    human(total),
                    written.display()
                );
                println!("sha256:{digest}");
            }
        }
        ImageCommand::Ls { json } => list(&store, *json)?,
        ImageCommand::Inspect { reference, json } => {
            let image = store.resolve(reference)?;
            let checked = image.verify();
            if *json {
                let mut value = serde_json::to_value(&image.manifest)?;
                if let Some(map) = value.as_object_mut() {
                    map.insert("digest".into(), image.digest.clone().into());
                    map.insert("verified".into(), checked.is_ok().into());
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                inspect(&image, &checked);
            }
            checked?;
        }
        ImageCommand::Rm { name } => {
            let removed = store.remove_name(name)?;
            match removed {
                Some(digest) => eprintln!("mvm: removed {name} and image {digest}"),
                None => eprintln!("mvm: removed {name} (its image has other names)"),
            }
        }
        ImageCommand::Gc { json } => {
            let removed = store.gc()?;
            if *json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else {
                for digest in &removed {
                    println!("{digest}");
                }
                eprintln!("mvm: removed {} unnamed images", removed.len());
            }
        }
    }
    Ok(())
}

fn build_spec(path: &Path, args: &ImageBuildArgs) -> anyhow::Result<()> {
    let options = AssembleOptions {
        backend: args.backend,
        timeout_secs: args.timeout,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        rebuild: args.rebuild,
    };
    let started = std::time::Instant::now();
    let built = assemble::build_spec(path, &options)?;
    let image = &built.image;
    let root_hash = image
        .manifest
        .rootfs
        .as_ref()
        .map(|r| r.verity.root_hash.to_string())
        .unwrap_or_default();
    let size = image
        .manifest
        .rootfs
        .as_ref()
        .map_or(0, |r| r.verity.data_size);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "digest": image.digest,
                "cached": built.cached,
                "root_hash": root_hash,
                "rootfs_bytes": size,
                "fetched_bytes": built.fetched_bytes,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        eprintln!(
            "mvm: image {} {}: root filesystem {}, root hash {root_hash} ({:.0} s)",
            path.display(),
            if built.cached {
                "already built"
            } else {
                "built"
            },
            human(size),
            started.elapsed().as_secs_f64()
        );
        println!("{}", image.digest);
    }
    Ok(())
}

fn list(store: &ImageStore, json: bool) -> anyhow::Result<()> {
    let images = store.list()?;
    if json {
        let rows: Vec<_> = images
            .iter()
            .map(|(image, names)| {
                serde_json::json!({
                    "digest": image.digest,
                    "names": names,
                    "kernel_bytes": image.manifest.kernel.size,
                    "initramfs_bytes": image.manifest.initramfs.size,
                    "rootfs_bytes": image.manifest.rootfs.as_ref().map(|r| r.verity.data_size),
                    "root_hash": image.manifest.rootfs.as_ref().map(|r| r.verity.root_hash.to_string()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<19} {:>10} {:>10} {:>10}",
        "NAME", "DIGEST", "KERNEL", "INITRAMFS", "ROOTFS"
    );
    for (image, names) in images {
        let short = image.digest.get(..19).unwrap_or(&image.digest).to_owned();
        let names = if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(",")
        };
        let rootfs = image
            .manifest
            .rootfs
            .as_ref()
            .map_or_else(|| "-".to_owned(), |r| human(r.verity.data_size));
        println!(
            "{:<16} {:<19} {:>10} {:>10} {:>10}",
            names,
            short,
            human(image.manifest.kernel.size),
            human(image.manifest.initramfs.size),
            rootfs
        );
    }
    Ok(())
}

fn inspect(image: &crate::image::StoredImage, checked: &Result<(), crate::image::ImageError>) {
    let m = &image.manifest;
    println!("digest:    {}", image.digest);
    println!("dir:       {}", image.dir.display());
    println!("kernel:    {} {}", human(m.kernel.size), m.kernel.sha256);
    println!(
        "initramfs: {} {}",
        human(m.initramfs.size),
        m.initramfs.sha256
    );
    if let Some(r) = &m.rootfs {
        println!(
            "rootfs:    {} {} ({})",
            human(r.verity.data_size),
            r.file,
            r.fstype
        );
        println!("root hash: {}", r.verity.root_hash);
    }
    if let Some(lock) = &m.lock_sha256 {
        println!("lock:      sha256:{lock}");
    }
    println!("cmdline:   {}", m.cmdline);
    match checked {
        Ok(()) => println!("verify:    ok (artifacts match the manifest)"),
        Err(e) => println!("verify:    FAILED: {e}"),
    }
    println!("inputs:    {}", m.inputs.len());
    for input in &m.inputs {
        println!(
            "  {:<40} {:<28} {}",
            input.name,
            input.version.as_deref().unwrap_or("-"),
            input.sha256
        );
    }
}

/// `mvm __cpio [--dev-console] DIR OUT`: DIR's tree as a newc archive at OUT,
/// written whole or not at all.
pub fn write_cpio(dir: &Path, out: &Path, dev_console: bool) -> anyhow::Result<()> {
    let mut archive = Archive::new();
    archive.add_tree(dir)?;
    if dev_console {
        archive.add_char_dev("dev/console", 0o600, 5, 1)?;
    }
    let bytes = archive.to_newc()?;
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
