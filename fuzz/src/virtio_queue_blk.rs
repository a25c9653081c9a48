//! `virtio_queue_blk`: a virtio-blk request queue in guest memory that the input fills
//! byte for byte (descriptor table, available ring, headers, data), served by the real
//! [`BlockWorker`] against an in-memory disk.
//!
//! Input: one config byte (bits 0-3: queue size 2^n, n <= 8; bit 4: EVENT_IDX; bit 5:
//! read-only), one byte of disk size in sectors (+1), then guest memory from address 0.
//! Guest memory is two regions with a hole between them, so addresses in the hole and
//! past the end are reachable.
//!
//! Invariants: the worker returns (no hang, even for descriptor loops); the disk never
//! changes size and a read-only disk never changes at all; no more requests complete
//! than the guest made available, and the used ring's index counts exactly the
//! completed requests.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::AtomicU64;

use mvm_devices::virtio::block::{Block, BlockMetrics, BlockWorker};
use mvm_devices::virtio::{Activation, GuestMemoryMmap, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;
use crate::memfd;

/// Low RAM region: [0, LOW_END).
pub const LOW_END: u64 = 0x8000;
/// High RAM region start (the hole is [LOW_END, HIGH_START)).
pub const HIGH_START: u64 = 0x1_0000;
/// High RAM region size.
pub const HIGH_SIZE: u64 = 0x4000;
/// Descriptor table address.
pub const DESC_TABLE: u64 = 0x0000;
/// Available ring address.
pub const AVAIL_RING: u64 = 0x1000;
/// Used ring address.
pub const USED_RING: u64 = 0x2000;

/// Guest memory with the layout above.
#[must_use]
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), HIGH_SIZE as usize),
    ])
    .expect("guest memory")
}

/// Fills guest memory from `bytes`: the low region first, then the high one.
pub fn fill_memory(mem: &GuestMemoryMmap, bytes: &[u8]) {
    let (low, high) = bytes.split_at(bytes.len().min(LOW_END as usize));
    mem.write_slice(low, GuestAddress(0)).expect("low region");
    let high = &high[..high.len().min(HIGH_SIZE as usize)];
    mem.write_slice(high, GuestAddress(HIGH_START))
        .expect("high region");
}

/// The disk's initial contents: every byte says where it is.
#[must_use]
pub fn disk_image(sectors: u64) -> Vec<u8> {
    (0..sectors * 512).map(|i| (i % 253) as u8).collect()
}

fn completed(m: &BlockMetrics) -> u64 {
    let get = |c: &AtomicU64| BlockMetrics::get(c);
    get(&m.reads)
        + get(&m.writes)
        + get(&m.flushes)
        + get(&m.get_ids)
        + get(&m.refused)
        + get(&m.io_errors)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = input.u8();
    let queue_size = 1u16 << (config & 0x0f).min(8);
    let event_idx = config & 0x10 != 0;
    let read_only = config & 0x20 != 0;
    let sectors = u64::from(input.u8()) + 1;

    let mem = guest_memory();
    fill_memory(&mem, input.rest());
    let image = disk_image(sectors);
    let disk = memfd(&image);
    let check_disk = disk.try_clone().expect("dup disk fd");
    let (front, mut worker): (Block, BlockWorker) =
        Block::with_file(disk, sectors, read_only, "fuzz-disk".to_owned());

    let mut queue = Queue::new(256).expect("queue");
    queue.try_set_size(queue_size).expect("power of two size");
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    // The transport only activates queues that pass this; so does the harness.
    assert!(
        queue.is_valid(&mem),
        "harness queue layout is inside memory"
    );

    let avail_idx: u16 = mem
        .read_obj(GuestAddress(AVAIL_RING + 2))
        .expect("avail idx");
    let used_idx_before: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).expect("used idx");

    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let metrics = worker.metrics();
    worker.attach(
        Activation {
            mem: mem.clone(),
            queues: vec![queue],
            acked_features: front.avail_features(),
        },
        &irq,
    );
    worker.process_requests(&irq);

    let done = completed(&metrics);
    assert!(
        done <= u64::from(avail_idx),
        "{done} requests completed, the guest made {avail_idx} available"
    );
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).expect("used idx");
    if done > 0 {
        assert_eq!(
            u64::from(used_idx),
            done % 65536,
            "used idx does not count completions"
        );
    } else {
        assert_eq!(
            used_idx, used_idx_before,
            "used idx moved without a completion"
        );
    }

    let mut after = Vec::new();
    let mut f = check_disk;
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut after).expect("read disk");
    assert_eq!(after.len(), image.len(), "the disk changed size");
    if read_only {
        assert!(after == image, "a read-only disk was written");
    }
}
