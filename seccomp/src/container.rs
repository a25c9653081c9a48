//! The container tier's filter: one filter for a whole process tree (the agent, PID 1 of the
//! container, and every workload it starts), which allows by default and refuses the
//! syscalls container escapes are made of. The VMM's roles ([`crate::roles`]) are the
//! opposite shape: per-thread allow-lists.
//!
//! Every refusal is a row of [`DENIED`], with its reason, so `mvm-agent --print-seccomp`
//! ([`describe`]), `docs/seccomp.md` and the tests all read the same table. A row's
//! syscall fails with an errno (`EPERM`, or `ENOSYS` where the caller is expected to fall
//! back), not a kill: a workload that probes gets a clear error, as under Docker's profile.
//!
//! Three refusals are not rows, because they are about the call itself, not a syscall:
//!
//! - a syscall made through another ABI than x86_64's (`int 0x80`, the i386 ABI) kills the
//!   process: syscall numbers differ per ABI, so this table means nothing there;
//! - a number with the x32 bit (`__X32_SYSCALL_BIT`, `0x4000_0000`) gets `ENOSYS`: x32
//!   syscalls arrive with the x86_64 audit arch, and `mount` through x32 is the x86_64
//!   `mount` plus that bit, which a table of x86_64 numbers would not match;
//! - a number above [`NEWEST_REVIEWED`] gets `ENOSYS`, as on a kernel that predates it: an
//!   allow-by-default filter would otherwise allow every syscall added after this table was
//!   reviewed (Linux 6.15's `open_tree_attr` is another door into the mount API).
//!
//! The program is assembled here rather than by seccompiler: seccompiler 0.5 gives a filter
//! one match action (this one answers `EPERM`, `ENOSYS` and, for foreign ABIs, kill) and
//! compares exact syscall numbers (the x32 and newer-than-reviewed checks are ranges). The
//! shape is a straight line a reviewer can follow: for each row, `jeq nr` then `ret`, and
//! for rows that look at an argument a short block after it; every jump but those skips one
//! instruction. The tests run the program through a BPF interpreter for every syscall
//! number, and through the kernel in a child process.

use std::fmt::Write as _;

use seccompiler::{sock_filter, BpfProgram};

use crate::{strip_sys, sys_nr, SeccompError};

/// The name errors and reports give this filter.
const ROLE: &str = "container";

/// What a refused syscall returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `EPERM`: not allowed here.
    Eperm,
    /// `ENOSYS`: as if the kernel lacked the syscall, so libc falls back to an older one.
    Enosys,
}

impl Answer {
    /// The errno the caller sees.
    pub const fn errno(self) -> i32 {
        match self {
            Answer::Eperm => libc::EPERM,
            Answer::Enosys => libc::ENOSYS,
        }
    }

    /// The errno's name.
    pub const fn name(self) -> &'static str {
        match self {
            Answer::Eperm => "EPERM",
            Answer::Enosys => "ENOSYS",
        }
    }
}

/// One value of an argument, masked: the argument matches when `arg & mask == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masked {
    /// The bits looked at.
    pub mask: u32,
    /// Their value.
    pub value: u32,
    /// The value's name (`CLONE_NEWUSER`, `S_IFBLK`).
    pub name: &'static str,
}

/// When a row's syscall is refused. Arguments are compared in their low 32 bits: every
/// argument looked at here is one the kernel reads as 32 bits (an `int`, an `unsigned int`,
/// a `umode_t`, and `clone(2)`'s flags through `lower_32_bits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Every call.
    Always,
    /// When argument `arg` matches any of `cases`.
    ArgMatches {
        /// Argument index (0-based).
        arg: u8,
        /// The refused values.
        cases: &'static [Masked],
    },
    /// Unless argument `arg` is one of `values`.
    ArgNotIn {
        /// Argument index (0-based).
        arg: u8,
        /// The allowed values and their names.
        values: &'static [(u32, &'static str)],
    },
}

/// One refused syscall: the table's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Syscall number (x86_64).
    pub nr: i64,
    /// Syscall name, as in `man 2`.
    pub name: &'static str,
    /// Which calls are refused.
    pub when: When,
    /// What they return.
    pub answer: Answer,
    /// Why a container's processes may not make them.
    pub reason: &'static str,
}

/// A row from a `libc::SYS_*` name: always refused with `EPERM`, or as given.
macro_rules! deny {
    ($sys:ident, $reason:expr) => {
        deny!($sys, When::Always, Answer::Eperm, $reason)
    };
    ($sys:ident, $when:expr, $reason:expr) => {
        deny!($sys, $when, Answer::Eperm, $reason)
    };
    ($sys:ident, $when:expr, $answer:expr, $reason:expr) => {
        Denied {
            nr: sys_nr(libc::$sys),
            name: strip_sys(stringify!($sys)),
            when: $when,
            answer: $answer,
            reason: $reason,
        }
    };
}

/// `CLONE_NEWNS` (`<linux/sched.h>`): a new mount namespace.
pub const CLONE_NEWNS: u32 = 0x0002_0000;
/// `CLONE_NEWCGROUP` (`<linux/sched.h>`): a new cgroup namespace.
pub const CLONE_NEWCGROUP: u32 = 0x0200_0000;
/// `CLONE_NEWUTS` (`<linux/sched.h>`): a new UTS namespace.
pub const CLONE_NEWUTS: u32 = 0x0400_0000;
/// `CLONE_NEWIPC` (`<linux/sched.h>`): a new IPC namespace.
pub const CLONE_NEWIPC: u32 = 0x0800_0000;
/// `CLONE_NEWUSER` (`<linux/sched.h>`): a new user namespace.
pub const CLONE_NEWUSER: u32 = 0x1000_0000;
/// `CLONE_NEWPID` (`<linux/sched.h>`): a new PID namespace.
pub const CLONE_NEWPID: u32 = 0x2000_0000;
/// `CLONE_NEWNET` (`<linux/sched.h>`): a new network namespace.
pub const CLONE_NEWNET: u32 = 0x4000_0000;
/// `CLONE_NEWTIME` (`<linux/sched.h>`). Not refused in `clone(2)`'s flags: the bit is inside
/// `CSIGNAL` (the low byte, the exit signal), so `clone(2)` cannot ask for a time namespace
/// at all (the kernel reads the low byte as a signal number, and refuses 128 and above);
/// only `clone3(2)` and `unshare(2)` can, and both are refused.
pub const CLONE_NEWTIME: u32 = 0x0000_0080;

/// `S_IFMT` (`<linux/stat.h>`): the file-type bits of a mode.
pub const S_IFMT: u32 = 0o170_000;
/// `S_IFCHR` (`<linux/stat.h>`): a character device.
pub const S_IFCHR: u32 = 0o020_000;
/// `S_IFBLK` (`<linux/stat.h>`): a block device.
pub const S_IFBLK: u32 = 0o060_000;

/// `AF_VSOCK` (`<linux/socket.h>`).
pub const AF_VSOCK: u32 = 40;

/// `PER_LINUX` (`<linux/personality.h>`): the default persona.
pub const PER_LINUX: u32 = 0;
/// `personality(0xffffffff)` changes nothing and returns the current persona.
pub const PERSONALITY_QUERY: u32 = 0xffff_ffff;

/// The namespace flags `clone(2)` may not carry.
const CLONE_NAMESPACES: &[Masked] = &[
    flag(CLONE_NEWNS, "CLONE_NEWNS"),
    flag(CLONE_NEWCGROUP, "CLONE_NEWCGROUP"),
    flag(CLONE_NEWUTS, "CLONE_NEWUTS"),
    flag(CLONE_NEWIPC, "CLONE_NEWIPC"),
    flag(CLONE_NEWUSER, "CLONE_NEWUSER"),
    flag(CLONE_NEWPID, "CLONE_NEWPID"),
    flag(CLONE_NEWNET, "CLONE_NEWNET"),
];

/// A single flag: set.
const fn flag(bit: u32, name: &'static str) -> Masked {
    Masked {
        mask: bit,
        value: bit,
        name,
    }
}

/// The device file types `mknod(2)` may not create.
const DEVICE_NODES: &[Masked] = &[
    Masked {
        mask: S_IFMT,
        value: S_IFCHR,
        name: "S_IFCHR",
    },
    Masked {
        mask: S_IFMT,
        value: S_IFBLK,
        name: "S_IFBLK",
    },
];

const WHY_MKNOD: &str = "a device node made inside the container opens the host's device \
     (a disk, /dev/mem) for a root workload: no device cgroup stands behind this filter. \
     The launcher binds in the devices a container has; FIFOs and sockets are still made";

const WHY_CLOCK: &str = "the clocks are not namespaced (a time namespace offsets only the \
     monotonic and boot clocks): setting one sets the host's";

const WHY_MOUNT_API: &str = "the mount API of Linux 5.2 (fsopen, fsconfig, fsmount, fspick, \
     move_mount, open_tree, mount_setattr): mount(2)'s powers through other calls";

const WHY_IO_URING: &str = "io_uring does I/O (openat, connect, ...) from a ring the kernel \
     works through without a syscall per operation: seccomp never sees those operations, \
     and io_uring has been a steady source of kernel exploits";

const WHY_KEYRING: &str = "the kernel keyring is not namespaced: keys of other users and \
     containers on the host are reachable by serial number";

const WHY_KEXEC: &str = "replaces the running kernel, the host's";

const WHY_MODULE: &str = "kernel modules: code into, or out of, the host's kernel";

/// Every refusal, in the order the filter checks them. No syscall appears twice.
pub const DENIED: &[Denied] = &[
    // The kernel itself.
    deny!(SYS_init_module, WHY_MODULE),
    deny!(SYS_finit_module, WHY_MODULE),
    deny!(SYS_delete_module, WHY_MODULE),
    deny!(SYS_kexec_load, WHY_KEXEC),
    deny!(SYS_kexec_file_load, WHY_KEXEC),
    deny!(
        SYS_bpf,
        "eBPF programs run in the host's kernel: a large verifier attack surface, and \
         tracing programs read every process on the host"
    ),
    deny!(
        SYS_perf_event_open,
        "kernel and CPU performance counters: side channels on the host and other \
         processes, and a long history of kernel bugs"
    ),
    deny!(
        SYS_userfaultfd,
        "lets a process stall the kernel on a page fault for as long as it likes: the \
         usual way exploits widen a kernel race window"
    ),
    deny!(
        SYS_iopl,
        "direct access to the host's I/O ports (CAP_SYS_RAWIO)"
    ),
    deny!(
        SYS_ioperm,
        "direct access to the host's I/O ports (CAP_SYS_RAWIO)"
    ),
    deny!(
        SYS_syslog,
        "reads or clears the host kernel's log: kernel addresses and other containers' \
         messages"
    ),
    deny!(
        SYS_lookup_dcookie,
        "turns oprofile's dentry cookies into host paths (removed in Linux 6.7)"
    ),
    deny!(
        SYS_nfsservctl,
        "the in-kernel NFS server's old control call (removed in Linux 3.1)"
    ),
    deny!(SYS_io_uring_setup, WHY_IO_URING),
    deny!(SYS_io_uring_enter, WHY_IO_URING),
    deny!(SYS_io_uring_register, WHY_IO_URING),
    // The host's machine and its global state.
    deny!(
        SYS_reboot,
        "powers the host off or restarts it (CAP_SYS_BOOT); in a PID namespace it ends the \
         container behind the agent's back. A container stops through the agent's \
         shutdown request"
    ),
    deny!(SYS_swapon, "changes the host's swap devices"),
    deny!(SYS_swapoff, "changes the host's swap devices"),
    deny!(
        SYS_acct,
        "turns on process accounting for the host: a file the kernel appends to for every \
         process that ends"
    ),
    deny!(
        SYS_quotactl,
        "changes disk quotas of the host's file systems"
    ),
    deny!(
        SYS_quotactl_fd,
        "changes disk quotas of the host's file systems"
    ),
    deny!(SYS_settimeofday, WHY_CLOCK),
    deny!(SYS_clock_settime, WHY_CLOCK),
    deny!(
        SYS_clock_adjtime,
        "steers a clock the host shares (also refused read-only: nothing a workload runs \
         needs the kernel's NTP state)"
    ),
    deny!(
        SYS_adjtimex,
        "steers the host's clock (also refused read-only: nothing a workload runs needs \
         the kernel's NTP state)"
    ),
    deny!(
        SYS_vhangup,
        "hangs up the controlling terminal, which may be the launcher's"
    ),
    deny!(
        SYS_personality,
        When::ArgNotIn {
            arg: 0,
            values: &[
                (PER_LINUX, "PER_LINUX"),
                (PERSONALITY_QUERY, "0xffffffff (query)"),
            ],
        },
        "other personas turn off address-space randomisation (ADDR_NO_RANDOMIZE), make \
         every readable mapping executable (READ_IMPLIES_EXEC) or map page zero \
         (MMAP_PAGE_ZERO): exploit aids. Querying, and setting the default, stay allowed"
    ),
    // Keys.
    deny!(SYS_keyctl, WHY_KEYRING),
    deny!(SYS_add_key, WHY_KEYRING),
    deny!(SYS_request_key, WHY_KEYRING),
    // Other processes.
    deny!(
        SYS_ptrace,
        "reads and rewrites other processes' memory and registers (a root workload could \
         take over the agent, PID 1); before Linux 4.8 a tracer could also change a \
         syscall after the filter had checked it"
    ),
    deny!(
        SYS_process_vm_readv,
        "reads another process's memory (ptrace's access check, without stopping it)"
    ),
    deny!(
        SYS_process_vm_writev,
        "writes another process's memory (ptrace's access check, without stopping it)"
    ),
    deny!(
        SYS_kcmp,
        "compares kernel objects of two processes: leaks the ordering of kernel pointers \
         (KASLR) and which files two processes share"
    ),
    deny!(
        SYS_pidfd_getfd,
        "copies a file descriptor out of another process (ptrace's access check): the \
         agent's socket, for one"
    ),
    // Mounts and roots: the launcher did every mount before the agent started.
    deny!(
        SYS_mount,
        "a mount can hide or replace what the launcher set up, or bring in host file \
         systems (proc, sysfs, a block device); the launcher does every mount before the \
         agent starts"
    ),
    deny!(
        SYS_umount2,
        "unmounting uncovers what the launcher's mounts hide, and can detach the socket \
         directory the agent serves"
    ),
    deny!(
        SYS_pivot_root,
        "changes the mount namespace's root; the launcher did it once"
    ),
    deny!(
        SYS_chroot,
        "nothing in the agent calls it; for a root workload it is half of the classic \
         escape (chroot into a subdirectory with a directory fd kept outside, then walk up \
         from that fd)"
    ),
    deny!(SYS_fsopen, WHY_MOUNT_API),
    deny!(SYS_fsconfig, WHY_MOUNT_API),
    deny!(SYS_fsmount, WHY_MOUNT_API),
    deny!(SYS_fspick, WHY_MOUNT_API),
    deny!(SYS_move_mount, WHY_MOUNT_API),
    deny!(SYS_open_tree, WHY_MOUNT_API),
    deny!(SYS_mount_setattr, WHY_MOUNT_API),
    deny!(
        SYS_open_by_handle_at,
        "opens a file by its handle, with no path lookup and so no container root: the \
         'shocker' escape from Docker (CAP_DAC_READ_SEARCH)"
    ),
    deny!(
        SYS_name_to_handle_at,
        "makes the handles open_by_handle_at opens, and tells a file's inode identity"
    ),
    // Namespaces.
    deny!(
        SYS_unshare,
        "a new user namespace gives a workload every capability inside it, which opens \
         kernel code (netfilter, file systems, ...) it could not reach otherwise: the \
         route of most container-escape exploits. The other namespaces undo the \
         launcher's set-up"
    ),
    deny!(
        SYS_setns,
        "joins another namespace through a file descriptor (a /proc/PID/ns/* of a process \
         that came in from outside)"
    ),
    deny!(
        SYS_clone,
        When::ArgMatches {
            arg: 0,
            cases: CLONE_NAMESPACES,
        },
        "new namespaces, as unshare (CLONE_NEWTIME is not a clone(2) flag: its bit is \
         the exit signal's); plain fork, vfork and threads are clones without them"
    ),
    deny!(
        SYS_clone3,
        When::Always,
        Answer::Enosys,
        "its flags are in a struct in memory, which seccomp cannot read, so clone's \
         namespace check cannot be made on it. ENOSYS, not EPERM: glibc (2.34 and later) \
         tries clone3 first for threads and posix_spawn and falls back to clone only on \
         ENOSYS; EPERM would fail every pthread_create"
    ),
    // Devices and the host's other VMs.
    deny!(
        SYS_mknod,
        When::ArgMatches {
            arg: 1,
            cases: DEVICE_NODES,
        },
        WHY_MKNOD
    ),
    deny!(
        SYS_mknodat,
        When::ArgMatches {
            arg: 2,
            cases: DEVICE_NODES,
        },
        WHY_MKNOD
    ),
    deny!(
        SYS_socket,
        When::ArgMatches {
            arg: 0,
            cases: &[Masked {
                mask: u32::MAX,
                value: AF_VSOCK,
                name: "AF_VSOCK",
            }],
        },
        "vsock is not network-namespaced: a container could reach the vsock ports of the \
         host's VMs (vhost-vsock), their agents included (Docker's profile refuses it too)"
    ),
];

/// The highest syscall number this table was reviewed against (`mseal`, Linux 6.10): any
/// higher number gets `ENOSYS`. A test holds it to the crate's name table, so adding a
/// syscall there means deciding here whether containers may make it.
pub const NEWEST_REVIEWED: i64 = libc::SYS_mseal;

/// `__X32_SYSCALL_BIT` (`<asm/unistd.h>`): set in the number of an x32 ABI syscall.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `AUDIT_ARCH_X86_64` (`<linux/audit.h>`): `EM_X86_64 | __AUDIT_ARCH_64BIT |
/// __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// Offsets in `struct seccomp_data` (`<linux/seccomp.h>`): the syscall number, the audit
/// arch, the first argument (each argument is 8 bytes; on little-endian x86_64 the low 32
/// bits come first).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// The classic BPF instructions the filter uses (`<linux/bpf_common.h>`), class, size or
/// operation, and source together: `BPF_LD | BPF_W | BPF_ABS` (load a 32-bit word of
/// `seccomp_data`), `BPF_ALU | BPF_AND | BPF_K`, `BPF_JMP | BPF_JEQ | BPF_K`,
/// `BPF_JMP | BPF_JGT | BPF_K`, `BPF_RET | BPF_K`.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGT_K: u16 = 0x25;
const BPF_RET_K: u16 = 0x06;

/// `BPF_MAXINSNS` (`<linux/bpf_common.h>`): the longest program the kernel loads.
const BPF_MAXINSNS: usize = 4096;

/// Filter return values (`<linux/seccomp.h>`).
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_DATA: u32 = 0x0000_ffff;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret_errno(answer: Answer) -> sock_filter {
    let errno = u32::try_from(answer.errno()).unwrap_or(SECCOMP_RET_DATA) & SECCOMP_RET_DATA;
    stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno)
}

fn compile_error(reason: String) -> SeccompError {
    SeccompError::Compile { role: ROLE, reason }
}

/// Loads the low 32 bits of argument `arg`.
fn load_arg(arg: u8) -> Result<sock_filter, SeccompError> {
    if arg > 5 {
        return Err(compile_error(format!("argument {arg}: a syscall has six")));
    }
    Ok(stmt(BPF_LD_W_ABS, DATA_ARGS + 8 * u32::from(arg)))
}

/// The instructions of a row that looks at an argument (run with the row's syscall
/// matched); every path ends in a return.
fn argument_block(row: &Denied) -> Result<Vec<sock_filter>, SeccompError> {
    let mut block = Vec::new();
    match row.when {
        When::Always => {}
        When::ArgMatches { arg, cases } => {
            for case in cases {
                block.push(load_arg(arg)?);
                block.push(stmt(BPF_ALU_AND_K, case.mask));
                block.push(jump(BPF_JEQ_K, case.value, 0, 1));
                block.push(ret_errno(row.answer));
            }
            block.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
        }
        When::ArgNotIn { arg, values } => {
            block.push(load_arg(arg)?);
            for (value, _) in values {
                block.push(jump(BPF_JEQ_K, *value, 0, 1));
                block.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
            }
            block.push(ret_errno(row.answer));
        }
    }
    Ok(block)
}

/// The container filter as a BPF program.
pub fn container_filter() -> Result<BpfProgram, SeccompError> {
    let newest = u32::try_from(NEWEST_REVIEWED)
        .map_err(|_| compile_error(format!("newest syscall {NEWEST_REVIEWED} out of range")))?;
    let mut program = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
        // x32 numbers (with X32_SYSCALL_BIT) and numbers newer than the table are above it.
        jump(BPF_JGT_K, newest, 0, 1),
        ret_errno(Answer::Enosys),
    ];
    for row in DENIED {
        let nr = u32::try_from(row.nr)
            .map_err(|_| compile_error(format!("{}: number {} out of range", row.name, row.nr)))?;
        let block = argument_block(row)?;
        if block.is_empty() {
            program.push(jump(BPF_JEQ_K, nr, 0, 1));
            program.push(ret_errno(row.answer));
        } else {
            let skip = u8::try_from(block.len()).map_err(|_| {
                compile_error(format!(
                    "{}: {} instructions to skip",
                    row.name,
                    block.len()
                ))
            })?;
            program.push(jump(BPF_JEQ_K, nr, 0, skip));
            program.extend(block);
        }
    }
    program.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    if program.len() > BPF_MAXINSNS {
        return Err(compile_error(format!(
            "{} instructions; the kernel loads at most {BPF_MAXINSNS}",
            program.len()
        )));
    }
    Ok(program)
}

/// Puts the container filter on every thread of the calling process, and so on every
/// process it starts from now on (a filter survives fork, clone and execve, and cannot be
/// taken off).
///
/// Sets `PR_SET_NO_NEW_PRIVS` first: the kernel requires it of a caller without
/// `CAP_SYS_ADMIN`, and it is part of the contract anyway (no process of the tree gains
/// privileges through a set-user-ID file or file capabilities).
///
/// Installed with `SECCOMP_FILTER_FLAG_TSYNC` (seccompiler's `apply_filter_all_threads`):
/// the filter is for the whole tree, so a thread that already exists (the agent calls this
/// before it starts any, but a library may have) must not stay outside it and later start
/// a process without it. The kernel applies the filter to all threads or to none.
pub fn install_container_filter() -> Result<(), SeccompError> {
    let program = container_filter()?;
    let install_error = |reason: String| SeccompError::Install {
        role: ROLE,
        thread: "every thread (TSYNC)".to_owned(),
        reason,
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(install_error(format!(
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        )));
    }
    seccompiler::apply_filter_all_threads(&program).map_err(|e| install_error(e.to_string()))?;
    tracing::debug!(
        rows = DENIED.len(),
        instructions = program.len(),
        "container seccomp filter installed"
    );
    Ok(())
}

/// The table as text (`mvm-agent --print-seccomp`): every refused syscall, when, with
/// what errno and why; then the refusals that are not rows.
pub fn describe() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "container: every syscall allowed but for these {} rows ({} BPF instructions)",
        DENIED.len(),
        container_filter().map_or(0, |p| p.len())
    );
    for row in DENIED {
        let when = match row.when {
            When::Always => String::new(),
            When::ArgMatches { arg, cases } => {
                let names: Vec<String> = cases
                    .iter()
                    .map(|c| match c.mask {
                        u32::MAX => format!("is {}", c.name),
                        mask if mask == c.value => format!("has {}", c.name),
                        mask => format!("& {mask:#o} is {}", c.name),
                    })
                    .collect();
                format!(" [when arg{arg} {}]", names.join(" or "))
            }
            When::ArgNotIn { arg, values } => {
                let names: Vec<&str> = values.iter().map(|(_, n)| *n).collect();
                format!(" [unless arg{arg} is {}]", names.join(" or "))
            }
        };
        let _ = writeln!(
            out,
            "  {:<22} {:<6} {}{when}",
            row.name,
            row.answer.name(),
            row.reason
        );
    }
    let _ = writeln!(
        out,
        "  {:<22} {:<6} x32 ABI numbers (nr | {X32_SYSCALL_BIT:#x}), which a table of x86_64 \
         numbers would not match",
        "(x32 ABI)", "ENOSYS"
    );
    let _ = writeln!(
        out,
        "  {:<22} {:<6} syscalls newer than this table (above {NEWEST_REVIEWED}), as on an \
         older kernel",
        format!("(nr > {NEWEST_REVIEWED})"),
        "ENOSYS"
    );
    let _ = writeln!(
        out,
        "  {:<22} {:<6} another ABI (int 0x80): the table's numbers mean nothing there",
        "(not x86_64)", "KILL"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    /// A classic-BPF interpreter for what [`container_filter`] emits: the syscall's
    /// result for an arch, number and arguments.
    fn run(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let word = |offset: u32| -> u32 {
            match offset {
                DATA_NR => nr,
                DATA_ARCH => arch,
                o if o >= DATA_ARGS && (o - DATA_ARGS) % 4 == 0 => {
                    let value = args[usize::try_from((o - DATA_ARGS) / 8).unwrap()];
                    let word = if (o - DATA_ARGS) % 8 == 0 {
                        value
                    } else {
                        value >> 32
                    };
                    u32::try_from(word & 0xffff_ffff).unwrap()
                }
                o => panic!("load from offset {o}"),
            }
        };
        let mut a = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code {
                BPF_LD_W_ABS => a = word(insn.k),
                BPF_ALU_AND_K => a &= insn.k,
                BPF_JEQ_K | BPF_JGT_K => {
                    let taken = if insn.code == BPF_JEQ_K {
                        a == insn.k
                    } else {
                        a > insn.k
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                BPF_RET_K => return insn.k,
                code => panic!("opcode {code:#x} at {}", pc - 1),
            }
        }
    }

    fn call(nr: i64, args: [u64; 6]) -> u32 {
        let program = container_filter().unwrap();
        run(
            &program,
            AUDIT_ARCH_X86_64,
            u32::try_from(nr).unwrap(),
            args,
        )
    }

    const EPERM: u32 = SECCOMP_RET_ERRNO | 1;
    const ENOSYS: u32 = SECCOMP_RET_ERRNO | 38;
    const SIGCHLD: u64 = 17;

    /// A flag or number from libc as a syscall argument.
    fn arg(value: libc::c_int) -> u64 {
        u64::try_from(value).unwrap()
    }

    #[test]
    fn every_row_is_a_syscall_once_with_a_reason() {
        for (i, row) in DENIED.iter().enumerate() {
            assert_eq!(
                names::syscall_name(row.nr),
                Some(row.name),
                "{} is not syscall {}",
                row.name,
                row.nr
            );
            assert!(row.reason.len() > 20, "{}: no reason", row.name);
            assert!(
                DENIED.iter().skip(i + 1).all(|other| other.nr != row.nr),
                "{} listed twice",
                row.name
            );
        }
    }

    #[test]
    fn the_table_has_what_container_escapes_use() {
        for name in [
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "bpf",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "unshare",
            "setns",
            "clone3",
            "clone",
            "open_by_handle_at",
            "name_to_handle_at",
            "perf_event_open",
            "reboot",
            "swapon",
            "swapoff",
            "syslog",
            "acct",
            "quotactl",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "iopl",
            "ioperm",
            "lookup_dcookie",
            "personality",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "vhangup",
            "nfsservctl",
        ] {
            assert!(DENIED.iter().any(|row| row.name == name), "{name} missing");
        }
    }

    #[test]
    fn the_constants_are_the_kernels() {
        assert_eq!(
            (EPERM, ENOSYS),
            (ret_errno(Answer::Eperm).k, ret_errno(Answer::Enosys).k)
        );
        assert_eq!(SIGCHLD, arg(libc::SIGCHLD));
        for (ours, theirs) in [
            (CLONE_NEWNS, libc::CLONE_NEWNS),
            (CLONE_NEWCGROUP, libc::CLONE_NEWCGROUP),
            (CLONE_NEWUTS, libc::CLONE_NEWUTS),
            (CLONE_NEWIPC, libc::CLONE_NEWIPC),
            (CLONE_NEWUSER, libc::CLONE_NEWUSER),
            (CLONE_NEWPID, libc::CLONE_NEWPID),
            (CLONE_NEWNET, libc::CLONE_NEWNET),
            (CLONE_NEWTIME, libc::CLONE_NEWTIME),
            (AF_VSOCK, libc::AF_VSOCK),
        ] {
            assert_eq!(i64::from(ours), i64::from(theirs));
        }
        for (ours, theirs) in [
            (S_IFMT, libc::S_IFMT),
            (S_IFCHR, libc::S_IFCHR),
            (S_IFBLK, libc::S_IFBLK),
        ] {
            assert_eq!(ours, theirs);
        }
        assert_eq!(X32_SYSCALL_BIT, 0x4000_0000);
        assert_eq!(SECCOMP_RET_KILL_PROCESS, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(SECCOMP_RET_ERRNO, libc::SECCOMP_RET_ERRNO);
        assert_eq!(SECCOMP_RET_ALLOW, libc::SECCOMP_RET_ALLOW);
    }

    #[test]
    fn newest_reviewed_is_the_name_tables_newest() {
        let newest = (0..1024)
            .filter(|nr| names::syscall_name(*nr).is_some())
            .max();
        assert_eq!(
            newest,
            Some(NEWEST_REVIEWED),
            "the name table grew: decide in container.rs whether containers may make the \
             new syscalls, then move NEWEST_REVIEWED"
        );
    }

    #[test]
    fn every_known_syscall_gets_its_rows_answer_or_is_allowed() {
        for nr in 0..=NEWEST_REVIEWED {
            let Some(name) = names::syscall_name(nr) else {
                continue;
            };
            let got = call(nr, [0; 6]);
            let expected = match DENIED.iter().find(|row| row.nr == nr) {
                // Zero arguments: a plain clone, mknod of a regular file, socket(AF_UNSPEC),
                // personality(PER_LINUX); all allowed.
                Some(Denied {
                    when: When::ArgMatches { .. } | When::ArgNotIn { .. },
                    ..
                }) => SECCOMP_RET_ALLOW,
                Some(row) => ret_errno(row.answer).k,
                None => SECCOMP_RET_ALLOW,
            };
            assert_eq!(got, expected, "{name} ({nr})");
        }
    }

    #[test]
    fn clone_is_refused_only_with_a_namespace_flag() {
        let nr = libc::SYS_clone;
        assert_eq!(call(nr, [SIGCHLD, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        // glibc's pthread_create and posix_spawn.
        let thread = arg(libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID);
        assert_eq!(call(nr, [thread, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        let vfork = arg(libc::CLONE_VM | libc::CLONE_VFORK) | SIGCHLD;
        assert_eq!(call(nr, [vfork, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        for case in CLONE_NAMESPACES {
            let flags = u64::from(case.value) | SIGCHLD;
            assert_eq!(call(nr, [flags, 0, 0, 0, 0, 0]), EPERM, "{}", case.name);
            // Upper bits (which the kernel drops) change nothing.
            let flags = flags | 0xffff_ffff_0000_0000;
            assert_eq!(call(nr, [flags, 0, 0, 0, 0, 0]), EPERM, "{}", case.name);
        }
        let all = arg(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET);
        assert_eq!(call(nr, [all, 0, 0, 0, 0, 0]), EPERM);
        // The other arguments do not matter.
        assert_eq!(
            call(nr, [SIGCHLD, u64::from(CLONE_NEWUSER), 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(call(libc::SYS_clone3, [0; 6]), ENOSYS);
        assert_eq!(call(libc::SYS_unshare, [0; 6]), EPERM);
    }

    #[test]
    fn personality_may_only_be_queried_or_reset() {
        let nr = libc::SYS_personality;
        assert_eq!(call(nr, [0xffff_ffff, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        assert_eq!(call(nr, [0, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        for persona in [0x0040000u64, 0x0400000, 0x0100000, 0x0008, 0xffff_fffe] {
            assert_eq!(call(nr, [persona, 0, 0, 0, 0, 0]), EPERM, "{persona:#x}");
        }
    }

    #[test]
    fn devices_and_vsock_are_refused_fifos_and_inet_are_not() {
        let mode = |kind: u32| u64::from(kind | 0o600);
        assert_eq!(call(libc::SYS_mknod, [0, mode(S_IFCHR), 0, 0, 0, 0]), EPERM);
        assert_eq!(call(libc::SYS_mknod, [0, mode(S_IFBLK), 0, 0, 0, 0]), EPERM);
        assert_eq!(
            call(libc::SYS_mknodat, [0, 0, mode(S_IFBLK), 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            call(libc::SYS_mknodat, [0, 0, mode(S_IFCHR), 0, 0, 0]),
            EPERM
        );
        for ok in [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFREG] {
            assert_eq!(
                call(libc::SYS_mknod, [0, mode(ok), 0, 0, 0, 0]),
                SECCOMP_RET_ALLOW
            );
            assert_eq!(
                call(libc::SYS_mknodat, [0, 0, mode(ok), 0, 0, 0]),
                SECCOMP_RET_ALLOW
            );
        }
        // mknodat's mode is argument 2, not 1.
        assert_eq!(
            call(libc::SYS_mknodat, [0, mode(S_IFBLK), 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            call(libc::SYS_socket, [u64::from(AF_VSOCK), 1, 0, 0, 0, 0]),
            EPERM
        );
        for family in [
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_UNIX,
            libc::AF_NETLINK,
        ] {
            let family = arg(family);
            assert_eq!(
                call(libc::SYS_socket, [family, 1, 0, 0, 0, 0]),
                SECCOMP_RET_ALLOW
            );
        }
    }

    #[test]
    fn other_abis_and_newer_syscalls_are_refused() {
        let program = container_filter().unwrap();
        let x32 = |nr: i64| u32::try_from(nr).unwrap() | X32_SYSCALL_BIT;
        for nr in [libc::SYS_mount, libc::SYS_unshare, libc::SYS_getpid] {
            assert_eq!(run(&program, AUDIT_ARCH_X86_64, x32(nr), [0; 6]), ENOSYS);
        }
        let newer = u32::try_from(NEWEST_REVIEWED + 1).unwrap();
        assert_eq!(run(&program, AUDIT_ARCH_X86_64, newer, [0; 6]), ENOSYS);
        assert_eq!(run(&program, AUDIT_ARCH_X86_64, u32::MAX, [0; 6]), ENOSYS);
        const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
        assert_eq!(
            run(&program, AUDIT_ARCH_I386, 20, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert!(program.len() < 256, "{} instructions", program.len());
    }

    #[test]
    fn describe_lists_every_row() {
        let text = describe();
        for row in DENIED {
            assert!(text.contains(row.name), "{} missing:\n{text}", row.name);
        }
        assert!(
            text.contains("CLONE_NEWUSER") && text.contains("ENOSYS"),
            "{text}"
        );
    }

    /// Set in the child that [`the_kernel_enforces_the_filter`] starts: that process
    /// installs the filter and checks what the kernel answers.
    const CHILD_ENV: &str = "MVM_SECCOMP_TEST_CONTAINER_CHILD";

    fn errno_of(rc: libc::c_long) -> i32 {
        assert_eq!(rc, -1, "the syscall succeeded");
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }

    /// The checks, in a process of their own (the filter cannot be taken off). Each refusal
    /// is checked with arguments the kernel itself would refuse with another errno
    /// (EINVAL, EFAULT, EOPNOTSUPP), so an EPERM can only come from the filter.
    fn check_under_the_filter() {
        // Before: the kernel's own answers, to show the calls reach it.
        let unshare_flags = libc::c_long::from(libc::CLONE_NEWUSER | libc::CLONE_SETTLS);
        // SAFETY: unshare takes an integer; CLONE_SETTLS is not an unshare flag (EINVAL).
        let unshare_bad = || unsafe { libc::syscall(libc::SYS_unshare, unshare_flags) };
        assert_eq!(errno_of(unshare_bad()), libc::EINVAL);
        let ns_bad_clone = |flag: libc::c_int| -> libc::c_long {
            // CLONE_SIGHAND without CLONE_VM is EINVAL before any namespace is made.
            let flags = libc::c_long::from(flag | libc::CLONE_SIGHAND);
            // SAFETY: clone with no stack, tids or TLS; the kernel refuses these flags
            // before it creates a process.
            unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) }
        };
        assert_eq!(errno_of(ns_bad_clone(libc::CLONE_NEWNET)), libc::EINVAL);
        let bad_type = std::ptr::without_provenance::<libc::c_char>(1);
        let mount_bad = || -> libc::c_long {
            // SAFETY: the kernel copies the strings with copy_from_user and fails on the
            // bad pointer (EFAULT) before mounting anything.
            unsafe {
                libc::syscall(
                    libc::SYS_mount,
                    c"none".as_ptr(),
                    c"/nonexistent-mvm".as_ptr(),
                    bad_type,
                    0,
                    0,
                )
            }
        };
        assert_eq!(errno_of(mount_bad()), libc::EFAULT);
        // SAFETY: keyctl with an operation number no kernel has.
        let keyctl_bad = || unsafe { libc::syscall(libc::SYS_keyctl, 9999_i64, 0, 0, 0, 0) };
        assert_eq!(errno_of(keyctl_bad()), libc::EOPNOTSUPP);
        // SAFETY: clone3 with a null, zero-sized argument struct is EINVAL.
        let clone3_bad = || unsafe { libc::syscall(libc::SYS_clone3, 0_i64, 0_i64) };
        assert_eq!(errno_of(clone3_bad()), libc::EINVAL);

        install_container_filter().unwrap();

        // SAFETY: unshare takes an integer; refused, and harmless in this child if not.
        let unshare_user = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        assert_eq!(errno_of(libc::c_long::from(unshare_user)), libc::EPERM);
        assert_eq!(errno_of(unshare_bad()), libc::EPERM);
        for flag in [
            libc::CLONE_NEWNET,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWCGROUP,
        ] {
            assert_eq!(errno_of(ns_bad_clone(flag)), libc::EPERM, "{flag:#x}");
        }
        assert_eq!(errno_of(mount_bad()), libc::EPERM);
        assert_eq!(errno_of(keyctl_bad()), libc::EPERM);
        assert_eq!(errno_of(clone3_bad()), libc::ENOSYS);
        // SAFETY: READ_IMPLIES_EXEC; refused before it takes effect.
        let persona = unsafe { libc::personality(0x0400000) };
        assert_eq!(errno_of(libc::c_long::from(persona)), libc::EPERM);
        // SAFETY: the query form changes nothing.
        assert_ne!(unsafe { libc::personality(0xffff_ffff) }, -1);

        // What still works: getpid, fork, threads (glibc falls back from clone3), spawning.
        // SAFETY: getpid has no arguments.
        assert!(unsafe { libc::getpid() } > 0);
        // SAFETY: the child only calls _exit, which is async-signal-safe.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: _exit ends the forked child at once.
            unsafe { libc::_exit(7) };
        }
        assert!(child > 0, "fork: {}", std::io::Error::last_os_error());
        let mut status = 0;
        // SAFETY: `status` is a valid c_int; `child` is our child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
        assert_eq!(std::thread::spawn(|| 42).join().unwrap(), 42);
        let listed = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .env_remove(CHILD_ENV)
            .output()
            .unwrap();
        assert!(listed.status.success(), "{listed:?}");
    }

    #[test]
    fn the_kernel_enforces_the_filter() {
        const NAME: &str = "container::tests::the_kernel_enforces_the_filter";
        if std::env::var_os(CHILD_ENV).is_some() {
            check_under_the_filter();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    }
}
