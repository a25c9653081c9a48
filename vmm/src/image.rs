//! A kernel or initramfs between the command line and guest memory.
//!
//! With a signed plan the VMM reads each image whole ([`Image::Bytes`]): those bytes are
//! measured against the plan and then copied into guest memory, so what is measured is
//! what is booted. With `--dev` nothing is measured, and the image stays an open file
//! ([`Image::File`]) read straight into guest memory when the VM is built, as Firecracker
//! does: no buffer the size of the kernel, no second copy (under the QEMU-TCG test host,
//! reading the 15 MiB vmlinux into a buffer alone took 0.2-0.35 s). The file is opened
//! before the jail, which would no longer reach its path. Only its first
//! [`KERNEL_HEADER_PREFIX`] bytes are read up front, to check the headers; a file changed
//! between that check and the load is the `--dev` user's own file, and the loader still
//! writes only inside guest memory.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::Path;

use mvm_loader::kernel::{self, KernelError, KernelInfo, LoadedKernel, KERNEL_HEADER_PREFIX};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// An image as the VMM holds it until it is in guest memory.
#[derive(Debug)]
pub enum Image {
    /// Read whole (to be measured, or already measured).
    Bytes(Vec<u8>),
    /// Open, to be read straight into guest memory.
    File {
        /// The open file.
        file: File,
        /// Its size when it was opened.
        len: u64,
    },
}

/// Opens `path`, which must be a regular file; returns it and its size.
fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta.len()))
}

impl Default for Image {
    /// No bytes: what is left once an image has been taken or loaded.
    fn default() -> Self {
        Self::Bytes(Vec::new())
    }
}

impl Image {
    /// Reads `path` whole, if it holds at most `max` bytes (none are read otherwise).
    /// Returns the image and the file's size.
    pub fn read(path: &Path, max: u64) -> std::io::Result<(Self, u64)> {
        let (file, size) = open_regular(path)?;
        let mut bytes = Vec::new();
        if size <= max {
            // One allocation of the stated size (bounded by `max`) instead of doubling;
            // a file that grows meanwhile is still cut at `max + 1`.
            bytes.reserve_exact(usize::try_from(size).unwrap_or(0));
            file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
        }
        Ok((Self::Bytes(bytes), size))
    }

    /// Opens `path` for loading straight into guest memory. Returns the image and the
    /// file's size.
    pub fn open(path: &Path) -> std::io::Result<(Self, u64)> {
        let (file, len) = open_regular(path)?;
        Ok((Self::File { file, len }, len))
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => u64::try_from(b.len()).unwrap_or(u64::MAX),
            Self::File { len, .. } => *len,
        }
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the kernel's headers say: from all the bytes, or from the file's first
    /// [`KERNEL_HEADER_PREFIX`] bytes and its size.
    pub fn inspect_kernel(&self) -> Result<KernelInfo, KernelError> {
        match self {
            Self::Bytes(b) => kernel::inspect_kernel(b),
            Self::File { file, len } => {
                let want = usize::try_from(*len)
                    .unwrap_or(usize::MAX)
                    .min(KERNEL_HEADER_PREFIX);
                let mut head = vec![0u8; want];
                file.read_exact_at(&mut head, 0)
                    .map_err(KernelError::Read)?;
                kernel::inspect_kernel_header(&head, *len)
            }
        }
    }

    /// All the bytes: as held, or read from the file now (for measuring).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Bytes(b) => Ok(b),
            Self::File { mut file, len } => {
                let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                file.rewind()?;
                file.take(len).read_to_end(&mut bytes)?;
                Ok(bytes)
            }
        }
    }

    /// Loads this kernel, which `info` describes, into `memory`.
    pub fn load_kernel(
        &mut self,
        memory: &GuestMemoryMmap,
        info: &KernelInfo,
        highmem_start: GuestAddress,
    ) -> Result<LoadedKernel, KernelError> {
        match self {
            Self::Bytes(b) => kernel::load_kernel(memory, b, highmem_start),
            Self::File { file, .. } => {
                file.rewind().map_err(KernelError::Read)?;
                kernel::load_kernel_from(memory, file, info, highmem_start)
            }
        }
    }

    /// Loads this initramfs into `memory` above `kernel_end`, below `ceiling`; returns
    /// its guest address.
    pub fn load_initrd(
        &mut self,
        memory: &GuestMemoryMmap,
        kernel_end: u64,
        ceiling: u64,
    ) -> Result<GuestAddress, KernelError> {
        match self {
            Self::Bytes(b) => kernel::load_initrd(memory, b, kernel_end, ceiling),
            Self::File { file, len } => {
                file.rewind().map_err(KernelError::Read)?;
                kernel::load_initrd_from(memory, file, *len, kernel_end, ceiling)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_and_its_bytes_are_the_same_image() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"070701 an initramfs").unwrap();
        let (read, size) = Image::read(f.path(), 1 << 20).unwrap();
        let (open, len) = Image::open(f.path()).unwrap();
        assert_eq!((size, len, read.len(), open.len()), (19, 19, 19, 19));
        assert_eq!(open.into_bytes().unwrap(), read.into_bytes().unwrap());
        // Over the limit: the size, no bytes.
        let (over, size) = Image::read(f.path(), 4).unwrap();
        assert_eq!((size, over.len()), (19, 0));
        assert!(Image::open(Path::new("/")).is_err());
    }
}
