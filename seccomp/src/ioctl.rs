//! The ioctl request numbers the filters allow, computed the way `<asm-generic/ioctl.h>`
//! does, so each one can be checked against its name.

/// `_IOC_WRITE` / `_IOC_READ` direction bits.
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u64, kind: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (kind << 8) | nr
}

/// `KVMIO`, the KVM ioctl type (`<linux/kvm.h>`).
const KVMIO: u64 = 0xAE;

/// `sizeof(struct kvm_regs)` on x86_64 (18 u64 registers).
pub const KVM_REGS_SIZE: u64 = 144;
/// `sizeof(struct kvm_sregs)` on x86_64 (8 segments, 2 descriptor tables, 7 control
/// registers and MSRs, the 256-bit interrupt bitmap).
pub const KVM_SREGS_SIZE: u64 = 312;

/// `KVM_RUN` = `_IO(KVMIO, 0x80)` (`<linux/kvm.h>`).
pub const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
/// `KVM_GET_REGS` = `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, KVM_REGS_SIZE);
/// `KVM_GET_SREGS` = `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
pub const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, KVM_SREGS_SIZE);

/// The state a snapshot reads (`vmm/src/snapshot/`): a paused vCPU's, on its own thread.
pub const KVM_GET_CPUID2: u64 = ioc(IOC_READ_WRITE, KVMIO, 0x91, 8);
/// `_IOR(KVMIO, 0x9f, struct kvm_vcpu_events)`.
pub const KVM_GET_VCPU_EVENTS: u64 = ioc(IOC_READ, KVMIO, 0x9f, 64);
/// `_IOR(KVMIO, 0x98, struct kvm_mp_state)`.
pub const KVM_GET_MP_STATE: u64 = ioc(IOC_READ, KVMIO, 0x98, 4);
/// `_IOR(KVMIO, 0xa4, struct kvm_xsave)`.
pub const KVM_GET_XSAVE: u64 = ioc(IOC_READ, KVMIO, 0xa4, 4096);
/// `_IOR(KVMIO, 0xa6, struct kvm_xcrs)`.
pub const KVM_GET_XCRS: u64 = ioc(IOC_READ, KVMIO, 0xa6, 392);
/// `_IOR(KVMIO, 0xa1, struct kvm_debugregs)`.
pub const KVM_GET_DEBUGREGS: u64 = ioc(IOC_READ, KVMIO, 0xa1, 128);
/// `_IOWR(KVMIO, 0x88, struct kvm_msrs)`.
pub const KVM_GET_MSRS: u64 = ioc(IOC_READ_WRITE, KVMIO, 0x88, 8);
/// `_IOR(KVMIO, 0x8e, struct kvm_lapic_state)`.
pub const KVM_GET_LAPIC: u64 = ioc(IOC_READ, KVMIO, 0x8e, 1024);
/// `_IO(KVMIO, 0xa3)`.
pub const KVM_GET_TSC_KHZ: u64 = ioc(0, KVMIO, 0xa3, 0);
/// The VM-wide state a snapshot reads, on the main thread: `_IOWR(KVMIO, 0x62, struct
/// kvm_irqchip)`.
pub const KVM_GET_IRQCHIP: u64 = ioc(IOC_READ_WRITE, KVMIO, 0x62, 520);
/// `_IOR(KVMIO, 0x9f, struct kvm_pit_state2)`.
pub const KVM_GET_PIT2: u64 = ioc(IOC_READ, KVMIO, 0x9f, 112);
/// `_IOR(KVMIO, 0x7c, struct kvm_clock_data)`.
pub const KVM_GET_CLOCK: u64 = ioc(IOC_READ, KVMIO, 0x7c, 48);
/// `FIONBIO` (`<asm-generic/ioctls.h>`): set or clear O_NONBLOCK on a socket.
pub const FIONBIO: u64 = 0x5421;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(KVM_GET_REGS, 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS, 0x8138_AE83);
        assert_eq!(
            KVM_REGS_SIZE,
            u64::try_from(std::mem::size_of::<kvm_bindings::kvm_regs>()).unwrap()
        );
        assert_eq!(
            KVM_SREGS_SIZE,
            u64::try_from(std::mem::size_of::<kvm_bindings::kvm_sregs>()).unwrap()
        );
        assert_eq!(FIONBIO, libc::FIONBIO);
        use std::mem::size_of;
        let size = |n: usize| u64::try_from(n).unwrap() << 16;
        let cases = [
            (KVM_GET_CPUID2, size(size_of::<kvm_bindings::kvm_cpuid2>())),
            (
                KVM_GET_VCPU_EVENTS,
                size(size_of::<kvm_bindings::kvm_vcpu_events>()),
            ),
            (
                KVM_GET_MP_STATE,
                size(size_of::<kvm_bindings::kvm_mp_state>()),
            ),
            (KVM_GET_XSAVE, size(size_of::<kvm_bindings::kvm_xsave>())),
            (KVM_GET_XCRS, size(size_of::<kvm_bindings::kvm_xcrs>())),
            (
                KVM_GET_DEBUGREGS,
                size(size_of::<kvm_bindings::kvm_debugregs>()),
            ),
            (KVM_GET_MSRS, size(size_of::<kvm_bindings::kvm_msrs>())),
            (
                KVM_GET_LAPIC,
                size(size_of::<kvm_bindings::kvm_lapic_state>()),
            ),
            (
                KVM_GET_IRQCHIP,
                size(size_of::<kvm_bindings::kvm_irqchip>()),
            ),
            (
                KVM_GET_PIT2,
                size(size_of::<kvm_bindings::kvm_pit_state2>()),
            ),
            (
                KVM_GET_CLOCK,
                size(size_of::<kvm_bindings::kvm_clock_data>()),
            ),
        ];
        for (request, size_bits) in cases {
            assert_eq!(request & (0x3fff << 16), size_bits, "{request:#x}");
        }
        // Against <linux/kvm.h>'s values as the kernel headers print them.
        assert_eq!(KVM_GET_LAPIC, 0x8400_AE8E);
        assert_eq!(KVM_GET_XSAVE, 0x9000_AEA4);
        assert_eq!(KVM_GET_MSRS, 0xC008_AE88);
        assert_eq!(KVM_GET_IRQCHIP, 0xC208_AE62);
        assert_eq!(KVM_GET_CLOCK, 0x8030_AE7C);
        assert_eq!(KVM_GET_TSC_KHZ, 0xAEA3);
    }
}
