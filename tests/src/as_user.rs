//! Starting `mvm-vmm` as an ordinary user, for the user-namespace jail's cases.
//!
//! The user needs a `/dev/kvm` it may open, as a member of the `kvm` group has on a
//! distribution's host. The test host's node (or, on a machine with a real KVM, the
//! machine's) must not change, so the child gets a mount namespace of its own in which
//! `/dev/kvm` is a node on a private tmpfs, owned by root and the user's group, mode 0660.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::case::Failure;

/// Makes `cmd` start as `uid`/`gid` (the group its only one) with its own `/dev/kvm` that
/// group may open, on a tmpfs mounted at `kvm_dir` (an existing empty directory) in the
/// child's mount namespace.
pub fn apply(cmd: &mut Command, uid: u32, gid: u32, kvm_dir: &Path) -> Result<(), Failure> {
    let rdev = std::os::unix::fs::MetadataExt::rdev(
        &std::fs::metadata("/dev/kvm").map_err(|e| Failure::new(format!("stat /dev/kvm: {e}")))?,
    );
    let c = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| Failure::new(format!("{kvm_dir:?} has a NUL byte")))
    };
    let paths = [
        c(kvm_dir.as_os_str().as_bytes())?,
        c(kvm_dir.join("kvm").as_os_str().as_bytes())?,
        c(b"/dev/kvm")?,
        c(b"tmpfs")?,
        c(b"/")?,
    ];
    let ok = |rc: libc::c_int| match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe libc
    // calls, on C strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let [dir, node, dev_kvm, tmpfs, root] = &paths;
            let none = std::ptr::null::<libc::c_char>();
            ok(libc::unshare(libc::CLONE_NEWNS))?;
            let private = libc::MS_REC | libc::MS_PRIVATE;
            ok(libc::mount(
                none,
                root.as_ptr(),
                none,
                private,
                std::ptr::null(),
            ))?;
            ok(libc::mount(
                tmpfs.as_ptr(),
                dir.as_ptr(),
                tmpfs.as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            ok(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, rdev))?;
            // Set after mknod, whose mode the umask trims.
            ok(libc::chmod(node.as_ptr(), 0o660))?;
            ok(libc::chown(node.as_ptr(), 0, gid))?;
            let bind = libc::MS_BIND;
            ok(libc::mount(
                node.as_ptr(),
                dev_kvm.as_ptr(),
                none,
                bind,
                std::ptr::null(),
            ))?;
            ok(libc::setgroups(1, &gid))?;
            ok(libc::setresgid(gid, gid, gid))?;
            ok(libc::setresuid(uid, uid, uid))
        });
    }
    Ok(())
}

/// Makes `cmd` start as `uid`/`gid` (the group its only one) in a mount namespace of its
/// own where each `(file, over)` of `binds` is bound over the path `over` (for example an
/// `/etc/passwd` that names the user, and `/etc/subuid`): this host's files stay as they
/// are.
pub fn apply_with_files(
    cmd: &mut Command,
    uid: u32,
    gid: u32,
    binds: &[(&Path, &str)],
) -> Result<(), Failure> {
    let c = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| Failure::new(format!("{bytes:?} has a NUL byte")))
    };
    let pairs = binds
        .iter()
        .map(|(file, over)| Ok((c(file.as_os_str().as_bytes())?, c(over.as_bytes())?)))
        .collect::<Result<Vec<_>, Failure>>()?;
    let root = c(b"/")?;
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe libc
    // calls, on C strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ok = |rc: libc::c_int| match rc {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            };
            let none = std::ptr::null::<libc::c_char>();
            ok(libc::unshare(libc::CLONE_NEWNS))?;
            ok(libc::mount(
                none,
                root.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (file, over) in &pairs {
                ok(libc::mount(
                    file.as_ptr(),
                    over.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            ok(libc::setgroups(1, &gid))?;
            ok(libc::setresgid(gid, gid, gid))?;
            ok(libc::setresuid(uid, uid, uid))
        });
    }
    Ok(())
}
