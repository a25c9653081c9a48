//! A VMM snapshot directory as one stream, for the disk that carries an emulated run's
//! warm snapshot between test hosts ([`super::warm`]): written by the test host that took
//! it, kept by the host, read by the next test host into a directory of its own.
//!
//! The stream: [`MAGIC`], then for each of the snapshot's files a header line (JSON:
//! its name, length and the extents that hold data) followed by those extents' bytes,
//! then an end line. The memory file is sparse where the guest's RAM is zero, and so is
//! the stream: only its data extents travel, each 64 KiB block of zeros left out.
//!
//! A pack is read as untrusted input: only the snapshot's file names, each once, lengths
//! and extents bounded, in order and inside the file; anything else is an error and the
//! directory written so far is the caller's to drop. What the files say is checked by
//! the VMM against the host's seal when it restores.

use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The first bytes of a pack (its format's version in them).
pub const MAGIC: &[u8] = b"mvm-snapshot-pack 1\n";
/// The files of a VMM snapshot directory that travel, in the order packed: the manifest
/// first, so the host reads it without reading the rest.
pub const FILES: [&str; 3] = ["manifest.json", "state.json", "memory"];
/// The most a header line may hold.
const MAX_HEADER: u64 = 4 << 20;
/// The largest manifest or state file.
const MAX_SMALL_FILE: u64 = 64 << 20;
/// The zero blocks left out of the memory file: its granularity in the stream.
const BLOCK: u64 = 64 << 10;
/// The most extents one file may have (a 4 GiB guest, every other block in use).
const MAX_EXTENTS: usize = 1 << 16;

/// A line of the stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
enum Header {
    /// A file: `len` bytes, of which `extents` (offset, length; in order, apart) hold
    /// data and the rest is zeros.
    File {
        name: String,
        len: u64,
        extents: Vec<(u64, u64)>,
    },
    /// The end of the pack.
    End,
}

/// Why a pack could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The stream is not a well-formed pack.
    #[error("not a snapshot pack: {0}")]
    Format(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackError {
    let what = what.into();
    move |source| PackError::Io { what, source }
}

fn format(why: impl Into<String>) -> PackError {
    PackError::Format(why.into())
}

/// Writes the snapshot in `dir` to `out` as a pack; returns the bytes written.
pub fn pack(dir: &Path, out: &mut impl Write) -> Result<u64, PackError> {
    let mut written = 0u64;
    out.write_all(MAGIC).map_err(io("writing the pack"))?;
    written += MAGIC.len() as u64;
    for name in FILES {
        let path = dir.join(name);
        let mut file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        let extents = data_extents(&mut file, len)
            .map_err(io(format!("finding the data in {}", path.display())))?;
        let header = Header::File {
            name: name.to_owned(),
            len,
            extents: extents.clone(),
        };
        written += write_line(out, &header)?;
        written += in_pieces(&extents, |at, piece| {
            file.read_exact_at(piece, at)
                .map_err(io(format!("reading {}", path.display())))?;
            out.write_all(piece).map_err(io("writing the pack"))
        })?;
    }
    written += write_line(out, &Header::End)?;
    out.flush().map_err(io("writing the pack"))?;
    Ok(written)
}

/// Calls `step` with each piece (at most 1 MiB) of `extents` in order, and its offset in
/// the file, in one buffer; returns the bytes passed.
fn in_pieces(
    extents: &[(u64, u64)],
    mut step: impl FnMut(u64, &mut [u8]) -> Result<(), PackError>,
) -> Result<u64, PackError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for &(offset, length) in extents {
        let end = offset.saturating_add(length);
        let mut at = offset;
        while at < end {
            let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let piece = buf.get_mut(..n).ok_or_else(|| format("buffer"))?;
            step(at, piece)?;
            at += n as u64;
            total += n as u64;
        }
    }
    Ok(total)
}

fn write_line(out: &mut impl Write, header: &Header) -> Result<u64, PackError> {
    let mut line = serde_json::to_vec(header).map_err(|e| format(e.to_string()))?;
    line.push(b'\n');
    out.write_all(&line).map_err(io("writing the pack"))?;
    Ok(line.len() as u64)
}

/// The extents of `file` (of `len` bytes) that hold data: the file system's data
/// regions (`SEEK_DATA`/`SEEK_HOLE`), less each [`BLOCK`] in them that is all zeros.
fn data_extents(file: &mut File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut regions = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        regions.push((start, end));
        at = end;
    }
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut block = vec![0u8; usize::try_from(BLOCK).unwrap_or(1 << 16)];
    for (start, end) in regions {
        let mut at = start;
        while at < end {
            let n = (end - at).min(BLOCK);
            let chunk = block
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            file.read_exact_at(chunk, at)?;
            if chunk.iter().any(|b| *b != 0) {
                match extents.last_mut() {
                    Some((offset, length)) if *offset + *length == at => *length += n,
                    _ => extents.push((at, n)),
                }
            }
            at += n;
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(extents)
}

/// `lseek(fd, from, whence)`; `None` where there is no more data (`ENXIO`).
fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let from = libc::off_t::try_from(from)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a file descriptor this function borrows; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(u64::try_from(at).ok())
}

/// Reads a pack from `input` into `dir` (which must exist and hold none of the files),
/// each file's length at most `max_memory` for the memory file and [`MAX_SMALL_FILE`]
/// for the others. Returns the data bytes read.
pub fn unpack(input: &mut impl BufRead, dir: &Path, max_memory: u64) -> Result<u64, PackError> {
    read_magic(input)?;
    let mut read = 0u64;
    for want in FILES {
        let (name, len, extents) = read_file_header(input)?;
        if name != want {
            return Err(format(format!("expected the file {want}, found {name:?}")));
        }
        let limit = if want == "memory" {
            max_memory
        } else {
            MAX_SMALL_FILE
        };
        check_extents(want, len, &extents, limit)?;
        let path = dir.join(want);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        file.set_len(len)
            .map_err(io(format!("sizing {}", path.display())))?;
        read += in_pieces(&extents, |at, piece| {
            input.read_exact(piece).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => format(format!("{want} cut short")),
                _ => PackError::Io {
                    what: "reading the pack".into(),
                    source: e,
                },
            })?;
            file.write_all_at(piece, at)
                .map_err(io(format!("writing {}", path.display())))
        })?;
    }
    match read_header(input)? {
        Header::End => Ok(read),
        Header::File { name, .. } => Err(format(format!("an extra file {name:?}"))),
    }
}

/// The manifest at the head of a pack (its first file), at most [`MAX_SMALL_FILE`].
pub fn read_manifest(input: &mut impl BufRead) -> Result<Vec<u8>, PackError> {
    read_magic(input)?;
    let (name, len, extents) = read_file_header(input)?;
    if name != FILES[0] {
        return Err(format(format!(
            "the first file is {name:?}, not the manifest"
        )));
    }
    check_extents(&name, len, &extents, MAX_SMALL_FILE)?;
    let mut manifest = vec![0u8; usize::try_from(len).map_err(|_| format("too long"))?];
    for (offset, length) in extents {
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(offset + length).ok())
            .and_then(|(a, b)| manifest.get_mut(a..b))
            .ok_or_else(|| format("an extent outside the manifest"))?;
        input
            .read_exact(range)
            .map_err(|_| format("the manifest cut short"))?;
    }
    Ok(manifest)
}

fn read_magic(input: &mut impl Read) -> Result<(), PackError> {
    let mut magic = [0u8; MAGIC.len()];
    input
        .read_exact(&mut magic)
        .map_err(|_| format("too short for its magic"))?;
    if magic != MAGIC {
        return Err(format("wrong magic (another format, or a blank disk)"));
    }
    Ok(())
}

fn read_header(input: &mut impl BufRead) -> Result<Header, PackError> {
    let mut line = Vec::new();
    input
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(io("reading the pack"))?;
    if line.last() != Some(&b'\n') {
        return Err(format("a header line cut short or too long"));
    }
    serde_json::from_slice(&line).map_err(|e| format(format!("a header: {e}")))
}

/// A file's header: its name, length and data extents.
type FileHeader = (String, u64, Vec<(u64, u64)>);

fn read_file_header(input: &mut impl BufRead) -> Result<FileHeader, PackError> {
    match read_header(input)? {
        Header::File { name, len, extents } => Ok((name, len, extents)),
        Header::End => Err(format("it ends before the snapshot's files")),
    }
}

/// Extents in order, apart, not empty, inside `len`; `len` at most `limit`.
fn check_extents(
    name: &str,
    len: u64,
    extents: &[(u64, u64)],
    limit: u64,
) -> Result<(), PackError> {
    if len > limit {
        return Err(format(format!(
            "{name}: {len} bytes, over the {limit} allowed"
        )));
    }
    if extents.len() > MAX_EXTENTS {
        return Err(format(format!("{name}: {} extents", extents.len())));
    }
    let mut end_of_last = 0u64;
    for (i, &(offset, length)) in extents.iter().enumerate() {
        let end = offset.checked_add(length);
        if length == 0 || (i > 0 && offset <= end_of_last) || end.is_none_or(|e| e > len) {
            return Err(format(format!(
                "{name}: extent {i} ({offset}, {length}) is empty, out of order or past {len} bytes"
            )));
        }
        end_of_last = end.unwrap_or(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A snapshot directory: a small manifest and state, a sparse memory file with data
    /// at two places (one a whole block of zeros written, which must be left out).
    fn snapshot() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), b"{\"m\":1}").unwrap();
        std::fs::write(dir.path().join("state.json"), b"{\"s\":2}").unwrap();
        let memory = File::create(dir.path().join("memory")).unwrap();
        memory.set_len(8 << 20).unwrap();
        memory.write_all_at(&[7u8; 5000], 4096).unwrap();
        memory.write_all_at(&vec![0u8; 1 << 20], 2 << 20).unwrap();
        memory.write_all_at(&[9u8; 3], (8 << 20) - 3).unwrap();
        dir
    }

    fn packed(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let n = pack(dir, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        out
    }

    #[test]
    fn a_pack_reads_back_to_the_same_files_and_carries_only_data() {
        let from = snapshot();
        let bytes = packed(from.path());
        // Two 64 KiB blocks of data, not the 8 MiB file nor the written zeros.
        assert!(bytes.len() < 2 * (64 << 10) + 1024, "{}", bytes.len());
        let to = tempfile::tempdir().unwrap();
        unpack(&mut bytes.as_slice(), to.path(), 8 << 20).unwrap();
        for name in FILES {
            assert_eq!(
                std::fs::read(from.path().join(name)).unwrap(),
                std::fs::read(to.path().join(name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(read_manifest(&mut bytes.as_slice()).unwrap(), b"{\"m\":1}");
    }

    #[test]
    fn a_cut_or_altered_pack_is_refused() {
        let from = snapshot();
        let bytes = packed(from.path());
        let refused = |bytes: &[u8], max: u64| {
            let to = tempfile::tempdir().unwrap();
            unpack(&mut &bytes[..], to.path(), max)
                .unwrap_err()
                .to_string()
        };
        // Cut anywhere: in the magic, a header, the data, before the end line.
        for cut in [5, 30, bytes.len() / 2, bytes.len() - 3] {
            let e = refused(&bytes[..cut], 8 << 20);
            assert!(e.starts_with("not a snapshot pack"), "{cut}: {e}");
        }
        // A memory file larger than the guest may have.
        assert!(refused(&bytes, 4 << 20).contains("over the"));
        // A blank disk.
        assert!(refused(&vec![0u8; 4096], 8 << 20).contains("magic"));
        // Bytes after the end of the stream's data are not read; a header naming
        // another file is refused, as are extents past the file or out of order.
        let text = String::from_utf8_lossy(&bytes).into_owned();
        for (from, to) in [
            ("\"name\":\"state.json\"", "\"name\":\"../../etc/x\""),
            ("\"len\":8388608", "\"len\":1000"),
        ] {
            let changed = text.replacen(from, to, 1);
            assert!(refused(changed.as_bytes(), 8 << 20).starts_with("not a snapshot pack"));
        }
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(
            b"{\"kind\":\"file\",\"name\":\"manifest.json\",\"len\":100,\"extents\":[[50,10],[40,5]]}\n",
        );
        assert!(refused(&header, 8 << 20).contains("out of order"));
    }

    #[test]
    fn unpacking_never_writes_over_a_file_there() {
        let from = snapshot();
        let bytes = packed(from.path());
        let to = tempfile::tempdir().unwrap();
        std::fs::write(to.path().join("state.json"), b"mine").unwrap();
        let e = unpack(&mut bytes.as_slice(), to.path(), 8 << 20).unwrap_err();
        assert!(e.to_string().contains("creating"), "{e}");
        assert_eq!(
            std::fs::read(to.path().join("state.json")).unwrap(),
            b"mine"
        );
    }
}
