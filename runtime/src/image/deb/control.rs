//! The control tarball: plain-named regular files read into memory under
//! [`Limits::max_control_bytes`], and the `control` file parsed as one deb822
//! stanza.

use std::collections::{BTreeMap, BTreeSet};

use super::tarball::{self, Budget, Kind};
use super::{display_bytes, Compression, ControlInfo, DebError, EntryProblem, Limits};

/// The most headers read from one control tarball (real ones hold a handful
/// of members), whatever [`Limits::max_entries`] allows.
const MAX_CONTROL_ENTRIES: u64 = 1024;

/// Reads the control tarball `data` (ar member `member`) into a
/// [`ControlInfo`].
pub(super) fn read_control(
    member: &str,
    data: &[u8],
    compression: Compression,
    limits: &Limits,
) -> Result<ControlInfo, DebError> {
    let reader =
        tarball::decoder(compression, data, limits).map_err(|source| DebError::Stream {
            context: member.to_owned(),
            after: "the start".to_owned(),
            source,
        })?;
    let mut budget = Budget::new(
        limits.max_entries.min(MAX_CONTROL_ENTRIES),
        limits.max_control_bytes,
        limits.max_control_bytes,
    );
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    tarball::walk(reader, &mut budget, member, |entry, contents| {
        let refuse = |problem| DebError::Entry {
            package: member.to_owned(),
            path: display_bytes(&entry.path),
            problem,
        };
        let Some(name) = member_name(&entry.path, entry.kind).map_err(refuse)? else {
            return Ok(());
        };
        if entry.kind != Kind::File {
            return Err(refuse(EntryProblem::UnsupportedType(format!(
                "{} (control members must be regular files)",
                entry.kind.name()
            ))));
        }
        if files.contains_key(name) {
            return Err(refuse(EntryProblem::Duplicate {
                existing: "a control member",
                first_package: member.to_owned(),
            }));
        }
        let bytes = tarball::read_exact(contents, entry.size).map_err(refuse)?;
        files.insert(name.to_owned(), bytes);
        Ok(())
    })?;

    let control = files.remove("control").ok_or_else(|| DebError::Control {
        member: member.to_owned(),
        reason: "no control file".to_owned(),
    })?;
    let fields = parse_control(&control).map_err(|reason| DebError::Control {
        member: format!("{member}: control"),
        reason,
    })?;
    Ok(ControlInfo { fields, files })
}

/// The plain name of a control member, `None` for the archive root (`./`).
fn member_name(path: &[u8], kind: Kind) -> Result<Option<&str>, EntryProblem> {
    let name = path.strip_prefix(b"./").unwrap_or(path);
    if name.is_empty() || name == b"." {
        return if kind == Kind::Dir {
            Ok(None)
        } else {
            Err(EntryProblem::BadPath("the archive root is not a directory"))
        };
    }
    if name.contains(&b'/') {
        return Err(EntryProblem::BadPath(
            "control members must be plain names (no '/')",
        ));
    }
    if name == b".." || name.contains(&0) {
        return Err(EntryProblem::BadPath("not a file name"));
    }
    std::str::from_utf8(name)
        .map(Some)
        .map_err(|_| EntryProblem::BadPath("not UTF-8"))
}

/// Parses a `control` file: one deb822 stanza of `Name: value` lines, where
/// lines starting with a space or tab continue the previous field (kept,
/// joined by `\n`, trailing blanks trimmed). Names are unique
/// case-insensitively; `Package` is required.
pub fn parse_control(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut stanza_ended = false;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            stanza_ended = !fields.is_empty();
            continue;
        }
        if stanza_ended {
            return Err(format!("line {number}: more than one stanza"));
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            let value = current
                .as_ref()
                .and_then(|name| fields.get_mut(name))
                .ok_or_else(|| format!("line {number}: continuation line before any field"))?;
            value.push('\n');
            value.push_str(line.trim_end());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {number}: not a \"Name: value\" field"))?;
        if !valid_field_name(name) {
            return Err(format!("line {number}: bad field name {name:?}"));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(format!("line {number}: field {name} given twice"));
        }
        fields.insert(name.to_owned(), value.trim().to_owned());
        current = Some(name.to_owned());
    }
    let has_package = fields
        .keys()
        .any(|name| name.eq_ignore_ascii_case("Package"));
    if !has_package {
        return Err("no Package field".to_owned());
    }
    Ok(fields)
}

/// A deb822 field name: printable ASCII without ':' or spaces, not starting
/// with '-' or '#'.
fn valid_field_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.starts_with('#')
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_stanza_with_continuations() {
        let text = b"\nPackage: hello\nVersion: 2.10-3\nArchitecture: amd64\n\
Description: example package\n greets the world\n .\n\tindented\n\n";
        let fields = parse_control(text).unwrap();
        assert_eq!(fields["Package"], "hello");
        assert_eq!(fields["Version"], "2.10-3");
        assert_eq!(
            fields["Description"],
            "example package\n greets the world\n .\n\tindented"
        );
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn refuses_bad_control_files() {
        let cases: [&[u8]; 7] = [
            b"Package: a\n\nPackage: b\n",
            b" leading continuation\nPackage: a\n",
            b"Package: a\npackage: b\n",
            b"Package a\n",
            b"Version: 1\n",
            b"Package: a\n-Bad: x\n",
            b"Package: \xff\n",
        ];
        for case in cases {
            assert!(parse_control(case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn member_names() {
        assert_eq!(member_name(b"./", Kind::Dir).unwrap(), None);
        assert_eq!(member_name(b".", Kind::Dir).unwrap(), None);
        assert_eq!(
            member_name(b"./md5sums", Kind::File).unwrap(),
            Some("md5sums")
        );
        assert_eq!(
            member_name(b"postinst", Kind::File).unwrap(),
            Some("postinst")
        );
        assert!(member_name(b"./", Kind::File).is_err());
        assert!(member_name(b"./a/b", Kind::File).is_err());
        assert!(member_name(b"../x", Kind::File).is_err());
        assert!(member_name(b"/etc/passwd", Kind::File).is_err());
        assert!(member_name(b"..", Kind::File).is_err());
    }
}
