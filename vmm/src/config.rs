//! The VM's configuration, resolved once: the command line ([`Args`]) and, when
//! the VMM boots from a signed plan, that plan, merged and checked here into one
//! [`VmConfig`] before anything touches KVM. A bad value never creates a VM, and
//! its error names the value and what it broke.
//!
//! Three sources, one rule each:
//!
//! - **The plan** pins vCPUs, memory and the devices. A flag left out takes the
//!   plan's value; a flag given must agree with it, or the boot is refused
//!   ([`PlanDisagreement`], a plan refusal with its own exit status and a
//!   `boot_refused` event). Nothing is silently overridden either way.
//! - **The defaults** ([`DEFAULT_VCPUS`], [`DEFAULT_MEM_MIB`]) apply only without a
//!   plan (`--dev`).
//! - **The host** bounds what is asked whoever asked it: vCPUs and memory go
//!   through `mvm_loader::limits` (the runtime admits against the same functions),
//!   memory against the host's MemAvailable unless `MVM_ALLOW_MEM_OVERCOMMIT=1`.
//!
//! Then the kernel and initramfs are read once (what is measured is what is booted;
//! with `--dev`, where nothing is measured, they are opened and their headers read, and
//! the load reads them straight into guest memory: [`crate::image`]) and checked against
//! the memory size, the command line is checked, and the console log is created.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use mvm_loader::kernel::{self, KernelError, KernelInfo, MAX_KERNEL_SIZE};
use mvm_loader::limits::{self, LimitError};
use mvm_loader::plan::Plan;

use crate::cli::Args;
use crate::devices;
use crate::error::PlanDisagreement;
use crate::image::Image;
use crate::layout;

/// vCPUs without `--vcpus` and without a plan.
pub const DEFAULT_VCPUS: u32 = 1;
/// Guest memory in MiB without `--mem-mib` and without a plan.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Largest initramfs accepted.
pub const MAX_INITRD_SIZE: u64 = 1 << 30;

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
    /// The kernel image, open.
    pub kernel: Image,
    /// What the kernel's headers say.
    pub kernel_info: KernelInfo,
    /// Where the initramfs came from (for messages).
    pub initrd_path: Option<PathBuf>,
    /// The initramfs, if any, open.
    pub initrd: Option<Image>,
    /// Load the kernel and initramfs hashed, for verified boot to compare with the plan
    /// before the first guest instruction (a signed plan); `--dev` loads them unhashed.
    pub hash_images: bool,
    /// The kernel command line, as given.
    pub cmdline: String,
    /// vCPU count, 1..=`limits::MAX_VCPUS`.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Console destination.
    pub console: ConsoleTarget,
}

/// What the host allows, read once (and made up in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// MemAvailable in MiB; `None` when it cannot be read (only the ceiling applies).
    pub mem_available_mib: Option<u64>,
    /// `MVM_ALLOW_MEM_OVERCOMMIT=1`: the ceiling is the only memory bound.
    pub allow_overcommit: bool,
}

impl HostLimits {
    /// This host, now.
    pub fn of_this_host() -> Self {
        Self {
            mem_available_mib: limits::host_mem_available_mib(),
            allow_overcommit: limits::overcommit_allowed_by_env(),
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad argument, or more than the host allows (exit status 2).
    #[error(transparent)]
    Arg(#[from] ArgError),
    /// A flag disagrees with the signed plan (refused as `plan_mismatch`).
    #[error(transparent)]
    Plan(#[from] PlanDisagreement),
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
    /// vCPUs or memory outside `mvm_loader::limits` (or what the host can back).
    #[error("{origin}: {source}")]
    Limit {
        /// Where the value came from, with the value (`--mem-mib 1048576`).
        origin: Origin,
        /// Which limit, with the value and the limit.
        source: LimitError,
    },
    /// Memory too small for what must be loaded into it.
    #[error("{origin}: {why}")]
    Memory {
        /// Where the value came from, with the value.
        origin: Origin,
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

/// Where a resolved resource value came from, for messages: `--mem-mib 256`,
/// `the signed plan's memory_mib 256`, `--mem-mib 128 (the default)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The flag that sets it.
    pub flag: &'static str,
    /// The plan's field that pins it.
    pub field: &'static str,
    /// Who said so.
    pub source: Source,
    /// The value.
    pub value: u64,
}

/// Who set a resource value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The flag (and, with a plan, the plan agrees).
    CommandLine,
    /// The signed plan (the flag was left out).
    Plan,
    /// Neither: the default (only without a plan).
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            flag,
            field,
            source,
            value,
        } = self;
        match source {
            Source::CommandLine => write!(f, "{flag} {value}"),
            Source::Plan => write!(f, "the signed plan's {field} {value}"),
            Source::Default => write!(f, "{flag} {value} (the default)"),
        }
    }
}

/// Settles one value pinned by the plan: the plan's when the flag is left out; the
/// flag's when it agrees; a disagreement otherwise. Without a plan, the flag or `default`.
fn settle(
    flag: &'static str,
    field: &'static str,
    given: Option<u64>,
    pinned: Option<u64>,
    default: u64,
) -> Result<Origin, PlanDisagreement> {
    let (source, value) = match (given, pinned) {
        (Some(given), Some(plan)) if given != plan => {
            return Err(PlanDisagreement {
                flag,
                given: given.to_string(),
                field,
                plan: plan.to_string(),
            })
        }
        (Some(given), _) => (Source::CommandLine, given),
        (None, Some(plan)) => (Source::Plan, plan),
        (None, None) => (Source::Default, default),
    };
    Ok(Origin {
        flag,
        field,
        source,
        value,
    })
}

/// vCPUs and memory, settled between the command line and the plan and within the
/// host's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// vCPU count, 1..=`limits::MAX_VCPUS`.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Where the memory size came from (for later messages about it).
    pub mem_origin: Origin,
}

impl Resources {
    /// Guest memory in bytes (cannot overflow: `limits::MAX_MEMORY_MIB` is 1 TiB).
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib.saturating_mul(1 << 20)
    }
}

/// Settles `--vcpus` and `--mem-mib` against the plan's resources (when there is a
/// plan), then checks both against `mvm_loader::limits` and `host`. A disagreement with
/// the plan is reported before any limit: it is the more specific fault.
pub fn resolve_resources(
    args: &Args,
    plan: Option<&Plan>,
    host: &HostLimits,
) -> Result<Resources, ConfigError> {
    let pinned = plan.map(|p| p.resources);
    let vcpus = settle(
        "--vcpus",
        "vcpus",
        args.vcpus.map(u64::from),
        pinned.map(|r| u64::from(r.vcpus)),
        u64::from(DEFAULT_VCPUS),
    )?;
    let mem = settle(
        "--mem-mib",
        "memory_mib",
        args.mem_mib,
        pinned.map(|r| u64::from(r.memory_mib)),
        DEFAULT_MEM_MIB,
    )?;
    let limit = |origin: Origin| move |source| ArgError::Limit { origin, source };
    let vcpu_count = u32::try_from(vcpus.value).unwrap_or(u32::MAX);
    limits::check_vcpus(vcpu_count).map_err(limit(vcpus))?;
    let vcpu_count = u8::try_from(vcpu_count)
        .map_err(|_| limit(vcpus)(LimitError::Vcpus { vcpus: vcpu_count }))?;
    limits::check_memory(mem.value, host.mem_available_mib, host.allow_overcommit)
        .map_err(limit(mem))?;
    Ok(Resources {
        vcpus: vcpu_count,
        mem_mib: mem.value,
        mem_origin: mem,
    })
}

/// Resolves `args` and the verified `plan` (none with `--dev`) into a [`VmConfig`]:
/// resources and devices against the plan, resources against the host, then the
/// kernel and initramfs read and checked, the command line checked, the console log
/// created. Measuring the artifacts against the plan is the caller's next step.
pub fn resolve(
    args: &Args,
    plan: Option<&Plan>,
    host: &HostLimits,
) -> Result<VmConfig, ConfigError> {
    let resources = resolve_resources(args, plan, host)?;
    if let Some(plan) = plan {
        devices::check_plan(&args.devices, plan)?;
    }
    // The images stay open files, read straight into guest memory; with a plan they are
    // hashed in that same pass.
    let mut config = validate(args, &resources)?;
    config.hash_images = plan.is_some();
    Ok(config)
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

/// Where the serial console goes: stdout, or `--console-log`'s file, created now.
pub fn console_target(path: Option<&Path>) -> Result<ConsoleTarget, ArgError> {
    Ok(match path {
        None => ConsoleTarget::Stdout,
        Some(path) => {
            ConsoleTarget::File(File::create(path).map_err(|source| ArgError::ConsoleLog {
                path: path.to_path_buf(),
                source,
            })?)
        }
    })
}

/// Reads and checks what `args` name for settled `resources`: the kernel and
/// initramfs (opened, the kernel's headers read) against the memory size, the command
/// line; creates the console log.
fn validate(args: &Args, resources: &Resources) -> Result<VmConfig, ArgError> {
    let origin = resources.mem_origin;
    let mib = resources.mem_mib;
    let mem_bytes = resources.mem_bytes();

    // clap makes --kernel required unless --restore, which never comes here.
    let kernel_path = args.kernel.clone().unwrap_or_default();
    let (kernel, size) = Image::open(&kernel_path).map_err(|source| ArgError::KernelRead {
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
    let kernel_info = kernel.inspect_kernel().map_err(kernel_err)?;
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
            origin,
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
            let (image, size) = Image::open(path).map_err(|source| ArgError::InitrdRead {
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
                origin,
                why: format!(
                    "{mib} MiB is too small for the kernel and initramfs: the kernel needs up to {:#x} and the {size}-byte initramfs {} must fit above it, below {low_end:#x}",
                    kernel_info.load_end,
                    path.display()
                ),
            })?;
            Some(image)
        }
    };

    check_cmdline(&args.cmdline)?;

    let console = console_target(args.console_log.as_deref())?;

    Ok(VmConfig {
        kernel_path,
        kernel,
        kernel_info,
        initrd_path: args.initrd.clone(),
        initrd,
        cmdline: args.cmdline.clone(),
        hash_images: false,
        vcpus: resources.vcpus,
        mem_bytes,
        console,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;
    use mvm_loader::measure::Sha256Digest;
    use mvm_loader::plan::{
        Artifacts, Devices, EgressPolicy, GuestPolicy, NetDevice, NetInterface, Tier, UtcTime,
        VsockDevice, SCHEMA_VERSION,
    };

    /// A valid tiny ELF kernel loading at 16 MiB.
    pub(crate) fn elf_file(dir: &Path) -> PathBuf {
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

    /// A plan for `kernel` booted with `cmdline`: 2 vCPUs, 256 MiB, no devices.
    pub(crate) fn plan_for(kernel: &Path, cmdline: &str) -> Plan {
        let now = UtcTime::now();
        Plan {
            schema_version: SCHEMA_VERSION,
            plan_id: "config-test".into(),
            not_before: now.saturating_sub(std::time::Duration::from_secs(60)),
            not_after: now.saturating_add(std::time::Duration::from_secs(600)),
            nonce: "c0".repeat(16),
            artifacts: Artifacts {
                kernel: Sha256Digest::of(&std::fs::read(kernel).unwrap()),
                initramfs: None,
                cmdline: Sha256Digest::of(cmdline.as_bytes()),
                disks: Vec::new(),
            },
            resources: mvm_loader::plan::Resources {
                vcpus: 2,
                memory_mib: 256,
                timeout_secs: 60,
            },
            devices: Devices {
                vsock: None,
                scratch_disks: Vec::new(),
                net: None,
            },
            guest: GuestPolicy {
                uid: 1000,
                gid: 1000,
                max_processes: 16,
                max_open_files: 64,
                max_file_size_mib: 16,
            },
            secrets: Vec::new(),
            substitution: None,
            required_tier: Tier::Hardware,
        }
    }

    /// A host with 4 GiB available and no overcommit.
    const HOST: HostLimits = HostLimits {
        mem_available_mib: Some(4096),
        allow_overcommit: false,
    };

    fn args(kernel: &Path) -> Args {
        Args::try_parse_from(["mvm-vmm", "--kernel", kernel.to_str().unwrap()]).unwrap()
    }

    fn args_with(extra: &[&str]) -> Args {
        let mut argv = vec!["mvm-vmm", "--kernel", "/k"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn validate_dev(a: &Args) -> Result<VmConfig, ConfigError> {
        resolve(a, None, &HOST)
    }

    #[test]
    fn a_good_configuration_validates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = validate_dev(&args(&elf_file(dir.path()))).unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.mem_bytes, 128 << 20);
        assert_eq!(cfg.kernel_info.load_end, 0x110_0000);
    }

    #[test]
    fn the_images_stay_open_files_and_a_plan_has_them_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let k = elf_file(dir.path());
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, b"070701").unwrap();
        let mut a = args(&k);
        a.initrd = Some(initrd);
        let dev = validate_dev(&a).unwrap();
        assert_eq!(dev.kernel.len(), 121);
        assert_eq!(dev.initrd.as_ref().map(Image::len), Some(6));
        assert_eq!(dev.kernel_info.load_end, 0x110_0000);
        assert!(!dev.hash_images);
        let plan = plan_for(&k, &a.cmdline);
        let signed = resolve(&a, Some(&plan), &HOST).unwrap();
        assert!(signed.hash_images);
        assert_eq!(signed.kernel.len(), 121);
    }

    #[test]
    fn each_bad_argument_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let k = elf_file(dir.path());
        let msg = |mut a: Args, f: &dyn Fn(&mut Args)| {
            f(&mut a);
            validate_dev(&a).unwrap_err().to_string()
        };
        let m = msg(args(&k), &|a| a.vcpus = Some(0));
        assert!(m.starts_with("--vcpus 0"), "{m}");
        let m = msg(args(&k), &|a| a.vcpus = Some(33));
        assert!(m.starts_with("--vcpus 33") && m.contains("and 32"), "{m}");
        let m = msg(args(&k), &|a| a.mem_mib = Some(1));
        assert!(
            m.starts_with("--mem-mib 1:") && m.contains("too small for the kernel"),
            "{m}"
        );
        let m = msg(args(&k), &|a| a.mem_mib = Some(0));
        assert!(m.starts_with("--mem-mib 0"), "{m}");
        let m = msg(args(&k), &|a| a.mem_mib = Some(u64::MAX));
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
        a.mem_mib = Some(18); // kernel needs 17 MiB; 2 MiB initrd does not fit in 1 MiB
        let m = validate_dev(&a).unwrap_err().to_string();
        assert!(m.contains("kernel and initramfs"), "{m}");
        a.mem_mib = Some(32);
        assert_eq!(validate_dev(&a).unwrap().initrd.unwrap().len(), 2 << 20);
        a.initrd = Some(dir.path().join("missing"));
        assert!(validate_dev(&a)
            .unwrap_err()
            .to_string()
            .starts_with("--initrd"));
    }

    #[test]
    fn memory_the_host_cannot_back_is_refused_naming_both_numbers() {
        let a = args_with(&["--mem-mib", "1048576"]);
        let e = resolve_resources(&a, None, &HOST).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, ConfigError::Arg(ArgError::Limit { .. })), "{m}");
        assert!(m.starts_with("--mem-mib 1048576:"), "{m}");
        assert!(m.contains("4096 MiB available"), "{m}");
        assert!(m.contains(limits::ALLOW_OVERCOMMIT_ENV), "{m}");
        // Overcommit on purpose raises the bound to the ceiling, and no further.
        let overcommit = HostLimits {
            allow_overcommit: true,
            ..HOST
        };
        assert_eq!(
            resolve_resources(&a, None, &overcommit).unwrap().mem_mib,
            limits::MAX_MEMORY_MIB
        );
        let over = (limits::MAX_MEMORY_MIB + 1).to_string();
        let m = resolve_resources(&args_with(&["--mem-mib", &over]), None, &overcommit)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains(&over) && m.contains(&limits::MAX_MEMORY_MIB.to_string()),
            "{m}"
        );
        // MemAvailable unreadable: only the ceiling applies.
        let unknown = HostLimits {
            mem_available_mib: None,
            allow_overcommit: false,
        };
        assert!(resolve_resources(&a, None, &unknown).is_ok());
    }

    #[test]
    fn the_plans_memory_goes_through_the_same_host_check() {
        let dir = tempfile::tempdir().unwrap();
        let mut plan = plan_for(&elf_file(dir.path()), "x");
        plan.resources.memory_mib = 8192;
        let m = resolve_resources(&args_with(&[]), Some(&plan), &HOST)
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("the signed plan's memory_mib 8192:") && m.contains("4096 MiB"),
            "{m}"
        );
    }

    #[test]
    fn vcpus_agree_disagree_or_come_from_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan_for(&elf_file(dir.path()), "x");
        // Absent: the plan's value; without a plan, the default.
        let r = resolve_resources(&args_with(&[]), Some(&plan), &HOST).unwrap();
        assert_eq!(r.vcpus, 2);
        let r = resolve_resources(&args_with(&[]), None, &HOST).unwrap();
        assert_eq!(u32::from(r.vcpus), DEFAULT_VCPUS);
        // Agrees: fine.
        let r = resolve_resources(&args_with(&["--vcpus", "2"]), Some(&plan), &HOST).unwrap();
        assert_eq!(r.vcpus, 2);
        // Disagrees, even with the value that used to be the clap default.
        let e = resolve_resources(&args_with(&["--vcpus", "1"]), Some(&plan), &HOST).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vcpus 1 disagrees with the signed plan's vcpus 2"
        );
        assert!(matches!(e, ConfigError::Plan(_)));
    }

    #[test]
    fn memory_agrees_disagrees_or_comes_from_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan_for(&elf_file(dir.path()), "x");
        let r = resolve_resources(&args_with(&[]), Some(&plan), &HOST).unwrap();
        assert_eq!((r.mem_mib, r.mem_origin.source), (256, Source::Plan));
        assert_eq!(r.mem_bytes(), 256 << 20);
        let r = resolve_resources(&args_with(&[]), None, &HOST).unwrap();
        assert_eq!(
            (r.mem_mib, r.mem_origin.source),
            (DEFAULT_MEM_MIB, Source::Default)
        );
        let r = resolve_resources(&args_with(&["--mem-mib", "256"]), Some(&plan), &HOST).unwrap();
        assert_eq!((r.mem_mib, r.mem_origin.source), (256, Source::CommandLine));
        let e =
            resolve_resources(&args_with(&["--mem-mib", "128"]), Some(&plan), &HOST).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--mem-mib 128 disagrees with the signed plan's memory_mib 256"
        );
        // The disagreement is named before any host limit.
        let e = resolve_resources(&args_with(&["--mem-mib", "1048576"]), Some(&plan), &HOST)
            .unwrap_err();
        assert!(matches!(e, ConfigError::Plan(_)), "{e}");
    }

    #[test]
    fn vsock_and_net_agree_disagree_or_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let mut plan = plan_for(&elf_file(dir.path()), "x");
        let vsock = ["--vsock", "cid=3,uds=/tmp/v.sock"];
        // Absent from both, or only from the command line: fine.
        devices::check_plan(&args_with(&[]).devices, &plan).unwrap();
        let e = devices::check_plan(&args_with(&vsock).devices, &plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vsock cid 3 disagrees with the signed plan's devices.vsock none"
        );
        plan.devices.vsock = Some(VsockDevice::new(3));
        devices::check_plan(&args_with(&vsock).devices, &plan).unwrap();
        devices::check_plan(&args_with(&[]).devices, &plan).unwrap();
        plan.devices.vsock = Some(VsockDevice::new(4));
        let e = devices::check_plan(&args_with(&vsock).devices, &plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vsock cid 3 disagrees with the signed plan's devices.vsock.guest_cid 4"
        );
        plan.devices.vsock = None;

        let net = ["--net", "tap=tap0,mac=02:00:00:00:00:01"];
        let e = devices::check_plan(&args_with(&net).devices, &plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net tap tap0 disagrees with the signed plan's devices.net none"
        );
        let interface = |mac: &str| NetInterface {
            mac: mac.into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.2.2".parse().unwrap(),
            resolvers: vec![],
        };
        plan.devices.net = Some(NetDevice {
            interface: None,
            egress: EgressPolicy::default(),
        });
        devices::check_plan(&args_with(&net).devices, &plan).unwrap();
        plan.devices.net = Some(NetDevice {
            interface: Some(interface("02:00:00:00:00:01")),
            egress: EgressPolicy::default(),
        });
        devices::check_plan(&args_with(&net).devices, &plan).unwrap();
        devices::check_plan(&args_with(&[]).devices, &plan).unwrap();
        plan.devices.net = Some(NetDevice {
            interface: Some(interface("02:00:00:00:00:02")),
            egress: EgressPolicy::default(),
        });
        let e = devices::check_plan(&args_with(&net).devices, &plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net mac 02:00:00:00:00:01 disagrees with the signed plan's \
             devices.net.interface.mac 02:00:00:00:00:02"
        );
    }

    #[test]
    fn the_help_states_the_shared_limits() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains(&format!("1..={}", limits::MAX_VCPUS)),
            "{help}"
        );
        assert!(help.contains(&limits::MAX_MEMORY_MIB.to_string()), "{help}");
        assert!(help.contains(limits::ALLOW_OVERCOMMIT_ENV), "{help}");
    }
}
