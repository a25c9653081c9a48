//! Ending everything a case started. The runner is its cases' child
//! subreaper, so a process whose parent died (a jailed VMM whose supervisor
//! was killed, a daemon that detached) is reparented to the runner rather
//! than to init, and the runner can find it by its parent pid.

use std::time::Duration;

/// Marks this process as a subreaper of its descendants (Linux
/// `PR_SET_CHILD_SUBREAPER`). A failure only weakens the clean-up: orphans go
/// to init instead.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no
    // memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "mvm-e2e: PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// SIGKILLs the process group `pgid` (a case's child made its own group).
pub fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg only sends a signal; a group that is gone gives ESRCH.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
}

/// SIGKILLs and reaps every child of this process, round after round (a
/// killed child's own children are reparented here), until none is left or
/// five seconds pass. Returns how many processes it killed.
pub fn kill_all() -> usize {
    let mut killed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        reap();
        let children = children_of(std::process::id());
        if children.is_empty() || std::time::Instant::now() > deadline {
            return killed;
        }
        for pid in children {
            // SAFETY: kill only sends a signal to a process that is our child
            // (reparented to us); if it is already gone this is ESRCH.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects every child that has exited, without blocking.
fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on any child; `status` is a valid
        // out-pointer for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// The pids whose parent is `parent`, from `/proc/<pid>/stat`.
pub fn children_of(parent: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(parent)
        })
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line: the second field after the
/// command name, which is in parentheses and may itself hold spaces and `)`.
pub fn parent_pid(stat: &str) -> Option<u32> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The pids of processes whose command name (`/proc/<pid>/comm`) is `name`,
/// read from `/proc` (no `pgrep` needed, so the check cannot quietly pass
/// where procps is missing). An unreadable `/proc` is an error.
pub fn processes_named(name: &str) -> std::io::Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A process may end between the listing and the read.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            if comm.trim_end() == name {
                found.push(pid);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_survives_odd_names() {
        assert_eq!(parent_pid("12 (sh) S 7 12 12 0"), Some(7));
        assert_eq!(parent_pid("12 (a) b) S 9 12"), Some(9));
        assert_eq!(parent_pid("12 (x y) R 1 1"), Some(1));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn finds_this_process_by_name_and_as_a_child() {
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(processes_named(comm.trim_end()).unwrap().contains(&me));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        assert!(children_of(me).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
