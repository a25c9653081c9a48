//! virtio-blk request path without a guest: descriptor chains written by virtio-queue's
//! mock driver into mock guest memory, served by `BlockWorker` against a file on tmpfs
//! (`/dev/shm`), so the numbers measure parsing, queue handling and the copy, not a disk.
//!
//! `cargo bench -p mvm-devices --bench block`

// A benchmark harness, not guest-facing code: a setup failure should stop it loudly.
#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mvm_devices::virtio::block::{Block, BlockWorker, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use mvm_devices::virtio::{Activation, GuestMemoryMmap, Interrupt};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const DISK_BYTES: u64 = 256 << 20;
const MEM_BYTES: usize = 64 << 20;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
const PAGE: u64 = 4096;
/// `VRING_DESC_F_NEXT`, `VRING_DESC_F_WRITE`.
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Bench {
    mem: &'static GuestMemoryMmap,
    desc_table: DescriptorTable<'static, GuestMemoryMmap>,
    avail: AvailRing<'static, GuestMemoryMmap>,
    worker: BlockWorker,
    irq: Interrupt,
    posted: u16,
    _file: tempfile::TempPath,
    _tree: Option<tempfile::NamedTempFile>,
    /// Held open for writing: the image cannot be leased.
    _writer: Option<std::fs::File>,
}

impl Bench {
    /// A read-only disk whose reads are checked against a dm-verity tree
    /// (`block/verity.rs`), to compare with the same reads unverified. With
    /// `leased`, as the VMM runs it: the image leased, each block hashed once
    /// and trusted while the lease holds. Without, another handle has the image
    /// open for writing, so it cannot be leased and every read is hashed.
    fn new_verified(leased: bool) -> Self {
        use mvm_devices::virtio::block::verity::{VerifiedDisk, VerifyMode};
        use mvm_loader::verity::{build_tree, BuildOptions, Salt, VerityVerifier};
        let mut b = Self::new(true);
        let tree = tempfile::Builder::new()
            .prefix("mvm-blk-bench-tree")
            .tempfile_in("/dev/shm")
            .expect("tmpfs at /dev/shm");
        let params = build_tree(&b._file, tree.path(), &BuildOptions::new(Salt(vec![7; 32])))
            .expect("verity tree");
        let verifier = VerityVerifier::open(tree.path(), &params).expect("verifier");
        if !leased {
            b._writer = Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&b._file)
                    .expect("writer"),
            );
        }
        let mode = b.worker.set_verity(VerifiedDisk::new(
            verifier,
            Box::new(|f| panic!("bench block failed verification: {f:?}")),
        ));
        assert_eq!(mode == VerifyMode::OnceWhileLeased, leased, "{mode:?}");
        b._tree = Some(tree);
        b
    }

    fn new(read_only: bool) -> Self {
        let mut file = tempfile::Builder::new()
            .prefix("mvm-blk-bench")
            .tempfile_in("/dev/shm")
            .expect("tmpfs at /dev/shm");
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(DISK_BYTES >> 20) {
            file.write_all(&chunk).expect("fill disk");
        }
        let path = file.into_temp_path();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .expect("reopen");
        let (_front, mut worker) =
            Block::with_file(disk, DISK_BYTES / 512, read_only, "bench".into());
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("memory"),
        ));
        // The mock driver's rings, placed apart by hand: MockSplitQueue's own layout lets the
        // used ring overlap the second half of the available ring, which a full 256-entry
        // queue reaches.
        let desc_table = DescriptorTable::new(mem, GuestAddress(DESC_TABLE), QSIZE);
        let avail = AvailRing::new(mem, GuestAddress(AVAIL_RING), QSIZE);
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue
            .try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("desc");
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .expect("avail");
        queue
            .try_set_used_ring_address(GuestAddress(USED_RING))
            .expect("used");
        queue.set_ready(true);
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .with_event_hook(std::sync::Arc::new(|e| {
                panic!("bench request refused: {e:?}")
            }));
        worker.attach(
            Activation {
                mem: mem.clone(),
                queues: vec![queue],
                acked_features: 0,
            },
            &irq,
        );
        Self {
            mem,
            desc_table,
            avail,
            worker,
            irq,
            posted: 0,
            _file: path,
            _tree: None,
            _writer: None,
        }
    }

    /// Lays out `chains` request chains of `segments` page-sized data segments each,
    /// starting at descriptor 0; returns the heads.
    fn lay_out(&self, chains: u16, segments: u16, device_writes: bool) -> Vec<u16> {
        let per_chain = segments + 2;
        let mut heads = Vec::new();
        let data_flags = if device_writes { WRITE | NEXT } else { NEXT };
        let mut page = 0u64;
        for c in 0..chains {
            let head = c * per_chain;
            let mut descs = vec![Descriptor::new(
                HEADERS + u64::from(c) * 16,
                16,
                NEXT,
                head + 1,
            )];
            for s in 0..segments {
                descs.push(Descriptor::new(
                    DATA + page * PAGE,
                    u32::try_from(PAGE).expect("page"),
                    data_flags,
                    head + s + 2,
                ));
                page += 1;
            }
            descs.push(Descriptor::new(STATUSES + u64::from(c), 1, WRITE, 0));
            for (i, d) in descs.into_iter().enumerate() {
                let index = head + u16::try_from(i).expect("index");
                self.desc_table
                    .store(index, RawDescriptor::from(d))
                    .expect("store");
            }
            heads.push(head);
        }
        heads
    }

    fn header(&self, chain: u16, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(HEADERS + u64::from(chain) * 16))
            .expect("header");
    }

    /// Posts every head and lets the worker serve them all.
    fn submit(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = usize::from(self.posted % QSIZE);
            self.avail
                .ring()
                .ref_at(slot)
                .expect("slot")
                .store(u16::to_le(head));
            self.posted = self.posted.wrapping_add(1);
        }
        self.avail.idx().store(u16::to_le(self.posted));
        self.worker.process_requests(&self.irq);
        assert!(!self.irq.needs_reset(), "bench requests must be valid");
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verity {
    Off,
    EveryRead,
    Leased,
}

fn sequential(c: &mut Criterion, name: &str, request_type: u32) {
    sequential_on(c, name, request_type, Verity::Off);
}

fn sequential_on(c: &mut Criterion, name: &str, request_type: u32, verity: Verity) {
    // 512 KiB requests of 128 page segments (seg_max), one at a time.
    let segments = 128u16;
    let request_bytes = u64::from(segments) * PAGE;
    let mut b = match verity {
        Verity::Off => Bench::new(request_type == VIRTIO_BLK_T_IN),
        Verity::EveryRead => Bench::new_verified(false),
        Verity::Leased => Bench::new_verified(true),
    };
    let heads = b.lay_out(1, segments, request_type == VIRTIO_BLK_T_IN);
    let mut sector = 0u64;
    let mut group = c.benchmark_group("virtio-blk");
    group.throughput(Throughput::Bytes(request_bytes));
    group.bench_function(name, |bencher| {
        bencher.iter(|| {
            b.header(0, request_type, sector);
            b.submit(&heads);
            sector = (sector + request_bytes / 512) % (DISK_BYTES / 512);
        });
    });
    group.finish();
}

fn random_read_4k(c: &mut Criterion) {
    // 64 single-page reads per kick at pseudo-random 4 KiB-aligned offsets.
    let chains = 64u16;
    let mut b = Bench::new(true);
    let heads = b.lay_out(chains, 1, true);
    let pages = DISK_BYTES / PAGE;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut group = c.benchmark_group("virtio-blk");
    group.throughput(Throughput::Elements(u64::from(chains)));
    group.bench_function("random-read-4k (IOPS = elements/s)", |bencher| {
        bencher.iter(|| {
            for chain in 0..chains {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let page = (state >> 33) % pages;
                b.header(chain, VIRTIO_BLK_T_IN, page * (PAGE / 512));
            }
            b.submit(&heads);
        });
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    sequential(c, "sequential-read-512k", VIRTIO_BLK_T_IN);
    sequential_on(
        c,
        "sequential-read-512k-verity",
        VIRTIO_BLK_T_IN,
        Verity::EveryRead,
    );
    sequential_on(
        c,
        "sequential-read-512k-verity-leased",
        VIRTIO_BLK_T_IN,
        Verity::Leased,
    );
    sequential(c, "sequential-write-512k", VIRTIO_BLK_T_OUT);
    random_read_4k(c);
}

criterion_group!(block, benches);
criterion_main!(block);
