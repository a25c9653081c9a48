//! Loading an ELF vmlinux or a bzImage, and an initramfs, into guest memory.
