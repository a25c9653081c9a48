//! Writing and reading whole files for the host.
//!
//! The agent runs as root, so it never follows a symlink in the last component of a path
//! it writes (a workload could plant one to redirect the write), and it only reads regular
//! files (a FIFO would block and a device could be endless).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{fchown, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use super::reply::{reply, Responder};
use crate::protocol::{
    ErrorCode, ErrorReply, FileDone, Message, ReadFileRequest, WriteFileRequest, DATA_CHUNK,
};

pub(super) fn io_reply(action: &str, path: &str, error: &io::Error) -> ErrorReply {
    let code = match error.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    reply(code, format!("{action} {path:?}: {error}"))
}

/// A file being written, chunk by chunk.
pub(super) struct WriteSink {
    file: File,
    path: String,
    size: u64,
    /// An atomic write's temporary file, renamed over `path` at the end and removed if
    /// the write never ends.
    temp: Option<String>,
}

/// The temporary name of an atomic write: hidden, beside the target (the same
/// filesystem, so the rename is atomic), unique per agent process and write.
fn temp_name(path: &str) -> Result<String, ErrorReply> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() || name == "." || name == ".." {
        return Err(reply(
            ErrorCode::BadRequest,
            format!("{path:?} does not name a file"),
        ));
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(format!("{dir}/.{name}.mvm-part-{}-{n}", std::process::id()))
}

impl WriteSink {
    /// Opens (creating, truncating unless appending) the file a request names; an atomic
    /// write opens a fresh temporary file beside it instead.
    pub(super) fn open(request: &WriteFileRequest) -> Result<Self, ErrorReply> {
        let path = &request.path;
        let temp = request.atomic.then(|| temp_name(path)).transpose()?;
        let mut options = OpenOptions::new();
        options.write(true).mode(request.mode);
        match &temp {
            // A name nobody else uses: created here, never an existing file or link.
            Some(_) => options.create_new(true),
            None => options
                .create(true)
                .truncate(!request.append)
                .append(request.append),
        };
        let file = options
            // No symlink in the last component; a FIFO without a reader fails at once
            // instead of blocking the connection.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(temp.as_deref().unwrap_or(path))
            .map_err(|e| io_reply("cannot open for writing", path, &e))?;
        // From here an error drops `sink`, and an atomic write's temporary file with it.
        let sink = Self {
            file,
            path: path.clone(),
            size: 0,
            temp,
        };
        let is_file = sink.file.metadata().is_ok_and(|m| m.is_file());
        if !is_file {
            return Err(reply(
                ErrorCode::BadRequest,
                format!("{path:?} is not a regular file"),
            ));
        }
        // The mode applies to an existing file too, and regardless of the umask.
        sink.file
            .set_permissions(std::fs::Permissions::from_mode(request.mode))
            .map_err(|e| io_reply("cannot set mode of", path, &e))?;
        if request.uid.is_some() || request.gid.is_some() {
            fchown(&sink.file, request.uid, request.gid)
                .map_err(|e| io_reply("cannot change owner of", path, &e))?;
        }
        Ok(sink)
    }

    /// Appends one chunk.
    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), ErrorReply> {
        self.file
            .write_all(data)
            .map_err(|e| io_reply("cannot write", &self.path, &e))?;
        self.size = self
            .size
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    /// Completes the write: an atomic one is synced and renamed over its target.
    pub(super) fn finish(mut self) -> Result<FileDone, ErrorReply> {
        self.file
            .flush()
            .map_err(|e| io_reply("cannot write", &self.path, &e))?;
        if let Some(temp) = &self.temp {
            self.file
                .sync_all()
                .map_err(|e| io_reply("cannot sync", &self.path, &e))?;
            // rename(2) replaces a symlink at the target rather than following it.
            std::fs::rename(temp, &self.path)
                .map_err(|e| io_reply("cannot rename into place", &self.path, &e))?;
            self.temp = None;
        }
        tracing::info!("wrote {} bytes to {:?}", self.size, self.path);
        Ok(FileDone { size: self.size })
    }
}

impl Drop for WriteSink {
    /// An atomic write that did not finish (an error, a cancel, a closed connection)
    /// leaves nothing behind.
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            if let Err(e) = std::fs::remove_file(&temp) {
                tracing::warn!("cannot remove the unfinished write {temp:?}: {e}");
            }
        }
    }
}

/// Opens the file a read request names; it must be a regular file.
pub(super) fn open_for_read(request: &ReadFileRequest) -> Result<File, ErrorReply> {
    let path = &request.path;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_reply("cannot open for reading", path, &e))?;
    let is_file = file.metadata().is_ok_and(|m| m.is_file());
    if !is_file {
        return Err(reply(
            ErrorCode::BadRequest,
            format!("{path:?} is not a regular file"),
        ));
    }
    Ok(file)
}

/// Streams a file to the client on its own thread: data frames, then a done frame.
pub(super) fn stream_file<R: Responder>(mut file: File, shared: Arc<R>, id: u32) {
    let worker = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name(format!("read-{id}"))
        .spawn(move || {
            let mut buf = vec![0u8; DATA_CHUNK];
            let mut size: u64 = 0;
            let outcome = loop {
                match file.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        let data = buf.get(..n).unwrap_or_default().to_vec();
                        if !worker.send(id, &Message::FileData(data)) {
                            break Ok(());
                        }
                        size = size.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            worker.finish(id);
            match outcome {
                Ok(()) => {
                    worker.send(id, &Message::FileDone(FileDone { size }));
                }
                Err(e) => {
                    worker.send_error(id, reply(ErrorCode::Io, format!("reading file: {e}")));
                }
            }
        });
    if let Err(e) = spawned {
        shared.finish(id);
        shared.send_error(
            id,
            reply(ErrorCode::Io, format!("cannot start a reader: {e}")),
        );
    }
}
