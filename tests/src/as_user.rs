//! Starting `mvm` or `mvm-vmm` as an ordinary user, for the cases that run as one.
//!
//! - [`apply`]: for the user-namespace jail's cases. The user needs a `/dev/kvm` it may
//!   open, as a member of the `kvm` group has on a distribution's host. The test host's
//!   node (or, on a machine with a real KVM, the machine's) must not change, so the child
//!   gets a mount namespace of its own in which `/dev/kvm` is a node on a private tmpfs,
//!   owned by root and the user's group, mode 0660.
//! - [`apply_with_files`]: files bound over this host's in the child's own mount
//!   namespace (an account in `/etc/passwd`, ranges in `/etc/subuid`).
//!
//! Both run their steps between fork and exec, through the helpers below, which make
//! only async-signal-safe libc calls on C strings built before the fork.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::case::Failure;

fn ok(rc: libc::c_int) -> std::io::Result<()> {
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn c_string(bytes: &[u8]) -> Result<CString, Failure> {
    CString::new(bytes).map_err(|_| Failure::new(format!("{bytes:?} has a NUL byte")))
}

/// A mount namespace of the calling process's own, its mounts private.
fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare and mount take plain integers and NUL-terminated strings (a
    // literal and nulls); nothing is shared with another thread after a fork.
    unsafe {
        ok(libc::unshare(libc::CLONE_NEWNS))?;
        ok(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))
    }
}

/// Binds `from` over `to`.
fn bind(from: &CStr, to: &CStr) -> std::io::Result<()> {
    // SAFETY: both are NUL-terminated strings that outlive the call.
    unsafe {
        ok(libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}

/// Becomes `uid`/`gid`, the group its only one.
fn become_user(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: setgroups reads one gid from a live local; the others take integers.
    unsafe {
        ok(libc::setgroups(1, &gid))?;
        ok(libc::setresgid(gid, gid, gid))?;
        ok(libc::setresuid(uid, uid, uid))
    }
}

/// Makes `cmd` start as `uid`/`gid` (the group its only one) with its own `/dev/kvm` that
/// group may open, on a tmpfs mounted at `kvm_dir` (an existing empty directory) in the
/// child's mount namespace.
pub fn apply(cmd: &mut Command, uid: u32, gid: u32, kvm_dir: &Path) -> Result<(), Failure> {
    let rdev = std::os::unix::fs::MetadataExt::rdev(
        &std::fs::metadata("/dev/kvm").map_err(|e| Failure::new(format!("stat /dev/kvm: {e}")))?,
    );
    let dir = c_string(kvm_dir.as_os_str().as_bytes())?;
    let node = c_string(kvm_dir.join("kvm").as_os_str().as_bytes())?;
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe libc
    // calls, on C strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            private_mount_namespace()?;
            ok(libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            ok(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, rdev))?;
            // Set after mknod, whose mode the umask trims.
            ok(libc::chmod(node.as_ptr(), 0o660))?;
            ok(libc::chown(node.as_ptr(), 0, gid))?;
            bind(&node, c"/dev/kvm")?;
            become_user(uid, gid)
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
    let pairs = binds
        .iter()
        .map(|(file, over)| {
            Ok((
                c_string(file.as_os_str().as_bytes())?,
                c_string(over.as_bytes())?,
            ))
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe libc
    // calls, on C strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            private_mount_namespace()?;
            for (file, over) in &pairs {
                bind(file, over)?;
            }
            become_user(uid, gid)
        });
    }
    Ok(())
}
