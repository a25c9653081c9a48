//! What the vz tier checks before `vfkit` gets a file: what `mvm-vmm` checks before a
//! boot ([`crate::backend::plan_check`]: signature, window, nonce), that the plan lets
//! the delegated tier run it and asks for nothing this version does not hand over (a
//! network, scratch disks), that the kernel is one this Mac's Virtualization.framework
//! boots, and then the hand-off itself ([`super::handoff`]): private copies measured
//! against the plan. The verdict is the run's `boot_verified` or `boot_refused`.

use std::io::Read;
use std::path::Path;

use mvm_loader::plan::Tier as PlanTier;
use serde_json::{Map, Value};

use super::handoff::{hand_off, HandedOff, HandoffError, Inputs};
use crate::backend::plan_check::{self, Refusal};
use crate::backend::{PlanFiles, RunError};
use crate::image::StoredImage;

/// What is wrong with a kernel for Virtualization.framework on `arch` (`aarch64` or
/// `x86_64`), judged from its first bytes; `None` when it looks bootable. VZ's Linux
/// boot loader takes an uncompressed kernel: on Apple silicon the arm64 `Image` (magic
/// `ARM\x64` at offset 0x38), on Intel an x86_64 ELF `vmlinux`.
pub fn kernel_problem(head: &[u8], arch: &str) -> Option<String> {
    let arm64_image = head.get(0x38..0x3c) == Some(b"ARM\x64".as_slice());
    let elf_machine = (head.get(..4) == Some(b"\x7fELF".as_slice()))
        .then(|| head.get(18..20))
        .flatten()
        .and_then(|m| <[u8; 2]>::try_from(m).ok())
        .map(u16::from_le_bytes);
    let what = if arm64_image {
        "an arm64 Image"
    } else {
        match elf_machine {
            Some(62) => "an x86_64 ELF",
            Some(183) => "an arm64 ELF (VZ wants the Image)",
            Some(_) => "an ELF for another machine",
            None => "neither an arm64 Image nor an ELF (a compressed kernel?)",
        }
    };
    let fits = match arch {
        "aarch64" => arm64_image,
        "x86_64" => elf_machine == Some(62),
        _ => false,
    };
    (!fits).then(|| {
        format!(
            "the image's kernel is {what}; Virtualization.framework on {arch} boots {} (mvm's images are built for x86_64 KVM: an arm64 image is needed on Apple silicon)",
            if arch == "aarch64" { "an uncompressed arm64 Image" } else { "an uncompressed x86_64 vmlinux" }
        )
    })
}

/// The first 64 bytes of `path`.
fn head_of(path: &Path) -> Result<Vec<u8>, Refusal> {
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(path)
        .and_then(|f| f.take(64).read_to_end(&mut head))
        .map_err(|e| Refusal::new("unreadable", format!("kernel {}: {e}", path.display())))?;
    Ok(head)
}

fn kernel_fits(path: &Path) -> Result<(), Refusal> {
    match kernel_problem(&head_of(path)?, std::env::consts::ARCH) {
        Some(problem) => Err(Refusal::new("kernel_format", problem)),
        None => Ok(()),
    }
}

/// Checks `plan` and hands `image`'s kernel and initramfs over into `dir` (created
/// here), measured against it. Without a plan (`--dev`) nothing is measured or
/// recorded, and vfkit gets the image's own files.
pub(super) fn verify(
    plan: Option<&PlanFiles>,
    image: &StoredImage,
    dir: &Path,
) -> Result<HandedOff, RunError> {
    let Some(files) = plan else {
        kernel_fits(&image.kernel_path()).map_err(|r| RunError::Missing(r.detail))?;
        return Ok(HandedOff {
            kernel: image.kernel_path(),
            initramfs: Some(image.initramfs_path()),
            disks: Vec::new(),
        });
    };
    plan_check::conclude(files, |plan_id| check(files, image, dir, plan_id))
}

fn check(
    files: &PlanFiles,
    image: &StoredImage,
    dir: &Path,
    plan_id: &mut Option<String>,
) -> Result<(HandedOff, Map<String, Value>), Refusal> {
    let verified = plan_check::signed_plan(files, plan_id)?;
    let plan = &verified.plan;
    if plan.required_tier > PlanTier::Delegated {
        return Err(Refusal::new(
            "tier",
            format!(
                "the plan requires the {} tier; vz is delegated (the runtime measures, Apple's hypervisor boots)",
                plan.required_tier
            ),
        ));
    }
    if !plan.artifacts.disks.is_empty() || !plan.devices.scratch_disks.is_empty() {
        return Err(Refusal::new(
            "devices",
            "the plan pins disks: this version of the vz tier hands over an image's kernel and initramfs only",
        ));
    }
    if plan.devices.net.is_some() {
        return Err(Refusal::new(
            "devices",
            "the plan gives the guest a network: the vz tier has no network device in this version",
        ));
    }
    kernel_fits(&image.kernel_path())?;
    let kernel = image.kernel_path();
    let initramfs = image.initramfs_path();
    let inputs = Inputs {
        kernel: &kernel,
        initramfs: Some(&initramfs),
        cmdline: &image.manifest.cmdline,
        disks: Vec::new(),
    };
    let handed = hand_off(plan, &inputs, dir).map_err(|e| match e {
        HandoffError::Mismatch { .. } => Refusal::new("measurement", e.to_string()),
        HandoffError::Shape(_) => Refusal::new("initramfs_presence", e.to_string()),
        HandoffError::Io { .. } => Refusal::new("unreadable", e.to_string()),
    })?;
    let artifacts = &plan.artifacts;
    let mut fields = Map::new();
    fields.insert("kernel".into(), artifacts.kernel.to_string().into());
    if let Some(initramfs) = &artifacts.initramfs {
        fields.insert("initramfs".into(), initramfs.to_string().into());
    }
    fields.insert("cmdline".into(), artifacts.cmdline.to_string().into());
    fields.insert("plan_digest".into(), verified.digest.to_string().into());
    fields.insert("keyid".into(), verified.keyid.to_string().into());
    fields.insert("tier".into(), "vz".into());
    Ok((handed, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm64_image() -> Vec<u8> {
        let mut head = vec![0u8; 64];
        head[0x38..0x3c].copy_from_slice(b"ARM\x64");
        head
    }

    fn elf(machine: u16) -> Vec<u8> {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[18..20].copy_from_slice(&machine.to_le_bytes());
        head
    }

    #[test]
    fn only_a_kernel_this_macs_hypervisor_boots_is_handed_over() {
        assert_eq!(kernel_problem(&arm64_image(), "aarch64"), None);
        assert_eq!(kernel_problem(&elf(62), "x86_64"), None);
        let x86_on_arm = kernel_problem(&elf(62), "aarch64").unwrap();
        assert!(x86_on_arm.contains("x86_64 ELF") && x86_on_arm.contains("arm64 image is needed"));
        assert!(kernel_problem(&elf(183), "aarch64")
            .unwrap()
            .contains("wants the Image"));
        assert!(kernel_problem(&arm64_image(), "x86_64").is_some());
        let bzimage = b"MZ\0\0\0\0compressed".to_vec();
        assert!(kernel_problem(&bzimage, "x86_64")
            .unwrap()
            .contains("compressed"));
        assert!(kernel_problem(&[], "aarch64").is_some());
        assert!(kernel_problem(&elf(62), "riscv64").is_some());
    }
}
