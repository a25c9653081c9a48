//! The KVM VM: guest memory registered with KVM, the in-kernel interrupt
//! controllers (IOAPIC + per-vCPU LAPIC + PIC) and the in-kernel PIT as the
//! guest's timer source.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::layout;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm failed: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed during setup.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The memory size cannot be laid out.
    #[error("guest memory of {bytes} bytes is not valid: {why}")]
    BadMemorySize {
        /// Requested bytes.
        bytes: u64,
        /// Why.
        why: String,
    },
    /// mmap of guest memory failed.
    #[error("allocating {bytes} bytes of guest memory failed: {source}")]
    Map {
        /// Requested bytes.
        bytes: u64,
        /// The error.
        source: std::io::Error,
    },
}

fn kvm_step(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Allocates guest RAM for `mem_bytes`, laid out by [`layout::ram_ranges`].
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, VmError> {
    if mem_bytes == 0 || mem_bytes > layout::MAX_MEMORY_BYTES {
        return Err(VmError::BadMemorySize {
            bytes: mem_bytes,
            why: format!("must be between 1 and {} bytes", layout::MAX_MEMORY_BYTES),
        });
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(a, l)| usize::try_from(l).map(|l| (a, l)))
        .collect::<Result<_, _>>()
        .map_err(|_| VmError::BadMemorySize {
            bytes: mem_bytes,
            why: "larger than this host's address space".to_string(),
        })?;
    let mut regions = Vec::with_capacity(ranges.len());
    for (base, len) in ranges {
        let host = map_aligned(len).map_err(|source| VmError::Map {
            bytes: mem_bytes,
            source,
        })?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: [host, host + len) is a private anonymous mapping made just above, of
        // exactly `len` bytes, that nothing else refers to. It is never unmapped: the VMM
        // runs one VM and the mapping ends with the process.
        let mapping = unsafe {
            MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_raw_mmap_pointer(host)
        }
        .build()
        .map_err(|e| VmError::BadMemorySize {
            bytes: mem_bytes,
            why: format!("guest memory region: {e}"),
        })?;
        let region = GuestRegionMmap::new(mapping, base).ok_or_else(|| VmError::BadMemorySize {
            bytes: mem_bytes,
            why: "a region wraps the guest address space".to_string(),
        })?;
        advise_huge_pages(&region);
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::BadMemorySize {
        bytes: mem_bytes,
        why: format!("guest memory regions: {e}"),
    })
}

/// The alignment of guest RAM in the VMM's address space: one huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of anonymous memory starting on a [`HUGE_PAGE`] boundary.
///
/// Guest RAM starts on huge-page boundaries in guest-physical space (0, 4 GiB); a host
/// mapping on the same boundary lets each 2 MiB of the guest be one transparent huge
/// page and KVM map it with one 2 MiB nested-paging entry. `mmap` alone only promises
/// 4 KiB alignment, so this maps `len + HUGE_PAGE` and unmaps the unaligned head and tail.
fn map_aligned(len: usize) -> Result<*mut u8, std::io::Error> {
    let total = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks; nothing
    // is overwritten.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping made above, outside the aligned `len`
    // bytes that are kept, and are page-aligned (mmap returns page-aligned addresses,
    // `aligned` and `len` are multiples of the page size).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// Asks for transparent huge pages on a guest memory region (`MADV_HUGEPAGE`), all of it.
///
/// Guest RAM is touched first by the VMM copying the kernel in, then by the guest
/// itself; with 4 KiB pages each first touch is a host page fault, and under KVM a
/// nested-paging fault too. With 2 MiB pages the kernel's 15 MiB load is a handful of
/// faults instead of thousands, and KVM can map the guest with 2 MiB entries. What it
/// costs: a page the guest touches brings in its whole 2 MiB, so the VMM's RSS grows
/// towards the guest's size sooner. A host without THP (or with it set to `never`)
/// refuses or ignores the advice; the VM then runs on small pages as before.
///
/// The low 2 MiB were kept on small pages for a while, to save the RSS of a huge page
/// there for the ten pages the VMM writes. But a booting guest touches about 270 pages
/// of it (1.1 MiB): the saving was half of what a VMM that never boots a guest shows,
/// and it cost those 270 nested-paging faults, about 0.1 s of a boot under the QEMU-TCG
/// test host (`docs/boot-time.md`, "The low 2 MiB on huge pages again").
fn advise_huge_pages(region: &GuestRegionMmap) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    let Ok(len) = usize::try_from(region.len()) else {
        return;
    };
    // SAFETY: [host, host + len) is the region's own live anonymous mapping; the advice
    // changes how the kernel backs it, never its contents or its validity.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "MADV_HUGEPAGE refused; guest memory stays on small pages"
        );
    }
}

/// A KVM VM with its memory and in-kernel devices.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("regions", &self.memory.num_regions())
            .finish()
    }
}

impl Vm {
    /// Creates the VM: TSS and identity-map pages, irqchip, PIT, and `memory`
    /// registered as KVM memory slots 0.. in order.
    pub fn new(memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_step("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(kvm_step("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let tss = usize::try_from(layout::KVM_TSS_START).map_err(|_| VmError::BadMemorySize {
            bytes: 0,
            why: "TSS address does not fit usize".to_string(),
        })?;
        fd.set_tss_address(tss)
            .map_err(kvm_step("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_step("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_step("KVM_CREATE_PIT2"))?;

        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::BadMemorySize {
                    bytes: region.len(),
                    why: "region has no host mapping".to_string(),
                })?;
            let mem_region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host + len) is a live mmap owned by
            // `memory`, which this Vm keeps alive for as long as the VM fd
            // exists (both are fields of Self and dropped together), and the
            // guest ranges from `layout::ram_ranges` do not overlap.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(kvm_step("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { kvm, fd, memory })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor (irqfds, ioeventfds, vCPUs).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Total guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_starts_on_a_huge_page_in_the_vmm() {
        for mib in [1u64, 3, 128, 129] {
            let mem = create_guest_memory(mib << 20).unwrap();
            for region in mem.iter() {
                let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
                assert_eq!(host as usize % HUGE_PAGE, 0, "{mib} MiB");
                assert_eq!(region.len(), mib << 20);
            }
            // Every byte is usable.
            use vm_memory::Bytes;
            mem.write_obj(0xa5u8, GuestAddress((mib << 20) - 1))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress((mib << 20) - 1)).unwrap(),
                0xa5
            );
        }
    }

    /// The `VmFlags` of the mapping in /proc/self/smaps that starts at `addr`.
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_it = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = usize::from_str_radix(start, 16) {
                        in_it = start == addr;
                        continue;
                    }
                }
            }
            if in_it {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_owned());
                }
            }
        }
        None
    }

    #[test]
    fn all_of_guest_ram_asks_for_huge_pages() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
        let flags = |a| vm_flags_at(a).unwrap_or_default();
        let f = flags(host);
        assert!(f.split(' ').any(|f| f == "hg"), "{f}");
        assert!(!f.split(' ').any(|f| f == "nh"), "{f}");
        // One mapping, advised as a whole: no other advice split a part of it off.
        for offset in [HUGE_PAGE, (64 << 20) - HUGE_PAGE] {
            assert_eq!(
                vm_flags_at(host + offset),
                None,
                "a mapping starts at {offset:#x}"
            );
        }
    }

    #[test]
    fn memory_follows_the_layout() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
        assert!(create_guest_memory(0).is_err());
        assert!(create_guest_memory(layout::MAX_MEMORY_BYTES + 1).is_err());
    }
}
