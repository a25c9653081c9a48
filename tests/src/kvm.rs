//! Whether this machine has a KVM that can run a Linux guest.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`, linux/kvm.h).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there is (linux/kvm.h `KVM_API_VERSION`).
const KVM_API_VERSION: libc::c_int = 12;

/// Checks that `/dev/kvm` opens read-write, speaks API version 12, and is
/// not `kvm_pvm` (a software hypervisor that cannot run a Linux guest; see
/// shared/ENVIRONMENT.md). The error says which check failed.
pub fn check_usable() -> Result<(), String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm is kvm_pvm, which cannot run a Linux guest: run through scripts/e2e, \
             which boots a test host with a real KVM"
                .into(),
        );
    }
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("no usable /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // the fd is a valid open /dev/kvm for the duration of the call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!(
            "/dev/kvm API version {version}, expected {KVM_API_VERSION}"
        ));
    }
    Ok(())
}
