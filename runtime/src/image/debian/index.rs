//! Debian archive indexes: `Packages` stanzas, the `Release` payload, and the
//! `gpgv` check of `InRelease`.
//!
//! Both index formats are deb822: stanzas separated by blank lines, each a
//! list of `Field: value` lines, where a line starting with a space or tab
//! continues the previous field. Field names are case-insensitive.
//!
//! Trust flows one way: [`verify_inrelease`] runs `gpgv` against the keyrings
//! the caller names and returns only what `gpgv --output` wrote (the signed
//! payload); [`parse_release`] reads that payload; [`Release::check`] checks a
//! downloaded `Packages` file against the payload's SHA256 list; then
//! [`parse_packages`] reads it. Nothing here parses PGP armor.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::version::Relation;
use super::DebianError;

/// The keyring of the Debian archive signing keys, as the
/// `debian-archive-keyring` package installs it.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The only architecture (besides `all`) this module resolves for.
pub const ARCH: &str = "amd64";

/// One binary package of a `Packages` index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageEntry {
    /// `Package`.
    pub name: String,
    /// `Version`.
    pub version: String,
    /// `Architecture` (`amd64`, `all`, ...).
    pub architecture: String,
    /// `Depends`: groups of alternatives, all groups required.
    pub depends: Vec<Vec<Dep>>,
    /// `Pre-Depends`, like `depends`.
    pub pre_depends: Vec<Vec<Dep>>,
    /// `Provides`: the virtual packages (with an optional `= version`).
    pub provides: Vec<Dep>,
    /// `Essential: yes`.
    pub essential: bool,
    /// `Priority` (`required`, `important`, ...), when given.
    pub priority: Option<String>,
    /// `Filename`: the `.deb`'s path relative to the mirror root.
    pub filename: String,
    /// `Size`: the `.deb`'s length in bytes.
    pub size: u64,
    /// `SHA256`: the `.deb`'s digest, 64 lowercase hex digits.
    pub sha256: String,
}

/// One dependency (or one `Provides` entry): a package name and an optional
/// version constraint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dep {
    /// The package name, without an `:any`, `:native` or `:amd64`
    /// qualifier. Another architecture qualifier (`libc6:i386`) is kept, so
    /// that such a dependency names no amd64 package and fails loudly.
    pub name: String,
    /// The version relation and version, e.g. `(Ge, "2.36")`.
    pub constraint: Option<(Relation, String)>,
}

impl fmt::Display for Dep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Some((relation, version)) => write!(f, "{} ({relation} {version})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Writes a group of alternatives as a control file would: `a (>= 1) | b`.
pub fn format_alternatives(group: &[Dep]) -> String {
    group
        .iter()
        .map(Dep::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The signed payload of a suite's `Release` (or `InRelease`) file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// `Suite` (e.g. `stable`, `stable-security`), or `Codename` when the
    /// file has no `Suite`.
    pub suite: String,
    /// `Codename` (e.g. `bookworm`, `bookworm-security`), when given.
    pub codename: Option<String>,
    /// `Date`, as written (RFC 2822).
    pub date: String,
    /// `Date` in seconds since the Unix epoch.
    pub date_epoch: i64,
    /// `Valid-Until` in seconds since the Unix epoch, when given. This module
    /// does not enforce it (pinned builds replay old snapshots).
    pub valid_until_epoch: Option<i64>,
    /// The `SHA256` list: path relative to the suite directory (e.g.
    /// `main/binary-amd64/Packages.xz`) to (size, lowercase hex digest).
    pub sha256: BTreeMap<String, (u64, String)>,
}

impl Release {
    /// Checks downloaded bytes of the index file `path` (relative to the
    /// suite directory) against this Release's size and sha256.
    pub fn check(&self, path: &str, bytes: &[u8]) -> Result<(), DebianError> {
        let integrity = |reason: String| DebianError::Integrity {
            suite: self.suite.clone(),
            path: path.to_owned(),
            reason,
        };
        let (size, digest) = self
            .sha256
            .get(path)
            .ok_or_else(|| integrity("not listed in the Release file".to_owned()))?;
        let length = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if length != *size {
            return Err(integrity(format!("size {length}, Release says {size}")));
        }
        let measured = hex::encode(Sha256::digest(bytes));
        if measured != *digest {
            return Err(integrity(format!(
                "sha256 {measured}, Release says {digest}"
            )));
        }
        Ok(())
    }
}

/// Parses a `Packages` index (already decompressed) into its entries, in
/// file order.
pub fn parse_packages(text: &str) -> Result<Vec<PackageEntry>, DebianError> {
    parse_stanzas(text)?.iter().map(package_entry).collect()
}

/// Parses the signed payload of a Release file, as [`verify_inrelease`]
/// returns it: `Suite`/`Codename`, `Date`, `Valid-Until` and the `SHA256`
/// list.
pub fn parse_release(text: &str) -> Result<Release, DebianError> {
    if text.trim_start().starts_with("-----BEGIN PGP") {
        return Err(DebianError::Syntax {
            line: 1,
            reason: "Release text is still PGP-armored; parse the output of verify_inrelease"
                .to_owned(),
        });
    }
    let stanzas = parse_stanzas(text)?;
    let mut stanzas = stanzas.iter();
    let stanza = stanzas.next().ok_or_else(|| DebianError::Syntax {
        line: 1,
        reason: "empty Release file".to_owned(),
    })?;
    if let Some(extra) = stanzas.next() {
        return Err(DebianError::Syntax {
            line: extra.line,
            reason: "a Release file has a single stanza".to_owned(),
        });
    }
    release_from(stanza)
}

/// Verifies a signed `InRelease` file with `gpgv` against `keyrings` and
/// returns the signed payload. Only `gpgv`'s `--output` is trusted: the
/// payload is returned only when `gpgv` exits with status 0 (every signature
/// good and made by a key of the keyrings).
pub fn verify_inrelease(inrelease: &Path, keyrings: &[PathBuf]) -> Result<String, DebianError> {
    run_gpgv("gpgv", inrelease, keyrings)
}

/// [`verify_inrelease`] with the verifier program named (tests use a
/// missing one).
fn run_gpgv(program: &str, inrelease: &Path, keyrings: &[PathBuf]) -> Result<String, DebianError> {
    if keyrings.is_empty() {
        return Err(DebianError::NoKeyring {
            path: inrelease.to_owned(),
        });
    }
    for path in keyrings.iter().map(PathBuf::as_path).chain([inrelease]) {
        std::fs::metadata(path).map_err(|source| DebianError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
    let mut command = Command::new(program);
    command.arg("--quiet");
    for keyring in keyrings {
        // gpgv looks a keyring name without a slash up in its home directory.
        command.arg("--keyring").arg(explicit_path(keyring));
    }
    command
        .arg("--output")
        .arg("-")
        .arg("--")
        .arg(explicit_path(inrelease));
    let output = command.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DebianError::GpgvNotFound,
        _ => DebianError::Io {
            path: PathBuf::from(program),
            source,
        },
    })?;
    let rejected = |reason: String| DebianError::Gpgv {
        path: inrelease.to_owned(),
        reason,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(rejected(format!("{}: {stderr}", output.status)));
    }
    let payload = String::from_utf8(output.stdout)
        .map_err(|_| rejected("signed payload is not UTF-8".to_owned()))?;
    if payload.trim().is_empty() {
        return Err(rejected("signed payload is empty".to_owned()));
    }
    Ok(payload)
}

/// `path`, with `./` in front when it is relative, so that no program reads
/// it as an option or as a name to look up elsewhere.
fn explicit_path(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        Path::new(".").join(path)
    }
}

/// One deb822 stanza: its fields in file order, names lowercased.
#[derive(Debug)]
struct Stanza {
    /// The 1-based line number of the stanza's first line.
    line: usize,
    /// (lowercased name, value); continuation lines are joined with `\n`.
    fields: Vec<(String, String)>,
}

impl Stanza {
    /// The value of the field `name` (lowercase), if present.
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Splits deb822 text into stanzas. A repeated field within a stanza is an
/// error (it would make the stanza ambiguous).
fn parse_stanzas(text: &str) -> Result<Vec<Stanza>, DebianError> {
    let mut stanzas = Vec::new();
    let mut current: Option<Stanza> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            stanzas.extend(current.take());
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            let last = current
                .as_mut()
                .and_then(|stanza| stanza.fields.last_mut())
                .ok_or_else(|| DebianError::Syntax {
                    line: number,
                    reason: "continuation line outside a field".to_owned(),
                })?;
            last.1.push('\n');
            last.1.push_str(line.trim());
        } else {
            let (name, value) = parse_field_line(line, number)?;
            let stanza = current.get_or_insert_with(|| Stanza {
                line: number,
                fields: Vec::new(),
            });
            if stanza.get(&name).is_some() {
                return Err(DebianError::Syntax {
                    line: number,
                    reason: format!("field {name:?} repeated in one stanza"),
                });
            }
            stanza.fields.push((name, value));
        }
    }
    stanzas.extend(current);
    Ok(stanzas)
}

/// Splits `Name: value` into the lowercased name and the trimmed value.
fn parse_field_line(line: &str, number: usize) -> Result<(String, String), DebianError> {
    let syntax = |reason: String| DebianError::Syntax {
        line: number,
        reason,
    };
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| syntax(format!("expected `Field: value`, got {line:?}")))?;
    let valid = !name.is_empty() && name.bytes().all(|c| c.is_ascii_graphic());
    if !valid {
        return Err(syntax(format!("bad field name {name:?}")));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_owned()))
}

/// Builds a [`PackageEntry`] from a `Packages` stanza. Required fields are
/// checked in a fixed order: `Package`, `Version`, `Architecture`,
/// `Filename`, `Size`, `SHA256`.
fn package_entry(stanza: &Stanza) -> Result<PackageEntry, DebianError> {
    let name = stanza
        .get("package")
        .ok_or_else(|| DebianError::MissingField {
            package: format!("(stanza at line {})", stanza.line),
            field: "Package",
        })?
        .to_owned();
    let bad = |field: &'static str, reason: String| DebianError::BadField {
        package: name.clone(),
        field,
        reason,
    };
    if !is_package_name(&name) {
        return Err(bad("Package", format!("{name:?} is not a package name")));
    }
    let required = |field: &'static str| {
        stanza
            .get(&field.to_ascii_lowercase())
            .filter(|value| !value.is_empty())
            .ok_or_else(|| DebianError::MissingField {
                package: name.clone(),
                field,
            })
    };
    let version = required("Version")?;
    if !is_version(version) {
        return Err(bad("Version", format!("{version:?} is not a version")));
    }
    let architecture = required("Architecture")?;
    let filename =
        check_relative_path(required("Filename")?).map_err(|reason| bad("Filename", reason))?;
    let size = required("Size")?;
    let size = size
        .parse()
        .map_err(|_| bad("Size", format!("{size:?} is not a byte count")))?;
    let sha256 = parse_sha256(required("SHA256")?).map_err(|reason| bad("SHA256", reason))?;
    let relations = |field: &'static str| {
        stanza
            .get(&field.to_ascii_lowercase())
            .map_or(Ok(Vec::new()), parse_relations)
            .map_err(|reason| bad(field, reason))
    };
    Ok(PackageEntry {
        version: version.to_owned(),
        architecture: architecture.to_owned(),
        depends: relations("Depends")?,
        pre_depends: relations("Pre-Depends")?,
        provides: parse_provides(stanza.get("provides").unwrap_or(""))
            .map_err(|reason| bad("Provides", reason))?,
        essential: parse_yes_no(stanza.get("essential")).map_err(|r| bad("Essential", r))?,
        priority: stanza.get("priority").map(str::to_owned),
        filename,
        size,
        sha256,
        name,
    })
}

/// Builds a [`Release`] from its stanza.
fn release_from(stanza: &Stanza) -> Result<Release, DebianError> {
    let codename = stanza.get("codename").map(str::to_owned);
    let suite = stanza
        .get("suite")
        .map(str::to_owned)
        .or_else(|| codename.clone())
        .filter(|suite| !suite.is_empty())
        .ok_or_else(|| DebianError::Release {
            suite: "(unnamed)".to_owned(),
            field: "Suite",
            reason: "neither Suite nor Codename given".to_owned(),
        })?;
    let bad = |field: &'static str, reason: String| DebianError::Release {
        suite: suite.clone(),
        field,
        reason,
    };
    let date = stanza
        .get("date")
        .ok_or_else(|| bad("Date", "missing".to_owned()))?
        .to_owned();
    let date_epoch =
        parse_rfc2822(&date).ok_or_else(|| bad("Date", format!("bad date {date:?}")))?;
    let valid_until_epoch = match stanza.get("valid-until") {
        Some(text) => Some(
            parse_rfc2822(text).ok_or_else(|| bad("Valid-Until", format!("bad date {text:?}")))?,
        ),
        None => None,
    };
    let list = stanza
        .get("sha256")
        .ok_or_else(|| bad("SHA256", "missing".to_owned()))?;
    let sha256 = parse_sha256_list(list).map_err(|reason| bad("SHA256", reason))?;
    Ok(Release {
        suite,
        codename,
        date,
        date_epoch,
        valid_until_epoch,
        sha256,
    })
}

/// Parses the `SHA256` list of a Release file: lines `<hex> <size> <path>`.
fn parse_sha256_list(list: &str) -> Result<BTreeMap<String, (u64, String)>, String> {
    let mut entries = BTreeMap::new();
    for line in list.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [digest, size, path] = fields.as_slice() else {
            return Err(format!("expected `<sha256> <size> <path>`, got {line:?}"));
        };
        let digest = parse_sha256(digest)?;
        let size = size
            .parse::<u64>()
            .map_err(|_| format!("bad size {size:?} for {path}"))?;
        let path = check_relative_path(path)?;
        if entries.insert(path.clone(), (size, digest)).is_some() {
            return Err(format!("{path} listed twice"));
        }
    }
    if entries.is_empty() {
        return Err("empty list".to_owned());
    }
    Ok(entries)
}

/// Validates 64 hex digits and returns them lowercased.
fn parse_sha256(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!("{text:?} is not 64 hex digits"))
    }
}

/// Parses `Essential`-style booleans; an absent field is `no`.
fn parse_yes_no(value: Option<&str>) -> Result<bool, String> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("no") => Ok(false),
        Some("yes") => Ok(true),
        Some(other) => Err(format!("expected yes or no, got {other:?}")),
    }
}

/// Accepts a path that is safe to append to a mirror URL or directory: not
/// empty, relative, no `..` or empty components, no backslash, `:`, `?`,
/// `#`, whitespace or control characters. Returns it unchanged.
fn check_relative_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("empty path".to_owned());
    }
    if path.starts_with('/') {
        return Err(format!("{path:?} is absolute"));
    }
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || "\\:?#".contains(c);
    if let Some(c) = path.chars().find(|&c| bad_char(c)) {
        return Err(format!("{path:?} contains {c:?}"));
    }
    if path.split('/').any(|part| part.is_empty() || part == "..") {
        return Err(format!("{path:?} has an empty or `..` component"));
    }
    Ok(path.to_owned())
}

/// Whether `name` is usable as a package name: ASCII letters, digits and
/// `+ - . _`, starting with a letter or digit.
fn is_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c))
}

/// Whether `version` is made of the characters Debian versions use.
fn is_version(version: &str) -> bool {
    version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
}

/// Parses a relationship field (`Depends`, `Pre-Depends`): comma-separated
/// groups of `|`-separated alternatives. Alternatives restricted away from
/// amd64 (by an architecture list) or by build profiles are dropped; a group
/// left empty is dropped (it does not apply to amd64).
pub(crate) fn parse_relations(text: &str) -> Result<Vec<Vec<Dep>>, String> {
    let mut groups = Vec::new();
    for group in text.split(',').map(str::trim) {
        if group.is_empty() {
            continue;
        }
        let mut alternatives = Vec::new();
        for alternative in group.split('|') {
            alternatives.extend(parse_dep(alternative)?);
        }
        if !alternatives.is_empty() {
            groups.push(alternatives);
        }
    }
    Ok(groups)
}

/// Parses a `Provides` field: like a relationship field, without
/// alternatives.
fn parse_provides(text: &str) -> Result<Vec<Dep>, String> {
    let mut provides = Vec::new();
    for group in parse_relations(text)? {
        match <[Dep; 1]>::try_from(group) {
            Ok([dep]) => provides.push(dep),
            Err(group) => {
                return Err(format!(
                    "alternatives in Provides: {}",
                    format_alternatives(&group)
                ))
            }
        }
    }
    Ok(provides)
}

/// Parses one alternative, `name[:qualifier] [(op version)] [[arch ...]]
/// [<profile ...>]...`. Returns `None` when the restrictions exclude it for
/// amd64.
fn parse_dep(text: &str) -> Result<Option<Dep>, String> {
    let text = text.trim();
    let name_end = text
        .find(|c: char| c.is_whitespace() || "([<".contains(c))
        .unwrap_or(text.len());
    let (qualified, mut rest) = text.split_at_checked(name_end).unwrap_or((text, ""));
    let name =
        unqualified_name(qualified).ok_or_else(|| format!("bad package name in {text:?}"))?;
    let mut constraint = None;
    let mut included = true;
    let mut profile_groups = Vec::new();
    loop {
        rest = rest.trim_start();
        let Some(first) = rest.chars().next() else {
            break;
        };
        let close = match first {
            '(' => ')',
            '[' => ']',
            '<' => '>',
            _ => return Err(format!("unexpected {rest:?} in {text:?}")),
        };
        let (inner, after) = rest
            .get(1..)
            .and_then(|tail| tail.split_once(close))
            .ok_or_else(|| format!("unclosed {first:?} in {text:?}"))?;
        rest = after;
        match first {
            '(' if constraint.is_none() => constraint = Some(parse_constraint(inner, text)?),
            '(' => return Err(format!("two version constraints in {text:?}")),
            '[' => included &= arch_list_includes_amd64(inner, text)?,
            _ => profile_groups.push(inner),
        }
    }
    if !profile_groups.is_empty() {
        included &= profiles_include(&profile_groups, text)?;
    }
    Ok(included.then_some(Dep { name, constraint }))
}

/// Strips an `:any`, `:native` or `:amd64` qualifier and validates the name.
fn unqualified_name(qualified: &str) -> Option<String> {
    let (name, qualifier) = match qualified.split_once(':') {
        Some((name, qualifier)) => (name, Some(qualifier)),
        None => (qualified, None),
    };
    if !is_package_name(name) {
        return None;
    }
    match qualifier {
        None | Some("any" | "native" | "amd64") => Some(name.to_owned()),
        Some(arch) if is_package_name(arch) => Some(qualified.to_owned()),
        Some(_) => None,
    }
}

/// Parses the inside of `(>= 2.36)`.
fn parse_constraint(inner: &str, text: &str) -> Result<(Relation, String), String> {
    let inner = inner.trim();
    let op_end = inner
        .find(|c: char| !"<>=".contains(c))
        .unwrap_or(inner.len());
    let (op, version) = inner.split_at_checked(op_end).unwrap_or((inner, ""));
    let relation = Relation::parse(op).ok_or_else(|| format!("bad relation {op:?} in {text:?}"))?;
    let version = version.trim();
    if !is_version(version) {
        return Err(format!("bad version {version:?} in {text:?}"));
    }
    Ok((relation, version.to_owned()))
}

/// Evaluates an architecture list (`amd64 i386` or `!amd64 !i386`) for
/// amd64.
fn arch_list_includes_amd64(inner: &str, text: &str) -> Result<bool, String> {
    let arches: Vec<&str> = inner.split_whitespace().collect();
    if arches.is_empty() {
        return Err(format!("empty architecture list in {text:?}"));
    }
    let negated = arches.iter().filter(|arch| arch.starts_with('!')).count();
    let matches = |arch: &&str| arch_matches_amd64(arch.trim_start_matches('!'));
    if negated == 0 {
        Ok(arches.iter().any(matches))
    } else if negated == arches.len() {
        Ok(!arches.iter().any(matches))
    } else {
        Err(format!(
            "architecture list mixes ! and plain entries in {text:?}"
        ))
    }
}

/// Whether an architecture or architecture wildcard covers amd64 (Linux).
fn arch_matches_amd64(arch: &str) -> bool {
    matches!(
        arch,
        "amd64" | "any" | "linux-any" | "any-amd64" | "linux-amd64"
    )
}

/// Evaluates build-profile restrictions (`<!nocheck> <stage1 cross>`) with no
/// profile active: included when some group has only negated terms.
fn profiles_include(groups: &[&str], text: &str) -> Result<bool, String> {
    let mut included = false;
    for group in groups {
        let terms: Vec<&str> = group.split_whitespace().collect();
        if terms.is_empty() {
            return Err(format!("empty build profile list in {text:?}"));
        }
        included |= terms.iter().all(|term| term.starts_with('!'));
    }
    Ok(included)
}

/// Parses an RFC 2822 date as Release files write it (`Sat, 15 Nov 2025
/// 10:00:00 UTC`; the zone may also be `GMT`, `Z` or `+hhmm`/`-hhmm`) into
/// seconds since the Unix epoch.
pub fn parse_rfc2822(text: &str) -> Option<i64> {
    let mut tokens = text.split_whitespace().peekable();
    if tokens.peek().is_some_and(|token| token.ends_with(',')) {
        let weekday = tokens.next()?.trim_end_matches(',');
        const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        if !WEEKDAYS.contains(&weekday) {
            return None;
        }
    }
    let day = parse_digits(tokens.next()?, 1, 2)?;
    let month = month_number(tokens.next()?)?;
    let year = parse_digits(tokens.next()?, 4, 4)?;
    let mut clock = tokens.next()?.split(':');
    let hour = parse_digits(clock.next()?, 2, 2)?;
    let minute = parse_digits(clock.next()?, 2, 2)?;
    let second = parse_digits(clock.next()?, 2, 2)?;
    let offset = zone_offset(tokens.next()?)?;
    let valid = clock.next().is_none()
        && tokens.next().is_none()
        && day >= 1
        && day <= days_in_month(year, month)
        && hour < 24
        && minute < 60
        && second <= 60;
    valid.then(|| {
        days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second - offset
    })
}

/// Parses `min..=max` ASCII digits.
fn parse_digits(text: &str, min: usize, max: usize) -> Option<i64> {
    let ok = (min..=max).contains(&text.len()) && text.bytes().all(|c| c.is_ascii_digit());
    ok.then(|| text.parse().ok()).flatten()
}

/// `Jan` → 1 ... `Dec` → 12.
fn month_number(name: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let index = MONTHS.iter().position(|month| *month == name)?;
    i64::try_from(index).ok().map(|index| index + 1)
}

/// A zone's offset east of UTC in seconds.
fn zone_offset(zone: &str) -> Option<i64> {
    if matches!(zone, "UTC" | "GMT" | "UT" | "Z") {
        return Some(0);
    }
    let (sign, digits) = match zone.split_at_checked(1)? {
        ("+", digits) => (1, digits),
        ("-", digits) => (-1, digits),
        _ => return None,
    };
    let value = parse_digits(digits, 4, 4)?;
    let (hours, minutes) = (value / 100, value % 100);
    (hours < 24 && minutes < 60).then_some(sign * (hours * 3_600 + minutes * 60))
}

/// The number of days of `month` (1-12) in `year` (Gregorian).
fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASH: &str = "\
Package: bash
Version: 5.2.15-2+b7
Installed-Size: 7164
Maintainer: Matthias Klose <doko@debian.org>
Architecture: amd64
Replaces: bash-completion (<< 20060301-0), bash-doc (<= 2.05-1)
Depends: base-files (>= 2.1.12), debianutils (>= 5.6-0.1)
Pre-Depends: libc6 (>= 2.36), libtinfo6 (>= 6)
Recommends: bash-completion (>= 20060301-0)
Suggests: bash-doc
Conflicts: bash-completion (<< 20060301-0)
Breaks: apparmor (<< 2.8.0-0ubuntu3)
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.
 .
 The Programmable Completion Code, by Ian Macdonald, is now found in
 the bash-completion package.
Homepage: http://tiswww.case.edu/php/chet/bash/bashtop.html
Description-md5: 3522aa7b4374048d6450e348a5bb45d9
Essential: yes
Tag: implemented-in::c, interface::shell
Section: shells
Priority: required
Filename: pool/main/b/bash/bash_5.2.15-2+b7_amd64.deb
Size: 1491380
SHA256: 8AF8B8A1C4D4C4F0E66FC2E4A1C8B0E1A4B5B2D0C5B3C6E0D8F1E2A3B4C5D6E7

Package: mawk
Source: mawk (1.3.4.20200120-3.1)
Version: 1.3.4.20200120-3.1
Architecture: amd64
Multi-Arch: foreign
Provides: awk
Pre-Depends: libc6 (>= 2.34)
Priority: required
Filename: pool/main/m/mawk/mawk_1.3.4.20200120-3.1_amd64.deb
Size: 127392
SHA256: 0f5b5a9e3cc1e8a1e2b2d1e1f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9
";

    const HASH: &str = "0f5b5a9e3cc1e8a1e2b2d1e1f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9";

    fn dep(name: &str, constraint: Option<(Relation, &str)>) -> Dep {
        Dep {
            name: name.to_owned(),
            constraint: constraint.map(|(relation, version)| (relation, version.to_owned())),
        }
    }

    fn stanza(extra: &str) -> String {
        format!(
            "Package: foo\nVersion: 1.0-1\nArchitecture: amd64\n{extra}\
             Filename: pool/main/f/foo/foo_1.0-1_amd64.deb\nSize: 10\nSHA256: {HASH}\n"
        )
    }

    #[test]
    fn parses_real_looking_stanzas() {
        let entries = parse_packages(BASH).unwrap();
        assert_eq!(entries.len(), 2);
        let bash = &entries[0];
        assert_eq!(bash.name, "bash");
        assert_eq!(bash.version, "5.2.15-2+b7");
        assert_eq!(bash.architecture, "amd64");
        assert!(bash.essential);
        assert_eq!(bash.priority.as_deref(), Some("required"));
        assert_eq!(bash.filename, "pool/main/b/bash/bash_5.2.15-2+b7_amd64.deb");
        assert_eq!(bash.size, 1_491_380);
        assert_eq!(
            bash.sha256,
            "8af8b8a1c4d4c4f0e66fc2e4a1c8b0e1a4b5b2d0c5b3c6e0d8f1e2a3b4c5d6e7"
        );
        assert_eq!(
            bash.depends,
            vec![
                vec![dep("base-files", Some((Relation::Ge, "2.1.12")))],
                vec![dep("debianutils", Some((Relation::Ge, "5.6-0.1")))],
            ]
        );
        assert_eq!(
            bash.pre_depends,
            vec![
                vec![dep("libc6", Some((Relation::Ge, "2.36")))],
                vec![dep("libtinfo6", Some((Relation::Ge, "6")))],
            ]
        );
        let mawk = &entries[1];
        assert!(!mawk.essential);
        assert_eq!(mawk.provides, vec![dep("awk", None)]);
        assert!(mawk.depends.is_empty());
    }

    #[test]
    fn field_names_are_case_insensitive_and_crlf_is_accepted() {
        let text = stanza("")
            .replace("Package:", "PACKAGE:")
            .replace('\n', "\r\n");
        let text = text.replace("SHA256:", "sha256:");
        let entries = parse_packages(&text).unwrap();
        assert_eq!(entries[0].name, "foo");
        assert_eq!(entries[0].sha256, HASH);
    }

    #[test]
    fn continuation_lines_join_relationship_fields() {
        let text = stanza("Depends: libc6 (>= 2.36),\n libssl3\n  (>= 3.0.0),\n\tzlib1g\n");
        let entries = parse_packages(&text).unwrap();
        assert_eq!(
            entries[0].depends,
            vec![
                vec![dep("libc6", Some((Relation::Ge, "2.36")))],
                vec![dep("libssl3", Some((Relation::Ge, "3.0.0")))],
                vec![dep("zlib1g", None)],
            ]
        );
    }

    #[test]
    fn stanzas_are_separated_by_whitespace_only_lines() {
        let text = format!("{}  \t\n\n{}", stanza(""), stanza("").replace("foo", "bar"));
        let names: Vec<String> = parse_packages(&text)
            .unwrap()
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        assert_eq!(names, ["foo", "bar"]);
    }

    #[test]
    fn missing_fields_name_the_package() {
        for field in ["Filename", "SHA256", "Size", "Version", "Architecture"] {
            let text: String = stanza("")
                .lines()
                .filter(|line| !line.starts_with(&format!("{field}:")))
                .map(|line| format!("{line}\n"))
                .collect();
            let error = parse_packages(&text).unwrap_err();
            assert!(
                matches!(&error, DebianError::MissingField { package, field: f }
                    if package == "foo" && *f == field),
                "{field}: {error}"
            );
            assert!(error.to_string().contains("foo"), "{error}");
            assert!(error.to_string().contains(field), "{error}");
        }
        let error = parse_packages("Version: 1\n").unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn bad_values_are_errors() {
        let cases = [
            ("SHA256", stanza("").replace(HASH, "abc")),
            ("SHA256", stanza("").replace(HASH, &"g".repeat(64))),
            ("Size", stanza("").replace("Size: 10", "Size: ten")),
            ("Size", stanza("").replace("Size: 10", "Size: -1")),
            ("Essential", stanza("Essential: maybe\n")),
            ("Depends", stanza("Depends: libc6 (>= )\n")),
            ("Depends", stanza("Depends: libc6 (~= 2)\n")),
            ("Depends", stanza("Depends: libc6 (>= 2\n")),
            ("Depends", stanza("Depends: a | | b\n")),
            ("Depends", stanza("Depends: libc6 junk\n")),
            ("Provides", stanza("Provides: a | b\n")),
            ("Version", stanza("").replace("1.0-1\n", "one\n")),
            (
                "Package",
                stanza("").replace("Package: foo", "Package: f/oo"),
            ),
        ];
        for (field, text) in cases {
            let error = parse_packages(&text).unwrap_err();
            assert!(
                matches!(&error, DebianError::BadField { field: f, .. } if *f == field),
                "{field}: {error}"
            );
        }
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let error = parse_packages(" continuation\n").unwrap_err();
        assert!(
            matches!(error, DebianError::Syntax { line: 1, .. }),
            "{error}"
        );
        let error = parse_packages("Package: a\nno colon here\n").unwrap_err();
        assert!(
            matches!(error, DebianError::Syntax { line: 2, .. }),
            "{error}"
        );
        let error = parse_packages("Package: a\npackage: b\n").unwrap_err();
        assert!(
            matches!(error, DebianError::Syntax { line: 2, .. }),
            "{error}"
        );
    }

    #[test]
    fn unsafe_filenames_are_rejected() {
        for filename in [
            "/etc/passwd",
            "../../etc/passwd",
            "pool/../../x.deb",
            "pool/main/..",
            "pool//x.deb",
            "http://evil.example/x.deb",
            "pool/x.deb?y",
            "pool/x .deb",
            "pool\\x.deb",
            "pool/x.deb#frag",
        ] {
            let text = stanza("").replace("pool/main/f/foo/foo_1.0-1_amd64.deb", filename);
            let error = parse_packages(&text).unwrap_err();
            assert!(
                matches!(&error, DebianError::BadField { package, field: "Filename", .. }
                    if package == "foo"),
                "{filename}: {error}"
            );
        }
        let text = stanza("").replace("pool/main/f/foo/", "pool/main/f/foo..bar/");
        assert!(parse_packages(&text).is_ok());
    }

    #[test]
    fn arch_qualifiers_are_stripped() {
        let groups =
            parse_relations("python3:any (>= 3.11), perl:native, libc6:amd64, libx:i386").unwrap();
        assert_eq!(
            groups,
            vec![
                vec![dep("python3", Some((Relation::Ge, "3.11")))],
                vec![dep("perl", None)],
                vec![dep("libc6", None)],
                vec![dep("libx:i386", None)],
            ]
        );
    }

    #[test]
    fn arch_lists_and_profiles_drop_alternatives() {
        let groups = parse_relations(
            "a [amd64], b [!amd64], c [i386 arm64] | d, e [!i386], f [linux-any], \
             g <!nocheck>, h <stage1>, i <stage1> <!cross>, j [i386]",
        )
        .unwrap();
        assert_eq!(
            groups,
            vec![
                vec![dep("a", None)],
                vec![dep("d", None)],
                vec![dep("e", None)],
                vec![dep("f", None)],
                vec![dep("g", None)],
                vec![dep("i", None)],
            ]
        );
        assert!(parse_relations("a [amd64 !i386]").is_err());
        assert!(parse_relations("a []").is_err());
        assert!(parse_relations("a <>").is_err());
    }

    #[test]
    fn relation_spacing_variants() {
        let groups = parse_relations("a(>=1.0),b ( << 2:3~rc1 ) , c (= 1)|d").unwrap();
        assert_eq!(
            groups,
            vec![
                vec![dep("a", Some((Relation::Ge, "1.0")))],
                vec![dep("b", Some((Relation::Lt, "2:3~rc1")))],
                vec![dep("c", Some((Relation::Eq, "1"))), dep("d", None)],
            ]
        );
        assert_eq!(parse_relations("").unwrap(), Vec::<Vec<Dep>>::new());
        assert_eq!(format_alternatives(&groups[2]), "c (= 1) | d".to_owned());
    }

    #[test]
    fn versioned_provides() {
        let text = stanza("Provides: libfoo-abi (= 1.0), bar\n");
        let entries = parse_packages(&text).unwrap();
        assert_eq!(
            entries[0].provides,
            vec![
                dep("libfoo-abi", Some((Relation::Eq, "1.0"))),
                dep("bar", None)
            ]
        );
    }

    const RELEASE: &str = "\
Origin: Debian
Label: Debian
Suite: stable
Version: 12.12
Codename: bookworm
Date: Sat, 15 Nov 2025 10:00:00 UTC
Acquire-By-Hash: yes
Architectures: all amd64 arm64
Components: main contrib non-free-firmware non-free
Description: Debian 12.12 Released 15 November 2025
MD5Sum:
 7fdf4db15250af5368cc52a91e8edbce   738242 contrib/Contents-all
SHA256:
 3957f28db16e3f28c7b34ae84f1c929c567de6970f3f1b95dac9b498dd80fe63   738242 contrib/Contents-all
 0f5b5a9e3cc1e8a1e2b2d1e1f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9  8786 main/binary-amd64/Packages.xz
";

    #[test]
    fn parses_release_payload() {
        let release = parse_release(RELEASE).unwrap();
        assert_eq!(release.suite, "stable");
        assert_eq!(release.codename.as_deref(), Some("bookworm"));
        assert_eq!(release.date, "Sat, 15 Nov 2025 10:00:00 UTC");
        assert_eq!(release.date_epoch, 1_763_200_800);
        assert_eq!(release.valid_until_epoch, None);
        assert_eq!(release.sha256.len(), 2);
        assert_eq!(
            release.sha256.get("main/binary-amd64/Packages.xz"),
            Some(&(8786, HASH.to_owned()))
        );
    }

    #[test]
    fn release_suite_falls_back_to_codename() {
        let text = RELEASE
            .replace("Suite: stable\n", "")
            .replace("Codename: bookworm", "Codename: bookworm-security")
            .replace(
                "Acquire",
                "Valid-Until: Sat, 22 Nov 2025 10:00:00 UTC\nAcquire",
            );
        let release = parse_release(&text).unwrap();
        assert_eq!(release.suite, "bookworm-security");
        assert_eq!(release.valid_until_epoch, Some(1_763_200_800 + 7 * 86_400));
    }

    #[test]
    fn release_errors_name_suite_and_field() {
        let cases = [
            (
                "Date",
                RELEASE.replace("Date: Sat, 15 Nov 2025 10:00:00 UTC\n", ""),
            ),
            ("Date", RELEASE.replace("15 Nov", "31 Nov")),
            ("SHA256", RELEASE.replace("SHA256:", "SHA1:")),
            ("SHA256", RELEASE.replace("  8786 main", "  x main")),
            ("SHA256", RELEASE.replace("  8786 main", "  8786 ../main")),
            (
                "SHA256",
                format!("{RELEASE} {HASH} 1 main/binary-amd64/Packages.xz\n"),
            ),
            (
                "SHA256",
                RELEASE.replace("   738242 contrib/Contents-all\n 0f5b", "\n 0f5b"),
            ),
        ];
        for (field, text) in cases {
            let error = parse_release(&text).unwrap_err();
            assert!(
                matches!(&error, DebianError::Release { suite, field: f, .. }
                    if suite == "stable" && *f == field),
                "{field}: {error}"
            );
            assert!(error.to_string().contains("stable"), "{error}");
        }
        let no_suite = RELEASE
            .replace("Suite: stable\n", "")
            .replace("Codename: bookworm\n", "");
        assert!(matches!(
            parse_release(&no_suite),
            Err(DebianError::Release { field: "Suite", .. })
        ));
        let armored = format!("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{RELEASE}");
        assert!(matches!(
            parse_release(&armored),
            Err(DebianError::Syntax { .. })
        ));
        assert!(parse_release("").is_err());
        assert!(parse_release(&format!("{RELEASE}\nSuite: other\n")).is_err());
    }

    #[test]
    fn release_checks_index_bytes() {
        let release = parse_release(RELEASE).unwrap();
        let bytes = b"hello";
        let digest = hex::encode(Sha256::digest(bytes));
        let text = RELEASE.replace(
            &format!("{HASH}  8786"),
            &format!("{digest}  {}", bytes.len()),
        );
        let good = parse_release(&text).unwrap();
        good.check("main/binary-amd64/Packages.xz", bytes).unwrap();
        for (path, bytes) in [
            ("main/binary-amd64/Packages.xz", &b"hellO"[..]),
            ("main/binary-amd64/Packages.xz", &b"hello!"[..]),
            ("main/binary-amd64/Packages.gz", &b"hello"[..]),
        ] {
            let error = good.check(path, bytes).unwrap_err();
            assert!(
                matches!(&error, DebianError::Integrity { suite, path: p, .. }
                    if suite == "stable" && p == path),
                "{error}"
            );
        }
        assert!(release
            .check("main/binary-amd64/Packages.xz", bytes)
            .is_err());
    }

    #[test]
    fn rfc2822_dates() {
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            parse_rfc2822("Sat, 15 Nov 2025 10:00:00 UTC"),
            Some(1_763_200_800)
        );
        assert_eq!(
            parse_rfc2822("15 Nov 2025 10:00:00 GMT"),
            Some(1_763_200_800)
        );
        assert_eq!(
            parse_rfc2822("Sat, 15 Nov 2025 11:30:00 +0130"),
            Some(1_763_200_800)
        );
        assert_eq!(
            parse_rfc2822("Sat, 15 Nov 2025 08:00:00 -0200"),
            Some(1_763_200_800)
        );
        assert_eq!(
            parse_rfc2822("Thu, 29 Feb 2024 00:00:00 UTC"),
            Some(1_709_164_800)
        );
        assert_eq!(
            parse_rfc2822("Sat, 10 Jun 2023 09:25:11 UTC"),
            Some(1_686_389_111)
        );
        for bad in [
            "",
            "Sat, 29 Feb 2023 00:00:00 UTC",
            "Sat, 15 Nov 2025 24:00:00 UTC",
            "Sat, 15 Nov 2025 10:00 UTC",
            "Sat, 15 Nov 2025 10:00:00",
            "Sat, 15 Nov 2025 10:00:00 CET",
            "Sat, 15 Nov 2025 10:00:00 UTC extra",
            "Xyz, 15 Nov 2025 10:00:00 UTC",
            "Sat, 15 November 2025 10:00:00 UTC",
            "Sat, 15 Nov 25 10:00:00 UTC",
        ] {
            assert_eq!(parse_rfc2822(bad), None, "{bad}");
        }
    }

    #[test]
    fn gpgv_rejects_unsigned_file() {
        let dir = tempfile::tempdir().unwrap();
        let inrelease = dir.path().join("InRelease");
        std::fs::write(&inrelease, RELEASE).unwrap();
        let keyring = if Path::new(DEFAULT_KEYRING).exists() {
            PathBuf::from(DEFAULT_KEYRING)
        } else {
            let empty = dir.path().join("empty.gpg");
            std::fs::write(&empty, b"").unwrap();
            empty
        };
        let error = verify_inrelease(&inrelease, &[keyring]).unwrap_err();
        assert!(
            matches!(error, DebianError::Gpgv { .. } | DebianError::GpgvNotFound),
            "{error}"
        );
    }

    #[test]
    fn gpgv_rejects_forged_signature() {
        let dir = tempfile::tempdir().unwrap();
        let inrelease = dir.path().join("InRelease");
        let forged = format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{RELEASE}\
             -----BEGIN PGP SIGNATURE-----\n\n\
             iQIzBAEBCAAdFiEEAAAAAAAAAAAAAAAAAAAAAAAAAAAFAmVUTU4ACgkQAAAAAAAA\n\
             AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n\
             =AAAA\n-----END PGP SIGNATURE-----\n"
        );
        std::fs::write(&inrelease, forged).unwrap();
        let empty = dir.path().join("empty.gpg");
        std::fs::write(&empty, b"").unwrap();
        let error = verify_inrelease(&inrelease, &[empty]).unwrap_err();
        assert!(
            matches!(error, DebianError::Gpgv { .. } | DebianError::GpgvNotFound),
            "{error}"
        );
    }

    #[test]
    fn gpgv_input_errors() {
        let dir = tempfile::tempdir().unwrap();
        let inrelease = dir.path().join("InRelease");
        std::fs::write(&inrelease, RELEASE).unwrap();
        assert!(matches!(
            verify_inrelease(&inrelease, &[]),
            Err(DebianError::NoKeyring { .. })
        ));
        let missing = dir.path().join("missing.gpg");
        let error = verify_inrelease(&inrelease, std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            matches!(&error, DebianError::Io { path, .. } if *path == missing),
            "{error}"
        );
        let keyring = dir.path().join("empty.gpg");
        std::fs::write(&keyring, b"").unwrap();
        let error = run_gpgv("mvm-no-such-gpgv", &inrelease, &[keyring]).unwrap_err();
        assert!(matches!(error, DebianError::GpgvNotFound), "{error}");
        assert_eq!(error.to_string(), "gpgv not found (install gpgv)");
    }

    #[test]
    fn relative_paths_are_made_explicit() {
        assert_eq!(explicit_path(Path::new("k.gpg")), PathBuf::from("./k.gpg"));
        assert_eq!(explicit_path(Path::new("-k")), PathBuf::from("./-k"));
        assert_eq!(explicit_path(Path::new("/k.gpg")), PathBuf::from("/k.gpg"));
    }
}
