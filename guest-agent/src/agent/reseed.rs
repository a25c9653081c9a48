//! After a restore, before any workload runs again: the host's entropy into the
//! kernel's RNG, the VM's new identity, and the host's wall clock.
//!
//! Two VMs restored from one snapshot start with the same memory, so with the same
//! kernel CRNG state: without this, both would hand their workloads the same
//! "random" bytes. The entropy is written to the input pool with `RNDADDENTROPY`
//! (credited), and `RNDRESEEDCRNG` then makes the CRNG draw a new key from the pool
//! at once instead of at its next scheduled reseed. What this does not reach is
//! written down in docs/snapshots.md (a process's own userspace RNG state, the
//! kernel's boot id).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use super::reply::reply;
use crate::protocol::{ErrorCode, ErrorReply, ReseedRequest, Reseeded, RESEED_ENTROPY};

/// Where the workload reads the VM's identity.
pub const IDENTITY_DIR: &str = "/run/mvm";
/// The sandbox id's file in [`IDENTITY_DIR`].
pub const SANDBOX_ID_FILE: &str = "/run/mvm/sandbox-id";

/// The largest buffer a reseed carries.
const MAX_ENTROPY: usize = *RESEED_ENTROPY.end();

/// The kernel's `struct rand_pool_info`, with room for [`MAX_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    /// Bits credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

// `_IOW('R', 0x03, int[2])`: the ioctl's size is the header's, not the buffer's.
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    RandPoolInfo
);
// `_IO('R', 0x07)`.
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

fn io_error(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    reply(ErrorCode::Io, format!("reseed: {what}: {e}"))
}

/// Applies `request` (already validated by the protocol): entropy, CRNG, clock,
/// identity, hostname, in that order.
pub(super) fn apply(request: &ReseedRequest) -> Result<Reseeded, ErrorReply> {
    let entropy_bits = add_entropy(&request.entropy)?;
    let crng_reseeded = reseed_crng()?;
    let clock_step_ms = request.unix_time_ns.map(set_clock).transpose()?;
    write_identity(&request.sandbox_id)?;
    if let Some(hostname) = &request.hostname {
        crate::init::set_hostname(hostname).map_err(|e| io_error("sethostname", e))?;
    }
    tracing::info!(
        sandbox_id = %request.sandbox_id,
        entropy_bits,
        crng_reseeded,
        ?clock_step_ms,
        "reseeded after a restore"
    );
    Ok(Reseeded {
        entropy_bits,
        crng_reseeded,
        clock_step_ms,
    })
}

fn urandom() -> Result<std::fs::File, ErrorReply> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/urandom")
        .map_err(|e| io_error("/dev/urandom", e))
}

/// Mixes `entropy` into the input pool, crediting every bit. Returns the bits.
fn add_entropy(entropy: &[u8]) -> Result<u32, ErrorReply> {
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; MAX_ENTROPY],
    };
    let Some(slot) = info.buf.get_mut(..entropy.len()) else {
        return Err(reply(
            ErrorCode::BadRequest,
            format!(
                "{} bytes of entropy is more than {MAX_ENTROPY}",
                entropy.len()
            ),
        ));
    };
    slot.copy_from_slice(entropy);
    let bytes = libc::c_int::try_from(entropy.len()).unwrap_or(0);
    info.buf_size = bytes;
    info.entropy_count = bytes.saturating_mul(8);
    let file = urandom()?;
    // SAFETY: `info` is a valid `rand_pool_info` whose `buf_size` bytes of `buf` are
    // initialised and inside the struct; the kernel reads it and keeps no pointer.
    let result = unsafe { rnd_add_entropy(file.as_raw_fd(), &info) };
    // The buffer is no longer needed; do not leave it in the agent's memory.
    info.buf.fill(0);
    result.map_err(|e| io_error("RNDADDENTROPY", e))?;
    Ok(u32::try_from(info.entropy_count).unwrap_or(0))
}

/// Reseeds the CRNG from the input pool now. False on a kernel without the ioctl.
fn reseed_crng() -> Result<bool, ErrorReply> {
    let file = urandom()?;
    // SAFETY: the ioctl takes no argument; the descriptor is an open /dev/urandom.
    match unsafe { rnd_reseed_crng(file.as_raw_fd()) } {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(io_error("RNDRESEEDCRNG", e)),
    }
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns`; returns how far it moved, in ms.
fn set_clock(unix_time_ns: u64) -> Result<i64, ErrorReply> {
    use nix::sys::time::TimeSpec;
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let before = clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| io_error("clock", e))?;
    let ns = i64::try_from(unix_time_ns).map_err(|e| io_error("time", e))?;
    let target = TimeSpec::new(ns / 1_000_000_000, ns % 1_000_000_000);
    clock_settime(ClockId::CLOCK_REALTIME, target).map_err(|e| io_error("clock_settime", e))?;
    let step = target - before;
    Ok(step.tv_sec().saturating_mul(1000) + step.tv_nsec() / 1_000_000)
}

/// Writes the sandbox id to [`SANDBOX_ID_FILE`] (root's, mode 0644), whole or not at
/// all: a temporary file renamed over it.
fn write_identity(sandbox_id: &str) -> Result<(), ErrorReply> {
    let mut dir = std::fs::DirBuilder::new();
    dir.mode(0o755);
    if let Err(e) = dir.create(IDENTITY_DIR) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(io_error(IDENTITY_DIR, e));
        }
    }
    let temporary = format!("{SANDBOX_ID_FILE}.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&temporary)
        .map_err(|e| io_error(&temporary, e))?;
    writeln!(file, "{sandbox_id}").map_err(|e| io_error(&temporary, e))?;
    drop(file);
    std::fs::rename(&temporary, SANDBOX_ID_FILE).map_err(|e| io_error(SANDBOX_ID_FILE, e))
}
