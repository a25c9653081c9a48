//! Local APIC wiring: LINT0 delivers ExtINT (the legacy PIC's output) and LINT1
//! delivers NMI, as on a PC, so the guest's interrupt setup finds what it
//! expects before it programs the IOAPIC.

use kvm_bindings::kvm_lapic_state;

/// LAPIC register offset: LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// LAPIC register offset: LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// Errors from reading or writing LAPIC registers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("LAPIC register offset {offset:#x} is outside the register page")]
pub struct LapicRegisterError {
    /// The offending offset.
    pub offset: usize,
}

fn read_reg(state: &kvm_lapic_state, offset: usize) -> Result<u32, LapicRegisterError> {
    let bytes = state
        .regs
        .get(offset..offset.saturating_add(4))
        .ok_or(LapicRegisterError { offset })?;
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(bytes) {
        *dst = src.to_ne_bytes()[0];
    }
    Ok(u32::from_le_bytes(raw))
}

fn write_reg(
    state: &mut kvm_lapic_state,
    offset: usize,
    value: u32,
) -> Result<(), LapicRegisterError> {
    let dst = state
        .regs
        .get_mut(offset..offset.saturating_add(4))
        .ok_or(LapicRegisterError { offset })?;
    for (d, s) in dst.iter_mut().zip(value.to_le_bytes()) {
        *d = std::os::raw::c_char::from_ne_bytes([s]);
    }
    Ok(())
}

/// Replaces the delivery-mode field (bits 8..11) of an LVT entry.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `state`.
pub fn set_lint(state: &mut kvm_lapic_state) -> Result<(), LapicRegisterError> {
    let lvt0 = read_reg(state, APIC_LVT0)?;
    write_reg(state, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT))?;
    let lvt1 = read_reg(state, APIC_LVT1)?;
    write_reg(state, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut state = kvm_lapic_state::default();
        // Reset value of LVT entries: masked (bit 16).
        write_reg(&mut state, APIC_LVT0, 0x1_0000).unwrap();
        write_reg(&mut state, APIC_LVT1, 0x1_0700).unwrap();
        set_lint(&mut state).unwrap();
        assert_eq!(read_reg(&state, APIC_LVT0).unwrap(), 0x1_0700);
        assert_eq!(read_reg(&state, APIC_LVT1).unwrap(), 0x1_0400);
    }

    #[test]
    fn out_of_page_offsets_are_errors() {
        let state = kvm_lapic_state::default();
        assert_eq!(
            read_reg(&state, 1022),
            Err(LapicRegisterError { offset: 1022 })
        );
    }
}
