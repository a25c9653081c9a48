//! virtio-blk driven through virtio-queue's mock driver (MockSplitQueue) over mock guest
//! memory and a temporary file: valid requests, and every hostile case DESIGN.md lists
//! (bad queue sizes, addresses outside RAM, descriptor loops, lengths past the end of
//! memory, notify before DRIVER_OK).

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::AtomicU64;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::{Activation, GuestMemoryMmap, Interrupt, VirtioDevice};

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const DISK_SECTORS: u64 = 64;
#[test]
fn flag_constants_match_the_uapi() {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    assert_eq!(u32::from(W), VRING_DESC_F_WRITE);
    assert_eq!(u32::from(NEXT), VRING_DESC_F_NEXT);
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const R: u16 = 0;
/// `VRING_DESC_F_WRITE` and `VRING_DESC_F_NEXT` as the u16 flags they are.
const W: u16 = 2;
const NEXT: u16 = 1;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

struct Rig {
    // Leaked so the mock driver queue, which borrows it, can live beside it.
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    file: tempfile::NamedTempFile,
    front: Block,
    worker: BlockWorker,
    irq: Interrupt,
    irqfd: EventFd,
    posted: u16,
}

fn rig(read_only: bool) -> Rig {
    rig_with(read_only, None)
}

fn rig_with(read_only: bool, id: Option<&str>) -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ));
    let vq = MockSplitQueue::new(mem, QSIZE);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&pattern(
        usize::try_from(DISK_SECTORS * SECTOR_SIZE).unwrap(),
        7,
    ))
    .unwrap();
    let config = DiskConfig {
        path: file.path().to_owned(),
        read_only,
        id: id.map(str::to_owned),
    };
    let (front, worker) = Block::open(&config).unwrap();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Interrupt::new(irqfd.try_clone().unwrap());
    Rig {
        mem,
        vq,
        file,
        front,
        worker,
        irq,
        irqfd,
        posted: 0,
    }
}

impl Rig {
    fn activate(&mut self) {
        let mut queue: Queue = self.vq.create_queue().unwrap();
        queue.set_event_idx(false);
        let activation = Activation {
            mem: self.mem.clone(),
            queues: vec![queue],
            acked_features: self.front.avail_features(),
        };
        self.worker.attach(activation, &self.irq);
    }

    /// Writes `descs` at table index `first..` exactly as given and posts `first` as a head.
    fn post_raw(&mut self, first: u16, descs: &[SplitDescriptor]) {
        let vq = &self.vq;
        for (i, d) in descs.iter().enumerate() {
            let index = first + u16::try_from(i).unwrap();
            vq.desc_table()
                .store(index, RawDescriptor::from(*d))
                .unwrap();
        }
        let slot = usize::from(self.posted % QSIZE);
        vq.avail()
            .ring()
            .ref_at(slot)
            .unwrap()
            .store(u16::to_le(first));
        self.posted = self.posted.wrapping_add(1);
        vq.avail().idx().store(u16::to_le(self.posted));
    }

    /// Posts a well-linked chain of (addr, len, flags) at table index `first..`.
    fn post(&mut self, first: u16, parts: &[(u64, u32, u16)]) {
        let n = parts.len();
        let descs: Vec<SplitDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let index = first + u16::try_from(i).unwrap();
                if i + 1 < n {
                    SplitDescriptor::new(addr, len, flags | NEXT, index + 1)
                } else {
                    SplitDescriptor::new(addr, len, flags, 0)
                }
            })
            .collect();
        self.post_raw(first, &descs);
    }

    fn header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn run(&mut self) {
        self.worker.process_requests(&self.irq);
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// (used idx, id and len of used element `n`).
    fn used(&self, n: u16) -> (u16, u32, u32) {
        let vq = &self.vq;
        let idx = u16::from_le(vq.used().idx().load());
        let elem = vq.used().ring().ref_at(usize::from(n)).unwrap().load();
        (idx, elem.id(), elem.len())
    }

    fn disk(&self) -> Vec<u8> {
        let mut f = std::fs::File::open(self.file.path()).unwrap();
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn count(&self, counter: impl Fn(&BlockMetrics) -> &AtomicU64) -> u64 {
        BlockMetrics::get(counter(&self.worker.metrics()))
    }
}

fn original_disk() -> Vec<u8> {
    pattern(usize::try_from(DISK_SECTORS * SECTOR_SIZE).unwrap(), 7)
}

// ---- valid requests ----

#[test]
fn config_space_and_features() {
    let r = rig(true);
    let mut cap = [0u8; 8];
    r.front.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg = [0u8; 4];
    r.front.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    r.front.read_config(8, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SIZE_MAX);
    let f = r.front.avail_features();
    for bit in [
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(
        rig(false).front.avail_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
    let mut past = [0xffu8; 4];
    r.front.read_config(1000, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn multi_descriptor_read_larger_than_a_page() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 3);
    // 3 segments: 4 KiB, 512 B, 8 KiB = 25 sectors starting at sector 3.
    r.post(
        0,
        &[
            (HDR, 16, R),
            (DATA, 4096, W),
            (DATA + 0x2000, 512, W),
            (DATA + 0x4000, 8192, W),
            (STATUS, 1, W),
        ],
    );
    r.run();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(0), (1, 0, 4096 + 512 + 8192 + 1));
    let disk = original_disk();
    let mut got = vec![0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk[3 * 512..3 * 512 + 4096]);
    let mut got = vec![0u8; 512];
    r.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, disk[3 * 512 + 4096..3 * 512 + 4608]);
    let mut got = vec![0u8; 8192];
    r.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(got, disk[3 * 512 + 4608..3 * 512 + 4608 + 8192]);
    assert_eq!(r.count(|m| &m.read_bytes), 12800);
    // The guest asked for interrupts (no EVENT_IDX, flags 0).
    assert_eq!(r.irqfd.read().unwrap(), 1);
}

#[test]
fn write_then_flush_reaches_the_file() {
    let mut r = rig(false);
    r.activate();
    let data = pattern(2 * 4096, 99);
    r.mem
        .write_slice(&data[..4096], GuestAddress(DATA))
        .unwrap();
    r.mem
        .write_slice(&data[4096..], GuestAddress(DATA + 0x8000))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 10);
    r.post(
        0,
        &[
            (HDR, 16, R),
            (DATA, 4096, R),
            (DATA + 0x8000, 4096, R),
            (STATUS, 1, W),
        ],
    );
    r.run();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(0), (1, 0, 1));
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.post(4, &[(HDR, 16, R), (STATUS, 1, W)]);
    r.run();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(1), (2, 4, 1));
    let mut expect = original_disk();
    expect[10 * 512..10 * 512 + 8192].copy_from_slice(&data);
    assert_eq!(r.disk(), expect);
    assert_eq!(r.count(|m| &m.flushes), 1);
}

#[test]
fn get_id_returns_the_configured_id_and_the_default_is_stable() {
    let mut r = rig_with(true, Some("disk-serial-1"));
    r.activate();
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    r.run();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert!(id[13..].iter().all(|b| *b == 0));
    assert_eq!(r.used(0).2, 21);

    let plain = rig(true);
    let again = Block::open(&DiskConfig {
        path: plain.file.path().to_owned(),
        read_only: true,
        id: None,
    })
    .unwrap()
    .0;
    assert_eq!(plain.front.id(), again.id());
    assert!(plain.front.id().len() <= VIRTIO_BLK_ID_BYTES);
    assert_ne!(plain.front.id(), rig(true).front.id());
}

#[test]
fn several_chains_in_one_kick() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    r.post(3, &[(HDR, 16, R), (DATA + 0x1000, 512, W), (STATUS, 1, W)]);
    r.post(6, &[(HDR, 16, R), (DATA + 0x2000, 512, W), (STATUS, 1, W)]);
    r.run();
    assert_eq!(r.used(2), (3, 6, 513));
    assert_eq!(r.count(|m| &m.reads), 3);
}

// ---- requests refused with an error status; the file is untouched ----

fn refused(r: &mut Rig, expect_status: u8) {
    r.run();
    assert_eq!(r.status(), expect_status);
    assert_eq!(r.used(0).0, 1, "the request is completed");
    assert!(!r.irq.needs_reset());
    assert_eq!(r.disk(), original_disk(), "the host file is untouched");
    assert_eq!(r.count(|m| &m.refused), 1);
}

#[test]
fn write_to_read_only_disk_is_ioerr() {
    let mut r = rig(true);
    r.activate();
    r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn sectors_past_the_end_are_ioerr() {
    for (sector, len) in [
        (DISK_SECTORS, 512u32),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
    ] {
        let mut r = rig(false);
        r.activate();
        r.header(VIRTIO_BLK_T_OUT, sector);
        r.post(0, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        refused(&mut r, VIRTIO_BLK_S_IOERR);
    }
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, DISK_SECTORS);
    r.post(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn data_descriptor_outside_guest_memory_is_ioerr() {
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (0x1_0000_0000, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn data_length_past_the_end_of_memory_is_ioerr() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    let end = u64::try_from(MEM_SIZE).unwrap();
    r.post(0, &[(HDR, 16, R), (end - 512, 1024, W), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn address_plus_length_overflowing_u64_is_ioerr() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(0, &[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn more_segments_than_seg_max_is_ioerr() {
    let mut r = rig(true);
    // A queue of 16 cannot carry 129 segments, so lower the limit instead.
    r.worker.set_limits_for_test(2, SIZE_MAX);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(
        0,
        &[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 512, 512, W),
            (DATA + 1024, 512, W),
            (STATUS, 1, W),
        ],
    );
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn segment_larger_than_size_max_is_ioerr() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(
        0,
        &[(HDR, 16, R), (DATA, SIZE_MAX + 512, W), (STATUS, 1, W)],
    );
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn wrong_direction_partial_sector_and_empty_data_are_ioerr() {
    // A read whose buffer the device may not write.
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // A write from a device-writable buffer.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // 100 bytes is not a sector.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 100, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // A write with no data at all.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // A zero-length segment.
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 0, W), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn bad_headers_are_ioerr() {
    // Too short.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 8, R), (DATA, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // Device-writable.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, W), (DATA, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // Outside memory.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(
        0,
        &[(0xffff_ffff_0000, 16, R), (DATA, 512, R), (STATUS, 1, W)],
    );
    refused(&mut r, VIRTIO_BLK_S_IOERR);
    // Only a status descriptor.
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_IOERR);
}

#[test]
fn unknown_request_type_is_unsupp() {
    let mut r = rig(false);
    r.activate();
    r.header(0x1234, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    refused(&mut r, VIRTIO_BLK_S_UNSUPP);
}

// ---- broken chains: NEEDS_RESET, nothing completed, file untouched ----

fn needs_reset(r: &mut Rig, reason_part: &str) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    r.irq = r.irq.clone().with_event_hook(std::sync::Arc::new(move |e| {
        sink.lock().unwrap().push(e.clone())
    }));
    r.run();
    assert!(r.irq.needs_reset());
    assert_eq!(r.used(0).0, 0, "nothing is completed");
    assert_eq!(r.status(), 0xff, "no status is written");
    assert_eq!(r.disk(), original_disk(), "the host file is untouched");
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    let crate::virtio::DeviceEvent::NeedsReset { reason, .. } = &events[0] else {
        panic!("not a NeedsReset event: {:?}", events[0]);
    };
    assert!(reason.contains(reason_part), "{reason}");
    // Once NEEDS_RESET, nothing more is processed until a reset.
    r.run();
    assert_eq!(r.used(0).0, 0);
}

#[test]
fn status_descriptor_not_writable_needs_reset() {
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]);
    needs_reset(&mut r, "status descriptor");
}

#[test]
fn status_descriptor_outside_memory_or_empty_needs_reset() {
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (0x1_0000_0000, 1, W)]);
    needs_reset(&mut r, "status descriptor");
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]);
    needs_reset(&mut r, "status descriptor");
}

#[test]
fn looping_chain_needs_reset() {
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    let next = NEXT;
    // 0 -> 1 -> 2 -> 1 -> ...
    r.post_raw(
        0,
        &[
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(DATA, 512, next, 2),
            SplitDescriptor::new(STATUS, 1, W | next, 1),
        ],
    );
    needs_reset(&mut r, "does not end");
}

#[test]
fn chain_with_next_index_past_the_queue_needs_reset() {
    let mut r = rig(false);
    r.activate();
    r.header(VIRTIO_BLK_T_OUT, 0);
    let next = NEXT;
    r.post_raw(
        0,
        &[
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(DATA, 512, next, QSIZE + 3),
        ],
    );
    needs_reset(&mut r, "does not end");
}

#[test]
fn chain_longer_than_the_queue_needs_reset() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    let next = NEXT;
    // All 16 descriptors linked, the last one still says NEXT (back to 0).
    let descs: Vec<_> = (0..QSIZE)
        .map(|i| SplitDescriptor::new(DATA + u64::from(i) * 512, 512, W | next, (i + 1) % QSIZE))
        .collect();
    r.post_raw(0, &descs);
    needs_reset(&mut r, "does not end");
}

#[test]
fn head_index_past_the_queue_needs_reset() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    let vq = &r.vq;
    vq.avail()
        .ring()
        .ref_at(0)
        .unwrap()
        .store(u16::to_le(QSIZE + 5));
    vq.avail().idx().store(u16::to_le(1));
    needs_reset(&mut r, "empty or unreadable");
}

#[test]
fn avail_index_jumping_past_the_queue_size_needs_reset() {
    let mut r = rig(true);
    r.activate();
    r.header(VIRTIO_BLK_T_IN, 0);
    let vq = &r.vq;
    vq.avail().idx().store(u16::to_le(QSIZE + 1));
    needs_reset(&mut r, "available ring");
}

#[test]
fn process_before_activation_and_after_reset_does_nothing() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.post(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    r.run();
    assert_eq!(r.used(0).0, 0);
    r.activate();
    r.worker.detach();
    r.run();
    assert_eq!(r.used(0).0, 0);
    assert!(!r.irq.needs_reset());
}

#[test]
fn activation_without_exactly_one_queue_needs_reset() {
    let mut r = rig(true);
    let activation = Activation {
        mem: r.mem.clone(),
        queues: vec![],
        acked_features: 0,
    };
    r.worker.attach(activation, &r.irq);
    assert!(r.irq.needs_reset());
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Block::open(&DiskConfig {
        path: "/nonexistent/disk.img".into(),
        read_only: true,
        id: None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}
