//! The `hostile-blk` and `hostile-vsock` modes: the guest turns against the device model.
//!
//! The program unbinds a virtio-mmio device's driver through sysfs, maps the device's
//! register window from `/dev/mem` (`mmio.rs`), builds its own rings and buffers in
//! mlock'd pages whose physical addresses it reads from `/proc/self/pagemap` (`dma.rs`,
//! `ring.rs`), and then runs scenarios: raw register values, broken descriptor chains,
//! bad requests and packets. Each scenario states what the device must do (refuse with a
//! status byte, mark itself NEEDS_RESET, drop, answer RST) and checks it; then the runner
//! checks that no guest byte outside the buffers the device may write has changed, and
//! that a bystander disk, still driven by the Linux driver, reads correctly. It prints
//! one [`SAY_PASS`] or [`SAY_FAIL`] line per scenario; the case (`cases/hostile.rs`)
//! asserts on those lines and on the host files.

pub mod blk;
pub mod dma;
pub mod mmio;
pub mod ring;
pub mod transport;
pub mod vsock;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use super::{Ending, Guest, GuestError};

/// Prefix of a passed scenario: `hostile PASS <name>`.
pub const SAY_PASS: &str = "hostile PASS ";
/// Prefix of a failed scenario: `hostile FAIL <name>: <reason>`.
pub const SAY_FAIL: &str = "hostile FAIL ";
/// The last line: `hostile done: N passed, M failed`.
pub const SAY_DONE: &str = "hostile done: ";
/// The attacked device came back under its Linux driver after the scenarios.
pub const SAY_RECOVERED: &str = "hostile recovered: ";

/// Disk id (serial) of the read-write disk the scenarios attack.
pub const RW_ID: &str = "hostile-rw";
/// Disk id of the read-only disk the scenarios attack.
pub const RO_ID: &str = "hostile-ro";
/// Disk id of the bystander disk (driver stays bound; read after every scenario).
pub const BYSTANDER_ID: &str = "hostile-bystander";
/// Size of each hostile disk: 1 MiB, 2048 sectors.
pub const DISK_BYTES: u64 = 1 << 20;
/// Pattern seed of the read-write disk's initial contents.
pub const RW_SEED: u8 = 0x31;
/// Pattern seed of the read-only disk.
pub const RO_SEED: u8 = 0x32;
/// Pattern seed of the bystander disk.
pub const BYSTANDER_SEED: u8 = 0x33;
/// The one sector a valid request writes on the read-write disk...
pub const VALID_SECTOR: u64 = 7;
/// ...with the pattern of this seed (at the sector's own byte offsets).
pub const VALID_SEED: u8 = 0x34;
/// The id string GET_ID returns for [`RW_ID`] (NUL-padded to 20 bytes by the device).
pub const ID_BYTES: usize = 20;

/// A scenario against a bench of type `B`.
pub type Scenario<B> = (&'static str, fn(&mut B) -> Result<(), String>);

fn mount_sysfs() -> Result<(), GuestError> {
    use nix::mount::{mount, MsFlags};
    let _ = std::fs::create_dir_all("/sys");
    match mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(GuestError::Sys {
            what: "mount sysfs on /sys".into(),
            source: e.into(),
        }),
    }
}

/// One virtio-mmio platform device as sysfs and the command line describe it.
#[derive(Debug, Clone)]
pub struct Found {
    /// `virtio-mmio.N`.
    pub platform: String,
    /// Its register window.
    pub base: u64,
    /// The virtio device type.
    pub device_type: u32,
    /// For a disk: its block device name (`vdb`) and id.
    pub disk: Option<(String, String)>,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn first_entry(dir: &str, prefix: &str) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(prefix))
}

/// Every virtio-mmio device on the command line, with what its Linux driver found
/// (call while the drivers are still bound).
pub fn discover(cmdline: &str) -> Vec<Found> {
    mmio::cmdline_slots(cmdline)
        .into_iter()
        .enumerate()
        .map(|(n, base)| {
            let platform = format!("virtio-mmio.{n}");
            let dev = format!("/sys/bus/platform/devices/{platform}");
            let virtio = first_entry(&dev, "virtio").map(|v| format!("{dev}/{v}"));
            let device_type = virtio
                .as_deref()
                .and_then(|v| read_trim(&format!("{v}/device")))
                .and_then(|t| u32::from_str_radix(t.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
            let disk = virtio.as_deref().and_then(|v| {
                let name = first_entry(&format!("{v}/block"), "vd")?;
                let id = read_trim(&format!("/sys/block/{name}/serial")).unwrap_or_default();
                Some((name, id))
            });
            Found {
                platform,
                base,
                device_type,
                disk,
            }
        })
        .collect()
}

/// The disk with id `id`.
pub fn disk_by_id<'a>(found: &'a [Found], id: &str) -> Result<&'a Found, String> {
    found
        .iter()
        .find(|f| f.disk.as_ref().is_some_and(|(_, i)| i == id))
        .ok_or_else(|| format!("no disk with id {id} among {found:?}"))
}

/// The end of guest RAM: one past the highest `System RAM` byte in `/proc/iomem`.
pub fn ram_end() -> Result<u64, String> {
    let iomem =
        std::fs::read_to_string("/proc/iomem").map_err(|e| format!("read /proc/iomem: {e}"))?;
    ram_end_of(&iomem).ok_or_else(|| "no System RAM in /proc/iomem".into())
}

/// One past the highest top-level `System RAM` range of an `/proc/iomem` text.
pub fn ram_end_of(iomem: &str) -> Option<u64> {
    iomem
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(": System RAM"))
        .filter_map(|l| l.split_once(" : ")?.0.split_once('-'))
        .filter_map(|(_, end)| u64::from_str_radix(end.trim(), 16).ok())
        .max()
        .map(|end| end + 1)
}

/// Reads 4 KiB of disk `/dev/<name>` at `offset` past the page cache and checks it holds
/// the pattern of `seed` (the bystander's health check).
pub fn direct_read_check(name: &str, offset: u64, seed: u8) -> Result<(), String> {
    const LEN: usize = 4096;
    let mut raw = vec![0u8; 2 * LEN];
    let at = raw.as_ptr().align_offset(LEN);
    let buf = raw
        .get_mut(at..at + LEN)
        .ok_or("no aligned buffer for O_DIRECT")?;
    let path = format!("/dev/{name}");
    let mut disk = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| format!("open {path} O_DIRECT: {e}"))?;
    disk.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("seek {path}: {e}"))?;
    disk.read_exact(buf)
        .map_err(|e| format!("read {path} at {offset}: {e}"))?;
    match super::blk::first_mismatch(seed, offset, buf) {
        None => Ok(()),
        Some(bad) => Err(format!("{path}: byte {bad} does not hold its pattern")),
    }
}

/// Runs `scenarios` on `bench`: before each, `prepare`; after each, `after` (canaries,
/// bystander). Prints one line per scenario and returns (passed, failed).
pub fn run_all<B>(
    guest: &Guest,
    bench: &mut B,
    scenarios: &[Scenario<B>],
    only: Option<&str>,
    prepare: fn(&mut B) -> Result<(), String>,
    after: fn(&mut B, usize) -> Result<(), String>,
) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for (n, (name, run)) in scenarios.iter().enumerate() {
        if only.is_some_and(|o| !o.split(',').any(|x| x == *name)) {
            continue;
        }
        let result = prepare(bench)
            .and_then(|()| run(bench))
            .and_then(|()| after(bench, n));
        match result {
            Ok(()) => {
                passed += 1;
                guest.console.say(&format!("{SAY_PASS}{name}"));
            }
            Err(reason) => {
                failed += 1;
                guest.console.say(&format!("{SAY_FAIL}{name}: {reason}"));
            }
        }
    }
    (passed, failed)
}

/// `hostile-blk`: transport, queue and virtio-blk scenarios.
pub fn run_blk(guest: &Guest) -> Result<Ending, GuestError> {
    mount_sysfs()?;
    let mut bench = blk::BlkBench::open(&guest.cmdline).map_err(GuestError::Check)?;
    let only = guest.param("mvm.hostile");
    let mut all: Vec<Scenario<blk::BlkBench>> = transport::SCENARIOS.to_vec();
    all.extend_from_slice(blk::SCENARIOS);
    let (passed, failed) = run_all(
        guest,
        &mut bench,
        &all,
        only,
        blk::BlkBench::prepare,
        blk::BlkBench::after,
    );
    finish(guest, bench.recover(), passed, failed)
}

/// The last lines of a hostile mode: whether the attacked device came back under its
/// driver, then the tally.
fn finish(
    guest: &Guest,
    recovered: Result<String, String>,
    passed: usize,
    failed: usize,
) -> Result<Ending, GuestError> {
    match recovered {
        Ok(line) => guest.console.say(&format!("{SAY_RECOVERED}{line}")),
        Err(e) => guest.console.say(&format!("hostile recovery failed: {e}")),
    }
    guest
        .console
        .say(&format!("{SAY_DONE}{passed} passed, {failed} failed"));
    Ok(Ending::PowerOff)
}

/// `hostile-vsock`: virtio-vsock scenarios.
pub fn run_vsock(guest: &Guest) -> Result<Ending, GuestError> {
    mount_sysfs()?;
    let mut bench = vsock::VsockBench::open(&guest.cmdline).map_err(GuestError::Check)?;
    let only = guest.param("mvm.hostile");
    let (passed, failed) = run_all(
        guest,
        &mut bench,
        vsock::SCENARIOS,
        only,
        vsock::VsockBench::prepare,
        vsock::VsockBench::after,
    );
    finish(guest, bench.recover(), passed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_lookup_by_id() {
        let found = vec![Found {
            platform: "virtio-mmio.1".into(),
            base: 0xd000_1000,
            device_type: 2,
            disk: Some(("vdb".into(), RO_ID.into())),
        }];
        assert_eq!(disk_by_id(&found, RO_ID).unwrap().platform, "virtio-mmio.1");
        assert!(disk_by_id(&found, RW_ID).is_err());
    }

    #[test]
    fn ram_end_is_past_the_highest_top_level_ram_range() {
        let iomem = "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n\
                     00100000-07ffffff : System RAM\n  01000000-01ffffff : Kernel code\n\
                     d0000000-d0000fff : virtio-mmio.0\n";
        assert_eq!(ram_end_of(iomem), Some(0x0800_0000));
        assert_eq!(ram_end_of("d0000000-d0000fff : virtio-mmio.0\n"), None);
    }
}
