//! What a run asks of this host, checked against `mvm_loader::limits` before
//! admission and before any VM process starts, whatever the flags: the same
//! bounds `mvm-vmm` applies, so a size `mvm` accepts is not refused late by
//! the VMM, nor by QEMU failing to allocate the test host's RAM (exit 122
//! after a minute of waiting).

use mvm_loader::limits::{self, LimitError};

#[cfg(target_os = "linux")]
use super::emulated;
use super::Tier;

/// A run's resources refused: what was asked, what the VM process would ask
/// the host for, and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context}{source}")]
pub struct ResourceError {
    /// How the request became the size checked (empty when they are the same).
    context: String,
    /// The limit it broke.
    #[source]
    pub source: LimitError,
}

/// The memory the run's VM process asks the host for, in MiB: the guest's on
/// the kvm tier; on the emulated tier the QEMU test host's `-m`, which holds
/// the guest plus the test host's own kernel, initramfs and VMM.
pub fn host_memory_mib(tier: Tier, guest_mib: u32) -> u64 {
    match tier {
        Tier::Kvm => u64::from(guest_mib),
        #[cfg(target_os = "linux")]
        Tier::Emulated => u64::from(emulated::testhost_memory_mib(guest_mib)),
        #[cfg(not(target_os = "linux"))]
        Tier::Emulated => u64::from(guest_mib),
        Tier::Container | Tier::Vz => u64::from(guest_mib),
    }
}

/// Checks `cpus` and `mem_mib` for a run on `tier` against [`limits`], with the
/// host's MemAvailable and `MVM_ALLOW_MEM_OVERCOMMIT` read now.
pub fn check(tier: Tier, cpus: u8, mem_mib: u32) -> Result<(), ResourceError> {
    check_with(
        tier,
        cpus,
        mem_mib,
        limits::host_mem_available_mib(),
        limits::overcommit_allowed_by_env(),
    )
}

/// [`check`] with the host's available memory and the overcommit switch given.
pub fn check_with(
    tier: Tier,
    cpus: u8,
    mem_mib: u32,
    available_mib: Option<u64>,
    allow_overcommit: bool,
) -> Result<(), ResourceError> {
    limits::check_vcpus(u32::from(cpus)).map_err(|source| ResourceError {
        context: format!("--cpus {cpus}: "),
        source,
    })?;
    // The guest's size against the ceiling, then what the host must back.
    limits::check_memory(u64::from(mem_mib), None, true).map_err(|source| ResourceError {
        context: format!("--mem {mem_mib}: "),
        source,
    })?;
    let asked = host_memory_mib(tier, mem_mib);
    let context = if asked == u64::from(mem_mib) {
        format!("--mem {mem_mib}: ")
    } else {
        format!(
            "--mem {mem_mib} on the {tier} tier: the QEMU test host needs {asked} MiB \
             (the guest's memory and its own): "
        )
    };
    // The ceiling bounds guests (checked above), not the test host around one.
    limits::check_available(asked, available_mib, allow_overcommit)
        .map_err(|source| ResourceError { context, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_past_the_vmm_limit_are_refused() {
        assert!(check_with(Tier::Kvm, 32, 256, Some(4096), false).is_ok());
        let e = check_with(Tier::Kvm, 64, 256, Some(4096), false).unwrap_err();
        assert_eq!(e.source, LimitError::Vcpus { vcpus: 64 });
        let text = e.to_string();
        assert!(text.starts_with("--cpus 64: "), "{text}");
        assert!(text.contains(&limits::MAX_VCPUS.to_string()), "{text}");
    }

    #[test]
    fn memory_past_the_host_or_the_ceiling_is_refused_naming_the_limit() {
        let e = check_with(Tier::Kvm, 1, 65536, Some(24_000), false).unwrap_err();
        assert_eq!(
            e.source,
            LimitError::MemoryUnavailable {
                mib: 65536,
                available_mib: 24_000
            }
        );
        assert!(e.to_string().contains("24000 MiB available"), "{e}");
        // Overcommit on purpose lifts the host's limit, not the ceiling.
        assert!(check_with(Tier::Kvm, 1, 65536, Some(24_000), true).is_ok());
        let e = check_with(Tier::Kvm, 1, 1_048_577, None, true).unwrap_err();
        assert!(matches!(e.source, LimitError::MemoryCeiling { .. }), "{e}");
        // MemAvailable unreadable: only the ceiling applies.
        assert!(check_with(Tier::Kvm, 1, 1_048_576, None, false).is_ok());
    }

    #[test]
    fn the_emulated_tier_checks_what_qemu_will_ask_for() {
        let asked = host_memory_mib(Tier::Emulated, 2048);
        assert_eq!(asked, u64::from(emulated::testhost_memory_mib(2048)));
        assert!(asked > 2048);
        // Fits as a kvm guest, not once the test host is around it.
        assert!(check_with(Tier::Kvm, 1, 2048, Some(2100), false).is_ok());
        let e = check_with(Tier::Emulated, 1, 2048, Some(2100), false).unwrap_err();
        assert_eq!(
            e.source,
            LimitError::MemoryUnavailable {
                mib: asked,
                available_mib: 2100
            }
        );
        let text = e.to_string();
        assert!(text.contains("--mem 2048 on the emulated tier"), "{text}");
        assert!(text.contains(&format!("needs {asked} MiB")), "{text}");
        // At the ceiling the guest is allowed; its test host is refused for the
        // host's memory, not for a ceiling that bounds guests.
        let e = check_with(Tier::Emulated, 1, 1_048_576, Some(20_000), false).unwrap_err();
        assert!(
            matches!(
                e.source,
                LimitError::MemoryUnavailable {
                    available_mib: 20_000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(check_with(Tier::Emulated, 1, 1_048_576, Some(20_000), true).is_ok());
    }
}
