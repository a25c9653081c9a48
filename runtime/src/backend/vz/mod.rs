//! The `vz` tier: Apple's Virtualization.framework through `vfkit`, on macOS.
//!
//! Virtualization.framework measures nothing: it boots the files it is given. So on this
//! tier the runtime is the one that verifies ([`verify`]): it checks the signed plan as
//! the VMM would, copies each artifact into a private directory (a copy-on-write clone on
//! APFS), measures the copy against the plan, and hands `vfkit` only those copies
//! ([`handoff`]); `vfkit`'s command line is built from the plan and the measured copies
//! alone ([`invocation`]). [`vfkit`] starts it and follows its REST state ([`rest`]); the
//! agent is reached through vfkit's vsock socket with the same client as on the other
//! tiers. What this does not give: per-block verification of a disk while the guest
//! reads it, and the VMM's jail and seccomp filters (the hypervisor is Apple's; `vfkit`
//! runs as the user).
//!
//! Platform-neutral and unit-tested on Linux, where `run` is also driven end to end
//! against a stand-in for `vfkit` (`runtime/tests/vz_backend.rs`); `mvm run` offers the
//! tier on macOS only. None of it has run on a Mac (docs/backends.md).

pub mod handoff;
pub mod invocation;
pub mod rest;
pub mod verify;
pub mod vfkit;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::agent_exec::{self, shutdown_guest};
use super::scratch::ScratchDir;
use super::{PlanFiles, RunError, RunJournal, RunOutcome, RunSpec, Tier, Timings, Workload};
use crate::image::StoredImage;
use invocation::VfkitVm;
use vfkit::Vfkit;

/// The tier's label, wherever it is shown.
pub const LABEL: &str = "vz: hardware-virtualized, measured by the runtime before hand-off, no per-block verification in the hypervisor";
/// Time the VM gets to power off after the agent acknowledged shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Gives the hand-off directory its owner's write permission back when the run ends.
struct Reopen(std::path::PathBuf);

impl Drop for Reopen {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
    }
}

/// A session's own connection to the agent, through vfkit's vsock socket.
fn vfkit_session(agent_socket: &std::path::Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(agent_socket)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `workload` in a VM of Virtualization.framework: `vfkit` found and its version
/// checked, the plan checked and the image handed over ([`verify`]), the VM started,
/// its agent reached, the workload run as on the other tiers, the VM stopped.
pub fn run(
    spec: &RunSpec,
    image: &StoredImage,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    workload: Workload<'_>,
) -> Result<RunOutcome, RunError> {
    let start = Instant::now();
    let binary = vfkit::locate().map_err(|e| RunError::NoBackend(format!("vz: {e}")))?;
    vfkit::check_version(&binary).map_err(|e| RunError::NoBackend(format!("vz: {e}")))?;
    if !spec.disks.is_empty() {
        return Err(RunError::Missing(
            "vz: this version hands over an image's kernel and initramfs only: an image with a root filesystem, or --disk, needs the kvm or emulated tier".into(),
        ));
    }
    if spec.net.is_some() {
        return Err(RunError::Missing(
            "--net: the vz tier has no network device in this version".into(),
        ));
    }
    let scratch = ScratchDir::create().map_err(RunError::io("creating the run directory"))?;
    let boot = scratch.path().join("boot");
    // Dropped before `scratch`: the hand-off closes its directory to writes, and a user
    // who is not root could not remove it otherwise.
    let reopen = Reopen(boot.clone());
    let handed = verify::verify(plan, image, &boot)?;
    let agent_socket = scratch.path().join("agent.sock");
    let vm = VfkitVm {
        cpus: spec.cpus,
        memory_mib: spec.mem_mib,
        kernel: handed.kernel,
        initrd: handed.initramfs,
        cmdline: image.manifest.cmdline.clone(),
        disks: handed.disks,
        agent_port: image.manifest.agent_vsock_port,
        agent_socket: agent_socket.clone(),
        console_log: scratch.path().join("console.log"),
        rest_socket: scratch.path().join("rest.sock"),
    };
    let mut vfkit = Vfkit::spawn(&binary, &vm, &scratch.path().join("vfkit.log"))?;
    let (client, guest_boot_ms) =
        vfkit.wait_for_agent(Duration::from_secs(spec.ready_timeout_secs))?;
    let ready = Instant::now();

    let (status, client) =
        agent_exec::run_workload(client, spec, workload, journal, vfkit.held(), || {
            vfkit_session(&agent_socket)
        })?;
    let exited = Instant::now();
    shutdown_guest(client, SHUTDOWN_GRACE);
    if vfkit.stop(SHUTDOWN_GRACE).is_none() {
        tracing::warn!("vfkit did not exit after the VM was stopped");
    }
    let stopped = Instant::now();
    drop(vfkit);
    drop(reopen);
    drop(scratch);
    Ok(RunOutcome {
        status,
        timings: Timings {
            boot_ms: millis(ready.duration_since(start)),
            exec_ms: millis(exited.duration_since(ready)),
            shutdown_ms: millis(stopped.duration_since(exited)),
            total_ms: millis(start.elapsed()),
            guest_boot_ms: Some(guest_boot_ms),
            host_boot_ms: None,
            testhost_spare: false,
            warm_unpack_ms: None,
            warm_start: false,
        },
        tier: Tier::Vz,
        boot_report: None,
        plan_id: None,
        vmm_memory: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_hand_off_directory_is_writable_again_once_the_run_lets_it_go() {
        let scratch = tempfile::tempdir().unwrap();
        let boot = scratch.path().join("boot");
        std::fs::create_dir(&boot).unwrap();
        std::fs::write(boot.join("kernel"), b"k").unwrap();
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o500)).unwrap();
        drop(Reopen(boot.clone()));
        let mode = std::fs::metadata(&boot).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(Reopen(scratch.path().join("never-made")));
    }
}
