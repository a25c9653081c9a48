//! Why bytes are not a frame, or a message cannot become one.

use super::frame_type::FrameType;

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// More bytes are needed; not an error on a stream that is still open.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs in total (so far known).
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The length prefix exceeds the maximum frame size.
    #[error("oversize frame: length {len} exceeds the maximum {max}")]
    Oversize {
        /// Declared length.
        len: u64,
        /// Maximum length.
        max: usize,
    },
    /// The length prefix is too small to hold the header.
    #[error("undersize frame: length {len} is below the header size {min}")]
    Undersize {
        /// Declared length.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// The frame type byte is not one this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body does not fit its frame type.
    #[error("bad body for {frame_type:?} frame: {reason}")]
    BadBody {
        /// The frame's type.
        frame_type: FrameType,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a message cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The body would exceed the maximum frame size.
    #[error("{frame_type:?} frame body of {len} bytes exceeds the maximum {max}")]
    Oversize {
        /// The frame's type.
        frame_type: FrameType,
        /// Body length.
        len: usize,
        /// Maximum body length.
        max: usize,
    },
    /// A control body could not be serialised.
    #[error("cannot serialise {frame_type:?} body: {source}")]
    Json {
        /// The frame's type.
        frame_type: FrameType,
        /// The serialiser's error.
        source: serde_json::Error,
    },
}
