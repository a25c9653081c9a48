//! The transport driven register by register, as a (sometimes hostile) driver would.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::EventOps;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::worker::{self, QueueWorker, WorkerLoop};
use crate::virtio::*;

const MEM_SIZE: u64 = 0x10_0000;

struct FakeDevice {
    queues: Vec<u16>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queues
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = [1u8, 2, 3, 4, 5, 6, 7, 8];
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Activate {
        queues: usize,
        event_idx: bool,
        features: u64,
    },
    Queue(usize),
    Reset,
    /// After a restore's activation: the positions the queues came with.
    Restored(Vec<QueuePosition>),
}

/// Records what the worker is asked to do; its queues' positions are the ones it was
/// activated with, moved on by `ADVANCE` per queue notification.
struct Recorder(Arc<Mutex<Vec<Seen>>>, Vec<QueuePosition>);

const ADVANCE: u16 = 3;

impl QueueWorker for Recorder {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn activate(&mut self, a: Activation, _: &Interrupt, _: &mut EventOps) {
        use virtio_queue::QueueT;
        self.1 = a.queues.iter().map(QueuePosition::of).collect();
        self.0.lock().unwrap().push(Seen::Activate {
            queues: a.queues.len(),
            event_idx: a.queues.iter().all(|q| q.event_idx_enabled()),
            features: a.acked_features,
        });
    }
    fn process_queue(&mut self, index: usize, _: &Interrupt, _: &mut EventOps) {
        if let Some(p) = self.1.get_mut(index) {
            p.next_avail = p.next_avail.wrapping_add(ADVANCE);
            p.next_used = p.next_used.wrapping_add(ADVANCE);
        }
        self.0.lock().unwrap().push(Seen::Queue(index));
    }
    fn reset(&mut self, _: &mut EventOps) {
        self.0.lock().unwrap().push(Seen::Reset);
    }
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.1.clone()
    }
    fn after_restore(&mut self, _: &Interrupt, _: &mut EventOps) {
        self.0.lock().unwrap().push(Seen::Restored(self.1.clone()));
    }
}

struct Rig {
    t: MmioTransport,
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<DeviceEvent>>>,
    _thread: std::thread::JoinHandle<Result<(), worker::WorkerError>>,
}

fn rig(queues: Vec<u16>) -> Rig {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
            .unwrap();
    let (handle, inbox) = worker::channel().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .with_event_hook(Arc::new(move |e| sink.lock().unwrap().push(e.clone())));
    let t = MmioTransport::new(Box::new(FakeDevice { queues }), handle, irq.clone(), mem).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let lp = WorkerLoop::new(
        Recorder(Arc::clone(&seen), Vec::new()),
        inbox,
        t.queue_notifiers().unwrap(),
        irq,
    );
    let thread = worker::spawn("fake", lp, || Ok(())).unwrap();
    Rig {
        t,
        seen,
        events,
        _thread: thread,
    }
}

impl Rig {
    fn r(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }
    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }
    fn needs_reset(&mut self) -> bool {
        self.r(REG_STATUS) & DEVICE_STATUS_NEEDS_RESET != 0
    }
    fn negotiate(&mut self, features: u64) {
        self.w(REG_STATUS, DEVICE_STATUS_ACKNOWLEDGE);
        self.w(REG_STATUS, DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER);
        self.w(REG_DRIVER_FEATURES_SEL, 0);
        self.w(
            REG_DRIVER_FEATURES,
            u32::try_from(features & 0xffff_ffff).unwrap(),
        );
        self.w(REG_DRIVER_FEATURES_SEL, 1);
        self.w(REG_DRIVER_FEATURES, u32::try_from(features >> 32).unwrap());
        self.w(
            REG_STATUS,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK,
        );
    }
    /// Queue `i` at 0x1000 * (4i + 1..3), size 16.
    fn set_up_queue(&mut self, i: u32, size: u32) {
        let base = 0x4000 * u64::from(i);
        self.w(REG_QUEUE_SEL, i);
        self.w(REG_QUEUE_NUM, size);
        self.w(REG_QUEUE_DESC_LOW, u32::try_from(base + 0x1000).unwrap());
        self.w(REG_QUEUE_DESC_HIGH, 0);
        self.w(REG_QUEUE_DRIVER_LOW, u32::try_from(base + 0x2000).unwrap());
        self.w(REG_QUEUE_DRIVER_HIGH, 0);
        self.w(REG_QUEUE_DEVICE_LOW, u32::try_from(base + 0x3000).unwrap());
        self.w(REG_QUEUE_DEVICE_HIGH, 0);
        self.w(REG_QUEUE_READY, 1);
    }
    fn driver_ok(&mut self) {
        let s = self.r(REG_STATUS);
        self.w(REG_STATUS, s | DEVICE_STATUS_DRIVER_OK);
    }
    fn wait_seen(&self, n: usize) -> Vec<Seen> {
        for _ in 0..1000 {
            let seen = self.seen.lock().unwrap().clone();
            if seen.len() >= n {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("worker saw {:?}", self.seen.lock().unwrap());
    }
}

const MODERN: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identification_registers() {
    let mut r = rig(vec![16]);
    assert_eq!(r.r(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r.r(REG_VERSION), 2);
    assert_eq!(r.r(REG_DEVICE_ID), VIRTIO_ID_BLOCK);
    assert_eq!(r.r(REG_VENDOR_ID), MMIO_VENDOR_ID);
    r.w(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 1);
    r.w(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 1 << VIRTIO_RING_F_EVENT_IDX);
    r.w(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
    r.w(REG_QUEUE_SEL, 0);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 16);
    r.w(REG_QUEUE_SEL, 1);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 0);
    assert_eq!(r.r(REG_SHM_LEN_LOW), u32::MAX);
    assert!(!r.needs_reset());
}

#[test]
fn full_negotiation_activates_the_worker_with_event_idx() {
    let mut r = rig(vec![16, 8]);
    r.negotiate(MODERN | (1 << VIRTIO_RING_F_EVENT_IDX));
    assert_ne!(r.r(REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
    r.set_up_queue(0, 16);
    r.set_up_queue(1, 8);
    assert_eq!(r.r(REG_QUEUE_READY), 1);
    r.driver_ok();
    assert!(r.t.is_activated());
    assert_eq!(r.r(REG_STATUS), 0xf);
    r.w(REG_QUEUE_NOTIFY, 1);
    let seen = r.wait_seen(2);
    assert_eq!(
        seen,
        vec![
            Seen::Activate {
                queues: 2,
                event_idx: true,
                features: MODERN | (1 << VIRTIO_RING_F_EVENT_IDX)
            },
            Seen::Queue(1)
        ]
    );
    r.w(REG_STATUS, 0);
    assert_eq!(r.r(REG_STATUS), 0);
    assert_eq!(r.wait_seen(3).last(), Some(&Seen::Reset));
    assert!(!r.t.is_activated());
}

#[test]
fn features_ok_refused_without_version_1_or_with_unoffered_bits() {
    let mut r = rig(vec![16]);
    r.negotiate(0);
    assert_eq!(r.r(REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
    r.w(REG_STATUS, 0);
    r.negotiate(MODERN | (1 << 5));
    assert_eq!(r.r(REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
    // Refusing features is not a protocol error: the driver reads FEATURES_OK back.
    assert!(!r.needs_reset());
}

#[test]
fn queue_size_not_a_power_of_two_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_SEL, 0);
    r.w(REG_QUEUE_NUM, 12);
    assert!(r.needs_reset());
    let events = r.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert!(
        matches!(&events[0], DeviceEvent::NeedsReset { reason, .. } if reason.contains("size 12"))
    );
}

#[test]
fn queue_size_above_max_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_NUM, 32);
    assert!(r.needs_reset());
}

#[test]
fn rings_outside_guest_memory_need_reset_and_queue_stays_not_ready() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_NUM, 16);
    r.w(REG_QUEUE_DESC_LOW, 0x1000);
    r.w(REG_QUEUE_DRIVER_LOW, 0x2000);
    // Used ring past the end of RAM (high half set).
    r.w(REG_QUEUE_DEVICE_LOW, 0x3000);
    r.w(REG_QUEUE_DEVICE_HIGH, 1);
    r.w(REG_QUEUE_READY, 1);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    assert!(r.needs_reset());
    // DRIVER_OK now does not activate anything.
    r.driver_ok();
    assert!(!r.t.is_activated());
}

#[test]
fn ring_straddling_the_end_of_memory_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_NUM, 16);
    r.w(REG_QUEUE_DESC_LOW, u32::try_from(MEM_SIZE - 0x40).unwrap());
    r.w(REG_QUEUE_DRIVER_LOW, 0x2000);
    r.w(REG_QUEUE_DEVICE_LOW, 0x3000);
    r.w(REG_QUEUE_READY, 1);
    assert!(r.needs_reset());
}

#[test]
fn misaligned_ring_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_NUM, 16);
    r.w(REG_QUEUE_DESC_LOW, 0x1004);
    r.w(REG_QUEUE_DRIVER_LOW, 0x2000);
    r.w(REG_QUEUE_DEVICE_LOW, 0x3000);
    r.w(REG_QUEUE_READY, 1);
    assert!(r.needs_reset());
}

#[test]
fn notify_before_driver_ok_needs_reset_and_reaches_no_worker() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.w(REG_QUEUE_NOTIFY, 0);
    assert!(r.needs_reset());
    std::thread::sleep(Duration::from_millis(20));
    assert!(r.seen.lock().unwrap().is_empty());
}

#[test]
fn ioeventfd_kick_before_driver_ok_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    // What KVM does with a QueueNotify write when an ioeventfd is registered.
    r.t.queue_notifiers().unwrap()[0].write(1).unwrap();
    for _ in 0..500 {
        if r.needs_reset() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(r.needs_reset());
    assert!(r.seen.lock().unwrap().is_empty());
}

#[test]
fn notify_of_missing_queue_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.driver_ok();
    r.w(REG_QUEUE_NOTIFY, 5);
    assert!(r.needs_reset());
}

#[test]
fn writes_to_read_only_registers_need_reset_and_are_reported_once() {
    let mut r = rig(vec![16]);
    r.w(REG_MAGIC_VALUE, 0);
    r.w(REG_QUEUE_NUM_MAX, 4);
    r.w(REG_INTERRUPT_STATUS, 1);
    r.w(REG_CONFIG_GENERATION, 1);
    assert!(r.needs_reset());
    assert_eq!(r.events.lock().unwrap().len(), 1);
    assert_eq!(r.r(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    // A reset clears it; the next error is reported again.
    r.w(REG_STATUS, 0);
    assert!(!r.needs_reset());
    r.w(REG_VERSION, 1);
    assert_eq!(r.events.lock().unwrap().len(), 2);
}

#[test]
fn status_transitions_out_of_order_need_reset() {
    let mut r = rig(vec![16]);
    r.w(REG_STATUS, DEVICE_STATUS_DRIVER_OK);
    assert!(r.needs_reset());
    r.w(REG_STATUS, 0);
    r.w(REG_STATUS, DEVICE_STATUS_ACKNOWLEDGE);
    r.w(REG_STATUS, DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER);
    // Clearing a bit without a reset.
    r.w(REG_STATUS, DEVICE_STATUS_DRIVER);
    assert!(r.needs_reset());
}

#[test]
fn queue_registers_outside_setup_phase_need_reset() {
    let mut r = rig(vec![16]);
    r.w(REG_STATUS, DEVICE_STATUS_ACKNOWLEDGE);
    r.w(REG_QUEUE_NUM, 16);
    assert!(r.needs_reset());

    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.driver_ok();
    r.w(REG_QUEUE_DESC_LOW, 0x8000);
    assert!(r.needs_reset());
}

#[test]
fn features_written_after_features_ok_need_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_DRIVER_FEATURES_SEL, 0);
    r.w(REG_DRIVER_FEATURES, 0);
    assert!(r.needs_reset());
}

#[test]
fn driver_ok_with_a_queue_not_ready_needs_reset() {
    let mut r = rig(vec![16, 16]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.driver_ok();
    assert!(r.needs_reset());
    assert!(!r.t.is_activated());
}

#[test]
fn queue_of_a_missing_index_needs_reset() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.w(REG_QUEUE_SEL, 3);
    r.w(REG_QUEUE_NUM, 16);
    assert!(r.needs_reset());
}

#[test]
fn interrupt_status_and_ack() {
    let mut r = rig(vec![16]);
    r.t.interrupt().signal_used_queue().unwrap();
    r.t.interrupt().signal_config_change().unwrap();
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 3);
    r.w(REG_INTERRUPT_ACK, 1);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 2);
    r.w(REG_INTERRUPT_ACK, 2);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn odd_width_accesses_and_config_space() {
    let mut r = rig(vec![16]);
    let mut byte = [0xffu8; 1];
    r.t.read(REG_MAGIC_VALUE, &mut byte);
    assert_eq!(byte, [0]);
    let mut two = [0u8; 2];
    r.t.read(CONFIG_SPACE_OFFSET + 2, &mut two);
    assert_eq!(two, [3, 4]);
    let mut past = [0xffu8; 4];
    r.t.read(CONFIG_SPACE_OFFSET + 6, &mut past);
    assert_eq!(past, [7, 8, 0, 0]);
    r.t.read(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    assert!(!r.needs_reset());
    // A read-only config space refuses writes.
    r.t.write(CONFIG_SPACE_OFFSET, &[1]);
    assert!(r.needs_reset());
    assert_eq!(r.r(REG_CONFIG_GENERATION), 0);
    r.w(REG_STATUS, 0);
    r.t.write(REG_STATUS, &[1, 0]);
    assert!(r.needs_reset());
}

#[test]
fn invalid_queue_max_is_refused_at_construction() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let (handle, _inbox) = worker::channel().unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let err = MmioTransport::new(
        Box::new(FakeDevice {
            queues: vec![16, 24],
        }),
        handle,
        irq,
        mem,
    )
    .unwrap_err();
    assert!(err.to_string().contains("queue 1 maximum size 24"), "{err}");
}

#[test]
fn linux_teardown_clears_queue_ready_after_reset_without_error() {
    let mut r = rig(vec![16]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.driver_ok();
    r.w(REG_STATUS, 0);
    r.w(REG_QUEUE_SEL, 0);
    r.w(REG_QUEUE_READY, 0);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    assert!(!r.needs_reset());
}

#[test]
fn notifier_count_must_match_the_queues() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let (handle, _inbox) = worker::channel().unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let err = MmioTransport::with_notifiers(
        Box::new(FakeDevice {
            queues: vec![16, 16],
        }),
        handle,
        irq,
        mem,
        vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("2 queues but 1"), "{err}");
}

#[test]
fn a_paused_live_transport_restores_into_a_fresh_one_at_the_same_queue_positions() {
    let mut r = rig(vec![16, 8]);
    r.negotiate(MODERN | (1 << VIRTIO_RING_F_EVENT_IDX));
    r.set_up_queue(0, 16);
    r.set_up_queue(1, 8);
    r.driver_ok();
    r.wait_seen(1);
    // Two kicks of queue 1: its device moves on twice.
    r.w(REG_QUEUE_NOTIFY, 1);
    r.wait_seen(2);
    r.w(REG_QUEUE_NOTIFY, 1);
    r.wait_seen(3);
    r.w(REG_QUEUE_SEL, 1);
    let state = r.t.pause(Duration::from_secs(5)).unwrap();
    assert_eq!(state.device_type, VIRTIO_ID_BLOCK);
    assert_ne!(state.status & DEVICE_STATUS_DRIVER_OK, 0);
    assert_eq!(state.queue_sel, 1);
    let positions: Vec<_> = state.queues.iter().map(|q| q.position.unwrap()).collect();
    let moved = 2 * ADVANCE;
    assert_eq!(
        positions,
        vec![
            QueuePosition {
                next_avail: 0,
                next_used: 0
            },
            QueuePosition {
                next_avail: moved,
                next_used: moved
            },
        ]
    );
    // Paused: a kick is not served until the resume.
    r.w(REG_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.seen.lock().unwrap().len(), 3);
    r.t.resume();
    assert_eq!(r.wait_seen(4)[3], Seen::Queue(0));

    // A fresh transport and thread take the state: the worker is activated with the
    // queues at their positions and told it was a restore; the registers read back.
    let mut fresh = rig(vec![16, 8]);
    fresh.t.restore(&state).unwrap();
    let seen = fresh.wait_seen(2);
    assert!(
        matches!(
            seen[0],
            Seen::Activate {
                queues: 2,
                event_idx: true,
                ..
            }
        ),
        "{seen:?}"
    );
    assert_eq!(seen[1], Seen::Restored(positions));
    assert!(fresh.t.is_activated());
    assert_eq!(fresh.r(REG_STATUS), state.status);
    assert_eq!(fresh.r(REG_QUEUE_READY), 1);
    assert_eq!(fresh.t.acked_features(), state.acked_features);
    // It runs on: a kick is served.
    fresh.w(REG_QUEUE_NOTIFY, 1);
    assert_eq!(fresh.wait_seen(3)[2], Seen::Queue(1));
    assert!(!fresh.needs_reset());
}

#[test]
fn a_restore_that_does_not_fit_the_device_is_refused() {
    let mut r = rig(vec![16, 8]);
    r.negotiate(MODERN);
    r.set_up_queue(0, 16);
    r.set_up_queue(1, 8);
    r.driver_ok();
    r.wait_seen(1);
    let state = r.t.pause(Duration::from_secs(5)).unwrap();
    r.t.resume();
    let refused = |edit: &dyn Fn(&mut TransportState), queues: Vec<u16>| {
        let mut s = state.clone();
        edit(&mut s);
        let mut fresh = rig(queues);
        let err = fresh.t.restore(&s).unwrap_err();
        assert!(!fresh.t.is_activated());
        err
    };
    assert!(refused(&|s| s.device_type = VIRTIO_ID_NET, vec![16, 8]).contains("virtio type"));
    assert!(refused(&|_| {}, vec![16]).contains("queues"));
    assert!(refused(&|s| s.acked_features |= 1 << 40, vec![16, 8]).contains("does not offer"));
    assert!(refused(&|s| s.queues[1].size = 16, vec![16, 8]).contains("size 16"));
    assert!(refused(&|s| s.queues[0].position = None, vec![16, 8]).contains("without a position"));
    assert!(
        refused(&|s| s.queues[0].desc = MEM_SIZE + 0x1000, vec![16, 8])
            .contains("outside guest memory")
    );
    // A device that had asked for a reset comes back asking for it, not live.
    let mut s = state.clone();
    s.needs_reset = true;
    let mut fresh = rig(vec![16, 8]);
    fresh.t.restore(&s).unwrap();
    assert!(!fresh.t.is_activated());
    assert!(fresh.needs_reset());
}
