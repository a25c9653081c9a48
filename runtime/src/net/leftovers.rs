//! Clean-up of what a dead run left behind: taps named `mvm<pid>-<n>` and nftables tables
//! `mvm-<tap>` whose owner process (`<pid>`, the `mvm` that created them) no longer
//! exists, after a `kill -9` of `mvm` (its VMM dies with it, by `PR_SET_PDEATHSIG`).
//!
//! [`tap_name`] and [`owner_of_tap`] define the marker; [`stale`] decides from plain
//! lists and a liveness test, so the decision is unit-tested with fake inputs. A reused
//! pid only delays the clean-up until that process ends: nothing live is ever removed.

use super::nft::TABLE_PREFIX;

/// The prefix of every tap mvm creates.
pub const TAP_PREFIX: &str = "mvm";
/// Taps one process may create (keeps the name within 15 bytes).
pub const MAX_TAPS_PER_PROCESS: u32 = 9999;

/// The tap name for the `n`th tap of process `pid`: `mvm<pid>-<n>`, at most 15 bytes
/// (pids are at most 7 digits on Linux), or `None` when `n` is too large.
#[must_use]
pub fn tap_name(pid: u32, n: u32) -> Option<String> {
    let name = format!("{TAP_PREFIX}{pid}-{n}");
    (n <= MAX_TAPS_PER_PROCESS && name.len() <= 15).then_some(name)
}

/// The owner pid of a tap named by [`tap_name`]; `None` for any other name.
#[must_use]
pub fn owner_of_tap(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TAP_PREFIX)?;
    let (pid, n) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || pid.starts_with('0') {
        return None;
    }
    pid.parse().ok()
}

/// The owner pid of a table named after a tap.
#[must_use]
pub fn owner_of_table(name: &str) -> Option<u32> {
    owner_of_tap(name.strip_prefix(TABLE_PREFIX)?)
}

/// What to remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stale {
    /// Taps to delete.
    pub taps: Vec<String>,
    /// nftables tables (family `ip`) to delete.
    pub tables: Vec<String>,
}

/// The taps among `interfaces` and the tables among `tables` whose owner is not alive.
pub fn stale(interfaces: &[String], tables: &[String], alive: impl Fn(u32) -> bool) -> Stale {
    let dead = |owner: Option<u32>| owner.is_some_and(|pid| !alive(pid));
    Stale {
        taps: interfaces
            .iter()
            .filter(|n| dead(owner_of_tap(n)))
            .cloned()
            .collect(),
        tables: tables
            .iter()
            .filter(|n| dead(owner_of_table(n)))
            .cloned()
            .collect(),
    }
}

/// Whether process `pid` exists (in this pid namespace).
#[must_use]
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_carry_their_owner() {
        assert_eq!(tap_name(1234, 0).as_deref(), Some("mvm1234-0"));
        assert_eq!(
            tap_name(4_194_304, 9999).as_deref(),
            Some("mvm4194304-9999")
        );
        assert_eq!(tap_name(1, 10_000), None);
        assert_eq!(owner_of_tap("mvm1234-0"), Some(1234));
        assert_eq!(owner_of_table("mvm-mvm1234-0"), Some(1234));
        for other in [
            "eth0",
            "mvm",
            "mvm-0",
            "mvm12",
            "mvm12-",
            "mvm012-1",
            "mvmx-1",
            "mvm1-1-1",
            "tap0",
            "mvm-eth0",
            "mvm99999999999-1",
        ] {
            assert_eq!(owner_of_tap(other), None, "{other}");
        }
        assert_eq!(owner_of_table("mvm1234-0"), None);
    }

    #[test]
    fn only_what_dead_owners_left_is_stale() {
        let interfaces: Vec<String> = ["lo", "eth0", "mvm10-0", "mvm11-0", "mvm10-1", "mvmx"]
            .map(String::from)
            .to_vec();
        let tables: Vec<String> = ["mvm-mvm10-0", "mvm-mvm12-3", "mvm-mvm11-0", "nat"]
            .map(String::from)
            .to_vec();
        let alive = |pid: u32| pid == 11;
        let s = stale(&interfaces, &tables, alive);
        assert_eq!(s.taps, ["mvm10-0", "mvm10-1"]);
        assert_eq!(s.tables, ["mvm-mvm10-0", "mvm-mvm12-3"]);
        assert_eq!(stale(&interfaces, &tables, |_| true), Stale::default());
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
    }
}
