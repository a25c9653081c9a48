//! `mvm image build|ls|inspect`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{ImageBuildArgs, ImageCommand, ImageImportArgs};
use crate::backend::locate;
use crate::image::assemble;
use crate::image::cpio::Archive;
use crate::image::flake::{self, FlakeOptions, FlakeRef};
use crate::image::oci::{self, ImportOptions};
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
        ImageCommand::Build(args) if args.flake.is_some() => build_flake(args)?,
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
        ImageCommand::Import(args) => import(args)?,
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

/// An image's root hash and root filesystem size ("" and 0 without one).
fn root_of(image: &crate::image::StoredImage) -> (String, u64) {
    image
        .manifest
        .rootfs
        .as_ref()
        .map_or((String::new(), 0), |r| {
            (r.verity.root_hash.to_string(), r.verity.data_size)
        })
}

fn build_flake(args: &ImageBuildArgs) -> anyhow::Result<()> {
    let reference = FlakeRef::parse(args.flake.as_deref().unwrap_or_default())?;
    if args.name == crate::image::DEFAULT_IMAGE {
        bail!("--flake needs --name NAME (the name to store the image under)");
    }
    crate::image::store::check_name(&args.name)?;
    let options = FlakeOptions {
        name: args.name.clone(),
        lock: args.lock,
        assemble: args.builder.options(),
    };
    let started = std::time::Instant::now();
    let built = flake::build_flake(&reference, &options).with_context(|| {
        format!(
            "building flake {}",
            args.flake.as_deref().unwrap_or_default()
        )
    })?;
    let image = &built.image;
    let (root_hash, size) = root_of(image);
    let nix = image.manifest.config.as_ref().and_then(|c| c.nix.as_ref());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "name": args.name,
                "digest": image.digest,
                "cached": built.cached,
                "root_hash": root_hash,
                "rootfs_bytes": size,
                "wrote_lock": built.wrote_lock,
                "nix": nix,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        if let Some(lock) = &built.wrote_lock {
            eprintln!("mvm: locked the flake: {}", lock.display());
        }
        eprintln!(
            "mvm: image {} {} from {}: root filesystem {}, root hash {root_hash} ({:.0} s)",
            args.name,
            if built.cached {
                "already built"
            } else {
                "built"
            },
            args.flake.as_deref().unwrap_or_default(),
            human(size),
            started.elapsed().as_secs_f64()
        );
        println!("{}", image.digest);
    }
    Ok(())
}

fn build_spec(path: &Path, args: &ImageBuildArgs) -> anyhow::Result<()> {
    let options = args.builder.options();
    let started = std::time::Instant::now();
    let built = assemble::build_spec(path, &options)?;
    let image = &built.image;
    let (root_hash, size) = root_of(image);
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

fn import(args: &ImageImportArgs) -> anyhow::Result<()> {
    crate::image::store::check_name(&args.name)?;
    let options = ImportOptions {
        name: args.name.clone(),
        assemble: args.builder.options(),
        limits: crate::image::deb::Limits::default(),
    };
    let started = std::time::Instant::now();
    let imported = oci::import(&args.path, &options)
        .with_context(|| format!("importing {}", args.path.display()))?;
    let image = &imported.image;
    let (root_hash, size) = root_of(image);
    let source = &imported.source;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "name": args.name,
                "digest": image.digest,
                "cached": imported.cached,
                "format": source.format.name(),
                "source_digest": source.digest,
                "layers": source.layers.len(),
                "root_hash": root_hash,
                "rootfs_bytes": size,
                "user": image.manifest.config.as_ref().and_then(|c| c.user.clone()),
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        eprintln!(
            "mvm: image {} {} from {} {} ({} layers): root filesystem {}, root hash {root_hash} ({:.0} s)",
            args.name,
            if imported.cached { "already imported" } else { "imported" },
            source.format.name(),
            source.digest,
            source.layers.len(),
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
    if let Some(c) = &m.config {
        if !c.entrypoint.is_empty() {
            println!("entrypoint: {:?}", c.entrypoint);
        }
        if !c.cmd.is_empty() {
            println!("cmd:       {:?}", c.cmd);
        }
        if let Some(w) = &c.workdir {
            println!("workdir:   {w}");
        }
        if let Some(u) = &c.user {
            println!("user:      {u}");
        }
        if let Some(n) = &c.nix {
            println!(
                "flake:     #{} (source {}, flake.lock {})",
                n.attr, n.source_sha256, n.lock_sha256
            );
            println!("out path:  {}", n.out_path);
            println!("closure:   {} store paths", n.closure.len());
        }
        for (k, v) in &c.env {
            println!("env:       {k}={v}");
        }
    }
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
