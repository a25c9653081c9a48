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
    after_help = EXIT_STATUS_HELP,
    // What a --trust key verifies: a plan, a snapshot's seal, or both.
    group = clap::ArgGroup::new("signed").args(["plan", "restore"]).multiple(true)
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
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd"])]
    pub restore: Option<PathBuf>,
    /// The sandbox's current epoch: a snapshot of an older epoch is refused (rollback).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "restore")]
    pub restore_min_epoch: u64,
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
    /// `snapshotted`). The directory must exist; its `memory`, `state.json` and
    /// `manifest.json` are created (empty) at start, and stay empty if no snapshot is
    /// taken. The manifest is written last and unsigned: whoever holds a trusted key
    /// seals it (docs/snapshots.md). Refused, with the VM left running, while a virtio
    /// device is attached (their state is not saved yet).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// The sandbox epoch the snapshot is bound to (a restore at a later epoch refuses it).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "snapshot_dir")]
    pub snapshot_epoch: u64,
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
    #[arg(long = "trust", value_name = "PUBKEY", requires = "signed")]
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
