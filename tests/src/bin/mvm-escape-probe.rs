//! Tries, from inside a sandbox, what container escapes use, and prints one line per
//! attempt: `NAME denied ERRNO` or `NAME ALLOWED`. The `container/escapes` case pipes
//! it (static) into a container-tier run and expects every line to say `denied`.
//! Each attempt is made so that, were it allowed, it would change nothing outside the
//! sandbox (a tmpfs on a directory of its own, garbage for a kernel module, an attach
//! followed by a detach).

use std::ffi::CString;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn report(name: &str, result: libc::c_long) {
    if result < 0 {
        println!(
            "{name} denied {}",
            std::io::Error::from_raw_os_error(errno())
        );
    } else {
        println!("{name} ALLOWED");
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn main() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        eprintln!("mvm-escape-probe: runs as an unprivileged user only");
        std::process::exit(2);
    }
    let _ = std::fs::create_dir_all("/tmp/probe-mnt");
    let target = cstr("/tmp/probe-mnt");
    let tmpfs = cstr("tmpfs");
    // SAFETY: each call gets valid NUL-terminated strings or null pointers and plain
    // integers; none writes to memory of this process beyond errno.
    unsafe {
        report(
            "mount",
            libc::c_long::from(libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                0,
                std::ptr::null(),
            )),
        );
        report(
            "unshare_user",
            libc::c_long::from(libc::unshare(libc::CLONE_NEWUSER)),
        );
        report(
            "unshare_net",
            libc::c_long::from(libc::unshare(libc::CLONE_NEWNET)),
        );
        report(
            "unshare_mount",
            libc::c_long::from(libc::unshare(libc::CLONE_NEWNS)),
        );
        let attached = libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0);
        if attached >= 0 {
            libc::ptrace(libc::PTRACE_DETACH, 1, 0, 0);
        }
        report("ptrace_agent", attached);
        let garbage = [0u8; 64];
        let empty = cstr("");
        report(
            "init_module",
            libc::syscall(
                libc::SYS_init_module,
                garbage.as_ptr(),
                garbage.len(),
                empty.as_ptr(),
            ),
        );
        report(
            "finit_module",
            libc::syscall(libc::SYS_finit_module, 0, empty.as_ptr(), 0),
        );
        report(
            "kexec_load",
            libc::syscall(libc::SYS_kexec_load, 0, 0, std::ptr::null::<u8>(), 0),
        );
        report(
            "bpf",
            libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0),
        );
        report("userfaultfd", libc::syscall(libc::SYS_userfaultfd, 0));
        report(
            "keyctl",
            libc::syscall(libc::SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0),
        );
        let sysctl = cstr("/proc/sys/kernel/hostname");
        let fd = libc::open(sysctl.as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::close(fd);
        }
        report("proc_sys_write", libc::c_long::from(fd));
        let swap = cstr("/tmp/probe-mnt");
        report("swapon", libc::c_long::from(libc::swapon(swap.as_ptr(), 0)));
        report(
            "perf_event_open",
            libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<u8>(),
                0,
                -1,
                -1,
                0,
            ),
        );
    }
}
