//! The virtio header the device hands the tap with a frame the guest sent.
//!
//! With `VIRTIO_NET_F_CSUM` the guest leaves TCP/UDP checksums to the host, and with
//! `VIRTIO_NET_F_HOST_TSO4/6` it sends TCP segments of up to 64 KiB that the host cuts
//! to the MTU: one frame, one kick and one filter check where there were up to 45.
//! The guest's header is never passed on. The device writes its own from the frame it
//! parsed: the checksum position comes from where the parser found the TCP or UDP
//! header, the segmentation type from the IP version, the header length from the TCP
//! data offset; only the guest's segment size is taken, bounded. A request the device
//! did not negotiate, or that does not fit the frame (a checksum on ICMP, TSO on UDP or
//! on the wrong IP version, a segment size of 0), is refused and the frame dropped.

use mvm_loader::bytes::{le_u16, u8_at};

use super::frame::{parse_frame, Payload, Transport, ETH_HLEN};
use super::VNET_HDR_SIZE;

/// `flags`: the device must complete the checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// Offset of the TCP checksum in its header.
const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the UDP checksum in its header.
const UDP_CSUM_OFFSET: u16 = 6;

/// What the driver acknowledged of the TX offloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// `VIRTIO_NET_F_CSUM`.
    pub csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`.
    pub tso4: bool,
    /// `VIRTIO_NET_F_HOST_TSO6`.
    pub tso6: bool,
}

/// Why the guest's offload request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Flags other than NEEDS_CSUM.
    #[error("header flags {0:#04x} not negotiated")]
    Flags(u8),
    /// A GSO type that is unknown, not negotiated, or without NEEDS_CSUM.
    #[error("gso_type {0:#04x} not negotiated or without a checksum request")]
    GsoType(u8),
    /// A checksum asked for a frame that is not an unfragmented TCP or UDP packet.
    #[error("checksum offload on a frame without a TCP or UDP header")]
    NoTransport,
    /// TSO on a frame that is not TCP over the IP version the type names.
    #[error("gso_type {0:#04x} does not match the frame")]
    GsoMismatch(u8),
    /// The guest's header is shorter than [`VNET_HDR_SIZE`].
    #[error("guest header of {0} bytes")]
    ShortHeader(usize),
    /// A GSO frame with a segment size of 0.
    #[error("gso_size 0")]
    GsoSize,
    /// An offset that does not fit the header's 16-bit fields.
    #[error("header offset out of range")]
    Offset,
}

/// The header for the tap, built from `frame` (Ethernet header first) and the guest's
/// header `guest` (the first [`VNET_HDR_SIZE`] bytes of its buffer). All zeroes when
/// the guest asked for nothing.
pub fn tap_header(
    guest: &[u8],
    frame: &[u8],
    offloads: TxOffloads,
) -> Result<[u8; VNET_HDR_SIZE], OffloadError> {
    let mut out = [0u8; VNET_HDR_SIZE];
    let (Some(flags), Some(gso_type), Some(gso_size)) =
        (u8_at(guest, 0), u8_at(guest, 1), le_u16(guest, 4))
    else {
        return Err(OffloadError::ShortHeader(guest.len()));
    };
    // Nothing asked, or a driver that took no offloads: its header means nothing, and
    // the tap gets zeroes (the frame carries its own checksums).
    if (flags == 0 && gso_type == VIRTIO_NET_HDR_GSO_NONE) || !offloads.csum {
        return Ok(out);
    }
    if flags != VIRTIO_NET_HDR_F_NEEDS_CSUM {
        return Err(OffloadError::Flags(flags));
    }
    let ip = match parse_frame(frame).map(|f| f.payload) {
        Ok(Payload::Ip(ip)) => ip,
        _ => return Err(OffloadError::NoTransport),
    };
    let (is_tcp, csum_offset) = match ip.transport {
        Transport::Tcp { .. } => (true, TCP_CSUM_OFFSET),
        Transport::Udp { .. } => (false, UDP_CSUM_OFFSET),
        _ => return Err(OffloadError::NoTransport),
    };
    let l4 = ETH_HLEN.saturating_add(ip.transport_offset);
    let csum_start = u16::try_from(l4).map_err(|_| OffloadError::Offset)?;
    let v4 = ip.dst.is_ipv4();
    match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => {}
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
            let want_v4 = gso_type == VIRTIO_NET_HDR_GSO_TCPV4;
            let negotiated = if want_v4 {
                offloads.tso4
            } else {
                offloads.tso6
            };
            if !negotiated {
                return Err(OffloadError::GsoType(gso_type));
            }
            if !is_tcp || want_v4 != v4 {
                return Err(OffloadError::GsoMismatch(gso_type));
            }
            if gso_size == 0 {
                return Err(OffloadError::GsoSize);
            }
            let hdr_len = u16::try_from(l4.saturating_add(ip.transport_header_len))
                .map_err(|_| OffloadError::Offset)?;
            out[1] = gso_type;
            out[2..4].copy_from_slice(&hdr_len.to_le_bytes());
            out[4..6].copy_from_slice(&gso_size.to_le_bytes());
        }
        other => return Err(OffloadError::GsoType(other)),
    }
    out[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out[6..8].copy_from_slice(&csum_start.to_le_bytes());
    out[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::frame::build::*;
    use super::super::frame::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_ICMP, IPPROTO_TCP};
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    };
    const DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

    fn hdr(flags: u8, gso_type: u8, gso_size: u16, junk: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso_type;
        h[2..4].copy_from_slice(&junk.to_le_bytes());
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&junk.to_le_bytes());
        h[8..10].copy_from_slice(&junk.to_le_bytes());
        h[10..12].copy_from_slice(&junk.to_le_bytes());
        h
    }

    fn field(h: &[u8; 12], at: usize) -> u16 {
        u16::from_le_bytes([h[at], h[at + 1]])
    }

    #[test]
    fn nothing_asked_or_nothing_negotiated_gives_a_zero_header() {
        let f = tcp4(DST, 443);
        let mut g = hdr(0, 0, 0, 0);
        g[10] = 9; // num_buffers junk
        assert_eq!(tap_header(&g, &f, ALL), Ok([0u8; 12]));
        let junk = hdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 0xffff);
        assert_eq!(
            tap_header(&junk, &f, TxOffloads::default()),
            Ok([0u8; 12]),
            "a driver without offloads has its header ignored"
        );
    }

    #[test]
    fn checksum_position_comes_from_the_parsed_frame_not_the_guest() {
        let f = tcp4(DST, 443);
        let h = tap_header(&hdr(1, 0, 0, 0xbeef), &f, ALL).unwrap();
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_NONE);
        assert_eq!(field(&h, 2), 0, "hdr_len only for GSO");
        assert_eq!(field(&h, 6), 34, "csum_start: Ethernet 14 + IPv4 20");
        assert_eq!(field(&h, 8), 16, "TCP checksum");
        assert_eq!(field(&h, 10), 0, "num_buffers");
        let u = udp4(DST, 53, b"q");
        let h = tap_header(&hdr(1, 0, 0, 7), &u, ALL).unwrap();
        assert_eq!((field(&h, 6), field(&h, 8)), (34, 6));
    }

    #[test]
    fn tso_takes_only_the_segment_size_from_the_guest() {
        let f = tcp4(DST, 443);
        let h = tap_header(&hdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 3), &f, ALL).unwrap();
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(field(&h, 2), 54, "hdr_len: 14 + 20 + 20");
        assert_eq!(field(&h, 4), 1448);
        let src6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
        let dst6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
        let f6 = eth(
            ETHERTYPE_IPV6,
            &ipv6(src6, dst6, IPPROTO_TCP, &tcp(1, 2, b"x")),
        );
        let h = tap_header(&hdr(1, VIRTIO_NET_HDR_GSO_TCPV6, 1428, 0), &f6, ALL).unwrap();
        assert_eq!((h[1], field(&h, 2), field(&h, 6)), (4, 74, 54));
    }

    #[test]
    fn requests_not_negotiated_or_not_fitting_the_frame_are_refused() {
        let f = tcp4(DST, 443);
        let u = udp4(DST, 53, b"q");
        let icmp = eth(
            ETHERTYPE_IPV4,
            &ipv4(Ipv4Addr::new(10, 0, 2, 15), DST, IPPROTO_ICMP, &[8; 8]),
        );
        let no_tso = TxOffloads {
            csum: true,
            ..TxOffloads::default()
        };
        let cases: &[(&str, [u8; 12], &[u8], TxOffloads)] = &[
            ("unknown flag", hdr(2, 0, 0, 0), &f, ALL),
            ("flag plus NEEDS_CSUM", hdr(3, 0, 0, 0), &f, ALL),
            ("gso without csum", hdr(0, 1, 1448, 0), &f, ALL),
            ("tso4 not negotiated", hdr(1, 1, 1448, 0), &f, no_tso),
            ("tso on udp", hdr(1, 1, 1448, 0), &u, ALL),
            ("tso6 on ipv4", hdr(1, 4, 1448, 0), &f, ALL),
            ("udp gso", hdr(1, 3, 1448, 0), &u, ALL),
            ("ecn bit", hdr(1, 0x81, 1448, 0), &f, ALL),
            ("gso size 0", hdr(1, 1, 0, 0), &f, ALL),
            ("csum on icmp", hdr(1, 0, 0, 0), &icmp, ALL),
            ("csum on garbage", hdr(1, 0, 0, 0), &[0u8; 10], ALL),
            (
                "short guest header",
                [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &f,
                ALL,
            ),
        ];
        for (what, h, frame, off) in cases {
            assert!(tap_header(h, frame, *off).is_err(), "{what}");
        }
    }

    #[test]
    fn fragments_get_no_checksum_offload() {
        let mut f = tcp4(DST, 443);
        // More-fragments bit in the IPv4 header (Ethernet 14 + flags at 6).
        f[14 + 6] |= 0x20;
        assert_eq!(
            tap_header(&hdr(1, 0, 0, 0), &f, ALL),
            Err(OffloadError::NoTransport)
        );
        let _ = ETHERTYPE_IPV4;
    }
}
