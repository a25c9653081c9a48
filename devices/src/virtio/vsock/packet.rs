//! vsock packets: parsing what the guest puts on the TX queue, building what it
//! receives on the RX queue.
//!
//! [`parse_tx_packet`] is the whole fuzzable surface: it takes the bytes the guest
//! handed over and returns a validated [`TxPacket`] or a typed [`PacketError`].
//! Nothing in this module performs I/O on host sockets.

use std::io::{self, Read, Write};

use mvm_loader::bytes::{le_u16, le_u32, le_u64};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Reader};

use crate::virtio::GuestMemoryMmap;

use super::{
    HDR_OFF_BUF_ALLOC, HDR_OFF_DST_CID, HDR_OFF_DST_PORT, HDR_OFF_FLAGS, HDR_OFF_FWD_CNT,
    HDR_OFF_LEN, HDR_OFF_OP, HDR_OFF_SRC_CID, HDR_OFF_SRC_PORT, HDR_OFF_TYPE, MAX_PKT_DATA,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV, VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST, VSOCK_HDR_SIZE,
};

/// Why a packet from the guest was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer readable bytes than a header.
    #[error("vsock packet too short for a header: {0} bytes, need {VSOCK_HDR_SIZE}")]
    HeaderTooShort(usize),
    /// `len` larger than any packet may carry.
    #[error("vsock packet len {0} exceeds the maximum {MAX_PKT_DATA}")]
    DataTooLong(u32),
    /// `len` larger than the bytes the descriptors actually hold.
    #[error("vsock packet len {len} but only {available} data bytes in the descriptors")]
    DataTruncated {
        /// The header's `len`.
        len: u32,
        /// Readable bytes after the header.
        available: usize,
    },
    /// `src_cid` is not the guest's CID (a spoofed source).
    #[error("vsock packet src_cid {found}, guest cid is {expected}")]
    SrcCid {
        /// The guest's CID.
        expected: u64,
        /// The header's `src_cid`.
        found: u64,
    },
    /// `dst_cid` is not the host: this device only forwards to the host.
    #[error("vsock packet dst_cid {0}, only the host (cid {VMADDR_CID_HOST}) is reachable")]
    DstCid(u64),
    /// A socket type other than stream.
    #[error("vsock packet type {0}, only stream ({VIRTIO_VSOCK_TYPE_STREAM}) is supported")]
    Type(u16),
    /// An op outside the spec.
    #[error("vsock packet op {0} is unknown")]
    Op(u16),
    /// A control packet (not RW) that claims to carry data.
    #[error("vsock control packet op {op} carries {len} data bytes")]
    DataOnControl {
        /// The header's op.
        op: u16,
        /// The header's `len`.
        len: u32,
    },
    /// The descriptor chain could not be read or written.
    #[error("vsock descriptor chain: {0}")]
    Chain(String),
}

impl PacketError {
    /// Whether the guest should get an RST for this packet (its addresses are
    /// trustworthy enough to answer) rather than a silent drop.
    pub fn deserves_rst(&self) -> bool {
        matches!(
            self,
            PacketError::DstCid(_)
                | PacketError::Type(_)
                | PacketError::Op(_)
                | PacketError::DataOnControl { .. }
        )
    }
}

/// `struct virtio_vsock_hdr`, decoded to host order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags (shutdown flags).
    pub flags: u32,
    /// Receive buffer the sender has for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn put(b: &mut [u8; VSOCK_HDR_SIZE], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

impl VsockHeader {
    /// Decodes the little-endian wire form (a whole header by its type, so nothing is
    /// missing; [`Self::from_prefix`] is the decoder).
    pub fn from_bytes(b: &[u8; VSOCK_HDR_SIZE]) -> Self {
        Self::from_prefix(b).unwrap_or_default()
    }

    /// Decodes the header at the start of `bytes`, if there is a whole one.
    pub fn from_prefix(b: &[u8]) -> Option<Self> {
        Some(VsockHeader {
            src_cid: le_u64(b, HDR_OFF_SRC_CID)?,
            dst_cid: le_u64(b, HDR_OFF_DST_CID)?,
            src_port: le_u32(b, HDR_OFF_SRC_PORT)?,
            dst_port: le_u32(b, HDR_OFF_DST_PORT)?,
            len: le_u32(b, HDR_OFF_LEN)?,
            type_: le_u16(b, HDR_OFF_TYPE)?,
            op: le_u16(b, HDR_OFF_OP)?,
            flags: le_u32(b, HDR_OFF_FLAGS)?,
            buf_alloc: le_u32(b, HDR_OFF_BUF_ALLOC)?,
            fwd_cnt: le_u32(b, HDR_OFF_FWD_CNT)?,
        })
    }

    /// Encodes the little-endian wire form.
    pub fn to_bytes(&self) -> [u8; VSOCK_HDR_SIZE] {
        let mut b = [0u8; VSOCK_HDR_SIZE];
        put(&mut b, HDR_OFF_SRC_CID, &self.src_cid.to_le_bytes());
        put(&mut b, HDR_OFF_DST_CID, &self.dst_cid.to_le_bytes());
        put(&mut b, HDR_OFF_SRC_PORT, &self.src_port.to_le_bytes());
        put(&mut b, HDR_OFF_DST_PORT, &self.dst_port.to_le_bytes());
        put(&mut b, HDR_OFF_LEN, &self.len.to_le_bytes());
        put(&mut b, HDR_OFF_TYPE, &self.type_.to_le_bytes());
        put(&mut b, HDR_OFF_OP, &self.op.to_le_bytes());
        put(&mut b, HDR_OFF_FLAGS, &self.flags.to_le_bytes());
        put(&mut b, HDR_OFF_BUF_ALLOC, &self.buf_alloc.to_le_bytes());
        put(&mut b, HDR_OFF_FWD_CNT, &self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A validated operation from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open a connection.
    Request,
    /// Accept a connection the host opened.
    Response,
    /// Refuse or abort a connection.
    Rst,
    /// The guest will receive (`rcv`) and/or send (`send`) no more.
    Shutdown {
        /// `VIRTIO_VSOCK_SHUTDOWN_RCV` was set.
        rcv: bool,
        /// `VIRTIO_VSOCK_SHUTDOWN_SEND` was set.
        send: bool,
    },
    /// Stream data.
    Rw,
    /// The guest announces its credit (in every header; this op carries nothing else).
    CreditUpdate,
    /// The guest asks for the device's credit.
    CreditRequest,
}

/// A packet from the guest after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket<'a> {
    /// The header as sent.
    pub hdr: VsockHeader,
    /// The operation, decoded.
    pub op: Op,
    /// The payload: exactly `hdr.len` bytes, empty unless `op` is [`Op::Rw`].
    pub data: &'a [u8],
}

/// Parses and validates one guest packet from the bytes of its descriptor chain
/// (header followed by payload, possibly followed by slack that is ignored).
pub fn parse_tx_packet(bytes: &[u8], guest_cid: u64) -> Result<TxPacket<'_>, PacketError> {
    let hdr = VsockHeader::from_prefix(bytes).ok_or(PacketError::HeaderTooShort(bytes.len()))?;
    let rest = bytes.get(VSOCK_HDR_SIZE..).unwrap_or_default();
    if hdr.len > MAX_PKT_DATA {
        return Err(PacketError::DataTooLong(hdr.len));
    }
    let len = usize::try_from(hdr.len).map_err(|_| PacketError::DataTooLong(hdr.len))?;
    let data = rest.get(..len).ok_or(PacketError::DataTruncated {
        len: hdr.len,
        available: rest.len(),
    })?;
    if hdr.src_cid != guest_cid {
        return Err(PacketError::SrcCid {
            expected: guest_cid,
            found: hdr.src_cid,
        });
    }
    if hdr.dst_cid != VMADDR_CID_HOST {
        return Err(PacketError::DstCid(hdr.dst_cid));
    }
    if hdr.type_ != VIRTIO_VSOCK_TYPE_STREAM {
        return Err(PacketError::Type(hdr.type_));
    }
    let op = match hdr.op {
        VIRTIO_VSOCK_OP_REQUEST => Op::Request,
        VIRTIO_VSOCK_OP_RESPONSE => Op::Response,
        VIRTIO_VSOCK_OP_RST => Op::Rst,
        VIRTIO_VSOCK_OP_SHUTDOWN => Op::Shutdown {
            rcv: hdr.flags & VIRTIO_VSOCK_SHUTDOWN_RCV != 0,
            send: hdr.flags & VIRTIO_VSOCK_SHUTDOWN_SEND != 0,
        },
        VIRTIO_VSOCK_OP_RW => Op::Rw,
        VIRTIO_VSOCK_OP_CREDIT_UPDATE => Op::CreditUpdate,
        VIRTIO_VSOCK_OP_CREDIT_REQUEST => Op::CreditRequest,
        other => return Err(PacketError::Op(other)),
    };
    if op != Op::Rw && hdr.len != 0 {
        return Err(PacketError::DataOnControl {
            op: hdr.op,
            len: hdr.len,
        });
    }
    Ok(TxPacket { hdr, op, data })
}

/// Copies the readable part of a TX descriptor chain into `buf` (header plus at
/// most [`MAX_PKT_DATA`] bytes; the rest of an oversized chain is not read), ready
/// for [`parse_tx_packet`].
pub fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
) -> Result<(), PacketError> {
    let mut reader =
        Reader::<()>::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    let cap = VSOCK_HDR_SIZE.saturating_add(MAX_PKT_DATA as usize);
    // One byte past the cap, so an oversized payload is still seen as such.
    let n = reader.available_bytes().min(cap.saturating_add(1));
    buf.clear();
    buf.resize(n, 0);
    reader
        .read_exact(buf.as_mut_slice())
        .map_err(|e| PacketError::Chain(e.to_string()))
}

/// Bytes a guest RX chain can take as payload after the header (0 if it cannot
/// even hold a header), capped at [`MAX_PKT_DATA`].
pub fn rx_payload_capacity(chain_writable: usize) -> usize {
    chain_writable
        .saturating_sub(VSOCK_HDR_SIZE)
        .min(MAX_PKT_DATA as usize)
}

/// Writes one packet (header, then payload) to a sink, returning the bytes written.
/// `hdr.len` must already equal `data.len()`.
pub fn write_rx_packet<W: Write>(w: &mut W, hdr: &VsockHeader, data: &[u8]) -> io::Result<u32> {
    w.write_all(&hdr.to_bytes())?;
    w.write_all(data)?;
    let total = VSOCK_HDR_SIZE.saturating_add(data.len());
    u32::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn hdr(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST,
            dst_cid: VMADDR_CID_HOST,
            src_port: 1234,
            dst_port: 52,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn wire(h: &VsockHeader, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_rx_packet(&mut v, h, data).unwrap();
        v
    }

    #[test]
    fn header_round_trips_with_the_linux_layout() {
        let h = hdr(VIRTIO_VSOCK_OP_RW, 3);
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        // dst_port at 20, op at 30, fwd_cnt at 40, little-endian.
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&b), h);
    }

    #[test]
    fn parses_rw_with_payload_and_ignores_slack() {
        let mut bytes = wire(&hdr(VIRTIO_VSOCK_OP_RW, 3), b"abc");
        bytes.extend_from_slice(b"slack");
        let p = parse_tx_packet(&bytes, GUEST).unwrap();
        assert_eq!(p.op, Op::Rw);
        assert_eq!(p.data, b"abc");
    }

    #[test]
    fn parses_shutdown_flags() {
        let mut h = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 0);
        h.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
        let bytes = wire(&h, &[]);
        let p = parse_tx_packet(&bytes, GUEST).unwrap();
        assert_eq!(
            p.op,
            Op::Shutdown {
                rcv: false,
                send: true
            }
        );
    }

    #[test]
    fn rejects_short_header() {
        let bytes = wire(&hdr(VIRTIO_VSOCK_OP_RW, 0), &[]);
        assert_eq!(
            parse_tx_packet(&bytes[..43], GUEST),
            Err(PacketError::HeaderTooShort(43))
        );
        assert_eq!(
            parse_tx_packet(&[], GUEST),
            Err(PacketError::HeaderTooShort(0))
        );
    }

    #[test]
    fn rejects_len_past_descriptors_and_past_max() {
        let bytes = wire(&hdr(VIRTIO_VSOCK_OP_RW, 10), b"abc");
        // The header claims 10 but only 3 bytes follow.
        let bytes = &bytes[..VSOCK_HDR_SIZE + 3];
        assert_eq!(
            parse_tx_packet(bytes, GUEST),
            Err(PacketError::DataTruncated {
                len: 10,
                available: 3
            })
        );
        let bytes = wire(&hdr(VIRTIO_VSOCK_OP_RW, u32::MAX), &[]);
        assert_eq!(
            parse_tx_packet(&bytes, GUEST),
            Err(PacketError::DataTooLong(u32::MAX))
        );
    }

    #[test]
    fn rejects_spoofed_source_and_foreign_destination() {
        let mut h = hdr(VIRTIO_VSOCK_OP_REQUEST, 0);
        h.src_cid = 99;
        let e = parse_tx_packet(&wire(&h, &[]), GUEST).unwrap_err();
        assert_eq!(
            e,
            PacketError::SrcCid {
                expected: 3,
                found: 99
            }
        );
        assert!(!e.deserves_rst());
        let mut h = hdr(VIRTIO_VSOCK_OP_REQUEST, 0);
        h.dst_cid = 7;
        let e = parse_tx_packet(&wire(&h, &[]), GUEST).unwrap_err();
        assert_eq!(e, PacketError::DstCid(7));
        assert!(e.deserves_rst());
    }

    #[test]
    fn rejects_bad_type_op_and_data_on_control() {
        let mut h = hdr(VIRTIO_VSOCK_OP_REQUEST, 0);
        h.type_ = 2;
        assert_eq!(
            parse_tx_packet(&wire(&h, &[]), GUEST),
            Err(PacketError::Type(2))
        );
        let h = hdr(0, 0);
        assert_eq!(
            parse_tx_packet(&wire(&h, &[]), GUEST),
            Err(PacketError::Op(0))
        );
        let h = hdr(99, 0);
        assert_eq!(
            parse_tx_packet(&wire(&h, &[]), GUEST),
            Err(PacketError::Op(99))
        );
        let h = hdr(VIRTIO_VSOCK_OP_REQUEST, 2);
        assert_eq!(
            parse_tx_packet(&wire(&h, b"xx"), GUEST),
            Err(PacketError::DataOnControl { op: 1, len: 2 })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for the fuzzer: every prefix of a few seeds, and
        // pseudo-random buffers.
        let seed = wire(&hdr(VIRTIO_VSOCK_OP_RW, 5), b"hello");
        for n in 0..=seed.len() {
            let _ = parse_tx_packet(&seed[..n], GUEST);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut buf = seed.clone();
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 5 == 0 {
                    *b = x.to_le_bytes()[0];
                }
            }
            if let Ok(p) = parse_tx_packet(&buf, GUEST) {
                assert_eq!(p.data.len(), p.hdr.len as usize);
                assert_eq!(p.hdr.src_cid, GUEST);
            }
        }
    }

    #[test]
    fn rx_capacity_accounts_for_header_and_max() {
        assert_eq!(rx_payload_capacity(10), 0);
        assert_eq!(rx_payload_capacity(44), 0);
        assert_eq!(rx_payload_capacity(100), 56);
        assert_eq!(rx_payload_capacity(1 << 20), MAX_PKT_DATA as usize);
    }
}
