//! The bus that routes a vCPU's port I/O and MMIO exits to devices.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. The VMM keeps two:
//! one for x86 port I/O (addresses are port numbers) and one for MMIO (guest
//! physical addresses). A vCPU thread that exits on an access calls
//! [`Bus::read`] or [`Bus::write`]; the bus finds the device whose range holds
//! the address and hands it the access with the address made relative to the
//! start of the range, so a device never needs to know where it was placed.
//!
//! The bus is built during VM setup and then cloned into each vCPU thread; it is
//! immutable after that (devices are behind a `Mutex`, the map itself is shared).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers register accesses on a [`Bus`].
///
/// `offset` is relative to the start of the range the device was inserted at.
/// An access may be 1, 2, 4 or 8 bytes wide (whatever the guest instruction
/// used); a device decides what widths it accepts and must treat any other as
/// guest error, never a panic.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`. The device fills `data`;
    /// bytes it leaves untouched read as whatever the bus pre-filled (zero).
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has zero length.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Start of the rejected range.
        base: u64,
    },
    /// The range wraps around the end of the address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error(
        "bus range {base:#x}+{len:#x} overlaps the range {other_base:#x}+{other_len:#x} already on the bus"
    )]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the range already present.
        other_base: u64,
        /// Length of the range already present.
        other_len: u64,
    },
}

/// Why an access was not delivered to a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusAccessError {
    /// No device covers the address.
    #[error("no device at address {addr:#x}")]
    NoDevice {
        /// The address the guest accessed.
        addr: u64,
    },
    /// The access starts inside a device's range but runs past its end.
    #[error("access of {len} bytes at {addr:#x} runs past the end of the device range")]
    PastEnd {
        /// The address the guest accessed.
        addr: u64,
        /// Width of the access.
        len: usize,
    },
    /// Another thread panicked while holding the device lock.
    #[error("device at {addr:#x} is poisoned")]
    Poisoned {
        /// The address the guest accessed.
        addr: u64,
    },
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: SharedBusDevice,
}

/// A map of address ranges to devices. Cloning is cheap: the devices are shared.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by the start of each range.
    ranges: BTreeMap<u64, BusEntry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (base, entry) in &self.ranges {
            list.entry(&format_args!("{base:#x}+{:#x}", entry.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The only candidates for overlap: the last range starting before `end`.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            // other_base < end; overlap iff other's end > base.
            let other_end = other_base.saturating_add(other.len);
            if other_end > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// The device covering `addr`, the start of its range, and the offset of
    /// `addr` into it, if the `len`-byte access fits in the range.
    fn resolve(&self, addr: u64, len: usize) -> Result<(u64, &BusEntry), BusAccessError> {
        let (&base, entry) = self
            .ranges
            .range(..=addr)
            .next_back()
            .ok_or(BusAccessError::NoDevice { addr })?;
        let offset = addr - base; // base <= addr by the range query.
        if offset >= entry.len {
            return Err(BusAccessError::NoDevice { addr });
        }
        let access_end = u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .ok_or(BusAccessError::PastEnd { addr, len })?;
        if access_end > entry.len {
            return Err(BusAccessError::PastEnd { addr, len });
        }
        Ok((offset, entry))
    }

    /// Delivers a guest read at `addr` to the device covering it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusAccessError> {
        let (offset, entry) = self.resolve(addr, data.len())?;
        let mut device = entry
            .device
            .lock()
            .map_err(|_| BusAccessError::Poisoned { addr })?;
        device.read(offset, data);
        Ok(())
    }

    /// Delivers a guest write at `addr` to the device covering it.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusAccessError> {
        let (offset, entry) = self.resolve(addr, data.len())?;
        let mut device = entry
            .device
            .lock()
            .map_err(|_| BusAccessError::Poisoned { addr })?;
        device.write(offset, data);
        Ok(())
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the bus has no devices.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access; reads return the low byte of the offset.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<u64>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push(offset);
            for b in data.iter_mut() {
                *b = offset.to_le_bytes()[0];
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn routes_with_relative_offsets() {
        let a = recorder();
        let b = recorder();
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x1000, 0x1000).unwrap();

        bus.write(0x3f9, &[7]).unwrap();
        bus.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 1];
        bus.read(0x3fd, &mut buf).unwrap();

        assert_eq!(a.lock().unwrap().writes, vec![(1, vec![7])]);
        assert_eq!(a.lock().unwrap().reads, vec![5]);
        assert_eq!(buf, [5]);
        assert_eq!(b.lock().unwrap().writes, vec![(0xffc, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn unmapped_addresses_are_errors() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x10, 0x10).unwrap();
        assert_eq!(
            bus.write(0x20, &[0]),
            Err(BusAccessError::NoDevice { addr: 0x20 })
        );
        assert_eq!(
            bus.write(0x0f, &[0]),
            Err(BusAccessError::NoDevice { addr: 0x0f })
        );
        let mut buf = [0u8; 4];
        assert_eq!(
            bus.read(0x1e, &mut buf),
            Err(BusAccessError::PastEnd { addr: 0x1e, len: 4 })
        );
        assert_eq!(
            Bus::new().read(0, &mut buf),
            Err(BusAccessError::NoDevice { addr: 0 })
        );
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x100).unwrap();
        // Before, touching: fine. After, touching: fine.
        bus.insert(recorder(), 0x80, 0x80).unwrap();
        bus.insert(recorder(), 0x200, 0x10).unwrap();
        assert!(matches!(
            bus.insert(recorder(), 0x1ff, 2),
            Err(BusError::Overlap {
                other_base: 0x200,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(recorder(), 0x0, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(recorder(), 0x150, 1),
            Err(BusError::Overlap {
                other_base: 0x100,
                ..
            })
        ));
        assert_eq!(
            bus.insert(recorder(), 0x5000, 0),
            Err(BusError::ZeroLength { base: 0x5000 })
        );
        assert!(matches!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn a_range_reaching_the_top_of_the_address_space_is_fine() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), u64::MAX - 0xf, 0xf).unwrap();
        bus.write(u64::MAX - 1, &[9]).unwrap();
        assert_eq!(dev.lock().unwrap().writes, vec![(0xe, vec![9])]);
    }
}
