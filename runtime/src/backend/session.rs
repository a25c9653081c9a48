//! What a backend runs once the guest agent answered: one command
//! ([`Workload::Command`], `mvm run`), or a session that keeps the VM up and
//! hands the agent to a server until the server returns ([`Workload::Session`],
//! a sandbox's supervisor).
//!
//! A session gets one connection to the guest agent, hello not yet exchanged:
//! on the `kvm` tier a fresh hybrid-vsock connection, on the `emulated` tier
//! the test host's `mvm.in` port, which the inner `mvm` relays byte for byte
//! to its own agent connection. What the session does in the guest it reports
//! as [`SessionEvent`]s to the run's journal, in order with the run's other
//! records.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use mvm_loader::measure::Sha256Digest;

use super::{OutputSink, RunError, RunJournal, WorkloadStatus};

/// What runs in the VM once it is up.
pub enum Workload<'a> {
    /// The spec's command: output into `sink`, stdin from `stdin` when the
    /// spec forwards it.
    Command {
        /// Where stdout and stderr go.
        sink: &'a mut dyn OutputSink,
        /// The workload's stdin.
        stdin: Option<Box<dyn Read + Send>>,
    },
    /// A session server that drives the agent until it returns.
    Session(&'a mut dyn SessionServer),
}

impl<'a> Workload<'a> {
    /// The one-command workload.
    pub fn command(sink: &'a mut dyn OutputSink, stdin: Option<Box<dyn Read + Send>>) -> Self {
        Self::Command { sink, stdin }
    }

    /// Whether this is a session.
    pub fn is_session(&self) -> bool {
        matches!(self, Self::Session(_))
    }
}

/// Tells a session whether the VM under it has ended.
pub trait VmProbe {
    /// `Some(why)` once the VM (or the process that holds it) is gone.
    fn ended(&mut self) -> Option<String>;

    /// What an egress proxy beside the VM, in another process, reported since the last
    /// call (the emulated tier's test host), for the session to append as it goes.
    fn observed(&mut self) -> Vec<crate::egress_proxy::Observed> {
        Vec::new()
    }
}

/// What a session asks of snapshots (the `kvm` tier: the VMM is this host's process).
#[derive(Debug, Clone)]
pub struct SessionSnapshots {
    /// Where a pause writes the snapshot: an empty directory (`--snapshot-dir`); the
    /// plan that booted the VM is copied beside it (`plan.dsse.json`).
    pub write_to: PathBuf,
    /// The epoch a snapshot taken now is bound to (`--snapshot-epoch`).
    pub epoch: u64,
    /// The public key file the VMM trusts for the snapshot's seal and the plan.
    pub trust: PathBuf,
    /// Start from this sealed snapshot instead of booting.
    pub restore: Option<RestoreFrom>,
}

impl SessionSnapshots {
    /// The VMM's arguments for these.
    pub fn vmm_args(&self) -> super::vmm_process::SnapshotArgs {
        super::vmm_process::SnapshotArgs {
            write_to: Some((self.write_to.clone(), self.epoch)),
            continue_after: false,
            bind_artifacts: false,
            restore: self
                .restore
                .as_ref()
                .map(|from| (from.dir.clone(), from.min_epoch)),
            trust: Some(self.trust.clone()),
        }
    }
}

/// A sealed snapshot to start from.
#[derive(Debug, Clone)]
pub struct RestoreFrom {
    /// Its directory.
    pub dir: PathBuf,
    /// The sandbox's current epoch: a snapshot older than it is a rollback.
    pub min_epoch: u64,
    /// The sandbox id the restored guest is told (its reseed).
    pub sandbox_id: String,
}

/// The name of the plan copied beside a snapshot.
pub const SNAPSHOT_PLAN_FILE: &str = "plan.dsse.json";

/// Serves a session on the guest agent's connection.
pub trait SessionServer {
    /// The VM is up, its boot recorded and its secrets in: serve `agent` until
    /// the session ends (asked to stop, its time up, the VM gone), appending
    /// what it does to `journal`. Returns how the session ended, as the
    /// status of a workload.
    fn serve(
        &mut self,
        agent: UnixStream,
        journal: &mut dyn RunJournal,
        vm: &mut dyn VmProbe,
    ) -> Result<WorkloadStatus, RunError>;

    /// What the session asks of snapshots; `None`: it can neither pause nor restore.
    fn snapshots(&self) -> Option<&SessionSnapshots> {
        None
    }

    /// Whether the session ended because a client asked to pause: the backend then
    /// snapshots the VM to [`SessionSnapshots::write_to`] instead of powering it off.
    fn pause_requested(&self) -> bool {
        false
    }
}

/// A digest and a byte count: how a transfer or an output stream is recorded.
pub type Digested = (Sha256Digest, u64);

/// Something a session did in the guest, recorded by name, size and digest
/// (never contents). `request` is the session's own number for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A command is about to start (recorded before the agent hears of it).
    ExecStarted {
        /// The session's number for the request.
        request: u64,
        /// The command's digest, as `exec_started` records a run's.
        argv: Vec<String>,
    },
    /// A command ended, or its request failed (`status` is then `None`).
    ExecExited {
        /// The session's number for the request.
        request: u64,
        /// Its shell-style exit status.
        status: Option<i32>,
        /// Its stdout's digest and size.
        stdout: Digested,
        /// Its stderr's digest and size.
        stderr: Digested,
        /// Why it has no status (the agent's error, a cancel), if it has none.
        error: Option<String>,
    },
    /// A file went into the guest (`complete` false: cut off or refused, and
    /// nothing was left at `path`).
    FileWritten {
        /// The session's number for the request.
        request: u64,
        /// The guest path.
        path: String,
        /// The bytes' digest and count.
        data: Digested,
        /// Whether the file was written whole.
        complete: bool,
    },
    /// A file came out of the guest.
    FileRead {
        /// The session's number for the request.
        request: u64,
        /// The guest path.
        path: String,
        /// The bytes' digest and count.
        data: Digested,
        /// Whether the file was read whole.
        complete: bool,
    },
    /// A client opened a connection to a forwarded guest port.
    ForwardOpened {
        /// The session's number for the request.
        request: u64,
        /// The guest port.
        port: u16,
    },
    /// That connection closed, after these many bytes each way.
    ForwardClosed {
        /// The session's number for the request.
        request: u64,
        /// The guest port.
        port: u16,
        /// Bytes sent into the guest.
        to_guest: u64,
        /// Bytes that came out of it.
        from_guest: u64,
        /// Why it ended early (the guest port refused, a cancel), if it did.
        error: Option<String>,
    },
    /// The session ends; `reason` is `stop`, `ttl`, `vm_exited` or `signal`.
    Stopping {
        /// `stop`, `ttl`, `vm_exited` or `signal`.
        reason: String,
    },
}
