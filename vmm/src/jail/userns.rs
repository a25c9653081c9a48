//! The jail without root: a user namespace of the VMM's own, in which it holds the
//! capabilities the namespaces, mounts and `pivot_root` need, and nothing on the host.
//!
//! [`enter`] maps the caller's uid and gid to themselves (one id each, `setgroups` denied),
//! so files keep their owners and `/dev/kvm` stays reachable through the caller's groups;
//! everything after it (PID, mount, network and IPC namespaces, the per-VM root) is the
//! root jail's code. [`drop_capabilities`] ends the namespace's capabilities once the jail
//! is built. Where a host forbids unprivileged user namespaces, [`enter`] fails with the
//! setting that is in the way ([`explain`]); the VMM then refuses to start.

use std::path::Path;

use nix::sched::{unshare, CloneFlags};

use super::{io_step, JailError};

/// Where the sysctls that can forbid user namespaces live.
pub const SYSCTL_DIR: &str = "/proc/sys";

/// Enters a new user namespace in which this process keeps its uid and gid. Call while the
/// process has one thread (the kernel refuses otherwise).
pub fn enter() -> Result<(), JailError> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|source| JailError {
        step: format!(
            "new user namespace (the jail of a VMM not started as root): {}",
            explain(source, Path::new(SYSCTL_DIR))
        ),
        source,
    })?;
    // `setgroups` must be denied before an unprivileged process may write its gid_map; the
    // supplementary groups it started with (`kvm`) stay in force.
    std::fs::write("/proc/self/setgroups", "deny").map_err(io_step("deny setgroups"))?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))
        .map_err(io_step("write uid_map"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
        .map_err(io_step("write gid_map"))?;
    Ok(())
}

/// Why `unshare(CLONE_NEWUSER)` failed with `errno`, naming the host setting that forbids
/// it when one does (read under `sysctl_dir`), and what to do.
pub fn explain(errno: nix::Error, sysctl_dir: &Path) -> String {
    let read = |name: &str| {
        std::fs::read_to_string(sysctl_dir.join(name))
            .ok()
            .map(|v| v.trim().to_owned())
    };
    let setting = if read("kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        Some("kernel.unprivileged_userns_clone is 0 (Debian's switch; set it to 1)")
    } else if read("user/max_user_namespaces").as_deref() == Some("0") {
        Some("user.max_user_namespaces is 0 (set it above 0)")
    } else if read("kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        Some(
            "kernel.apparmor_restrict_unprivileged_userns is 1 (AppArmor: give mvm-vmm a \
             profile with `userns,` or set it to 0)",
        )
    } else {
        None
    };
    let cause = match (setting, errno) {
        (Some(s), _) => s.to_owned(),
        (None, nix::Error::ENOSPC) => {
            "this user has as many user namespaces as user.max_user_namespaces allows".to_owned()
        }
        (None, nix::Error::EPERM) => {
            "the kernel refused (a seccomp filter, a chroot, or a security module)".to_owned()
        }
        (None, e) => format!("the kernel refused ({e})"),
    };
    format!("{cause}; run mvm-vmm as root, allow unprivileged user namespaces, or pass --no-jail (development only)")
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the capability bounding set, then the effective, permitted, inheritable and
/// ambient sets: in a user namespace the uid does not change, so nothing clears them
/// implicitly. The bounding set goes first (dropping from it needs `CAP_SETPCAP`).
pub fn drop_capabilities() -> Result<(), JailError> {
    for cap in 0..=63 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown ones return EINVAL,
        // which ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL only clears this process's ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, both valid for the
    // call's duration and laid out as the kernel's `__user_cap_*_struct`s (repr(C)); pid 0
    // is this thread, the only one.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::addr_of_mut!(header),
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(JailError {
            step: "capset (drop every capability)".into(),
            source: nix::Error::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctls(values: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in values {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn the_setting_in_the_way_is_named() {
        let debian = sysctls(&[
            ("kernel/unprivileged_userns_clone", "0"),
            ("user/max_user_namespaces", "100"),
        ]);
        let why = explain(nix::Error::EPERM, debian.path());
        assert!(
            why.contains("kernel.unprivileged_userns_clone is 0"),
            "{why}"
        );
        assert!(why.contains("--no-jail"), "{why}");

        let max = sysctls(&[("user/max_user_namespaces", "0")]);
        assert!(explain(nix::Error::ENOSPC, max.path()).contains("user.max_user_namespaces is 0"));

        let ubuntu = sysctls(&[
            ("kernel/apparmor_restrict_unprivileged_userns", "1"),
            ("user/max_user_namespaces", "100"),
        ]);
        assert!(explain(nix::Error::EACCES, ubuntu.path()).contains("AppArmor"));
    }

    #[test]
    fn without_a_setting_the_errno_says_what_it_can() {
        let open = sysctls(&[
            ("kernel/unprivileged_userns_clone", "1"),
            ("user/max_user_namespaces", "100"),
            ("kernel/apparmor_restrict_unprivileged_userns", "0"),
        ]);
        assert!(explain(nix::Error::ENOSPC, open.path()).contains("as many user namespaces"));
        assert!(explain(nix::Error::EPERM, open.path()).contains("seccomp filter, a chroot"));
        let missing = tempfile::tempdir().unwrap();
        assert!(explain(nix::Error::EINVAL, missing.path()).contains("EINVAL"));
    }
}
