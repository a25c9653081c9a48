//! Everything between "bytes on disk" and "bytes in guest memory" that must be
//! trusted: the execution plan and its DSSE envelope, artifact measurement, the
//! dm-verity tree, and loading the kernel and initramfs into guest memory.
//!
//! [`kernel`] (x86_64 boot: `linux-loader`'s bzImage and ELF loaders exist only there) is
//! built for x86_64 hosts; the rest builds on any Unix, macOS among them.

pub mod bytes;
pub mod dsse;
#[cfg(target_os = "linux")]
pub mod file_identity;
#[cfg(target_arch = "x86_64")]
pub mod kernel;
pub mod limits;
pub mod measure;
pub mod plan;
pub mod replay;
pub mod snapshot_memory;
pub mod verity;
