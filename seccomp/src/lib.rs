//! One seccomp filter per `mvm-vmm` thread role, written as typed data.
//!
//! Each role's allow-list lives in [`roles`], one function per role, each syscall next to
//! the reason that thread needs it. [`install`] compiles a role's list with seccompiler and
//! loads it on the calling thread only (no TSYNC): every thread installs its own filter, and
//! the main thread installs its filter last.
//!
//! A syscall outside the list is answered with `SECCOMP_RET_TRAP`: the kernel sends the
//! thread `SIGSYS`, and the handler in [`sigsys`] writes the thread's name and the syscall
//! number to stderr with a raw `write(2)` and ends the process with
//! [`STATUS_SECCOMP_VIOLATION`]. `KILL_PROCESS` would end the process just as surely but
//! leave the operator with nothing but a signal number; the trap keeps the default deny and
//! names the culprit.

pub mod ioctl;
pub mod roles;
pub mod sigsys;

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use sigsys::STATUS_SECCOMP_VIOLATION;

/// The thread roles of `mvm-vmm`, one filter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// The main thread: setup, then supervision until the VM ends, then the exit report.
    Main,
    /// The thread that waits for SIGINT/SIGTERM/SIGHUP and turns them into a VM exit.
    Signals,
    /// A vCPU thread: the KVM_RUN loop; PIO/MMIO exits are dispatched on this thread.
    Vcpu,
    /// The thread feeding the VMM's stdin to the guest's serial port.
    ConsoleInput,
    /// A virtio-blk device thread.
    Blk,
    /// The virtio-vsock device thread (the host end is a Unix socket).
    Vsock,
    /// The virtio-net device thread (the host end is a tap).
    Net,
}

impl ThreadRole {
    /// Every role, in the order `--print-seccomp` lists them.
    pub const ALL: [ThreadRole; 7] = [
        ThreadRole::Main,
        ThreadRole::Signals,
        ThreadRole::Vcpu,
        ThreadRole::ConsoleInput,
        ThreadRole::Blk,
        ThreadRole::Vsock,
        ThreadRole::Net,
    ];

    /// The role's short name (`MVM_TEST_SECCOMP_VIOLATE`, `--print-seccomp`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Signals => "signals",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::ConsoleInput => "console-input",
            ThreadRole::Blk => "blk",
            ThreadRole::Vsock => "vsock",
            ThreadRole::Net => "net",
        }
    }

    /// The role named `name`, if any.
    pub fn from_name(name: &str) -> Option<ThreadRole> {
        ThreadRole::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The role's allow-list.
    pub fn allowed(self) -> Vec<Allowed> {
        match self {
            ThreadRole::Main => roles::main(),
            ThreadRole::Signals => roles::signals(),
            ThreadRole::Vcpu => roles::vcpu(),
            ThreadRole::ConsoleInput => roles::console_input(),
            ThreadRole::Blk => roles::blk(),
            ThreadRole::Vsock => roles::vsock(),
            ThreadRole::Net => roles::net(),
        }
    }
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A condition on one syscall argument: the whole list of values it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgIn {
    /// Argument index (0-based).
    pub index: u8,
    /// The values allowed, each with its name (`KVM_RUN`, `FIONBIO`).
    pub values: Vec<(u64, &'static str)>,
}

/// One allowed syscall, with the reason and (optionally) the argument values allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Syscall number (x86_64).
    pub nr: i64,
    /// Syscall name, as in `man 2`.
    pub name: &'static str,
    /// Why this thread role makes it.
    pub why: &'static str,
    /// `None`: any arguments; `Some`: only these values of one argument.
    pub only: Option<ArgIn>,
}

/// Builds an [`Allowed`] from a `libc::SYS_*` name and the reason.
#[macro_export]
macro_rules! allow {
    ($sys:ident, $why:expr) => {
        $crate::Allowed {
            nr: $crate::sys_nr(::libc::$sys),
            name: $crate::strip_sys(stringify!($sys)),
            why: $why,
            only: None,
        }
    };
    ($sys:ident, $why:expr, arg $index:literal in [$($value:expr => $vname:literal),+ $(,)?]) => {
        $crate::Allowed {
            nr: $crate::sys_nr(::libc::$sys),
            name: $crate::strip_sys(stringify!($sys)),
            why: $why,
            only: Some($crate::ArgIn {
                index: $index,
                values: vec![$(($value, $vname)),+],
            }),
        }
    };
}

/// `libc::SYS_*` is a `c_long`, which is `i64` on x86_64.
#[doc(hidden)]
pub const fn sys_nr(nr: libc::c_long) -> i64 {
    nr
}

/// `"SYS_read"` -> `"read"`.
#[doc(hidden)]
pub const fn strip_sys(name: &'static str) -> &'static str {
    match name.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(s) => s,
            Err(_) => name,
        },
        _ => name,
    }
}

/// How the VMM uses its filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filters (development only).
    Off,
    /// Filters installed with `SECCOMP_RET_LOG` as the default: nothing is denied, every
    /// syscall outside a list is logged by the kernel (audit / dmesg). For finding gaps.
    Log,
    /// Filters enforced: a syscall outside the list traps and ends the process.
    Enforce,
}

impl Mode {
    /// Parses `off`, `log` or `on`/`enforce`.
    pub fn parse(value: &str) -> Result<Mode, SeccompError> {
        match value {
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            "on" | "enforce" => Ok(Mode::Enforce),
            other => Err(SeccompError::BadMode(other.to_owned())),
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in [`roles`]).
    #[error("seccomp filter for role {role}: cannot compile: {reason}")]
    Compile {
        /// The role.
        role: ThreadRole,
        /// seccompiler's message.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("seccomp filter for role {role} on thread {thread}: cannot install: {reason}")]
    Install {
        /// The role.
        role: ThreadRole,
        /// The thread's name.
        thread: String,
        /// seccompiler's message.
        reason: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// `MVM_SECCOMP` (or `--seccomp`) had a value other than off, log, on.
    #[error("seccomp mode {0:?}: expected off, log or on")]
    BadMode(String),
}

/// Compiles `role`'s filter. `default` is the action for a syscall outside the list.
pub fn compile(role: ThreadRole, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let compile_err = |e: seccompiler::Error| SeccompError::Compile {
        role,
        reason: e.to_string(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in role.allowed() {
        let entry = rules.entry(allowed.nr).or_default();
        if let Some(only) = &allowed.only {
            for (value, _) in &only.values {
                let cond = SeccompCondition::new(
                    only.index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    *value,
                )
                .map_err(|e| compile_err(e.into()))?;
                entry.push(SeccompRule::new(vec![cond]).map_err(|e| compile_err(e.into()))?);
            }
        }
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        Mode::Off | Mode::Enforce => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| compile_err(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| compile_err(e.into()))
}

/// Keeps glibc's allocator inside the filters. Call once at process start, before any
/// thread exists.
///
/// The first time glibc's malloc shrinks a thread arena's heap it opens
/// `/proc/sys/vm/overcommit_memory` (`check_may_shrink_heap`); no role allows `openat`, so
/// a device thread that freed a large buffer died with SIGSYS (a guest flooding a vsock
/// connection past its credit made the device drop that connection's 256 KiB buffer; found
/// by `scripts/e2e hostile`). With trimming off the allocator never shrinks a heap: freed
/// memory stays in its arena for reuse, so the process holds at most its peak.
pub fn keep_allocator_inside_filters() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads
    // exist, and M_TRIM_THRESHOLD with a positive value is a documented setting.
    let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    if ok != 1 {
        tracing::warn!("mallopt(M_TRIM_THRESHOLD) refused; heap trimming may trip seccomp");
    }
}

/// Installs `role`'s filter on the calling thread, which is named `thread` in reports.
/// With [`Mode::Off`] this does nothing. The SIGSYS handler must already be installed
/// ([`sigsys::install_handler`], once per process, from the main thread).
pub fn install(role: ThreadRole, thread: &str, mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    let program = compile(role, mode)?;
    sigsys::set_thread_name(thread);
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
        role,
        thread: thread.to_owned(),
        reason: e.to_string(),
    })?;
    tracing::debug!(%role, thread, ?mode, "seccomp filter installed");
    #[cfg(feature = "test-hooks")]
    test_hooks::violate_if_asked(role);
    Ok(())
}

/// The syscall name for `nr`, if any role lists it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    ThreadRole::ALL
        .into_iter()
        .flat_map(ThreadRole::allowed)
        .find(|a| a.nr == nr)
        .map(|a| a.name)
}

macro_rules! name_table {
    ($($sys:ident),+ $(,)?) => {
        /// Names for the SIGSYS report, without allocating: every syscall a role allows
        /// (a test checks that) and the ones a breached thread would likely try.
        static NAMES: &[(i64, &str)] = &[$((libc::$sys, strip_sys(stringify!($sys)))),+];
    };
}

name_table![
    SYS_read,
    SYS_write,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    SYS_clock_gettime,
    SYS_sched_yield,
    SYS_getrandom,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_rt_sigreturn,
    SYS_exit,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_openat,
    SYS_unlink,
    SYS_rt_sigtimedwait,
    SYS_ioctl,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_lseek,
    SYS_pread64,
    SYS_pwrite64,
    SYS_fdatasync,
    SYS_fsync,
    SYS_accept4,
    SYS_socket,
    SYS_connect,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_timerfd_settime,
    SYS_readv,
    SYS_writev,
    SYS_umask,
    SYS_open,
    SYS_execve,
    SYS_execveat,
    SYS_clone,
    SYS_clone3,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_mount,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_sendto,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_kill,
    SYS_tgkill,
    SYS_prctl,
    SYS_fcntl,
    SYS_fstat,
    SYS_statx,
    SYS_newfstatat,
    SYS_epoll_pwait,
    SYS_poll,
    SYS_ppoll,
    SYS_gettid,
    SYS_getpid,
    SYS_dup,
    SYS_dup3,
    SYS_pipe2,
    SYS_eventfd2,
    SYS_sched_getaffinity,
    SYS_rseq,
    SYS_set_robust_list,
    SYS_preadv,
    SYS_pwritev,
    SYS_unlinkat,
    SYS_getdents64,
];

/// [`syscall_name`] from a static table: safe to call in a signal handler.
pub fn syscall_name_static(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// The `--print-seccomp` text: every role, its syscalls by name, the allowed argument values
/// and why.
pub fn describe() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for role in ThreadRole::ALL {
        let allowed = role.allowed();
        let _ = writeln!(out, "{role}: {} syscalls", allowed.len());
        for a in allowed {
            let only = a.only.map_or(String::new(), |only| {
                let names: Vec<&str> = only.values.iter().map(|(_, n)| *n).collect();
                format!(" [arg{} in {}]", only.index, names.join(", "))
            });
            let _ = writeln!(out, "  {:<18} {}{only}", a.name, a.why);
        }
    }
    out
}

#[cfg(feature = "test-hooks")]
mod test_hooks {
    use super::ThreadRole;

    /// With `MVM_TEST_SECCOMP_VIOLATE=<role>`, a thread of that role makes a syscall no
    /// role allows (`umask`) right after its filter went on. Test builds only.
    pub(super) fn violate_if_asked(role: ThreadRole) {
        if std::env::var("MVM_TEST_SECCOMP_VIOLATE").ok().as_deref() == Some(role.name()) {
            // SAFETY: umask takes an integer and cannot fail; it is here to be refused.
            unsafe { libc::syscall(libc::SYS_umask, 0o022) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_both_modes() {
        for role in ThreadRole::ALL {
            for mode in [Mode::Log, Mode::Enforce] {
                let p = compile(role, mode).unwrap();
                assert!(p.len() > 10, "{role}: {} instructions", p.len());
            }
        }
    }

    #[test]
    fn no_role_lists_a_syscall_twice_and_every_rule_says_why() {
        for role in ThreadRole::ALL {
            let allowed = role.allowed();
            for (i, a) in allowed.iter().enumerate() {
                assert!(a.why.len() > 8, "{role}: {} has no reason", a.name);
                assert!(
                    allowed.iter().skip(i + 1).all(|b| b.nr != a.nr),
                    "{role}: {} twice",
                    a.name
                );
            }
        }
    }

    #[test]
    fn the_test_hook_syscall_and_dangerous_ones_are_in_no_role() {
        for nr in [
            libc::SYS_umask,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_mount,
            libc::SYS_openat,
        ] {
            for role in ThreadRole::ALL {
                // vsock: AF_UNIX only.
                if role == ThreadRole::Vsock && nr == libc::SYS_socket {
                    assert!(role
                        .allowed()
                        .iter()
                        .any(|a| a.nr == nr && a.only.is_some()));
                    continue;
                }
                assert!(
                    role.allowed().iter().all(|a| a.nr != nr),
                    "{role} allows syscall {nr}"
                );
            }
        }
    }

    #[test]
    fn futex_mmap_and_madvise_are_narrowed_by_argument_in_every_role() {
        let futex_lock_pi_private = 6 | 128;
        let map_shared = 0x01;
        let madv_remove = 9;
        for role in ThreadRole::ALL {
            let allowed = role.allowed();
            for (nr, index, allowed_value, refused_value) in [
                (libc::SYS_futex, 1, 129, futex_lock_pi_private),
                (libc::SYS_mmap, 3, 0x22, map_shared),
                (libc::SYS_madvise, 2, 4, madv_remove),
            ] {
                let rule = allowed.iter().find(|a| a.nr == nr).unwrap();
                let only = rule.only.as_ref().unwrap();
                assert_eq!(only.index, index, "{role}");
                assert!(only.values.iter().any(|(v, _)| *v == allowed_value));
                assert!(only.values.iter().all(|(v, _)| *v != refused_value));
            }
        }
    }

    #[test]
    fn the_signal_safe_name_table_covers_every_allowed_syscall() {
        for role in ThreadRole::ALL {
            for a in role.allowed() {
                assert_eq!(syscall_name_static(a.nr), Some(a.name), "{role}");
            }
        }
        assert_eq!(syscall_name_static(libc::SYS_umask), Some("umask"));
    }

    #[test]
    fn ioctl_is_always_restricted_by_request() {
        for role in ThreadRole::ALL {
            for a in role.allowed() {
                if a.nr == libc::SYS_ioctl {
                    assert!(a.only.is_some(), "{role}: ioctl without a request list");
                }
            }
        }
    }

    #[test]
    fn names_and_modes_round_trip() {
        for role in ThreadRole::ALL {
            assert_eq!(ThreadRole::from_name(role.name()), Some(role));
        }
        assert_eq!(Mode::parse("on").unwrap(), Mode::Enforce);
        assert_eq!(Mode::parse("log").unwrap(), Mode::Log);
        assert!(Mode::parse("yes").is_err());
        assert_eq!(syscall_name(libc::SYS_read), Some("read"));
        let text = describe();
        assert!(text.contains("vcpu:") && text.contains("KVM_RUN"), "{text}");
    }
}
