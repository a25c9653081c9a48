//! The ar container of a `.deb`: `!<arch>\n`, then members, each a 60-byte
//! header (name, mtime, uid, gid, mode, decimal size, "`\n") followed by its
//! data and, when the size is odd, one `\n` of padding.
//!
//! Only what a `.deb` needs is accepted: plain member names (a GNU `/`
//! terminator is tolerated), no symbol or long-name tables, no BSD `#1/`
//! names. Every size is checked against the bytes present.

use super::DebError;

/// The ar global header.
pub(super) const MAGIC: &[u8; 8] = b"!<arch>\n";
/// The size of a member header.
const HEADER_LEN: usize = 60;
/// The end of every member header.
const HEADER_END: &[u8; 2] = b"`\n";

/// One member: its name and its data, borrowed from the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct Member<'a> {
    /// The name, without padding or GNU `/` terminator (printable ASCII).
    pub name: &'a str,
    /// The member's data.
    pub data: &'a [u8],
}

/// Iterates over the members of an ar archive held in memory. After the first
/// error it yields nothing more.
#[derive(Debug)]
pub(super) struct ArReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ArReader<'a> {
    /// Checks the magic and starts at the first member.
    pub(super) fn new(bytes: &'a [u8]) -> Result<Self, DebError> {
        if !bytes.starts_with(MAGIC) {
            return Err(DebError::NotAr);
        }
        Ok(Self {
            bytes,
            pos: MAGIC.len(),
        })
    }

    /// Parses the member at `self.pos` and moves past it (and its padding).
    fn member(&mut self) -> Result<Member<'a>, DebError> {
        let offset = self.pos;
        let header = offset
            .checked_add(HEADER_LEN)
            .and_then(|end| self.bytes.get(offset..end))
            .ok_or(DebError::ArHeader {
                offset,
                reason: "truncated member header",
            })?;
        let field = |start: usize, len: usize| header.get(start..start + len).unwrap_or_default();
        if field(58, 2) != HEADER_END {
            return Err(DebError::ArHeader {
                offset,
                reason: "bad header terminator (not \"`\\n\")",
            });
        }
        let name = parse_name(field(0, 16)).ok_or(DebError::ArHeader {
            offset,
            reason: "bad member name",
        })?;
        let size = parse_size(field(48, 10)).ok_or(DebError::ArHeader {
            offset,
            reason: "bad member size",
        })?;

        let start = offset + HEADER_LEN;
        let available = self.bytes.len().saturating_sub(start);
        let data = usize::try_from(size)
            .ok()
            .and_then(|len| start.checked_add(len))
            .and_then(|end| self.bytes.get(start..end))
            .ok_or_else(|| DebError::Truncated {
                member: name.to_owned(),
                offset,
                size,
                available,
            })?;
        let mut next = start + data.len();
        if size % 2 == 1 {
            match self.bytes.get(next) {
                Some(b'\n') => next += 1,
                // A missing pad byte at the very end is tolerated.
                None => {}
                Some(_) => {
                    return Err(DebError::ArHeader {
                        offset: next,
                        reason: "padding byte after an odd-sized member is not '\\n'",
                    })
                }
            }
        }
        self.pos = next;
        Ok(Member { name, data })
    }
}

impl<'a> Iterator for ArReader<'a> {
    type Item = Result<Member<'a>, DebError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let member = self.member();
        if member.is_err() {
            self.pos = self.bytes.len();
        }
        Some(member)
    }
}

/// A member name: printable ASCII padded with spaces, optionally ended by a
/// GNU `/`; `None` if empty or with other bytes (GNU `/` and `//` tables, BSD
/// `#1/` names and anything else unprintable are refused).
fn parse_name(field: &[u8]) -> Option<&str> {
    let end = field.iter().rposition(|b| *b != b' ')? + 1;
    let name = field.get(..end)?;
    let name = name.strip_suffix(b"/").unwrap_or(name);
    let printable = name.iter().all(|b| b.is_ascii_graphic() && *b != b'/');
    if name.is_empty() || !printable || name.starts_with(b"#1/") {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// A member size: decimal digits, then only spaces.
fn parse_size(field: &[u8]) -> Option<u64> {
    let digits = field.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, padding) = field.split_at_checked(digits)?;
    if number.is_empty() || padding.iter().any(|b| *b != b' ') {
        return None;
    }
    number.iter().try_fold(0u64, |acc, digit| {
        acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert_eq!(parse_name(b"debian-binary   "), Some("debian-binary"));
        assert_eq!(parse_name(b"debian-binary/  "), Some("debian-binary"));
        assert_eq!(parse_name(b"/               "), None);
        assert_eq!(parse_name(b"//              "), None);
        assert_eq!(parse_name(b"#1/20           "), None);
        assert_eq!(parse_name(b"a b             "), None);
        assert_eq!(parse_name(b"                "), None);
        assert_eq!(parse_size(b"4         "), Some(4));
        assert_eq!(parse_size(b"9999999999"), Some(9_999_999_999));
        assert_eq!(parse_size(b"          "), None);
        assert_eq!(parse_size(b" 4        "), None);
        assert_eq!(parse_size(b"4x        "), None);
        assert_eq!(parse_size(b"-4        "), None);
    }
}
