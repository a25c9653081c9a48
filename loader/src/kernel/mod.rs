//! Loading an ELF vmlinux or a bzImage, and an initramfs, into guest memory.
//!
//! Two steps, kept apart so the first can be fuzzed and run before any VM
//! exists: [`inspect_kernel`] parses the image's headers (pure, no I/O) and says
//! what it is and which guest-physical range it needs; [`load_kernel`] then
//! copies it into guest memory with `linux-loader` and returns the 64-bit entry
//! point. [`place_initrd`] picks the initramfs address, [`load_initrd`] copies it.

use std::io::{Cursor, Read, Seek};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::bytes::{le_u16, le_u32, le_u64};

pub mod hashed;

/// Largest kernel image accepted (a microVM kernel is tens of MiB).
pub const MAX_KERNEL_SIZE: u64 = 512 << 20;

/// ELF identification: `\x7fELF`.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// `EI_CLASS` value for 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `EI_DATA` value for little-endian objects.
const ELFDATA2LSB: u8 = 1;
/// `e_machine` for x86_64.
const EM_X86_64: u16 = 62;
/// Program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// Size of `Elf64_Ehdr`.
const ELF64_EHDR_SIZE: usize = 64;
/// Size of `Elf64_Phdr`.
const ELF64_PHDR_SIZE: usize = 56;

/// Offset of the bzImage setup header (`struct setup_header`, Documentation/arch/x86/boot.rst).
const BZ_SETUP_SECTS: usize = 0x1f1;
/// Offset of `boot_flag` (0xAA55).
const BZ_BOOT_FLAG: usize = 0x1fe;
/// Offset of the `HdrS` magic.
const BZ_HEADER: usize = 0x202;
/// Offset of the boot protocol version.
const BZ_VERSION: usize = 0x206;
/// Offset of `loadflags`.
const BZ_LOADFLAGS: usize = 0x211;
/// Offset of `xloadflags`.
const BZ_XLOADFLAGS: usize = 0x236;
/// Offset of `pref_address`.
const BZ_PREF_ADDRESS: usize = 0x258;
/// Offset of `init_size`.
const BZ_INIT_SIZE: usize = 0x260;
/// `HdrS`, little-endian.
const BZ_HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12 introduced `xloadflags` (needed for the 64-bit entry).
const BZ_MIN_VERSION: u16 = 0x020c;
/// `loadflags`: protected-mode code is loaded at 0x100000.
const BZ_LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has the legacy 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// Where a bzImage's protected-mode part is loaded.
pub const BZIMAGE_LOAD_ADDRESS: u64 = 0x10_0000;
/// The 64-bit entry point of a bzImage, relative to its load address.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;

/// Initramfs placement alignment.
const INITRD_ALIGN: u64 = 4096;

/// The two kernel image formats mvm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A compressed `bzImage` (booted at its 64-bit entry).
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Elf => "ELF vmlinux",
            Self::BzImage => "bzImage",
        })
    }
}

/// What [`inspect_kernel`] learnt from an image's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// The image format.
    pub format: KernelFormat,
    /// Lowest guest-physical address the kernel is loaded at.
    pub load_start: u64,
    /// One past the highest guest-physical address the kernel needs (for a
    /// bzImage, including room to decompress in place).
    pub load_end: u64,
}

/// Why a kernel or initramfs was refused.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file is empty.
    #[error("kernel image is empty (0 bytes)")]
    Empty,
    /// The file is larger than [`MAX_KERNEL_SIZE`].
    #[error("kernel image is {size} bytes, more than the {max} bytes accepted")]
    TooLarge {
        /// Size of the image.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage (first bytes {first_bytes})")]
    UnknownFormat {
        /// Hex of the first bytes, for the error message.
        first_bytes: String,
    },
    /// An ELF that is not a 64-bit little-endian x86_64 image, or is malformed.
    #[error("kernel ELF image is invalid: {0}")]
    BadElf(String),
    /// A bzImage this VMM cannot boot.
    #[error("kernel bzImage is invalid: {0}")]
    BadBzImage(String),
    /// `linux-loader` refused the image while copying it.
    #[error("loading the {format} into guest memory failed: {source}")]
    Load {
        /// The format being loaded.
        format: KernelFormat,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit between the kernel and the ceiling.
    #[error(
        "initramfs of {size} bytes does not fit in guest RAM between the kernel end {kernel_end:#x} and {ceiling:#x}"
    )]
    InitrdDoesNotFit {
        /// Size of the initramfs.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address (exclusive) the initramfs may reach.
        ceiling: u64,
    },
    /// The image's file could not be read.
    #[error("reading the image failed: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the initramfs into guest memory failed.
    #[error("writing the initramfs at {addr:#x} into guest memory failed: {source}")]
    InitrdWrite {
        /// Where it was written.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
}

/// Parses an image's headers: which format, and the guest-physical range it
/// needs. Pure; the fuzz target for kernel images.
pub fn inspect_kernel(image: &[u8]) -> Result<KernelInfo, KernelError> {
    inspect_kernel_header(image, u64::try_from(image.len()).unwrap_or(u64::MAX))
}

/// How much of a kernel file [`inspect_kernel_header`] is given: the ELF header and
/// program headers, or the bzImage setup header, lie in it.
pub const KERNEL_HEADER_PREFIX: usize = 64 << 10;

/// [`inspect_kernel`] from the first bytes `head` of a file of `file_len` bytes (for a
/// kernel loaded straight from its file): every header read comes from `head`, every
/// range is checked against `file_len`. Headers that lie beyond `head` are refused.
pub fn inspect_kernel_header(head: &[u8], file_len: u64) -> Result<KernelInfo, KernelError> {
    if file_len == 0 || head.is_empty() {
        return Err(KernelError::Empty);
    }
    if file_len > MAX_KERNEL_SIZE {
        return Err(KernelError::TooLarge {
            size: file_len,
            max: MAX_KERNEL_SIZE,
        });
    }
    if head.starts_with(&ELF_MAGIC) {
        return inspect_elf(head, file_len);
    }
    if le_u32(head, BZ_HEADER) == Some(BZ_HDRS_MAGIC) {
        return inspect_bzimage(head, file_len);
    }
    let first_bytes = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(KernelError::UnknownFormat { first_bytes })
}

/// One `PT_LOAD` segment of an ELF kernel: `filesz` bytes at file `offset` go to
/// guest-physical `paddr`, which spans `memsz` bytes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) offset: u64,
    pub(crate) paddr: u64,
    pub(crate) filesz: u64,
    pub(crate) memsz: u64,
}

/// What an ELF kernel's headers say: its entry point and its loadable segments, each
/// checked against the file's length.
pub(crate) struct ElfLayout {
    pub(crate) entry: u64,
    pub(crate) segments: Vec<Segment>,
}

pub(crate) fn elf_layout(image: &[u8], file_len: u64) -> Result<ElfLayout, KernelError> {
    let bad = |why: &str| KernelError::BadElf(why.to_string());
    if image.len() < ELF64_EHDR_SIZE {
        return Err(bad("shorter than an ELF64 header"));
    }
    if image.get(4) != Some(&ELFCLASS64) {
        return Err(bad("not a 64-bit ELF"));
    }
    if image.get(5) != Some(&ELFDATA2LSB) {
        return Err(bad("not little-endian"));
    }
    let machine = le_u16(image, 18).ok_or_else(|| bad("truncated header"))?;
    if machine != EM_X86_64 {
        return Err(KernelError::BadElf(format!(
            "machine {machine}, not x86_64 ({EM_X86_64})"
        )));
    }
    let entry = le_u64(image, 24).ok_or_else(|| bad("truncated header"))?;
    let phoff = le_u64(image, 32).ok_or_else(|| bad("truncated header"))?;
    let phentsize = le_u16(image, 54).ok_or_else(|| bad("truncated header"))?;
    let phnum = le_u16(image, 56).ok_or_else(|| bad("truncated header"))?;
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(KernelError::BadElf(format!(
            "program header size {phentsize}, expected {ELF64_PHDR_SIZE}"
        )));
    }
    let phoff = usize::try_from(phoff).map_err(|_| bad("program header offset too large"))?;
    let mut segments = Vec::new();
    for i in 0..usize::from(phnum) {
        let at = i
            .checked_mul(ELF64_PHDR_SIZE)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| bad("program header offset overflows"))?;
        let phdr = image
            .get(at..at.saturating_add(ELF64_PHDR_SIZE))
            .ok_or_else(|| {
                if u64::try_from(image.len()).unwrap_or(u64::MAX) < file_len {
                    KernelError::BadElf(format!(
                        "program header {i} lies beyond the first {} bytes",
                        image.len()
                    ))
                } else {
                    KernelError::BadElf(format!("program header {i} past end of file"))
                }
            })?;
        if le_u32(phdr, 0) != Some(PT_LOAD) {
            continue;
        }
        let field = |o| le_u64(phdr, o).ok_or_else(|| bad("truncated program header"));
        let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
        let file_end = offset
            .checked_add(filesz)
            .ok_or_else(|| bad("segment file range overflows"))?;
        if file_end > file_len {
            return Err(KernelError::BadElf(format!(
                "segment {i} file range ends at {file_end:#x}, past the end of the file"
            )));
        }
        paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment memory range overflows"))?;
        segments.push(Segment {
            offset,
            paddr,
            filesz,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err(bad("no loadable segments"));
    }
    Ok(ElfLayout { entry, segments })
}

fn inspect_elf(image: &[u8], file_len: u64) -> Result<KernelInfo, KernelError> {
    let layout = elf_layout(image, file_len)?;
    let load_start = layout.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
    let load_end = layout
        .segments
        .iter()
        .map(|s| s.paddr.saturating_add(s.memsz))
        .max()
        .unwrap_or(0);
    if load_end == 0 {
        return Err(KernelError::BadElf("no loadable segments".to_string()));
    }
    Ok(KernelInfo {
        format: KernelFormat::Elf,
        load_start,
        load_end,
    })
}

fn inspect_bzimage(image: &[u8], file_len: u64) -> Result<KernelInfo, KernelError> {
    let bad = |why: String| KernelError::BadBzImage(why);
    let field_missing = || bad("truncated setup header".to_string());
    if le_u16(image, BZ_BOOT_FLAG) != Some(0xaa55) {
        return Err(bad("boot_flag is not 0xAA55".to_string()));
    }
    let version = le_u16(image, BZ_VERSION).ok_or_else(field_missing)?;
    if version < BZ_MIN_VERSION {
        return Err(bad(format!(
            "boot protocol {version:#06x} is older than {BZ_MIN_VERSION:#06x}"
        )));
    }
    let loadflags = *image.get(BZ_LOADFLAGS).ok_or_else(field_missing)?;
    if loadflags & BZ_LOADED_HIGH == 0 {
        return Err(bad("not a bzImage (LOADED_HIGH clear)".to_string()));
    }
    let xloadflags = le_u16(image, BZ_XLOADFLAGS).ok_or_else(field_missing)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            "no 64-bit entry point (XLF_KERNEL_64 clear)".to_string()
        ));
    }
    let setup_sects = match *image.get(BZ_SETUP_SECTS).ok_or_else(field_missing)? {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    let image_len = file_len;
    let payload_len = image_len.checked_sub(setup_len).ok_or_else(|| {
        bad(format!(
            "file of {image_len} bytes is shorter than its {setup_len}-byte setup"
        ))
    })?;
    let pref_address = le_u64(image, BZ_PREF_ADDRESS).ok_or_else(field_missing)?;
    let init_size = u64::from(le_u32(image, BZ_INIT_SIZE).ok_or_else(field_missing)?);
    let load_end = BZIMAGE_LOAD_ADDRESS
        .checked_add(payload_len)
        .and_then(|loaded| pref_address.checked_add(init_size).map(|d| loaded.max(d)))
        .ok_or_else(|| bad("pref_address + init_size overflows".to_string()))?;
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        load_start: BZIMAGE_LOAD_ADDRESS,
        load_end,
    })
}

/// A kernel in guest memory, ready to enter.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The image format.
    pub format: KernelFormat,
    /// The 64-bit entry point (the zero page pointer goes in `rsi`).
    pub entry: GuestAddress,
    /// One past the last byte the kernel occupies.
    pub end: u64,
    /// The bzImage setup header, to copy into the zero page (`None` for ELF).
    pub setup_header: Option<setup_header>,
}

/// Copies `image` (already accepted by [`inspect_kernel`]) into `mem`.
/// `highmem_start` is the lowest address a kernel may be loaded at.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
    highmem_start: GuestAddress,
) -> Result<LoadedKernel, KernelError> {
    let info = inspect_kernel(image)?;
    load_kernel_from(mem, &mut Cursor::new(image), &info, highmem_start)
}

/// Loads the kernel that `info` describes from `source` (its bytes, or its file: the
/// segments are read straight into guest memory, with no copy in between).
pub fn load_kernel_from<M, F>(
    mem: &M,
    source: &mut F,
    info: &KernelInfo,
    highmem_start: GuestAddress,
) -> Result<LoadedKernel, KernelError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    match info.format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, source, Some(highmem_start)).map_err(|source| {
                KernelError::Load {
                    format: info.format,
                    source,
                }
            })?;
            Ok(LoadedKernel {
                format: info.format,
                entry: result.kernel_load,
                end: info.load_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(
                mem,
                Some(GuestAddress(BZIMAGE_LOAD_ADDRESS)),
                source,
                Some(highmem_start),
            )
            .map_err(|source| KernelError::Load {
                format: info.format,
                source,
            })?;
            let entry = result
                .kernel_load
                .0
                .checked_add(BZIMAGE_ENTRY_64_OFFSET)
                .ok_or_else(|| KernelError::BadBzImage("entry point overflows".to_string()))?;
            Ok(LoadedKernel {
                format: info.format,
                entry: GuestAddress(entry),
                end: info.load_end,
                setup_header: result.setup_header,
            })
        }
    }
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `ceiling` (exclusive), page aligned, and not below `kernel_end`.
pub fn place_initrd(size: u64, kernel_end: u64, ceiling: u64) -> Result<u64, KernelError> {
    let too_big = KernelError::InitrdDoesNotFit {
        size,
        kernel_end,
        ceiling,
    };
    let Some(start) = ceiling.checked_sub(size) else {
        return Err(too_big);
    };
    let start = start - start % INITRD_ALIGN;
    if start < kernel_end {
        return Err(too_big);
    }
    Ok(start)
}

/// Places `initrd` with [`place_initrd`] and copies it into `mem`; returns its
/// guest address.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &[u8],
    kernel_end: u64,
    ceiling: u64,
) -> Result<GuestAddress, KernelError> {
    let size = u64::try_from(initrd.len()).unwrap_or(u64::MAX);
    load_initrd_from(mem, &mut &initrd[..], size, kernel_end, ceiling)
}

/// Places an initramfs of `size` bytes with [`place_initrd`] and reads it from `source`
/// straight into `mem`; returns its guest address. Fewer than `size` bytes is an error.
pub fn load_initrd_from<M, F>(
    mem: &M,
    source: &mut F,
    size: u64,
    kernel_end: u64,
    ceiling: u64,
) -> Result<GuestAddress, KernelError>
where
    M: GuestMemoryBackend,
    F: ReadVolatile,
{
    let addr = place_initrd(size, kernel_end, ceiling)?;
    let len = usize::try_from(size).map_err(|_| KernelError::InitrdDoesNotFit {
        size,
        kernel_end,
        ceiling,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), source, len)
        .map_err(|source| KernelError::InitrdWrite { addr, source })?;
    Ok(GuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A minimal x86_64 ELF with one PT_LOAD of `code` at physical `paddr`,
    /// `memsz` bytes in memory.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; ELF64_EHDR_SIZE + ELF64_PHDR_SIZE];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut f[64..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        let off = 120u64;
        ph[8..16].copy_from_slice(&off.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    pub(crate) fn tiny_bzimage(payload: usize) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        f[BZ_SETUP_SECTS] = setup_sects;
        f[BZ_BOOT_FLAG..BZ_BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[BZ_HEADER..BZ_HEADER + 4].copy_from_slice(&BZ_HDRS_MAGIC.to_le_bytes());
        f[BZ_VERSION..BZ_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        f[BZ_LOADFLAGS] = BZ_LOADED_HIGH;
        f[BZ_XLOADFLAGS..BZ_XLOADFLAGS + 2].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[BZ_PREF_ADDRESS..BZ_PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[BZ_INIT_SIZE..BZ_INIT_SIZE + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        f
    }

    #[test]
    fn recognises_elf_and_its_extent() {
        let elf = tiny_elf(0x100_0000, &[0xf4; 16], 0x2000);
        let info = inspect_kernel(&elf).unwrap();
        assert_eq!(info.format, KernelFormat::Elf);
        assert_eq!(info.load_start, 0x100_0000);
        assert_eq!(info.load_end, 0x100_2000);
    }

    #[test]
    fn recognises_bzimage_and_its_extent() {
        let bz = tiny_bzimage(4096);
        let info = inspect_kernel(&bz).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        // Decompression room (pref_address + init_size) dominates.
        assert_eq!(info.load_end, 0x120_0000);
    }

    #[test]
    fn refuses_junk_with_a_reason() {
        assert!(matches!(inspect_kernel(&[]), Err(KernelError::Empty)));
        let err = inspect_kernel(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(err.to_string().contains("neither an ELF"), "{err}");
        assert!(err.to_string().contains("2321"), "{err}");

        let mut elf32 = tiny_elf(0x100_0000, &[0; 4], 4);
        elf32[4] = 1;
        assert!(matches!(
            inspect_kernel(&elf32),
            Err(KernelError::BadElf(_))
        ));

        let mut arm = tiny_elf(0x100_0000, &[0; 4], 4);
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        let err = inspect_kernel(&arm).unwrap_err();
        assert!(err.to_string().contains("machine 183"), "{err}");

        let mut bz32 = tiny_bzimage(16);
        bz32[BZ_XLOADFLAGS] = 0;
        assert!(matches!(
            inspect_kernel(&bz32),
            Err(KernelError::BadBzImage(_))
        ));
    }

    #[test]
    fn truncated_and_hostile_elves_do_not_panic() {
        let elf = tiny_elf(0x100_0000, &[0x90; 64], 64);
        for cut in 0..elf.len() {
            let _ = inspect_kernel(&elf[..cut]);
        }
        let mut huge_phnum = elf.clone();
        huge_phnum[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(inspect_kernel(&huge_phnum).is_err());
        let mut wrap = elf.clone();
        wrap[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(inspect_kernel(&wrap).is_err());
        let mut far = elf;
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(inspect_kernel(&far).is_err());
    }

    #[test]
    fn loads_elf_and_bzimage_into_memory() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let code = [0x90, 0x90, 0xf4];
        let elf = tiny_elf(0x100_0000, &code, 0x1000);
        let k = load_kernel(&mem, &elf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        let mut back = [0u8; 3];
        mem.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(back, code);

        let mut bz = tiny_bzimage(512);
        let payload_at = bz.len() - 512;
        bz[payload_at] = 0xab;
        let k = load_kernel(&mem, &bz, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let header = { k.setup_header.unwrap().header };
        assert_eq!(header, BZ_HDRS_MAGIC);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xab);
    }

    #[test]
    fn a_header_prefix_says_what_the_whole_image_says() {
        let mut elf = tiny_elf(0x100_0000, &[0x90; 16], 0x1000);
        elf.resize(200_000, 0xcc);
        let len = elf.len() as u64;
        let whole = inspect_kernel(&elf).unwrap();
        let head = inspect_kernel_header(&elf[..KERNEL_HEADER_PREFIX], len).unwrap();
        assert_eq!(
            (whole.format, whole.load_start, whole.load_end),
            (head.format, head.load_start, head.load_end)
        );
        let bz = tiny_bzimage(100_000);
        let whole = inspect_kernel(&bz).unwrap();
        let head = inspect_kernel_header(&bz[..4096], bz.len() as u64).unwrap();
        assert_eq!(whole.load_end, head.load_end);
        // A segment that ends past the file is refused from the prefix too.
        assert!(inspect_kernel_header(&elf[..KERNEL_HEADER_PREFIX], 100).is_err());
        // Program headers beyond the prefix are refused, naming why.
        let err = inspect_kernel_header(&elf[..40], len).unwrap_err();
        assert!(matches!(err, KernelError::BadElf(_)), "{err}");
        assert!(matches!(
            inspect_kernel_header(&[], 10),
            Err(KernelError::Empty)
        ));
        assert!(matches!(
            inspect_kernel_header(&elf[..64], MAX_KERNEL_SIZE + 1),
            Err(KernelError::TooLarge { .. })
        ));
    }

    #[test]
    fn loads_straight_from_a_file() {
        use std::io::Write;
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let code = [0x0f, 0x0b, 0xf4];
        let elf = tiny_elf(0x100_0000, &code, 0x1000);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&elf).unwrap();
        let info = inspect_kernel(&elf).unwrap();
        let k = load_kernel_from(&mem, &mut file, &info, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        let mut back = [0u8; 3];
        mem.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(back, code);

        let mut initrd = tempfile::tempfile().unwrap();
        initrd.write_all(b"070701").unwrap();
        std::io::Seek::rewind(&mut initrd).unwrap();
        let at = load_initrd_from(&mem, &mut initrd, 6, 0x110_0000, 32 << 20).unwrap();
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(&back, b"070701");
        // A file shorter than its stated size is an error, not a short initramfs.
        std::io::Seek::rewind(&mut initrd).unwrap();
        assert!(load_initrd_from(&mem, &mut initrd, 4096, 0x110_0000, 32 << 20).is_err());
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        assert_eq!(
            place_initrd(5000, 0x200_0000, 0x800_0000).unwrap(),
            0x7ffe000
        );
        assert!(place_initrd(0x700_0000, 0x200_0000, 0x800_0000).is_err());
        assert!(place_initrd(u64::MAX, 0, 0x800_0000).is_err());

        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let at = load_initrd(&mem, b"070701", 0x1000, 1 << 20).unwrap();
        assert_eq!(at, GuestAddress((1 << 20) - 4096));
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(&back, b"070701");
    }
}
