//! Command-line arguments, and their validation into a [`VmConfig`] before
//! anything touches KVM: a bad argument never creates a VM, and its error
//! names the argument and the value.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Parser;
use linux_loader::cmdline::Cmdline;
use mvm_loader::kernel::{self, KernelError, KernelInfo, MAX_KERNEL_SIZE};

use crate::exit::EXIT_STATUS_HELP;
use crate::layout;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Largest initramfs accepted.
pub const MAX_INITRD_SIZE: u64 = 1 << 30;
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
    /// Guest kernel: an ELF vmlinux (x86_64) or a bzImage.
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed) loaded high in guest RAM.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended to it).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs (1..=32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "M", default_value_t = 128)]
    pub mem_mib: u64,
    /// Write the guest serial console here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Write a JSON boot report (phase timestamps, exit reason) here on exit.
    #[arg(long, value_name = "FILE")]
    pub boot_report: Option<PathBuf>,
    /// A virtio-blk disk backed by FILE, read-only or read-write, with an optional id
    /// (`/sys/block/vdX/serial`). Repeatable: /dev/vda, /dev/vdb, ... in order.
    #[arg(
        long = "disk",
        value_name = "path=FILE,ro|rw[,id=ID]",
        value_parser = crate::virtio_devices::parse_disk_arg
    )]
    pub disks: Vec<mvm_devices::virtio::block::DiskConfig>,
    /// A virtio-vsock device for guest CID N; host processes reach it through the Unix
    /// socket PATH (`CONNECT <port>`), guest connections to host port P go to `PATH_P`.
    #[arg(
        long = "vsock",
        value_name = "cid=N,uds=PATH",
        value_parser = crate::vsock::parse_vsock_value
    )]
    pub vsock: Option<mvm_devices::virtio::vsock::VsockConfig>,
    /// A virtio-net device on the host tap NAME with guest MAC MAC. Frames the guest sends
    /// pass only where the policy FILE allows (nothing passes without one).
    #[arg(
        long = "net",
        value_name = "tap=NAME,mac=MAC[,policy=FILE]",
        value_parser = crate::net::parse_net_value
    )]
    pub net: Option<crate::net::NetArg>,
    /// Verified boot: --plan, --trust, --replay-store, --events, --dev.
    #[command(flatten)]
    pub verify: crate::verified_boot::VerifyArgs,
    /// The jail (on by default): --no-jail, --jail-uid, --jail-gid, --jail-dir, --cgroup-parent.
    #[command(flatten)]
    pub jail: crate::jail::JailArgs,
}

/// Where the guest console goes.
#[derive(Debug)]
pub enum ConsoleTarget {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated during validation).
    File(File),
}

/// A validated VM configuration: everything needed to boot, already read.
#[derive(Debug)]
pub struct VmConfig {
    /// Where the kernel came from (for messages).
    pub kernel_path: PathBuf,
    /// The kernel image bytes.
    pub kernel: Vec<u8>,
    /// What the kernel's headers say.
    pub kernel_info: KernelInfo,
    /// The initramfs bytes, if any.
    pub initrd: Option<Vec<u8>>,
    /// The kernel command line, as given.
    pub cmdline: String,
    /// vCPU count, 1..=32.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Console destination.
    pub console: ConsoleTarget,
}

/// A rejected argument.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// The kernel file cannot be read.
    #[error("--kernel {path}: cannot read: {source}")]
    KernelRead {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is not something this VMM boots.
    #[error("--kernel {path}: {source}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: KernelError,
    },
    /// The initramfs file cannot be read.
    #[error("--initrd {path}: cannot read: {source}")]
    InitrdRead {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs is too large.
    #[error("--initrd {path}: {size} bytes is more than the {max} bytes accepted")]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// vCPU count out of range.
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    /// Memory size unusable.
    #[error("--mem-mib {mib}: {why}")]
    Memory {
        /// The value given.
        mib: u64,
        /// Why.
        why: String,
    },
    /// The command line is invalid or too long.
    #[error("--cmdline {cmdline:?}: {why}")]
    Cmdline {
        /// The value given.
        cmdline: String,
        /// Why.
        why: String,
    },
    /// The console log cannot be created.
    #[error("--console-log {path}: cannot create: {source}")]
    ConsoleLog {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The boot report cannot be created.
    #[error("--boot-report {path}: cannot create: {source}")]
    BootReport {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads `path` if it holds at most `max` bytes; returns the bytes (none if
/// the file is larger) and the file size.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    if size <= max {
        // One allocation of the stated size (bounded by `max`) instead of
        // doubling; a file that grows meanwhile is still cut at `max + 1`.
        bytes.reserve_exact(usize::try_from(size).unwrap_or(0));
        file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    }
    Ok((bytes, size))
}

/// Creates the boot report file (done first, so that the report can record a
/// later argument error). The report is written through this handle at exit: the
/// jailed VMM may no longer reach the path.
pub fn check_boot_report(path: &Path) -> Result<File, ArgError> {
    File::create(path).map_err(|source| ArgError::BootReport {
        path: path.to_path_buf(),
        source,
    })
}

/// The command line must be printable ASCII and fit in the zero page's limit
/// (with room left for devices, checked again when they are appended).
fn check_cmdline(cmdline: &str) -> Result<(), ArgError> {
    let err = |why: String| ArgError::Cmdline {
        cmdline: cmdline.to_string(),
        why,
    };
    if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(err(format!("character {c:?} is not printable ASCII")));
    }
    Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Validates `args` into a [`VmConfig`]. Reads the kernel and initramfs (so
/// that what is checked is what is booted); creates the console log.
pub fn validate(args: &Args) -> Result<VmConfig, ArgError> {
    let vcpus = match u8::try_from(args.vcpus) {
        Ok(n) if (1..=MAX_VCPUS).contains(&args.vcpus) => n,
        _ => return Err(ArgError::Vcpus(args.vcpus)),
    };
    let mib = args.mem_mib;
    let mem_bytes = mib
        .checked_mul(1 << 20)
        .filter(|b| (1..=layout::MAX_MEMORY_BYTES).contains(b))
        .ok_or_else(|| ArgError::Memory {
            mib,
            why: format!(
                "must be between 1 and {} MiB",
                layout::MAX_MEMORY_BYTES >> 20
            ),
        })?;

    let kernel_path = args.kernel.clone();
    let (kernel, size) =
        read_bounded(&kernel_path, MAX_KERNEL_SIZE).map_err(|source| ArgError::KernelRead {
            path: kernel_path.clone(),
            source,
        })?;
    let kernel_err = |source| ArgError::Kernel {
        path: kernel_path.clone(),
        source,
    };
    if size > MAX_KERNEL_SIZE {
        return Err(kernel_err(KernelError::TooLarge {
            size,
            max: MAX_KERNEL_SIZE,
        }));
    }
    let kernel_info = kernel::inspect_kernel(&kernel).map_err(kernel_err)?;
    if kernel_info.load_start < layout::HIMEM_START {
        return Err(kernel_err(KernelError::BadElf(format!(
            "loads at {:#x}, below {:#x}",
            kernel_info.load_start,
            layout::HIMEM_START
        ))));
    }

    let low_end = layout::low_ram_end(mem_bytes);
    if kernel_info.load_end > low_end {
        return Err(ArgError::Memory {
            mib,
            why: format!(
                "{mib} MiB is too small for the kernel: the {} needs guest memory up to {:#x} ({} MiB)",
                kernel_info.format,
                kernel_info.load_end,
                kernel_info.load_end.div_ceil(1 << 20)
            ),
        });
    }

    let initrd = match &args.initrd {
        None => None,
        Some(path) => {
            let (bytes, size) =
                read_bounded(path, MAX_INITRD_SIZE).map_err(|source| ArgError::InitrdRead {
                    path: path.clone(),
                    source,
                })?;
            if size > MAX_INITRD_SIZE {
                return Err(ArgError::InitrdTooLarge {
                    path: path.clone(),
                    size,
                    max: MAX_INITRD_SIZE,
                });
            }
            kernel::place_initrd(size, kernel_info.load_end, low_end).map_err(|_| ArgError::Memory {
                mib,
                why: format!(
                    "{mib} MiB is too small for the kernel and initramfs: the kernel needs up to {:#x} and the {size}-byte initramfs {} must fit above it, below {low_end:#x}",
                    kernel_info.load_end,
                    path.display()
                ),
            })?;
            Some(bytes)
        }
    };

    check_cmdline(&args.cmdline)?;

    let console = match &args.console_log {
        None => ConsoleTarget::Stdout,
        Some(path) => {
            ConsoleTarget::File(File::create(path).map_err(|source| ArgError::ConsoleLog {
                path: path.clone(),
                source,
            })?)
        }
    };

    Ok(VmConfig {
        kernel_path,
        kernel,
        kernel_info,
        initrd,
        cmdline: args.cmdline.clone(),
        vcpus,
        mem_bytes,
        console,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid tiny ELF kernel loading at 16 MiB.
    fn elf_file(dir: &Path) -> PathBuf {
        let mut f = vec![0u8; 120];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        f[64..68].copy_from_slice(&1u32.to_le_bytes());
        f[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes());
        f[64 + 24..64 + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[64 + 32..64 + 40].copy_from_slice(&1u64.to_le_bytes());
        f[64 + 40..64 + 48].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f.push(0xf4);
        let p = dir.join("vmlinux");
        std::fs::write(&p, f).unwrap();
        p
    }

    fn args(kernel: &Path) -> Args {
        Args::try_parse_from(["mvm-vmm", "--kernel", kernel.to_str().unwrap()]).unwrap()
    }

    #[test]
    fn a_good_configuration_validates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = validate(&args(&elf_file(dir.path()))).unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.mem_bytes, 128 << 20);
        assert_eq!(cfg.kernel_info.load_end, 0x110_0000);
    }

    #[test]
    fn each_bad_argument_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let k = elf_file(dir.path());
        let msg = |mut a: Args, f: &dyn Fn(&mut Args)| {
            f(&mut a);
            validate(&a).unwrap_err().to_string()
        };
        let m = msg(args(&k), &|a| a.vcpus = 0);
        assert!(m.starts_with("--vcpus 0"), "{m}");
        let m = msg(args(&k), &|a| a.vcpus = 33);
        assert!(m.starts_with("--vcpus 33"), "{m}");
        let m = msg(args(&k), &|a| a.mem_mib = 1);
        assert!(
            m.starts_with("--mem-mib 1:") && m.contains("too small for the kernel"),
            "{m}"
        );
        let m = msg(args(&k), &|a| a.mem_mib = 0);
        assert!(m.starts_with("--mem-mib 0"), "{m}");
        let m = msg(args(&k), &|a| a.mem_mib = u64::MAX);
        assert!(m.starts_with("--mem-mib"), "{m}");
        let missing = dir.path().join("nope");
        let m = msg(args(&missing), &|_| {});
        assert!(m.starts_with("--kernel ") && m.contains("nope"), "{m}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let m = msg(args(&empty), &|_| {});
        assert!(
            m.contains("--kernel") && m.contains("empty (0 bytes)"),
            "{m}"
        );
        let text = dir.path().join("text");
        std::fs::write(&text, b"hello world").unwrap();
        let m = msg(args(&text), &|_| {});
        assert!(m.contains("neither an ELF vmlinux nor a bzImage"), "{m}");
        let m = msg(args(&k), &|a| a.cmdline = "a\u{1}b".into());
        assert!(m.starts_with("--cmdline"), "{m}");
        let m = msg(args(&k), &|a| {
            a.console_log = Some("/nonexistent/dir/log".into())
        });
        assert!(m.starts_with("--console-log /nonexistent/dir/log"), "{m}");
        let m = msg(args(dir.path()), &|_| {});
        assert!(m.starts_with("--kernel"), "{m}");
    }

    #[test]
    fn initrd_must_fit_with_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let k = elf_file(dir.path());
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 2 << 20]).unwrap();
        let mut a = args(&k);
        a.initrd = Some(initrd.clone());
        a.mem_mib = 18; // kernel needs 17 MiB; 2 MiB initrd does not fit in 1 MiB
        let m = validate(&a).unwrap_err().to_string();
        assert!(m.contains("kernel and initramfs"), "{m}");
        a.mem_mib = 32;
        assert_eq!(validate(&a).unwrap().initrd.unwrap().len(), 2 << 20);
        a.initrd = Some(dir.path().join("missing"));
        assert!(validate(&a)
            .unwrap_err()
            .to_string()
            .starts_with("--initrd"));
    }
}
