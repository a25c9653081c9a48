//! Frame layout, and the one function that turns bytes into a typed frame.

use super::error::{DecodeError, EncodeError};
use super::frame_type::FrameType;
use super::message::Message;
use super::{HEADER_LEN, LEN_PREFIX, MAX_FRAME_LEN};

/// A decoded frame: which request it belongs to and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The request id chosen by the client (0: the connection itself).
    pub request_id: u32,
    /// The typed content.
    pub message: Message,
}

/// Checks a length prefix and returns the number of bytes that follow it.
///
/// Stream readers call this before allocating the frame buffer.
pub fn peek_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, DecodeError> {
    let raw = u32::from_be_bytes(prefix);
    let len = usize::try_from(raw).map_err(|_| DecodeError::Oversize {
        len: u64::from(raw),
        max: MAX_FRAME_LEN,
    })?;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::Oversize {
            len: u64::from(raw),
            max: MAX_FRAME_LEN,
        });
    }
    if len < HEADER_LEN {
        return Err(DecodeError::Undersize {
            len,
            min: HEADER_LEN,
        });
    }
    Ok(len)
}

/// Decodes the frame at the start of `bytes`, returning it and the bytes it used.
///
/// This is the whole parsing surface of the protocol (the fuzz target): it never panics,
/// and never allocates more than the frame's body.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
    let prefix: [u8; LEN_PREFIX] = bytes
        .get(..LEN_PREFIX)
        .and_then(|p| p.try_into().ok())
        .ok_or(DecodeError::Truncated {
            needed: LEN_PREFIX,
            have: bytes.len(),
        })?;
    let len = peek_len(prefix)?;
    let total = LEN_PREFIX + len;
    let frame = bytes.get(LEN_PREFIX..total).ok_or(DecodeError::Truncated {
        needed: total,
        have: bytes.len(),
    })?;
    let (header, body) = frame
        .split_at_checked(HEADER_LEN)
        .ok_or(DecodeError::Undersize {
            len,
            min: HEADER_LEN,
        })?;
    let [type_byte, id0, id1, id2, id3] = *header else {
        return Err(DecodeError::Undersize {
            len,
            min: HEADER_LEN,
        });
    };
    let frame_type = FrameType::from_byte(type_byte).ok_or(DecodeError::UnknownType(type_byte))?;
    let request_id = u32::from_be_bytes([id0, id1, id2, id3]);
    let message = Message::from_body(frame_type, body)?;
    Ok((
        Frame {
            request_id,
            message,
        },
        total,
    ))
}

/// Encodes one frame: length prefix, header, body.
pub fn encode(request_id: u32, message: &Message) -> Result<Vec<u8>, EncodeError> {
    let frame_type = message.frame_type();
    let body = message.body()?;
    let max = MAX_FRAME_LEN - HEADER_LEN;
    if body.len() > max {
        return Err(EncodeError::Oversize {
            frame_type,
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(HEADER_LEN + body.len()).map_err(|_| EncodeError::Oversize {
        frame_type,
        len: body.len(),
        max,
    })?;
    let mut out = Vec::with_capacity(LEN_PREFIX + HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(frame_type as u8);
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::message::{ErrorCode, ErrorReply, ExecRequest, ExitStatus, Hello};
    use super::super::MAX_BODY_LEN;
    use super::*;

    fn raw(frame_type: u8, request_id: u32, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(HEADER_LEN + body.len()).unwrap();
        let mut out = len.to_be_bytes().to_vec();
        out.push(frame_type);
        out.extend_from_slice(&request_id.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn round_trips_every_kind_of_message() {
        let messages = vec![
            Message::Hello(Hello {
                major: 1,
                minor: 0,
                software: "t".into(),
            }),
            Message::Ping,
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                timeout_ms: Some(5),
                ..ExecRequest::default()
            }),
            Message::Stdout((0..=255u8).collect()),
            Message::Stdin(Vec::new()),
            Message::StdinClose,
            Message::Exit(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ms: 7,
            }),
            Message::Error(ErrorReply {
                code: ErrorCode::BadCwd,
                message: "x".into(),
            }),
            Message::FileEnd,
            Message::ShutdownAck,
        ];
        for (i, message) in messages.into_iter().enumerate() {
            let id = u32::try_from(i).unwrap() + 7;
            let bytes = encode(id, &message).unwrap();
            let (frame, used) = decode(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame.request_id, id);
            assert_eq!(frame.message, message);
        }
    }

    #[test]
    fn data_bodies_are_raw_bytes() {
        let bytes = encode(3, &Message::Stderr(b"\x00\xffraw".to_vec())).unwrap();
        assert_eq!(&bytes[..4], &[0, 0, 0, 5 + 5]);
        assert_eq!(bytes[4], FrameType::Stderr as u8);
        assert_eq!(&bytes[9..], b"\x00\xffraw");
    }

    #[test]
    fn two_frames_back_to_back_decode_in_turn() {
        let mut bytes = encode(1, &Message::Ping).unwrap();
        bytes.extend(encode(2, &Message::Stdout(b"x".to_vec())).unwrap());
        let (first, used) = decode(&bytes).unwrap();
        assert_eq!(first.request_id, 1);
        let (second, used2) = decode(&bytes[used..]).unwrap();
        assert_eq!(second.message, Message::Stdout(b"x".to_vec()));
        assert_eq!(used + used2, bytes.len());
    }

    #[test]
    fn truncated_prefix_and_body() {
        assert_eq!(
            decode(&[0, 0]),
            Err(DecodeError::Truncated { needed: 4, have: 2 })
        );
        let bytes = encode(1, &Message::Stdout(vec![1; 100])).unwrap();
        assert_eq!(
            decode(&bytes[..50]),
            Err(DecodeError::Truncated {
                needed: bytes.len(),
                have: 50
            })
        );
        assert_eq!(
            decode(&[]),
            Err(DecodeError::Truncated { needed: 4, have: 0 })
        );
    }

    #[test]
    fn oversize_is_refused_from_the_prefix_alone() {
        // Only the 4-byte prefix: the decoder must not wait for (or allocate) the body.
        let prefix = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
        assert_eq!(
            decode(&prefix),
            Err(DecodeError::Oversize {
                len: u64::try_from(MAX_FRAME_LEN + 1).unwrap(),
                max: MAX_FRAME_LEN
            })
        );
        assert!(matches!(
            peek_len(u32::MAX.to_be_bytes()),
            Err(DecodeError::Oversize { .. })
        ));
        assert_eq!(
            peek_len(u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes()),
            Ok(MAX_FRAME_LEN)
        );
    }

    #[test]
    fn encoder_refuses_oversize_bodies() {
        assert!(encode(1, &Message::Stdout(vec![0; MAX_BODY_LEN])).is_ok());
        assert!(matches!(
            encode(1, &Message::Stdout(vec![0; MAX_BODY_LEN + 1])),
            Err(EncodeError::Oversize { .. })
        ));
    }

    #[test]
    fn undersize_length_is_refused() {
        assert_eq!(
            decode(&[0, 0, 0, 4, 1, 0, 0, 0]),
            Err(DecodeError::Undersize { len: 4, min: 5 })
        );
    }

    #[test]
    fn unknown_type_is_refused() {
        assert_eq!(
            decode(&raw(0x7f, 1, b"")),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert_eq!(
            decode(&raw(0x00, 1, b"")),
            Err(DecodeError::UnknownType(0x00))
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_their_type() {
        let cases: Vec<(u8, &[u8])> = vec![
            (FrameType::Hello as u8, b"{not json"),
            (
                FrameType::Hello as u8,
                b"{\"major\":\"one\",\"minor\":0,\"software\":\"x\"}",
            ),
            (FrameType::Ping as u8, b"x"),
            (FrameType::StdinClose as u8, b"\x00"),
            (FrameType::Exec as u8, b"{\"argv\":[]}"),
            (FrameType::Exec as u8, b"{\"argv\":[\"\"]}"),
            (FrameType::Exec as u8, b"{\"argv\":[\"a\\u0000b\"]}"),
            (
                FrameType::Exec as u8,
                b"{\"argv\":[\"ls\"],\"env\":{\"A=B\":\"c\"}}",
            ),
            (
                FrameType::Exec as u8,
                b"{\"argv\":[\"ls\"],\"cwd\":\"relative\"}",
            ),
            (FrameType::Exec as u8, b"{\"argv\":[\"ls\"],\"surprise\":1}"),
            (FrameType::Signal as u8, b"{\"signal\":0}"),
            (FrameType::Signal as u8, b"{\"signal\":65}"),
            (FrameType::WriteFile as u8, b"{\"path\":\"etc/passwd\"}"),
            (
                FrameType::WriteFile as u8,
                b"{\"path\":\"/x\",\"mode\":65536}",
            ),
            (FrameType::ReadFile as u8, b"{\"path\":\"\"}"),
            (FrameType::Exit as u8, b"{}"),
        ];
        for (frame_type, body) in cases {
            let result = decode(&raw(frame_type, 1, body));
            match result {
                Err(DecodeError::BadBody { frame_type: t, .. }) => assert_eq!(t as u8, frame_type),
                other => panic!(
                    "body {:?}: expected BadBody, got {other:?}",
                    String::from_utf8_lossy(body)
                ),
            }
        }
    }

    #[test]
    fn hello_from_a_newer_peer_still_decodes() {
        let body = br#"{"major":2,"minor":5,"software":"future","features":["x"]}"#;
        let (frame, _) = decode(&raw(FrameType::Hello as u8, 0, body)).unwrap();
        assert_eq!(
            frame.message,
            Message::Hello(Hello {
                major: 2,
                minor: 5,
                software: "future".into()
            })
        );
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        let body = br#"{"code":"brand_new","message":"m"}"#;
        let (frame, _) = decode(&raw(FrameType::Error as u8, 0, body)).unwrap();
        assert!(matches!(
            frame.message,
            Message::Error(ErrorReply {
                code: ErrorCode::Unknown,
                ..
            })
        ));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_prefixes() {
        // A cheap stand-in for the fuzzer: every prefix and every single-byte corruption
        // of a valid frame yields Ok or a typed error.
        let valid = encode(
            9,
            &Message::Exec(ExecRequest {
                argv: vec!["true".into()],
                ..ExecRequest::default()
            }),
        )
        .unwrap();
        for end in 0..valid.len() {
            assert!(matches!(
                decode(&valid[..end]),
                Err(DecodeError::Truncated { .. })
            ));
        }
        for i in 0..valid.len() {
            for value in [0u8, 0x7f, 0xff] {
                let mut bytes = valid.clone();
                bytes[i] = value;
                let _ = decode(&bytes);
            }
        }
    }
}
