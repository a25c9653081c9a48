//! Command-line arguments, as clap parses them. Nothing here is checked against
//! the host or the plan: [`crate::config::resolve`] turns these and the signed plan
//! into one validated [`crate::config::VmConfig`] before anything touches KVM.
//!
//! What a signed plan pins and a flag can also say (vCPUs, memory) is an `Option`
//! here: absent means "the plan's value" (or the default without a plan), and an
//! explicit value must agree with the plan.

use std::path::PathBuf;

use clap::Parser;

use crate::exit::EXIT_STATUS_HELP;

/// Command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// `mvm-vmm` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "mvm-vmm",
    version,
    about = "A minimal KVM VMM: boots a Linux kernel (ELF vmlinux or bzImage) with a serial console.",
    after_help = EXIT_STATUS_HELP
)]
pub struct Args {
    /// Guest kernel: an ELF vmlinux (x86_64) or a bzImage. Required unless --restore.
    #[arg(long, value_name = "FILE", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Start from the sealed snapshot in DIR instead of booting a kernel
    /// (docs/snapshots.md). Its seal must verify with a --trust key; with --plan, the
    /// plan must be the one the snapshot was taken under (its signature and window are
    /// checked, its nonce is not: the boot spent it); with --dev, only a snapshot of a
    /// development boot restores. Every check is made before guest memory is mapped.
    /// The kernel, initramfs, command line, vCPUs and memory are the snapshot's: giving
    /// any of them as well is an error.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib"]
    )]
    pub restore: Option<PathBuf>,
    /// The sandbox's current epoch: a snapshot of an older epoch is refused (rollback)
    /// [default: 0].
    #[arg(long, value_name = "N")]
    pub restore_min_epoch: Option<u64>,
    /// Initramfs (newc cpio, optionally compressed) loaded high in guest RAM.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended to it).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs, 1..=32 [default: 1; with --plan, the plan's, and a value given
    /// here must equal it].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB [default: 128; with --plan, the plan's, and a value given here
    /// must equal it]. Refused before any VM exists when it is more than the host's
    /// MemAvailable (/proc/meminfo); MVM_ALLOW_MEM_OVERCOMMIT=1 allows up to 1048576
    /// (1 TiB), the hard ceiling.
    #[arg(long, value_name = "M")]
    pub mem_mib: Option<u64>,
    /// Write the guest serial console here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Write a JSON boot report (phase timestamps, exit reason) here on exit.
    #[arg(long, value_name = "FILE")]
    pub boot_report: Option<PathBuf>,
    /// On SIGUSR2, pause the VM, write its snapshot here and exit (status 0, exit reason
    /// `snapshotted`; with --snapshot-continue, resume instead). The directory must
    /// exist; its `memory`, `state.json` and `manifest.json` are created (empty) at
    /// start, and stay empty if no snapshot is taken. The manifest is written last and
    /// unsigned: whoever holds a trusted key seals it (docs/snapshots.md). One snapshot
    /// per directory: a second SIGUSR2 is logged and ignored.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// The sandbox epoch the snapshot is bound to (a restore at a later epoch refuses it)
    /// [default: 0].
    #[arg(long, value_name = "N", requires = "snapshot_dir")]
    pub snapshot_epoch: Option<u64>,
    /// After writing the snapshot, resume the VM instead of ending it: the source of a
    /// fork, or the first VM of a warm pool, goes on while restores start from its
    /// snapshot.
    #[arg(long, requires = "snapshot_dir")]
    pub snapshot_continue: bool,
    /// Bind the snapshot to the measured artifacts the plan pins (kernel, initramfs,
    /// command line, disks) instead of to the plan: a warm start's snapshot, restored
    /// under any fresh plan that pins the same, the same vCPUs and memory, with its
    /// window open and its nonce unspent. Needs --plan.
    #[arg(long, requires = "snapshot_dir")]
    pub snapshot_bind_artifacts: bool,
    /// The devices: --disk, --vsock, --net (each declared by its module in `devices/`).
    #[command(flatten)]
    pub devices: crate::devices::DeviceArgs,
    /// Verified boot: --plan, --trust, --replay-store, --events, --dev.
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// The jail (on by default): --no-jail, --jail-uid, --jail-gid, --jail-dir, --cgroup-parent.
    #[command(flatten)]
    pub jail: crate::jail::JailArgs,
}

/// Verified-boot arguments (flattened into [`Args`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VerifyArgs {
    /// The signed execution plan (a DSSE envelope). Its digests, command line, vCPUs,
    /// memory and disks must match the other arguments, or the boot is refused.
    #[arg(long, value_name = "ENVELOPE", conflicts_with = "dev")]
    pub plan: Option<PathBuf>,
    /// A public key file (`mvm-ed25519-public <base64>`) trusted to sign plans and to
    /// seal snapshots. Repeatable; required with --plan and with --restore.
    #[arg(long = "trust", value_name = "PUBKEY")]
    pub trust: Vec<PathBuf>,
    /// The host's nonce store (default: $MVM_DATA_DIR/replay-nonces, else
    /// $XDG_DATA_HOME/mvm/replay-nonces, else ~/.local/share/mvm/replay-nonces,
    /// else /var/lib/mvm/replay-nonces).
    #[arg(long, value_name = "FILE", requires = "plan")]
    pub replay_store: Option<PathBuf>,
    /// Append events (boot_verified, boot_refused, verity_failure, vm_exit) here as
    /// JSON lines, for the supervisor's audit log.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Development mode: boot without a plan. NOTHING IS VERIFIED.
    #[arg(long)]
    pub dev: bool,
}

impl Args {
    /// What clap cannot say in its attributes: `--trust` verifies a plan or a snapshot's
    /// seal, so it needs `--plan` or `--restore` (a requirement on either of two
    /// arguments; clap's groups would loosen `--replay-store`'s own requirement of
    /// `--plan`); `--restore-min-epoch` needs `--restore` (clap drops a requirement on an
    /// argument that conflicts with one given, as `--restore` does with `--kernel`).
    pub fn check(&self) -> Result<(), String> {
        if !self.verify.trust.is_empty() && self.verify.plan.is_none() && self.restore.is_none() {
            return Err("--trust needs --plan or --restore".into());
        }
        if self.restore_min_epoch.is_some() && self.restore.is_none() {
            return Err("--restore-min-epoch needs --restore".into());
        }
        if self.snapshot_bind_artifacts && self.verify.plan.is_none() {
            return Err(
                "--snapshot-bind-artifacts needs --plan: only verified artifacts are bound".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_takes_nothing_the_snapshot_already_is() {
        let ok = Args::try_parse_from(["mvm-vmm", "--restore", "/s", "--dev"]).unwrap();
        assert_eq!(ok.restore.as_deref(), Some(std::path::Path::new("/s")));
        assert_eq!(ok.cmdline, DEFAULT_CMDLINE);
        for extra in [
            ["--kernel", "/k"],
            ["--initrd", "/i"],
            ["--cmdline", "quiet"],
            ["--vcpus", "2"],
            ["--mem-mib", "64"],
        ] {
            let argv = ["mvm-vmm", "--restore", "/s", "--dev", extra[0], extra[1]];
            assert!(Args::try_parse_from(argv).is_err(), "{extra:?}");
        }
        // Without --restore, --kernel is required; --trust needs --plan or --restore.
        assert!(Args::try_parse_from(["mvm-vmm", "--dev"]).is_err());
        let restore = Args::try_parse_from(["mvm-vmm", "--restore", "/s", "--trust", "/k"]);
        assert!(restore.unwrap().check().is_ok());
        let boot = Args::try_parse_from(["mvm-vmm", "--kernel", "/k", "--trust", "/p"]).unwrap();
        assert!(boot.check().is_err());
        assert!(
            Args::try_parse_from(["mvm-vmm", "--kernel", "/k", "--replay-store", "/r"]).is_err()
        );
        let epoch = Args::try_parse_from(["mvm-vmm", "--restore-min-epoch", "3", "--kernel", "/k"]);
        assert!(epoch.unwrap().check().is_err());
        assert!(
            Args::try_parse_from(["mvm-vmm", "--snapshot-epoch", "3", "--kernel", "/k"]).is_err()
        );
    }
}
