//! Guest pages a device may reach: anonymous, mlock'd pages of this process whose physical
//! addresses come from `/proc/self/pagemap` (STRICT_DEVMEM keeps guest RAM out of
//! `/dev/mem`, so the rings and buffers live here).
//!
//! Every byte the test program writes is also kept in a shadow copy. After a scenario,
//! [`Arena::check`] compares each page with its shadow outside the ranges the device was
//! allowed to write: any other difference is the device writing where it must not.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// Page size of the guest (x86_64).
pub const PAGE: usize = 4096;
/// What every page holds before a scenario writes into it.
pub const CANARY: u8 = 0x5a;

/// One locked page and its shadow.
#[derive(Debug)]
pub struct DmaPage {
    ptr: NonNull<u8>,
    phys: u64,
    shadow: Vec<u8>,
    allowed: Vec<(usize, usize)>,
}

/// The physical frame of the page mapped at `virt`, from `/proc/self/pagemap` (bit 63:
/// present; bits 0-54: frame number; root sees real frame numbers).
fn physical_address(virt: usize) -> Result<u64, String> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let index = u64::try_from(virt / PAGE).map_err(|e| e.to_string())?;
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, index * 8)
        .map_err(|e| format!("read pagemap: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    if entry & (1 << 63) == 0 {
        return Err(format!("page at {virt:#x} is not present"));
    }
    let pfn = entry & ((1 << 55) - 1);
    if pfn == 0 {
        return Err("pagemap hides frame numbers (not root?)".into());
    }
    Ok(pfn * PAGE as u64)
}

impl DmaPage {
    /// A fresh page, locked in memory, filled with [`CANARY`].
    pub fn new() -> Result<Self, String> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is affected. The result is checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or("mmap returned null")?;
        // SAFETY: `raw` is the PAGE-byte mapping made above.
        if unsafe { libc::mlock(raw, PAGE) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        let mut page = Self {
            ptr,
            phys: 0,
            shadow: vec![CANARY; PAGE],
            allowed: Vec::new(),
        };
        page.reset();
        page.phys = physical_address(ptr.as_ptr() as usize)?;
        Ok(page)
    }

    /// The guest-physical address of byte `off` of the page.
    pub fn phys(&self, off: usize) -> u64 {
        self.phys + off as u64
    }

    /// Fills the page (and its shadow) with [`CANARY`]; no range is device-writable.
    pub fn reset(&mut self) {
        for off in 0..PAGE {
            self.store(off, CANARY);
        }
        self.shadow.fill(CANARY);
        self.allowed.clear();
    }

    fn store(&self, off: usize, byte: u8) {
        if off < PAGE {
            // SAFETY: off < PAGE, inside the live mapping owned by self; volatile because
            // the device (another host thread) reads and writes the same memory.
            unsafe { self.ptr.as_ptr().add(off).write_volatile(byte) };
        }
    }

    fn load(&self, off: usize) -> u8 {
        if off < PAGE {
            // SAFETY: as in `store`.
            unsafe { self.ptr.as_ptr().add(off).read_volatile() }
        } else {
            0
        }
    }

    /// Writes `bytes` at `off` (and into the shadow). Bytes past the page are dropped.
    pub fn write(&mut self, off: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.store(off + i, *b);
            if let Some(s) = self.shadow.get_mut(off + i) {
                *s = *b;
            }
        }
    }

    /// Reads `len` bytes at `off`.
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        (off..off + len).map(|o| self.load(o)).collect()
    }

    /// A little-endian u16 at an even offset, read in one access (the used index).
    pub fn read_u16(&self, off: usize) -> u16 {
        if off % 2 != 0 || off + 2 > PAGE {
            return 0;
        }
        // SAFETY: aligned, inside the mapping; volatile for the device's concurrent writes.
        unsafe { self.ptr.as_ptr().add(off).cast::<u16>().read_volatile() }
    }

    /// A little-endian u32 at `off`.
    pub fn read_u32(&self, off: usize) -> u32 {
        let b = self.read(off, 4);
        u32::from_le_bytes([
            *b.first().unwrap_or(&0),
            *b.get(1).unwrap_or(&0),
            *b.get(2).unwrap_or(&0),
            *b.get(3).unwrap_or(&0),
        ])
    }

    /// Lets the device write `len` bytes at `off` in this scenario.
    pub fn allow(&mut self, off: usize, len: usize) {
        self.allowed.push((off, len));
    }

    /// The first byte that differs from the shadow outside the allowed ranges.
    pub fn first_violation(&self) -> Option<(usize, u8, u8)> {
        (0..PAGE)
            .filter(|o| !self.allowed.iter().any(|(a, l)| *o >= *a && *o < a + l))
            .find_map(|o| {
                let want = *self.shadow.get(o).unwrap_or(&0);
                let got = self.load(o);
                (got != want).then_some((o, want, got))
            })
    }
}

impl Drop for DmaPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), PAGE) };
    }
}

/// The pages of one test run, indexed by number.
#[derive(Debug)]
pub struct Arena {
    pages: Vec<DmaPage>,
}

impl Arena {
    /// `count` locked pages.
    pub fn new(count: usize) -> Result<Self, String> {
        let pages = (0..count)
            .map(|_| DmaPage::new())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { pages })
    }

    /// Page `i` (a scenario bug if out of range: reported, not a panic).
    pub fn page(&mut self, i: usize) -> Result<&mut DmaPage, String> {
        self.pages
            .get_mut(i)
            .ok_or_else(|| format!("arena has no page {i}"))
    }

    /// Page `i`, read-only.
    pub fn get(&self, i: usize) -> Result<&DmaPage, String> {
        self.pages
            .get(i)
            .ok_or_else(|| format!("arena has no page {i}"))
    }

    /// Canary-fills every page.
    pub fn reset(&mut self) {
        for p in &mut self.pages {
            p.reset();
        }
    }

    /// Fails naming the first byte the device changed outside what it was allowed.
    pub fn check(&self) -> Result<(), String> {
        for (i, p) in self.pages.iter().enumerate() {
            if let Some((off, want, got)) = p.first_violation() {
                return Err(format!(
                    "guest memory changed outside the device-writable buffers: page {i} \
                     (phys {:#x}) byte {off:#x} is {got:#04x}, expected {want:#04x}",
                    p.phys(off)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_check_finds_device_writes_outside_the_allowed_ranges() {
        let mut page = DmaPage::new().unwrap();
        assert_ne!(page.phys(0), 0);
        assert_eq!(page.phys(0) % PAGE as u64, 0);
        page.write(10, &[1, 2, 3]);
        assert_eq!(page.read(9, 5), vec![CANARY, 1, 2, 3, CANARY]);
        assert_eq!(page.first_violation(), None);
        // A "device" write inside an allowed range passes, outside it is caught.
        page.allow(100, 4);
        page.store(101, 0xff);
        assert_eq!(page.first_violation(), None);
        page.store(104, 0xee);
        assert_eq!(page.first_violation(), Some((104, CANARY, 0xee)));
        page.reset();
        assert_eq!(page.first_violation(), None);
        assert_eq!(page.read_u16(10), u16::from_le_bytes([CANARY, CANARY]));
    }
}
