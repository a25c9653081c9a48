//! Writes the seed corpus: `cargo run --bin gen_corpus -- <corpus dir>`.
//!
//! Every seed is a valid or nearly valid input built with the same layouts the harnesses
//! read, so the fuzzer starts deep inside each parser. Each seed is also run through
//! its harness here, so a seed that trips an invariant is caught before it is written.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use mvm_agent::protocol::{encode, ExecRequest, Hello, Message};
use mvm_devices::virtio::net::frame::build;
use mvm_devices::virtio::net::frame::{ETHERTYPE_ARP, ETHERTYPE_IPV6, ETHERTYPE_VLAN};
use mvm_devices::virtio::vsock::packet::VsockHeader;
use mvm_devices::virtio::vsock::{
    VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST,
};
use mvm_fuzz::input::Output;
use mvm_fuzz::mmio_transport::FRIENDLY_REGISTERS;
use mvm_fuzz::verity_tree::genuine;
use mvm_fuzz::virtio_queue_blk::{AVAIL_RING, DESC_TABLE, HIGH_START, LOW_END};
use mvm_fuzz::vsock_connection::op;
use mvm_fuzz::*;

fn write(dir: &Path, target: &str, name: &str, data: &[u8], run: fn(&[u8])) {
    run(data);
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), data).expect("write seed");
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus".to_owned());
    let dir = Path::new(&dir);
    blk(dir);
    vsock(dir);
    connection(dir);
    agent(dir);
    plan(dir);
    verity(dir);
    net(dir);
    mmio(dir);
    egress(dir);
}

// ---- virtio_queue_blk ------------------------------------------------------------

const W: u16 = 2;
const NEXT: u16 = 1;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x4000;
const STATUS: u64 = 0x5000;

/// Guest memory (low region) with `chains` (each a list of (addr, len, flags)) laid out
/// from descriptor 0 on, all posted, and request headers at HDR + 16*i.
struct Mem(Vec<u8>);

impl Mem {
    fn new() -> Self {
        Self(vec![0; 0x5100])
    }
    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(DESC_TABLE + 16 * u64::from(index), &d);
    }
    fn post(&mut self, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            self.put(AVAIL_RING + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self.put(AVAIL_RING + 2, &(heads.len() as u16).to_le_bytes());
    }
    fn header(&mut self, slot: u64, kind: u32, sector: u64) -> u64 {
        let at = HDR + 16 * slot;
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(at, &h);
        at
    }
}

fn blk_seed(config: u8, sectors: u8, mem: &Mem) -> Vec<u8> {
    let mut o = Output::default();
    o.u8(config).u8(sectors).bytes(&mem.0);
    o.0
}

fn blk(dir: &Path) {
    let t = "virtio_queue_blk";
    let run = virtio_queue_blk::run;
    // Queue size 16 (config 4), 63+1 sectors.
    let mut m = Mem::new();
    // 0: read 2 sectors at 3; 3: write 1 sector at 5; 6: flush; 8: get id; 11: unsupported.
    let h = m.header(0, 0, 3);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, DATA, 1024, W | NEXT, 2);
    m.desc(2, STATUS, 1, W, 0);
    let h = m.header(1, 1, 5);
    m.desc(3, h, 16, NEXT, 4);
    m.desc(4, DATA + 0x400, 512, NEXT, 5);
    m.desc(5, STATUS + 1, 1, W, 0);
    let h = m.header(2, 4, 0);
    m.desc(6, h, 16, NEXT, 7);
    m.desc(7, STATUS + 2, 1, W, 0);
    let h = m.header(3, 8, 0);
    m.desc(8, h, 16, NEXT, 9);
    m.desc(9, DATA + 0x800, 20, W | NEXT, 10);
    m.desc(10, STATUS + 3, 1, W, 0);
    let h = m.header(4, 99, 0);
    m.desc(11, h, 16, NEXT, 12);
    m.desc(12, STATUS + 4, 1, W, 0);
    m.post(&[0, 3, 6, 8, 11]);
    write(dir, t, "mixed-requests", &blk_seed(4, 63, &m), run);
    write(
        dir,
        t,
        "mixed-requests-event-idx",
        &blk_seed(4 | 0x10, 63, &m),
        run,
    );
    write(
        dir,
        t,
        "mixed-requests-read-only",
        &blk_seed(4 | 0x20, 63, &m),
        run,
    );

    // Two-segment read whose second segment is in the high region.
    let mut m = Mem::new();
    let h = m.header(0, 0, 0);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, DATA, 512, W | NEXT, 2);
    m.desc(2, HIGH_START, 512, W | NEXT, 3);
    m.desc(3, STATUS, 1, W, 0);
    m.post(&[0]);
    write(dir, t, "read-two-regions", &blk_seed(3, 7, &m), run);

    // Hostile: a segment in the hole, a loop, past the end, a status in read-only memory.
    let mut m = Mem::new();
    let h = m.header(0, 0, 0);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, LOW_END, 512, W | NEXT, 2);
    m.desc(2, STATUS, 1, W, 0);
    m.post(&[0]);
    write(dir, t, "segment-in-hole", &blk_seed(3, 7, &m), run);

    let mut m = Mem::new();
    let h = m.header(0, 0, 0);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, DATA, 512, W | NEXT, 0);
    m.post(&[0]);
    write(dir, t, "descriptor-loop", &blk_seed(3, 7, &m), run);

    let mut m = Mem::new();
    let h = m.header(0, 1, 7);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, DATA, 1024, NEXT, 2);
    m.desc(2, STATUS, 1, W, 0);
    m.post(&[0]);
    write(dir, t, "write-past-end", &blk_seed(3, 7, &m), run);

    let mut m = Mem::new();
    let h = m.header(0, 0, 0);
    m.desc(0, h, 16, NEXT, 1);
    m.desc(1, DATA, 512, W | NEXT, 2);
    m.desc(2, STATUS, 1, 0, 0);
    m.post(&[0]);
    write(dir, t, "status-not-writable", &blk_seed(3, 7, &m), run);

    let mut m = Mem::new();
    m.desc(0, HDR, 16, NEXT, 40);
    m.post(&[0]);
    write(dir, t, "next-outside-table", &blk_seed(3, 7, &m), run);

    let mut m = Mem::new();
    m.put(AVAIL_RING + 2, &200u16.to_le_bytes());
    write(dir, t, "avail-idx-past-size", &blk_seed(3, 7, &m), run);
}

// ---- vsock_packet ----------------------------------------------------------------

fn header(op: u16, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: vsock_packet::GUEST_CID,
        dst_cid: VMADDR_CID_HOST,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

fn vsock(dir: &Path) {
    let t = "vsock_packet";
    let run = vsock_packet::run;
    for op in 1..=7u16 {
        write(dir, t, &format!("op-{op}"), &header(op, 0).to_bytes(), run);
    }
    let mut rw = header(VIRTIO_VSOCK_OP_RW, 5).to_bytes().to_vec();
    rw.extend_from_slice(b"hello");
    write(dir, t, "rw-hello", &rw, run);
    let mut long = header(VIRTIO_VSOCK_OP_RW, 100).to_bytes().to_vec();
    long.extend_from_slice(b"short");
    write(dir, t, "rw-truncated", &long, run);
    let mut shut = header(VIRTIO_VSOCK_OP_SHUTDOWN, 0);
    shut.flags = 3;
    write(dir, t, "shutdown-both", &shut.to_bytes(), run);
    let mut spoof = header(VIRTIO_VSOCK_OP_REQUEST, 0);
    spoof.src_cid = 2;
    write(dir, t, "spoofed-cid", &spoof.to_bytes(), run);
    write(dir, t, "connect-line", b"CONNECT 1024\n", run);
    write(dir, t, "connect-line-crlf", b"CONNECT 52\r\n", run);
}

// ---- vsock_connection ------------------------------------------------------------

fn guest_packet(o: &mut Output, op: u16, flags: u8, buf_alloc: u32, fwd_cnt: u32, data: &[u8]) {
    o.u8(op::GUEST_PACKET)
        .u8(op as u8)
        .u8(flags)
        .u32(buf_alloc)
        .u32(fwd_cnt)
        .u16(data.len() as u16)
        .bytes(data);
}

fn connection(dir: &Path) {
    let t = "vsock_connection";
    let run = vsock_connection::run;
    // Host-initiated: REQUEST out, RESPONSE in, data both ways, shutdown.
    let mut o = Output::default();
    o.u8(1).u16(4096);
    o.u8(op::RX_BUFFER).u16(4096);
    guest_packet(&mut o, 2, 0, 65536, 0, b"");
    guest_packet(&mut o, VIRTIO_VSOCK_OP_RW, 0, 65536, 0, b"guest says hi");
    o.u8(op::HOST_DATA).u16(9).bytes(b"host says");
    o.u8(op::HOST_READABLE);
    o.u8(op::RX_BUFFER).u16(4096);
    o.u8(op::RX_BUFFER).u16(4096);
    guest_packet(&mut o, VIRTIO_VSOCK_OP_SHUTDOWN, 3, 65536, 9, b"");
    o.u8(op::RX_BUFFER).u16(4096);
    write(dir, t, "host-initiated", &o.0, run);

    // Guest-initiated, slow host: data waits, credit updates, CREDIT_REQUEST.
    let mut o = Output::default();
    o.u8(0).u16(3).u32(8).u32(0);
    o.u8(op::RX_BUFFER).u16(64);
    guest_packet(&mut o, VIRTIO_VSOCK_OP_RW, 0, 8, 0, b"0123456789");
    o.u8(op::HOST_WRITABLE).u16(100);
    o.u8(op::HOST_DATA).u16(32).bytes(&[b'x'; 32]);
    o.u8(op::HOST_READABLE);
    o.u8(op::RX_BUFFER).u16(60);
    o.u8(op::RX_BUFFER).u16(60);
    guest_packet(&mut o, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 8, 8, b"");
    o.u8(op::RX_BUFFER).u16(60);
    o.u8(op::HOST_EOF);
    o.u8(op::RX_BUFFER).u16(60);
    o.u8(op::RX_BUFFER).u16(60);
    write(dir, t, "guest-initiated-slow-host", &o.0, run);

    // Broken host and RST.
    let mut o = Output::default();
    o.u8(0).u16(0).u32(4096).u32(0);
    guest_packet(&mut o, VIRTIO_VSOCK_OP_RW, 0, 4096, 0, b"stuck");
    o.u8(op::HOST_BROKEN);
    o.u8(op::HOST_WRITABLE).u16(10);
    o.u8(op::RX_BUFFER).u16(44);
    guest_packet(&mut o, VIRTIO_VSOCK_OP_RST, 0, 0, 0, b"");
    o.u8(op::RESET);
    o.u8(op::RX_BUFFER).u16(44);
    write(dir, t, "broken-host", &o.0, run);
}

// ---- agent_frame -----------------------------------------------------------------

fn agent(dir: &Path) {
    let t = "agent_frame";
    let run = agent_frame::run;
    let messages = [
        (
            "hello",
            Message::Hello(Hello {
                major: 1,
                minor: 0,
                software: "mvm-fuzz 0".to_owned(),
            }),
        ),
        ("ping", Message::Ping),
        (
            "exec",
            Message::Exec(ExecRequest {
                argv: vec!["/bin/echo".to_owned(), "hi".to_owned()],
                cwd: Some("/tmp".to_owned()),
                stdin: true,
                timeout_ms: Some(1000),
                ..ExecRequest::default()
            }),
        ),
        ("stdin", Message::Stdin(b"input\0bytes".to_vec())),
        ("stdin-close", Message::StdinClose),
        ("stdout", Message::Stdout(b"out".to_vec())),
        ("file-end", Message::FileEnd),
        ("shutdown-ack", Message::ShutdownAck),
    ];
    let mut stream = Vec::new();
    for (i, (name, m)) in messages.iter().enumerate() {
        let bytes = encode(i as u32 + 1, m).expect("encode");
        write(dir, t, name, &bytes, run);
        stream.extend_from_slice(&bytes);
    }
    write(dir, t, "stream", &stream, run);
    let raw = |name: &str, kind: u8, body: &[u8]| {
        let mut f = ((5 + body.len()) as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(&7u32.to_be_bytes());
        f.extend_from_slice(body);
        write(dir, t, name, &f, run);
    };
    raw("write-file", 0x20, br#"{"path":"/tmp/x","mode":420}"#);
    raw("read-file", 0x23, br#"{"path":"/etc/hostname"}"#);
    raw("signal", 0x16, br#"{"signal":15}"#);
    raw("exit", 0x15, br#"{"code":0,"signal":null}"#);
    raw("shutdown", 0x30, br#"{}"#);
    raw("unknown-type", 0x7f, b"");
    write(dir, t, "oversize-prefix", &[0xff, 0xff, 0xff, 0xff, 1], run);
}

// ---- plan_envelope ---------------------------------------------------------------

fn plan(dir: &Path) {
    let t = "plan_envelope";
    let run = plan_envelope::run;
    let envelope = plan_envelope::sample_envelope();
    write(dir, t, "signed-envelope", &envelope.to_json(), run);
    let payload = envelope.payload_unverified().expect("payload");
    write(dir, t, "plan", &payload, run);
    let mut bad = envelope.clone();
    bad.signatures[0].sig = bad.signatures[0].sig.replace('A', "B");
    write(dir, t, "bad-signature", &bad.to_json(), run);
    let mut other = envelope.clone();
    other.payload_type = "application/json".to_owned();
    write(dir, t, "wrong-payload-type", &other.to_json(), run);
    let mut unsigned = envelope;
    unsigned.signatures.clear();
    write(dir, t, "no-signatures", &unsigned.to_json(), run);
    let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    v["schema_version"] = 2.into();
    write(
        dir,
        t,
        "newer-schema",
        &serde_json::to_vec(&v).expect("json"),
        run,
    );
    let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    v["extra"] = true.into();
    write(
        dir,
        t,
        "unknown-field",
        &serde_json::to_vec(&v).expect("json"),
        run,
    );
}

// ---- verity_tree -----------------------------------------------------------------

fn verity(dir: &Path) {
    let t = "verity_tree";
    let run = verity_tree::run;
    let g = genuine();
    let queries = |o: &mut Output| {
        o.u8(7);
        for i in 0..8u8 {
            o.u8(i * 5)
                .u16(if i % 3 == 0 { 0x0107 } else { 0 })
                .u8(i & 1);
        }
        o.u16(700).u8(0).u16(100).u16(3000);
    };
    for (name, mode) in [("genuine-tree", 0u8), ("genuine-tree-superblock", 0x80)] {
        let mut o = Output::default();
        o.u8(mode).u8(0).u8(0);
        queries(&mut o);
        write(dir, t, name, &o.0, run);
    }
    let mut o = Output::default();
    o.u8(0).u8(2).u16(40).u8(0xff).u16(600).u8(1).u8(0);
    queries(&mut o);
    write(dir, t, "patched-tree", &o.0, run);
    let mut o = Output::default();
    o.u8(0x81).u16(g.tree_sb.len() as u16).bytes(&g.tree_sb);
    queries(&mut o);
    write(dir, t, "raw-tree-superblock", &o.0, run);
    let mut o = Output::default();
    o.u8(2)
        .u8(2)
        .u8(2)
        .u16(4)
        .bytes(b"salt")
        .bytes(&[9; 32])
        .u64(4096);
    o.u16(512).bytes(&[0; 512]).bytes(&[0; 8]);
    write(dir, t, "hostile-params", &o.0, run);
}

// ---- net_frame -------------------------------------------------------------------

fn net(dir: &Path) {
    let t = "net_frame";
    let run = net_frame::run;
    let guest4 = Ipv4Addr::new(10, 0, 2, 15);
    let guest6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("tcp-allowed", build::tcp4(Ipv4Addr::new(10, 1, 2, 3), 443)),
        ("tcp-denied", build::tcp4(Ipv4Addr::new(8, 8, 8, 8), 443)),
        (
            "udp-allowed",
            build::udp4(net_frame::ALLOW_V4_HOST, 1500, b"data"),
        ),
        (
            "dns-resolver",
            build::udp4(net_frame::RESOLVER_V4, 53, b"q"),
        ),
        (
            "dns-elsewhere",
            build::udp4(Ipv4Addr::new(10, 9, 9, 9), 53, b"q"),
        ),
        (
            "arp-gateway",
            build::eth(ETHERTYPE_ARP, &build::arp(1, guest4, net_frame::GATEWAY_V4)),
        ),
        (
            "ipv6-tcp",
            build::eth(
                ETHERTYPE_IPV6,
                &build::ipv6(
                    guest6,
                    net_frame::ALLOW_V6_NET,
                    6,
                    &build::tcp(4000, 80, &[]),
                ),
            ),
        ),
        (
            "ndp-solicit-gateway",
            build::eth(
                ETHERTYPE_IPV6,
                &build::ipv6(
                    guest6,
                    net_frame::GATEWAY_V6,
                    58,
                    &build::icmpv6_nd(135, net_frame::GATEWAY_V6),
                ),
            ),
        ),
        (
            "ipv4-fragment",
            build::eth(
                0x0800,
                &build::ipv4_with(
                    guest4,
                    Ipv4Addr::new(10, 1, 1, 1),
                    6,
                    &[],
                    0x2000,
                    &build::tcp(1, 443, &[]),
                ),
            ),
        ),
        (
            "ipv4-options",
            build::eth(
                0x0800,
                &build::ipv4_with(
                    guest4,
                    Ipv4Addr::new(10, 1, 1, 1),
                    6,
                    &[1, 1, 1, 0],
                    0,
                    &build::tcp(1, 443, &[]),
                ),
            ),
        ),
        ("vlan", build::eth(ETHERTYPE_VLAN, &[0, 1, 8, 0, 0x45])),
    ];
    let mut all = Output::default();
    for (name, f) in &frames {
        let mut o = Output::default();
        o.u16(f.len() as u16).bytes(f);
        write(dir, t, name, &o.0, run);
        all.u16(f.len() as u16).bytes(f);
    }
    write(dir, t, "all-frames", &all.0, run);
}

// ---- mmio_transport --------------------------------------------------------------

fn friendly(o: &mut Output, reg: u64, value: u32) {
    let index = FRIENDLY_REGISTERS
        .iter()
        .position(|r| *r == reg)
        .expect("friendly register");
    o.u8(3).u8(index as u8).u32(value);
}

fn mmio(dir: &Path) {
    use mvm_devices::virtio::mmio::*;
    let t = "mmio_transport";
    let run = mmio_transport::run;
    let mut o = Output::default();
    // Identify, negotiate VERSION_1 + EVENT_IDX... as a Linux driver does.
    o.u8(0).u16(REG_MAGIC_VALUE as u16).u8(2);
    friendly(&mut o, REG_STATUS, 1);
    friendly(&mut o, REG_STATUS, 3);
    friendly(&mut o, REG_DEVICE_FEATURES_SEL, 1);
    o.u8(0).u16(REG_DEVICE_FEATURES as u16).u8(2);
    friendly(&mut o, REG_DRIVER_FEATURES_SEL, 1);
    friendly(&mut o, REG_DRIVER_FEATURES, 1);
    friendly(&mut o, REG_DRIVER_FEATURES_SEL, 0);
    friendly(&mut o, REG_DRIVER_FEATURES, 0x0000_0200);
    friendly(&mut o, REG_STATUS, 11);
    friendly(&mut o, REG_QUEUE_SEL, 0);
    friendly(&mut o, REG_QUEUE_NUM, 16);
    friendly(&mut o, REG_QUEUE_DESC_LOW, 0x0000);
    friendly(&mut o, REG_QUEUE_DRIVER_LOW, 0x1000);
    friendly(&mut o, REG_QUEUE_DEVICE_LOW, 0x2000);
    friendly(&mut o, REG_QUEUE_READY, 1);
    friendly(&mut o, REG_STATUS, 15);
    // A flush request: header at 0x3000, status at 0x3100.
    o.u8(2).u16(0x3000).u64(4);
    o.u8(2).u16(0x0000).u64(0x3000);
    o.u8(2).u16(0x0008).u64(16 | (1 << 32) | (1 << 48));
    o.u8(2).u16(0x0010).u64(0x3100);
    o.u8(2).u16(0x0018).u64(1 | (2 << 32));
    o.u8(2).u16(0x1000).u64(1 << 16);
    friendly(&mut o, REG_QUEUE_NOTIFY, 0);
    o.u8(0).u16(REG_INTERRUPT_STATUS as u16).u8(2);
    friendly(&mut o, REG_INTERRUPT_ACK, 1);
    o.u8(0).u16(0x100).u8(3);
    friendly(&mut o, REG_STATUS, 0);
    o.u8(0).u16(REG_STATUS as u16).u8(2);
    write(dir, t, "driver-bring-up", &o.0, run);

    let mut o = Output::default();
    friendly(&mut o, REG_QUEUE_NOTIFY, 0);
    o.u8(1).u16(0x0ff).u8(2).u32(7);
    o.u8(1).u16(REG_STATUS as u16).u8(2).u32(0x0f);
    o.u8(1).u16(0x104).u8(1).u32(1);
    write(dir, t, "hostile-registers", &o.0, run);
}

// ---- egress_head -----------------------------------------------------------------

fn egress(dir: &Path) {
    use mvm_fuzz::egress_head::{HOST, OTHER_HOST, PLACEHOLDERS};
    let t = "egress_head";
    let run = egress_head::run;
    let [token, upload] = PLACEHOLDERS;
    let seeds: [(&str, u8, String); 7] = [
        (
            "bound",
            1,
            format!("GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\nAccept: */*\r\n\r\n"),
        ),
        (
            "two-secrets-wrong-host",
            2,
            format!("POST /up HTTP/1.1\r\nHost: {OTHER_HOST}:443\r\nX-Key: {upload}\r\nX-Other: {token}\r\nContent-Length: 4\r\n\r\nbody"),
        ),
        (
            "query",
            0,
            format!("GET /x?k={token} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        ),
        (
            "forged-host",
            1,
            format!("GET / HTTP/1.1\r\nHost: {OTHER_HOST}\r\nAuthorization: {upload}\r\n\r\n"),
        ),
        (
            "connection-headers",
            4,
            format!("GET / HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive, {token}\r\nKeep-Alive: 5\r\nAccept-Encoding: gzip\r\nX: {token}{token}\r\n\r\n"),
        ),
        (
            "other-port",
            9,
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {token}\r\n\r\n"),
        ),
        (
            "method",
            1,
            format!("{token} / HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        ),
    ];
    for (name, mode, head) in seeds {
        for piece in [7u8, 255] {
            let mut data = vec![mode, piece];
            data.extend_from_slice(head.as_bytes());
            write(dir, t, &format!("{name}-{piece}"), &data, run);
        }
    }
}
