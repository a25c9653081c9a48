//! The life of one `mvm run` around the backend: admission (the signed plan),
//! the run's records written ahead to the audit log, the receipt, and the exit
//! status that the receipt records and `mvm` exits with. The command line
//! (`crate::cli`) only turns its arguments into a [`RunRequest`] and prints.

pub mod admit;
pub mod disks;
pub mod execute;
pub mod exit;
pub mod output_digest;
pub mod substitute;
pub mod vmm_events;

/// What one run asks admission for, as the caller (the CLI, an SDK user)
/// chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    /// The image reference.
    pub image: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// The workload's timeout; `None` takes the policy's longest.
    pub timeout_secs: Option<u64>,
    /// The command (hashed into the records, never logged).
    pub argv: Vec<String>,
    /// The stored secrets the run asks for, by name and delivery (released after a
    /// verified boot).
    pub secrets: Vec<crate::secrets::SecretRequest>,
    /// The stored secrets the guest sees only as placeholders, substituted on egress
    /// to the hosts each is bound to.
    pub substitutions: Vec<crate::secrets::SubstitutionRequest>,
    /// TCP forwards into the guest (a sandbox's `-p HOST:GUEST`), pinned in the plan.
    pub forwards: Vec<mvm_loader::plan::PortForward>,
    /// Read-only disks besides the image's root, each pinned by its dm-verity tree,
    /// in the order they follow the root on the VMM's command line.
    pub disks: Vec<PinnedFile>,
    /// Empty writable disks, named by size in the plan and recorded in the audit log.
    pub scratch_disks: Vec<ScratchFile>,
}

/// A read-only disk image pinned by its dm-verity tree (`PATH.verity` beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedFile {
    /// The image file.
    pub path: std::path::PathBuf,
    /// Its name and tree parameters, as the plan pins them.
    pub pin: mvm_loader::plan::PinnedDisk,
}

/// An empty writable disk: a file of exactly the plan's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchFile {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its name and size, as the plan names them.
    pub disk: mvm_loader::plan::ScratchDisk,
}

impl RunRequest {
    /// The VMM's `--disk` values for `image` and this request, in the order the
    /// plan lists them: the image's root disk, the pinned disks, the scratch disks.
    pub fn disk_args(&self, image: &crate::image::StoredImage) -> Vec<String> {
        let root = image
            .manifest
            .rootfs
            .iter()
            .map(|r| format!("path={},ro", image.dir.join(&r.file).display()));
        let pinned = self
            .disks
            .iter()
            .map(|d| format!("path={},ro", d.path.display()));
        let scratch = self
            .scratch_disks
            .iter()
            .map(|d| format!("path={},rw", d.path.display()));
        root.chain(pinned).chain(scratch).collect()
    }
}
