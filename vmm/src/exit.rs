//! Why the VMM exits, and with which status.
//!
//! | status | meaning |
//! |--------|---------|
//! | 0 | the guest ended: i8042 reset, triple fault, poweroff signal (a `panic=-1` panic is a reset) |
//! | 1 | the VMM failed (KVM setup, I/O, an internal error) |
//! | 2 | invalid arguments, or vCPUs or memory past `mvm_loader::limits` (nothing was created) |
//! | 3 | a vCPU hit a fatal exit: `KVM_EXIT_INTERNAL_ERROR`, `KVM_EXIT_FAIL_ENTRY`, or an exit the VMM does not handle |
//! | 10..=24 | verified boot refused the boot (one status per reason: `verified_boot::Refusal::status`) |
//! | 128+N | stopped by host signal N (SIGINT, SIGTERM, SIGHUP) |

/// Exit status: the guest ended normally (reset, triple fault, poweroff).
pub const STATUS_GUEST_ENDED: i32 = 0;
/// Exit status: the VMM itself failed.
pub const STATUS_VMM_ERROR: i32 = 1;
/// Exit status: invalid arguments.
pub const STATUS_BAD_ARGUMENTS: i32 = 2;
/// Exit status: a vCPU hit a fatal exit.
pub const STATUS_VCPU_FATAL: i32 = 3;

/// The `--help` text describing exit statuses.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0      the guest ended: i8042 reset, triple fault, or poweroff via the guest-signal port
         (a guest panic with panic=-1 reboots, so it is a reset); or, on SIGUSR2 with
         --snapshot-dir, the VM was paused and written there (exit_reason snapshotted)
  1      the VMM failed (KVM setup, I/O, internal error)
  2      invalid arguments, or more vCPUs or memory than the limits allow (no VM was created)
  3      fatal vCPU exit: KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_FAIL_ENTRY or an unhandled exit
         (the vCPU's registers are printed on stderr)
  128+N  stopped by host signal N
Boot refused by verified boot (nothing was created, no guest code ran):
  10 untrusted_key      11 bad_signature      12 invalid_plan, malformed_envelope
  13 unknown_field      14 newer_schema       15 expired
  16 not_yet_valid      17 replay             18 replay_store
  19 plan_mismatch (a flag disagrees with the plan: vCPUs, memory, devices, disk counts)
  20 kernel_mismatch    21 initramfs_mismatch  22 cmdline_mismatch
  23 disk_mismatch      24 plan_unreadable (--plan/--trust file, or an artifact)
  25 a --restore snapshot refused: snapshot_unsigned, snapshot_format, vmm_mismatch,
     plan_mismatch, rollback, cpu_mismatch, state_mismatch, memory_mismatch,
     device_mismatch (the --disk/--vsock/--net devices are not the snapshot's),
     memory_unleased (its memory file is open for writing elsewhere)";

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest pulsed the i8042 reset line.
    ResetI8042,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
    },
    /// KVM reported a system event (PSCI-style shutdown or reset).
    SystemEvent {
        /// Which vCPU.
        vcpu: u8,
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// The guest wrote "poweroff requested" to the guest-signal port.
    Poweroff,
    /// A vCPU exit the VMM cannot continue from.
    VcpuFatal {
        /// Which vCPU.
        vcpu: u8,
        /// Short name of the exit (`internal_error`, `fail_entry`, `unhandled_exit`).
        kind: &'static str,
        /// What KVM said.
        detail: String,
        /// The vCPU's registers, formatted.
        registers: String,
    },
    /// The VMM failed while the guest ran.
    VmmError(String),
    /// A host signal asked the VMM to stop.
    HostSignal(i32),
    /// The VM was paused and written to its `--snapshot-dir` (SIGUSR2); it ends here
    /// and goes on from the snapshot.
    Snapshotted,
}

impl ExitReason {
    /// The process exit status.
    pub fn status(&self) -> i32 {
        match self {
            Self::ResetI8042
            | Self::TripleFault { .. }
            | Self::Poweroff
            | Self::SystemEvent { .. }
            | Self::Snapshotted => STATUS_GUEST_ENDED,
            Self::VcpuFatal { .. } => STATUS_VCPU_FATAL,
            Self::VmmError(_) => STATUS_VMM_ERROR,
            Self::HostSignal(sig) => 128 + sig,
        }
    }

    /// The `exit_reason` value in the boot report.
    pub fn code_name(&self) -> &'static str {
        match self {
            Self::ResetI8042 => "reset_i8042",
            Self::TripleFault { .. } => "triple_fault",
            Self::SystemEvent { .. } => "system_event",
            Self::Poweroff => "poweroff",
            Self::VcpuFatal { kind, .. } => kind,
            Self::VmmError(_) => "vmm_error",
            Self::HostSignal(_) => "host_signal",
            Self::Snapshotted => "snapshotted",
        }
    }

    /// The one line printed on stderr (followed by registers for fatal exits).
    pub fn message(&self) -> String {
        match self {
            Self::ResetI8042 => "mvm-vmm: guest reset (i8042)".to_string(),
            Self::TripleFault { vcpu } => format!("mvm-vmm: guest triple fault (vcpu {vcpu})"),
            Self::SystemEvent { vcpu, kind } => {
                format!("mvm-vmm: guest system event {kind} (vcpu {vcpu})")
            }
            Self::Poweroff => "mvm-vmm: guest poweroff".to_string(),
            Self::VcpuFatal {
                vcpu,
                kind,
                detail,
                registers,
            } => format!("mvm-vmm: fatal vcpu {vcpu} exit {kind}: {detail}\n{registers}"),
            Self::VmmError(e) => format!("mvm-vmm: error: {e}"),
            Self::HostSignal(sig) => format!("mvm-vmm: stopped by host signal {sig}"),
            Self::Snapshotted => {
                "mvm-vmm: VM paused and written to its snapshot directory".to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_endings_are_success_and_faults_are_not() {
        assert_eq!(ExitReason::ResetI8042.status(), 0);
        assert_eq!(ExitReason::Poweroff.status(), 0);
        assert_eq!(ExitReason::TripleFault { vcpu: 1 }.status(), 0);
        let fatal = ExitReason::VcpuFatal {
            vcpu: 0,
            kind: "internal_error",
            detail: "suberror 1".into(),
            registers: "rip=0x0".into(),
        };
        assert_eq!(fatal.status(), STATUS_VCPU_FATAL);
        assert!(fatal.message().contains("rip=0x0"));
        assert_eq!(ExitReason::HostSignal(15).status(), 143);
        assert_eq!(
            ExitReason::ResetI8042.message(),
            "mvm-vmm: guest reset (i8042)"
        );
        assert!(ExitReason::TripleFault { vcpu: 0 }
            .message()
            .starts_with("mvm-vmm: guest triple fault"));
        assert_eq!(ExitReason::Poweroff.message(), "mvm-vmm: guest poweroff");
    }
}
