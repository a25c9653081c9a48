//! The Linux zero page (`struct boot_params`): setup header, e820 memory map,
//! command line pointer and initramfs location
//! (Documentation/arch/x86/boot.rst, "64-bit boot protocol").

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// `e820` type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Entries that fit in the zero page.
const E820_MAX_ENTRIES: usize = 128;
/// `boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `HdrS`.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment announced for ELF images (2 MiB).
const KERNEL_ALIGNMENT: u32 = 0x20_0000;
/// Boot protocol version announced for ELF images (2.15).
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// More RAM ranges than the zero page holds.
    #[error("{0} e820 entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// An address that must be 32-bit is not.
    #[error("{what} address {addr:#x} does not fit in 32 bits")]
    Not32Bit {
        /// Which field.
        what: &'static str,
        /// The value.
        addr: u64,
    },
    /// Writing to guest memory failed.
    #[error("writing the zero page at {addr:#x} failed: {source}")]
    Write {
        /// Where.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The initramfs as the zero page describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdLocation {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The e820 map for `mem_bytes` of RAM: base memory below the EBDA, then RAM
/// from 1 MiB to the hole, then RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    let ram = |addr: u64, end: u64| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: E820_RAM,
    };
    let low_end = layout::low_ram_end(mem_bytes);
    map.push(ram(0, layout::EBDA_START.min(low_end)));
    if low_end > layout::HIMEM_START {
        map.push(ram(layout::HIMEM_START, low_end));
    }
    for (start, len) in layout::ram_ranges(mem_bytes) {
        if start.0 >= layout::FIRST_ADDR_PAST_32BITS {
            map.push(ram(start.0, start.0 + len));
        }
    }
    map
}

fn u32_addr(what: &'static str, addr: u64) -> Result<u32, ZeroPageError> {
    u32::try_from(addr).map_err(|_| ZeroPageError::Not32Bit { what, addr })
}

/// Builds `boot_params`. `header` is the bzImage's setup header (kept as the
/// kernel wrote it, then completed), or `None` for an ELF vmlinux.
pub fn build(
    header: Option<setup_header>,
    mem_bytes: u64,
    cmdline_len: usize,
    initrd: Option<InitrdLocation>,
) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.version = BOOT_PROTOCOL_VERSION;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = u32_addr("command line", layout::CMDLINE_START)?;
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32_addr("initramfs", initrd.addr)?;
        params.hdr.ramdisk_size = u32_addr("initramfs size", initrd.size)?;
    }
    let map = e820_map(mem_bytes);
    if map.len() > E820_MAX_ENTRIES {
        return Err(ZeroPageError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    Ok(params)
}

/// Writes `params` at [`layout::ZERO_PAGE_START`].
pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), ZeroPageError> {
    let addr = layout::ZERO_PAGE_START;
    mem.write_obj(*params, GuestAddress(addr))
        .map_err(|source| ZeroPageError::Write { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_and_large_memory() {
        let small = e820_map(128 << 20);
        let s: Vec<(u64, u64)> = small.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(s, vec![(0, 0x9fc00), (0x10_0000, (128 << 20) - 0x10_0000)]);

        let large = e820_map(8 << 30);
        let l: Vec<(u64, u64)> = large.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(l[1], (0x10_0000, layout::MMIO_HOLE_START - 0x10_0000));
        assert_eq!(l[2], (1 << 32, (8 << 30) - layout::MMIO_HOLE_START));
        assert!(large.iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn elf_zero_page_fields() {
        let p = build(
            None,
            256 << 20,
            42,
            Some(InitrdLocation {
                addr: 0x0f00_0000,
                size: 1234,
            }),
        )
        .unwrap();
        let (ptr, size, img, rsize, flag, magic, n) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.hdr.boot_flag,
            p.hdr.header,
            p.e820_entries,
        );
        assert_eq!(u64::from(ptr), layout::CMDLINE_START);
        assert_eq!(size, 42);
        assert_eq!((img, rsize), (0x0f00_0000, 1234));
        assert_eq!((flag, magic), (0xaa55, 0x5372_6448));
        assert_eq!(n, 2);
    }

    #[test]
    fn bzimage_header_is_kept_and_completed() {
        let h = setup_header {
            setup_sects: 27,
            version: 0x020f,
            ..Default::default()
        };
        let p = build(Some(h), 64 << 20, 10, None).unwrap();
        let (sects, loader, rd) = (p.hdr.setup_sects, p.hdr.type_of_loader, p.hdr.ramdisk_image);
        assert_eq!(sects, 27);
        assert_eq!(loader, 0xff);
        assert_eq!(rd, 0);
    }

    #[test]
    fn written_where_the_kernel_looks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let p = build(None, 1 << 20, 5, None).unwrap();
        write(&mem, &p).unwrap();
        let magic: u32 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x202))
            .unwrap();
        assert_eq!(magic, 0x5372_6448);
        let entries: u8 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(entries, 1);
    }
}
