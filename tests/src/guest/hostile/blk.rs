//! Descriptor-chain and virtio-blk request scenarios, and the bench they (and the
//! transport scenarios) run on: two attacked disks (read-write and read-only) driven by
//! hand, and a bystander disk left to the Linux driver.

use std::time::Duration;

use super::dma::{Arena, PAGE};
use super::mmio::{self, reg, Slot, REACT};
use super::ring::{Part, Vq, F_INDIRECT, F_NEXT, F_WRITE};
use super::*;
use crate::guest::blk::{fill_pattern, first_mismatch};

/// Request types (linux/virtio_blk.h).
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get id.
pub const T_GET_ID: u32 = 8;
/// Discard (not offered by the device).
pub const T_DISCARD: u32 = 11;
/// Write zeroes (not offered by the device).
pub const T_WRITE_ZEROES: u32 = 13;
/// Status: ok.
pub const S_OK: u8 = 0;
/// Status: I/O error (also every refused request).
pub const S_IOERR: u8 = 1;
/// Status: unsupported.
pub const S_UNSUPP: u8 = 2;

/// Sectors of each hostile disk.
pub const CAPACITY: u64 = DISK_BYTES / 512;

/// Feature word 0 the bench accepts: SIZE_MAX, SEG_MAX, RO, FLUSH (masked by the offer).
const FEATURES: u32 = (1 << 1) | (1 << 2) | (1 << 5) | (1 << 9);

/// Arena pages: the ring, then scratch for headers and status bytes, then data.
pub const P_DESC: usize = 0;
/// Available ring page.
pub const P_AVAIL: usize = 1;
/// Used ring page.
pub const P_USED: usize = 2;
/// Headers (offset 0..) and status bytes (offset [`STATUS_OFF`]..).
pub const P_META: usize = 3;
/// First data page.
pub const P_DATA: usize = 4;
/// Data pages.
pub const DATA_PAGES: usize = 4;
/// Offset of the first status byte in [`P_META`].
pub const STATUS_OFF: usize = 2048;

/// The attacked disks and the bystander.
#[derive(Debug)]
pub struct BlkBench {
    /// Rings and buffers.
    pub arena: Arena,
    /// The read-write disk's slot.
    pub rw: Slot,
    /// The read-only disk's slot.
    pub ro: Slot,
    /// One past the last byte of guest RAM.
    pub ram_end: u64,
    bystander: String,
    cmdline: String,
}

impl BlkBench {
    /// Finds the three disks, unbinds the two attacked ones, maps their windows.
    pub fn open(cmdline: &str) -> Result<Self, String> {
        let found = discover(cmdline);
        let rw = disk_by_id(&found, RW_ID)?.clone();
        let ro = disk_by_id(&found, RO_ID)?.clone();
        let by = disk_by_id(&found, BYSTANDER_ID)?.clone();
        let name = |f: &Found| f.disk.as_ref().map(|d| d.0.clone()).unwrap_or_default();
        mmio::unbind(&rw.platform)?;
        mmio::unbind(&ro.platform)?;
        Ok(Self {
            arena: Arena::new(P_DATA + DATA_PAGES)?,
            rw: Slot::map(rw.base, &rw.platform)?,
            ro: Slot::map(ro.base, &ro.platform)?,
            ram_end: ram_end()?,
            bystander: name(&by),
            cmdline: cmdline.to_owned(),
        })
    }

    /// Before a scenario: both attacked devices reset, every page canary-filled.
    pub fn prepare(&mut self) -> Result<(), String> {
        self.rw.reset()?;
        self.ro.reset()?;
        self.arena.reset();
        Ok(())
    }

    /// After scenario `n`: canaries intact, the bystander reads its pattern.
    pub fn after(&mut self, n: usize) -> Result<(), String> {
        self.arena.check()?;
        let offset = (n as u64 * 4096) % DISK_BYTES;
        direct_read_check(&self.bystander, offset, BYSTANDER_SEED)
            .map_err(|e| format!("bystander disk: {e}"))
    }

    /// After every scenario: the read-write disk goes back to its Linux driver, which
    /// must read the sector the valid write left.
    pub fn recover(&mut self) -> Result<String, String> {
        self.rw.reset()?;
        mmio::bind(&self.rw.platform)?;
        let offset = VALID_SECTOR * 512;
        let deadline = std::time::Instant::now() + REACT;
        loop {
            let found = discover(&self.cmdline);
            let attempt = disk_by_id(&found, RW_ID).and_then(|f| {
                let name = f.disk.as_ref().map(|d| d.0.clone()).unwrap_or_default();
                direct_read_check_valid(&name, offset).map(|()| name)
            });
            match attempt {
                Ok(name) => {
                    return Ok(format!(
                        "{RW_ID} is {name} again and reads sector {VALID_SECTOR} as written"
                    ))
                }
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Negotiates, sets up queue 0 with `size` entries and DRIVER_OK on `slot`.
    pub fn live(&mut self, ro: bool, size: u16) -> Result<Vq, String> {
        let slot = if ro { &self.ro } else { &self.rw };
        slot.negotiate(FEATURES)?;
        let vq = Vq::new(&mut self.arena, size, P_DESC, P_AVAIL, P_USED)?;
        slot.add_queue(0, &vq)?;
        slot.driver_ok()?;
        Ok(vq)
    }

    /// Writes a request header at `P_META` offset `off`; returns its address.
    pub fn header(&mut self, off: usize, kind: u32, sector: u64) -> Result<u64, String> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let page = self.arena.page(P_META)?;
        page.write(off, &h);
        Ok(page.phys(off))
    }

    /// Status byte `k` (device-writable); returns its address.
    pub fn status_byte(&mut self, k: usize) -> Result<u64, String> {
        let page = self.arena.page(P_META)?;
        page.write(STATUS_OFF + k, &[0xee]);
        page.allow(STATUS_OFF + k, 1);
        Ok(page.phys(STATUS_OFF + k))
    }

    /// What the device left in status byte `k`.
    pub fn status_of(&self, k: usize) -> Result<u8, String> {
        Ok(*self
            .arena
            .get(P_META)?
            .read(STATUS_OFF + k, 1)
            .first()
            .unwrap_or(&0xee))
    }

    /// Address of data page `i` at `off`; `writable` lets the device write `len` there.
    pub fn data(
        &mut self,
        i: usize,
        off: usize,
        len: usize,
        writable: bool,
    ) -> Result<u64, String> {
        let page = self.arena.page(P_DATA + i)?;
        if writable {
            page.allow(off, len);
        }
        Ok(page.phys(off))
    }

    /// Offers the chain `parts`, kicks queue 0 of `slot`, waits for it to be used; returns
    /// the used length.
    pub fn submit(&mut self, ro: bool, vq: &mut Vq, parts: &[Part]) -> Result<u32, String> {
        let head = vq.chain(&mut self.arena, parts)?;
        vq.offer(&mut self.arena, head)?;
        let slot = if ro { &self.ro } else { &self.rw };
        slot.notify(0);
        let (id, len) = vq
            .wait_used(&self.arena, REACT)
            .map_err(|e| format!("{e} (status {:#x})", slot.status()))?;
        if id != u32::from(head) {
            return Err(format!("used id {id}, expected head {head}"));
        }
        Ok(len)
    }

    /// A one-segment request of `kind` at `sector` with a `len`-byte buffer in data page 0
    /// (device-writable for reads and GET_ID); returns (status byte, used len).
    pub fn simple(
        &mut self,
        ro: bool,
        vq: &mut Vq,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> Result<(u8, u32), String> {
        let writes = kind == T_IN || kind == T_GET_ID;
        let hdr = self.header(0, kind, sector)?;
        let st = self.status_byte(0)?;
        let data = self.data(0, 0, usize::try_from(len).unwrap_or(0), writes)?;
        let mut parts = vec![Part::read(hdr, 16)];
        if len > 0 {
            parts.push(Part {
                addr: data,
                len,
                write: writes,
            });
        }
        parts.push(Part::write(st, 1));
        let used = self.submit(ro, vq, &parts)?;
        Ok((self.status_of(0)?, used))
    }

    /// The data page 0 bytes `0..len`.
    pub fn data_bytes(&self, len: usize) -> Result<Vec<u8>, String> {
        Ok(self.arena.get(P_DATA)?.read(0, len))
    }

    fn slot(&self, ro: bool) -> &Slot {
        if ro {
            &self.ro
        } else {
            &self.rw
        }
    }
}

fn direct_read_check_valid(name: &str, offset: u64) -> Result<(), String> {
    const LEN: usize = 4096;
    use std::io::{Read, Seek};
    let mut raw = vec![0u8; 2 * LEN];
    let at = raw.as_ptr().align_offset(LEN);
    let buf = raw.get_mut(at..at + LEN).ok_or("no aligned buffer")?;
    let path = format!("/dev/{name}");
    let mut disk = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| format!("open {path}: {e}"))?;
    disk.seek(SeekFrom::Start(0))
        .map_err(|e| format!("seek {path}: {e}"))?;
    disk.read_exact(buf)
        .map_err(|e| format!("read {path}: {e}"))?;
    let sector = usize::try_from(offset).unwrap_or(0);
    let got = buf.get(sector..sector + 512).ok_or("short read")?;
    match first_mismatch(VALID_SEED, offset, got) {
        None => Ok(()),
        Some(bad) => Err(format!(
            "{path}: byte {bad} is not what the valid write left"
        )),
    }
}

fn expect_status(what: &str, got: (u8, u32), status: u8, used: u32) -> Result<(), String> {
    if got == (status, used) {
        Ok(())
    } else {
        Err(format!(
            "{what}: status {} used len {}, expected status {status} used len {used}",
            got.0, got.1
        ))
    }
}

/// The queue and blk scenarios.
pub const SCENARIOS: &[Scenario<BlkBench>] = &[
    ("q-descriptor-loop", q_descriptor_loop),
    ("q-chain-longer-than-queue", q_chain_longer_than_queue),
    ("q-next-out-of-range", q_next_out_of_range),
    ("q-len-4gib", q_len_4gib),
    ("q-buffer-outside-ram", q_buffer_outside_ram),
    ("q-avail-idx-jump", q_avail_idx_jump),
    ("q-head-out-of-range", q_head_out_of_range),
    ("q-index-wrap", q_index_wrap),
    ("q-indirect-descriptors", q_indirect_descriptors),
    ("b-valid-write-read", b_valid_write_read),
    ("b-sector-past-end", b_sector_past_end),
    ("b-sector-overflow", b_sector_overflow),
    ("b-write-read-only-disk", b_write_read_only_disk),
    ("b-status-read-only-desc", b_status_read_only_desc),
    ("b-no-status-desc", b_no_status_desc),
    ("b-header-split", b_header_split),
    ("b-unknown-type", b_unknown_type),
    ("b-get-id-short-buffer", b_get_id_short_buffer),
    ("b-discard-flush", b_discard_flush),
    ("b-wrong-direction", b_wrong_direction),
    ("b-partial-sector", b_partial_sector),
    ("b-too-many-segments", b_too_many_segments),
];

/// Two descriptors pointing at each other: NEEDS_RESET, nothing written.
fn q_descriptor_loop(b: &mut BlkBench) -> Result<(), String> {
    let vq = b.live(false, 16)?;
    let hdr = b.header(0, T_OUT, 0)?;
    let data = b.data(0, 0, 0, false)?;
    vq.set_desc(&mut b.arena, 0, hdr, 16, F_NEXT, 1)?;
    vq.set_desc(&mut b.arena, 1, data, 512, F_NEXT, 0)?;
    let mut vq = vq;
    vq.offer(&mut b.arena, 0)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("descriptor loop")
}

/// Every descriptor of the table in one ring (16 > the chain limit of the queue).
fn q_chain_longer_than_queue(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    vq.set_desc(&mut b.arena, 0, hdr, 16, F_NEXT, 1)?;
    for i in 1..16u16 {
        let data = b.data(0, 0, 512, true)?;
        vq.set_desc(&mut b.arena, i, data, 512, F_NEXT | F_WRITE, (i + 1) % 16)?;
    }
    vq.offer(&mut b.arena, 0)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("chain around the whole table")
}

/// A `next` index past the table.
fn q_next_out_of_range(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    vq.set_desc(&mut b.arena, 0, hdr, 16, F_NEXT, 999)?;
    vq.offer(&mut b.arena, 0)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("next index 999 in a queue of 16")
}

/// Data descriptors of (almost) 4 GiB. A chain of exactly 2^32 - 1 bytes is legal as a
/// chain, so its request is refused with IOERR (segment over size_max) and nothing but
/// the status byte is written; one byte more makes the chain itself illegal (VIRTIO 1.2,
/// 2.7.5.2), which is NEEDS_RESET.
fn q_len_4gib(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    // 16 (header) + len + 1 (status) = u32::MAX.
    let len = u32::MAX - 17;
    for kind in [T_IN, T_OUT] {
        let got = b.simple(false, &mut vq, kind, 0, len)?;
        expect_status(&format!("type {kind} len {len:#x}"), got, S_IOERR, 1)?;
    }
    // The data page was writable for the read; the device must have written nothing there.
    let first = b.data_bytes(PAGE)?;
    if first.iter().any(|x| *x != dma::CANARY) {
        return Err("the refused read wrote into its buffer".into());
    }
    b.rw.expect_healthy("after a 4 GiB - 18 segment")?;
    let hdr = b.header(0, T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 0, false)?;
    let head = vq.chain(
        &mut b.arena,
        &[
            Part::read(hdr, 16),
            Part::read(data, u32::MAX),
            Part::write(st, 1),
        ],
    )?;
    vq.offer(&mut b.arena, head)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("a chain longer than 4 GiB")
}

/// A data buffer far outside guest RAM, and one straddling its end.
fn q_buffer_outside_ram(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    for (addr, what) in [
        (0x40_0000_0000u64, "buffer at 256 GiB"),
        (b.ram_end - 256, "buffer straddling the end of RAM"),
    ] {
        let hdr = b.header(0, T_IN, 0)?;
        let st = b.status_byte(0)?;
        let used = b.submit(
            false,
            &mut vq,
            &[
                Part::read(hdr, 16),
                Part::write(addr, 512),
                Part::write(st, 1),
            ],
        )?;
        expect_status(what, (b.status_of(0)?, used), S_IOERR, 1)?;
    }
    b.rw.expect_healthy("after buffers outside RAM")
}

/// The available index 1000 ahead of the device (more than the queue size).
fn q_avail_idx_jump(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 512, true)?;
    let head = vq.chain(
        &mut b.arena,
        &[
            Part::read(hdr, 16),
            Part::write(data, 512),
            Part::write(st, 1),
        ],
    )?;
    vq.stage(&mut b.arena, head)?;
    vq.publish_idx(&mut b.arena, 1000)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("available index 1000")?;
    vq.expect_idle(&b.arena, Duration::from_millis(50), "avail index jump")
}

/// An available entry naming descriptor 200 of a 16-entry table.
fn q_head_out_of_range(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    vq.offer(&mut b.arena, 200)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("head index 200")?;
    vq.expect_idle(&b.arena, Duration::from_millis(50), "head out of range")
}

/// 65 664 requests through a 256-entry queue, so both ring indexes wrap past 65535; every
/// used element is checked, then a real read after the wrap.
fn q_index_wrap(b: &mut BlkBench) -> Result<(), String> {
    const CHAINS: u16 = 128;
    const ROUNDS: u32 = 513;
    let mut vq = b.live(false, 256)?;
    let hdr = b.header(0, 0x7777, 0)?;
    let mut heads = Vec::new();
    for k in 0..usize::from(CHAINS) {
        let st = b.status_byte(k)?;
        heads.push(vq.chain(&mut b.arena, &[Part::read(hdr, 16), Part::write(st, 1)])?);
    }
    for round in 0..ROUNDS {
        for head in &heads {
            vq.stage(&mut b.arena, *head)?;
        }
        vq.publish_idx(&mut b.arena, vq.avail_idx)?;
        b.rw.notify(0);
        let start = std::time::Instant::now();
        while vq.used_idx(&b.arena)? != vq.avail_idx {
            if start.elapsed() > REACT {
                return Err(format!(
                    "round {round}: used idx {} never reached {} (status {:#x})",
                    vq.used_idx(&b.arena)?,
                    vq.avail_idx,
                    b.rw.status()
                ));
            }
            std::thread::yield_now();
        }
        for (k, head) in heads.iter().enumerate() {
            let n = vq.used_seen.wrapping_add(u16::try_from(k).unwrap_or(0));
            let (id, len) = vq.used_elem(&b.arena, n)?;
            if (id, len) != (u32::from(*head), 1) {
                return Err(format!(
                    "round {round}: used element {n} is ({id}, {len}), expected ({head}, 1)"
                ));
            }
        }
        vq.used_seen = vq.avail_idx;
    }
    if vq.avail_idx >= CHAINS * 2 {
        return Err(format!("index did not wrap: {}", vq.avail_idx));
    }
    for k in 0..usize::from(CHAINS) {
        if b.status_of(k)? != S_UNSUPP {
            return Err(format!(
                "status {k} is {}, expected UNSUPP",
                b.status_of(k)?
            ));
        }
    }
    let got = b.simple(false, &mut vq, T_IN, 0, 512)?;
    expect_status("read after the wrap", got, S_OK, 513)?;
    if let Some(bad) = first_mismatch(RW_SEED, 0, &b.data_bytes(512)?) {
        return Err(format!("read after the wrap: byte {bad} wrong"));
    }
    b.rw.expect_healthy("after the index wrap")
}

/// The one valid write (the host checks the file for exactly it), read back.
fn b_valid_write_read(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let offset = VALID_SECTOR * 512;
    let mut bytes = vec![0u8; 512];
    fill_pattern(VALID_SEED, offset, &mut bytes);
    b.arena.page(P_DATA + 1)?.write(0, &bytes);
    let hdr = b.header(0, T_OUT, VALID_SECTOR)?;
    let st = b.status_byte(0)?;
    let src = b.data(1, 0, 0, false)?;
    let used = b.submit(
        false,
        &mut vq,
        &[
            Part::read(hdr, 16),
            Part::read(src, 512),
            Part::write(st, 1),
        ],
    )?;
    expect_status("valid write", (b.status_of(0)?, used), S_OK, 1)?;
    let got = b.simple(false, &mut vq, T_IN, VALID_SECTOR, 1024)?;
    expect_status("read back", got, S_OK, 1025)?;
    let back = b.data_bytes(1024)?;
    if let Some(bad) = first_mismatch(VALID_SEED, offset, back.get(..512).unwrap_or_default()) {
        return Err(format!("written sector reads back wrong at {bad}"));
    }
    if let Some(bad) = first_mismatch(RW_SEED, offset + 512, back.get(512..).unwrap_or_default()) {
        return Err(format!("the sector after the write changed at {bad}"));
    }
    let got = b.simple(false, &mut vq, T_FLUSH, 0, 0)?;
    expect_status("flush", got, S_OK, 1)
}

fn b_sector_past_end(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let got = b.simple(false, &mut vq, T_IN, CAPACITY, 512)?;
    expect_status("read at the capacity", got, S_IOERR, 1)?;
    let got = b.simple(false, &mut vq, T_OUT, CAPACITY - 1, 1024)?;
    expect_status("write over the end", got, S_IOERR, 1)?;
    let got = b.simple(false, &mut vq, T_IN, CAPACITY - 1, 512)?;
    expect_status("read of the last sector", got, S_OK, 513)
}

fn b_sector_overflow(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    for sector in [u64::MAX, u64::MAX - 1, 1 << 55, u64::MAX / 512 + 1] {
        for kind in [T_IN, T_OUT] {
            let got = b.simple(false, &mut vq, kind, sector, 1024)?;
            expect_status(&format!("type {kind} sector {sector:#x}"), got, S_IOERR, 1)?;
        }
    }
    b.rw.expect_healthy("after overflowing sectors")
}

fn b_write_read_only_disk(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(true, 16)?;
    b.ro.w32(reg::DEVICE_FEATURES_SEL, 0);
    if b.ro.r32(reg::DEVICE_FEATURES) & (1 << 5) == 0 {
        return Err("read-only disk does not offer VIRTIO_BLK_F_RO".into());
    }
    for sector in [0, 5, CAPACITY - 1] {
        let got = b.simple(true, &mut vq, T_OUT, sector, 512)?;
        expect_status(&format!("write to sector {sector}"), got, S_IOERR, 1)?;
    }
    let got = b.simple(true, &mut vq, T_IN, 5, 512)?;
    expect_status("read", got, S_OK, 513)?;
    match first_mismatch(RO_SEED, 5 * 512, &b.data_bytes(512)?) {
        None => Ok(()),
        Some(bad) => Err(format!("read-only disk reads wrong at {bad}")),
    }
}

/// The status descriptor is device-readable: no status can be written, NEEDS_RESET.
fn b_status_read_only_desc(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    let data = b.data(0, 0, 512, true)?;
    let st = b.arena.page(P_META)?.phys(STATUS_OFF);
    let head = vq.chain(
        &mut b.arena,
        &[
            Part::read(hdr, 16),
            Part::write(data, 512),
            Part::read(st, 1),
        ],
    )?;
    vq.offer(&mut b.arena, head)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("read-only status descriptor")
}

/// A chain of just a header: no status descriptor at all.
fn b_no_status_desc(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_OUT, 0)?;
    let head = vq.chain(&mut b.arena, &[Part::read(hdr, 16)])?;
    vq.offer(&mut b.arena, head)?;
    b.rw.notify(0);
    b.rw.expect_needs_reset("header-only chain")
}

/// The 16-byte header split 8 + 8 over two descriptors: refused with IOERR (the device
/// wants the header in one descriptor), nothing read or written.
fn b_header_split(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 512, true)?;
    let used = b.submit(
        false,
        &mut vq,
        &[
            Part::read(hdr, 8),
            Part::read(hdr + 8, 8),
            Part::write(data, 512),
            Part::write(st, 1),
        ],
    )?;
    expect_status("split header", (b.status_of(0)?, used), S_IOERR, 1)?;
    b.rw.expect_healthy("after a split header")
}

fn b_unknown_type(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    for kind in [2, 3, 0x7777, u32::MAX] {
        let got = b.simple(false, &mut vq, kind, 0, 512)?;
        expect_status(&format!("type {kind:#x}"), got, S_UNSUPP, 1)?;
    }
    b.rw.expect_healthy("after unknown types")
}

/// GET_ID into a 4-byte buffer: 4 bytes of the id, nothing past them (canaries).
fn b_get_id_short_buffer(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let got = b.simple(false, &mut vq, T_GET_ID, 0, 4)?;
    expect_status("GET_ID into 4 bytes", got, S_OK, 5)?;
    let id = b.data_bytes(4)?;
    if id != RW_ID.as_bytes().get(..4).unwrap_or_default() {
        return Err(format!("GET_ID wrote {id:?}"));
    }
    let got = b.simple(false, &mut vq, T_GET_ID, 0, 64)?;
    expect_status(
        "GET_ID into 64 bytes",
        got,
        S_OK,
        1 + u32::try_from(ID_BYTES).unwrap_or(0),
    )?;
    let id = b.data_bytes(ID_BYTES + 1)?;
    let mut want = RW_ID.as_bytes().to_vec();
    want.resize(ID_BYTES, 0);
    want.push(dma::CANARY);
    if id != want {
        return Err(format!("GET_ID into 64 bytes wrote {id:?}"));
    }
    Ok(())
}

fn b_discard_flush(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        let got = b.simple(false, &mut vq, kind, 0, 16)?;
        expect_status(&format!("type {kind}"), got, S_UNSUPP, 1)?;
    }
    let got = b.simple(false, &mut vq, T_FLUSH, u64::MAX, 0)?;
    expect_status("flush", got, S_OK, 1)
}

/// A read into a device-readable buffer: refused, buffer untouched (not allowed).
fn b_wrong_direction(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 0, false)?;
    let used = b.submit(
        false,
        &mut vq,
        &[
            Part::read(hdr, 16),
            Part::read(data, 512),
            Part::write(st, 1),
        ],
    )?;
    expect_status(
        "read into a readable buffer",
        (b.status_of(0)?, used),
        S_IOERR,
        1,
    )?;
    let hdr = b.header(0, T_OUT, 0)?;
    let used = b.submit(
        false,
        &mut vq,
        &[
            Part::read(hdr, 16),
            Part::write(data, 512),
            Part::write(st, 1),
        ],
    )?;
    expect_status(
        "write from a writable buffer",
        (b.status_of(0)?, used),
        S_IOERR,
        1,
    )
}

fn b_partial_sector(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    for (kind, len) in [(T_IN, 100), (T_OUT, 513), (T_IN, 1)] {
        let got = b.simple(false, &mut vq, kind, 0, len)?;
        expect_status(&format!("type {kind} len {len}"), got, S_IOERR, 1)?;
    }
    b.rw.expect_healthy("after partial sectors")
}

/// 129 data segments, one more than seg_max.
fn b_too_many_segments(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 256)?;
    let hdr = b.header(0, T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 512, true)?;
    let mut parts = vec![Part::read(hdr, 16)];
    parts.extend(std::iter::repeat_n(Part::write(data, 512), 129));
    parts.push(Part::write(st, 1));
    let used = b.submit(false, &mut vq, &parts)?;
    expect_status("129 segments", (b.status_of(0)?, used), S_IOERR, 1)?;
    if b.data_bytes(512)?.iter().any(|x| *x != dma::CANARY) {
        return Err("the refused read wrote into its buffer".into());
    }
    b.slot(false).expect_healthy("after 129 segments")
}

/// Writes a 16-byte descriptor at `off` of data page `page` (an indirect table).
fn table_entry(
    b: &mut BlkBench,
    page: usize,
    index: usize,
    (addr, len, flags, next): (u64, u32, u16, u16),
) -> Result<(), String> {
    let mut raw = Vec::with_capacity(16);
    raw.extend_from_slice(&addr.to_le_bytes());
    raw.extend_from_slice(&len.to_le_bytes());
    raw.extend_from_slice(&flags.to_le_bytes());
    raw.extend_from_slice(&next.to_le_bytes());
    b.arena.page(P_DATA + page)?.write(index * 16, &raw);
    Ok(())
}

/// Indirect descriptor tables, although the device does not offer INDIRECT_DESC: a
/// well-formed one is followed (harmless, documented), a nested one, one whose length is
/// not a multiple of 16, and an empty one each make the device NEEDS_RESET.
fn q_indirect_descriptors(b: &mut BlkBench) -> Result<(), String> {
    let table = b.arena.get(P_DATA + 2)?.phys(0);
    // A well-formed table: header, 512-byte read buffer, status.
    let mut vq = b.live(false, 16)?;
    let hdr = b.header(0, T_IN, 3)?;
    let data = b.data(0, 0, 512, true)?;
    let st = b.status_byte(0)?;
    table_entry(b, 2, 0, (hdr, 16, F_NEXT, 1))?;
    table_entry(b, 2, 1, (data, 512, F_NEXT | F_WRITE, 2))?;
    table_entry(b, 2, 2, (st, 1, F_WRITE, 0))?;
    vq.set_desc(&mut b.arena, 0, table, 48, F_INDIRECT, 0)?;
    vq.offer(&mut b.arena, 0)?;
    b.rw.notify(0);
    let (id, len) = vq.wait_used(&b.arena, REACT)?;
    expect_status("indirect table", (b.status_of(0)?, len), S_OK, 513)?;
    if id != 0 {
        return Err(format!("indirect request used as {id}"));
    }
    if let Some(bad) = first_mismatch(RW_SEED, 3 * 512, &b.data_bytes(512)?) {
        return Err(format!("indirect read wrong at {bad}"));
    }
    for (what, entry0, table_len) in [
        ("nested indirect table", (table, 48, F_INDIRECT, 0), 48),
        ("indirect table of 17 bytes", (hdr, 16, F_NEXT, 1), 17),
        ("empty indirect table", (hdr, 16, F_NEXT, 1), 0),
    ] {
        b.prepare()?;
        let mut vq = b.live(false, 16)?;
        b.header(0, T_IN, 3)?;
        b.status_byte(0)?;
        b.data(0, 0, 512, true)?;
        table_entry(b, 2, 0, entry0)?;
        table_entry(b, 2, 1, (data, 512, F_NEXT | F_WRITE, 2))?;
        table_entry(b, 2, 2, (st, 1, F_WRITE, 0))?;
        vq.set_desc(&mut b.arena, 0, table, table_len, F_INDIRECT, 0)?;
        vq.offer(&mut b.arena, 0)?;
        b.rw.notify(0);
        b.rw.expect_needs_reset(what)?;
    }
    Ok(())
}
