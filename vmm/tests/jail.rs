//! The jail, on by default, on a running `mvm-vmm` (no jail flag) on this machine's /dev/kvm
//! (a tiny ELF whose entry is `hlt`): what `/proc` says about the jailed VMM (the child of
//! the process started, PID 1 of its own PID namespace), and what is left after it exits.
//! Run as root (the namespaces and the uid change need it); fails, rather than skips, when
//! /dev/kvm is missing.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{is_root, require_kvm, tiny_vmlinux, vmm};

/// The uid/gid the tests ask for (not the default, to show the options work).
const JAIL_UID: u32 = 4242;
const JAIL_GID: u32 = 4343;

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} missing in {status}"))
}

/// A VM in `dir`: vsock socket `v.sock`, boot report `report.json`, per-VM roots under
/// `jails/`.
fn command(dir: &Path) -> Command {
    let mut cmd = vmm();
    cmd.arg("--dev")
        .arg("--jail-uid")
        .arg(JAIL_UID.to_string())
        .arg("--jail-gid")
        .arg(JAIL_GID.to_string())
        .arg("--jail-dir")
        .arg(dir.join("jails"))
        .arg("--kernel")
        .arg(tiny_vmlinux(dir))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--boot-report")
        .arg(dir.join("report.json"))
        .env_remove("MVM_SECCOMP")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The jailed VMM: the only child of the supervising process `parent`, once its vCPU
/// exists (the jail is in place before the VM is created) and its main thread, the last to
/// do so, is under its seccomp filter.
fn jailed_child(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            let child: u32 = child.parse().unwrap();
            let status =
                std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
            let filtered = status.lines().any(|l| l == "Seccomp:\t2");
            if filtered
                && fd_targets(child)
                    .iter()
                    .any(|f| f == "anon_inode:kvm-vcpu:0")
            {
                return child;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no jailed VMM under {parent} with a vCPU"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    entries
}

/// The per-VM root: a read-only tmpfs holding /dev/kvm and the kept directory of the
/// socket (under /tmp), nothing else.
fn assert_per_vm_root(mountinfo: &str, root_entries: &[String], dev_entries: &[String]) {
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(root_mount.contains(" - tmpfs "), "{root_mount}");
    assert!(
        root_mount.contains(" ro,"),
        "root not read-only: {root_mount}"
    );
    assert_eq!(root_entries, ["dev", "tmp"], "root holds {root_entries:?}");
    assert_eq!(dev_entries, ["kvm"]);
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a process this test started (or its child) that has not been
    // reaped yet.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), sig) };
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its parent.
        if state.is_empty() || state.contains(") Z ") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Where this host keeps the VM's cgroup, if it has cgroup v2 with controllers.
fn cgroup_parent() -> Option<PathBuf> {
    Path::new("/sys/fs/cgroup/cgroup.controllers")
        .is_file()
        .then(|| PathBuf::from("/sys/fs/cgroup/mvm"))
}

#[test]
fn the_default_jail_namespaces_root_uid_caps_fds_cgroup_and_clean_up() {
    require_kvm();
    assert!(is_root(), "run this test as root: the jail needs it");
    let dir = tempfile::tempdir().unwrap();
    let parent: Child = command(dir.path()).spawn().unwrap();
    let ppid = parent.id();
    let vmm_pid = jailed_child(ppid);
    let proc_dir = PathBuf::from(format!("/proc/{vmm_pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let fds = fd_targets(vmm_pid);
    let parent_fds = fd_targets(ppid);
    let root_entries = sorted_entries(&proc_dir.join("root"));
    let dev_entries = sorted_entries(&proc_dir.join("root/dev"));
    let mountinfo = std::fs::read_to_string(proc_dir.join("mountinfo")).unwrap();
    let rlimits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let own_cgroup = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    let pid_ns = (ns(&vmm_pid.to_string(), "pid"), ns("self", "pid"));
    let net_ns = (ns(&vmm_pid.to_string(), "net"), ns("self", "net"));
    let vm_root = dir.path().join("jails").join(format!("mvm-vmm-{ppid}"));
    let vm_root_existed = vm_root.is_dir();
    let name = format!("mvm-vmm-{ppid}");
    let limits = cgroup_parent().map(|p| {
        let cg = p.join(&name);
        ["memory.max", "pids.max", "cpu.max"].map(|f| {
            std::fs::read_to_string(cg.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", cg.join(f).display()))
                .trim()
                .to_owned()
        })
    });

    signal(ppid, libc::SIGTERM);
    let out = parent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The supervising parent forwards SIGTERM and exits with the VMM's status.
    assert_eq!(out.status.code(), Some(143), "stderr: {stderr}");

    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    assert_eq!(status_field(&status, "Seccomp:"), "2", "{status}");
    assert_eq!(status_field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapAmb:"), "0000000000000000");
    let uid = status_field(&status, "Uid:");
    assert!(
        uid.split_whitespace().all(|u| u == JAIL_UID.to_string()),
        "Uid: {uid}"
    );
    let gid = status_field(&status, "Gid:");
    assert!(
        gid.split_whitespace().all(|g| g == JAIL_GID.to_string()),
        "Gid: {gid}"
    );
    assert_eq!(status_field(&status, "Groups:"), JAIL_GID.to_string());
    let soft_limit = |name: &str| {
        let line = rlimits.lines().find(|l| l.starts_with(name)).unwrap();
        line.get(26..)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(soft_limit("Max core file size"), "0", "{rlimits}");
    assert_eq!(soft_limit("Max open files"), "1024", "{rlimits}");
    if cgroup_parent().is_none() {
        assert_eq!(soft_limit("Max processes"), "4096", "{rlimits}");
    }
    // PID 1 of a PID namespace of its own (NSpid: host pid, then 1).
    assert_eq!(
        status_field(&status, "NSpid:"),
        format!("{vmm_pid}\t1"),
        "{status}"
    );
    assert_ne!(pid_ns.0, pid_ns.1, "same PID namespace as the host");
    assert_ne!(net_ns.0, net_ns.1, "same network namespace as the host");

    assert_per_vm_root(&mountinfo, &root_entries, &dev_entries);
    assert!(
        vm_root_existed,
        "{} missing while running",
        vm_root.display()
    );
    assert!(
        mountinfo.lines().count() <= 3,
        "mounts other than the root, and the kept dir: {mountinfo}"
    );

    let report = dir.path().join("report.json").display().to_string();
    for fd in &fds {
        let expected = fd == "/dev/null"
            || fd == "/dev/kvm"
            || *fd == report
            || fd.starts_with("pipe:")
            || fd.starts_with("socket:")
            || fd.starts_with("anon_inode:");
        assert!(expected, "unexpected fd {fd} in {fds:?}");
    }

    // The supervising parent holds none of the VM's files: stdio and its pipe to the VMM.
    assert!(
        parent_fds.len() <= 4
            && parent_fds
                .iter()
                .all(|f| f == "/dev/null" || f.starts_with("pipe:")),
        "supervisor fds: {parent_fds:?}"
    );

    match limits {
        Some([memory, pids, cpu]) => {
            assert_eq!(
                own_cgroup.trim(),
                format!("0::/mvm/{name}"),
                "cgroup membership"
            );
            // 128 MiB guest + 121 bytes of kernel (one page) + 64 MiB overhead.
            assert_eq!(memory, ((192u64 << 20) + 4096).to_string());
            // 1 vCPU, no disk: main, signals, console-in, vcpu, 2 more, + 16 slack.
            assert_eq!(pids, "22");
            assert_eq!(cpu, "200000 100000");
            assert!(!Path::new("/sys/fs/cgroup/mvm").join(&name).exists());
        }
        None => assert!(stderr.contains("cgroup skipped"), "{stderr}"),
    }

    // Cleaned up by the supervising parent: the per-VM root, the socket.
    assert!(!vm_root.exists(), "{} left behind", vm_root.display());
    assert!(!dir.path().join("v.sock").exists(), "socket left behind");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["exit_reason"], "host_signal", "{report}");
    assert_eq!(report["jail"]["kind"], "root", "{report}");
    assert_eq!(report["jail"]["uid"], JAIL_UID, "{report}");
    assert_eq!(report["jail"]["gid"], JAIL_GID, "{report}");
    assert_eq!(report["jail"]["pid_namespace"], true, "{report}");
    match cgroup_parent() {
        Some(p) => assert_eq!(
            report["jail"]["cgroup"],
            p.join(&name).display().to_string()
        ),
        None => assert!(report["jail"]["cgroup"].is_null(), "{report}"),
    }
}

/// The ordinary user the next test starts the VMM as, and its group, which owns the
/// `/dev/kvm` that user sees (as the `kvm` group does on a distribution's host).
const USER_UID: u32 = 4545;
const USER_GID: u32 = 4646;

/// Makes `cmd` start as [`USER_UID`] in the group [`USER_GID`], in a mount namespace of its
/// own whose `/dev/kvm` is a node (on a tmpfs at `kvm_dir`) that group may open: this
/// machine's node is root's alone, and the test must not change the host's.
fn as_ordinary_user(cmd: &mut Command, kvm_dir: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let host_kvm = std::fs::metadata("/dev/kvm").unwrap();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&host_kvm);
    let dir = CString::new(kvm_dir.as_os_str().as_bytes()).unwrap();
    let node = CString::new(kvm_dir.join("kvm").as_os_str().as_bytes()).unwrap();
    let dev_kvm = CString::new("/dev/kvm").unwrap();
    let tmpfs = CString::new("tmpfs").unwrap();
    let root = CString::new("/").unwrap();
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: between fork and exec only async-signal-safe libc calls run, on C strings made
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                tmpfs.as_ptr(),
                dir.as_ptr(),
                tmpfs.as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            check(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o660, rdev))?;
            // mknod's mode passes through the umask.
            check(libc::chmod(node.as_ptr(), 0o660))?;
            check(libc::chown(node.as_ptr(), 0, USER_GID))?;
            check(libc::mount(
                node.as_ptr(),
                dev_kvm.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::setgroups(1, &USER_GID))?;
            check(libc::setresgid(USER_GID, USER_GID, USER_GID))?;
            check(libc::setresuid(USER_UID, USER_UID, USER_UID))
        });
    }
}

/// For a test that starts the VMM as [`USER_UID`]: a directory others may pass through,
/// holding the empty `kvm` directory [`as_ordinary_user`] mounts its tmpfs on.
fn user_test_dir() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    require_kvm();
    assert!(
        is_root(),
        "run this test as root: it starts the VMM as another user"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kvm_dir = tmp.path().join("kvm");
    std::fs::create_dir(&kvm_dir).unwrap();
    (tmp, kvm_dir)
}

/// `dir/name`, made mode 0700 and owned by [`USER_UID`].
fn user_dir(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::create_dir(&path).unwrap();
    std::os::unix::fs::chown(&path, Some(USER_UID), Some(USER_GID)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    path
}

/// Makes user namespaces unavailable to `cmd` (as a security module or a sysctl would):
/// a seccomp filter, installed last before exec, fails `unshare(CLONE_NEWUSER)` with EPERM.
fn forbid_user_namespaces(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JSET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        insn(LD_ABS, 0, 0, 0), // the syscall number
        insn(JEQ, 0, 3, u32::try_from(libc::SYS_unshare).unwrap()),
        insn(LD_ABS, 0, 0, 16), // args[0], low half
        insn(JSET, 0, 1, u32::try_from(libc::CLONE_NEWUSER).unwrap()),
        insn(RET, 0, 0, 0x0005_0000 | u32::try_from(libc::EPERM).unwrap()), // SECCOMP_RET_ERRNO
        insn(RET, 0, 0, 0x7fff_0000),                                       // SECCOMP_RET_ALLOW
    ];
    let len = u16::try_from(program.len()).unwrap();
    // SAFETY: between fork and exec, two prctl calls on a program that lives in the
    // closure (moved in, not freed before exec).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len,
                filter: program.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An ordinary user's VMM on a host without user namespaces refuses to start, says why and
/// how to proceed, and creates no VM and no per-VM root; `--no-jail` still runs (and warns).
#[test]
fn without_user_namespaces_an_ordinary_users_vmm_refuses() {
    let (tmp, kvm_dir) = user_test_dir();
    let work = user_dir(tmp.path(), "work");
    let run = |extra: &[&str]| {
        let mut cmd = vmm();
        cmd.arg("--dev")
            .arg("--kernel")
            .arg(tiny_vmlinux(&work))
            .arg("--boot-report")
            .arg(work.join("report.json"))
            .args(extra)
            .env("XDG_RUNTIME_DIR", &work)
            .env_remove("MVM_SECCOMP")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_ordinary_user(&mut cmd, &kvm_dir);
        forbid_user_namespaces(&mut cmd);
        cmd.spawn().unwrap()
    };
    let out = run(&[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("new user namespace"), "{stderr}");
    assert!(stderr.contains("--no-jail"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("report.json")).unwrap()).unwrap();
    assert!(report["vm_created"].is_null(), "{report}");
    assert_eq!(report["exit_reason"], "vmm_error", "{report}");
    assert!(!work.join("mvm-jail").exists(), "a per-VM root was made");

    // Without the jail it runs (warned), until stopped.
    let child = run(&["--no-jail"]);
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("--no-jail"), "{stderr}");
}

/// Started by an ordinary user, the VMM builds the same jail inside a user namespace: its
/// own user, PID, mount, network and IPC namespaces, the per-VM root (under
/// `$XDG_RUNTIME_DIR/mvm-jail`) with `/dev/kvm` bound into it, no capabilities in any set,
/// no_new_privs, seccomp; the boot report says `user-namespace`; the supervising parent
/// cleans up as it does for root.
#[test]
fn an_ordinary_user_gets_the_same_jail_in_a_user_namespace() {
    let (tmp, kvm_dir) = user_test_dir();
    let runtime_dir = user_dir(tmp.path(), "run");
    let work = user_dir(tmp.path(), "work");
    let mut cmd = vmm();
    cmd.arg("--dev")
        .arg("--kernel")
        .arg(tiny_vmlinux(&work))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", work.join("v.sock").display()))
        .arg("--boot-report")
        .arg(work.join("report.json"))
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env_remove("MVM_SECCOMP")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_ordinary_user(&mut cmd, &kvm_dir);
    let parent = cmd.spawn().unwrap();
    let ppid = parent.id();
    let vmm_pid = jailed_child(ppid);
    let proc_dir = PathBuf::from(format!("/proc/{vmm_pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let root_entries = sorted_entries(&proc_dir.join("root"));
    let dev_entries = sorted_entries(&proc_dir.join("root/dev"));
    let mountinfo = std::fs::read_to_string(proc_dir.join("mountinfo")).unwrap();
    let namespaces = ["user", "pid", "mnt", "net", "ipc"]
        .map(|kind| (kind, ns(&vmm_pid.to_string(), kind), ns("self", kind)));
    let vm_root = runtime_dir.join("mvm-jail").join(format!("mvm-vmm-{ppid}"));
    let vm_root_existed = vm_root.is_dir();

    signal(ppid, libc::SIGTERM);
    let out = parent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "stderr: {stderr}");

    for (key, want) in [
        ("NoNewPrivs:", "1"),
        ("Seccomp:", "2"),
        ("CapInh:", "0000000000000000"),
        ("CapEff:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("CapAmb:", "0000000000000000"),
    ] {
        assert_eq!(status_field(&status, key), want, "{key} in {status}");
    }
    for (key, id) in [("Uid:", USER_UID), ("Gid:", USER_GID)] {
        let ids = status_field(&status, key);
        assert!(
            ids.split_whitespace().all(|u| u == id.to_string()),
            "{key} {ids}"
        );
    }
    assert_eq!(
        status_field(&status, "NSpid:"),
        format!("{vmm_pid}\t1"),
        "{status}"
    );
    for (kind, vmm_ns, host_ns) in &namespaces {
        assert_ne!(vmm_ns, host_ns, "same {kind} namespace as the host");
    }
    assert_per_vm_root(&mountinfo, &root_entries, &dev_entries);
    assert!(mountinfo.lines().count() <= 3, "{mountinfo}");
    assert!(
        vm_root_existed,
        "{} missing while running",
        vm_root.display()
    );

    assert!(!vm_root.exists(), "{} left behind", vm_root.display());
    assert!(!work.join("v.sock").exists(), "socket left behind");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["jail"]["kind"], "user-namespace", "{report}");
    assert_eq!(report["jail"]["uid"], USER_UID, "{report}");
    assert_eq!(report["jail"]["gid"], USER_GID, "{report}");
    assert_eq!(report["jail"]["pid_namespace"], true, "{report}");
    assert!(report["jail"]["cgroup"].is_null(), "{report}");
    assert!(stderr.contains("cgroup skipped"), "{stderr}");
}

#[test]
fn a_vmm_killed_by_a_signal_is_reported_so_and_killing_the_parent_kills_the_vmm() {
    require_kvm();
    assert!(is_root(), "run this test as root: the jail needs it");
    use std::os::unix::process::ExitStatusExt;

    let dir = tempfile::tempdir().unwrap();
    let parent = command(dir.path()).spawn().unwrap();
    let vmm_pid = jailed_child(parent.id());
    signal(vmm_pid, libc::SIGKILL);
    let out = parent.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{:?}", out.status);
    assert!(!dir.path().join("v.sock").exists());

    let dir = tempfile::tempdir().unwrap();
    let mut parent = command(dir.path()).spawn().unwrap();
    let vmm_pid = jailed_child(parent.id());
    parent.kill().unwrap();
    parent.wait().unwrap();
    assert!(
        gone_within(vmm_pid, Duration::from_secs(5)),
        "the VMM outlived its supervising parent"
    );
}

#[test]
fn no_jail_warns_and_runs_in_place() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let child = command(dir.path()).arg("--no-jail").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    signal(pid, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("--no-jail"), "no warning: {stderr}");
    assert!(children.trim().is_empty(), "forked: {children}");
    // Unjailed: the caller's uid and capabilities (no_new_privs comes with seccomp).
    if is_root() {
        assert!(status_field(&status, "Uid:").starts_with('0'), "{status}");
        assert_ne!(status_field(&status, "CapEff:"), "0000000000000000");
    }
    assert!(!dir.path().join("jails").exists());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert!(report["jail"].is_null(), "{report}");
}
