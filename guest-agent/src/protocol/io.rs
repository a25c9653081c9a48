//! Reading and writing frames on byte streams.

use std::io::{self, Read, Write};

use super::error::{DecodeError, EncodeError};
use super::frame::{decode, encode, peek_len, Frame};
use super::message::Message;
use super::LEN_PREFIX;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed.
    #[error("reading frame: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Why a frame could not be written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The stream failed.
    #[error("writing frame: {0}")]
    Io(#[from] io::Error),
    /// The message cannot be a frame.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Reads until `buf` is full. Returns how many bytes arrived before end of stream.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
///
/// The length prefix is validated before the body buffer is allocated.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>, ReadError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let got = read_full(reader, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < LEN_PREFIX {
        return Err(DecodeError::Truncated {
            needed: LEN_PREFIX,
            have: got,
        }
        .into());
    }
    let len = peek_len(prefix)?;
    let mut buf = vec![0u8; LEN_PREFIX + len];
    let (head, rest) = buf.split_at_mut(LEN_PREFIX);
    head.copy_from_slice(&prefix);
    let got = read_full(reader, rest)?;
    if got < len {
        return Err(DecodeError::Truncated {
            needed: LEN_PREFIX + len,
            have: LEN_PREFIX + got,
        }
        .into());
    }
    let (frame, _) = decode(&buf)?;
    Ok(Some(frame))
}

/// Writes one frame with a single `write_all`, so concurrent writers that share a lock
/// never interleave partial frames.
pub fn write_frame(
    writer: &mut impl Write,
    request_id: u32,
    message: &Message,
) -> Result<(), WriteError> {
    let bytes = encode(request_id, message)?;
    writer.write_all(&bytes)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MAX_FRAME_LEN;

    #[test]
    fn clean_eof_between_frames_is_none() {
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty).unwrap().is_none());
    }

    #[test]
    fn frames_stream_in_order() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, 1, &Message::Ping).unwrap();
        write_frame(&mut bytes, 2, &Message::Stdout(vec![7; 3000])).unwrap();
        let mut reader: &[u8] = &bytes;
        assert_eq!(
            read_frame(&mut reader).unwrap().unwrap().message,
            Message::Ping
        );
        let second = read_frame(&mut reader).unwrap().unwrap();
        assert_eq!(second.request_id, 2);
        assert_eq!(second.message, Message::Stdout(vec![7; 3000]));
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn eof_inside_a_frame_is_truncated() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, 1, &Message::Stdout(vec![1; 10])).unwrap();
        for cut in [2, 6, bytes.len() - 1] {
            let mut reader: &[u8] = &bytes[..cut];
            assert!(matches!(
                read_frame(&mut reader),
                Err(ReadError::Decode(DecodeError::Truncated { .. }))
            ));
        }
    }

    #[test]
    fn oversize_prefix_is_refused_without_reading_a_body() {
        // A prefix claiming 4 GiB followed by nothing: refused at once.
        let mut reader: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut reader),
            Err(ReadError::Decode(DecodeError::Oversize { .. }))
        ));
        let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
        let mut reader: &[u8] = &len;
        assert!(matches!(
            read_frame(&mut reader),
            Err(ReadError::Decode(DecodeError::Oversize { .. }))
        ));
    }
}
