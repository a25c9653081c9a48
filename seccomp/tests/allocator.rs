//! A device thread under its filter must be able to free large buffers.
//!
//! glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time it shrinks a
//! thread arena's heap, and no role allows `openat`: a vsock thread dropping a connection's
//! 256 KiB buffer (a guest flooding past its credit, found by `scripts/e2e hostile`) killed
//! the VMM with SIGSYS. Its own test binary, because a failure kills the whole process.

use std::collections::VecDeque;

use mvm_seccomp::{install, roles, sigsys, Mode, Role};

/// A device thread with nothing of its own: what every device's role starts from.
const DEVICE: Role = Role::new("device", || roles::device_thread([]));

#[test]
fn a_device_thread_frees_large_buffers_under_its_filter() {
    mvm_seccomp::keep_allocator_inside_filters();
    sigsys::install_handler().unwrap();
    std::thread::spawn(|| {
        install(&DEVICE, "test-device", Mode::Enforce).unwrap();
        let mut total = 0usize;
        for round in 1..=8u8 {
            // A large block (mmap; glibc then raises its thresholds to its size), then
            // many medium blocks from the thread's arena heap, all freed: the arena's top
            // grows past the trim threshold, which is where glibc shrinks the heap.
            let big = vec![1u8; 2 << 20];
            total += big.len();
            drop(big);
            let parts: Vec<VecDeque<u8>> = (0..32)
                .map(|_| std::iter::repeat_n(round, 256 * 1024).collect())
                .collect();
            total += parts.iter().map(VecDeque::len).sum::<usize>();
            drop(parts);
        }
        assert!(total > 0);
    })
    .join()
    .unwrap();
}
