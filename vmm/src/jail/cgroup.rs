//! The VM's cgroup (`mvm-cgroup`): `<parent>/mvm-vmm-<pid>` with `memory.max`,
//! `pids.max` and `cpu.max` from the VM's size, created by the supervising process before
//! the VMM starts, the VMM moved into it before it allocates guest memory, removed when
//! the VMM has exited. Skipped, with the reason logged, where `mvm_cgroup::create`
//! refuses: the VM then runs without these limits (the jail's rlimits still apply).

pub use mvm_cgroup::{add_process, create, remove, Cgroup, Limits};

/// The VMM's own memory beyond guest RAM: its code, heap, stacks, device queues and buffers,
/// plus the kernel and initramfs images it keeps (added separately, by size).
pub const VMM_MEMORY_OVERHEAD: u64 = 64 << 20;

/// Limits for a VM of `mem_bytes` RAM, `images` bytes of kernel and initramfs, `vcpus`
/// vCPUs and `threads` threads: memory for all of it and [`VMM_MEMORY_OVERHEAD`], one CPU
/// per vCPU and one for the device threads and the VMM's own.
pub fn for_vm(mem_bytes: u64, images: u64, vcpus: u64, threads: u64) -> Limits {
    Limits::new(
        mem_bytes
            .saturating_add(images)
            .saturating_add(VMM_MEMORY_OVERHEAD),
        threads,
        vcpus.saturating_add(1),
    )
}

/// Logs how close the VM came to its limits, read before its cgroup is removed.
pub fn report_pressure(dir: &std::path::Path) {
    mvm_cgroup::report_pressure(dir, "jail: the VM");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size() {
        let l = for_vm(128 << 20, 10 << 20, 2, 22);
        assert_eq!(l.memory_max, (128 + 10 + 64) << 20);
        assert_eq!(for_vm(0, 1, 1, 1).memory_max, (64 << 20) + 4096);
        assert_eq!(l.pids_max, 22);
        assert_eq!(l.cpu_quota_us, 300_000);
    }
}
