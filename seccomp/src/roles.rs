//! The allow-lists, one function per thread role. Read this file to know what a compromised
//! thread of each role could still ask the kernel for.
//!
//! No role may `open`/`openat` for reading, create sockets other than the vsock device's
//! Unix connections, `execve`, `clone`, `mount` or `ptrace`: every file, socket, eventfd and
//! KVM fd a thread uses was opened before its filter went on.

use crate::ioctl::{FIONBIO, KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN};
use crate::{allow, Allowed};

/// `AF_UNIX` (`<sys/socket.h>`).
const AF_UNIX: u64 = 1;

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

/// Main thread, after setup: waits for the first exit event, then writes the boot report and
/// the events log (both through fds opened at start), removes the vsock socket and exits.
pub fn main() -> Vec<Allowed> {
    with(
        runtime(),
        [
            // The boot report is written through the fd created at start: no openat.
            allow!(SYS_close, "drop fds at exit"),
            allow!(SYS_unlink, "remove the VM's vsock socket file at exit"),
        ],
    )
}

/// The signal thread: `sigwait` for SIGINT/SIGTERM/SIGHUP, then one message to the main
/// thread.
pub fn signals() -> Vec<Allowed> {
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
pub fn vcpu() -> Vec<Allowed> {
    with(
        runtime(),
        [
            allow!(
                SYS_ioctl,
                "run the vCPU; read its registers for the fatal-exit report",
                arg 1 in [
                    KVM_RUN => "KVM_RUN",
                    KVM_GET_REGS => "KVM_GET_REGS",
                    KVM_GET_SREGS => "KVM_GET_SREGS",
                ]
            ),
            allow!(SYS_close, "the vCPU fd is closed when the thread ends"),
        ],
    )
    // `write` (in the runtime set) also carries the serial console, the serial irqfd and the
    // device workers' wake-up eventfds.
}

/// The console input thread: stdin to the serial port.
pub fn console_input() -> Vec<Allowed> {
    with(
        runtime(),
        [
            allow!(SYS_read, "read the VMM's stdin"),
            allow!(
                SYS_clock_nanosleep,
                "back off 5 ms while the UART's input FIFO is full"
            ),
            allow!(
                SYS_nanosleep,
                "the same back-off, on libcs that use nanosleep"
            ),
        ],
    )
}

/// A virtio-blk thread: requests against the backing file it was given, the verity tree.
pub fn blk() -> Vec<Allowed> {
    with(
        with(runtime(), event_loop()),
        [
            allow!(SYS_lseek, "position the disk file before a read or write"),
            allow!(SYS_pread64, "read a disk or verity-tree block at an offset"),
            allow!(
                SYS_pwrite64,
                "write a block of a read-write disk at an offset"
            ),
            allow!(SYS_fdatasync, "VIRTIO_BLK_T_FLUSH"),
            allow!(SYS_fsync, "VIRTIO_BLK_T_FLUSH where sync_all is used"),
        ],
    )
    // `read`/`write` serve both the eventfds and the disk file.
}

/// The virtio-vsock thread: the VM's listening Unix socket, connections to `<uds>_<port>`.
pub fn vsock() -> Vec<Allowed> {
    with(
        with(runtime(), event_loop()),
        [
            allow!(SYS_accept4, "accept a host connection on the VM's socket"),
            allow!(
                SYS_socket,
                "a Unix stream socket for a guest connection to <uds>_<port>",
                arg 0 in [AF_UNIX => "AF_UNIX"]
            ),
            allow!(SYS_connect, "connect that socket to <uds>_<port>"),
            allow!(SYS_recvfrom, "read from a host connection (std's recv)"),
            allow!(
                SYS_sendto,
                "write to a host connection (std's send with MSG_NOSIGNAL)"
            ),
            allow!(SYS_shutdown, "half-close a connection the guest shut down"),
            allow!(
                SYS_getsockopt,
                "SO_ERROR of a non-blocking connect that completed"
            ),
            allow!(
                SYS_ioctl,
                "make an accepted connection non-blocking",
                arg 1 in [FIONBIO => "FIONBIO"]
            ),
            allow!(
                SYS_timerfd_settime,
                "arm the timer that drops host CONNECTs the guest never answers"
            ),
        ],
    )
}

/// The virtio-net thread: frames between the guest and the tap.
pub fn net() -> Vec<Allowed> {
    with(
        with(runtime(), event_loop()),
        [
            allow!(
                SYS_readv,
                "read a frame (vnet header + payload) from the tap"
            ),
            allow!(
                SYS_writev,
                "write a frame (vnet header + payload) to the tap"
            ),
        ],
    )
    // `read`/`write` on the tap are in the event loop and runtime sets.
}
