//! What every thread shares, and the roles of the VMM's core threads (main, signals,
//! vCPUs). Each device's role is written by its module in the VMM (`vmm/src/devices/`) on
//! top of [`device_thread`]; `mvm-vmm --print-seccomp` lists every role the VMM has.
//!
//! No role may `open`/`openat` for reading, create sockets other than the vsock device's
//! Unix connections, `execve`, `clone`, `mount` or `ptrace` ([`crate::lint`] holds every
//! role to that): every file, socket, eventfd and KVM fd a thread uses was opened before
//! its filter went on.

use crate::ioctl::{
    KVM_GET_CLOCK, KVM_GET_CPUID2, KVM_GET_DEBUGREGS, KVM_GET_IRQCHIP, KVM_GET_LAPIC,
    KVM_GET_MP_STATE, KVM_GET_MSRS, KVM_GET_PIT2, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS, KVM_GET_XCRS, KVM_GET_XSAVE, KVM_RUN,
};
use crate::{allow, Allowed, Role};

/// The core roles, in the order `--print-seccomp` lists them (the devices' follow).
pub const CORE: [Role; 3] = [MAIN, SIGNALS, VCPU];

/// The main thread: setup, then supervision until the VM ends, then the exit report.
pub const MAIN: Role = Role::new("main", main);

/// The thread that waits for SIGINT/SIGTERM/SIGHUP and turns them into a VM exit.
pub const SIGNALS: Role = Role::new("signals", signals);

/// A vCPU thread: the KVM_RUN loop; PIO/MMIO exits are dispatched on this thread.
pub const VCPU: Role = Role::new("vcpu", vcpu);

/// `futex(2)` operations (`<linux/futex.h>`): the plain and private wait/wake that glibc's
/// locks and std's Mutex/Condvar/parking use; no requeue, wake-op or PI operations.
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_PRIVATE_FLAG: u64 = 128;
const FUTEX_CLOCK_REALTIME: u64 = 256;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;

/// `mmap(2)` flags the allocator maps with after setup: anonymous private memory, and
/// glibc's reservation of a new thread arena (`MAP_NORESERVE`). No file or shared mappings,
/// no `MAP_FIXED`.
const MAP_PRIVATE_ANONYMOUS: u64 = 0x02 | 0x20;
const MAP_PRIVATE_ANONYMOUS_NORESERVE: u64 = 0x02 | 0x20 | 0x4000;

/// `fcntl(2)` command `F_GETFD` (debug builds only, below).
#[cfg(debug_assertions)]
const F_GETFD: u64 = 1;

/// `madvise(2)` advice: glibc returns freed heap pages with `MADV_DONTNEED` only.
const MADV_DONTNEED: u64 = 4;

/// What every Rust thread of this process needs, whatever its job.
fn runtime() -> Vec<Allowed> {
    #[allow(unused_mut)] // pushed to in debug builds only
    let mut all = vec![
        allow!(
            SYS_futex,
            "Mutex, Condvar, mpsc channels and thread parking (wait/wake only)",
            arg 1 in [
                FUTEX_WAIT => "FUTEX_WAIT",
                FUTEX_WAKE => "FUTEX_WAKE",
                FUTEX_WAIT | FUTEX_PRIVATE_FLAG => "FUTEX_WAIT_PRIVATE",
                FUTEX_WAKE | FUTEX_PRIVATE_FLAG => "FUTEX_WAKE_PRIVATE",
                FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG => "FUTEX_WAIT_BITSET_PRIVATE",
                FUTEX_WAKE_BITSET | FUTEX_PRIVATE_FLAG => "FUTEX_WAKE_BITSET_PRIVATE",
                FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME
                    => "FUTEX_WAIT_BITSET_PRIVATE|FUTEX_CLOCK_REALTIME",
            ]
        ),
        allow!(SYS_write, "tracing logs and the SIGSYS report go to stderr"),
        allow!(
            SYS_mmap,
            "the allocator maps fresh arenas and large blocks (anonymous, private)",
            arg 3 in [
                MAP_PRIVATE_ANONYMOUS => "MAP_PRIVATE|MAP_ANONYMOUS",
                MAP_PRIVATE_ANONYMOUS_NORESERVE => "MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE",
            ]
        ),
        allow!(SYS_munmap, "the allocator returns large blocks"),
        allow!(SYS_mremap, "the allocator grows large blocks in place"),
        allow!(
            SYS_mprotect,
            "glibc malloc grows a thread arena by unprotecting it"
        ),
        allow!(
            SYS_madvise,
            "the allocator releases freed pages",
            arg 2 in [MADV_DONTNEED => "MADV_DONTNEED"]
        ),
        allow!(SYS_brk, "the allocator grows the main heap"),
        allow!(
            SYS_clock_gettime,
            "Instant/SystemTime when the vDSO falls back to the syscall"
        ),
        allow!(SYS_sched_yield, "lock back-off in std and the allocator"),
        allow!(
            SYS_getrandom,
            "the first HashMap on a thread seeds its hasher"
        ),
        allow!(
            SYS_rt_sigprocmask,
            "glibc blocks signals while a thread exits"
        ),
        allow!(
            SYS_sigaltstack,
            "std removes the thread's stack-overflow stack on exit"
        ),
        allow!(SYS_rt_sigreturn, "return from a signal handler"),
        allow!(SYS_exit, "the thread ends"),
        allow!(
            SYS_exit_group,
            "the process ends (also the SIGSYS handler's _exit)"
        ),
    ];
    // Debug builds only: std checks an fd is still open (fcntl F_GETFD) before it closes it.
    #[cfg(debug_assertions)]
    all.push(allow!(
        SYS_fcntl,
        "debug builds: std checks an fd is open (F_GETFD) before closing it",
        arg 1 in [F_GETFD => "F_GETFD"]
    ));
    all
}

/// A device thread's event loop (event-manager on epoll).
fn event_loop() -> Vec<Allowed> {
    vec![
        allow!(SYS_epoll_wait, "the device loop waits for notifications"),
        allow!(SYS_epoll_ctl, "the device loop (un)registers its fds"),
        allow!(
            SYS_read,
            "drain queue-notify ioeventfds and the worker's wake-up eventfd"
        ),
        allow!(SYS_close, "drop fds the thread owns (connections, on stop)"),
    ]
}

fn with(base: Vec<Allowed>, more: impl IntoIterator<Item = Allowed>) -> Vec<Allowed> {
    let mut all = base;
    all.extend(more);
    all
}

/// A thread of this process that is not a device loop: the runtime set, and `own`.
pub fn thread(own: impl IntoIterator<Item = Allowed>) -> Vec<Allowed> {
    with(runtime(), own)
}

/// A device thread (a `WorkerLoop` on epoll): the runtime set, the event loop's, and
/// `own`, what the device's backend needs.
pub fn device_thread(own: impl IntoIterator<Item = Allowed>) -> Vec<Allowed> {
    with(with(runtime(), event_loop()), own)
}

/// Main thread, after setup: waits for the first exit event, then writes the boot report and
/// the events log (both through fds opened at start), removes the vsock socket and exits.
fn main() -> Vec<Allowed> {
    with(
        runtime(),
        [
            // The boot report is written through the fd created at start: no openat.
            allow!(SYS_close, "drop fds at exit"),
            allow!(SYS_unlink, "remove the VM's vsock socket file at exit"),
            // A snapshot (SIGUSR2 with --snapshot-dir), written through files made at start.
            allow!(
                SYS_tgkill,
                "snapshot: kick each vCPU thread out of KVM_RUN to pause it (pthread_kill)"
            ),
            allow!(
                SYS_getpid,
                "snapshot: pthread_kill names this process to tgkill"
            ),
            allow!(
                SYS_ioctl,
                "snapshot: read the in-kernel PICs, IOAPIC, PIT and clock",
                arg 1 in [
                    KVM_GET_IRQCHIP => "KVM_GET_IRQCHIP",
                    KVM_GET_PIT2 => "KVM_GET_PIT2",
                    KVM_GET_CLOCK => "KVM_GET_CLOCK",
                ]
            ),
            allow!(
                SYS_lseek,
                "snapshot: leave a hole for a zero MiB of guest memory"
            ),
            allow!(
                SYS_ftruncate,
                "snapshot: the memory file's length past a last hole"
            ),
            allow!(
                SYS_fsync,
                "snapshot: the files are on disk before the VM ends"
            ),
            allow!(
                SYS_fstat,
                "snapshot: the written memory file's inode and change time, sealed so a restore can tell it is untouched"
            ),
        ],
    )
}

/// The signal thread: `sigwait` for SIGINT/SIGTERM/SIGHUP, then one message to the main
/// thread.
fn signals() -> Vec<Allowed> {
    with(
        runtime(),
        [allow!(
            SYS_rt_sigtimedwait,
            "sigwait for SIGINT/SIGTERM/SIGHUP"
        )],
    )
}

/// A vCPU thread: KVM_RUN; PIO/MMIO exits run the bus devices on this thread (serial output,
/// virtio-mmio registers, which hand queues to the device threads through a channel and an
/// eventfd).
fn vcpu() -> Vec<Allowed> {
    with(
        runtime(),
        [
            allow!(
                SYS_ioctl,
                "run the vCPU; read its registers for the fatal-exit report; read its whole state when paused for a snapshot",
                arg 1 in [
                    KVM_RUN => "KVM_RUN",
                    KVM_GET_REGS => "KVM_GET_REGS",
                    KVM_GET_SREGS => "KVM_GET_SREGS",
                    KVM_GET_CPUID2 => "KVM_GET_CPUID2",
                    KVM_GET_VCPU_EVENTS => "KVM_GET_VCPU_EVENTS",
                    KVM_GET_MP_STATE => "KVM_GET_MP_STATE",
                    KVM_GET_XSAVE => "KVM_GET_XSAVE",
                    KVM_GET_XCRS => "KVM_GET_XCRS",
                    KVM_GET_DEBUGREGS => "KVM_GET_DEBUGREGS",
                    KVM_GET_MSRS => "KVM_GET_MSRS",
                    KVM_GET_LAPIC => "KVM_GET_LAPIC",
                    KVM_GET_TSC_KHZ => "KVM_GET_TSC_KHZ",
                ]
            ),
            allow!(SYS_close, "the vCPU fd is closed when the thread ends"),
        ],
    )
    // `write` (in the runtime set) also carries the serial console, the serial irqfd and the
    // device workers' wake-up eventfds.
}
