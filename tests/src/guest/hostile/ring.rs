//! A split virtqueue written by hand (VIRTIO 1.2, 2.7): descriptor table, available ring
//! and used ring each in their own [`Arena`] page, so a scenario can put any value in
//! any field.

use std::time::{Duration, Instant};

use super::dma::{Arena, PAGE};

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// One driver-side virtqueue.
#[derive(Debug, Clone)]
pub struct Vq {
    /// Queue size (entries).
    pub size: u16,
    desc_page: usize,
    avail_page: usize,
    used_page: usize,
    desc_phys: u64,
    avail_phys: u64,
    used_phys: u64,
    /// The driver's available index (next to publish).
    pub avail_idx: u16,
    /// The used index the driver has consumed up to.
    pub used_seen: u16,
    next_desc: u16,
}

/// One element of a chain: guest-physical address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

impl Part {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// Bytes of the used ring of a queue of `size` entries (flags, idx, ring, avail_event).
pub fn used_ring_bytes(size: u16) -> usize {
    6 + 8 * usize::from(size)
}

impl Vq {
    /// A queue of `size` entries on pages `desc`, `avail`, `used` of `arena`, rings
    /// zeroed, the used ring device-writable.
    pub fn new(
        arena: &mut Arena,
        size: u16,
        desc: usize,
        avail: usize,
        used: usize,
    ) -> Result<Self, String> {
        if usize::from(size) * 16 > PAGE || used_ring_bytes(size) > PAGE {
            return Err(format!("queue size {size} does not fit a page"));
        }
        let vq = Self {
            size,
            desc_page: desc,
            avail_page: avail,
            used_page: used,
            desc_phys: arena.get(desc)?.phys(0),
            avail_phys: arena.get(avail)?.phys(0),
            used_phys: arena.get(used)?.phys(0),
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        };
        arena
            .page(avail)?
            .write(0, &vec![0u8; 6 + 2 * usize::from(size)]);
        let used_page = arena.page(used)?;
        used_page.write(0, &vec![0u8; used_ring_bytes(size)]);
        used_page.allow(0, used_ring_bytes(size));
        Ok(vq)
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.desc_phys
    }

    /// Guest-physical address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.avail_phys
    }

    /// Guest-physical address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used_phys
    }

    /// Writes descriptor `i` as is.
    pub fn set_desc(
        &self,
        arena: &mut Arena,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), String> {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        arena.page(self.desc_page)?.write(usize::from(i) * 16, &raw);
        Ok(())
    }

    /// Writes `parts` as a chain on consecutive free descriptors; returns the head.
    pub fn chain(&mut self, arena: &mut Arena, parts: &[Part]) -> Result<u16, String> {
        let n = u16::try_from(parts.len()).map_err(|e| e.to_string())?;
        if n == 0 || n > self.size {
            return Err(format!(
                "chain of {n} does not fit queue size {}",
                self.size
            ));
        }
        if self.next_desc.saturating_add(n) > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (k, part) in parts.iter().enumerate() {
            let i = head + u16::try_from(k).map_err(|e| e.to_string())?;
            let last = k + 1 == parts.len();
            let mut flags = if last { 0 } else { F_NEXT };
            if part.write {
                flags |= F_WRITE;
            }
            let next = if last { 0 } else { i + 1 };
            self.set_desc(arena, i, part.addr, part.len, flags, next)?;
        }
        self.next_desc = head + n;
        Ok(head)
    }

    /// Puts `head` in the next available slot without publishing it.
    pub fn stage(&mut self, arena: &mut Arena, head: u16) -> Result<(), String> {
        let slot = usize::from(self.avail_idx % self.size);
        arena
            .page(self.avail_page)?
            .write(4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes the available index as `idx` (whatever it is).
    pub fn publish_idx(&self, arena: &mut Arena, idx: u16) -> Result<(), String> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        arena.page(self.avail_page)?.write(2, &idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Stages `head` and publishes the new index.
    pub fn offer(&mut self, arena: &mut Arena, head: u16) -> Result<(), String> {
        self.stage(arena, head)?;
        self.publish_idx(arena, self.avail_idx)
    }

    /// The used index as the device wrote it.
    pub fn used_idx(&self, arena: &Arena) -> Result<u16, String> {
        Ok(arena.get(self.used_page)?.read_u16(2))
    }

    /// Used element `n` (id, len).
    pub fn used_elem(&self, arena: &Arena, n: u16) -> Result<(u32, u32), String> {
        let off = 4 + 8 * usize::from(n % self.size);
        let p = arena.get(self.used_page)?;
        Ok((p.read_u32(off), p.read_u32(off + 4)))
    }

    /// Waits up to `timeout` for the device to use one more buffer; returns (id, len).
    pub fn wait_used(&mut self, arena: &Arena, timeout: Duration) -> Result<(u32, u32), String> {
        let start = Instant::now();
        loop {
            let idx = self.used_idx(arena)?;
            if idx != self.used_seen {
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let elem = self.used_elem(arena, self.used_seen)?;
                self.used_seen = self.used_seen.wrapping_add(1);
                return Ok(elem);
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "no used buffer within {timeout:?} (used idx {idx}, avail idx {})",
                    self.avail_idx
                ));
            }
            std::thread::yield_now();
        }
    }

    /// Fails if the device used a buffer within `wait` (it must not have).
    pub fn expect_idle(&self, arena: &Arena, wait: Duration, what: &str) -> Result<(), String> {
        std::thread::sleep(wait);
        let idx = self.used_idx(arena)?;
        if idx == self.used_seen {
            Ok(())
        } else {
            Err(format!(
                "{what}: the device used a buffer (used idx {idx}, expected {})",
                self.used_seen
            ))
        }
    }
}
