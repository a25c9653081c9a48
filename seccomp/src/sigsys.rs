//! The SIGSYS handler: names the thread and the syscall a filter refused, then ends the
//! process.
//!
//! Everything here is async-signal-safe: the thread's name sits in a const-initialised
//! thread-local byte array written before the filter went on, the report is assembled in a
//! stack buffer and leaves with one raw `write(2)`, and the process ends with `_exit(2)`.
//! Both syscalls are in every role's list.

use std::cell::Cell;

/// Exit status of a process one of whose threads made a syscall outside its filter
/// (128 + SIGSYS, as a shell would show a death by SIGSYS).
pub const STATUS_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

/// Longest thread name kept (Linux's own limit is 15 bytes + NUL).
const NAME_MAX: usize = 32;

thread_local! {
    static THREAD_NAME: Cell<[u8; NAME_MAX]> = const { Cell::new([0; NAME_MAX]) };
}

/// Remembers the calling thread's name for the SIGSYS report.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_MAX];
    for (dst, src) in buf.iter_mut().zip(name.bytes()) {
        *dst = src;
    }
    THREAD_NAME.with(|n| n.set(buf));
}

/// Installs the handler for the whole process. Call once, from the main thread, before any
/// filter goes on.
pub fn install_handler() -> Result<(), crate::SeccompError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; every field we
    // need is then set explicitly.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and `handler` has the SA_SIGINFO signature;
    // a null old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(crate::SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64: after `si_signo`,
/// `si_errno`, `si_code` and padding (16 bytes), then `_call_addr` (8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SIGSYS with SA_SIGINFO; its
        // `_sigsys._syscall` int lives at SI_SYSCALL_OFFSET, inside the 128-byte struct.
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<libc::c_int>()
                .read_unaligned()
        }
    };
    let name = THREAD_NAME.with(Cell::get);
    let mut report = Report::default();
    report.push(b"mvm-vmm: seccomp: thread ");
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    if len == 0 {
        report.push(b"(unnamed)");
    } else {
        report.push(name.get(..len).unwrap_or_default());
    }
    report.push(b" made syscall ");
    report.push_number(i64::from(nr));
    if let Some(known) = crate::names::syscall_name(i64::from(nr)) {
        report.push(b" (");
        report.push(known.as_bytes());
        report.push(b")");
    }
    report.push(b" outside its filter; exiting\n");
    let bytes = report.bytes();
    // SAFETY: write(2) on fd 2 with a pointer/length pair from a live stack buffer.
    unsafe { libc::write(2, bytes.as_ptr().cast::<libc::c_void>(), bytes.len()) };
    // SAFETY: _exit(2) is async-signal-safe and does not return.
    unsafe { libc::_exit(STATUS_SECCOMP_VIOLATION) };
}

/// A fixed-size line buffer (no allocation in a signal handler).
struct Report {
    buf: [u8; 160],
    len: usize,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Report {
    fn push(&mut self, bytes: &[u8]) {
        for b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = *b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                // `v % 10` is below 10.
                *d = b'0' + u8::try_from(v % 10).unwrap_or(0);
            }
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        let tail = digits.get(i..).unwrap_or_default();
        self.push(tail);
    }

    fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_formats_numbers_and_truncates_without_panicking() {
        let mut r = Report::default();
        r.push(b"nr ");
        r.push_number(0);
        r.push(b" ");
        r.push_number(-12);
        r.push(b" ");
        r.push_number(435);
        assert_eq!(r.bytes(), b"nr 0 -12 435");
        for _ in 0..100 {
            r.push(b"xxxx");
        }
        assert_eq!(r.bytes().len(), 160);
    }
}
