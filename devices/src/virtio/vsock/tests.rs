//! The whole device over mock virtio queues, with real Unix sockets on the host side.
//! The test plays the guest driver: it posts RX buffers and TX packets in guest
//! memory and reads the used rings.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::VsockHeader;
use super::*;
use crate::virtio::{Activation, GuestMemoryMmap, Interrupt};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
/// Each descriptor index owns one buffer slot this big.
const SLOT: u64 = 0x1_1000;
const RX_BUF: u32 = 4096;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue with its rings laid out from `base` (descriptor table, then the
    /// available ring at +4 KiB, the used ring at +8 KiB) and its buffers from `bufs`.
    fn new(mem: &GuestMemoryMmap, base: u64, bufs: u64) -> (Self, Queue) {
        Self::with_event_idx(mem, base, bufs, false)
    }

    fn with_event_idx(
        mem: &GuestMemoryMmap,
        base: u64,
        bufs: u64,
        event_idx: bool,
    ) -> (Self, Queue) {
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        // A fresh queue in zeroed memory: clear what a previous queue left there.
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(lo(desc)), Some(hi(desc)));
        q.set_avail_ring_address(Some(lo(avail)), Some(hi(avail)));
        q.set_used_ring_address(Some(lo(used)), Some(hi(used)));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem));
        (
            DriverQueue {
                desc,
                avail,
                used,
                bufs,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            },
            q,
        )
    }

    fn slot(&self, desc: u16) -> u64 {
        self.bufs + u64::from(desc) * SLOT
    }

    /// Posts a chain of descriptors (len, writable) with their contents.
    fn post(&mut self, mem: &GuestMemoryMmap, parts: &[(&[u8], u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (content, len, writable)) in parts.iter().enumerate() {
            let d = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let addr = self.slot(d);
            mem.write_slice(content, GuestAddress(addr)).unwrap();
            let mut flags = if *writable { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT;
                self.next_desc
            } else {
                0
            };
            let at = GuestAddress(self.desc + u64::from(d) * 16);
            mem.write_obj(addr.to_le(), at).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
                .unwrap();
            mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
                .unwrap();
        }
        let ring = GuestAddress(self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2);
        mem.write_obj(head.to_le(), ring).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Posts one descriptor with an arbitrary address (hostile drivers).
    fn post_raw(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, flags: u16) {
        let d = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QSIZE;
        let at = self.desc + u64::from(d) * 16;
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(at + 14)).unwrap();
        let ring = GuestAddress(self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2);
        mem.write_obj(d.to_le(), ring).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The `avail_event` the device wrote (EVENT_IDX: kick when the ring passes it).
    fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(QSIZE)))
            .unwrap()
    }

    /// Used entries since the last call: (head, len).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = GuestAddress(self.used + 4 + u64::from(self.used_seen % QSIZE) * 8);
            let id: u32 = mem.read_obj(e).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e.0 + 4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
    worker: VsockWorker,
    irq: Interrupt,
    uds: PathBuf,
    _dir: tempfile::TempDir,
    /// What the guest has read per connection, for credit updates.
    buf_alloc: u32,
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32, fwd_cnt: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VMADDR_CID_HOST,
        src_port,
        dst_port,
        len,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt,
    }
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.sock");
        let (dev, worker) = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        assert_eq!(dev.guest_cid(), GUEST_CID);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, qrx) = DriverQueue::new(&mem, 0x0, 0x10_0000);
        let (tx, qtx) = DriverQueue::new(&mem, 0x1_0000, 0x200_0000);
        let (ev, qev) = DriverQueue::new(&mem, 0x2_0000, 0x3c0_0000);
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut g = Guest {
            mem,
            rx,
            tx,
            ev,
            worker,
            irq,
            uds,
            _dir: dir,
            buf_alloc: 256 * 1024,
        };
        g.activate(vec![qrx, qtx, qev]);
        g
    }

    fn activate(&mut self, queues: Vec<Queue>) {
        let act = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: 1 << 32,
        };
        self.worker.activate_queues(act, &self.irq);
    }

    /// Posts up to `n` receive buffers, keeping at most 64 outstanding.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            if self.rx.avail_idx.wrapping_sub(self.rx.used_seen) >= 64 {
                break;
            }
            self.rx.post(&self.mem, &[(&[], RX_BUF, true)]);
        }
        self.worker.deliver_rx(&self.irq);
    }

    fn send(&mut self, h: VsockHeader, data: &[u8]) {
        let hb = h.to_bytes();
        if data.is_empty() {
            self.tx.post(&self.mem, &[(&hb, 44, false)]);
        } else {
            // Header and payload in separate descriptors, as Linux sends them.
            let len = u32::try_from(data.len()).unwrap();
            self.tx
                .post(&self.mem, &[(&hb, 44, false), (data, len, false)]);
        }
        self.worker.on_tx(&self.irq);
        let used = self.tx.take_used(&self.mem);
        assert_eq!(used.len(), 1, "TX chain returned");
        assert_eq!(used[0].1, 0, "TX used length");
    }

    fn pump(&mut self) {
        self.worker.on_host_events(&self.irq);
    }

    /// Packets the device delivered since the last call.
    fn recv(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        let mut out = Vec::new();
        for (head, len) in used {
            let mut buf = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut buf, GuestAddress(self.rx.slot(head)))
                .unwrap();
            let h = VsockHeader::from_prefix(&buf).unwrap();
            assert_eq!(h.len as usize + 44, len as usize);
            out.push((h, buf[44..].to_vec()));
        }
        out
    }

    /// Pumps and collects until `want` says stop or the deadline passes.
    fn recv_until(
        &mut self,
        mut want: impl FnMut(&[(VsockHeader, Vec<u8>)]) -> bool,
    ) -> Vec<(VsockHeader, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            self.pump();
            got.extend(self.recv());
            if want(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "timed out; got {got:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn lo(addr: u64) -> u32 {
    u32::try_from(addr & 0xffff_ffff).unwrap()
}

fn hi(addr: u64) -> u32 {
    u32::try_from(addr >> 32).unwrap()
}

fn pattern251(i: usize) -> u8 {
    u8::try_from(i % 251).unwrap()
}

fn pattern253(i: usize) -> u8 {
    u8::try_from(i % 253).unwrap()
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "eof before newline");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn host_connect_request_response_ok_and_data_both_ways() {
    let mut g = Guest::new();
    g.give_rx(32);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let got = g.recv_until(|p| !p.is_empty());
    let (req, _) = got[0];
    assert_eq!(req.op, VIRTIO_VSOCK_OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (VMADDR_CID_HOST, GUEST_CID));
    assert_eq!(req.dst_port, 52);
    let hport = req.src_port;

    // The guest accepts.
    g.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, 52, hport, 0, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {hport}\n"));

    // Host to guest.
    host.write_all(b"hello from host").unwrap();
    let got = g.recv_until(|p| p.iter().any(|(h, _)| h.op == VIRTIO_VSOCK_OP_RW));
    let (h, data) = got
        .iter()
        .find(|(h, _)| h.op == VIRTIO_VSOCK_OP_RW)
        .unwrap();
    assert_eq!((h.src_port, h.dst_port), (hport, 52));
    assert_eq!(data, b"hello from host");

    // Guest to host.
    g.send(
        hdr(VIRTIO_VSOCK_OP_RW, 52, hport, 16, 15),
        b"hello from guest",
    );
    let mut buf = [0u8; 16];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from guest");

    // The host closes: the guest hears SHUTDOWN(SEND), closes too, gets the RST.
    drop(host);
    let got = g.recv_until(|p| p.iter().any(|(h, _)| h.op == VIRTIO_VSOCK_OP_SHUTDOWN));
    assert!(got
        .iter()
        .any(|(h, _)| h.op == VIRTIO_VSOCK_OP_SHUTDOWN && h.flags == VIRTIO_VSOCK_SHUTDOWN_SEND));
    let mut sh = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 52, hport, 0, 15);
    sh.flags = VIRTIO_VSOCK_SHUTDOWN_SEND | VIRTIO_VSOCK_SHUTDOWN_RCV;
    g.send(sh, &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!(g.worker.muxer().connection_count(), 0);
}

#[test]
fn host_connect_refused_by_guest_closes_the_host_socket() {
    let mut g = Guest::new();
    g.give_rx(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let got = g.recv_until(|p| !p.is_empty());
    let hport = got[0].0.src_port;
    g.send(hdr(VIRTIO_VSOCK_OP_RST, 99, hport, 0, 0), &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "no OK, just end of file");
    assert_eq!(g.worker.muxer().connection_count(), 0);
}

#[test]
fn bad_connect_line_closes_the_host_socket() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"HELLO 52\n").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut b = [0u8; 8];
    loop {
        g.pump();
        match host.read(&mut b) {
            Ok(0) => break,
            Ok(_) => panic!("unexpected bytes"),
            Err(_) => assert!(Instant::now() < deadline),
        }
    }
    assert_eq!(g.worker.muxer().connection_count(), 0);
}

#[test]
fn guest_connect_to_host_listener_and_data_both_ways() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(unix::host_port_path(&g.uds, 1234)).unwrap();
    g.give_rx(8);
    g.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 5000, 1234, 0, 0), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_RESPONSE);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (1234, 5000));
    assert_eq!(got[0].0.buf_alloc, CONN_BUF_ALLOC);
    let (mut host, _) = listener.accept().unwrap();

    g.send(hdr(VIRTIO_VSOCK_OP_RW, 5000, 1234, 4, 0), b"ping");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    host.write_all(b"pong").unwrap();
    let got = g.recv_until(|p| p.iter().any(|(h, _)| h.op == VIRTIO_VSOCK_OP_RW));
    assert_eq!(got[0].1, b"pong");
    assert_eq!(
        g.worker.muxer().connection_state(1234, 5000),
        Some(connection::ConnState::Established)
    );
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut g = Guest::new();
    g.give_rx(4);
    g.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 5000, 4321, 0, 0), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (4321, 5000));
}

#[test]
fn stray_and_hostile_packets_get_rst_or_nothing() {
    let mut g = Guest::new();
    g.give_rx(8);
    // Data for a connection that does not exist: RST.
    g.send(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, 3, 0), b"abc");
    // An unknown op: RST.
    g.send(hdr(42, 1, 2, 0, 0), &[]);
    // A spoofed source CID: dropped silently.
    let mut spoof = hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 2, 0, 0);
    spoof.src_cid = 77;
    g.send(spoof, &[]);
    // A length past the descriptors: dropped.
    g.send(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, 60_000, 0), b"short");
    // A header split short: dropped.
    g.tx.post(&g.mem, &[(&[0u8; 10], 10, false)]);
    g.worker.on_tx(&g.irq);
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    // An RST for nothing: nothing.
    g.send(hdr(VIRTIO_VSOCK_OP_RST, 1, 2, 0, 0), &[]);
    let got = g.recv();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RST]);
    assert!(!g.irq.needs_reset());
    assert_eq!(g.worker.muxer().connection_count(), 0);
}

#[test]
fn rx_buffer_too_small_for_a_header_is_returned_empty() {
    let mut g = Guest::new();
    g.rx.post(&g.mem, &[(&[], 10, true)]);
    g.rx.post(&g.mem, &[(&[], RX_BUF, true)]);
    g.send(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, 0, 0), &[]);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 44);
    assert_eq!(g.worker.stats().rx_buffers_too_small, 1);
}

/// Moves `total` bytes host to guest, the guest reading as it goes and returning
/// credit, and checks the device never overran the guest's buffer.
#[test]
fn bulk_host_to_guest_respects_guest_credit() {
    let mut g = Guest::new();
    g.buf_alloc = 64 * 1024;
    let listener = UnixListener::bind(unix::host_port_path(&g.uds, 7)).unwrap();
    let mut req = hdr(VIRTIO_VSOCK_OP_REQUEST, 600, 7, 0, 0);
    req.buf_alloc = g.buf_alloc;
    g.give_rx(4);
    g.send(req, &[]);
    assert_eq!(g.recv()[0].0.op, VIRTIO_VSOCK_OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    let total: usize = 2 << 20;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(pattern251).collect();
        host.write_all(&data).unwrap();
        host
    });
    let mut received = Vec::with_capacity(total);
    let mut fwd_cnt: u32 = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < total {
        assert!(Instant::now() < deadline, "stalled at {}", received.len());
        g.give_rx(8);
        g.pump();
        for (h, data) in g.recv() {
            match h.op {
                VIRTIO_VSOCK_OP_RW => {
                    received.extend_from_slice(&data);
                    let in_flight = u32::try_from(received.len()).unwrap() - fwd_cnt;
                    assert!(in_flight <= g.buf_alloc, "device overran guest credit");
                }
                VIRTIO_VSOCK_OP_CREDIT_REQUEST | VIRTIO_VSOCK_OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
        }
        // The guest application reads everything and says so.
        let read = u32::try_from(received.len()).unwrap();
        if read != fwd_cnt {
            fwd_cnt = read;
            let mut cu = hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 600, 7, 0, fwd_cnt);
            cu.buf_alloc = g.buf_alloc;
            g.send(cu, &[]);
        }
    }
    let _host = writer.join().unwrap();
    assert!(received
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern251(i)));
}

/// Moves bytes guest to host while the host reads slowly; the device holds at most
/// its `buf_alloc` and the guest respects the credit it is given.
#[test]
fn bulk_guest_to_host_with_slow_reader_is_bounded() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(unix::host_port_path(&g.uds, 8)).unwrap();
    g.give_rx(64);
    g.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 700, 8, 0, 0), &[]);
    let resp = g.recv()[0].0;
    assert_eq!(resp.op, VIRTIO_VSOCK_OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    // A reader that waits for bytes that never come fails instead of hanging the suite.
    host.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let total: usize = 4 << 20;
    // The host reader does not read at all until told to, so the device's buffer
    // fills up and the guest runs out of credit.
    let (start_tx, start_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        start_rx.recv().unwrap();
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 8192];
        while got.len() < total {
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let mut start_tx = Some(start_tx);
    let (mut buf_alloc, mut dev_fwd) = (resp.buf_alloc, resp.fwd_cnt);
    let mut sent: u32 = 0;
    let mut max_buffered = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (sent as usize) < total {
        assert!(Instant::now() < deadline, "stalled at {sent}");
        let credit = buf_alloc - (sent - dev_fwd);
        let n = (credit as usize).min(4096).min(total - sent as usize);
        if n > 0 {
            let data: Vec<u8> = (sent as usize..sent as usize + n).map(pattern253).collect();
            let n32 = u32::try_from(n).unwrap();
            g.send(hdr(VIRTIO_VSOCK_OP_RW, 700, 8, n32, 0), &data);
            sent += n32;
        } else {
            if let Some(start) = start_tx.take() {
                // Out of credit with nobody reading: the device holds what it
                // promised to hold, and no more.
                let held = g.worker.muxer().buffered(8, 700).unwrap();
                assert!(held > 0 && held <= CONN_BUF_ALLOC as usize, "held {held}");
                start.send(()).unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        g.give_rx(1);
        g.pump();
        for (h, _) in g.recv() {
            assert_ne!(h.op, VIRTIO_VSOCK_OP_RST, "device reset the connection");
            buf_alloc = h.buf_alloc;
            dev_fwd = h.fwd_cnt;
        }
        let held = g.worker.muxer().buffered(8, 700).unwrap();
        assert!(held <= CONN_BUF_ALLOC as usize, "device holds {held} bytes");
        max_buffered = max_buffered.max(held);
    }
    // Everything is sent, but the device may still hold the tail (the host socket was
    // full at the last pump): it reaches the host only as the device is pumped again.
    while g.worker.muxer().buffered(8, 700).unwrap() > 0 {
        assert!(Instant::now() < deadline, "the device kept the last bytes");
        std::thread::sleep(Duration::from_millis(1));
        g.give_rx(1);
        g.pump();
        g.recv();
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), total);
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern253(i)));
    assert!(start_tx.is_none(), "the guest never ran out of credit");
    assert!(max_buffered > 0);
}

#[test]
fn reset_closes_connections_and_announces_transport_reset() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(unix::host_port_path(&g.uds, 9)).unwrap();
    g.give_rx(4);
    g.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 800, 9, 0, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(g.worker.muxer().connection_count(), 1);
    g.worker.reset_queues();
    assert_eq!(g.worker.muxer().connection_count(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0, "host socket closed by reset");

    // The driver brings the device back with fresh queues and an event buffer.
    let (rx, qrx) = DriverQueue::new(&g.mem, 0x3_0000, 0x100_0000);
    let (tx, qtx) = DriverQueue::new(&g.mem, 0x4_0000, 0x200_0000);
    let (ev, qev) = DriverQueue::new(&g.mem, 0x5_0000, 0x3c0_0000);
    g.rx = rx;
    g.tx = tx;
    g.ev = ev;
    g.ev.post(&g.mem, &[(&[0xff; 4], 4, true)]);
    g.activate(vec![qrx, qtx, qev]);
    let used = g.ev.take_used(&g.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    let id: u32 = g.mem.read_obj(GuestAddress(g.ev.slot(used[0].0))).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert_eq!(g.worker.stats().transport_resets, 1);
    // The listener still works, once the guest handled the reset (gave the buffer back).
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1\n").unwrap();
    g.ev.post(&g.mem, &[(&[0xff; 4], 4, true)]);
    g.worker.on_event_queue(&g.irq);
    g.give_rx(1);
    let got = g.recv_until(|p| !p.is_empty());
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_REQUEST);
}

#[test]
fn a_restores_reset_holds_rx_until_the_guest_gives_the_event_buffer_back() {
    // Linux handles the reset and received packets in separate work items: a host
    // CONNECT answered before the reset is handled would be closed by it, silently.
    let mut g = Guest::new();
    g.worker.reset_queues();
    let (rx, qrx) = DriverQueue::with_event_idx(&g.mem, 0x3_0000, 0x100_0000, true);
    let (tx, qtx) = DriverQueue::with_event_idx(&g.mem, 0x4_0000, 0x200_0000, true);
    let (ev, qev) = DriverQueue::with_event_idx(&g.mem, 0x5_0000, 0x3c0_0000, true);
    (g.rx, g.tx, g.ev) = (rx, tx, ev);
    g.activate(vec![qrx, qtx, qev]);
    // After the driver's own reset nothing waits: the device's reset event is only owed.
    // Then a restore: as Linux does, several event buffers posted at once.
    for _ in 0..4 {
        g.ev.post(&g.mem, &[(&[0xff; 4], 4, true)]);
    }
    g.worker.on_event_queue(&g.irq);
    assert_eq!(g.ev.take_used(&g.mem).len(), 1, "the driver reset's event");
    g.worker.transport_reset(&g.irq);
    assert_eq!(g.ev.take_used(&g.mem).len(), 1, "the restore's event");
    // The device asks for a kick at the very next buffer, though two are still posted.
    assert_eq!(g.ev.avail_event(&g.mem), 4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1\n").unwrap();
    g.give_rx(4);
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        g.pump();
        assert!(
            g.recv().is_empty(),
            "delivered before the reset was handled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest handled the event and gave its buffer back: the request goes out.
    g.ev.post(&g.mem, &[(&[0xff; 4], 4, true)]);
    g.worker.on_event_queue(&g.irq);
    let got = g.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_REQUEST);
}

#[test]
fn connection_limit_refuses_the_extra_host_socket() {
    let mut g = Guest::new();
    let mut hosts = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(b"CONNECT 5\n").unwrap();
        hosts.push(s);
        g.pump();
    }
    g.pump();
    assert_eq!(g.worker.muxer().connection_count(), MAX_CONNECTIONS);
    let mut extra = UnixStream::connect(&g.uds).unwrap();
    // The device may already have closed it.
    let _ = extra.write_all(b"CONNECT 5\n");
    g.pump();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    // Closed unread: end of file, or a reset because the line was never read.
    match extra.read(&mut b) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert_eq!(g.worker.muxer().stats().refused_over_limit, 1);
    assert_eq!(g.worker.muxer().connection_count(), MAX_CONNECTIONS);
    // A guest connection is refused too, with an RST.
    let _l = UnixListener::bind(unix::host_port_path(&g.uds, 11)).unwrap();
    g.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 900, 11, 0, 0), &[]);
    // RSTs go before the REQUESTs still queued for the 256 host sockets.
    g.give_rx(1);
    let got = g.recv();
    assert!(got
        .iter()
        .any(|(h, _)| h.op == VIRTIO_VSOCK_OP_RST && h.dst_port == 900));
}

#[test]
fn rx_buffer_outside_guest_memory_marks_needs_reset() {
    let mut g = Guest::new();
    g.rx.post_raw(
        &g.mem,
        (MEM_SIZE as u64) + 0x1000,
        RX_BUF,
        VRING_DESC_F_WRITE,
    );
    g.send(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, 0, 0), &[]);
    assert!(g.irq.needs_reset());
    // Host activity afterwards leaves the queues alone.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    g.worker.on_host_events(&g.irq);
    let idx: u16 = g.mem.read_obj(GuestAddress(g.rx.used + 2)).unwrap();
    assert_eq!(idx, 0);
}

#[test]
fn tx_descriptor_outside_guest_memory_is_dropped() {
    let mut g = Guest::new();
    g.give_rx(2);
    g.tx.post_raw(&g.mem, u64::MAX - 10, 100, 0);
    g.worker.on_tx(&g.irq);
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    assert!(g.recv().is_empty());
    assert_eq!(g.worker.stats().tx_unreadable, 1);
}

#[test]
fn with_event_idx_the_device_asks_for_kicks_where_it_waits() {
    let mut g = Guest::new();
    g.worker.reset_queues();
    let (rx, qrx) = DriverQueue::with_event_idx(&g.mem, 0x3_0000, 0x100_0000, true);
    let (tx, qtx) = DriverQueue::with_event_idx(&g.mem, 0x4_0000, 0x200_0000, true);
    let (ev, qev) = DriverQueue::with_event_idx(&g.mem, 0x5_0000, 0x3c0_0000, true);
    (g.rx, g.tx, g.ev) = (rx, tx, ev);
    g.activate(vec![qrx, qtx, qev]);
    // No event buffer for the pending TRANSPORT_RESET: kick me at the first one.
    assert_eq!(g.ev.avail_event(&g.mem), 0);
    // TX drained: kick me at the next packet.
    g.send(hdr(VIRTIO_VSOCK_OP_RST, 1, 2, 0, 0), &[]);
    g.send(hdr(VIRTIO_VSOCK_OP_RST, 1, 3, 0, 0), &[]);
    assert_eq!(g.tx.avail_event(&g.mem), 2);
    // Something to deliver and no RX buffer: kick me at the next buffer.
    g.send(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, 0, 0), &[]);
    assert_eq!(g.rx.avail_event(&g.mem), 0);
    g.give_rx(1);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_RST);
}

#[test]
fn host_connect_the_guest_ignores_times_out() {
    let mut g = Guest::new();
    g.worker
        .muxer_mut()
        .set_connect_timeout(Duration::from_millis(50));
    g.give_rx(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let got = g.recv_until(|p| !p.is_empty());
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_REQUEST);
    let hport = got[0].0.src_port;
    // The guest says nothing; the device gives up on its own.
    let got = g.recv_until(|p| !p.is_empty());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (hport, 52));
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(host.read(&mut b).unwrap(), 0, "host socket closed, no OK");
    assert_eq!(g.worker.muxer().stats().connect_timeouts, 1);
    assert_eq!(g.worker.muxer().connection_count(), 0);
    // The expired timer does not keep the device loop awake.
    let outer = vmm_sys_util::epoll::Epoll::new().unwrap();
    outer
        .ctl(
            vmm_sys_util::epoll::ControlOperation::Add,
            g.worker.muxer().epoll_fd(),
            vmm_sys_util::epoll::EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0),
        )
        .unwrap();
    let mut ev = [vmm_sys_util::epoll::EpollEvent::default(); 1];
    assert_eq!(
        outer.wait(0, &mut ev).unwrap(),
        0,
        "muxer fd still readable"
    );
    // An answered CONNECT is not timed out later.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 53\n").unwrap();
    let got = g.recv_until(|p| !p.is_empty());
    let hport = got[0].0.src_port;
    g.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, 53, hport, 0, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {hport}\n"));
    std::thread::sleep(Duration::from_millis(100));
    g.pump();
    assert!(g.recv().is_empty());
    assert_eq!(g.worker.muxer().stats().connect_timeouts, 1);
    assert_eq!(g.worker.muxer().connection_count(), 1);
}

/// A hostile guest publishes an available index far past the queue size: the device
/// must mark itself NEEDS_RESET and return, not spin on the ring (found by the
/// hostile e2e suite, `v-tx-avail-idx-jump` / `v-rx-avail-idx-jump`).
#[test]
fn avail_index_far_ahead_marks_needs_reset_instead_of_spinning() {
    // TX: the index 1000 ahead.
    let mut g = Guest::new();
    g.give_rx(2);
    g.tx.post(
        &g.mem,
        &[(
            &hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 2, 0, 0).to_bytes(),
            44,
            false,
        )],
    );
    g.mem
        .write_obj(1000u16.to_le(), GuestAddress(g.tx.avail + 2))
        .unwrap();
    g.worker.on_tx(&g.irq);
    assert!(g.irq.needs_reset());
    assert!(g.tx.take_used(&g.mem).is_empty());

    // RX: the index 1000 ahead while an RST is owed.
    let mut g = Guest::new();
    g.give_rx(1);
    g.mem
        .write_obj(1000u16.to_le(), GuestAddress(g.rx.avail + 2))
        .unwrap();
    g.tx.post(
        &g.mem,
        &[(
            &hdr(VIRTIO_VSOCK_OP_REQUEST, 5000, 4321, 0, 0).to_bytes(),
            44,
            false,
        )],
    );
    g.worker.on_tx(&g.irq);
    assert!(g.irq.needs_reset());
    assert!(g.rx.take_used(&g.mem).is_empty());
}
