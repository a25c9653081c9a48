//! Which cases a name pattern selects.
//!
//! A pattern is a comma-separated list of alternatives; a case runs when any
//! alternative matches its name. An alternative with `*` is a glob over the
//! whole name (`*` matches any run of characters, `/` included); one without
//! is a prefix (`boot` selects `boot/elf-1cpu` but not `verify/valid-boots`,
//! `boot/elf` selects `boot/elf-1cpu` and `boot/elf-2cpu`). The empty pattern
//! and `all` select every case.

/// Areas whose cases run only when a pattern names them: benchmarks, and the
/// runner's own self-tests (a case made to hang, to prove the time limit).
pub const EXPLICIT_ONLY: [&str; 2] = ["bench/", "selftest/"];

/// A parsed case-name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    alternatives: Vec<String>,
}

impl Pattern {
    /// Parses `text`; never fails: every string is a pattern.
    pub fn parse(text: &str) -> Self {
        let alternatives = text
            .split(',')
            .map(str::trim)
            .filter(|alt| !alt.is_empty() && *alt != "all")
            .map(str::to_owned)
            .collect();
        Self { alternatives }
    }

    /// Whether this is the empty (or `all`) pattern: every case but the explicit-only ones.
    pub fn is_all(&self) -> bool {
        self.alternatives.is_empty()
    }

    /// Whether the case called `name` is selected. Benchmarks (`bench/*`) and
    /// self-tests (`selftest/*`) run only when a pattern names them, never in the
    /// default (empty or `all`) run.
    pub fn matches(&self, name: &str) -> bool {
        if self.alternatives.is_empty() {
            return !EXPLICIT_ONLY.iter().any(|p| name.starts_with(p));
        }
        self.alternatives.iter().any(|alt| {
            if alt.contains('*') {
                glob_matches(alt.as_bytes(), name.as_bytes())
            } else {
                name.starts_with(alt.as_str())
            }
        })
    }
}

/// `*`-only glob, iterative with one backtrack point: linear in practice and
/// never recursive, so a long hostile pattern cannot blow the stack.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(c) if Some(c) == name.get(n) => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_all_select_everything() {
        assert!(Pattern::parse("").matches("boot/elf-1cpu"));
        assert!(Pattern::parse("all").matches("vsock/echo"));
    }

    #[test]
    fn benchmarks_run_only_when_named() {
        assert!(!Pattern::parse("").matches("bench/net-policy"));
        assert!(!Pattern::parse("all").matches("bench/net-policy"));
        assert!(Pattern::parse("bench").matches("bench/net-policy"));
        assert!(Pattern::parse("bench/net").matches("bench/net-allow-all"));
        assert!(!Pattern::parse("").matches("selftest/hang"));
        assert!(Pattern::parse("selftest").matches("selftest/hang"));
    }

    #[test]
    fn prefix_selects_an_area_and_only_it() {
        let p = Pattern::parse("boot");
        assert!(p.matches("boot/elf-1cpu"));
        assert!(!p.matches("vsock/echo"));
        assert!(!p.matches("verify/valid-boots-then-replay"));
        assert!(Pattern::parse("boot/elf").matches("boot/elf-2cpu"));
        assert!(Pattern::parse("boot/panic").matches("boot/panic"));
    }

    #[test]
    fn glob_is_anchored() {
        let p = Pattern::parse("boot/*cpu");
        assert!(p.matches("boot/elf-1cpu"));
        assert!(p.matches("boot/elf-2cpu"));
        assert!(!p.matches("boot/elf-2cpu-x"));
        assert!(!p.matches("xboot/elf-1cpu"));
        assert!(Pattern::parse("*").matches("anything/at-all"));
        assert!(Pattern::parse("b*t/*").matches("boot/report"));
    }

    #[test]
    fn alternatives_are_ored() {
        let p = Pattern::parse("boot/report,boot/bzimage");
        assert!(p.matches("boot/report"));
        assert!(p.matches("boot/bzimage"));
        assert!(!p.matches("boot/panic"));
    }

    #[test]
    fn many_stars_against_long_name_terminates() {
        let pattern = "*a".repeat(200);
        let name = "a".repeat(150);
        assert!(!Pattern::parse(&pattern).matches(&name));
    }
}
