//! Everything between "bytes on disk" and "bytes in guest memory" that must be
//! trusted: the execution plan and its DSSE envelope, artifact measurement, the
//! dm-verity tree, and loading the kernel and initramfs into guest memory.

pub mod bytes;
pub mod dsse;
pub mod kernel;
pub mod limits;
pub mod measure;
pub mod plan;
pub mod replay;
pub mod verity;
