//! The exit codes of `mvm run`: the workload's own status when it ran, and a
//! distinct code for each way mvm itself can fail. 124 and 125 follow
//! `timeout(1)` and container runtimes; a workload may of course exit with
//! any of these itself.

use crate::backend::{RunError, WorkloadStatus};

/// `--cpus` or `--mem` beyond what mvm or this host can give
/// (`mvm_loader::limits`): refused before anything starts.
pub const RESOURCES: i32 = 116;
/// netrt: `--net` without the privilege to set the network up (CAP_NET_ADMIN).
pub const NET_PERMISSION: i32 = 117;

/// The VMM refused to boot: the signed plan or a measured artifact did not
/// verify (the VMM's reason is printed and audited as `boot_refused`).
pub const BOOT_REFUSED: i32 = 118;
/// Admission denied the request: a policy rule (named on stderr and in the
/// audit log as `plan_denied`) does not allow it.
pub const DENIED: i32 = 119;
/// No backend can run a VM here (no usable KVM and no emulated tier).
pub const NO_BACKEND: i32 = 120;
/// The image is missing, broken, or does not match its manifest.
pub const NO_IMAGE: i32 = 121;
/// The VM process (mvm-vmm, or QEMU for the emulated tier) died.
pub const VMM_DIED: i32 = 122;
/// The guest agent did not answer in time.
pub const AGENT_NOT_READY: i32 = 123;
/// `--timeout` passed; the workload and the VM were stopped.
pub const TIMEOUT: i32 = 124;
/// Any other mvm failure (a missing binary, a broken agent connection, I/O).
pub const MVM_ERROR: i32 = 125;
/// Ctrl-C / SIGTERM before the workload started, or a workload still running
/// `interrupt::GRACE` after it was passed the signal (or at a second one): the
/// workload and the VM were stopped (128 + SIGINT). A workload that exits on
/// the forwarded signal gives its own status instead.
pub const INTERRUPTED: i32 = 130;
/// Our stdout was closed (`mvm run -- yes | head`): the workload and the VM
/// were stopped, as a shell's producer would die of SIGPIPE (128 + 13).
pub const BROKEN_PIPE: i32 = 141;

/// The `--help` text that documents the codes above.
pub const HELP: &str = "\
Exit status:
  0-255  the command's own exit status; 128+N if signal N ended it
  116    --cpus or --mem beyond what mvm or this host can give (the limit is named)
  117    --net without CAP_NET_ADMIN (see docs/net.md)
  118    boot refused: the VMM did not verify the signed plan or an artifact
  119    denied by the admission policy (the rule is named; see docs/policy.md)
  120    no usable backend (no hardware KVM, no emulated tier): see `mvm doctor`
  121    no image, or the image does not match its manifest: run `mvm image build`
  122    the VM process (mvm-vmm, or QEMU for --backend emulated) died
  123    the guest agent did not become ready in time (--ready-timeout)
  124    --timeout passed; the command and the VM were stopped
  125    other mvm error (missing mvm-vmm, lost agent connection, I/O)
  130    interrupted: Ctrl-C before the command started, or the command still
         running 5 s after it was passed the signal (or a second Ctrl-C)
  141    our stdout was closed (e.g. `| head`); the command and the VM were stopped
  2      bad command line (from the argument parser)";

/// The process exit code for a workload that ran to an end.
pub fn for_status(status: &WorkloadStatus) -> i32 {
    if status.timed_out {
        return TIMEOUT;
    }
    match (status.code, status.signal) {
        (Some(code), _) => code & 0xff,
        (None, Some(signal)) => 128_i32.saturating_add(signal),
        (None, None) => MVM_ERROR,
    }
}

/// The process exit code for a run that failed.
pub fn for_error(error: &RunError) -> i32 {
    match error {
        RunError::NoBackend(_) => NO_BACKEND,
        RunError::Resources(_) => RESOURCES,
        RunError::Denied(_) => DENIED,
        RunError::Image(_) => NO_IMAGE,
        RunError::VmmDied { .. } => VMM_DIED,
        RunError::BootRefused { .. } => BOOT_REFUSED,
        RunError::AgentNotReady { .. } => AGENT_NOT_READY,
        RunError::Timeout(_) => TIMEOUT,
        RunError::Interrupted => INTERRUPTED,
        RunError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe => {
            BROKEN_PIPE
        }
        // netrt: a missing privilege has its own status; other --net failures are mvm's.
        RunError::Net(e) if e.is_permission() => NET_PERMISSION,
        RunError::Missing(_) | RunError::Agent(_) | RunError::Io { .. } | RunError::Net(_) => {
            MVM_ERROR
        }
    }
}

/// A short name for an error kind, for `--json`.
pub fn error_kind(error: &RunError) -> &'static str {
    match error {
        RunError::NoBackend(_) => "no_backend",
        RunError::Resources(_) => "resources",
        RunError::Denied(_) => "denied",
        RunError::Image(_) => "no_image",
        RunError::VmmDied { .. } => "vmm_died",
        RunError::BootRefused { .. } => "boot_refused",
        RunError::AgentNotReady { .. } => "agent_not_ready",
        RunError::Timeout(_) => "timeout",
        RunError::Interrupted => "interrupted",
        RunError::Missing(_) => "missing",
        RunError::Agent(_) => "agent",
        RunError::Io { .. } => "io",
        RunError::Net(e) if e.is_permission() => "net_permission",
        RunError::Net(_) => "net",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageError;
    use std::time::Duration;

    fn status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> WorkloadStatus {
        WorkloadStatus {
            code,
            signal,
            timed_out,
        }
    }

    #[test]
    fn workload_status_maps_like_a_shell() {
        assert_eq!(for_status(&status(Some(0), None, false)), 0);
        assert_eq!(for_status(&status(Some(7), None, false)), 7);
        assert_eq!(for_status(&status(Some(256 + 3), None, false)), 3);
        assert_eq!(for_status(&status(None, Some(9), false)), 137);
        assert_eq!(for_status(&status(None, Some(9), true)), TIMEOUT);
        assert_eq!(for_status(&status(None, None, false)), MVM_ERROR);
    }

    #[test]
    fn each_failure_has_its_own_code() {
        let errors = [
            RunError::NoBackend("x".into()),
            RunError::Resources(
                crate::backend::resources::check_with(
                    crate::backend::Tier::Kvm,
                    64,
                    256,
                    None,
                    false,
                )
                .unwrap_err(),
            ),
            RunError::Denied(crate::admission::Denial {
                rule: crate::admission::Rule::MaxVcpus,
                reason: "x".into(),
            }),
            RunError::Image(ImageError::NotFound {
                reference: "default".into(),
                store: "/s".into(),
            }),
            RunError::VmmDied {
                reason: "x".into(),
                log: String::new(),
                exit: None,
            },
            RunError::AgentNotReady {
                timeout: Duration::from_secs(1),
                reason: "x".into(),
                log: String::new(),
            },
            RunError::BootRefused {
                reason: "kernel_mismatch".into(),
                status: 20,
                detail: "x".into(),
            },
            RunError::Timeout(Duration::from_secs(2)),
            RunError::Agent("x".into()),
            RunError::Interrupted,
            RunError::Io {
                what: "writing the workload's stdout".into(),
                source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            },
        ];
        let codes: Vec<i32> = errors.iter().map(for_error).collect();
        assert_eq!(
            codes,
            [
                NO_BACKEND,
                RESOURCES,
                DENIED,
                NO_IMAGE,
                VMM_DIED,
                AGENT_NOT_READY,
                BOOT_REFUSED,
                TIMEOUT,
                MVM_ERROR,
                INTERRUPTED,
                BROKEN_PIPE
            ]
        );
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
        for code in codes {
            assert!(HELP.contains(&code.to_string()), "{code} documented");
        }
    }
}
