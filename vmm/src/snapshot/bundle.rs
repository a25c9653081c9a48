//! A snapshot directory: written from a paused VM, opened (every check made) and
//! turned back into a VM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use mvm_loader::measure::Sha256Digest;

use super::manifest::{self, CpuRequirement, Expect, FileDigest, Manifest, PlanBinding};
use super::memory::{self, MemoryIndex, RegionLayout};
use super::written;
use super::{MachineState, SnapshotError, MEMORY_FILE, SEALED_FILE, STATE_FILE, UNSIGNED_FILE};
use crate::layout;
use crate::vm::Vm;

/// The largest state file read back: 32 vCPUs' state is well under 4 MiB of JSON.
const MAX_STATE_BYTES: u64 = 16 << 20;
/// The largest sealed manifest read back.
const MAX_SEALED_BYTES: u64 = 256 << 10;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// A new file in the snapshot directory, the owner's alone; an existing one is an
/// error (a snapshot never overwrites another).
fn create(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
        .map_err(io("creating a snapshot file"))
}

/// The three files a snapshot is written to, created (empty) before the VM runs: the
/// VMM's threads may not open files once their filters are on, so the files a snapshot
/// will need are made while it still can. An empty `manifest.json` means no snapshot
/// was taken.
#[derive(Debug)]
pub struct SnapshotFiles {
    memory: File,
    state: File,
    manifest: File,
    /// This boot's id, when the memory file is write-leased: the snapshot then seals the
    /// memory file's identity ([`written::FileIdentity`]).
    leased_in_boot: Option<String>,
}

impl SnapshotFiles {
    /// Creates [`MEMORY_FILE`], [`STATE_FILE`] and [`UNSIGNED_FILE`] in `dir`, which
    /// must exist and hold none of them, and takes a write lease on the memory file
    /// ([`written::write_lease`]; without one, the snapshot's restores hash the whole file).
    /// The lease is taken now, by the process that made the file: the jailed VMM runs as
    /// another user, who may not lease a file it does not own.
    pub fn create_in(dir: &Path) -> Result<Self, SnapshotError> {
        let memory = create(dir, MEMORY_FILE)?;
        let leased_in_boot = written::boot_id().filter(|_| {
            match written::route_write_lease_breaks(&memory)
                .and_then(|()| written::write_lease(&memory))
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("no write lease on the snapshot's memory file ({e}): its restores will hash it whole");
                    false
                }
            }
        });
        Ok(Self {
            memory,
            state: create(dir, STATE_FILE)?,
            manifest: create(dir, UNSIGNED_FILE)?,
            leased_in_boot,
        })
    }

    /// Sends the memory file's lease breaks to this process: after the jail's fork they
    /// would still go to the process that took it.
    pub fn claim_lease_signals(&self) -> std::io::Result<()> {
        if self.leased_in_boot.is_some() {
            memory::claim_lease_signals(&self.memory)?;
        }
        Ok(())
    }
}

/// What a snapshot is bound to, given by whoever takes it.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The plan that booted the VM; `None` for a development boot, or with `artifacts`.
    pub plan: Option<PlanBinding>,
    /// The measured artifacts instead of the plan (`--snapshot-bind-artifacts`).
    pub artifacts: Option<mvm_loader::plan::Artifacts>,
    /// The sandbox's epoch for this snapshot.
    pub epoch: u64,
    /// What the guest needs of a host: [`CpuRequirement::of_guest`] of the CPUID the VMM
    /// set on vCPU 0 at boot (not what `KVM_GET_CPUID2` reads back, which some KVMs, a
    /// software one among them, fill from the host's own CPU whatever was set).
    pub cpu: CpuRequirement,
}

/// Writes guest memory, the machine state and the unsigned manifest into `files`.
/// Every vCPU must be paused, `state` read from them.
pub fn write(
    files: SnapshotFiles,
    vm: &Vm,
    state: &MachineState,
    binding: Binding,
) -> Result<Manifest, SnapshotError> {
    let SnapshotFiles {
        memory: mut mem_file,
        state: mut state_file,
        manifest: mut unsigned,
        leased_in_boot,
    } = files;
    let vcpus = u8::try_from(state.vcpus.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or(SnapshotError::Format {
            what: "state",
            why: format!("{} vCPUs", state.vcpus.len()),
        })?;
    let (layout, index) = memory::save(vm.memory(), &mut mem_file)?;
    // The file as written (saved and synced), while the lease still keeps every other
    // process out of it.
    let written = leased_in_boot.and_then(|boot| match written::identity(&mem_file, &boot) {
        Ok(identity) => Some(identity),
        Err(e) => {
            tracing::warn!("fstat of the memory file ({e}): its restores will hash it whole");
            None
        }
    });
    let state_json = serde_json::to_vec(&StateFileRef {
        machine: state,
        memory: &index,
    })
    .map_err(|e| SnapshotError::Format {
        what: "state",
        why: e.to_string(),
    })?;
    state_file
        .write_all(&state_json)
        .and_then(|()| state_file.sync_all())
        .map_err(io("writing the state file"))?;
    // Sealed only if the lease held throughout and the clock that stamps change times
    // has moved past this one, so any later write is seen at restore.
    let memory_file = written.filter(|w| {
        let kept = !written::opened_elsewhere() && written::wait_past(w);
        if !kept {
            tracing::warn!("the memory file was opened by another process, or the clock did not move: its restores will hash it whole");
        }
        kept
    });
    let manifest = Manifest {
        format: manifest::FORMAT,
        vmm_build: manifest::VMM_BUILD.to_owned(),
        plan: binding.plan,
        artifacts: binding.artifacts,
        epoch: binding.epoch,
        cpu: binding.cpu,
        vcpus,
        mem_bytes: vm.memory_bytes(),
        memory: FileDigest {
            bytes: vm.memory_bytes(),
            sha256: index.digest(),
        },
        memory_file,
        layout,
        state: FileDigest {
            bytes: state_json.len() as u64,
            sha256: Sha256Digest::of(&state_json),
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Format {
        what: "manifest",
        why: e.to_string(),
    })?;
    // Last: a manifest says the other two files are whole.
    unsigned
        .write_all(&json)
        .and_then(|()| unsigned.sync_all())
        .map_err(io("writing the manifest"))?;
    Ok(manifest)
}

/// What [`STATE_FILE`] holds: the machine state and the memory file's index.
#[derive(serde::Serialize)]
struct StateFileRef<'a> {
    machine: &'a MachineState,
    memory: &'a MemoryIndex,
}

/// [`StateFileRef`], read back.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    machine: MachineState,
    memory: MemoryIndex,
}

/// A snapshot that passed every check, its memory file open.
#[derive(Debug)]
pub struct Opened {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The machine state, whose digest matched.
    pub state: MachineState,
    /// The memory file, whose digest matched (this handle was hashed; it is the one
    /// mapped), or which is the file the VMM wrote, unchanged since.
    pub memory: File,
    /// Whether the memory file was hashed (false: unchanged since it was written, by its
    /// sealed [`written::FileIdentity`]).
    pub memory_hashed: bool,
}

/// Opens a file of the snapshot for reading, refusing a symlink.
fn open_file(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
        .map_err(|e| SnapshotError::refused("snapshot_format", format!("{name}: {e}")))
}

fn read_bounded(mut file: File, name: &str, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = Vec::new();
    (&mut file)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io("reading a snapshot file"))?;
    if bytes.len() as u64 > max {
        return Err(SnapshotError::refused(
            "snapshot_format",
            format!("{name} is larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// The layout this VMM gives `mem_bytes` of RAM, placed back to back in a memory file.
fn expected_layout(mem_bytes: u64) -> Vec<RegionLayout> {
    let mut offset = 0;
    layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(addr, len)| {
            let r = RegionLayout {
                guest_addr: addr.0,
                len,
                file_offset: offset,
            };
            offset += len;
            r
        })
        .collect()
}

/// Checks everything about the snapshot in `dir` before any of it is used: the seal
/// and its bindings ([`manifest::open`]), that the layout is the one this VMM gives
/// that much RAM, the state file's length and digest (then that it parses and agrees
/// with the manifest), and the memory file's length and digest.
pub fn open(dir: &Path, expect: &Expect<'_>) -> Result<Opened, SnapshotError> {
    let sealed = read_bounded(open_file(dir, SEALED_FILE)?, SEALED_FILE, MAX_SEALED_BYTES)?;
    let manifest = manifest::open(&sealed, expect)?;
    if manifest.layout != expected_layout(manifest.mem_bytes) {
        return Err(SnapshotError::refused(
            "snapshot_format",
            format!(
                "the memory layout is not the one this VMM gives {} bytes of RAM",
                manifest.mem_bytes
            ),
        ));
    }
    let state_bytes = read_bounded(open_file(dir, STATE_FILE)?, STATE_FILE, MAX_STATE_BYTES)?;
    let found = FileDigest {
        bytes: state_bytes.len() as u64,
        sha256: Sha256Digest::of(&state_bytes),
    };
    if found != manifest.state {
        return Err(SnapshotError::refused(
            "state_mismatch",
            format!(
                "{STATE_FILE} is {} bytes with sha256 {}; the seal says {} bytes with {}",
                found.bytes, found.sha256, manifest.state.bytes, manifest.state.sha256
            ),
        ));
    }
    let StateFile {
        machine: state,
        memory: index,
    } = serde_json::from_slice(&state_bytes)
        .map_err(|e| SnapshotError::refused("snapshot_format", format!("{STATE_FILE}: {e}")))?;
    let indices_ok = state
        .vcpus
        .iter()
        .enumerate()
        .all(|(i, v)| usize::from(v.index) == i);
    if state.vcpus.len() != usize::from(manifest.vcpus) || !indices_ok {
        return Err(SnapshotError::refused(
            "snapshot_format",
            format!(
                "{STATE_FILE} holds {} vCPUs (or out of order); the seal says {}",
                state.vcpus.len(),
                manifest.vcpus
            ),
        ));
    }
    if index.digest() != manifest.memory.sha256 {
        return Err(SnapshotError::refused(
            "state_mismatch",
            "the memory index is not the one sealed".to_owned(),
        ));
    }
    let mut mem = open_file(dir, MEMORY_FILE)?;
    // Leased before it is read: no writer can get in between the check and the guest.
    memory::lease(&mem).map_err(|e| {
        SnapshotError::refused(
            "memory_unleased",
            format!("{MEMORY_FILE}: no read lease ({e}): it is open for writing elsewhere, or this file system or user cannot lease it"),
        )
    })?;
    // The file the VMM wrote, untouched since (same boot, inode, length and change
    // time, sealed): its chunks were hashed from guest memory as it was written. Any
    // other file is hashed whole.
    let unchanged = manifest.memory_file.as_ref().is_some_and(|sealed| {
        sealed.bytes == manifest.memory.bytes
            && written::unchanged_since_written(&mem, sealed, written::boot_id().as_deref())
    });
    if !unchanged {
        memory::check(&mut mem, &index, manifest.memory.bytes).map_err(|why| {
            SnapshotError::refused("memory_mismatch", format!("{MEMORY_FILE}: {why}"))
        })?;
    }
    Ok(Opened {
        manifest,
        state,
        memory: mem,
        memory_hashed: !unchanged,
    })
}

/// Maps the opened snapshot's memory and makes the VM with its in-kernel devices'
/// state. The caller creates the vCPUs and restores each one's state
/// ([`super::cpu::restore`]) before any runs.
pub fn restore_vm(opened: &Opened) -> Result<Vm, SnapshotError> {
    let memory = memory::map(&opened.memory, &opened.manifest.layout)?;
    let vm = Vm::new(memory).map_err(|e| SnapshotError::Build(e.to_string()))?;
    super::vm_state::restore(vm.fd(), &opened.state.vm)?;
    Ok(vm)
}
