//! Loading a kernel or an initramfs that a plan pins, hashed as it is loaded: the file is
//! read once, front to back, through a small buffer; every byte is hashed, and the bytes
//! that belong in guest memory are written there from the same buffer. The digest is of
//! exactly the bytes in guest memory (and the rest of the file, in order), so checking
//! it against the plan before the first guest instruction checks what boots, with no
//! copy of the image held and no second read of the file.
//!
//! The headers are parsed again from the first bytes of this pass, not taken from an
//! earlier look at the file: a file changed in between is loaded as it now is, and its
//! digest then differs from the plan's. Segments are placed as `linux-loader` places them
//! (ELF: each `PT_LOAD` at its physical address, entry `e_entry`; bzImage: the payload
//! after the setup sectors at [`BZIMAGE_LOAD_ADDRESS`], entry 0x200 past it, the setup
//! header as read with `code32_start` set to that address): the tests load the same
//! images both ways and compare guest memory.

use std::io::Read;

use linux_loader::loader::bootparam::setup_header;
use sha2::{Digest, Sha256};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    elf_layout, inspect_kernel_header, place_initrd, KernelError, KernelFormat, LoadedKernel,
    BZIMAGE_ENTRY_64_OFFSET, BZIMAGE_LOAD_ADDRESS, BZ_SETUP_SECTS, KERNEL_HEADER_PREFIX,
};
use crate::measure::Sha256Digest;

/// Bytes read from the file at a time: the staging buffer every byte passes through on
/// its way to the hash and to guest memory. Small, so that it is a few pages faulted in
/// once and stays in cache; a 1 MiB buffer was 256 fresh pages per file, each zeroed by
/// the host kernel before the VMM wrote over it (docs/boot-time.md, "The staging buffer").
const CHUNK: usize = 64 << 10;

/// File bytes `[offset, offset + len)` go to guest-physical `addr`.
#[derive(Debug, Clone, Copy)]
struct Placement {
    offset: u64,
    len: u64,
    addr: u64,
}

/// Writes the part of `bytes` (file bytes from `at` on) that each placement covers.
fn place<M: GuestMemoryBackend>(
    mem: &M,
    placements: &[Placement],
    at: u64,
    bytes: &[u8],
    format: KernelFormat,
) -> Result<(), KernelError> {
    let end = at.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    for p in placements {
        let from = p.offset.max(at);
        let to = p.offset.saturating_add(p.len).min(end);
        if from >= to {
            continue;
        }
        let (lo, hi) = (
            usize::try_from(from - at).unwrap_or(usize::MAX),
            usize::try_from(to - at).unwrap_or(usize::MAX),
        );
        let part = bytes.get(lo..hi).unwrap_or_default();
        let addr = p.addr.saturating_add(from - p.offset);
        mem.write_slice(part, GuestAddress(addr)).map_err(|e| {
            KernelError::BadElf(format!(
                "{format}: {} bytes at guest address {addr:#x} do not fit in guest memory: {e}",
                part.len()
            ))
        })?;
    }
    Ok(())
}

/// Reads `len` bytes of `source` (the file from `at` on) in chunks: hashes each, and
/// places it.
fn stream<M: GuestMemoryBackend, R: Read>(
    mem: &M,
    source: &mut R,
    hasher: &mut Sha256,
    placements: &[Placement],
    mut at: u64,
    file_len: u64,
    format: KernelFormat,
) -> Result<(), KernelError> {
    let mut buf = vec![0u8; CHUNK];
    while at < file_len {
        let want = usize::try_from(file_len - at).unwrap_or(CHUNK).min(CHUNK);
        let chunk = buf.get_mut(..want).unwrap_or_default();
        source.read_exact(chunk).map_err(KernelError::Read)?;
        hasher.update(&*chunk);
        place(mem, placements, at, chunk, format)?;
        at = at.saturating_add(u64::try_from(want).unwrap_or(u64::MAX));
    }
    Ok(())
}

/// Loads the kernel in `source` (a file of `file_len` bytes, read from its start) into
/// `mem`, hashing all of it in the same pass. `highmem_start` is the lowest address the
/// kernel may be entered at. Returns the loaded kernel and the sha256 of the file.
pub fn load_kernel_hashed<M, R>(
    mem: &M,
    source: &mut R,
    file_len: u64,
    highmem_start: GuestAddress,
) -> Result<(LoadedKernel, Sha256Digest), KernelError>
where
    M: GuestMemoryBackend,
    R: Read,
{
    let head_len = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .min(KERNEL_HEADER_PREFIX);
    let mut head = vec![0u8; head_len];
    source.read_exact(&mut head).map_err(KernelError::Read)?;
    let mut hasher = Sha256::new();
    hasher.update(&head);
    let info = inspect_kernel_header(&head, file_len)?;
    let (placements, loaded) = match info.format {
        KernelFormat::Elf => {
            let layout = elf_layout(&head, file_len)?;
            if layout.entry < highmem_start.0 {
                return Err(KernelError::BadElf(format!(
                    "entry point {:#x} is below {:#x}",
                    layout.entry, highmem_start.0
                )));
            }
            let placements: Vec<Placement> = layout
                .segments
                .iter()
                .filter(|s| s.filesz > 0)
                .map(|s| Placement {
                    offset: s.offset,
                    len: s.filesz,
                    addr: s.paddr,
                })
                .collect();
            let loaded = LoadedKernel {
                format: info.format,
                entry: GuestAddress(layout.entry),
                end: info.load_end,
                setup_header: None,
            };
            (placements, loaded)
        }
        KernelFormat::BzImage => {
            let size = std::mem::size_of::<setup_header>();
            let bytes = head
                .get(BZ_SETUP_SECTS..BZ_SETUP_SECTS.saturating_add(size))
                .ok_or_else(|| KernelError::BadBzImage("truncated setup header".into()))?;
            let mut header = setup_header::default();
            header.as_mut_slice().copy_from_slice(bytes);
            if u64::from(header.code32_start) < highmem_start.0 {
                return Err(KernelError::BadBzImage(format!(
                    "code32_start {:#x} is below {:#x}",
                    { header.code32_start },
                    highmem_start.0
                )));
            }
            let setup_sects = match header.setup_sects {
                0 => 4,
                n => u64::from(n),
            };
            let setup_len = (setup_sects + 1) * 512;
            header.code32_start = u32::try_from(BZIMAGE_LOAD_ADDRESS)
                .map_err(|_| KernelError::BadBzImage("load address above 4 GiB".into()))?;
            let entry = BZIMAGE_LOAD_ADDRESS
                .checked_add(BZIMAGE_ENTRY_64_OFFSET)
                .ok_or_else(|| KernelError::BadBzImage("entry point overflows".into()))?;
            let placements = vec![Placement {
                offset: setup_len,
                len: file_len.saturating_sub(setup_len),
                addr: BZIMAGE_LOAD_ADDRESS,
            }];
            let loaded = LoadedKernel {
                format: info.format,
                entry: GuestAddress(entry),
                end: info.load_end,
                setup_header: Some(header),
            };
            (placements, loaded)
        }
    };
    place(mem, &placements, 0, &head, info.format)?;
    let head_len = u64::try_from(head_len).unwrap_or(u64::MAX);
    stream(
        mem,
        source,
        &mut hasher,
        &placements,
        head_len,
        file_len,
        info.format,
    )?;
    Ok((loaded, Sha256Digest(hasher.finalize().into())))
}

/// Places an initramfs of `size` bytes with [`place_initrd`] and reads it from `source`
/// into `mem`, hashing it in the same pass. Returns its guest address and its sha256.
pub fn load_initrd_hashed<M, R>(
    mem: &M,
    source: &mut R,
    size: u64,
    kernel_end: u64,
    ceiling: u64,
) -> Result<(GuestAddress, Sha256Digest), KernelError>
where
    M: GuestMemoryBackend,
    R: Read,
{
    let addr = place_initrd(size, kernel_end, ceiling)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < size {
        let want = usize::try_from(size - at).unwrap_or(CHUNK).min(CHUNK);
        let chunk = buf.get_mut(..want).unwrap_or_default();
        source.read_exact(chunk).map_err(KernelError::Read)?;
        hasher.update(&*chunk);
        let dest = addr.saturating_add(at);
        mem.write_slice(chunk, GuestAddress(dest))
            .map_err(|source| KernelError::InitrdWrite { addr: dest, source })?;
        at = at.saturating_add(u64::try_from(want).unwrap_or(u64::MAX));
    }
    Ok((GuestAddress(addr), Sha256Digest(hasher.finalize().into())))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{tiny_bzimage, tiny_elf};
    use super::super::{load_initrd, load_kernel};
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: usize = 64 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut all = vec![0u8; MEM];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        all
    }

    /// Loads `image` with `linux-loader` (from the bytes) and hashed (from a reader), and
    /// compares entry, end, setup header and every byte of guest memory.
    fn same_both_ways(image: &[u8]) {
        let highmem = GuestAddress(0x10_0000);
        let (a, b) = (memory(), memory());
        let plain = load_kernel(&a, image, highmem).unwrap();
        let len = image.len() as u64;
        let (hashed, digest) = load_kernel_hashed(&b, &mut &image[..], len, highmem).unwrap();
        assert_eq!(digest, Sha256Digest::of(image));
        assert_eq!(plain.entry, hashed.entry);
        assert_eq!(plain.end, hashed.end);
        assert_eq!(
            plain.setup_header.map(|h| h.as_slice().to_vec()),
            hashed.setup_header.map(|h| h.as_slice().to_vec())
        );
        assert!(snapshot(&a) == snapshot(&b), "guest memory differs");
    }

    #[test]
    fn an_elf_loads_as_linux_loader_loads_it() {
        let code: Vec<u8> = (0..=255u8).cycle().take(3 * CHUNK + 123).collect();
        same_both_ways(&tiny_elf(0x100_0000, &code, code.len() as u64 + 4096));
    }

    /// An ELF of several loadable segments `(paddr, file bytes, memsz)`, each at the next
    /// file offset congruent to its address modulo 4 KiB (as `scripts/build-kernel`'s
    /// `compact-vmlinux.py` lays out the kernel); the entry is the first segment's address.
    fn elf_of(segments: &[(u64, Vec<u8>, u64)]) -> Vec<u8> {
        let mut f = tiny_elf(segments[0].0, &[], 0);
        f.truncate(64);
        f[56..58].copy_from_slice(&u16::try_from(segments.len()).unwrap().to_le_bytes());
        let mut cursor = 64 + 56 * segments.len() as u64;
        let mut body = Vec::new();
        for (paddr, bytes, memsz) in segments {
            let len = bytes.len() as u64;
            let offset = if bytes.is_empty() {
                0
            } else {
                cursor.div_ceil(4096) * 4096 + paddr % 4096
            };
            let mut ph = [0u8; 56];
            ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            ph[4..8].copy_from_slice(&7u32.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&paddr.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&len.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
            f.extend_from_slice(&ph);
            if !bytes.is_empty() {
                body.push((usize::try_from(offset).unwrap(), bytes));
                cursor = offset + len;
            }
        }
        f.resize(usize::try_from(cursor).unwrap(), 0);
        for (offset, bytes) in body {
            f[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        f
    }

    #[test]
    fn a_kernel_cut_at_its_filler_pages_loads_as_linux_loader_loads_it() {
        let code = |seed: usize, len: usize| -> Vec<u8> {
            (1..=255u8).cycle().skip(seed).take(len).collect()
        };
        // Text with a hole of zero fill after it, a piece with no file bytes (a run of
        // filler at a segment's start), pieces ending mid-page, a bss-like tail; the
        // last piece reaches furthest, so the kernel's end is its memsz.
        let elf = elf_of(&[
            (0x100_0000, code(3, 3 * 4096), 5 * 4096),
            (0x100_5000, code(5, 2 * CHUNK + 17), 2 * CHUNK as u64 + 17),
            (0x130_0000, Vec::new(), 6 * 4096),
            (0x130_6000, code(7, 4096 + 100), 4 * 4096),
            (0x140_0000, code(11, 300), 0x12_9000),
        ]);
        same_both_ways(&elf);
        // The holes stay zero.
        let mem = memory();
        load_kernel_hashed(
            &mem,
            &mut &elf[..],
            elf.len() as u64,
            GuestAddress(0x10_0000),
        )
        .unwrap();
        let mut hole = vec![0xffu8; 2 * 4096];
        mem.read_slice(&mut hole, GuestAddress(0x100_3000)).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        mem.read_slice(&mut hole, GuestAddress(0x130_0000)).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_bzimage_loads_as_linux_loader_loads_it() {
        same_both_ways(&tiny_bzimage(CHUNK + 4321));
        same_both_ways(&tiny_bzimage(512));
    }

    #[test]
    fn an_initramfs_loads_where_the_plain_load_puts_it() {
        let initrd: Vec<u8> = (0..=250u8).cycle().take(CHUNK * 2 + 7).collect();
        let (a, b) = (memory(), memory());
        let ceiling = (MEM as u64) - 4096;
        let at = load_initrd(&a, &initrd, 0x200_0000, ceiling).unwrap();
        let (at2, digest) = load_initrd_hashed(
            &b,
            &mut &initrd[..],
            initrd.len() as u64,
            0x200_0000,
            ceiling,
        )
        .unwrap();
        assert_eq!((at, digest), (at2, Sha256Digest::of(&initrd)));
        assert!(snapshot(&a) == snapshot(&b));
    }

    #[test]
    fn a_short_file_or_a_segment_outside_memory_is_an_error() {
        let code = vec![0x90u8; 1000];
        let elf = tiny_elf(0x100_0000, &code, 4096);
        // Says it is longer than it is: the read comes up short.
        let e = load_kernel_hashed(
            &memory(),
            &mut &elf[..],
            elf.len() as u64 + 10,
            GuestAddress(0x10_0000),
        );
        assert!(
            matches!(e, Err(KernelError::Read(_)) | Err(KernelError::BadElf(_))),
            "{e:?}"
        );
        // A segment past the end of guest memory.
        let far = tiny_elf(MEM as u64 + 0x1000, &code, 4096);
        let e = load_kernel_hashed(
            &memory(),
            &mut &far[..],
            far.len() as u64,
            GuestAddress(0x10_0000),
        );
        assert!(e.is_err());
        // An entry below high memory.
        let low = tiny_elf(0x1000, &code, 4096);
        let e = load_kernel_hashed(
            &memory(),
            &mut &low[..],
            low.len() as u64,
            GuestAddress(0x10_0000),
        );
        assert!(e.is_err());
    }
}
