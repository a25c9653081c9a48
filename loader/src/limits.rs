//! The bounds on a VM's resources, in one place: the runtime checks a request
//! against them before it admits a plan, and the VMM checks its configuration
//! against them before it creates a VM. Both ends use these functions, so a
//! size one accepts the other does not refuse late.

use std::path::Path;

/// Most vCPUs a VM may have (the MP table and the per-vCPU APIC ids are laid
/// out for this many).
pub const MAX_VCPUS: u32 = 32;

/// The hard ceiling on guest memory, whatever the host has: 1 TiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Why a resource request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// vCPUs outside `1..=MAX_VCPUS`.
    #[error("{vcpus} vCPUs requested: must be between 1 and {MAX_VCPUS}")]
    Vcpus {
        /// What was asked for.
        vcpus: u32,
    },
    /// Memory of zero, or past the hard ceiling.
    #[error("{mib} MiB of guest memory requested: must be between 1 and {MAX_MEMORY_MIB} MiB")]
    MemoryCeiling {
        /// What was asked for.
        mib: u64,
    },
    /// More memory than the host can back now.
    #[error(
        "{mib} MiB of memory needed, but this host has {available_mib} MiB available \
         (MemAvailable in /proc/meminfo); ask for less, or allow overcommit on purpose \
         (MVM_ALLOW_MEM_OVERCOMMIT=1)"
    )]
    MemoryUnavailable {
        /// What was asked for.
        mib: u64,
        /// MemAvailable, in MiB.
        available_mib: u64,
    },
}

/// Checks a vCPU count against [`MAX_VCPUS`].
pub fn check_vcpus(vcpus: u32) -> Result<(), LimitError> {
    if (1..=MAX_VCPUS).contains(&vcpus) {
        Ok(())
    } else {
        Err(LimitError::Vcpus { vcpus })
    }
}

/// The environment variable that raises the memory limit from the host's
/// MemAvailable to [`MAX_MEMORY_MIB`] (for hosts that overcommit on purpose).
pub const ALLOW_OVERCOMMIT_ENV: &str = "MVM_ALLOW_MEM_OVERCOMMIT";

/// Checks `mib` of guest memory against the hard ceiling and, unless
/// `allow_overcommit`, against `available_mib` (the host's MemAvailable; `None`
/// when it could not be read, in which case only the ceiling applies).
pub fn check_memory(
    mib: u64,
    available_mib: Option<u64>,
    allow_overcommit: bool,
) -> Result<(), LimitError> {
    if mib == 0 || mib > MAX_MEMORY_MIB {
        return Err(LimitError::MemoryCeiling { mib });
    }
    check_available(mib, available_mib, allow_overcommit)
}

/// Checks that the host can back `mib` of memory now: `available_mib` is its
/// MemAvailable (`None` when unreadable: nothing is checked). For what a VM
/// process asks the host for beyond the guest's own memory (the emulated tier's
/// QEMU test host holds the guest and itself); the guest's size goes through
/// [`check_memory`].
pub fn check_available(
    mib: u64,
    available_mib: Option<u64>,
    allow_overcommit: bool,
) -> Result<(), LimitError> {
    match available_mib {
        Some(available_mib) if !allow_overcommit && mib > available_mib => {
            Err(LimitError::MemoryUnavailable { mib, available_mib })
        }
        _ => Ok(()),
    }
}

/// Whether [`ALLOW_OVERCOMMIT_ENV`] is set to `1` in this process's environment.
pub fn overcommit_allowed_by_env() -> bool {
    std::env::var(ALLOW_OVERCOMMIT_ENV).is_ok_and(|v| v == "1")
}

/// The host's MemAvailable in MiB, from `/proc/meminfo`; `None` when it cannot
/// be read (not Linux, or /proc not mounted).
pub fn host_mem_available_mib() -> Option<u64> {
    mem_available_mib_in(Path::new("/proc/meminfo"))
}

fn mem_available_mib_in(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    parse_mem_available_kib(&text).map(|kib| kib / 1024)
}

/// `MemAvailable:   123456 kB` → 123456.
fn parse_mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_bounds() {
        assert!(check_vcpus(1).is_ok());
        assert!(check_vcpus(MAX_VCPUS).is_ok());
        assert_eq!(check_vcpus(0), Err(LimitError::Vcpus { vcpus: 0 }));
        assert_eq!(check_vcpus(64), Err(LimitError::Vcpus { vcpus: 64 }));
    }

    #[test]
    fn memory_bounds() {
        assert!(check_memory(128, Some(1024), false).is_ok());
        assert_eq!(
            check_memory(2048, Some(1024), false),
            Err(LimitError::MemoryUnavailable {
                mib: 2048,
                available_mib: 1024
            })
        );
        assert!(check_memory(2048, Some(1024), true).is_ok());
        assert!(check_memory(2048, None, false).is_ok());
        assert_eq!(
            check_memory(0, Some(1024), true),
            Err(LimitError::MemoryCeiling { mib: 0 })
        );
        assert_eq!(
            check_memory(MAX_MEMORY_MIB + 1, None, true),
            Err(LimitError::MemoryCeiling {
                mib: MAX_MEMORY_MIB + 1
            })
        );
    }

    #[test]
    fn the_error_names_the_value_and_the_limit() {
        let e = check_memory(1_048_576, Some(20_000), false).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("1048576 MiB"), "{text}");
        assert!(text.contains("20000 MiB available"), "{text}");
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20971520 kB\n";
        assert_eq!(parse_mem_available_kib(text), Some(20_971_520));
        assert_eq!(parse_mem_available_kib("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available_kib("MemAvailable: x kB\n"), None);
        assert!(host_mem_available_mib().is_some());
    }
}
