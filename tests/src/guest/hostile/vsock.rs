//! virtio-vsock scenarios: packets the Linux driver would never send, credit abuse, and
//! broken RX/TX rings. The host side (`cases/hostile.rs`) listens on [`PORT_DATA`] (sends
//! [`HOST_BYTES`] of a pattern on every connection), [`PORT_SINK`] (never reads) and
//! [`PORT_RECOVER`] (answers a line after the driver is bound again).

use std::time::{Duration, Instant};

use super::dma::Arena;
use super::mmio::{self, reg, Slot, REACT};
use super::ring::{Part, Vq};
use super::*;

/// Host port whose listener sends [`HOST_BYTES`] to each connection.
pub const PORT_DATA: u32 = 7001;
/// Host port whose listener accepts and never reads.
pub const PORT_SINK: u32 = 7002;
/// Host port the guest reaches through its own driver after the scenarios.
pub const PORT_RECOVER: u32 = 7003;
/// A host port with no listener.
pub const PORT_NONE: u32 = 7999;
/// Bytes the [`PORT_DATA`] listener sends.
pub const HOST_BYTES: usize = 3000;
/// Pattern seed of those bytes.
pub const HOST_SEED: u8 = 0x41;
/// The line the guest sends on [`PORT_RECOVER`].
pub const RECOVER_HELLO: &str = "hostile hello\n";
/// The host's answer.
pub const RECOVER_ANSWER: &str = "hostile ok\n";

const HDR: usize = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const TYPE_STREAM: u16 = 1;
const HOST_CID: u64 = 2;

const RX: u32 = 0;
const TX: u32 = 1;
const EVT: u32 = 2;
const QSIZE: u16 = 16;
/// Pages: rings of RX (0-2), TX (3-5), event (6-8); RX buffers (9, 10); TX data (11, 12);
/// event buffer (13).
const P_RX_BUF: usize = 9;
const P_TX_BUF: usize = 11;
const P_EVT_BUF: usize = 13;
const PAGES: usize = 14;
/// RX buffer size: 4 per page.
const RX_BUF: usize = 1024;
const RX_BUFS: u16 = 8;

/// A vsock header (host order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Type.
    pub type_: u16,
    /// Op.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Receive buffer.
    pub buf_alloc: u32,
    /// Forwarded count.
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Little-endian wire form.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HDR);
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.type_.to_le_bytes());
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.buf_alloc.to_le_bytes());
        b.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the wire form.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
        Some(Self {
            src_cid: u64_at(0)?,
            dst_cid: u64_at(8)?,
            src_port: u32_at(16)?,
            dst_port: u32_at(20)?,
            len: u32_at(24)?,
            type_: u16_at(28)?,
            op: u16_at(30)?,
            flags: u32_at(32)?,
            buf_alloc: u32_at(36)?,
            fwd_cnt: u32_at(40)?,
        })
    }
}

/// The attacked vsock device and the bystander disk.
#[derive(Debug)]
pub struct VsockBench {
    arena: Arena,
    slot: Slot,
    cid: u64,
    rx: Option<Vq>,
    tx: Option<Vq>,
    bystander: String,
    next_port: u32,
}

impl VsockBench {
    /// Finds the vsock device and the bystander disk, unbinds the vsock driver.
    pub fn open(cmdline: &str) -> Result<Self, String> {
        let found = discover(cmdline);
        let vsock = found
            .iter()
            .find(|f| f.device_type == 19)
            .ok_or_else(|| format!("no vsock device among {found:?}"))?
            .clone();
        let by = disk_by_id(&found, BYSTANDER_ID)?;
        let bystander = by.disk.as_ref().map(|d| d.0.clone()).unwrap_or_default();
        mmio::unbind(&vsock.platform)?;
        let slot = Slot::map(vsock.base, &vsock.platform)?;
        let cid = slot.r64(reg::CONFIG);
        Ok(Self {
            arena: Arena::new(PAGES)?,
            slot,
            cid,
            rx: None,
            tx: None,
            bystander,
            next_port: 40_000,
        })
    }

    /// Before a scenario: reset, canaries, then a live device with RX buffers posted.
    pub fn prepare(&mut self) -> Result<(), String> {
        self.slot.reset()?;
        self.arena.reset();
        self.next_port += 1;
        self.live(RX_BUFS, 0)
    }

    /// Brings the device up with `n` RX buffers of [`RX_BUF`] bytes, the first `small`
    /// of them only 8 bytes long.
    fn live(&mut self, n: u16, small: u16) -> Result<(), String> {
        self.slot.negotiate(0)?;
        let mut rx = Vq::new(&mut self.arena, QSIZE, 0, 1, 2)?;
        let tx = Vq::new(&mut self.arena, QSIZE, 3, 4, 5)?;
        let mut evt = Vq::new(&mut self.arena, QSIZE, 6, 7, 8)?;
        self.slot.add_queue(RX, &rx)?;
        self.slot.add_queue(TX, &tx)?;
        self.slot.add_queue(EVT, &evt)?;
        for k in 0..usize::from(n) {
            let page = self.arena.page(P_RX_BUF + k / 4)?;
            let off = (k % 4) * RX_BUF;
            let len = if k < usize::from(small) { 8 } else { RX_BUF };
            page.allow(off, len);
            let addr = page.phys(off);
            let head = rx.chain(
                &mut self.arena,
                &[Part::write(addr, u32::try_from(len).unwrap_or(0))],
            )?;
            rx.stage(&mut self.arena, head)?;
        }
        rx.publish_idx(&mut self.arena, rx.avail_idx)?;
        let ev_page = self.arena.page(P_EVT_BUF)?;
        ev_page.allow(0, 8);
        let ev_addr = ev_page.phys(0);
        let head = evt.chain(&mut self.arena, &[Part::write(ev_addr, 8)])?;
        evt.offer(&mut self.arena, head)?;
        self.slot.driver_ok()?;
        self.slot.notify(RX);
        self.slot.notify(EVT);
        self.rx = Some(rx);
        self.tx = Some(tx);
        Ok(())
    }

    /// After scenario `n`: canaries intact, the bystander reads its pattern.
    pub fn after(&mut self, n: usize) -> Result<(), String> {
        self.arena.check()?;
        let offset = (n as u64 * 4096) % DISK_BYTES;
        direct_read_check(&self.bystander, offset, BYSTANDER_SEED)
            .map_err(|e| format!("bystander disk: {e}"))
    }

    /// The vsock driver is bound again and reaches the host through it.
    pub fn recover(&mut self) -> Result<String, String> {
        self.slot.reset()?;
        mmio::bind(&self.slot.platform)?;
        let deadline = Instant::now() + REACT;
        loop {
            match talk_to_host() {
                Ok(()) => return Ok(format!("vsock driver reached host port {PORT_RECOVER}")),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A header from this guest to the host with the current source port.
    fn hdr(&self, op: u16, dst_port: u32) -> Hdr {
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: self.next_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Sends `bytes` as one TX chain of `parts` lengths (0 = the rest) at TX page offset 0.
    fn send_raw(&mut self, bytes: &[u8], split: &[u32]) -> Result<(), String> {
        let page = self.arena.page(P_TX_BUF)?;
        page.write(0, bytes);
        let base = page.phys(0);
        let mut parts = Vec::new();
        let mut at = 0u64;
        let total = u64::try_from(bytes.len()).map_err(|e| e.to_string())?;
        for len in split {
            parts.push(Part::read(base + at, *len));
            at += u64::from(*len);
        }
        if at < total || parts.is_empty() {
            parts.push(Part::read(
                base + at,
                u32::try_from(total - at).unwrap_or(0),
            ));
        }
        let mut tx = self.tx.take().ok_or("no TX queue")?;
        let result = (|| {
            let head = tx.chain(&mut self.arena, &parts)?;
            tx.offer(&mut self.arena, head)?;
            self.slot.notify(TX);
            tx.wait_used(&self.arena, REACT)
                .map_err(|e| format!("TX: {e} (status {:#x})", self.slot.status()))
        })();
        self.tx = Some(tx);
        result.map(|_| ())
    }

    fn send(&mut self, h: &Hdr, data: &[u8]) -> Result<(), String> {
        let mut bytes = h.bytes();
        bytes.extend_from_slice(data);
        self.send_raw(&bytes, &[])
    }

    /// The next packet on RX within `wait`, its buffer given back to the device.
    fn recv(&mut self, wait: Duration) -> Result<Option<(Hdr, Vec<u8>)>, String> {
        let mut rx = self.rx.take().ok_or("no RX queue")?;
        let result = (|| {
            let (id, len) = match rx.wait_used(&self.arena, wait) {
                Ok(e) => e,
                Err(_) => return Ok(None),
            };
            let k = usize::try_from(id).map_err(|e| e.to_string())?;
            let page = self.arena.get(P_RX_BUF + k / 4)?;
            let bytes = page.read((k % 4) * RX_BUF, usize::try_from(len).unwrap_or(0));
            rx.offer(
                &mut self.arena,
                u16::try_from(id).map_err(|e| e.to_string())?,
            )?;
            self.slot.notify(RX);
            if len == 0 {
                return Ok(Some((Hdr::default(), Vec::new())));
            }
            let h = Hdr::parse(&bytes).ok_or_else(|| format!("RX packet of {len} bytes"))?;
            Ok(Some((h, bytes.get(HDR..).unwrap_or_default().to_vec())))
        })();
        self.rx = Some(rx);
        result
    }

    /// Fails unless an RST for our current port arrives.
    fn expect_rst(&mut self, what: &str) -> Result<(), String> {
        match self.recv(REACT)? {
            Some((h, _))
                if h.op == OP_RST && h.dst_port == self.next_port && h.dst_cid == self.cid =>
            {
                Ok(())
            }
            Some((h, _)) => Err(format!("{what}: expected RST, got {h:?}")),
            None => Err(format!("{what}: no RST (status {:#x})", self.slot.status())),
        }
    }

    /// Fails if anything arrives within a short wait.
    fn expect_silence(&mut self, what: &str) -> Result<(), String> {
        match self.recv(Duration::from_millis(300))? {
            None => self.slot.expect_healthy(what),
            Some((h, _)) => Err(format!("{what}: unexpected packet {h:?}")),
        }
    }
}

fn talk_to_host() -> Result<(), String> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::io::{Read, Write};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e}"))?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(2, PORT_RECOVER),
    )
    .map_err(|e| format!("connect to host port {PORT_RECOVER}: {e}"))?;
    let mut stream = std::fs::File::from(fd);
    stream
        .write_all(RECOVER_HELLO.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = vec![0u8; RECOVER_ANSWER.len()];
    stream
        .read_exact(&mut answer)
        .map_err(|e| format!("receive: {e}"))?;
    if answer == RECOVER_ANSWER.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "host answered {:?}",
            String::from_utf8_lossy(&answer)
        ))
    }
}

/// The vsock scenarios.
pub const SCENARIOS: &[Scenario<VsockBench>] = &[
    ("v-header-too-short", v_header_too_short),
    ("v-len-past-descriptor", v_len_past_descriptor),
    ("v-wrong-src-cid", v_wrong_src_cid),
    ("v-wrong-dst-cid", v_wrong_dst_cid),
    ("v-unknown-op-and-type", v_unknown_op),
    ("v-request-no-listener", v_request_no_listener),
    ("v-rst-unknown-connection", v_rst_unknown_connection),
    ("v-rw-unknown-connection", v_rw_unknown_connection),
    ("v-buf-alloc-zero", v_buf_alloc_zero),
    ("v-buf-alloc-max", v_buf_alloc_max),
    ("v-flood-without-credit", v_flood_without_credit),
    ("v-rx-buffer-too-small", v_rx_buffer_too_small),
    ("v-tx-avail-idx-jump", v_tx_avail_idx_jump),
    ("v-rx-avail-idx-jump", v_rx_avail_idx_jump),
];

fn v_header_too_short(b: &mut VsockBench) -> Result<(), String> {
    let h = b.hdr(OP_REQUEST, PORT_DATA).bytes();
    b.send_raw(h.get(..20).unwrap_or_default(), &[])?;
    b.expect_silence("20-byte packet")
}

fn v_len_past_descriptor(b: &mut VsockBench) -> Result<(), String> {
    let mut h = b.hdr(OP_RW, PORT_DATA);
    h.len = 1000;
    b.send(&h, &[7u8; 10])?;
    b.expect_silence("len 1000 with 10 data bytes")?;
    h.len = u32::MAX;
    b.send(&h, &[7u8; 10])?;
    b.expect_silence("len 0xffffffff")
}

fn v_wrong_src_cid(b: &mut VsockBench) -> Result<(), String> {
    for cid in [99, 2, 0, u64::MAX] {
        let mut h = b.hdr(OP_REQUEST, PORT_DATA);
        h.src_cid = cid;
        b.send(&h, &[])?;
        b.expect_silence(&format!("REQUEST from spoofed cid {cid}"))?;
    }
    Ok(())
}

fn v_wrong_dst_cid(b: &mut VsockBench) -> Result<(), String> {
    for cid in [5, 0, 1, u64::MAX] {
        let mut h = b.hdr(OP_REQUEST, PORT_DATA);
        h.dst_cid = cid;
        b.send(&h, &[])?;
        b.expect_rst(&format!("REQUEST to cid {cid}"))?;
    }
    Ok(())
}

fn v_unknown_op(b: &mut VsockBench) -> Result<(), String> {
    let mut h = b.hdr(99, PORT_DATA);
    b.send(&h, &[])?;
    b.expect_rst("op 99")?;
    h.op = 0;
    b.send(&h, &[])?;
    b.expect_rst("op 0 (INVALID)")?;
    h.op = OP_REQUEST;
    h.type_ = 2;
    b.send(&h, &[])?;
    b.expect_rst("SEQPACKET type")?;
    h.type_ = TYPE_STREAM;
    h.len = 4;
    b.send(&h, &[1, 2, 3, 4])?;
    b.expect_rst("REQUEST carrying data")
}

fn v_request_no_listener(b: &mut VsockBench) -> Result<(), String> {
    let h = b.hdr(OP_REQUEST, PORT_NONE);
    b.send(&h, &[])?;
    b.expect_rst("REQUEST to a port nobody listens on")
}

fn v_rst_unknown_connection(b: &mut VsockBench) -> Result<(), String> {
    let h = b.hdr(OP_RST, PORT_DATA);
    b.send(&h, &[])?;
    b.expect_silence("RST for an unknown connection")
}

fn v_rw_unknown_connection(b: &mut VsockBench) -> Result<(), String> {
    let mut h = b.hdr(OP_RW, PORT_DATA);
    h.len = 5;
    b.send(&h, b"hello")?;
    b.expect_rst("RW for an unknown connection")
}

/// Connects to the data port announcing `buf_alloc`; returns once RESPONSE arrived.
fn connect_data(b: &mut VsockBench, buf_alloc: u32, fwd_cnt: u32) -> Result<(), String> {
    let mut h = b.hdr(OP_REQUEST, PORT_DATA);
    h.buf_alloc = buf_alloc;
    h.fwd_cnt = fwd_cnt;
    b.send(&h, &[])?;
    match b.recv(REACT)? {
        Some((r, _)) if r.op == OP_RESPONSE && r.dst_port == b.next_port => Ok(()),
        other => Err(format!(
            "REQUEST to the data port: expected RESPONSE, got {other:?}"
        )),
    }
}

/// Receives RW packets until `want` bytes arrived; control packets are skipped.
fn collect(b: &mut VsockBench, want: usize) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    while got.len() < want {
        match b.recv(REACT)? {
            Some((h, data)) if h.op == OP_RW => got.extend_from_slice(&data),
            Some((h, _)) if h.op == OP_CREDIT_REQUEST || h.op == OP_CREDIT_UPDATE => {}
            other => return Err(format!("after {} bytes: {other:?}", got.len())),
        }
    }
    Ok(got)
}

/// buf_alloc 0: the device must send no data until the guest grants credit, then at most
/// what it granted.
fn v_buf_alloc_zero(b: &mut VsockBench) -> Result<(), String> {
    connect_data(b, 0, 0)?;
    // The host writes at once; with no credit nothing may come but a CREDIT_REQUEST.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        match b.recv(Duration::from_millis(100))? {
            None => {}
            Some((h, _)) if h.op == OP_CREDIT_REQUEST => {}
            Some((h, _)) => return Err(format!("with no credit the device sent {h:?}")),
        }
    }
    let mut h = b.hdr(OP_CREDIT_UPDATE, PORT_DATA);
    h.buf_alloc = 1000;
    b.send(&h, &[])?;
    let got = collect(b, 1000)?;
    if got.len() != 1000 {
        return Err(format!("{} bytes for 1000 of credit", got.len()));
    }
    if let Some(bad) =
        (0..1000).find(|i| got.get(*i) != Some(&crate::guest::vsock::pattern(HOST_SEED, *i)))
    {
        return Err(format!("byte {bad} of the host stream is wrong"));
    }
    match b.recv(Duration::from_millis(300))? {
        Some((h, _)) if h.op == OP_RW => Err(format!("data past the credit: {h:?}")),
        _ => Ok(()),
    }
}

/// buf_alloc u32::MAX with a wrapped fwd_cnt: the whole host stream arrives intact.
fn v_buf_alloc_max(b: &mut VsockBench) -> Result<(), String> {
    connect_data(b, u32::MAX, u32::MAX - 5)?;
    let got = collect(b, HOST_BYTES)?;
    if got.len() != HOST_BYTES {
        return Err(format!("{} bytes, expected {HOST_BYTES}", got.len()));
    }
    if let Some(bad) =
        (0..HOST_BYTES).find(|i| got.get(*i) != Some(&crate::guest::vsock::pattern(HOST_SEED, *i)))
    {
        return Err(format!("byte {bad} of the host stream is wrong"));
    }
    let h = b.hdr(OP_RST, PORT_DATA);
    b.send(&h, &[])
}

/// RW far past the device's credit to a host reader that never reads: the device resets
/// the connection instead of buffering.
fn v_flood_without_credit(b: &mut VsockBench) -> Result<(), String> {
    let h = b.hdr(OP_REQUEST, PORT_SINK);
    b.send(&h, &[])?;
    match b.recv(REACT)? {
        Some((r, _)) if r.op == OP_RESPONSE => {}
        other => return Err(format!("REQUEST to the sink port: {other:?}")),
    }
    let mut rw = b.hdr(OP_RW, PORT_SINK);
    rw.len = 4000;
    let data = vec![0xabu8; 4000];
    for n in 0..1024 {
        b.send(&rw, &data)?;
        match b.recv(Duration::from_millis(0))? {
            Some((r, _)) if r.op == OP_RST => return b.slot.expect_healthy("flood"),
            Some((r, _)) if r.op == OP_CREDIT_UPDATE || r.op == OP_CREDIT_REQUEST => {}
            Some(other) => return Err(format!("packet {n} of the flood: {other:?}")),
            None => {}
        }
    }
    Err("4 MB past a 256 KiB credit and no RST".into())
}

/// The first RX buffer is 8 bytes: the device returns it empty and puts the RST in the
/// next one, writing nothing past the 8 bytes.
fn v_rx_buffer_too_small(b: &mut VsockBench) -> Result<(), String> {
    b.slot.reset()?;
    b.arena.reset();
    b.live(RX_BUFS, 1)?;
    let h = b.hdr(OP_REQUEST, PORT_NONE);
    b.send(&h, &[])?;
    match b.recv(REACT)? {
        Some((r, data)) if r == Hdr::default() && data.is_empty() => {}
        other => {
            return Err(format!(
                "8-byte buffer: expected it back empty, got {other:?}"
            ))
        }
    }
    b.expect_rst("RST in the buffer after the small one")?;
    let small = b.arena.get(P_RX_BUF)?.read(0, 8);
    if small.iter().any(|x| *x != dma::CANARY) {
        return Err(format!("the 8-byte buffer was written: {small:?}"));
    }
    Ok(())
}

/// The TX available index 1000 ahead: NEEDS_RESET, and the device thread stays
/// responsive (it serves the next reset).
fn v_tx_avail_idx_jump(b: &mut VsockBench) -> Result<(), String> {
    let mut tx = b.tx.take().ok_or("no TX queue")?;
    let h = b.hdr(OP_REQUEST, PORT_NONE).bytes();
    let page = b.arena.page(P_TX_BUF)?;
    page.write(0, &h);
    let addr = page.phys(0);
    let head = tx.chain(&mut b.arena, &[Part::read(addr, 44)])?;
    tx.stage(&mut b.arena, head)?;
    tx.publish_idx(&mut b.arena, 1000)?;
    b.tx = Some(tx);
    b.slot.notify(TX);
    b.slot.expect_needs_reset("TX available index 1000")?;
    b.prepare()?;
    v_request_no_listener(b)
}

/// The RX available index 1000 ahead while the device has an RST to deliver.
fn v_rx_avail_idx_jump(b: &mut VsockBench) -> Result<(), String> {
    let rx = b.rx.take().ok_or("no RX queue")?;
    rx.publish_idx(&mut b.arena, rx.avail_idx.wrapping_add(1000))?;
    b.rx = Some(rx);
    let h = b.hdr(OP_REQUEST, PORT_NONE);
    b.send(&h, &[])?;
    b.slot.expect_needs_reset("RX available index 1000 ahead")?;
    b.prepare()?;
    v_request_no_listener(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_the_virtio_layout() {
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 40_001,
            dst_port: PORT_DATA,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 1,
            buf_alloc: u32::MAX,
            fwd_cnt: 9,
        };
        let b = h.bytes();
        assert_eq!(b.len(), HDR);
        assert_eq!(b.get(24..28), Some(&7u32.to_le_bytes()[..]));
        assert_eq!(b.get(30..32), Some(&OP_RW.to_le_bytes()[..]));
        assert_eq!(Hdr::parse(&b), Some(h));
        assert_eq!(Hdr::parse(b.get(..43).unwrap()), None);
    }
}
