//! One seccomp filter per `mvm-vmm` thread role, written as typed data; and, in
//! [`container`], the container tier's filter for a whole process tree.
//!
//! A role ([`Role`]) is a name and an allow-list, each syscall next to the reason that
//! thread needs it: the VMM's core threads' roles and the sets every thread shares are in
//! [`roles`]; a device's role is written by the device's module in the VMM, so adding a
//! device touches nothing here. `mvm-vmm --print-seccomp` prints every role ([`describe`]),
//! and [`lint`] holds every role to the same rules. [`install`] compiles a role's list with seccompiler and
//! loads it on the calling thread only (no TSYNC): every thread installs its own filter, and
//! the main thread installs its filter last.
//!
//! A syscall outside the list is answered with `SECCOMP_RET_TRAP`: the kernel sends the
//! thread `SIGSYS`, and the handler in [`sigsys`] writes the thread's name and the syscall
//! number to stderr with a raw `write(2)` and ends the process with
//! [`STATUS_SECCOMP_VIOLATION`]. `KILL_PROCESS` would end the process just as surely but
//! leave the operator with nothing but a signal number; the trap keeps the default deny and
//! names the culprit.

pub mod container;
pub mod ioctl;
pub mod lint;
pub mod names;
pub mod roles;
pub mod sigsys;

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use container::{container_filter, install_container_filter};
pub use sigsys::STATUS_SECCOMP_VIOLATION;

/// A thread role: its name and its allow-list. The VMM's core threads' roles are in
/// [`roles`]; each device's role is declared by the device's own module in the VMM, on top
/// of [`roles::device_thread`].
#[derive(Clone, Copy)]
pub struct Role {
    /// The role's short name (`MVM_TEST_SECCOMP_VIOLATE`, `--print-seccomp`, reports).
    pub name: &'static str,
    allowed: fn() -> Vec<Allowed>,
}

impl Role {
    /// The role `name`, allowed what `allowed` lists.
    pub const fn new(name: &'static str, allowed: fn() -> Vec<Allowed>) -> Role {
        Role { name, allowed }
    }

    /// The role's allow-list.
    pub fn allowed(&self) -> Vec<Allowed> {
        (self.allowed)()
    }
}

impl PartialEq for Role {
    /// Roles are told apart by name (a VMM never has two roles of one name: a test checks).
    fn eq(&self, other: &Role) -> bool {
        self.name == other.name
    }
}

impl Eq for Role {}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({})", self.name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
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
        /// The role's name.
        role: &'static str,
        /// seccompiler's message.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("seccomp filter for role {role} on thread {thread}: cannot install: {reason}")]
    Install {
        /// The role's name.
        role: &'static str,
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
pub fn compile(role: &Role, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let compile_err = |e: seccompiler::Error| SeccompError::Compile {
        role: role.name,
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
pub fn install(role: &Role, thread: &str, mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    let program = compile(role, mode)?;
    sigsys::set_thread_name(thread);
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
        role: role.name,
        thread: thread.to_owned(),
        reason: e.to_string(),
    })?;
    tracing::debug!(%role, thread, ?mode, "seccomp filter installed");
    #[cfg(feature = "test-hooks")]
    test_hooks::violate_if_asked(role);
    Ok(())
}

/// The `--print-seccomp` text: every role in `roles`, its syscalls by name, the allowed
/// argument values and why.
pub fn describe(roles: &[Role]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for role in roles {
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
    use super::Role;

    /// With `MVM_TEST_SECCOMP_VIOLATE=<role>`, a thread of that role makes a syscall no
    /// role allows (`umask`) right after its filter went on. Test builds only.
    pub(super) fn violate_if_asked(role: &Role) {
        if std::env::var("MVM_TEST_SECCOMP_VIOLATE").ok().as_deref() == Some(role.name) {
            // SAFETY: umask takes an integer and cannot fail; it is here to be refused.
            unsafe { libc::syscall(libc::SYS_umask, 0o022) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_role_compiles_in_both_modes_and_passes_the_lint() {
        for role in roles::CORE {
            for mode in [Mode::Log, Mode::Enforce] {
                let p = compile(&role, mode).unwrap();
                assert!(p.len() > 10, "{role}: {} instructions", p.len());
            }
            assert_eq!(lint::problems(&role), Vec::<String>::new());
        }
    }

    #[test]
    fn modes_parse_and_describe_names_every_role() {
        assert_eq!(Mode::parse("on").unwrap(), Mode::Enforce);
        assert_eq!(Mode::parse("log").unwrap(), Mode::Log);
        assert!(Mode::parse("yes").is_err());
        let text = describe(&roles::CORE);
        assert!(text.contains("vcpu:") && text.contains("KVM_RUN"), "{text}");
        assert!(
            text.contains("main:") && text.contains("signals:"),
            "{text}"
        );
    }

    #[test]
    fn roles_are_equal_by_name() {
        assert_eq!(roles::MAIN, roles::MAIN);
        assert_ne!(roles::MAIN, roles::VCPU);
        assert_eq!(
            format!("{:?} {}", roles::VCPU, roles::VCPU),
            "Role(vcpu) vcpu"
        );
    }
}
