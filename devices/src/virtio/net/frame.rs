//! What an Ethernet frame from the guest is, and to whom it goes. Parsing only: no policy,
//! no I/O. [`parse_frame`] is the one fuzzable function.
//!
//! Rules the parser fixes (the policy relies on them):
//!
//! - **VLAN tags.** A frame whose EtherType is 802.1Q (`0x8100`) or 802.1ad (`0x88a8`) is
//!   reported as [`Payload::VlanTagged`] and not unwrapped. The guest's link is untagged;
//!   a tag could only serve to hop onto another VLAN of a host bridge, so the policy drops
//!   every tagged frame.
//! - **Fragments.** Any IPv4 packet with MF set or a non-zero fragment offset, and any IPv6
//!   packet with a Fragment header (even an "atomic" one with offset 0 and M clear), is
//!   reported as [`Transport::Fragment`] with no ports: a non-first fragment carries no
//!   transport header, and a first fragment's ports can be contradicted by an overlapping
//!   later fragment. The policy drops all of them. Guests keep working: TCP sets DF and
//!   uses path MTU discovery; only UDP datagrams larger than the MTU are lost.
//! - **IPv4 options** are parsed (every option's length is checked) and reported; the
//!   policy drops packets that carry any (source routing and friends have no place here).
//! - **IPv6 extension headers** are walked up to [`MAX_IPV6_EXT_HEADERS`]; a longer chain is
//!   malformed. A Routing header is reported (the policy drops it: the real destination
//!   would be a later address); an ESP header ends the walk as an opaque protocol.
//! - Lengths come from the IP header (`total length`, `payload length`), never past the
//!   bytes present; bytes after the IP packet (Ethernet padding) are ignored.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mvm_loader::bytes;

/// Length of an Ethernet header without tags.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4 (`ETH_P_IP`, linux/if_ether.h).
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP (`ETH_P_ARP`, linux/if_ether.h).
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6 (`ETH_P_IPV6`, linux/if_ether.h).
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag (`ETH_P_8021Q`, linux/if_ether.h).
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad service tag (`ETH_P_8021AD`, linux/if_ether.h).
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Length of an ARP packet for IPv4 over Ethernet (`struct arphdr` plus addresses).
pub const ARP_LEN: usize = 28;
/// ARP hardware type Ethernet (`ARPHRD_ETHER`, linux/if_arp.h).
pub const ARPHRD_ETHER: u16 = 1;
/// ARP request (`ARPOP_REQUEST`, linux/if_arp.h).
pub const ARPOP_REQUEST: u16 = 1;
/// ARP reply (`ARPOP_REPLY`, linux/if_arp.h).
pub const ARPOP_REPLY: u16 = 2;

/// Smallest IPv4 header (IHL 5).
pub const IPV4_MIN_HLEN: usize = 20;
/// IPv4 header length.
pub const IPV6_HLEN: usize = 40;
/// IPv4 flag: more fragments (`IP_MF`, net/ip.h).
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 fragment offset mask (`IP_OFFSET`, net/ip.h).
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// IPv4 option: end of list (`IPOPT_END`, linux/ip.h).
pub const IPOPT_END: u8 = 0;
/// IPv4 option: no operation (`IPOPT_NOOP`, linux/ip.h).
pub const IPOPT_NOOP: u8 = 1;

/// IP protocol number of ICMP (`IPPROTO_ICMP`, linux/in.h).
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP (`IPPROTO_TCP`).
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP (`IPPROTO_UDP`).
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6 (`IPPROTO_ICMPV6`, linux/in6.h).
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 Hop-by-Hop options header (`IPPROTO_HOPOPTS`, linux/in6.h).
pub const IPPROTO_HOPOPTS: u8 = 0;
/// IPv6 Routing header (`IPPROTO_ROUTING`).
pub const IPPROTO_ROUTING: u8 = 43;
/// IPv6 Fragment header (`IPPROTO_FRAGMENT`).
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IPsec ESP (`IPPROTO_ESP`): opaque, ends the walk.
pub const IPPROTO_ESP: u8 = 50;
/// IPsec AH (`IPPROTO_AH`): an extension header with its own length unit.
pub const IPPROTO_AH: u8 = 51;
/// IPv6 Destination options header (`IPPROTO_DSTOPTS`).
pub const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 Mobility header (`IPPROTO_MH`), walked like an options header.
pub const IPPROTO_MH: u8 = 135;

/// Most IPv6 extension headers walked before the chain is called malformed. Real
/// traffic uses at most three or four.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Smallest TCP header (data offset 5).
pub const TCP_MIN_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// ICMP and ICMPv6 header length (type, code, checksum, rest-of-header).
pub const ICMP_HLEN: usize = 8;
/// ICMPv6 Router Solicitation (`NDISC_ROUTER_SOLICITATION`, net/ndisc.h).
pub const NDISC_ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 Router Advertisement (`NDISC_ROUTER_ADVERTISEMENT`).
pub const NDISC_ROUTER_ADVERTISEMENT: u8 = 134;
/// ICMPv6 Neighbour Solicitation (`NDISC_NEIGHBOUR_SOLICITATION`).
pub const NDISC_NEIGHBOUR_SOLICITATION: u8 = 135;
/// ICMPv6 Neighbour Advertisement (`NDISC_NEIGHBOUR_ADVERTISEMENT`).
pub const NDISC_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// ICMPv6 Redirect (`NDISC_REDIRECT`).
pub const NDISC_REDIRECT: u8 = 137;
/// Length of a Neighbour Solicitation/Advertisement up to and including the target.
pub const NDISC_NS_NA_LEN: usize = 24;

/// A MAC address.
pub type Mac = [u8; 6];

/// The Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetHeader {
    /// Destination MAC.
    pub dst: Mac,
    /// Source MAC.
    pub src: Mac,
    /// EtherType.
    pub ethertype: u16,
}

/// One parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Its Ethernet header.
    pub eth: EthernetHeader,
    /// What it carries.
    pub payload: Payload,
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// ARP for IPv4 over Ethernet.
    Arp(Arp),
    /// An IPv4 or IPv6 packet.
    Ip(IpPacket),
    /// An 802.1Q or 802.1ad tagged frame, not unwrapped (see the module doc).
    VlanTagged,
    /// Any other EtherType (in `eth.ethertype`).
    OtherEthertype,
}

/// An ARP packet (IPv4 over Ethernet only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Operation (`ARPOP_*`).
    pub op: u16,
    /// Sender hardware address.
    pub sender_mac: Mac,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target protocol address: whom the request asks about.
    pub target_ip: Ipv4Addr,
}

/// An IP packet's addresses and transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The IPv4 header carries options.
    pub ipv4_options: bool,
    /// The IPv6 chain has a Routing header.
    pub ipv6_routing: bool,
    /// The transport header.
    pub transport: Transport,
    /// Where the transport header starts, counted from the start of the IP header.
    pub transport_offset: usize,
    /// Length of the transport header: TCP's data offset in bytes, UDP's 8, else 0.
    pub transport_header_len: usize,
}

/// The transport layer of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP (over IPv4).
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        code: u8,
    },
    /// ICMPv6, with the target address of a Neighbour Solicitation or Advertisement.
    Icmpv6 {
        /// ICMPv6 type.
        icmp_type: u8,
        /// ICMPv6 code.
        code: u8,
        /// NS/NA target address.
        ndp_target: Option<Ipv6Addr>,
    },
    /// A fragment (first or not): no ports are read (see the module doc).
    Fragment {
        /// The protocol the fragments carry.
        protocol: u8,
        /// Fragment offset in 8-byte units.
        offset: u16,
        /// More fragments follow.
        more: bool,
    },
    /// Any other protocol (ESP, GRE, SCTP, "no next header", ...).
    Other {
        /// IP protocol number.
        protocol: u8,
    },
}

impl Transport {
    /// The IP protocol number.
    #[must_use]
    pub fn protocol(&self) -> u8 {
        match self {
            Self::Tcp { .. } => IPPROTO_TCP,
            Self::Udp { .. } => IPPROTO_UDP,
            Self::Icmp { .. } => IPPROTO_ICMP,
            Self::Icmpv6 { .. } => IPPROTO_ICMPV6,
            Self::Fragment { protocol, .. } | Self::Other { protocol } => *protocol,
        }
    }

    /// The destination port, for TCP and UDP.
    #[must_use]
    pub fn dst_port(&self) -> Option<u16> {
        match self {
            Self::Tcp { dst_port, .. } | Self::Udp { dst_port, .. } => Some(*dst_port),
            _ => None,
        }
    }
}

/// The protocol layer a length check failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Ethernet header.
    Ethernet,
    /// ARP packet.
    Arp,
    /// IPv4 header.
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Extension,
    /// TCP header.
    Tcp,
    /// UDP header.
    Udp,
    /// ICMP header.
    Icmp,
    /// ICMPv6 header (incl. the NS/NA target).
    Icmpv6,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Ethernet => "Ethernet",
            Self::Arp => "ARP",
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
            Self::Ipv6Extension => "IPv6 extension",
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Icmp => "ICMP",
            Self::Icmpv6 => "ICMPv6",
        };
        f.write_str(name)
    }
}

/// Why a frame is malformed. Every variant names the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than the layer's header needs.
    #[error("{layer} header truncated: {have} bytes, need {need}")]
    Truncated {
        /// The layer.
        layer: Layer,
        /// Bytes present for it.
        have: usize,
        /// Bytes it needs.
        need: usize,
    },
    /// ARP for something other than IPv4 over Ethernet.
    #[error("ARP htype {htype} ptype {ptype:#06x} hlen {hlen} plen {plen}: only Ethernet/IPv4 is carried")]
    ArpFormat {
        /// Hardware type.
        htype: u16,
        /// Protocol type.
        ptype: u16,
        /// Hardware address length.
        hlen: u8,
        /// Protocol address length.
        plen: u8,
    },
    /// The IP version nibble does not match the EtherType.
    #[error("IP version {version} under EtherType {ethertype:#06x}")]
    IpVersion {
        /// The version nibble.
        version: u8,
        /// The EtherType.
        ethertype: u16,
    },
    /// IHL below 5.
    #[error("IPv4 IHL {0} is below 5")]
    Ipv4Ihl(u8),
    /// The IPv4 total length is shorter than its header or longer than the frame.
    #[error("IPv4 total length {total} with a {header}-byte header and {available} bytes present")]
    Ipv4TotalLength {
        /// The total length field.
        total: u16,
        /// The header length from IHL.
        header: usize,
        /// Bytes after the Ethernet header.
        available: usize,
    },
    /// An IPv4 option whose length is below 2 or runs past the header.
    #[error("IPv4 option {kind} at offset {offset} has bad length {len}")]
    Ipv4Option {
        /// Option type.
        kind: u8,
        /// Its offset in the options area.
        offset: usize,
        /// Its length byte (0 if missing).
        len: u8,
    },
    /// The IPv6 payload length is zero (jumbogram) or longer than the frame.
    #[error("IPv6 payload length {declared} with {available} bytes present")]
    Ipv6PayloadLength {
        /// The payload length field.
        declared: u16,
        /// Bytes after the fixed header.
        available: usize,
    },
    /// More than [`MAX_IPV6_EXT_HEADERS`] extension headers.
    #[error("IPv6 extension header chain longer than {MAX_IPV6_EXT_HEADERS}")]
    Ipv6ChainTooLong,
    /// TCP data offset below 5 or past the segment.
    #[error("TCP data offset {offset} with {available} bytes present")]
    TcpDataOffset {
        /// The data offset in 32-bit words.
        offset: u8,
        /// Bytes of the segment.
        available: usize,
    },
    /// UDP length below 8 or past the datagram.
    #[error("UDP length {declared} with {available} bytes present")]
    UdpLength {
        /// The length field.
        declared: u16,
        /// Bytes present.
        available: usize,
    },
}

fn need(bytes: &[u8], layer: Layer, need: usize) -> Result<(), Malformed> {
    if bytes.len() < need {
        return Err(Malformed::Truncated {
            layer,
            have: bytes.len(),
            need,
        });
    }
    Ok(())
}

/// A field of `layer` at `at`, read through `mvm_loader::bytes`: a field past the end
/// (a length check missed) is a truncated frame, never a zero.
fn field<T>(
    bytes: &[u8],
    layer: Layer,
    at: usize,
    read: fn(&[u8], usize) -> Option<T>,
) -> Result<T, Malformed> {
    read(bytes, at).ok_or(Malformed::Truncated {
        layer,
        have: bytes.len(),
        need: at.saturating_add(std::mem::size_of::<T>()),
    })
}

fn be16(bytes: &[u8], layer: Layer, at: usize) -> Result<u16, Malformed> {
    field(bytes, layer, at, bytes::be_u16)
}

fn byte(bytes: &[u8], layer: Layer, at: usize) -> Result<u8, Malformed> {
    field(bytes, layer, at, bytes::u8_at)
}

fn read_mac(bytes: &[u8], layer: Layer, at: usize) -> Result<Mac, Malformed> {
    field(bytes, layer, at, bytes::array::<6>)
}

fn read_ipv4(bytes: &[u8], layer: Layer, at: usize) -> Result<Ipv4Addr, Malformed> {
    field(bytes, layer, at, bytes::array::<4>).map(Ipv4Addr::from)
}

fn read_ipv6(bytes: &[u8], layer: Layer, at: usize) -> Result<Ipv6Addr, Malformed> {
    field(bytes, layer, at, bytes::array::<16>).map(Ipv6Addr::from)
}

/// Parses one Ethernet frame (without the virtio header).
pub fn parse_frame(frame: &[u8]) -> Result<Frame, Malformed> {
    need(frame, Layer::Ethernet, ETH_HLEN)?;
    let eth = EthernetHeader {
        dst: read_mac(frame, Layer::Ethernet, 0)?,
        src: read_mac(frame, Layer::Ethernet, 6)?,
        ethertype: be16(frame, Layer::Ethernet, 12)?,
    };
    let rest = frame.get(ETH_HLEN..).unwrap_or_default();
    let payload = match eth.ethertype {
        ETHERTYPE_ARP => Payload::Arp(parse_arp(rest)?),
        ETHERTYPE_IPV4 => Payload::Ip(parse_ipv4(rest)?),
        ETHERTYPE_IPV6 => Payload::Ip(parse_ipv6(rest)?),
        ETHERTYPE_VLAN | ETHERTYPE_QINQ => Payload::VlanTagged,
        _ => Payload::OtherEthertype,
    };
    Ok(Frame { eth, payload })
}

fn parse_arp(p: &[u8]) -> Result<Arp, Malformed> {
    need(p, Layer::Arp, ARP_LEN)?;
    let (htype, ptype, hlen, plen) = (
        be16(p, Layer::Arp, 0)?,
        be16(p, Layer::Arp, 2)?,
        byte(p, Layer::Arp, 4)?,
        byte(p, Layer::Arp, 5)?,
    );
    if htype != ARPHRD_ETHER || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
        return Err(Malformed::ArpFormat {
            htype,
            ptype,
            hlen,
            plen,
        });
    }
    Ok(Arp {
        op: be16(p, Layer::Arp, 6)?,
        sender_mac: read_mac(p, Layer::Arp, 8)?,
        sender_ip: read_ipv4(p, Layer::Arp, 14)?,
        target_ip: read_ipv4(p, Layer::Arp, 24)?,
    })
}

fn parse_ipv4(p: &[u8]) -> Result<IpPacket, Malformed> {
    need(p, Layer::Ipv4, IPV4_MIN_HLEN)?;
    let version = byte(p, Layer::Ipv4, 0)? >> 4;
    if version != 4 {
        return Err(Malformed::IpVersion {
            version,
            ethertype: ETHERTYPE_IPV4,
        });
    }
    let ihl = byte(p, Layer::Ipv4, 0)? & 0x0f;
    if ihl < 5 {
        return Err(Malformed::Ipv4Ihl(ihl));
    }
    let header = usize::from(ihl) * 4;
    let total = be16(p, Layer::Ipv4, 2)?;
    if usize::from(total) < header || usize::from(total) > p.len() {
        return Err(Malformed::Ipv4TotalLength {
            total,
            header,
            available: p.len(),
        });
    }
    let options = p.get(IPV4_MIN_HLEN..header).unwrap_or_default();
    check_ipv4_options(options)?;
    let frag = be16(p, Layer::Ipv4, 6)?;
    let protocol = byte(p, Layer::Ipv4, 9)?;
    let body = p.get(header..usize::from(total)).unwrap_or_default();
    let offset = frag & IPV4_OFFSET_MASK;
    let more = frag & IPV4_MF != 0;
    let transport = if offset != 0 || more {
        Transport::Fragment {
            protocol,
            offset,
            more,
        }
    } else {
        parse_transport(protocol, body, false)?
    };
    Ok(IpPacket {
        src: IpAddr::V4(read_ipv4(p, Layer::Ipv4, 12)?),
        dst: IpAddr::V4(read_ipv4(p, Layer::Ipv4, 16)?),
        ipv4_options: !options.is_empty(),
        ipv6_routing: false,
        transport_header_len: transport_header_len(&transport, body)?,
        transport,
        transport_offset: header,
    })
}

/// Checks that every option's length stays inside the options area.
fn check_ipv4_options(options: &[u8]) -> Result<(), Malformed> {
    let mut at = 0usize;
    while let Some(&kind) = options.get(at) {
        match kind {
            IPOPT_END => return Ok(()),
            IPOPT_NOOP => at = at.saturating_add(1),
            _ => {
                let Some(len) = bytes::u8_at(options, at.saturating_add(1)) else {
                    // A kind without its length byte: reported as a length of 0.
                    return Err(Malformed::Ipv4Option {
                        kind,
                        offset: at,
                        len: 0,
                    });
                };
                let end = at.saturating_add(usize::from(len));
                if len < 2 || end > options.len() {
                    return Err(Malformed::Ipv4Option {
                        kind,
                        offset: at,
                        len,
                    });
                }
                at = end;
            }
        }
    }
    Ok(())
}

fn parse_ipv6(p: &[u8]) -> Result<IpPacket, Malformed> {
    need(p, Layer::Ipv6, IPV6_HLEN)?;
    let version = byte(p, Layer::Ipv6, 0)? >> 4;
    if version != 6 {
        return Err(Malformed::IpVersion {
            version,
            ethertype: ETHERTYPE_IPV6,
        });
    }
    let declared = be16(p, Layer::Ipv6, 4)?;
    let available = p.len().saturating_sub(IPV6_HLEN);
    if declared == 0 || usize::from(declared) > available {
        return Err(Malformed::Ipv6PayloadLength {
            declared,
            available,
        });
    }
    let end = IPV6_HLEN.saturating_add(usize::from(declared));
    let mut rest = p.get(IPV6_HLEN..end).unwrap_or_default();
    let mut next = byte(p, Layer::Ipv6, 6)?;
    let mut routing = false;
    let mut walked = 0usize;
    let transport = loop {
        let ext_len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH => {
                need(rest, Layer::Ipv6Extension, 8)?;
                (usize::from(byte(rest, Layer::Ipv6Extension, 1)?) + 1) * 8
            }
            IPPROTO_AH => {
                need(rest, Layer::Ipv6Extension, 8)?;
                (usize::from(byte(rest, Layer::Ipv6Extension, 1)?) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                need(rest, Layer::Ipv6Extension, 8)?;
                let frag = be16(rest, Layer::Ipv6Extension, 2)?;
                break Transport::Fragment {
                    protocol: byte(rest, Layer::Ipv6Extension, 0)?,
                    offset: frag >> 3,
                    more: frag & 1 != 0,
                };
            }
            protocol => break parse_transport(protocol, rest, true)?,
        };
        walked = walked.saturating_add(1);
        if walked > MAX_IPV6_EXT_HEADERS {
            return Err(Malformed::Ipv6ChainTooLong);
        }
        need(rest, Layer::Ipv6Extension, ext_len)?;
        routing |= next == IPPROTO_ROUTING;
        next = byte(rest, Layer::Ipv6Extension, 0)?;
        rest = rest.get(ext_len..).unwrap_or_default();
    };
    Ok(IpPacket {
        src: IpAddr::V6(read_ipv6(p, Layer::Ipv6, 8)?),
        dst: IpAddr::V6(read_ipv6(p, Layer::Ipv6, 24)?),
        ipv4_options: false,
        ipv6_routing: routing,
        transport_header_len: transport_header_len(&transport, rest)?,
        transport,
        transport_offset: end.saturating_sub(rest.len()),
    })
}

/// TCP's header length (data offset, already checked to fit) or UDP's; 0 otherwise.
fn transport_header_len(transport: &Transport, p: &[u8]) -> Result<usize, Malformed> {
    Ok(match transport {
        Transport::Tcp { .. } => usize::from(byte(p, Layer::Tcp, 12)? >> 4) * 4,
        Transport::Udp { .. } => UDP_HLEN,
        _ => 0,
    })
}

fn parse_transport(protocol: u8, p: &[u8], v6: bool) -> Result<Transport, Malformed> {
    match protocol {
        IPPROTO_TCP => {
            need(p, Layer::Tcp, TCP_MIN_HLEN)?;
            let offset = byte(p, Layer::Tcp, 12)? >> 4;
            if offset < 5 || usize::from(offset) * 4 > p.len() {
                return Err(Malformed::TcpDataOffset {
                    offset,
                    available: p.len(),
                });
            }
            Ok(Transport::Tcp {
                src_port: be16(p, Layer::Tcp, 0)?,
                dst_port: be16(p, Layer::Tcp, 2)?,
            })
        }
        IPPROTO_UDP => {
            need(p, Layer::Udp, UDP_HLEN)?;
            let declared = be16(p, Layer::Udp, 4)?;
            if usize::from(declared) < UDP_HLEN || usize::from(declared) > p.len() {
                return Err(Malformed::UdpLength {
                    declared,
                    available: p.len(),
                });
            }
            Ok(Transport::Udp {
                src_port: be16(p, Layer::Udp, 0)?,
                dst_port: be16(p, Layer::Udp, 2)?,
            })
        }
        IPPROTO_ICMP if !v6 => {
            need(p, Layer::Icmp, ICMP_HLEN)?;
            Ok(Transport::Icmp {
                icmp_type: byte(p, Layer::Icmp, 0)?,
                code: byte(p, Layer::Icmp, 1)?,
            })
        }
        IPPROTO_ICMPV6 if v6 => {
            need(p, Layer::Icmpv6, ICMP_HLEN)?;
            let icmp_type = byte(p, Layer::Icmpv6, 0)?;
            let ndp_target = if matches!(
                icmp_type,
                NDISC_NEIGHBOUR_SOLICITATION | NDISC_NEIGHBOUR_ADVERTISEMENT
            ) {
                need(p, Layer::Icmpv6, NDISC_NS_NA_LEN)?;
                Some(read_ipv6(p, Layer::Icmpv6, 8)?)
            } else {
                None
            };
            Ok(Transport::Icmpv6 {
                icmp_type,
                code: byte(p, Layer::Icmpv6, 1)?,
                ndp_target,
            })
        }
        protocol => Ok(Transport::Other { protocol }),
    }
}

/// Builders of well-formed frames, for tests, benchmarks and fuzz seeds.
pub mod build {
    use super::*;

    /// MAC of the test guest.
    pub const GUEST_MAC: Mac = [0x02, 0, 0, 0, 0, 1];
    /// MAC of the test gateway.
    pub const GW_MAC: Mac = [0x02, 0, 0, 0, 0, 2];

    /// An Ethernet frame around `payload`.
    #[must_use]
    pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
        f.extend_from_slice(&GW_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 packet (no options, not fragmented) carrying `body` as `protocol`.
    #[must_use]
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, body: &[u8]) -> Vec<u8> {
        ipv4_with(src, dst, protocol, &[], 0, body)
    }

    /// An IPv4 packet with `options` (padded by the caller to 4 bytes) and flags/offset.
    #[must_use]
    pub fn ipv4_with(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        options: &[u8],
        frag: u16,
        body: &[u8],
    ) -> Vec<u8> {
        let hlen = IPV4_MIN_HLEN + options.len();
        let total = u16::try_from(hlen + body.len()).unwrap_or(u16::MAX);
        let ihl = u8::try_from(hlen / 4).unwrap_or(0x0f);
        let mut p = vec![0x40 | ihl, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(options);
        p.extend_from_slice(body);
        p
    }

    /// An IPv6 packet whose payload (extension headers included) is `payload`.
    #[must_use]
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// A TCP header (SYN) from `src_port` to `dst_port`, followed by `data`.
    #[must_use]
    pub fn tcp(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(TCP_MIN_HLEN + data.len());
        t.extend_from_slice(&src_port.to_be_bytes());
        t.extend_from_slice(&dst_port.to_be_bytes());
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(data);
        t
    }

    /// A UDP datagram from `src_port` to `dst_port` carrying `data`.
    #[must_use]
    pub fn udp(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
        let len = u16::try_from(UDP_HLEN + data.len()).unwrap_or(u16::MAX);
        let mut u = Vec::with_capacity(UDP_HLEN + data.len());
        u.extend_from_slice(&src_port.to_be_bytes());
        u.extend_from_slice(&dst_port.to_be_bytes());
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(data);
        u
    }

    /// An ARP packet.
    #[must_use]
    pub fn arp(op: u16, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
        let mut a = Vec::with_capacity(ARP_LEN);
        a.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
        a.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        a.extend_from_slice(&[6, 4]);
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&GUEST_MAC);
        a.extend_from_slice(&sender_ip.octets());
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target_ip.octets());
        a
    }

    /// An ICMPv6 message of `icmp_type` with a NS/NA target.
    #[must_use]
    pub fn icmpv6_nd(icmp_type: u8, target: Ipv6Addr) -> Vec<u8> {
        let mut m = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&target.octets());
        m
    }

    /// A full Ethernet/IPv4/TCP frame.
    #[must_use]
    pub fn tcp4(dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
        let src = Ipv4Addr::new(10, 0, 2, 15);
        eth(
            ETHERTYPE_IPV4,
            &ipv4(src, dst, IPPROTO_TCP, &tcp(40000, dst_port, &[])),
        )
    }

    /// A full Ethernet/IPv4/UDP frame.
    #[must_use]
    pub fn udp4(dst: Ipv4Addr, dst_port: u16, data: &[u8]) -> Vec<u8> {
        let src = Ipv4Addr::new(10, 0, 2, 15);
        eth(
            ETHERTYPE_IPV4,
            &ipv4(src, dst, IPPROTO_UDP, &udp(40000, dst_port, data)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const SRC4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const DST4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
    const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

    fn ip(frame: &[u8]) -> IpPacket {
        match parse_frame(frame).unwrap().payload {
            Payload::Ip(p) => p,
            other => panic!("not IP: {other:?}"),
        }
    }

    #[test]
    fn tcp_over_ipv4_gives_the_five_tuple() {
        let p = ip(&tcp4(DST4, 443));
        assert_eq!(p.src, IpAddr::V4(SRC4));
        assert_eq!(p.dst, IpAddr::V4(DST4));
        assert_eq!(
            p.transport,
            Transport::Tcp {
                src_port: 40000,
                dst_port: 443
            }
        );
        assert!(!p.ipv4_options);
    }

    #[test]
    fn transport_offset_and_header_length_follow_options_and_extensions() {
        let p = ip(&tcp4(DST4, 443));
        assert_eq!((p.transport_offset, p.transport_header_len), (20, 20));
        let p = ip(&udp4(DST4, 53, b"q"));
        assert_eq!((p.transport_offset, p.transport_header_len), (20, 8));
        // TCP with 12 bytes of options (data offset 8).
        let mut t = tcp(1, 2, &[0; 12]);
        t[12] = 0x80;
        let p = ip(&eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_TCP, &t)));
        assert_eq!(p.transport_header_len, 32);
        // IPv6 with one 8-byte destination-options header before TCP.
        let mut body = vec![IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        body.extend(tcp(1, 2, b"x"));
        let p = ip(&eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_DSTOPTS, &body),
        ));
        assert_eq!((p.transport_offset, p.transport_header_len), (48, 20));
        let p = ip(&eth(
            ETHERTYPE_IPV4,
            &ipv4(SRC4, DST4, IPPROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0]),
        ));
        assert_eq!((p.transport_offset, p.transport_header_len), (20, 0));
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_ignored() {
        let mut f = udp4(DST4, 53, b"q");
        f.extend_from_slice(&[0xee; 20]);
        assert_eq!(ip(&f).transport.dst_port(), Some(53));
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_malformed_not_a_panic() {
        let frames = [
            tcp4(DST4, 443),
            udp4(DST4, 53, b"abc"),
            eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, SRC4, DST4)),
            eth(
                ETHERTYPE_IPV6,
                &ipv6(SRC6, DST6, IPPROTO_TCP, &tcp(1, 443, &[])),
            ),
            eth(
                ETHERTYPE_IPV6,
                &ipv6(
                    SRC6,
                    DST6,
                    IPPROTO_ICMPV6,
                    &icmpv6_nd(NDISC_NEIGHBOUR_SOLICITATION, DST6),
                ),
            ),
        ];
        for f in &frames {
            assert!(parse_frame(f).is_ok());
            for cut in 0..f.len() {
                let r = parse_frame(&f[..cut]);
                assert!(r.is_err(), "cut at {cut} of {} parsed: {r:?}", f.len());
            }
        }
    }

    #[test]
    fn truncated_layers_are_named() {
        assert_eq!(
            parse_frame(&[0; 13]),
            Err(Malformed::Truncated {
                layer: Layer::Ethernet,
                have: 13,
                need: 14
            })
        );
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_TCP, &[0u8; 10]));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Tcp,
                have: 10,
                ..
            })
        ));
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_UDP, &[0u8; 7]));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Udp,
                ..
            })
        ));
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_ICMP, &[8, 0]));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Icmp,
                ..
            })
        ));
    }

    #[test]
    fn bad_ihl_version_and_total_length_are_malformed() {
        let mut f = tcp4(DST4, 80);
        f[ETH_HLEN] = 0x44;
        assert_eq!(parse_frame(&f), Err(Malformed::Ipv4Ihl(4)));
        f[ETH_HLEN] = 0x4f; // 60-byte header in a 40-byte packet
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Ipv4TotalLength { header: 60, .. })
        ));
        f[ETH_HLEN] = 0x65;
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::IpVersion { version: 6, .. })
        ));
        let mut f = tcp4(DST4, 80);
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&1000u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Ipv4TotalLength { total: 1000, .. })
        ));
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&19u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Ipv4TotalLength { total: 19, .. })
        ));
    }

    #[test]
    fn ipv4_options_are_checked_and_reported() {
        // Loose source route (131), length 7, then END.
        let lsrr = [131, 7, 4, 192, 0, 2, 1, 0];
        let f = eth(
            ETHERTYPE_IPV4,
            &ipv4_with(SRC4, DST4, IPPROTO_TCP, &lsrr, 0, &tcp(1, 22, &[])),
        );
        let p = ip(&f);
        assert!(p.ipv4_options);
        assert_eq!(p.transport.dst_port(), Some(22));
        // NOPs only.
        let f = eth(
            ETHERTYPE_IPV4,
            &ipv4_with(SRC4, DST4, IPPROTO_TCP, &[1, 1, 1, 1], 0, &tcp(1, 22, &[])),
        );
        assert!(ip(&f).ipv4_options);
        // An option running past the header, and one with length 1.
        for opts in [[131u8, 9, 4, 0], [7, 1, 0, 0], [1, 1, 1, 68]] {
            let f = eth(
                ETHERTYPE_IPV4,
                &ipv4_with(SRC4, DST4, IPPROTO_TCP, &opts, 0, &tcp(1, 22, &[])),
            );
            assert!(
                matches!(parse_frame(&f), Err(Malformed::Ipv4Option { .. })),
                "{opts:?}"
            );
        }
    }

    #[test]
    fn ipv4_fragments_carry_no_ports() {
        for (frag, offset, more) in [
            (IPV4_MF, 0, true),
            (185, 185, false),
            (IPV4_MF | 1, 1, true),
        ] {
            let f = eth(
                ETHERTYPE_IPV4,
                &ipv4_with(SRC4, DST4, IPPROTO_UDP, &[], frag, &udp(1, 53, b"x")),
            );
            assert_eq!(
                ip(&f).transport,
                Transport::Fragment {
                    protocol: IPPROTO_UDP,
                    offset,
                    more
                }
            );
        }
        // A non-first fragment whose body is too short for any header is still a
        // fragment, not malformed: nobody reads its ports.
        let f = eth(
            ETHERTYPE_IPV4,
            &ipv4_with(SRC4, DST4, IPPROTO_TCP, &[], 10, &[1, 2]),
        );
        assert!(matches!(ip(&f).transport, Transport::Fragment { .. }));
        // DF alone is not a fragment.
        let f = eth(
            ETHERTYPE_IPV4,
            &ipv4_with(SRC4, DST4, IPPROTO_TCP, &[], 0x4000, &tcp(1, 2, &[])),
        );
        assert!(matches!(ip(&f).transport, Transport::Tcp { .. }));
    }

    fn ext(next: u8, len8: u8) -> Vec<u8> {
        let mut h = vec![next, len8];
        h.resize((usize::from(len8) + 1) * 8, 0);
        h
    }

    #[test]
    fn ipv6_extension_chains_are_walked() {
        let mut payload = ext(IPPROTO_DSTOPTS, 0);
        payload.extend(ext(IPPROTO_TCP, 1));
        payload.extend(tcp(5, 443, &[]));
        let p = ip(&eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_HOPOPTS, &payload),
        ));
        assert_eq!(
            p.transport,
            Transport::Tcp {
                src_port: 5,
                dst_port: 443
            }
        );
        assert!(!p.ipv6_routing);
        // A routing header is reported.
        let mut payload = ext(IPPROTO_UDP, 2);
        payload.extend(udp(5, 53, &[]));
        let p = ip(&eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_ROUTING, &payload),
        ));
        assert!(p.ipv6_routing);
        // AH counts in 4-byte units, plus 2.
        let mut ah = vec![IPPROTO_UDP, 1];
        ah.resize(12, 0);
        ah.extend(udp(5, 53, &[]));
        let p = ip(&eth(ETHERTYPE_IPV6, &ipv6(SRC6, DST6, IPPROTO_AH, &ah)));
        assert_eq!(p.transport.dst_port(), Some(53));
        // ESP and "no next header" end the walk as opaque protocols.
        let p = ip(&eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_ESP, &[0; 16]),
        ));
        assert_eq!(p.transport, Transport::Other { protocol: 50 });
    }

    #[test]
    fn ipv6_chain_limits() {
        let chain = |n: usize| {
            let mut payload = Vec::new();
            for i in 0..n {
                let next = if i + 1 == n {
                    IPPROTO_UDP
                } else {
                    IPPROTO_DSTOPTS
                };
                payload.extend(ext(next, 0));
            }
            payload.extend(udp(1, 53, &[]));
            eth(ETHERTYPE_IPV6, &ipv6(SRC6, DST6, IPPROTO_DSTOPTS, &payload))
        };
        assert_eq!(
            ip(&chain(MAX_IPV6_EXT_HEADERS)).transport.dst_port(),
            Some(53)
        );
        assert_eq!(
            parse_frame(&chain(MAX_IPV6_EXT_HEADERS + 1)),
            Err(Malformed::Ipv6ChainTooLong)
        );
        assert_eq!(parse_frame(&chain(1000)), Err(Malformed::Ipv6ChainTooLong));
        // An extension header whose length runs past the payload.
        let f = eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_HOPOPTS, &ext(IPPROTO_TCP, 0)),
        );
        // 8 bytes of HBH saying "next TCP", then nothing: TCP is truncated.
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Tcp,
                ..
            })
        ));
        let f = eth(
            ETHERTYPE_IPV6,
            &ipv6(
                SRC6,
                DST6,
                IPPROTO_HOPOPTS,
                &[IPPROTO_TCP, 200, 0, 0, 0, 0, 0, 0],
            ),
        );
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Ipv6Extension,
                ..
            })
        ));
    }

    #[test]
    fn ipv6_fragment_headers_are_fragments_even_when_atomic() {
        for (frag, offset, more) in [(0u16, 0u16, false), (1, 0, true), (8 << 3, 8, false)] {
            let mut payload = vec![IPPROTO_UDP, 0];
            payload.extend_from_slice(&frag.to_be_bytes());
            payload.extend_from_slice(&[0, 0, 0, 1]);
            payload.extend(udp(1, 53, &[]));
            let p = ip(&eth(
                ETHERTYPE_IPV6,
                &ipv6(SRC6, DST6, IPPROTO_FRAGMENT, &payload),
            ));
            assert_eq!(
                p.transport,
                Transport::Fragment {
                    protocol: IPPROTO_UDP,
                    offset,
                    more
                }
            );
        }
    }

    #[test]
    fn ipv6_payload_length_is_checked() {
        let mut f = eth(
            ETHERTYPE_IPV6,
            &ipv6(SRC6, DST6, IPPROTO_UDP, &udp(1, 53, &[])),
        );
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&0u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Ipv6PayloadLength { declared: 0, .. })
        ));
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&9u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Ipv6PayloadLength { declared: 9, .. })
        ));
    }

    #[test]
    fn tcp_and_udp_lengths_are_checked() {
        let mut t = tcp(1, 80, &[]);
        t[12] = 0x40;
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_TCP, &t));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::TcpDataOffset { offset: 4, .. })
        ));
        t[12] = 0xf0;
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_TCP, &t));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::TcpDataOffset { offset: 15, .. })
        ));
        let mut u = udp(1, 53, b"abcd");
        u[4..6].copy_from_slice(&100u16.to_be_bytes());
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_UDP, &u));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::UdpLength { declared: 100, .. })
        ));
        u[4..6].copy_from_slice(&7u16.to_be_bytes());
        let f = eth(ETHERTYPE_IPV4, &ipv4(SRC4, DST4, IPPROTO_UDP, &u));
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::UdpLength { declared: 7, .. })
        ));
    }

    #[test]
    fn arp_and_ndp_are_parsed() {
        let f = eth(ETHERTYPE_ARP, &arp(ARPOP_REQUEST, SRC4, DST4));
        let Payload::Arp(a) = parse_frame(&f).unwrap().payload else {
            panic!("not ARP");
        };
        assert_eq!(
            (a.op, a.sender_ip, a.target_ip),
            (ARPOP_REQUEST, SRC4, DST4)
        );
        let mut bad = arp(ARPOP_REQUEST, SRC4, DST4);
        bad[4] = 8;
        assert!(matches!(
            parse_frame(&eth(ETHERTYPE_ARP, &bad)),
            Err(Malformed::ArpFormat { hlen: 8, .. })
        ));
        let f = eth(
            ETHERTYPE_IPV6,
            &ipv6(
                SRC6,
                DST6,
                IPPROTO_ICMPV6,
                &icmpv6_nd(NDISC_NEIGHBOUR_SOLICITATION, DST6),
            ),
        );
        assert_eq!(
            ip(&f).transport,
            Transport::Icmpv6 {
                icmp_type: NDISC_NEIGHBOUR_SOLICITATION,
                code: 0,
                ndp_target: Some(DST6)
            }
        );
        // A NS cut before its target.
        let f = eth(
            ETHERTYPE_IPV6,
            &ipv6(
                SRC6,
                DST6,
                IPPROTO_ICMPV6,
                &icmpv6_nd(NDISC_NEIGHBOUR_SOLICITATION, DST6)[..20],
            ),
        );
        assert!(matches!(
            parse_frame(&f),
            Err(Malformed::Truncated {
                layer: Layer::Icmpv6,
                ..
            })
        ));
    }

    #[test]
    fn vlan_tags_are_not_unwrapped() {
        for tpid in [ETHERTYPE_VLAN, ETHERTYPE_QINQ] {
            let mut inner = vec![0, 5];
            inner.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            inner.extend(ipv4(SRC4, DST4, IPPROTO_TCP, &tcp(1, 443, &[])));
            let f = parse_frame(&eth(tpid, &inner)).unwrap();
            assert_eq!(f.payload, Payload::VlanTagged);
            assert_eq!(f.eth.ethertype, tpid);
        }
        let f = parse_frame(&eth(0x88b5, &[1, 2, 3])).unwrap();
        assert_eq!(f.payload, Payload::OtherEthertype);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: deterministic, no dependency.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let seeds = [
            tcp4(DST4, 443),
            eth(
                ETHERTYPE_IPV6,
                &ipv6(SRC6, DST6, IPPROTO_HOPOPTS, &ext(IPPROTO_UDP, 0)),
            ),
        ];
        for _ in 0..20_000 {
            let mut f = seeds[usize::try_from(next() % 2).unwrap()].clone();
            for _ in 0..(next() % 6) {
                let at = usize::try_from(next()).unwrap() % f.len();
                f[at] = u8::try_from(next() & 0xff).unwrap();
            }
            let cut = usize::try_from(next()).unwrap() % (f.len() + 1);
            let _ = parse_frame(&f[..cut]);
        }
    }
}
