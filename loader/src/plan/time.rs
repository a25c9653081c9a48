//! UTC timestamps as plans, receipts and the audit log write them:
//! RFC 3339 with a `Z` offset and whole seconds, `2026-11-28T23:49:40Z`.
//!
//! One spelling only, so a timestamp string compares equal exactly when the
//! instants do, and no time zone database is involved.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SECS_PER_DAY: i64 = 86_400;
/// Year 0000 to 9999 keeps every value four digits wide.
const MIN_UNIX: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
const MAX_UNIX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// An instant, in whole seconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcTime(i64);

/// Why a timestamp did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {0:?} is not of the form YYYY-MM-DDTHH:MM:SSZ (UTC, whole seconds)")]
pub struct TimeParseError(pub String);

impl UtcTime {
    /// The host clock now. A clock before 1970 reads as the epoch.
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self(i64::try_from(secs).unwrap_or(MAX_UNIX).min(MAX_UNIX))
    }

    /// From seconds since the epoch; `None` outside years 0000..=9999.
    pub fn from_unix(secs: i64) -> Option<Self> {
        (MIN_UNIX..=MAX_UNIX).contains(&secs).then_some(Self(secs))
    }

    /// Seconds since the epoch.
    pub const fn unix(self) -> i64 {
        self.0
    }

    /// `self + d`, or `None` past year 9999.
    pub fn checked_add(self, d: Duration) -> Option<Self> {
        let secs = i64::try_from(d.as_secs()).ok()?;
        Self::from_unix(self.0.checked_add(secs)?)
    }

    /// `self - d`, or `None` before year 0000.
    pub fn checked_sub(self, d: Duration) -> Option<Self> {
        let secs = i64::try_from(d.as_secs()).ok()?;
        Self::from_unix(self.0.checked_sub(secs)?)
    }

    /// `self + d`, clamped to the representable range.
    pub fn saturating_add(self, d: Duration) -> Self {
        self.checked_add(d).unwrap_or(Self(MAX_UNIX))
    }

    /// `self - d`, clamped to the representable range.
    pub fn saturating_sub(self, d: Duration) -> Self {
        self.checked_sub(d).unwrap_or(Self(MIN_UNIX))
    }

    /// Whole seconds from `earlier` to `self`; 0 if `earlier` is not earlier.
    pub fn seconds_since(self, earlier: Self) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Shift the year to start in March so the leap day is the year's last day.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01: (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(SECS_PER_DAY);
        let secs = self.0.rem_euclid(SECS_PER_DAY);
        let (y, mo, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        )
    }
}

impl fmt::Debug for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for UtcTime {
    type Err = TimeParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TimeParseError(s.chars().take(40).collect());
        let b = s.as_bytes();
        if b.len() != 20 {
            return Err(err());
        }
        let num = |from: usize, to: usize| -> Result<i64, TimeParseError> {
            let part = b.get(from..to).ok_or_else(err)?;
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(err());
            }
            Ok(part
                .iter()
                .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        };
        let sep = |at: usize, want: u8| b.get(at) == Some(&want);
        let separators = [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'Z'),
        ];
        if !separators.iter().all(|&(at, want)| sep(at, want)) {
            return Err(err());
        }
        let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
        let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return Err(err());
        }
        let secs =
            days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + minute * 60 + second;
        Self::from_unix(secs).ok_or_else(err)
    }
}

impl Serialize for UtcTime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcTime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_format_and_parse() {
        for (unix, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_798_502_980, "2026-12-29T00:09:40Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (MAX_UNIX, "9999-12-31T23:59:59Z"),
            (MIN_UNIX, "0000-01-01T00:00:00Z"),
        ] {
            let t = UtcTime::from_unix(unix).unwrap();
            assert_eq!(t.to_string(), text);
            assert_eq!(text.parse::<UtcTime>().unwrap(), t);
        }
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let start = "1900-01-01T00:00:00Z".parse::<UtcTime>().unwrap().unix();
        for day in 0..(400 * 366) {
            let t = UtcTime::from_unix(start + day * SECS_PER_DAY + 3661).unwrap();
            assert_eq!(t.to_string().parse::<UtcTime>().unwrap(), t);
        }
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for bad in [
            "",
            "2026-11-28T23:49:40",
            "2026-11-28T23:49:40+00:00",
            "2026-11-28 23:49:40Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T23:60:00Z",
            "2026-11-28T23:49:60Z",
            "2026-11-28T23:49:4.Z",
            "+026-11-28T23:49:40Z",
            "2026-11-28T23:49:40.5Z",
        ] {
            assert!(bad.parse::<UtcTime>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        let t = UtcTime::from_unix(MAX_UNIX).unwrap();
        assert!(t.checked_add(Duration::from_secs(1)).is_none());
        assert_eq!(t.saturating_add(Duration::from_secs(5)), t);
        let t0 = UtcTime::from_unix(0).unwrap();
        assert_eq!(t0.checked_add(Duration::from_secs(60)).unwrap().unix(), 60);
    }
}
