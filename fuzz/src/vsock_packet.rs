//! `vsock_packet`: the bytes of a guest TX descriptor chain through
//! [`parse_tx_packet`], and the host-side `CONNECT <port>` line parser.
//!
//! Invariants: an accepted packet is exactly what the spec allows the guest to send
//! (its own CID, to the host, stream type, a known op, `len` bytes of data only on RW,
//! never more than `MAX_PKT_DATA`), and the header re-encodes to the bytes it came from.

use mvm_devices::virtio::vsock::packet::{parse_tx_packet, Op, VsockHeader};
use mvm_devices::virtio::vsock::unix::parse_connect_line;
use mvm_devices::virtio::vsock::{
    MAX_PKT_DATA, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, VSOCK_HDR_SIZE,
};

/// The guest CID the harness's device has.
pub const GUEST_CID: u64 = 3;

/// Runs one input.
pub fn run(data: &[u8]) {
    check_packet(data, GUEST_CID);
    // A header that claims its own src_cid as the guest's reaches every later check.
    if let Some(hdr) = VsockHeader::from_prefix(data) {
        check_packet(data, hdr.src_cid);
    }
    check_connect_line(data);
}

fn check_packet(data: &[u8], guest_cid: u64) {
    let Ok(pkt) = parse_tx_packet(data, guest_cid) else {
        return;
    };
    let hdr = pkt.hdr;
    assert_eq!(hdr.src_cid, guest_cid, "accepted a spoofed src_cid");
    assert_eq!(
        hdr.dst_cid, VMADDR_CID_HOST,
        "accepted a packet not for the host"
    );
    assert_eq!(hdr.type_, VIRTIO_VSOCK_TYPE_STREAM);
    assert!(hdr.len <= MAX_PKT_DATA, "accepted len {}", hdr.len);
    assert_eq!(
        pkt.data.len(),
        hdr.len as usize,
        "data is not exactly len bytes"
    );
    if pkt.op != Op::Rw {
        assert!(
            pkt.data.is_empty(),
            "control packet {:?} carries data",
            pkt.op
        );
    }
    assert_eq!(
        &hdr.to_bytes()[..],
        &data[..VSOCK_HDR_SIZE],
        "header does not re-encode to its wire bytes"
    );
    assert_eq!(
        &data[VSOCK_HDR_SIZE..VSOCK_HDR_SIZE + pkt.data.len()],
        pkt.data,
        "payload is not the bytes after the header"
    );
}

fn check_connect_line(data: &[u8]) {
    if let Ok(port) = parse_connect_line(data) {
        let text = std::str::from_utf8(data).expect("an accepted CONNECT line is ASCII");
        assert!(text.starts_with("CONNECT "), "accepted {text:?}");
        assert!(text.ends_with('\n'), "accepted {text:?} without a newline");
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(
            digits.trim_start_matches('0').parse::<u32>().unwrap_or(0),
            port
        );
    }
}
