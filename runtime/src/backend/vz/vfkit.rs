//! The `vfkit` process of one VM: found and its version checked, started with the
//! command line [`super::invocation`] built, followed through its REST state, the agent
//! reached through its vsock socket, and stopped (ask, then force, then kill).

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mvm_agent::Client;

use super::invocation::VfkitVm;
use super::rest::{self, Change, VmState};
use crate::backend::held::HeldProcess;
use crate::backend::{interrupt, RunError};

/// The oldest vfkit taken: a floor read from vfkit's documentation of the options used
/// here (`--bootloader linux,...`, `virtio-vsock,...,connect`, `--restful-uri unix://`),
/// not a version anything was tested with. Older ones are refused by name, not left to
/// misread a command line.
pub const MIN_VERSION: (u32, u32, u32) = (0, 5, 0);
/// The environment variable naming the vfkit binary (else `vfkit` on `PATH`).
pub const VFKIT_ENV: &str = "MVM_VFKIT";

/// Why vfkit cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfkitError {
    /// Not found.
    #[error("vfkit not found (install it: brew install vfkit; or name it with {VFKIT_ENV})")]
    Missing,
    /// Found, but `--version` did not run or said nothing this backend reads.
    #[error("{path}: `vfkit --version` gave no version ({detail})")]
    NoVersion {
        /// The binary.
        path: String,
        /// What happened.
        detail: String,
    },
    /// Older than [`MIN_VERSION`].
    #[error("{path} is vfkit {found}; mvm needs {}.{}.{} or newer", MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2)]
    TooOld {
        /// The binary.
        path: String,
        /// The version it reported.
        found: String,
    },
}

/// `MVM_VFKIT`, else `vfkit` in a directory of `PATH`.
pub fn locate() -> Result<PathBuf, VfkitError> {
    if let Some(path) = std::env::var_os(VFKIT_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    crate::backend::locate::find_in_path("vfkit").ok_or(VfkitError::Missing)
}

/// The first `X.Y.Z` in `text` (vfkit prints `vfkit version: v0.6.1`).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find_map(|word| {
            let mut parts = word.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch = parts.next()?.parse().ok()?;
            Some((major, minor, patch))
        })
}

/// Runs `vfkit --version` and checks it against [`MIN_VERSION`].
pub fn check_version(vfkit: &Path) -> Result<(u32, u32, u32), VfkitError> {
    let path = vfkit.display().to_string();
    let output = Command::new(vfkit)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VfkitError::Missing
            } else {
                VfkitError::NoVersion {
                    path: path.clone(),
                    detail: e.to_string(),
                }
            }
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .filter(|_| output.status.success())
        .ok_or_else(|| VfkitError::NoVersion {
            path: path.clone(),
            detail: format!(
                "{}: {:?}",
                output.status,
                text.trim().chars().take(80).collect::<String>()
            ),
        })?;
    if version < MIN_VERSION {
        return Err(VfkitError::TooOld {
            path,
            found: format!("{}.{}.{}", version.0, version.1, version.2),
        });
    }
    Ok(version)
}

/// A running vfkit, killed and reaped on drop.
#[derive(Debug)]
pub struct Vfkit {
    process: HeldProcess,
    rest: PathBuf,
    agent_socket: PathBuf,
}

impl Vfkit {
    /// Starts `vfkit` for `vm`, its output to `log`, in its own process group (a
    /// terminal's Ctrl-C reaches `mvm`, which stops the VM in order).
    pub fn spawn(vfkit: &Path, vm: &VfkitVm, log: &Path) -> Result<Self, RunError> {
        let args = vm
            .args()
            .map_err(|e| RunError::Missing(format!("vfkit's command line: {e}")))?;
        let out = std::fs::File::create(log)
            .map_err(RunError::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(RunError::io(format!("opening {}", log.display())))?;
        let child = Command::new(vfkit)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(RunError::io(format!("starting {}", vfkit.display())))?;
        Ok(Self {
            process: HeldProcess::new(child, log.to_owned(), "vfkit"),
            rest: vm.rest_socket.clone(),
            agent_socket: vm.agent_socket.clone(),
        })
    }

    /// The process, as the run's exec loop watches it.
    pub(crate) fn held(&mut self) -> &mut HeldProcess {
        &mut self.process
    }

    /// The VM's state, as vfkit reports it.
    pub fn state(&self) -> Result<VmState, rest::RestError> {
        rest::state(&self.rest)
    }

    /// Waits for the VM to run and its agent to answer: vfkit's state followed until
    /// `Running` (a VM in the `Error` state, or vfkit's exit, which a stopped VM causes,
    /// ends the wait with the reason), then the vsock socket connected and hellos and a
    /// ping exchanged. Gives up on Ctrl-C or after `timeout`.
    pub fn wait_for_agent(&mut self, timeout: Duration) -> Result<(Client, u64), RunError> {
        let start = Instant::now();
        let mut last = String::from("vfkit has not opened its REST socket");
        let mut running = false;
        loop {
            if interrupt::requested() {
                return Err(RunError::Interrupted);
            }
            if let Some(status) = self.process.try_exit() {
                return Err(self.process.died(status));
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Err(RunError::AgentNotReady {
                    timeout,
                    reason: last,
                    log: self.process.log_tail(),
                });
            }
            let left = timeout.saturating_sub(elapsed).min(Duration::from_secs(5));
            if !running {
                match self.state() {
                    Ok(VmState::Running) => running = true,
                    Ok(VmState::Error) => {
                        return Err(RunError::VmmDied {
                            reason: "Virtualization.framework stopped the VM with an error (vfkit)"
                                .into(),
                            log: self.process.log_tail(),
                            exit: None,
                        });
                    }
                    // A stopped VM makes vfkit exit, which the check above sees.
                    Ok(state) => last = format!("the VM is {state:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            if running {
                // With `connect`, vfkit listens on the socket and opens the guest's
                // vsock port for each connection: no handshake of its own.
                match UnixStream::connect(&self.agent_socket) {
                    Ok(stream) => match Client::connect_with_timeout(stream, Some(left)) {
                        Ok(client) => match client.ping_timeout(Some(left)) {
                            Ok(info) => return Ok((client, info.boot_ms)),
                            Err(e) => last = format!("ping: {e}"),
                        },
                        Err(e) => last = format!("hello: {e}"),
                    },
                    Err(e) => last = format!("agent socket: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the VM: a `Stop` request, `grace` to end, then `HardStop`, then a kill.
    /// Returns vfkit's exit status, when it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        // vfkit exits once its VM has stopped.
        for change in [Change::Stop, Change::HardStop] {
            if self.process.try_exit().is_some() {
                break;
            }
            if let Err(e) = rest::change(&self.rest, change) {
                tracing::debug!("vfkit {change:?}: {e}");
            }
            let until = Instant::now() + grace;
            while self.process.try_exit().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.process.wait_or_kill(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for `vfkit --version`: a script printing `answer`.
    fn fake(dir: &Path, answer: &str, status: i32) -> PathBuf {
        let path = dir.join("vfkit");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho '{answer}'\nexit {status}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn versions_are_read_and_old_or_silent_vfkits_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            check_version(&fake(dir.path(), "vfkit version: v0.6.1", 0)).unwrap(),
            (0, 6, 1)
        );
        let old = check_version(&fake(dir.path(), "vfkit version: v0.1.0", 0)).unwrap_err();
        assert!(matches!(old, VfkitError::TooOld { .. }), "{old}");
        assert!(old.to_string().contains("0.1.0") && old.to_string().contains("0.5.0"));
        for (answer, status) in [("vfkit", 0), ("vfkit version: v1.2.3", 1), ("", 0)] {
            let err = check_version(&fake(dir.path(), answer, status)).unwrap_err();
            assert!(
                matches!(err, VfkitError::NoVersion { .. }),
                "{answer}: {err}"
            );
        }
        let missing = check_version(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing, VfkitError::Missing);
        assert!(missing.to_string().contains("vfkit not found"));
    }

    #[test]
    fn version_words_are_found_anywhere_in_the_line() {
        assert_eq!(parse_version("v0.5.0"), Some((0, 5, 0)));
        assert_eq!(
            parse_version("vfkit version: 10.20.30-dev"),
            Some((10, 20, 30))
        );
        assert_eq!(parse_version("vfkit 1.2"), None);
        assert_eq!(parse_version("99999999999.1.1"), None);
    }
}
