//! `mvm image build|ls|inspect`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{ImageBuildArgs, ImageCommand};
use crate::backend::locate;
use crate::image::cpio::Archive;
use crate::image::{build, BuildInputs, ImageStore};

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
        ImageCommand::Build(args) => {
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
        ImageCommand::Ls => {
            println!(
                "{:<16} {:<19} {:>10} {:>10}",
                "NAME", "DIGEST", "KERNEL", "INITRAMFS"
            );
            for (image, names) in store.list()? {
                let short = image.digest.get(..19).unwrap_or(&image.digest).to_owned();
                let names = if names.is_empty() {
                    "-".to_owned()
                } else {
                    names.join(",")
                };
                println!(
                    "{:<16} {:<19} {:>10} {:>10}",
                    names,
                    short,
                    human(image.manifest.kernel.size),
                    human(image.manifest.initramfs.size)
                );
            }
        }
        ImageCommand::Inspect { reference } => {
            let image = store.resolve(reference)?;
            println!("digest: {}", image.digest);
            println!("dir:    {}", image.dir.display());
            match image.verify() {
                Ok(()) => println!("verify: ok (artifacts match the manifest)"),
                Err(e) => println!("verify: FAILED: {e}"),
            }
            let bytes = image.manifest.to_bytes()?;
            print!("{}", String::from_utf8_lossy(&bytes));
            image.verify()?;
        }
    }
    Ok(())
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
