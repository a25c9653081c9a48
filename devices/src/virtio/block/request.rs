//! Parsing a virtio-blk request: what the guest handed over, checked, typed. No I/O.
//!
//! [`parse`] is the whole surface a guest controls (besides the transport registers), and
//! it is a pure function of the descriptors, guest memory and the disk's limits, so a fuzz
//! target can reach it alone.

use mvm_loader::bytes::{le_u32, le_u64};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::virtio::GuestMemoryMmap;

/// What the parser needs to know about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Largest data segment in bytes.
    pub size_max: u32,
}

/// A validated request, ready to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// The data segments (guest address, length), in order; all inside guest memory and
    /// in the direction the request needs.
    pub segments: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The operation of a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from byte offset `offset` of the disk into the segments.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Total bytes.
        len: u32,
    },
    /// Write `len` bytes from the segments to byte offset `offset` of the disk.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Total bytes.
        len: u32,
    },
    /// fdatasync the backing file.
    Flush,
    /// Write the id string into the segments (at most [`VIRTIO_BLK_ID_BYTES`]).
    GetId,
}

/// The chain itself is broken: there is no status byte to report an error in. The device
/// needs a reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain yielded no descriptor (head index past the table, or the table unreadable).
    #[error("descriptor chain with head {head} is empty or unreadable")]
    Empty {
        /// Head index.
        head: u16,
    },
    /// The chain did not end: it loops, is longer than the queue, or its `next` points
    /// outside the table.
    #[error("descriptor chain with head {head} does not end within the queue (loop, over-long, or bad next index)")]
    Unterminated {
        /// Head index.
        head: u16,
    },
    /// The last descriptor cannot hold the status byte.
    #[error("status descriptor at {addr:#x} (len {len}, write-only {write_only}) cannot take the status byte")]
    BadStatus {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
        /// Whether it is device-writable.
        write_only: bool,
    },
}

/// Why a request is refused with an error status (the status byte is usable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has a status descriptor and nothing else.
    #[error("request has no header")]
    NoHeader,
    /// The header descriptor is device-writable, too short or outside guest memory.
    #[error(
        "request header at {addr:#x} (len {len}) is not a readable 16-byte header in guest memory"
    )]
    BadHeader {
        /// Header address.
        addr: u64,
        /// Header length.
        len: u32,
    },
    /// The request type is unknown (answered with UNSUPP).
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A write to a read-only disk.
    #[error("write to a read-only disk at sector {sector}")]
    ReadOnly {
        /// First sector.
        sector: u64,
    },
    /// More data segments than `seg_max`.
    #[error("{count} data segments, more than seg_max {max}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A data segment is empty or larger than `size_max`.
    #[error("data segment {index} has length {len} (allowed 1..={max})")]
    BadSegmentLength {
        /// Segment index.
        index: usize,
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A data segment lies (partly) outside guest memory.
    #[error("data segment {index} at {addr:#x} (len {len}) is outside guest memory")]
    SegmentOutsideMemory {
        /// Segment index.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A data segment has the wrong direction for the request.
    #[error("data segment {index} is {found} but the request needs {needed}")]
    WrongDirection {
        /// Segment index.
        index: usize,
        /// "device-writable" or "device-readable".
        found: &'static str,
        /// What the request needs.
        needed: &'static str,
    },
    /// A read or write without data.
    #[error("read or write without data")]
    NoData,
    /// The data length is not a whole number of sectors or overflows.
    #[error("data length {0} is not a multiple of 512 bytes")]
    PartialSector(u64),
    /// The sector range runs past the end of the disk.
    #[error(
        "sectors {sector}..{sector}+{count} are past the end of the disk ({capacity} sectors)"
    )]
    PastEnd {
        /// First sector.
        sector: u64,
        /// Sectors requested.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
}

impl RequestError {
    /// The status byte this error is reported with.
    #[must_use]
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Why [`parse`] did not produce a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Broken chain: mark the device NEEDS_RESET.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Refused request: write `error.status()` at `status` and complete it.
    #[error("{error}")]
    Request {
        /// Where the status byte goes.
        status: GuestAddress,
        /// Why.
        error: RequestError,
    },
}

/// Validates a request chain. `descriptors` is the chain as the queue yielded it, and
/// `truncated` says whether the walk stopped on a descriptor that still had NEXT set
/// (a loop, an over-long chain or a bad index).
pub fn parse(
    head: u16,
    descriptors: &[Descriptor],
    truncated: bool,
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
) -> Result<Request, ParseError> {
    if truncated {
        return Err(ChainError::Unterminated { head }.into());
    }
    let Some((status_desc, rest)) = descriptors.split_last() else {
        return Err(ChainError::Empty { head }.into());
    };
    let status = status_desc.addr();
    if !status_desc.is_write_only() || status_desc.len() < 1 || !mem.check_range(status, 1) {
        return Err(ChainError::BadStatus {
            addr: status.raw_value(),
            len: status_desc.len(),
            write_only: status_desc.is_write_only(),
        }
        .into());
    }
    let refuse = |error| ParseError::Request { status, error };

    let Some((header_desc, data)) = rest.split_first() else {
        return Err(refuse(RequestError::NoHeader));
    };
    let (request_type, sector) =
        read_header(header_desc, mem).ok_or(refuse(RequestError::BadHeader {
            addr: header_desc.addr().raw_value(),
            len: header_desc.len(),
        }))?;

    let (needs_write_only, kind_name) = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => (Some(true), "device-writable"),
        VIRTIO_BLK_T_OUT => (Some(false), "device-readable"),
        // FLUSH carries no data; whatever segments come along are ignored.
        VIRTIO_BLK_T_FLUSH => (None, ""),
        other => return Err(refuse(RequestError::Unsupported(other))),
    };

    let mut segments =
        Vec::with_capacity(data.len().min(usize::try_from(limits.seg_max).unwrap_or(0)));
    if let Some(write_only) = needs_write_only {
        if data.len() > usize::try_from(limits.seg_max).unwrap_or(usize::MAX) {
            return Err(refuse(RequestError::TooManySegments {
                count: data.len(),
                max: limits.seg_max,
            }));
        }
        for (index, desc) in data.iter().enumerate() {
            let len = desc.len();
            if len == 0 || len > limits.size_max {
                return Err(refuse(RequestError::BadSegmentLength {
                    index,
                    len,
                    max: limits.size_max,
                }));
            }
            if desc.is_write_only() != write_only {
                return Err(refuse(RequestError::WrongDirection {
                    index,
                    found: if desc.is_write_only() {
                        "device-writable"
                    } else {
                        "device-readable"
                    },
                    needed: kind_name,
                }));
            }
            let in_memory = usize::try_from(len).is_ok_and(|n| mem.check_range(desc.addr(), n));
            if !in_memory {
                return Err(refuse(RequestError::SegmentOutsideMemory {
                    index,
                    addr: desc.addr().raw_value(),
                    len,
                }));
            }
            segments.push((desc.addr(), len));
        }
    }

    let kind = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (offset, len) = data_range(sector, &segments, limits).map_err(refuse)?;
            if request_type == VIRTIO_BLK_T_IN {
                RequestKind::Read { offset, len }
            } else if limits.read_only {
                return Err(refuse(RequestError::ReadOnly { sector }));
            } else {
                RequestKind::Write { offset, len }
            }
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        _ => RequestKind::GetId,
    };
    Ok(Request {
        kind,
        segments,
        status,
    })
}

/// The header's type and sector, if the header is a readable 16-byte buffer in memory.
fn read_header(desc: &Descriptor, mem: &GuestMemoryMmap) -> Option<(u32, u64)> {
    if desc.is_write_only() || desc.len() < REQUEST_HEADER_SIZE {
        return None;
    }
    let mut header = [0u8; 16];
    mem.read_slice(&mut header, desc.addr()).ok()?;
    let request_type = le_u32(&header, 0)?;
    let sector = le_u64(&header, 8)?;
    Some((request_type, sector))
}

/// Byte offset and length of a read or write, checked against the disk.
fn data_range(
    sector: u64,
    segments: &[(GuestAddress, u32)],
    limits: &DiskLimits,
) -> Result<(u64, u32), RequestError> {
    let total: u64 = segments.iter().map(|(_, len)| u64::from(*len)).sum();
    if total == 0 {
        return Err(RequestError::NoData);
    }
    if total % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(total));
    }
    let len = u32::try_from(total).map_err(|_| RequestError::PartialSector(total))?;
    let count = total >> SECTOR_SHIFT;
    let past_end = RequestError::PastEnd {
        sector,
        count,
        capacity: limits.capacity_sectors,
    };
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity_sectors => {}
        _ => return Err(past_end),
    }
    // capacity_sectors comes from a file length, so this cannot overflow; check anyway.
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(past_end)?;
    Ok((offset, len))
}
