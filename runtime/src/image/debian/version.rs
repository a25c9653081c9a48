//! Debian version numbers: ordering (Debian policy 5.6.12) and version
//! relations (`<<`, `<=`, `=`, `>=`, `>>`).
//!
//! A version is `[epoch:]upstream_version[-debian_revision]`. The epoch is a
//! number (absent means 0); the revision is everything after the last `-`
//! (absent compares like `0`). Upstream and revision compare with the same
//! algorithm: alternately a run of non-digits, compared character by
//! character where `~` sorts before everything (even the end of the string)
//! and letters sort before all other characters, then a run of digits,
//! compared numerically.
//!
//! [`compare_versions`] never fails: a malformed version (which
//! [`super::parse_packages`] would not produce from a real archive) is still
//! ordered, deterministically, by the same rules.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A version relation of a dependency, e.g. the `>=` in `libc6 (>= 2.36)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Relation {
    /// `<<`: strictly earlier.
    Lt,
    /// `<=`: earlier or equal.
    Le,
    /// `=`: exactly equal.
    Eq,
    /// `>=`: later or equal.
    Ge,
    /// `>>`: strictly later.
    Gt,
}

impl Relation {
    /// Parses a relation operator. The obsolete `<` and `>` mean `<=` and
    /// `>=`, as dpkg reads them.
    pub fn parse(op: &str) -> Option<Self> {
        match op {
            "<<" => Some(Self::Lt),
            "<=" | "<" => Some(Self::Le),
            "=" => Some(Self::Eq),
            ">=" | ">" => Some(Self::Ge),
            ">>" => Some(Self::Gt),
            _ => None,
        }
    }

    /// The operator as Debian control files write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lt => "<<",
            Self::Le => "<=",
            Self::Eq => "=",
            Self::Ge => ">=",
            Self::Gt => ">>",
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Orders two Debian versions (Debian policy 5.6.12).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (epoch_a, upstream_a, revision_a) = split_version(a);
    let (epoch_b, upstream_b, revision_b) = split_version(b);
    compare_numbers(epoch_a.as_bytes(), epoch_b.as_bytes())
        .then_with(|| compare_part(upstream_a.as_bytes(), upstream_b.as_bytes()))
        .then_with(|| compare_part(revision_a.as_bytes(), revision_b.as_bytes()))
}

/// Whether `version` stands in `relation` to `wanted`, e.g.
/// `satisfies("2.36-9", Relation::Ge, "2.34")`.
pub fn satisfies(version: &str, relation: Relation, wanted: &str) -> bool {
    let ordering = compare_versions(version, wanted);
    match relation {
        Relation::Lt => ordering == Ordering::Less,
        Relation::Le => ordering != Ordering::Greater,
        Relation::Eq => ordering == Ordering::Equal,
        Relation::Ge => ordering != Ordering::Less,
        Relation::Gt => ordering == Ordering::Greater,
    }
}

/// Splits a version into epoch (digits, `""` meaning 0), upstream version and
/// revision (`""` when absent). A prefix before `:` that is not all digits is
/// not an epoch; it stays part of the upstream version.
fn split_version(version: &str) -> (&str, &str, &str) {
    let version = version.trim();
    let (epoch, rest) = match version.split_once(':') {
        Some((epoch, rest)) if !epoch.is_empty() && epoch.bytes().all(|c| c.is_ascii_digit()) => {
            (epoch, rest)
        }
        _ => ("", version),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// Compares an upstream version or a revision, alternating non-digit and
/// digit runs.
fn compare_part(mut a: &[u8], mut b: &[u8]) -> Ordering {
    while !a.is_empty() || !b.is_empty() {
        let (text_a, rest_a) = split_run(a, |c| !c.is_ascii_digit());
        let (text_b, rest_b) = split_run(b, |c| !c.is_ascii_digit());
        let ordering = compare_text(text_a, text_b);
        if ordering != Ordering::Equal {
            return ordering;
        }
        let (digits_a, rest_a) = split_run(rest_a, |c| c.is_ascii_digit());
        let (digits_b, rest_b) = split_run(rest_b, |c| c.is_ascii_digit());
        let ordering = compare_numbers(digits_a, digits_b);
        if ordering != Ordering::Equal {
            return ordering;
        }
        a = rest_a;
        b = rest_b;
    }
    Ordering::Equal
}

/// Splits off the longest prefix whose bytes all satisfy `keep`.
fn split_run(s: &[u8], keep: impl Fn(u8) -> bool) -> (&[u8], &[u8]) {
    let end = s.iter().position(|&c| !keep(c)).unwrap_or(s.len());
    s.split_at_checked(end).unwrap_or((s, &[]))
}

/// Compares two non-digit runs character by character by [`char_weight`];
/// the end of a run weighs like a digit would (0).
fn compare_text(a: &[u8], b: &[u8]) -> Ordering {
    let len = a.len().max(b.len());
    (0..len)
        .map(|i| char_weight(a.get(i).copied()).cmp(&char_weight(b.get(i).copied())))
        .find(|ordering| *ordering != Ordering::Equal)
        .unwrap_or(Ordering::Equal)
}

/// The sort weight of one character of a non-digit run: `~` before the end
/// of the run, the end before letters, letters before everything else.
fn char_weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Compares two runs of ASCII digits numerically, without overflow: leading
/// zeros are ignored, then the longer number is the larger. An empty run is 0.
fn compare_numbers(a: &[u8], b: &[u8]) -> Ordering {
    let a = strip_leading_zeros(a);
    let b = strip_leading_zeros(b);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// `digits` without its leading `0`s.
fn strip_leading_zeros(digits: &[u8]) -> &[u8] {
    let start = digits
        .iter()
        .position(|&c| c != b'0')
        .unwrap_or(digits.len());
    digits
        .split_at_checked(start)
        .map_or(digits, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_less(a: &str, b: &str) {
        assert_eq!(compare_versions(a, b), Ordering::Less, "{a} < {b}");
        assert_eq!(compare_versions(b, a), Ordering::Greater, "{b} > {a}");
    }

    fn assert_equal(a: &str, b: &str) {
        assert_eq!(compare_versions(a, b), Ordering::Equal, "{a} = {b}");
        assert_eq!(compare_versions(b, a), Ordering::Equal, "{b} = {a}");
    }

    #[test]
    fn tilde_sorts_before_everything() {
        assert_less("1.0~rc1", "1.0");
        assert_less("1.0~~", "1.0~");
        assert_less("1.0~~a", "1.0~");
        assert_less("1.0~rc1", "1.0~rc2");
        assert_less("1.0~", "1.0a");
        assert_less("2.36-9~bpo11+1", "2.36-9");
    }

    #[test]
    fn epoch_dominates() {
        assert_less("2.0", "1:0.1");
        assert_less("1:9.9", "2:0");
        assert_equal("0:1.0", "1.0");
        assert_less("9:1", "10:0");
    }

    #[test]
    fn digit_runs_compare_numerically() {
        assert_less("2.36-9+deb12u4", "2.36-9+deb12u10");
        assert_less("1.9", "1.10");
        assert_equal("1.01", "1.1");
        assert_equal("1.000", "1.0");
        assert_less("1.2.3", "1.2.10");
        assert_less("99999999999999999999999", "100000000000000000000000");
    }

    #[test]
    fn letters_sort_before_non_letters() {
        assert_less("1.0a", "1.0+");
        assert_less("1.0a", "1.0.");
        assert_less("1.0", "1.0a");
        assert_less("1.0Z", "1.0a");
        assert_less("1.0+", "1.0.");
        assert_less("1.0", "1.0+b1");
    }

    #[test]
    fn revision_is_after_the_last_hyphen() {
        assert_less("1.0-1", "1.0-2");
        assert_less("1.0-2", "1.0-10");
        assert_less("1.0-rc-1", "1.0-rc-2");
        assert_equal("1.0", "1.0-0");
        assert_less("1.0", "1.0-1");
        assert_less("1.0-1", "1.0.1-1");
        assert_less("5.2.15-2", "5.2.15-2+b7");
    }

    #[test]
    fn real_archive_versions() {
        assert_less("252.30-1~deb12u2", "252.33-1~deb12u1");
        assert_less("1:2.38.1-5+deb12u2", "1:2.38.1-5+deb12u3");
        assert_less("3.0.11-1~deb12u2", "3.0.15-1~deb12u1");
        assert_less("6.1.0-9", "6.1.0-10");
        assert_equal("1.2.3-4", "1.2.3-4");
        assert_equal("00:1.0", "1.0");
    }

    #[test]
    fn version_splitting() {
        assert_eq!(split_version("1:2.3-4"), ("1", "2.3", "4"));
        assert_eq!(split_version("2.3"), ("", "2.3", ""));
        assert_eq!(split_version("a:b-c-d"), ("", "a:b-c", "d"));
        assert_eq!(split_version("1:2:3"), ("1", "2:3", ""));
    }

    #[test]
    fn relations() {
        assert!(satisfies("2.36-9", Relation::Ge, "2.34"));
        assert!(satisfies("2.34", Relation::Ge, "2.34"));
        assert!(!satisfies("2.33", Relation::Ge, "2.34"));
        assert!(satisfies("2.33", Relation::Lt, "2.34"));
        assert!(!satisfies("2.34", Relation::Lt, "2.34"));
        assert!(satisfies("2.34", Relation::Le, "2.34"));
        assert!(satisfies("2.34-0", Relation::Eq, "2.34"));
        assert!(!satisfies("2.34-1", Relation::Eq, "2.34"));
        assert!(satisfies("2.35", Relation::Gt, "2.34"));
        assert!(!satisfies("2.34", Relation::Gt, "2.34"));
        assert!(satisfies("1.0~rc1", Relation::Lt, "1.0"));
    }

    #[test]
    fn relation_operators() {
        for op in ["<<", "<=", "=", ">=", ">>"] {
            assert_eq!(Relation::parse(op).map(Relation::as_str), Some(op));
        }
        assert_eq!(Relation::parse("<"), Some(Relation::Le));
        assert_eq!(Relation::parse(">"), Some(Relation::Ge));
        assert_eq!(Relation::parse("=>"), None);
        assert_eq!(Relation::parse(""), None);
        assert_eq!(Relation::Ge.to_string(), ">=");
    }
}
