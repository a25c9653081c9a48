//! virtio-mmio transport scenarios: register values and orders a driver must not use.
//! They run on the read-write disk's slot; the device must refuse each one (mostly by
//! marking itself NEEDS_RESET) and keep its registers sane.

use std::time::Duration;

use super::blk::{BlkBench, CAPACITY, P_AVAIL, P_DESC, P_USED};
use super::mmio::{reg, status, MAGIC, VERSION_1_WORD1};
use super::ring::Vq;
use super::Scenario;

/// The transport scenarios.
pub const SCENARIOS: &[Scenario<BlkBench>] = &[
    ("t-queue-outside-ram", t_queue_outside_ram),
    ("t-queue-straddles-ram-end", t_queue_straddles_ram_end),
    ("t-queue-size-zero", t_queue_size_zero),
    ("t-queue-size-not-power-of-two", t_queue_size_not_pow2),
    ("t-queue-size-over-max", t_queue_size_over_max),
    (
        "t-driver-ok-without-features-ok",
        t_driver_ok_without_features_ok,
    ),
    ("t-features-not-offered", t_features_not_offered),
    ("t-notify-queue-not-ready", t_notify_not_ready),
    ("t-notify-queue-out-of-range", t_notify_out_of_range),
    ("t-config-out-of-range", t_config_out_of_range),
    ("t-odd-width-access", t_odd_width_access),
    ("t-read-only-register-write", t_read_only_register_write),
    ("t-writes-after-failed", t_writes_after_failed),
    ("t-status-clears-bits", t_status_clears_bits),
    (
        "t-queue-change-after-driver-ok",
        t_queue_change_after_driver_ok,
    ),
    ("t-reset-mid-io", t_reset_mid_io),
];

/// Negotiates, then programs queue 0 with `size` and ring addresses, and sets QueueReady:
/// the device must refuse with NEEDS_RESET and leave the queue not ready.
fn refused_queue(b: &mut BlkBench, size: u32, desc: u64, what: &str) -> Result<(), String> {
    b.rw.negotiate(0)?;
    let vq = Vq::new(&mut b.arena, 16, P_DESC, P_AVAIL, P_USED)?;
    b.rw.program_queue(0, size, desc, vq.avail_addr(), vq.used_addr());
    b.rw.w32(reg::QUEUE_READY, 1);
    b.rw.expect_needs_reset(what)?;
    if b.rw.r32(reg::QUEUE_READY) != 0 {
        return Err(format!("{what}: QueueReady reads 1"));
    }
    b.rw.w32(
        reg::STATUS,
        status::ACK | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    if b.rw.status() & status::DRIVER_OK != 0 {
        return Err(format!("{what}: DRIVER_OK accepted"));
    }
    Ok(())
}

fn t_queue_outside_ram(b: &mut BlkBench) -> Result<(), String> {
    refused_queue(b, 16, 0x40_0000_0000, "descriptor table at 256 GiB")?;
    b.prepare()?;
    refused_queue(
        b,
        16,
        u64::MAX - 0xff,
        "descriptor table at the top of the address space",
    )
}

fn t_queue_straddles_ram_end(b: &mut BlkBench) -> Result<(), String> {
    // 16 descriptors are 256 bytes: start 64 bytes before the end of RAM.
    let desc = b.ram_end - 64;
    refused_queue(b, 16, desc, "descriptor table straddling the end of RAM")
}

fn t_queue_size_zero(b: &mut BlkBench) -> Result<(), String> {
    let desc = b.arena.get(P_DESC)?.phys(0);
    refused_queue(b, 0, desc, "queue size 0")
}

fn t_queue_size_not_pow2(b: &mut BlkBench) -> Result<(), String> {
    let desc = b.arena.get(P_DESC)?.phys(0);
    refused_queue(b, 24, desc, "queue size 24")
}

fn t_queue_size_over_max(b: &mut BlkBench) -> Result<(), String> {
    b.rw.negotiate(0)?;
    b.rw.w32(reg::QUEUE_SEL, 0);
    let max = b.rw.r32(reg::QUEUE_NUM_MAX);
    if max != 256 {
        return Err(format!("QueueNumMax {max}, expected 256"));
    }
    b.rw.w32(reg::QUEUE_SEL, 1);
    if b.rw.r32(reg::QUEUE_NUM_MAX) != 0 {
        return Err("queue 1 of a one-queue device has a QueueNumMax".into());
    }
    b.prepare()?;
    let desc = b.arena.get(P_DESC)?.phys(0);
    refused_queue(b, 512, desc, "queue size 512")?;
    b.prepare()?;
    refused_queue(b, 0x1_0000, desc, "queue size 65536")
}

fn t_driver_ok_without_features_ok(b: &mut BlkBench) -> Result<(), String> {
    b.rw.w32(reg::STATUS, status::ACK);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.w32(
        reg::STATUS,
        status::ACK | status::DRIVER | status::DRIVER_OK,
    );
    b.rw.expect_needs_reset("DRIVER_OK without FEATURES_OK")?;
    if b.rw.status() & status::DRIVER_OK != 0 {
        return Err(format!("status {:#x} has DRIVER_OK", b.rw.status()));
    }
    Ok(())
}

/// Accepting features the device never offered: FEATURES_OK does not stick (the spec's
/// way to refuse); a feature word past 63 is a protocol error.
fn t_features_not_offered(b: &mut BlkBench) -> Result<(), String> {
    b.rw.w32(reg::STATUS, status::ACK);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 0);
    b.rw.w32(reg::DRIVER_FEATURES, u32::MAX);
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 1);
    b.rw.w32(reg::DRIVER_FEATURES, u32::MAX);
    b.rw.w32(
        reg::STATUS,
        status::ACK | status::DRIVER | status::FEATURES_OK,
    );
    let s = b.rw.status();
    if s & status::FEATURES_OK != 0 {
        return Err(format!(
            "FEATURES_OK accepted with every feature bit set (status {s:#x})"
        ));
    }
    b.rw.expect_healthy("refused features")?;
    // Without VERSION_1 (legacy): also refused.
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 0);
    b.rw.w32(reg::DRIVER_FEATURES, 0);
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 1);
    b.rw.w32(reg::DRIVER_FEATURES, 0);
    b.rw.w32(
        reg::STATUS,
        status::ACK | status::DRIVER | status::FEATURES_OK,
    );
    if b.rw.status() & status::FEATURES_OK != 0 {
        return Err("FEATURES_OK accepted without VERSION_1".into());
    }
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 2);
    b.rw.w32(reg::DRIVER_FEATURES, 1);
    b.rw.expect_needs_reset("feature word 2")?;
    // A correct negotiation still works after a reset.
    b.prepare()?;
    b.rw.negotiate(0)
}

/// A kick for a queue that is set up but not ready, before DRIVER_OK.
fn t_notify_not_ready(b: &mut BlkBench) -> Result<(), String> {
    b.rw.negotiate(0)?;
    let vq = Vq::new(&mut b.arena, 16, P_DESC, P_AVAIL, P_USED)?;
    b.rw.program_queue(0, 16, vq.desc_addr(), vq.avail_addr(), vq.used_addr());
    b.rw.notify(0);
    b.rw.expect_needs_reset("notify before QueueReady and DRIVER_OK")
}

/// Kicks for queue numbers the device does not have, after a correct setup.
fn t_notify_out_of_range(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    let got = b.simple(false, &mut vq, super::blk::T_IN, 0, 512)?;
    if got != (super::blk::S_OK, 513) {
        return Err(format!("valid read before the bad notify: {got:?}"));
    }
    b.rw.notify(7);
    b.rw.expect_needs_reset("notify of queue 7")?;
    b.prepare()?;
    b.live(false, 16)?;
    b.rw.notify(u32::MAX);
    b.rw.expect_needs_reset("notify of queue 0xffffffff")
}

/// Config reads past the blk config read as zero; any config write is refused.
fn t_config_out_of_range(b: &mut BlkBench) -> Result<(), String> {
    let capacity = b.rw.r64(reg::CONFIG);
    if capacity != CAPACITY {
        return Err(format!("capacity reads {capacity}, expected {CAPACITY}"));
    }
    for off in [0x100, 0x400, 0xefc] {
        let v = b.rw.r32(reg::CONFIG + off);
        if v != 0 {
            return Err(format!("config offset {off:#x} reads {v:#x}, expected 0"));
        }
    }
    if b.rw.r8(reg::CONFIG + 0xeff) != 0 || b.rw.r64(reg::CONFIG + 0xef8) != 0 {
        return Err("the last config bytes are not zero".into());
    }
    b.rw.expect_healthy("config reads")?;
    b.rw.w64(reg::CONFIG, 0);
    b.rw.expect_needs_reset("config write of the capacity")?;
    b.prepare()?;
    b.rw.w32(reg::CONFIG + 0xe00, 0xdead_beef);
    b.rw.expect_needs_reset("config write past the config space")?;
    let capacity = b.rw.r64(reg::CONFIG);
    if capacity != CAPACITY {
        return Err(format!("capacity reads {capacity} after the writes"));
    }
    Ok(())
}

/// 1-, 2- and 8-byte and unaligned register accesses.
fn t_odd_width_access(b: &mut BlkBench) -> Result<(), String> {
    let reads = [
        ("1-byte MagicValue", u64::from(b.rw.r8(reg::MAGIC))),
        ("2-byte MagicValue", u64::from(b.rw.r16(reg::MAGIC))),
        ("8-byte MagicValue", b.rw.r64(reg::MAGIC)),
        ("unaligned 4-byte at 0x2", u64::from(b.rw.r32(0x2))),
    ];
    for (what, v) in reads {
        if v != 0 {
            return Err(format!("{what} reads {v:#x}, expected 0"));
        }
    }
    b.rw.expect_healthy("odd-width reads")?;
    type Write = (&'static str, fn(&BlkBench));
    let writes: [Write; 4] = [
        ("1-byte Status write", |b| b.rw.w8(reg::STATUS, 1)),
        ("2-byte QueueSel write", |b| b.rw.w16(reg::QUEUE_SEL, 1)),
        ("8-byte QueueDesc write", |b| {
            b.rw.w64(reg::QUEUE_DESC_LOW, 0x1000)
        }),
        ("unaligned Status write", |b| b.rw.w32(reg::STATUS + 1, 1)),
    ];
    for (what, write) in writes {
        b.prepare()?;
        write(b);
        b.rw.expect_needs_reset(what)?;
        if b.rw.status() & status::ACK != 0 {
            return Err(format!("{what} took effect (status {:#x})", b.rw.status()));
        }
    }
    if b.rw.r32(reg::MAGIC) != MAGIC {
        return Err("MagicValue changed".into());
    }
    Ok(())
}

fn t_read_only_register_write(b: &mut BlkBench) -> Result<(), String> {
    for (off, what) in [
        (reg::MAGIC, "MagicValue"),
        (reg::DEVICE_ID, "DeviceID"),
        (reg::QUEUE_NUM_MAX, "QueueNumMax"),
        (reg::INTERRUPT_STATUS, "InterruptStatus"),
        (0x0fc, "ConfigGeneration"),
        (0x0f0, "an unknown register"),
    ] {
        b.prepare()?;
        b.rw.w32(off, 0x1234_5678);
        b.rw.expect_needs_reset(&format!("write to {what}"))?;
    }
    b.prepare()?;
    if b.rw.r32(reg::MAGIC) != MAGIC || b.rw.r32(reg::DEVICE_ID) != 2 {
        return Err("identity registers changed".into());
    }
    if b.rw.r32(reg::VERSION) != 2 {
        return Err("Version is not 2".into());
    }
    Ok(())
}

fn t_writes_after_failed(b: &mut BlkBench) -> Result<(), String> {
    b.rw.w32(reg::STATUS, status::ACK);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER | status::FAILED);
    b.rw.expect_healthy("FAILED itself")?;
    b.rw.w32(reg::DRIVER_FEATURES_SEL, 1);
    b.rw.w32(reg::DRIVER_FEATURES, VERSION_1_WORD1);
    b.rw.expect_needs_reset("DriverFeatures after FAILED")?;
    b.rw.w32(
        reg::STATUS,
        status::ACK | status::DRIVER | status::FAILED | status::FEATURES_OK,
    );
    let s = b.rw.status();
    if s & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
        return Err(format!("status {s:#x} after FAILED"));
    }
    b.prepare()?;
    b.rw.w32(reg::STATUS, status::ACK);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER | status::FAILED);
    b.rw.w32(reg::QUEUE_NUM, 16);
    b.rw.expect_needs_reset("QueueNum after FAILED")
}

fn t_status_clears_bits(b: &mut BlkBench) -> Result<(), String> {
    b.rw.w32(reg::STATUS, status::ACK);
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.w32(reg::STATUS, status::DRIVER);
    b.rw.expect_needs_reset("status dropping ACKNOWLEDGE")?;
    b.prepare()?;
    b.rw.w32(reg::STATUS, status::ACK | status::DRIVER);
    b.rw.expect_needs_reset("status skipping ACKNOWLEDGE alone")
}

/// Moving the descriptor table after DRIVER_OK: NEEDS_RESET, and the device then serves
/// nothing until reset.
fn t_queue_change_after_driver_ok(b: &mut BlkBench) -> Result<(), String> {
    let mut vq = b.live(false, 16)?;
    b.rw.w32(reg::QUEUE_DESC_LOW, 0x1000);
    b.rw.expect_needs_reset("QueueDescLow after DRIVER_OK")?;
    let hdr = b.header(0, super::blk::T_IN, 0)?;
    let st = b.status_byte(0)?;
    let data = b.data(0, 0, 512, true)?;
    let head = vq.chain(
        &mut b.arena,
        &[
            super::ring::Part::read(hdr, 16),
            super::ring::Part::write(data, 512),
            super::ring::Part::write(st, 1),
        ],
    )?;
    vq.offer(&mut b.arena, head)?;
    b.rw.notify(0);
    vq.expect_idle(
        &b.arena,
        Duration::from_millis(200),
        "request while NEEDS_RESET",
    )
}

/// Reset with reads in flight; then the device comes back and reads correctly.
fn t_reset_mid_io(b: &mut BlkBench) -> Result<(), String> {
    use super::ring::Part;
    let mut vq = b.live(false, 16)?;
    for k in 0..4usize {
        let sector = u64::try_from(k * 8).map_err(|e| e.to_string())?;
        let hdr = b.header(k * 16, super::blk::T_IN, sector)?;
        let st = b.status_byte(k)?;
        let data = b.data(k, 0, 4096, true)?;
        let head = vq.chain(
            &mut b.arena,
            &[
                Part::read(hdr, 16),
                Part::write(data, 4096),
                Part::write(st, 1),
            ],
        )?;
        vq.stage(&mut b.arena, head)?;
    }
    vq.publish_idx(&mut b.arena, vq.avail_idx)?;
    b.rw.notify(0);
    b.rw.reset()?;
    // Whatever the device finished before the reset may sit in the buffers; after it
    // confirmed the reset it must not write anything more.
    let snapshot: Vec<Vec<u8>> = (0..4)
        .map(|k| b.arena.get(super::blk::P_DATA + k).map(|p| p.read(0, 4096)))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(100));
    for (k, before) in snapshot.iter().enumerate() {
        if b.arena.get(super::blk::P_DATA + k)?.read(0, 4096) != *before {
            return Err(format!("buffer {k} changed after the reset completed"));
        }
    }
    let mut vq = b.live(false, 16)?;
    let got = b.simple(false, &mut vq, super::blk::T_IN, 0, 512)?;
    if got != (super::blk::S_OK, 513) {
        return Err(format!("read after reset: {got:?}"));
    }
    match crate::guest::blk::first_mismatch(super::RW_SEED, 0, &b.data_bytes(512)?) {
        None => Ok(()),
        Some(bad) => Err(format!("read after reset wrong at {bad}")),
    }
}
