//! A kernel or initramfs between the command line and guest memory: an open file, read
//! straight into guest memory when the VM is built, as Firecracker does (no buffer the
//! size of the kernel, no second copy: under the QEMU-TCG test host, reading the 15 MiB
//! vmlinux into a buffer and copying it took longer than the rest of the VMM's start).
//!
//! The file is opened before the jail, which would no longer reach its path. Only its
//! first [`KERNEL_HEADER_PREFIX`] bytes are read up front, to check the headers against
//! the memory size. With a signed plan the image is loaded hashed
//! ([`Image::load_kernel_hashed`]): one pass over the file, every byte hashed as it goes
//! into guest memory, so the digest verified boot compares with the plan is the digest of
//! what is in guest memory, and a file changed after the header check gets a digest that
//! differs. With `--dev` nothing is measured and the file is read by `linux-loader`.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::Path;

use mvm_loader::kernel::hashed::{load_initrd_hashed, load_kernel_hashed};
use mvm_loader::kernel::{self, KernelError, KernelInfo, LoadedKernel, KERNEL_HEADER_PREFIX};
use mvm_loader::measure::Sha256Digest;
use sha2::{Digest, Sha256};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// An image as the VMM holds it until it is in guest memory: its open file.
#[derive(Debug)]
pub struct Image {
    /// The open file.
    file: File,
    /// Its size when it was opened; the bytes loaded (and hashed) are these.
    len: u64,
}

impl Image {
    /// Opens `path`, which must be a regular file. Returns the image and its size.
    pub fn open(path: &Path) -> std::io::Result<(Self, u64)> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let len = meta.len();
        Ok((Self { file, len }, len))
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the kernel's headers say, from the file's first [`KERNEL_HEADER_PREFIX`]
    /// bytes and its size.
    pub fn inspect_kernel(&self) -> Result<KernelInfo, KernelError> {
        let want = usize::try_from(self.len)
            .unwrap_or(usize::MAX)
            .min(KERNEL_HEADER_PREFIX);
        let mut head = vec![0u8; want];
        self.file
            .read_exact_at(&mut head, 0)
            .map_err(KernelError::Read)?;
        kernel::inspect_kernel_header(&head, self.len)
    }

    /// The sha256 of the file's first [`Image::len`] bytes (for a refusal's message).
    pub fn sha256(&mut self) -> std::io::Result<Sha256Digest> {
        self.file.rewind()?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut (&self.file).take(self.len), &mut hasher)?;
        Ok(Sha256Digest(hasher.finalize().into()))
    }

    /// Loads this kernel, which `info` describes, into `memory` (nothing measured).
    pub fn load_kernel(
        &mut self,
        memory: &GuestMemoryMmap,
        info: &KernelInfo,
        highmem_start: GuestAddress,
    ) -> Result<LoadedKernel, KernelError> {
        self.file.rewind().map_err(KernelError::Read)?;
        kernel::load_kernel_from(memory, &mut self.file, info, highmem_start)
    }

    /// Loads this kernel into `memory` in one pass over the file, hashing it; returns
    /// the loaded kernel and the file's sha256.
    pub fn load_kernel_hashed(
        &mut self,
        memory: &GuestMemoryMmap,
        highmem_start: GuestAddress,
    ) -> Result<(LoadedKernel, Sha256Digest), KernelError> {
        self.file.rewind().map_err(KernelError::Read)?;
        load_kernel_hashed(
            memory,
            &mut (&self.file).take(self.len),
            self.len,
            highmem_start,
        )
    }

    /// Loads this initramfs into `memory` above `kernel_end`, below `ceiling` (nothing
    /// measured); returns its guest address.
    pub fn load_initrd(
        &mut self,
        memory: &GuestMemoryMmap,
        kernel_end: u64,
        ceiling: u64,
    ) -> Result<GuestAddress, KernelError> {
        self.file.rewind().map_err(KernelError::Read)?;
        kernel::load_initrd_from(memory, &mut self.file, self.len, kernel_end, ceiling)
    }

    /// [`Image::load_initrd`], hashing the file in the same pass; returns the guest
    /// address and the file's sha256.
    pub fn load_initrd_hashed(
        &mut self,
        memory: &GuestMemoryMmap,
        kernel_end: u64,
        ceiling: u64,
    ) -> Result<(GuestAddress, Sha256Digest), KernelError> {
        self.file.rewind().map_err(KernelError::Read)?;
        load_initrd_hashed(
            memory,
            &mut (&self.file).take(self.len),
            self.len,
            kernel_end,
            ceiling,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_image_is_a_regular_file_and_its_digest() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"070701 an initramfs").unwrap();
        let (mut image, len) = Image::open(f.path()).unwrap();
        assert_eq!((len, image.len()), (19, 19));
        assert_eq!(
            image.sha256().unwrap(),
            Sha256Digest::of(b"070701 an initramfs")
        );
        assert!(Image::open(Path::new("/")).is_err());
    }
}
