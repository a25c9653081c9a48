//! The VMM's memory while its VM runs, read from outside (`/proc/PID/smaps` of the
//! process that runs the VM): its whole resident set, the part that is guest RAM, and
//! the difference, the VMM's own overhead (code, stacks, device buffers, its heap).
//!
//! Guest RAM is the VMM's large mappings: anonymous memory for a booted VM, the
//! snapshot's memory file mapped privately for a restored one. Nothing else in the VMM
//! maps 16 MiB or more (its binary is a few MiB; the kernel is read into guest RAM, not
//! mapped), so every mapping of at least that size is counted as guest RAM.

use serde::{Deserialize, Serialize};

/// The smallest mapping counted as guest RAM.
const GUEST_MAPPING_MIN_KIB: u64 = 16 << 10;

/// Resident memory of a VMM, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmMemory {
    /// The whole resident set.
    pub rss_kib: u64,
    /// Of which guest RAM (pages the guest, or the VMM on its behalf, touched).
    pub guest_rss_kib: u64,
    /// The rest: the VMM's own.
    pub overhead_kib: u64,
}

/// The process that runs the VM under `pid` (the VMM as started): its first child when
/// it is the jail's parent, else itself.
fn vm_process(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(pid)
}

/// Measures the VMM started as `pid`, now; `None` when its smaps cannot be read (it has
/// exited, or this user may not read it).
pub fn measure(pid: u32) -> Option<VmmMemory> {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm_process(pid))).ok()?;
    parse(&smaps)
}

/// Sums `smaps` text: every mapping's `Rss`, and those of mappings of at least
/// [`GUEST_MAPPING_MIN_KIB`] as guest RAM.
fn parse(smaps: &str) -> Option<VmmMemory> {
    let kib = |line: &str, key: &str| -> Option<u64> {
        line.strip_prefix(key)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let (mut rss, mut guest, mut size, mut mappings) = (0u64, 0u64, 0u64, 0u32);
    for line in smaps.lines() {
        if let Some(n) = kib(line, "Size:") {
            size = n;
            mappings += 1;
        } else if let Some(n) = kib(line, "Rss:") {
            rss += n;
            if size >= GUEST_MAPPING_MIN_KIB {
                guest += n;
            }
        }
    }
    (mappings > 0).then_some(VmmMemory {
        rss_kib: rss,
        guest_rss_kib: guest,
        overhead_kib: rss.saturating_sub(guest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_mappings_are_guest_ram_and_the_rest_is_overhead() {
        let smaps = "\
55d0c0000000-55d0c0400000 r-xp 00000000 fd:01 123 /usr/bin/mvm-vmm
Size:               4096 kB
Rss:                3000 kB
7f0000000000-7f0008200000 rw-p 00000000 00:00 0
Size:             133120 kB
Rss:               40960 kB
7f1000000000-7f1000021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                 100 kB
";
        assert_eq!(
            parse(smaps),
            Some(VmmMemory {
                rss_kib: 44060,
                guest_rss_kib: 40960,
                overhead_kib: 3100,
            })
        );
        assert_eq!(parse(""), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let me = measure(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.overhead_kib <= me.rss_kib);
    }
}
