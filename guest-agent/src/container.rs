//! The agent as PID 1 of a container (`mvm-agent --container`): what it does instead of a
//! VM's init ([`crate::init`]).
//!
//! The launcher (the runtime's container backend) made the namespaces, did every mount
//! (proc, a tmpfs `/dev` with device nodes bound in, `/tmp`, `/run`, the directory that
//! holds the agent's socket) and `pivot_root` before it executed the agent. So the agent
//! mounts nothing, sets up no network, reads no `/proc/cmdline` (in a container that is
//! the host's) and powers nothing off: a shutdown request ends the process, and with PID 1
//! the kernel ends every other process of the PID namespace.
//!
//! What it does do, before it serves: open missing standard fds on `/dev/null`, undo a
//! launcher's ignored `SIGCHLD`, make `/run/secrets` (the runtime writes secrets there),
//! and put `mvm_seccomp`'s container filter on itself, so every workload inherits it.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::init;

/// Where released secrets go (`/run/secrets/NAME`, written by the agent as root): in a VM a
/// tmpfs of its own; in a container a directory on the launcher's `/run` tmpfs, made here.
pub const SECRETS_DIR: &str = "/run/secrets";

/// The signal that stops the container cleanly. As PID 1 of a PID namespace the agent
/// gets no signal from outside it that it has no handler for (SIGKILL aside), so it
/// blocks this one and waits for it on a thread of its own ([`spawn_stop_thread`]).
pub const STOP_SIGNAL: Signal = Signal::SIGTERM;

/// Process-wide settings, made before any thread exists.
///
/// - Fds 0, 1 and 2 open (on `/dev/null` if the launcher closed them), so no socket the
///   agent opens lands on a standard fd and logs go nowhere they should not.
/// - `SIGCHLD` at its default: an ignored `SIGCHLD` survives execve, and with it the kernel
///   reaps children itself, so the reaper would never see an exec's exit status.
/// - [`STOP_SIGNAL`] blocked (workloads start with an empty mask: `agent/exec.rs`).
/// - When the agent is not PID 1 (tests; a launcher without a PID namespace) it becomes a
///   child subreaper, so its workloads' orphans still come to it to be reaped.
pub fn prepare_process() -> io::Result<()> {
    init::ensure_stdio_on(&["/dev/null"]);
    let default = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: installing SIG_DFL runs no handler code, so nothing here must be
    // async-signal-safe.
    unsafe { nix::sys::signal::sigaction(Signal::SIGCHLD, &default) }.map_err(io::Error::from)?;
    let mut stop = SigSet::empty();
    stop.add(STOP_SIGNAL);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop), None)
        .map_err(io::Error::from)?;
    if std::process::id() != 1 {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes [`SECRETS_DIR`] if it is missing (root's, 0755: only the agent writes there; the
/// runtime writes secrets into it, which needs the directory). An existing one (the
/// launcher's) is left as it is. Returns what failed, for the log. Only for PID 1 of a
/// container: anywhere else `/run` is the host's.
pub fn make_dirs() -> Vec<String> {
    make_dirs_in(Path::new("/"))
}

fn make_dirs_in(root: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    let path = root.join(SECRETS_DIR.trim_start_matches('/'));
    let shown = path.display();
    match std::fs::DirBuilder::new().mode(0o755).create(&path) {
        // The mode regardless of the umask.
        Ok(()) => {
            if let Err(e) = std::fs::set_permissions(&path, Permissions::from_mode(0o755)) {
                failures.push(format!("chmod {shown}: {e}"));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => failures.push(format!("mkdir {shown}: {e}")),
    }
    failures
}

/// Starts the thread that ends the container on [`STOP_SIGNAL`] (blocked by
/// [`prepare_process`]): the process exits with status 0, and as PID 1 takes the rest of
/// the PID namespace with it.
pub fn spawn_stop_thread() -> io::Result<()> {
    let mut stop = SigSet::empty();
    stop.add(STOP_SIGNAL);
    init::spawn_signal_thread("stop-signal", stop, |signal| {
        tracing::info!("{signal}: ending the container");
        std::process::exit(0);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_secrets_dir_is_made_once_and_what_is_there_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let secrets = root.path().join("run/secrets");
        // No /run: the launcher's tmpfs is missing, which is said.
        let failures = make_dirs_in(root.path());
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("run/secrets"), "{failures:?}");

        std::fs::create_dir(root.path().join("run")).unwrap();
        assert_eq!(make_dirs_in(root.path()), Vec::<String>::new());
        assert_eq!(std::fs::metadata(&secrets).unwrap().mode() & 0o7777, 0o755);
        std::fs::set_permissions(&secrets, Permissions::from_mode(0o700)).unwrap();
        assert_eq!(make_dirs_in(root.path()), Vec::<String>::new());
        assert_eq!(std::fs::metadata(&secrets).unwrap().mode() & 0o7777, 0o700);

        // A file in the way is said.
        std::fs::remove_dir(&secrets).unwrap();
        std::fs::write(&secrets, b"").unwrap();
        let failures = make_dirs_in(root.path());
        assert!(
            failures.len() == 1 && failures[0].starts_with("mkdir"),
            "{failures:?}"
        );
    }
}
