//! The rules every role is held to, whoever wrote it: the VMM's tests run [`problems`] over
//! every role the VMM has (core and devices), so a new device's allow-list meets the same
//! bar as the existing ones without a test of its own.

use crate::{Allowed, Role};

/// `futex(2)` operations no role may use (priority inheritance), `mmap(2)`'s `MAP_SHARED`
/// and `madvise(2)`'s `MADV_REMOVE`: a probe that each role's narrowing really narrows.
const FUTEX_LOCK_PI_PRIVATE: u64 = 6 | 128;
const MAP_SHARED: u64 = 0x01;
const MADV_REMOVE: u64 = 9;

/// Syscalls no role may allow at all: the test hook's (`umask`), and what would let a
/// breached thread leave its box (run a program, trace, spawn, mount, open files).
const NEVER: [(i64, &str); 6] = [
    (libc::SYS_umask, "umask"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_openat, "openat"),
];

/// Syscalls a role may allow only for named argument values (`ioctl` by request, `socket`
/// by family).
const ONLY_NARROWED: [(i64, &str); 2] = [(libc::SYS_ioctl, "ioctl"), (libc::SYS_socket, "socket")];

/// Everything wrong with `role`'s allow-list, one sentence each; empty when it passes.
pub fn problems(role: &Role) -> Vec<String> {
    let allowed = role.allowed();
    let mut out = Vec::new();
    for (i, a) in allowed.iter().enumerate() {
        if a.why.len() <= 8 {
            out.push(format!("{role}: {} has no reason", a.name));
        }
        if allowed.iter().skip(i + 1).any(|b| b.nr == a.nr) {
            out.push(format!("{role}: {} is listed twice", a.name));
        }
        if crate::names::syscall_name(a.nr) != Some(a.name) {
            out.push(format!("{role}: {} is not syscall {}", a.name, a.nr));
        }
    }
    for (nr, name) in NEVER {
        if allowed.iter().any(|a| a.nr == nr) {
            out.push(format!("{role} allows {name}"));
        }
    }
    for (nr, name) in ONLY_NARROWED {
        if allowed.iter().any(|a| a.nr == nr && a.only.is_none()) {
            out.push(format!("{role}: {name} without a list of allowed values"));
        }
    }
    for (nr, name, index, refused) in [
        (libc::SYS_futex, "futex", 1, FUTEX_LOCK_PI_PRIVATE),
        (libc::SYS_mmap, "mmap", 3, MAP_SHARED),
        (libc::SYS_madvise, "madvise", 2, MADV_REMOVE),
    ] {
        if !narrowed(&allowed, nr, index, refused) {
            out.push(format!(
                "{role}: {name} is not narrowed on argument {index} (value {refused:#x} passes)"
            ));
        }
    }
    out
}

/// Whether `nr` is allowed only with argument `index` in a list that leaves out `refused`
/// (or not allowed at all).
fn narrowed(allowed: &[Allowed], nr: i64, index: u8, refused: u64) -> bool {
    allowed.iter().filter(|a| a.nr == nr).all(|a| {
        a.only.as_ref().is_some_and(|only| {
            only.index == index && only.values.iter().all(|(v, _)| *v != refused)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allow;

    fn sloppy() -> Vec<Allowed> {
        vec![
            allow!(SYS_read, "read"),
            allow!(SYS_read, "read again, for no reason"),
            allow!(SYS_ioctl, "any ioctl at all, which is the point"),
            allow!(SYS_execve, "run whatever the guest asks for"),
            allow!(SYS_futex, "every futex operation, priority inheritance too"),
        ]
    }

    #[test]
    fn a_sloppy_role_fails_on_every_count() {
        let found = problems(&Role::new("sloppy", sloppy));
        let expect = [
            "sloppy: read has no reason",
            "sloppy: read is listed twice",
            "sloppy allows execve",
            "sloppy: ioctl without a list of allowed values",
            "sloppy: futex is not narrowed on argument 1 (value 0x86 passes)",
        ];
        for e in expect {
            assert!(found.iter().any(|f| f == e), "{e} missing from {found:?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:?}");
    }
}
