//! `agent_frame`: the guest agent's RPC frame decoder, one buffer at a time
//! ([`decode`]) and as a stream ([`read_frame`]).
//!
//! Invariants: a decoded frame used exactly `4 + length prefix` bytes and no more than
//! it was given; it re-encodes and decodes to the same frame; the stream reader yields
//! exactly the frames that repeated `decode` calls find, and stops.

use mvm_agent::protocol::{decode, encode, read_frame, LEN_PREFIX, MAX_FRAME_LEN};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut expected = Vec::new();
    let mut rest = data;
    while let Ok((frame, used)) = decode(rest) {
        let prefix = u32::from_be_bytes(rest[..LEN_PREFIX].try_into().expect("4 bytes"));
        assert_eq!(
            used,
            LEN_PREFIX + prefix as usize,
            "used bytes disagree with the prefix"
        );
        assert!(used <= rest.len() && used <= LEN_PREFIX + MAX_FRAME_LEN);
        let again = encode(frame.request_id, &frame.message)
            .unwrap_or_else(|e| panic!("a decoded frame does not re-encode: {e}: {frame:?}"));
        let (round, round_used) = decode(&again).expect("a re-encoded frame decodes");
        assert_eq!(round, frame, "frame changed in a round trip");
        assert_eq!(round_used, again.len());
        expected.push(frame);
        rest = &rest[used..];
    }

    let mut stream = data;
    let mut got = Vec::new();
    // Each frame consumes at least LEN_PREFIX + HEADER_LEN bytes, so this ends.
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        got.push(frame);
        assert!(got.len() <= data.len(), "stream reader does not advance");
    }
    assert_eq!(got, expected, "stream and buffer decoders disagree");
}
