//! The ioctl request numbers the filters allow, computed the way `<asm-generic/ioctl.h>`
//! does, so each one can be checked against its name.

/// `_IOC_WRITE` / `_IOC_READ` direction bits.
const IOC_READ: u64 = 2;

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
    }
}
