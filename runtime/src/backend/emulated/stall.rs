//! Watching the test host for QEMU's stall. QEMU 7.2's TCG now and then stops for
//! good: the test host's only CPU halted with an interrupt pending that it never
//! takes, QEMU's vCPU thread asleep, no CPU time, no console output, and an NMI
//! injected from outside not taken either (`docs/e2e.md` has what was measured).
//! Nothing wakes it, so a run would wait forever. The test host's `idle=poll`
//! ([`super::qemu::TESTHOST_CMDLINE`]) keeps its CPU from halting, which has kept that
//! stall away since; this watch stays for a QEMU that stops for any other reason.
//!
//! A test host that is merely idle (a workload that sleeps) still costs QEMU CPU
//! time every few seconds: the timer ticks of the test host and of the VM inside it
//! are emulated. So no CPU time at all and no console output for [`DEFAULT_LIMIT`]
//! is read as the stall. The run then kills QEMU; before the workload started it
//! boots a fresh test host (`host::run`), after, it fails with a clear error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable that sets the limit in seconds (`0` turns the watch off).
pub const ENV: &str = "MVM_TESTHOST_STALL_SECS";
/// How long QEMU may use no CPU time and write nothing before it counts as stalled.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(60);
/// How often QEMU's CPU time is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The limit this process uses: [`ENV`] when set to a number, else [`DEFAULT_LIMIT`];
/// `None` when turned off.
pub fn limit_from_env() -> Option<Duration> {
    match std::env::var(ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => Some(DEFAULT_LIMIT),
    }
}

/// What the watch has seen of one QEMU process.
pub struct StallWatch {
    pid: u32,
    console: PathBuf,
    limit: Duration,
    sampled: Option<Instant>,
    cpu_ticks: Option<u64>,
    console_len: u64,
    moved: Instant,
}

impl StallWatch {
    /// Watches QEMU `pid`, whose serial console is written to `console`.
    pub fn new(pid: u32, console: &Path, limit: Duration) -> Self {
        Self {
            pid,
            console: console.to_owned(),
            limit,
            sampled: None,
            cpu_ticks: None,
            console_len: 0,
            moved: Instant::now(),
        }
    }

    /// Samples QEMU (at most every [`SAMPLE_EVERY`]) and returns how long it has been
    /// still once that is past the limit. A process that cannot be read (gone) is not
    /// a stall: its exit is seen elsewhere.
    pub fn stalled(&mut self, now: Instant) -> Option<Duration> {
        if self
            .sampled
            .is_some_and(|at| now.saturating_duration_since(at) < SAMPLE_EVERY)
        {
            return self.over(now);
        }
        self.sampled = Some(now);
        let ticks = cpu_ticks(self.pid)?;
        let console_len = std::fs::metadata(&self.console).map_or(0, |m| m.len());
        if self.cpu_ticks != Some(ticks) || console_len != self.console_len {
            self.cpu_ticks = Some(ticks);
            self.console_len = console_len;
            self.moved = now;
        }
        self.over(now)
    }

    fn over(&self, now: Instant) -> Option<Duration> {
        let still = now.saturating_duration_since(self.moved);
        (still >= self.limit).then_some(still)
    }
}

/// The CPU time (user plus system, in clock ticks) process `pid` has used, all its
/// threads counted.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_of_stat(&text)
}

/// `utime + stime` of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces or parentheses, so fields are counted after the
/// last `)`: the state is field 3, `utime` 14 and `stime` 15.
fn ticks_of_stat(text: &str) -> Option<u64> {
    let rest = text.get(text.rfind(')')?.checked_add(1)?..)?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_counted_after_the_command_name() {
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 27 0 0 20 0 3 0 900 1 2 3\n";
        assert_eq!(ticks_of_stat(line), Some(177));
        assert_eq!(ticks_of_stat("4242 (qemu) S 1"), None);
        assert_eq!(ticks_of_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_cpu_time() {
        let mut n = 0u64;
        for i in 0..2_000_000u64 {
            n = n.wrapping_add(i.wrapping_mul(i));
        }
        assert!(n > 0);
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[test]
    fn a_stopped_process_is_stalled_after_the_limit_and_a_busy_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let limit = Duration::from_secs(4);
        let mut watch = StallWatch::new(child.id(), &console, limit);
        let t0 = Instant::now();
        assert_eq!(watch.stalled(t0), None);
        // Console output counts as life.
        std::fs::write(&console, "booting\n").unwrap();
        assert_eq!(watch.stalled(t0 + Duration::from_secs(3)), None);
        assert_eq!(watch.stalled(t0 + Duration::from_secs(6)), None);
        let still = watch.stalled(t0 + Duration::from_secs(8)).unwrap();
        assert!(still >= limit, "{still:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        // Gone is not stalled (its exit is seen elsewhere).
        let mut gone = StallWatch::new(child.id(), &console, limit);
        assert_eq!(gone.stalled(t0 + Duration::from_secs(60)), None);
        // This process burns CPU between samples: never stalled.
        let mut busy = StallWatch::new(std::process::id(), &console, Duration::from_millis(1));
        let start = Instant::now();
        assert_eq!(busy.stalled(start), None);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {}
        let later = start + Duration::from_secs(3);
        assert_eq!(busy.stalled(later), None);
    }
}
