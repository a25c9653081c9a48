//! The `snapshot` mode: a guest that keeps working across a snapshot and a restore.
//!
//! At start it writes [`FILE_TEXT`] to [`FILE`] (in its RAM-backed root). Then, every
//! [`TICK_MS`], it counts one more, writes a 4 KiB block holding the count to
//! `/dev/vda` (O_DIRECT, synced: a virtio-blk request each way), reads it back,
//! checks it, and says `snapshot-count: <n>`. A thread listens on vsock port
//! [`PORT`] and answers each connection with `count=<n> file=<text of FILE>` and
//! closes it, then says [`SAY_ANSWERED`]. After a restore the count goes on from where it stopped, the block device
//! serves the next request, and a new vsock connection is answered (the old ones were
//! reset). Nothing ends it but the host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use super::{Ending, Guest, GuestError};

/// The file written once at start.
pub const FILE: &str = "/snapshot-file";
/// Its text.
pub const FILE_TEXT: &str = "written-before-the-snapshot";
/// The vsock port the guest answers on.
pub const PORT: u32 = 5100;
/// How often the guest counts.
pub const TICK_MS: u64 = 200;
/// What each count line starts with.
pub const SAY_COUNT: &str = "snapshot-count: ";
/// What the guest says after it answered a vsock connection.
pub const SAY_ANSWERED: &str = "snapshot-answered";
/// What a failed disk check says.
pub const SAY_DISK_ERROR: &str = "snapshot-disk: ERROR";

const VMADDR_CID_ANY: u32 = u32::MAX;
const BLOCK: usize = 4096;
/// Blocks the count cycles through.
const BLOCKS: u64 = 64;

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> GuestError {
    move |e| GuestError::Sys {
        what: what.to_owned(),
        source: std::io::Error::from(e),
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GuestError {
    move |source| GuestError::Sys {
        what: what.to_owned(),
        source,
    }
}

/// Writes `count` into its block, syncs, reads it back; an error names what differs.
/// `buf` is a page-aligned 4 KiB window (O_DIRECT needs one).
fn disk_round(disk: &mut File, count: u64, buf: &mut [u8]) -> Result<(), String> {
    let at = (count % BLOCKS) * BLOCK as u64;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = count.to_le_bytes()[0].wrapping_add(i.to_le_bytes()[0]);
    }
    if let Some(head) = buf.get_mut(..8) {
        head.copy_from_slice(&count.to_le_bytes());
    }
    let want = buf.to_vec();
    disk.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
    disk.write_all(buf).map_err(|e| format!("write: {e}"))?;
    disk.sync_data().map_err(|e| format!("sync: {e}"))?;
    buf.fill(0);
    disk.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
    disk.read_exact(buf).map_err(|e| format!("read: {e}"))?;
    if *buf != *want {
        return Err(format!("block {} read back other bytes", count % BLOCKS));
    }
    Ok(())
}

/// Answers each vsock connection with the count and the file's text.
fn answer(listener: OwnedFd, count: Arc<AtomicU64>) {
    loop {
        let Ok(fd) = accept(listener.as_raw_fd()) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let mut conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let text = std::fs::read_to_string(FILE).unwrap_or_else(|e| format!("<{e}>"));
        let line = format!("count={} file={text}\n", count.load(Ordering::SeqCst));
        if conn.write_all(line.as_bytes()).is_ok() {
            super::Console.say(SAY_ANSWERED);
        }
    }
}

/// Runs the mode (never returns unless something fails).
pub fn run(guest: &Guest) -> Result<Ending, GuestError> {
    std::fs::write(FILE, FILE_TEXT).map_err(io("write the file"))?;
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/vda")
        .map_err(io("open /dev/vda"))?;
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("vsock socket"))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, PORT)).map_err(sys("vsock bind"))?;
    listen(&listener, Backlog::new(4).map_err(sys("backlog"))?).map_err(sys("vsock listen"))?;
    let count = Arc::new(AtomicU64::new(0));
    {
        let count = count.clone();
        std::thread::spawn(move || answer(listener, count));
    }
    // An aligned window of a larger allocation.
    let mut raw = vec![0u8; 2 * BLOCK];
    let at = raw.as_ptr().align_offset(BLOCK);
    let buf = raw
        .get_mut(at..at + BLOCK)
        .ok_or_else(|| GuestError::Check("no aligned buffer".into()))?;
    loop {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if let Err(e) = disk_round(&mut disk, n, buf) {
            guest.console.say(&format!("{SAY_DISK_ERROR} at {n}: {e}"));
            return Ok(Ending::Hang);
        }
        guest.console.say(&format!("{SAY_COUNT}{n}"));
        std::thread::sleep(Duration::from_millis(TICK_MS));
    }
}
