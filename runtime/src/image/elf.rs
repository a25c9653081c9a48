//! Just enough ELF reading to check the two binaries an image is built from:
//! the kernel must be an ELF vmlinux, and `/init` must be static (a dynamic
//! PID 1 finds no loader in the initramfs and the guest panics at boot).

/// `\x7fELF`.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// `EI_CLASS` value for 64-bit objects (`<elf.h>`).
const ELFCLASS64: u8 = 2;
/// `EI_DATA` value for little-endian objects.
const ELFDATA2LSB: u8 = 1;
/// Program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;
/// Offsets into the ELF64 header.
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
/// An ELF64 program header is 56 bytes.
const PHDR64_LEN: usize = 56;

/// Why a binary was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF64 little-endian file.
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    /// The program headers lie outside the file.
    #[error("ELF program headers out of bounds")]
    BadProgramHeaders,
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(raw.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(raw.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(raw.try_into().ok()?))
}

/// Checks that `bytes` is an ELF64 little-endian file.
pub fn check_elf64(bytes: &[u8]) -> Result<(), ElfError> {
    let ok = bytes.get(..4) == Some(ELF_MAGIC.as_slice())
        && bytes.get(4) == Some(&ELFCLASS64)
        && bytes.get(5) == Some(&ELFDATA2LSB);
    if ok {
        Ok(())
    } else {
        Err(ElfError::NotElf64)
    }
}

/// Whether an ELF64 file asks for a dynamic loader (has `PT_INTERP`).
pub fn needs_interpreter(bytes: &[u8]) -> Result<bool, ElfError> {
    check_elf64(bytes)?;
    let phoff = read_u64(bytes, E_PHOFF).ok_or(ElfError::BadProgramHeaders)?;
    let phoff = usize::try_from(phoff).map_err(|_| ElfError::BadProgramHeaders)?;
    let entsize = usize::from(read_u16(bytes, E_PHENTSIZE).ok_or(ElfError::BadProgramHeaders)?);
    let count = usize::from(read_u16(bytes, E_PHNUM).ok_or(ElfError::BadProgramHeaders)?);
    if count > 0 && entsize < PHDR64_LEN {
        return Err(ElfError::BadProgramHeaders);
    }
    for i in 0..count {
        let at = i
            .checked_mul(entsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfError::BadProgramHeaders)?;
        let p_type = read_u32(bytes, at).ok_or(ElfError::BadProgramHeaders)?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_host_binary_needs_an_interpreter() {
        let ls = std::fs::read("/bin/ls").unwrap();
        assert_eq!(needs_interpreter(&ls), Ok(true));
    }

    #[test]
    fn busybox_static_does_not() {
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            assert_eq!(needs_interpreter(&bb), Ok(false));
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert_eq!(needs_interpreter(b"#!/bin/sh"), Err(ElfError::NotElf64));
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[E_PHOFF..E_PHOFF + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        h[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&56u16.to_le_bytes());
        h[E_PHNUM..E_PHNUM + 2].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(needs_interpreter(&h), Err(ElfError::BadProgramHeaders));
    }
}
