//! virtio devices and the virtio-mmio transport they sit behind.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;
