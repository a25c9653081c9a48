//! The life of one `mvm run` around the backend: admission (the signed plan),
//! the run's records written ahead to the audit log, the receipt, and the exit
//! status that the receipt records and `mvm` exits with. The command line
//! (`crate::cli`) only turns its arguments into a [`RunRequest`] and prints.

pub mod admit;
pub mod execute;
pub mod exit;
pub mod output_digest;
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
    /// TCP forwards into the guest (a sandbox's `-p HOST:GUEST`), pinned in the plan.
    pub forwards: Vec<mvm_loader::plan::PortForward>,
}
