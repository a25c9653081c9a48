//! One vCPU's architectural state, as KVM holds it: read from a paused vCPU, written
//! into a fresh one before its first `KVM_RUN`.
//!
//! What is kept: CPUID (as the guest saw it), the general and special registers, the
//! XSAVE area (x87, SSE, AVX: it covers what `KVM_GET_FPU` would), XCR0, the debug
//! registers, every MSR KVM lets userspace read, the local APIC page, pending events
//! (exceptions, interrupts, NMI) and the multiprocessing state, plus the TSC frequency
//! the guest calibrated against.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (its APIC id).
    pub index: u8,
    /// CPUID as set on the vCPU when it booted.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// Every MSR KVM let us read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMI, SMI; interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// The guest TSC's frequency in kHz, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("cpuid_entries", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

fn kvm(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Vcpu {
        index,
        what,
        source,
    }
}

/// The MSRs this host's KVM lists as saveable (`KVM_GET_MSR_INDEX_LIST`).
pub fn saveable_msrs(kvm_fd: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(|source| SnapshotError::Kvm {
            what: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?;
    Ok(list.as_slice().to_vec())
}

/// Reads `indices` from the vCPU. KVM stops a `KVM_GET_MSRS` batch at the first MSR it
/// cannot read (one the list names but this vCPU's CPUID does not have); that one is
/// left out and the rest read again.
fn read_msrs(fd: &VcpuFd, index: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Format {
            what: "MSR list",
            why: format!("{e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm(index, "KVM_GET_MSRS"))?;
        if read >= wanted.len() {
            return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
        }
        // `read` < len: the entry at `read` was refused.
        wanted.remove(read);
    }
}

/// Reads the state of a paused vCPU. Any port or MMIO read it was in the middle of
/// must have been completed first (a `KVM_RUN` with `immediate_exit` set).
pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm(index, "KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid.as_slice().to_vec(),
        // Events and MP state first: KVM may flush a pending event into the registers.
        events: fd
            .get_vcpu_events()
            .map_err(kvm(index, "KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(kvm(index, "KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(kvm(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm(index, "KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm(index, "KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm(index, "KVM_GET_XCRS"))?,
        debugregs: fd
            .get_debug_regs()
            .map_err(kvm(index, "KVM_GET_DEBUGREGS"))?,
        msrs: read_msrs(fd, index, msr_indices)?,
        lapic: fd.get_lapic().map_err(kvm(index, "KVM_GET_LAPIC"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Writes `state` into a vCPU that has never run. The order is KVM's: CPUID before
/// anything it shapes (XSAVE size, MSRs), special registers before the APIC (the APIC
/// base is in them), MSRs before events.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), SnapshotError> {
    let index = state.index;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| SnapshotError::Format {
        what: "CPUID",
        why: format!("{e:?}"),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm(index, "KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(kvm(index, "KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(kvm(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm(index, "KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (the legacy 4 KiB area) that
    // `KVM_GET_XSAVE` filled; KVM reads exactly that size from it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm(index, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(kvm(index, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm(index, "KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(i, data)| kvm_msr_entry {
            index: i,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Format {
        what: "MSR list",
        why: format!("{e:?}"),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm(index, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        let refused = entries.get(set).map_or(0, |e| e.index);
        return Err(SnapshotError::Refused {
            reason: "cpu_mismatch",
            detail: format!(
                "vcpu {index}: this host's KVM refused MSR {refused:#x} ({set} of {} set)",
                entries.len()
            ),
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
