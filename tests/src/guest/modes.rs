//! The modes of `mvm-test-init`, one table. To add a mode: write a
//! `fn(&Guest) -> Result<Ending, GuestError>` (in its own module for a new
//! area, e.g. `guest/blk.rs`) and add a row to [`MODES`].

use super::{Ending, Guest, GuestError};

/// One mode: its name on the command line and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// The value of `mvm.test=`.
    pub name: &'static str,
    /// Runs the mode; the returned ending is what the init does next.
    pub run: fn(&Guest) -> Result<Ending, GuestError>,
}

impl Mode {
    /// A mode called `name` that runs `run`.
    pub const fn new(name: &'static str, run: fn(&Guest) -> Result<Ending, GuestError>) -> Self {
        Self { name, run }
    }
}

/// Every mode, in one list.
pub const MODES: &[Mode] = &[
    Mode::new("marker", marker),
    Mode::new("nproc", nproc),
    Mode::new("poweroff", poweroff),
    Mode::new("reboot", reboot),
    Mode::new("dmesg", dmesg),
    Mode::new("panic", panic),
    Mode::new("hang", hang),
    Mode::new("vsock", super::vsock::run),
    Mode::new("blk-root", super::blk::root),
    Mode::new("blk-reread", super::blk::reread),
    Mode::new("blk-write", super::blk::write),
    Mode::new("blk-parallel", super::blk::parallel),
    Mode::new("hostile-blk", super::hostile::run_blk),
    Mode::new("hostile-vsock", super::hostile::run_vsock),
    Mode::new("snapshot", super::snapshot::run),
];

/// The mode called `name`, or an error listing the known ones.
pub fn find(name: &str) -> Result<&'static Mode, GuestError> {
    MODES.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = MODES.iter().map(|m| m.name).collect();
        GuestError::UnknownMode(name.to_owned(), known.join(", "))
    })
}

/// The line `nproc` prints: `cpus=<N>`.
pub fn cpus_line(n: usize) -> String {
    format!("cpus={n}")
}

/// Only the marker (printed by the init for every mode), then poweroff.
fn marker(_: &Guest) -> Result<Ending, GuestError> {
    Ok(Ending::PowerOff)
}

/// Prints how many CPUs the guest kernel brought up (`processor` lines in
/// /proc/cpuinfo), then powers off.
fn nproc(guest: &Guest) -> Result<Ending, GuestError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|source| GuestError::Sys {
        what: "read /proc/cpuinfo".into(),
        source,
    })?;
    guest.console.say(&cpus_line(count_processors(&cpuinfo)));
    Ok(Ending::PowerOff)
}

/// Counts the `processor : N` stanzas of /proc/cpuinfo.
pub fn count_processors(cpuinfo: &str) -> usize {
    cpuinfo
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim_end() == "processor")
        })
        .count()
}

fn poweroff(guest: &Guest) -> Result<Ending, GuestError> {
    guest.console.say("powering off");
    Ok(Ending::PowerOff)
}

fn reboot(guest: &Guest) -> Result<Ending, GuestError> {
    guest.console.say("rebooting");
    Ok(Ending::Reboot)
}

/// Prints the kernel's log (each record `[seconds] text`, the guest's own clock), then
/// reboots: `bench/boot`'s trace, where the boot itself ran `quiet` and unslowed by the
/// serial port.
fn dmesg(guest: &Guest) -> Result<Ending, GuestError> {
    // The guest's clock now, on the log's own scale, as the log's last line.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(|e| {
        GuestError::Sys {
            what: "clock_gettime".into(),
            source: e.into(),
        }
    })?;
    let mut log = kernel_log()?;
    log.push(format!(
        "[{:5}.{:06}] mvm-test-init: mode dmesg started",
        now.tv_sec(),
        now.tv_nsec() / 1000
    ));
    for line in log {
        guest.console.line(&line);
    }
    guest.console.say("rebooting");
    Ok(Ending::Reboot)
}

/// The records in `/dev/kmsg` so far, as `[seconds] text` lines.
fn kernel_log() -> Result<Vec<String>, GuestError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|source| GuestError::Sys {
            what: "open /dev/kmsg".into(),
            source,
        })?;
    let mut lines = Vec::new();
    let mut record = vec![0u8; 8192];
    // One record per read; EAGAIN ends the log, EPIPE is a record overwritten meanwhile.
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => lines.extend(record.get(..n).and_then(kmsg_line)),
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(source) => {
                return Err(GuestError::Sys {
                    what: "read /dev/kmsg".into(),
                    source,
                })
            }
        }
    }
    Ok(lines)
}

/// One `/dev/kmsg` record (`prio,seq,usecs,flags;text\n...`) as `[seconds] text`.
fn kmsg_line(record: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(record);
    let (head, body) = text.split_once(';')?;
    let usecs: u64 = head.split(',').nth(2)?.parse().ok()?;
    let body = body.lines().next().unwrap_or_default();
    Some(format!(
        "[{:5}.{:06}] {body}",
        usecs / 1_000_000,
        usecs % 1_000_000
    ))
}

fn panic(guest: &Guest) -> Result<Ending, GuestError> {
    guest.console.say("exiting PID 1 to panic the kernel");
    Ok(Ending::Panic)
}

fn hang(guest: &Guest) -> Result<Ending, GuestError> {
    guest.console.say("hanging");
    Ok(Ending::Hang)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kmsg_record_becomes_a_timed_line() {
        assert_eq!(
            kmsg_line(b"6,12,1250003,-;Run /init as init process\n SUBSYSTEM=x\n").as_deref(),
            Some("[    1.250003] Run /init as init process")
        );
        assert_eq!(
            kmsg_line(b"4,0,0,-;Linux version\n").as_deref(),
            Some("[    0.000000] Linux version")
        );
        assert_eq!(kmsg_line(b"no header at all"), None);
        assert_eq!(kmsg_line(b"6,12,soon,-;text"), None);
    }

    #[test]
    fn names_are_unique_and_findable() {
        for (i, m) in MODES.iter().enumerate() {
            assert!(
                MODES.iter().skip(i + 1).all(|o| o.name != m.name),
                "{}",
                m.name
            );
            assert_eq!(find(m.name).unwrap().name, m.name);
        }
        let e = find("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("marker"), "{e}");
    }

    #[test]
    fn counts_processors() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\nprocessor\t: 1\nmodel name : x\n";
        assert_eq!(count_processors(info), 2);
        assert_eq!(count_processors(""), 0);
    }
}
