//! Backends: where a VM runs, and the honest name of the wall around it.
//!
//! - [`Tier::Kvm`]: `mvm-vmm` on this host's hardware KVM ([`kvm`]).
//! - [`Tier::Emulated`]: the same `mvm-vmm` and image inside the project's
//!   QEMU-TCG test host, which has a real (emulated-SVM) KVM; slow, and the
//!   outer wall is QEMU's emulator ([`emulated`]).
//!
//! [`detect`] judges which tiers this host can give; both backends run a
//! [`RunSpec`] and report a [`RunOutcome`] or a [`RunError`].

pub mod abandoned;
mod agent_exec;
#[cfg(target_os = "linux")]
pub mod container;
pub mod detect;
#[cfg(target_os = "linux")]
pub mod emulated;
pub(crate) mod held;
pub mod idmap;
pub mod interrupt;
pub mod kvm;
pub mod locate;
pub(crate) mod plan_check;
pub mod resources;
pub mod scratch;
pub mod session;
pub mod snapshot_seal;
pub mod stdin_pump;
pub mod vmm_memory;
pub mod vmm_process;
pub mod vz;
pub mod wall;
pub mod warm;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::secrets::Secret;
use serde::{Deserialize, Serialize};

pub use session::{SessionEvent, SessionServer, VmProbe, Workload};

/// A backend tier, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Hardware virtualization through this host's `/dev/kvm`.
    Kvm,
    /// `mvm-vmm` inside a QEMU-TCG test host.
    Emulated,
    /// No VM: the image's tree in Linux namespaces under a seccomp filter, sharing
    /// this host's kernel (the weakest tier; only when asked for, and only where the
    /// policy's minimum tier is `container`).
    Container,
    /// Apple's Virtualization.framework through `vfkit` (macOS): the runtime verifies the
    /// plan and measures every file before handing them over; nothing checks a disk
    /// block by block after that.
    Vz,
}

impl Tier {
    /// Whether this build can run the tier on this host: `kvm`, `emulated` and
    /// `container` on Linux, `vz` on macOS.
    #[must_use]
    pub fn built_here(self) -> bool {
        match self {
            Tier::Kvm | Tier::Emulated | Tier::Container => cfg!(target_os = "linux"),
            Tier::Vz => cfg!(target_os = "macos"),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Kvm => "kvm",
            Tier::Emulated => "emulated",
            Tier::Container => "container",
            Tier::Vz => "vz",
        })
    }
}

/// What the workload gets as stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinMode {
    /// End of file at once (stdin is a terminal, or nothing was piped).
    Null,
    /// This process's stdin, streamed until its end.
    Forward,
}

/// The path and mode of an `mvm-vmm --disk` value (`path=FILE,ro|rw[,id=ID]`).
pub fn parse_disk(value: &str) -> Option<(PathBuf, bool)> {
    let mut path = None;
    let mut read_only = None;
    for part in value.split(',') {
        match part {
            "ro" => read_only = Some(true),
            "rw" => read_only = Some(false),
            _ => {
                if let Some(p) = part.strip_prefix("path=") {
                    path = Some(PathBuf::from(p));
                }
            }
        }
    }
    Some((path?, read_only?))
}

/// One workload to run in a fresh VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    pub workdir: Option<String>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Wall-clock limit for the workload, in seconds.
    pub timeout_secs: Option<u64>,
    /// Stdin handling.
    pub stdin: StdinMode,
    /// Extra disks, passed to `mvm-vmm --disk` as given.
    pub disks: Vec<String>,
    /// How long to wait for the guest agent after the VMM starts, in seconds.
    pub ready_timeout_secs: u64,
    /// netrt: the network device (`mvm run --net`), addresses pinned (docs/net.md).
    #[serde(default)]
    pub net: Option<crate::net::NetRequest>,
    /// Secret substitution: the CA the guest trusts and the bound names' addresses,
    /// written into the guest before the workload starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_trust: Option<crate::secrets::guest_trust::GuestTrust>,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Whether it was killed because its timeout passed.
    pub timed_out: bool,
}

/// Phase durations of a run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// From starting the VM to the agent answering its first ping.
    pub boot_ms: u64,
    /// From sending exec to the workload's exit status.
    pub exec_ms: u64,
    /// From asking for shutdown to the VM process gone.
    pub shutdown_ms: u64,
    /// The whole run.
    pub total_ms: u64,
    /// The guest kernel's uptime when the agent started, as the agent reports it.
    pub guest_boot_ms: Option<u64>,
    /// Emulated tier only: from starting QEMU to the test host starting `mvm`.
    #[serde(default)]
    pub host_boot_ms: Option<u64>,
    /// Emulated tier only: the test host was a spare, booted ahead of this run
    /// (`MVM_TESTHOST_SPARE=1`); `host_boot_ms` then counts from the claim.
    #[serde(default)]
    pub testhost_spare: bool,
    /// The VM was restored from the image's warm snapshot instead of booted.
    #[serde(default)]
    pub warm_start: bool,
    /// Emulated tier only: the test host reading the warm snapshot from the disk it was
    /// carried in on, before the VMM started (`emulated::warm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_unpack_ms: Option<u64>,
}

/// A finished run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOutcome {
    /// How the workload ended.
    pub status: WorkloadStatus,
    /// Where the time went.
    pub timings: Timings,
    /// The tier it ran on.
    pub tier: Tier,
    /// The VMM's boot report (phase timestamps, exit reason), when it wrote one.
    #[serde(default)]
    pub boot_report: Option<serde_json::Value>,
    /// The signed plan's id, for an admitted run.
    #[serde(default)]
    pub plan_id: Option<String>,
    /// The VMM's resident memory just before the VM was stopped (kvm tier).
    #[serde(default)]
    pub vmm_memory: Option<vmm_memory::VmmMemory>,
}

/// Where a run's evidence is written ahead. A backend calls it once the guest
/// agent answered and before the workload starts, so the audit log holds the
/// verified boot and the workload's start before any of its output reaches the
/// user, and a VM or an `mvm` killed afterwards cannot take them away.
pub trait RunJournal {
    /// The guest answered and the workload is about to start. Returns the
    /// secrets to put into the guest first (each already recorded as
    /// released). An error stops the run before the workload starts: a
    /// workload whose start cannot be recorded does not run.
    fn workload_starting(&mut self) -> Result<Vec<Secret>, RunError>;

    /// A session did something in the guest. Appended before the session goes on
    /// (an exec's start before the agent hears of it); an error stops the request.
    /// A journal that records nothing ignores it.
    fn session_event(&mut self, event: &SessionEvent) -> Result<(), RunError> {
        let _ = event;
        Ok(())
    }

    /// Whether the VM is restored from a snapshot rather than booted: the VMM then
    /// vouches for it with `snapshot_restored` rather than `boot_verified`. Called before
    /// the VMM starts (again, if a refused warm start falls back to a boot).
    fn restoring(&mut self, restore: bool) {
        let _ = restore;
    }

    /// Secret substitution whose proxy runs elsewhere (the emulated tier's test host):
    /// what it needs, once [`Self::workload_starting`] vouched for the boot. Taken once.
    fn substitution_handoff(&mut self) -> Option<crate::egress_proxy::Handoff> {
        None
    }

    /// That proxy substituted or refused something: appended as the local proxy's
    /// observer would have.
    fn substitution_observed(
        &mut self,
        observed: &crate::egress_proxy::Observed,
    ) -> Result<(), RunError> {
        let _ = observed;
        Ok(())
    }

    /// The test host's side: the proxy's socket, which the host network set up here
    /// bound (`None` without one), for the guest at `guest`; a journal that was handed
    /// the bindings starts the proxy on it.
    fn serve_substitution(
        &mut self,
        listener: Option<std::net::TcpListener>,
        guest: Option<std::net::Ipv4Addr>,
    ) -> Result<(), RunError> {
        let _ = (listener, guest);
        Ok(())
    }
}

/// The journal of a run that records nothing (`--dev`).
#[derive(Debug, Default)]
pub struct NoJournal;

impl RunJournal for NoJournal {
    fn workload_starting(&mut self) -> Result<Vec<Secret>, RunError> {
        Ok(Vec::new())
    }
}

/// How a VM process (mvm-vmm, or QEMU for the emulated tier) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessEnd {
    /// Its exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl From<std::process::ExitStatus> for ProcessEnd {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

/// Where the workload's output goes as it arrives.
pub trait OutputSink {
    /// Bytes the workload wrote to stdout.
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Bytes the workload wrote to stderr.
    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()>;
}

/// Why a run did not produce a workload status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No tier can run a VM here.
    #[error("no usable backend: {0}")]
    NoBackend(String),
    /// More vCPUs or memory than mvm or this host can give (nothing started).
    #[error(transparent)]
    Resources(#[from] resources::ResourceError),
    /// Admission's policy does not allow the request.
    #[error("{0}")]
    Denied(#[from] crate::admission::Denial),
    /// netrt: the host network for `--net` could not be set up.
    #[error("--net: {0}")]
    Net(crate::net::NetError),
    /// The image is missing or broken.
    #[error("image: {0}")]
    Image(#[from] crate::image::ImageError),
    /// A binary or test host the backend needs is missing.
    #[error("{0}")]
    Missing(String),
    /// The VM process could not start or ended before the workload did.
    #[error("VM process died: {reason}{}", log_tail(.log))]
    VmmDied {
        reason: String,
        log: String,
        /// How the process ended, when it ran and was reaped.
        exit: Option<ProcessEnd>,
    },
    /// The VMM refused to boot: the plan or a measured artifact did not
    /// verify (`reason` is the VMM's stable name, e.g. `kernel_mismatch`).
    #[error("boot refused ({reason}, mvm-vmm status {status}): {detail}")]
    BootRefused {
        reason: String,
        status: i32,
        detail: String,
    },
    /// The guest agent did not answer in time.
    #[error("guest agent not ready within {timeout:?}: {reason}{}", log_tail(.log))]
    AgentNotReady {
        timeout: Duration,
        reason: String,
        log: String,
    },
    /// The host-side deadline passed and the VM was stopped.
    #[error("timeout: the workload did not finish within {0:?}; the VM was stopped")]
    Timeout(Duration),
    /// Ctrl-C or SIGTERM: the workload and VM were stopped.
    #[error("interrupted; the workload and the VM were stopped")]
    Interrupted,
    /// Talking to the agent failed mid-run.
    #[error("guest agent: {0}")]
    Agent(String),
    /// Forwarding output or input failed on the host side.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(15);
    let tail = lines.get(start..).unwrap_or_default();
    if tail.is_empty() {
        String::new()
    } else {
        // The log is the guest's and the firmware's console: shown, never obeyed.
        format!(
            "\n--- last lines of the VM log ---\n{}",
            crate::terminal::escape_controls(&tail.join("\n"))
        )
    }
}

impl RunError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        let what = what.into();
        move |source| RunError::Io { what, source }
    }
}

/// The files of a verified launch: `mvm-vmm --plan ENVELOPE --trust PUBKEY
/// --replay-store FILE --events FILE`. Without them a backend boots `--dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFiles {
    /// The signed plan (DSSE envelope).
    pub envelope: PathBuf,
    /// The admission public key the VMM trusts.
    pub trust: PathBuf,
    /// The host's nonce store.
    pub replay_store: PathBuf,
    /// Where the VMM appends its events (JSON lines) for the audit log.
    pub events: PathBuf,
}

/// Where the files a run needs are: the image and the VMM binary.
#[derive(Debug, Clone)]
pub struct RunArtifacts {
    /// The stored image.
    pub image: crate::image::StoredImage,
    /// The `mvm-vmm` to start.
    pub vmm: PathBuf,
    /// Where a warm start may come from (`backend::warm`): the store when the policy
    /// allows it and `--cold` was not given. Only the kvm backend acts on it, and only
    /// for an eligible run.
    pub warm: warm::WarmSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_log_in_an_error_cannot_reset_the_terminal() {
        let e = RunError::VmmDied {
            reason: "qemu exited".into(),
            log: "\u{1b}c\u{1b}[2JSeaBIOS\nqemu: cannot set up guest memory 'pc.ram'\n".into(),
            exit: None,
        };
        let text = e.to_string();
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("\\x1bc\\x1b[2JSeaBIOS\n"), "{text:?}");
        assert!(
            text.ends_with("cannot set up guest memory 'pc.ram'"),
            "{text:?}"
        );
    }
}
