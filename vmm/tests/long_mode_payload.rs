//! Runs a hand-assembled 64-bit payload on this machine's /dev/kvm through
//! mvm-vmm's own VM creation and long-mode vCPU setup, and checks that what it
//! writes to I/O ports arrives through the bus.
//!
//! This needs /dev/kvm (any KVM that runs small payloads; no Linux guest).
//! It fails, rather than skips, when /dev/kvm is missing.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use mvm_devices::bus::BusDevice;
use mvm_devices::legacy::{guest_signal, GuestSignalDevice};
use mvm_vmm::arch::x86_64::regs;
use mvm_vmm::boot_report::{BootTimeline, Phase};
use mvm_vmm::device_manager::DeviceManager;
use mvm_vmm::devices::legacy::guest_signal_handler;
use mvm_vmm::exit::ExitReason;
use mvm_vmm::vcpu::{PauseGate, Vcpu, VcpuContext, VmEvent, VmStopper};
use mvm_vmm::vm::{create_guest_memory, Vm};
use vm_memory::{Bytes, GuestAddress};

/// The debug port the payload writes to.
const TEST_PORT: u16 = 0xe9;
/// Where the payload is loaded (identity-mapped by the boot page tables).
const PAYLOAD_ADDR: u64 = 0x10_0000;

/// Records every write.
#[derive(Default)]
struct PortRecorder {
    bytes: Vec<u8>,
}

impl BusDevice for PortRecorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }
}

/// Hand-assembled x86_64 code.
fn payload() -> Vec<u8> {
    let mut code = Vec::new();
    // mov dx, 0xe9
    code.extend_from_slice(&[0x66, 0xba, 0xe9, 0x00]);
    // mov al, 'M' ; out dx, al ; mov al, 'V' ; out dx, al ; mov al, 'M' ; out dx, al
    code.extend_from_slice(&[0xb0, b'M', 0xee, 0xb0, b'V', 0xee, 0xb0, b'M', 0xee]);
    // mov rax, 0x1122334455667788 -- only a 64-bit CPU decodes this as one instruction
    code.extend_from_slice(&[0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    // push rax ; pop rbx  -- the boot stack works
    code.extend_from_slice(&[0x50, 0x5b]);
    // shr rbx, 32 ; mov eax, ebx ; out dx, eax  -> bytes 44 33 22 11
    code.extend_from_slice(&[0x48, 0xc1, 0xeb, 0x20, 0x89, 0xd8, 0xef]);
    // mov rax, rsi ; out dx, eax  -> the zero page address the kernel would get
    code.extend_from_slice(&[0x48, 0x89, 0xf0, 0xef]);
    // mov dx, 0x600 ; mov al, 1 ; out dx, al  (init reached)
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x01, 0xee]);
    // mov al, 3 ; out dx, al  (poweroff)
    code.extend_from_slice(&[0xb0, 0x03, 0xee]);
    // 1: hlt ; jmp 1b  (never reached: the VMM stops at the poweroff)
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    code
}

/// A VM with `code` at [`PAYLOAD_ADDR`], the port recorder and the guest-signal
/// port on the bus, and one vCPU set up by mvm-vmm; runs it until it ends.
/// Returns the exit, the recorded port bytes, and the timeline.
fn run_payload(code: &[u8]) -> (ExitReason, Vec<u8>, Arc<BootTimeline>) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm"
    );
    let timeline = Arc::new(BootTimeline::new(Instant::now()));

    let memory = create_guest_memory(32 << 20).unwrap();
    memory
        .write_slice(code, GuestAddress(PAYLOAD_ADDR))
        .unwrap();
    regs::write_boot_tables(&memory).unwrap();
    let vm = Vm::new(memory).unwrap();

    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = VmStopper::new(tx.clone(), stop.clone());

    let recorder = Arc::new(Mutex::new(PortRecorder::default()));
    let mut devices = DeviceManager::new();
    devices
        .attach_pio(recorder.clone(), u64::from(TEST_PORT), 4)
        .unwrap();
    devices
        .attach_pio(
            Arc::new(Mutex::new(GuestSignalDevice::new(guest_signal_handler(
                timeline.clone(),
                stopper,
            )))),
            guest_signal::GUEST_SIGNAL_PORT,
            guest_signal::GUEST_SIGNAL_PORT_LEN,
        )
        .unwrap();

    let supported = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let vcpu = Vcpu::new(vm.fd(), 0).unwrap();
    vcpu.configure(&supported, 1, GuestAddress(PAYLOAD_ADDR))
        .unwrap();

    let ctx = VcpuContext {
        pio: devices.pio_bus().clone(),
        mmio: devices.mmio_bus().clone(),
        events: tx,
        timeline: timeline.clone(),
        stop,
        pause: Arc::new(PauseGate::default()),
        saveable_msrs: Arc::from(Vec::new()),
    };
    let runner = std::thread::spawn(move || vcpu.run(&ctx));
    let event = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the payload did not finish within 60 s");
    runner.join().unwrap();
    let VmEvent::Exit(reason) = event else {
        panic!("not an exit: {event:?}");
    };
    let bytes = recorder.lock().unwrap().bytes.clone();
    (reason, bytes, timeline)
}

#[test]
fn long_mode_payload_writes_reach_the_bus() {
    let (reason, bytes, timeline) = run_payload(&payload());
    assert_eq!(reason, ExitReason::Poweroff);
    let mut expected = b"MVM".to_vec();
    expected.extend_from_slice(&0x1122_3344u32.to_le_bytes());
    expected.extend_from_slice(&0x7000u32.to_le_bytes());
    assert_eq!(bytes, expected);
    assert!(timeline.get(Phase::FirstKvmRun).is_some());
    assert!(timeline.get(Phase::InitReached).is_some());
}

#[test]
fn an_exception_without_an_idt_is_a_triple_fault() {
    // mov dx, 0xe9 ; mov al, 'X' ; out dx, al ; ud2
    // The boot IDT is empty, so #UD -> #GP -> #DF -> shutdown.
    let code = [0x66, 0xba, 0xe9, 0x00, 0xb0, b'X', 0xee, 0x0f, 0x0b];
    let (reason, bytes, _) = run_payload(&code);
    assert_eq!(bytes, b"X");
    assert_eq!(reason, ExitReason::TripleFault { vcpu: 0 });
    assert_eq!(reason.status(), 0);
}
