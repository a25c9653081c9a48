//! The `emulated` backend: the same `mvm-vmm` and image, run by a static
//! `mvm` inside the project's QEMU-TCG test host (`scripts/build-testhost`),
//! whose emulated AMD SVM gives it a real KVM. Slow; the outer wall is
//! QEMU's emulator. See `docs/run.md`.
//!
//! Host side ([`run`]): QEMU boots the test host kernel with its
//! `base.cpio` followed by an overlay archive holding `/testhost/run`, the
//! static `mvm` and `mvm-vmm`, and the image. Four virtio-serial ports
//! connect to Unix sockets this process listens on:
//!
//! | port       | direction   | carries                                        |
//! |------------|-------------|------------------------------------------------|
//! | `mvm.ctl`  | both        | request, then `proceed`, `signal` and `resealed` (JSON lines) in; `started`, `unpacked`, `booted` and the final report (JSON lines) out |
//! | `mvm.in`   | host→guest  | the workload's stdin, closed at its end         |
//! | `mvm.out`  | guest→host  | the workload's stdout                           |
//! | `mvm.err`  | guest→host  | the workload's stderr                           |
//!
//! Test host side ([`guest_main`], `mvm __testhost-guest`): reads the
//! request, runs it with the `kvm` backend, and writes the report with the
//! outcome (or the error, by kind, so exit codes carry across) and the byte
//! counts of stdout and stderr, so the host knows when it has everything.
//!
//! Written ahead: for an audited run the inner `mvm` sends `booted` with the
//! VMM's events so far (its `boot_verified`) once the inner agent answered, and
//! waits for the host's `proceed`, which the host sends after appending them and
//! `exec_started` to its audit log; only then does the workload start. Ctrl-C
//! on the host travels as `signal` and is handled inside as a local one would be
//! (passed to the workload, the VM killed after the grace period).
//!
//! One file per job: [`protocol`] (the control lines and framed stdin),
//! [`overlay`] (the test host's initramfs), [`qemu`] (QEMU's command line and
//! process), [`host`] (the run on this host), [`stall`] (QEMU's stall, seen), [`uplink`]
//! (the test host's network, for `--net`), [`testhost`] (the run inside), [`warm`] (warm
//! starts, the snapshot carried between test hosts on a disk) and [`snapshot_pack`] (the
//! snapshot on that disk).

pub mod host;
pub mod overlay;
pub mod protocol;
pub mod qemu;
pub mod snapshot_pack;
pub mod spare;
pub mod stall;
pub mod testhost;
pub mod uplink;
pub mod warm;

pub use host::run;
pub use overlay::overlay_archive;
pub use protocol::{
    parse_record, FramedStdin, GuestErrorKind, GuestRecord, GuestRefusal, GuestRequest, HostRecord,
    PlanBundle, PORT_CTL, PORT_ERR, PORT_IN, PORT_OUT,
};
pub use qemu::{qemu_args, testhost_memory_mib};
pub use testhost::guest_main;

#[cfg(test)]
mod tests {
    use crate::backend::{RunSpec, StdinMode};

    pub(super) fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: Default::default(),
            workdir: None,
            cpus: 1,
            mem_mib: 128,
            timeout_secs: Some(2),
            stdin: StdinMode::Null,
            disks: vec![],
            ready_timeout_secs: 30,
            net: None,
            egress_trust: None,
        }
    }
}
