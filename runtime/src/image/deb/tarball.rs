//! Bounded reading of a (compressed) tar stream.
//!
//! The tar crate is used in raw mode: it checks header checksums and frames
//! entry data, while GNU long names/links and PAX headers are decoded here,
//! each under a small size cap (the crate itself would read them whole into
//! memory, whatever size their header claims). Every header counts against
//! the entry limit and every size against the byte limits before any data is
//! read, so a decompression bomb stops at the limit.

use std::io::{self, Read};

use super::{display_bytes, Compression, DebError, EntryProblem, Limits, MAX_PATH_BYTES};

/// The largest PAX extended header accepted.
const MAX_PAX_BYTES: u64 = 64 * 1024;
/// The largest GNU long name or long link accepted (a path and its NUL).
const MAX_LONG_NAME_BYTES: u64 = MAX_PATH_BYTES as u64 + 1;

/// The file types an image tree may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::image) enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A hard link to an earlier regular file.
    HardLink,
}

impl Kind {
    /// A short name, for messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Dir => "directory",
            Self::File => "regular file",
            Self::Symlink => "symlink",
            Self::HardLink => "hard link",
        }
    }

    /// The `S_IFMT` bits that go with this kind.
    fn mode_format(self) -> u32 {
        match self {
            Self::Dir => 0o040_000,
            Self::File | Self::HardLink => 0o100_000,
            Self::Symlink => 0o120_000,
        }
    }
}

/// One logical entry: its header merged with its GNU / PAX extensions.
#[derive(Debug, Clone)]
pub(in crate::image) struct Entry {
    /// The raw path, as the archive spells it.
    pub path: Vec<u8>,
    /// The raw link target, for symlinks and hard links.
    pub link: Option<Vec<u8>>,
    /// The entry type.
    pub kind: Kind,
    /// The data size (already checked against the limits).
    pub size: u64,
    /// The mode, file-type bits included if the archive had them.
    pub mode: u32,
    /// The numeric owner.
    pub uid: u64,
    /// The numeric group.
    pub gid: u64,
    /// The modification time, seconds since the epoch (0 if negative).
    pub mtime: u64,
}

/// Counters against the limits of one tree or one control tarball.
#[derive(Debug, Clone)]
pub(in crate::image) struct Budget {
    max_entries: u64,
    max_total: u64,
    max_entry: u64,
    entries: u64,
    bytes: u64,
}

impl Budget {
    /// A budget of `max_entries` headers, `max_total` bytes in all and
    /// `max_entry` bytes per entry.
    pub(in crate::image) fn new(max_entries: u64, max_total: u64, max_entry: u64) -> Self {
        Self {
            max_entries,
            max_total,
            max_entry,
            entries: 0,
            bytes: 0,
        }
    }

    /// Counts one header.
    fn count_entry(&mut self) -> Result<(), EntryProblem> {
        if self.entries >= self.max_entries {
            return Err(EntryProblem::TooManyEntries {
                limit: self.max_entries,
            });
        }
        self.entries += 1;
        Ok(())
    }

    /// Counts `size` bytes of entry data, refusing an entry above the
    /// per-entry limit or a total above the total limit.
    fn count_bytes(&mut self, size: u64) -> Result<(), EntryProblem> {
        if size > self.max_entry {
            return Err(EntryProblem::TooLarge {
                size,
                limit: self.max_entry,
            });
        }
        let total = self
            .bytes
            .checked_add(size)
            .filter(|total| *total <= self.max_total)
            .ok_or(EntryProblem::TotalBytes {
                limit: self.max_total,
            })?;
        self.bytes = total;
        Ok(())
    }
}

/// A decompressing reader over `bytes`. xz and zstd decoders may allocate at
/// most [`Limits::max_decoder_memory`].
pub(super) fn decoder<'a>(
    compression: Compression,
    bytes: &'a [u8],
    limits: &Limits,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(bytes),
        Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(bytes)),
        #[cfg(target_os = "linux")]
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(limits.max_decoder_memory, 0)
                .map_err(io::Error::from)?;
            Box::new(xz2::bufread::XzDecoder::new_stream(bytes, stream))
        }
        #[cfg(target_os = "linux")]
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(bytes)?;
            decoder.window_log_max(window_log(limits.max_decoder_memory))?;
            Box::new(decoder)
        }
        #[cfg(not(target_os = "linux"))]
        Compression::Xz | Compression::Zstd => {
            let _ = limits.max_decoder_memory;
            return Err(crate::image::compression_unsupported(match compression {
                Compression::Xz => "xz",
                _ => "zstd",
            }));
        }
    })
}

/// The largest zstd window log whose window fits in `memory` bytes (zstd
/// accepts 10..=31).
pub(in crate::image) fn window_log(memory: u64) -> u32 {
    (63 - memory.max(1).leading_zeros()).clamp(10, 31)
}

/// GNU long name / long link and PAX data waiting for the entry they
/// describe.
#[derive(Debug, Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Pax>,
}

impl Extensions {
    /// Whether any extension is waiting.
    fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }
}

/// The PAX keys that matter here.
#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
    sparse: bool,
}

/// Reads every entry of the tar stream `reader`, counting headers and sizes
/// against `budget`, and hands each logical entry with its data to `visit`.
/// `label` (a package or member name) heads every error.
///
/// `visit` may leave data unread; it is skipped (it was counted).
pub(in crate::image) fn walk<R, F>(
    reader: R,
    budget: &mut Budget,
    label: &str,
    mut visit: F,
) -> Result<(), DebError>
where
    R: Read,
    F: FnMut(&Entry, &mut dyn Read) -> Result<(), DebError>,
{
    let mut archive = tar::Archive::new(reader);
    let mut after = "the start".to_owned();
    let stream = |after: &str, source| DebError::Stream {
        context: label.to_owned(),
        after: after.to_owned(),
        source,
    };
    let entries = archive.entries().map_err(|e| stream(&after, e))?;
    let mut extensions = Extensions::default();
    for raw in entries.raw(true) {
        let mut raw = raw.map_err(|e| stream(&after, e))?;
        let header_path = raw.header().path_bytes().into_owned();
        let refuse = |problem| DebError::Entry {
            package: label.to_owned(),
            path: display_bytes(&header_path),
            problem,
        };
        budget.count_entry().map_err(refuse)?;
        let size = raw.size();
        let typeflag = raw.header().entry_type().as_byte();
        if read_extension(typeflag, size, &mut raw, budget, &mut extensions).map_err(refuse)? {
            continue;
        }
        let entry = resolve(
            raw.header(),
            typeflag,
            size,
            std::mem::take(&mut extensions),
        )
        .map_err(refuse)?;
        let refuse = |problem| DebError::Entry {
            package: label.to_owned(),
            path: display_bytes(&entry.path),
            problem,
        };
        budget.count_bytes(size).map_err(refuse)?;
        visit(&entry, &mut raw)?;
        after = display_bytes(&entry.path);
    }
    if extensions.pending() {
        return Err(DebError::Entry {
            package: label.to_owned(),
            path: format!("(after {after})"),
            problem: EntryProblem::Extension("extension header without a following entry"),
        });
    }
    Ok(())
}

/// If `typeflag` is an extension header (GNU `L`/`K`, PAX `x`), reads it into
/// `extensions` and returns true. PAX global headers (`g`) are refused.
fn read_extension(
    typeflag: u8,
    size: u64,
    data: &mut dyn Read,
    budget: &mut Budget,
    extensions: &mut Extensions,
) -> Result<bool, EntryProblem> {
    let cap = match typeflag {
        b'L' | b'K' => MAX_LONG_NAME_BYTES,
        b'x' => MAX_PAX_BYTES,
        b'g' => {
            return Err(EntryProblem::UnsupportedType(
                "PAX global header".to_owned(),
            ))
        }
        _ => return Ok(false),
    };
    if size > cap {
        return Err(EntryProblem::Extension("longer than its size cap"));
    }
    budget.count_bytes(size)?;
    let bytes = read_exact(data, size)?;
    let slot_taken = match typeflag {
        b'L' => extensions.long_name.replace(strip_nuls(bytes)).is_some(),
        b'K' => extensions.long_link.replace(strip_nuls(bytes)).is_some(),
        _ => extensions.pax.replace(parse_pax(&bytes)?).is_some(),
    };
    if slot_taken {
        return Err(EntryProblem::Extension(
            "two extension headers of one kind for one entry",
        ));
    }
    Ok(true)
}

/// Merges a header with the extensions before it into an [`Entry`].
fn resolve(
    header: &tar::Header,
    typeflag: u8,
    size: u64,
    extensions: Extensions,
) -> Result<Entry, EntryProblem> {
    let pax = extensions.pax.unwrap_or_default();
    if pax.sparse {
        return Err(EntryProblem::UnsupportedType(
            "GNU sparse file (PAX)".to_owned(),
        ));
    }
    if pax.size.is_some_and(|pax_size| pax_size != size) {
        return Err(EntryProblem::Extension(
            "PAX size differs from the header size",
        ));
    }
    let mode = header.mode().map_err(header_problem)?;
    let kind = classify(typeflag, mode)?;
    let path = match pax.path.or(extensions.long_name) {
        Some(path) => path,
        None => header.path_bytes().into_owned(),
    };
    let link = pax
        .linkpath
        .or(extensions.long_link)
        .or_else(|| header.link_name_bytes().map(|link| link.into_owned()));
    let uid = field_or(pax.uid, || header.uid())?;
    let gid = field_or(pax.gid, || header.gid())?;
    let mtime = field_or(pax.mtime, || header.mtime())?;
    if uid > u64::from(u32::MAX) || gid > u64::from(u32::MAX) {
        return Err(EntryProblem::Header(format!(
            "uid {uid} or gid {gid} does not fit 32 bits"
        )));
    }
    Ok(Entry {
        path,
        link,
        kind,
        size,
        mode,
        uid,
        gid,
        mtime,
    })
}

/// `value`, or the header field read by `read`.
fn field_or(
    value: Option<u64>,
    read: impl FnOnce() -> io::Result<u64>,
) -> Result<u64, EntryProblem> {
    match value {
        Some(value) => Ok(value),
        None => read().map_err(header_problem),
    }
}

/// A header decoding error as an [`EntryProblem`].
fn header_problem(error: io::Error) -> EntryProblem {
    EntryProblem::Header(error.to_string())
}

/// The [`Kind`] of a typeflag, refusing every other type; file-type bits in
/// the mode, if any, must agree.
fn classify(typeflag: u8, mode: u32) -> Result<Kind, EntryProblem> {
    let kind = match typeflag {
        b'0' | b'\0' => Kind::File,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'5' => Kind::Dir,
        other => return Err(EntryProblem::UnsupportedType(type_name(other))),
    };
    let format = mode & 0o170_000;
    if format != 0 && format != kind.mode_format() {
        return Err(EntryProblem::UnsupportedType(format!(
            "{} whose mode says {}",
            kind.name(),
            format_name(format)
        )));
    }
    Ok(kind)
}

/// A name for a refused typeflag.
fn type_name(typeflag: u8) -> String {
    let name = match typeflag {
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "FIFO",
        b'7' => "contiguous file",
        b'S' => "GNU sparse file",
        b'D' => "GNU dump directory",
        b'M' => "GNU multi-volume continuation",
        b'N' => "GNU old long name",
        b'V' => "volume label",
        _ if typeflag.is_ascii_graphic() => {
            return format!("typeflag '{}'", char::from(typeflag));
        }
        _ => return format!("typeflag 0x{typeflag:02x}"),
    };
    name.to_owned()
}

/// A name for `S_IFMT` bits.
fn format_name(format: u32) -> String {
    match format {
        0o140_000 => "socket".to_owned(),
        0o120_000 => "symlink".to_owned(),
        0o100_000 => "regular file".to_owned(),
        0o060_000 => "block device".to_owned(),
        0o040_000 => "directory".to_owned(),
        0o020_000 => "character device".to_owned(),
        0o010_000 => "FIFO".to_owned(),
        other => format!("file type 0o{other:o}"),
    }
}

/// Reads exactly `size` bytes (already bounded by the caller) into memory.
pub(super) fn read_exact(data: &mut dyn Read, size: u64) -> Result<Vec<u8>, EntryProblem> {
    let capacity = usize::try_from(size.min(64 * 1024)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    data.take(size)
        .read_to_end(&mut bytes)
        .map_err(EntryProblem::Read)?;
    if u64::try_from(bytes.len()).ok() != Some(size) {
        return Err(EntryProblem::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("data ends after {} of {size} bytes", bytes.len()),
        )));
    }
    Ok(bytes)
}

/// A GNU long name without its NUL terminator(s).
fn strip_nuls(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// Parses PAX records (`<len> <key>=<value>\n`), keeping the keys that
/// matter. An empty value unsets a key (the header field applies).
fn parse_pax(mut bytes: &[u8]) -> Result<Pax, EntryProblem> {
    const BAD: EntryProblem = EntryProblem::Extension("malformed PAX record");
    let mut pax = Pax::default();
    while !bytes.is_empty() {
        let space = bytes.iter().position(|b| *b == b' ').ok_or(BAD)?;
        let length = bytes
            .get(..space)
            .and_then(parse_decimal)
            .and_then(|length| usize::try_from(length).ok())
            .ok_or(BAD)?;
        let record = bytes.get(..length).ok_or(BAD)?;
        bytes = bytes.get(length..).ok_or(BAD)?;
        let body = record
            .strip_suffix(b"\n")
            .and_then(|record| record.get(space + 1..))
            .ok_or(BAD)?;
        let equals = body.iter().position(|b| *b == b'=').ok_or(BAD)?;
        let (key, value) = body.split_at(equals);
        let value = value.get(1..).unwrap_or_default();
        let set = !value.is_empty();
        match key {
            b"path" => pax.path = set.then(|| value.to_vec()),
            b"linkpath" => pax.linkpath = set.then(|| value.to_vec()),
            b"size" => pax.size = pax_number(value, set)?,
            b"uid" => pax.uid = pax_number(value, set)?,
            b"gid" => pax.gid = pax_number(value, set)?,
            b"mtime" => pax.mtime = pax_time(value, set)?,
            key if key.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ => {}
        }
    }
    Ok(pax)
}

/// A PAX decimal value (`None` when unset).
fn pax_number(value: &[u8], set: bool) -> Result<Option<u64>, EntryProblem> {
    if !set {
        return Ok(None);
    }
    parse_decimal(value)
        .map(Some)
        .ok_or(EntryProblem::Extension("malformed PAX number"))
}

/// A PAX time (`[-]seconds[.fraction]`) in whole seconds, negative times as
/// 0 (`None` when unset).
fn pax_time(value: &[u8], set: bool) -> Result<Option<u64>, EntryProblem> {
    const BAD: EntryProblem = EntryProblem::Extension("malformed PAX time");
    if !set {
        return Ok(None);
    }
    let (negative, value) = match value.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (seconds, fraction) = match value.iter().position(|b| *b == b'.') {
        Some(dot) => value.split_at(dot),
        None => (value, &b""[..]),
    };
    let fraction = fraction.get(1..).unwrap_or_default();
    if !fraction.iter().all(u8::is_ascii_digit) {
        return Err(BAD);
    }
    let seconds = parse_decimal(seconds).ok_or(BAD)?;
    Ok(Some(if negative { 0 } else { seconds }))
}

/// Non-empty ASCII decimal digits as a `u64` (`None` on anything else or
/// overflow).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One PAX record for `key_value`, with its self-including length.
    fn record(key_value: &str) -> String {
        let body = key_value.len() + 2; // the space and the newline
        let mut length = body + body.to_string().len();
        if length.to_string().len() + body != length {
            length += 1;
        }
        format!("{length} {key_value}\n")
    }

    #[test]
    fn pax_records() {
        let text = [
            record("path=a/b"),
            record("linkpath=../c/d"),
            record("uid=1000"),
            record("mtime=1700000000.5"),
            record("SCHILY.xattr.user.x=y"),
        ]
        .concat();
        let pax = parse_pax(text.as_bytes()).unwrap();
        assert_eq!(pax.path.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(pax.linkpath.as_deref(), Some(&b"../c/d"[..]));
        assert_eq!(pax.uid, Some(1000));
        assert_eq!(pax.mtime, Some(1_700_000_000));
        assert!(!pax.sparse);
        let unset = [record("path=a"), record("path=")].concat();
        assert_eq!(parse_pax(unset.as_bytes()).unwrap().path, None);
        assert!(
            parse_pax(record("GNU.sparse.major=1").as_bytes())
                .unwrap()
                .sparse
        );
        let bad_number = record("size=z");
        for bad in [
            &b"5 a=b"[..],
            b"99 path=x\n",
            b"x path=x\n",
            b"8 pathx\n",
            bad_number.as_bytes(),
        ] {
            assert!(parse_pax(bad).is_err(), "{bad:?}");
        }
        assert_eq!(pax_time(b"-5.5", true).unwrap(), Some(0));
        assert!(pax_time(b"1.x", true).is_err());
    }

    #[test]
    fn window_logs() {
        assert_eq!(window_log(256 << 20), 28);
        assert_eq!(window_log(0), 10);
        assert_eq!(window_log(u64::MAX), 31);
    }

    #[test]
    fn types() {
        assert_eq!(classify(b'0', 0o644).unwrap(), Kind::File);
        assert_eq!(classify(b'5', 0o040_755).unwrap(), Kind::Dir);
        assert!(classify(b'0', 0o140_644).is_err());
        for flag in [b'3', b'4', b'6', b'S', b'7', b'g', 0xff] {
            assert!(classify(flag, 0o644).is_err());
        }
    }
}
