//! The built-in image builder (no Nix): a pinned kernel, and an initramfs
//! with the static `mvm-agent` as `/init` and Debian's static busybox.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::Archive;
use super::elf;
use super::manifest::{sha256_digest, Artifact, Input, Manifest, MANIFEST_SCHEMA};
use super::ImageError;

/// The vsock port the guest agent serves its RPC protocol on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The default guest command line: serial console, quiet (every console
/// line costs time under emulation), reset through the i8042 line, a kernel
/// panic ends the VM at once instead of hanging it, and `no_timer_check`:
/// the kernel's IO-APIC timer check waits for PIT ticks to arrive within a
/// few milliseconds, which guests booting side by side on a busy CPU miss;
/// measured in the test host, four boots at once stalled it for minutes
/// without it and reached userspace in 15 s with it (docs/e2e.md). On an idle
/// host the check passes, so the timer works: it only misfires under load.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet no_timer_check";
/// File names inside an image directory.
pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// Where busybox lives in the guest; applets are symlinks to it.
const GUEST_BUSYBOX: &str = "/bin/busybox";

/// The pinned inputs of the default image.
#[derive(Debug, Clone)]
pub struct BuildInputs {
    /// The guest kernel, an ELF vmlinux (from `scripts/build-kernel`).
    pub kernel: PathBuf,
    /// The static `mvm-agent` binary, installed as `/init`.
    pub agent: PathBuf,
    /// Debian's `busybox-static` binary.
    pub busybox: PathBuf,
    /// The kernel command line; [`DEFAULT_CMDLINE`] when `None`.
    pub cmdline: Option<String>,
}

/// An image in memory, before it is stored.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The manifest describing the two artifacts below.
    pub manifest: Manifest,
    /// The kernel bytes.
    pub kernel: Vec<u8>,
    /// The initramfs bytes.
    pub initramfs: Vec<u8>,
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The applet paths busybox installs itself under (`busybox --list-full`),
/// e.g. `usr/bin/env`. Asked of the input binary itself, so the list follows
/// the binary's digest.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|source| ImageError::Io {
            path: busybox.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Input {
            name: "busybox",
            path: busybox.to_owned(),
            reason: format!("`--list-full` exited with {}", out.status),
        });
    }
    let text = String::from_utf8(out.stdout).map_err(|_| ImageError::Input {
        name: "busybox",
        path: busybox.to_owned(),
        reason: "`--list-full` printed non-UTF-8".into(),
    })?;
    let mut applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    applets.sort();
    applets.dedup();
    Ok(applets)
}

/// The version line busybox prints (`BusyBox v1.35.0 (Debian 1:1.35.0-4...)`).
fn busybox_version(busybox: &Path) -> Option<String> {
    let out = Command::new(busybox).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let first = text.lines().next()?;
    let version = first.split(" multi-call").next()?.trim();
    version.starts_with("BusyBox").then(|| version.to_owned())
}

/// The kernel's own inputs, from the `inputs.txt` that `scripts/build-kernel`
/// leaves beside it (`tarball <sha>`, `source_version <version>`,
/// `fragment <sha>`, `builder <sha>`, `toolchain <sha>`). Build times in that
/// file are not inputs and are left out, and so is the `.deb`'s digest: apt's
/// index may or may not still list it, and the tarball's digest already names
/// the source, so it would make equal images differ.
fn kernel_provenance(kernel: &Path) -> Vec<Input> {
    let Some(dir) = kernel.parent() else {
        return Vec::new();
    };
    let Ok(text) = std::fs::read_to_string(dir.join("inputs.txt")) else {
        return Vec::new();
    };
    let mut source_version = None;
    let mut digests = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let name = match key {
            "source_version" => {
                source_version = Some(value.to_owned());
                continue;
            }
            "tarball" => "kernel-source",
            "fragment" => "kernel-config-fragment",
            "builder" => "kernel-builder",
            "toolchain" => "kernel-toolchain",
            _ => continue,
        };
        if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            digests.push((name, value));
        }
    }
    digests
        .into_iter()
        .map(|(name, value)| Input {
            name: name.into(),
            sha256: format!("sha256:{value}"),
            version: (name == "kernel-source")
                .then(|| source_version.clone())
                .flatten(),
        })
        .collect()
}

/// The guest's file tree, apart from `/init`'s and busybox's bytes.
fn base_tree(archive: &mut Archive) -> Result<(), ImageError> {
    for (dir, perm) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
        ("mnt", 0o755),
        ("etc", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
    ] {
        archive.add_dir(dir, perm)?;
    }
    // Without /dev/console the kernel starts PID 1 with no stdio.
    archive.add_char_dev("dev/console", 0o600, 5, 1)?;
    archive.add_file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n".to_vec(),
    )?;
    archive.add_file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    )?;
    Ok(())
}

/// Builds the default image from `inputs`: reads and checks each input,
/// writes the initramfs, and describes both artifacts in a manifest.
pub fn build(inputs: &BuildInputs) -> Result<BuiltImage, ImageError> {
    let kernel = read(&inputs.kernel)?;
    elf::check_elf64(&kernel).map_err(|e| ImageError::Input {
        name: "kernel",
        path: inputs.kernel.clone(),
        reason: format!(
            "{e}: an ELF vmlinux is expected (scripts/build-kernel prints its directory)"
        ),
    })?;
    let agent = read(&inputs.agent)?;
    let agent_dynamic = elf::needs_interpreter(&agent).map_err(|e| ImageError::Input {
        name: "mvm-agent",
        path: inputs.agent.clone(),
        reason: e.to_string(),
    })?;
    if agent_dynamic {
        return Err(ImageError::Input {
            name: "mvm-agent",
            path: inputs.agent.clone(),
            reason: "dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'"
                .into(),
        });
    }
    let busybox = read(&inputs.busybox)?;
    if elf::needs_interpreter(&busybox).unwrap_or(true) {
        return Err(ImageError::Input {
            name: "busybox",
            path: inputs.busybox.clone(),
            reason: "not a static ELF binary (install Debian's busybox-static)".into(),
        });
    }
    let applets = busybox_applets(&inputs.busybox)?;

    let mut archive = Archive::new();
    base_tree(&mut archive)?;
    archive.add_file("init", 0o755, agent.clone())?;
    archive.add_file(GUEST_BUSYBOX, 0o755, busybox.clone())?;
    for applet in &applets {
        let path = applet.trim_start_matches('/');
        // Never let an applet name shadow /init or the busybox binary itself.
        if path == "init" || path == GUEST_BUSYBOX.trim_start_matches('/') {
            continue;
        }
        archive.add_symlink(path, GUEST_BUSYBOX)?;
    }
    let initramfs = archive.to_newc()?;

    let cmdline = inputs
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
    let mut manifest_inputs = vec![Input {
        name: "kernel".into(),
        sha256: sha256_digest(&kernel),
        version: None,
    }];
    manifest_inputs.extend(kernel_provenance(&inputs.kernel));
    manifest_inputs.push(Input {
        name: "mvm-agent".into(),
        sha256: sha256_digest(&agent),
        version: None,
    });
    manifest_inputs.push(Input {
        name: "busybox".into(),
        sha256: sha256_digest(&busybox),
        version: busybox_version(&inputs.busybox),
    });
    manifest_inputs.push(Input {
        name: "image-builder".into(),
        // The code that lays out the initramfs is an input of its bytes too.
        sha256: sha256_digest(
            &[
                include_bytes!("build.rs").as_slice(),
                include_bytes!("cpio.rs").as_slice(),
            ]
            .concat(),
        ),
        version: Some(format!("mvm-runtime {}", env!("CARGO_PKG_VERSION"))),
    });
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        kernel: Artifact::of(KERNEL_FILE, &kernel),
        initramfs: Artifact::of(INITRAMFS_FILE, &initramfs),
        cmdline_sha256: sha256_digest(cmdline.as_bytes()),
        cmdline,
        agent_vsock_port: AGENT_VSOCK_PORT,
        inputs: manifest_inputs,
        rootfs: None,
        lock_sha256: None,
        config: None,
    };
    Ok(BuiltImage {
        manifest,
        kernel,
        initramfs,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::cpio::{parse_newc, EntryKind};

    /// Inputs made from host binaries: /bin/busybox stands in for both the
    /// agent (any static ELF will do for building) and busybox, and a fake
    /// ELF file for the kernel. Fails without busybox-static.
    pub(crate) fn fake_inputs(dir: &Path) -> BuildInputs {
        let busybox = PathBuf::from("/bin/busybox");
        // scripts/setup installs busybox-static; without it the tests fail, never
        // pass quietly.
        assert!(
            busybox.exists(),
            "these tests need /bin/busybox (busybox-static)"
        );
        let kernel = dir.join("vmlinux");
        let mut k = b"\x7fELF\x02\x01\x01".to_vec();
        k.resize(4096, 0xaa);
        std::fs::write(&kernel, k).unwrap();
        BuildInputs {
            kernel,
            agent: busybox.clone(),
            busybox,
            cmdline: None,
        }
    }

    #[test]
    fn building_twice_gives_identical_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path());
        let a = build(&inputs).unwrap();
        let b = build(&inputs).unwrap();
        assert_eq!(a.manifest.initramfs.sha256, b.manifest.initramfs.sha256);
        assert_eq!(a.manifest.kernel.sha256, b.manifest.kernel.sha256);
        assert_eq!(
            a.manifest.to_bytes().unwrap(),
            b.manifest.to_bytes().unwrap()
        );
        assert_eq!(a.initramfs, b.initramfs);
    }

    #[test]
    fn initramfs_has_init_console_and_applets() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path());
        let image = build(&inputs).unwrap();
        let entries = parse_newc(&image.initramfs).unwrap();
        let find = |p: &str| entries.iter().find(|e| e.path == p).unwrap().clone();
        assert_eq!(find("init").perm, 0o755);
        assert!(matches!(find("init").kind, EntryKind::File(_)));
        assert_eq!(
            find("dev/console").kind,
            EntryKind::CharDev { major: 5, minor: 1 }
        );
        assert_eq!(
            find("bin/sh").kind,
            EntryKind::Symlink("/bin/busybox".into())
        );
        let mut sorted: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        sorted.sort();
        let in_order: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(sorted, in_order);
        assert_eq!(image.manifest.cmdline, DEFAULT_CMDLINE);
        assert_eq!(image.manifest.agent_vsock_port, AGENT_VSOCK_PORT);
        assert!(image.manifest.inputs.iter().any(|i| i.name == "busybox"
            && i.version
                .as_deref()
                .is_some_and(|v| v.starts_with("BusyBox"))));
    }

    #[test]
    fn a_dynamic_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = fake_inputs(dir.path());
        inputs.agent = PathBuf::from("/bin/ls");
        let err = build(&inputs).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
    }

    #[test]
    fn a_non_elf_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = fake_inputs(dir.path());
        let bz = dir.path().join("bzImage");
        std::fs::write(&bz, b"MZ not elf").unwrap();
        inputs.kernel = bz;
        let err = build(&inputs).unwrap_err().to_string();
        assert!(err.contains("ELF vmlinux"), "{err}");
    }

    #[test]
    fn kernel_provenance_skips_build_time() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "ab".repeat(32);
        std::fs::write(
            dir.path().join("inputs.txt"),
            format!("tarball {sha}\nfragment {sha}\nbuilder {sha}\nbuild_seconds 431\n"),
        )
        .unwrap();
        let inputs = kernel_provenance(&dir.path().join("vmlinux"));
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            ["kernel-source", "kernel-config-fragment", "kernel-builder"]
        );
        assert_eq!(inputs[0].version, None);
    }

    /// The inputs.txt of today's scripts/build-kernel: the source's version
    /// lands on `kernel-source`; the .deb's digest, the lock's digest, the
    /// source date and the build time stay out of the manifest.
    #[test]
    fn kernel_provenance_carries_the_source_version_and_toolchain() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c, d) = (
            "aa".repeat(32),
            "bb".repeat(32),
            "cc".repeat(32),
            "dd".repeat(32),
        );
        std::fs::write(
            dir.path().join("inputs.txt"),
            format!(
                "tarball {a}\nsource_version 6.12.118-1~deb12u1\ndeb {b}\nlock {c}\n\
                 fragment {c}\nbuilder {d}\ntoolchain {b}\nsource_date_epoch 1795859651\n\
                 build_seconds 452\n"
            ),
        )
        .unwrap();
        let inputs = kernel_provenance(&dir.path().join("vmlinux"));
        let got: Vec<(&str, &str, Option<&str>)> = inputs
            .iter()
            .map(|i| (i.name.as_str(), i.sha256.as_str(), i.version.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "kernel-source",
                    format!("sha256:{a}").as_str(),
                    Some("6.12.118-1~deb12u1")
                ),
                (
                    "kernel-config-fragment",
                    format!("sha256:{c}").as_str(),
                    None
                ),
                ("kernel-builder", format!("sha256:{d}").as_str(), None),
                ("kernel-toolchain", format!("sha256:{b}").as_str(), None),
            ]
        );
        // A .deb digest that apt no longer lists changes nothing.
        let text = std::fs::read_to_string(dir.path().join("inputs.txt")).unwrap();
        std::fs::write(
            dir.path().join("inputs.txt"),
            text.replace(&format!("deb {b}"), "deb unknown"),
        )
        .unwrap();
        assert_eq!(kernel_provenance(&dir.path().join("vmlinux")), inputs);
    }
}
