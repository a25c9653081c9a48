//! Snapshots on this machine's /dev/kvm, with a hand-assembled 64-bit guest that counts
//! in memory and in a register and reports both on a port: pause it, write the
//! snapshot, seal it, restore it (twice, side by side, from one memory file) and check
//! that each restored VM counts on from where the original stopped. Then every way a
//! snapshot can be tampered with, refused before anything is mapped.
//!
//! This needs /dev/kvm (any KVM that runs small payloads; no Linux guest). It fails,
//! rather than skips, when /dev/kvm is missing.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mvm_devices::bus::BusDevice;
use mvm_loader::dsse::{Envelope, TrustedKeys};
use mvm_loader::measure::Sha256Digest;
use mvm_vmm::arch::x86_64::{cpuid, regs};
use mvm_vmm::boot_report::BootTimeline;
use mvm_vmm::device_manager::DeviceManager;
use mvm_vmm::snapshot::bundle::{self, Binding, SnapshotFiles};
use mvm_vmm::snapshot::cpu::{self, VcpuState};
use mvm_vmm::snapshot::manifest::{self, CpuRequirement, Expect, Manifest, PlanBinding};
use mvm_vmm::snapshot::{vm_state, DevicesState, MachineState, SnapshotError};
use mvm_vmm::snapshot::{MEMORY_FILE, SEALED_FILE, STATE_FILE, UNSIGNED_FILE};
use mvm_vmm::vcpu::{self, PauseGate, Vcpu, VcpuContext, VmEvent};
use mvm_vmm::vm::{create_guest_memory, Vm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

mod support;

const TEST_PORT: u16 = 0xe9;
const PAYLOAD_ADDR: u64 = 0x10_0000;
const COUNTER_ADDR: u32 = 0x20_0000;
const MEM_BYTES: u64 = 32 << 20;

/// Counts for ever: `inc qword [COUNTER]`, `inc rbx`, then both out to the port.
fn counting_payload() -> Vec<u8> {
    let c = COUNTER_ADDR.to_le_bytes();
    let mut code = vec![0x66, 0xba, 0xe9, 0x00]; // mov dx, 0xe9
    code.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx
    let body_start = code.len();
    code.extend_from_slice(&[0x48, 0xff, 0x04, 0x25]); // inc qword [disp32]
    code.extend_from_slice(&c);
    code.extend_from_slice(&[0x48, 0xff, 0xc3]); // inc rbx
    code.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25]); // mov rax, [disp32]
    code.extend_from_slice(&c);
    code.push(0xef); // out dx, eax
    code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
    code.push(0xef); // out dx, eax
    let back = code.len() + 2 - body_start;
    code.extend_from_slice(&[0xeb, u8::try_from(256 - back).unwrap()]); // jmp body
    code
}

struct Recorder(Arc<Mutex<Vec<u8>>>);

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(data);
    }
}

fn kick_signal() -> i32 {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| vcpu::install_kick_handler().unwrap());
    vmm_sys_util::signal::SIGRTMIN() + vcpu::KICK_SIGNAL_OFFSET
}

/// A VM whose one vCPU runs on its own thread.
struct Running {
    vm: Vm,
    gate: Arc<PauseGate>,
    stop: Arc<AtomicBool>,
    events: Receiver<VmEvent>,
    thread: Option<JoinHandle<()>>,
    port: Arc<Mutex<Vec<u8>>>,
}

fn start(vm: Vm, vcpu: Vcpu, port_at: u16) -> Running {
    kick_signal();
    let port = Arc::new(Mutex::new(Vec::new()));
    let mut devices = DeviceManager::new();
    devices
        .attach_pio(
            Arc::new(Mutex::new(Recorder(port.clone()))),
            u64::from(port_at),
            4,
        )
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(PauseGate::default());
    let ctx = VcpuContext {
        pio: devices.pio_bus().clone(),
        mmio: devices.mmio_bus().clone(),
        events: tx,
        timeline: Arc::new(BootTimeline::new(Instant::now())),
        stop: stop.clone(),
        pause: gate.clone(),
        saveable_msrs: cpu::saveable_msrs(vm.kvm()).unwrap().into(),
    };
    let thread = std::thread::spawn(move || vcpu.run(&ctx));
    Running {
        vm,
        gate,
        stop,
        events: rx,
        thread: Some(thread),
        port,
    }
}

impl Running {
    fn wait_for_bytes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.port.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "the guest did not count far enough"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Pauses the vCPU (kicking it until it reports) and returns its state.
    fn pause(&self) -> VcpuState {
        self.gate.request();
        let thread = self.thread.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            thread.kill(kick_signal()).unwrap();
            match self.events.recv_timeout(Duration::from_millis(10)) {
                Ok(VmEvent::Paused { vcpu: 0, state }) => return *state.unwrap(),
                Ok(other) => panic!("while pausing: {other:?}"),
                Err(_) => assert!(Instant::now() < deadline, "the vCPU never paused"),
            }
        }
    }

    fn port_bytes(&self) -> Vec<u8> {
        self.port.lock().unwrap().clone()
    }

    fn end(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Release);
        self.gate.wake_for_stop();
        let thread = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !thread.is_finished() {
            let _ = thread.kill(kick_signal());
            assert!(Instant::now() < deadline, "the vCPU thread did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().unwrap();
        self.port_bytes()
    }
}

fn boot_counter() -> Running {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    let memory = create_guest_memory(MEM_BYTES).unwrap();
    memory
        .write_slice(&counting_payload(), GuestAddress(PAYLOAD_ADDR))
        .unwrap();
    regs::write_boot_tables(&memory).unwrap();
    let vm = Vm::new(memory).unwrap();
    let supported = cpuid::offered(vm.kvm()).unwrap();
    let vcpu = Vcpu::new(vm.fd(), 0).unwrap();
    vcpu.configure(&supported, 1, GuestAddress(PAYLOAD_ADDR))
        .unwrap();
    start(vm, vcpu, TEST_PORT)
}

/// The port's bytes as u32 words; they must be 1, 1, 2, 2, 3, 3, ... (the memory
/// counter, then the register counter, each iteration). Returns how many words.
fn assert_counts_on(bytes: &[u8]) -> usize {
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (i, w) in words.iter().enumerate() {
        let want = u32::try_from(i / 2 + 1).unwrap();
        assert_eq!(
            *w,
            want,
            "word {i} of {}: {:?}",
            words.len(),
            &words[i.saturating_sub(4)..(i + 2).min(words.len())]
        );
    }
    words.len()
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn trusted() -> TrustedKeys {
    let mut t = TrustedKeys::new();
    t.add(key().verifying_key());
    t
}

/// Seals the unsigned manifest in `dir` as the runtime does: its exact bytes, signed.
fn seal(dir: &Path, key: &SigningKey) {
    let bytes = std::fs::read(dir.join(UNSIGNED_FILE)).unwrap();
    let envelope = Envelope::sign(manifest::PAYLOAD_TYPE, &bytes, key);
    std::fs::write(dir.join(SEALED_FILE), envelope.to_json()).unwrap();
}

/// Runs the counter, pauses it, writes and seals a snapshot of it into `dir` (epoch 3,
/// no plan); returns the port bytes the original wrote.
fn take_snapshot(dir: &Path) -> Vec<u8> {
    let running = boot_counter();
    running.wait_for_bytes(400);
    let vcpu0 = running.pause();
    let state = MachineState {
        vcpus: vec![vcpu0],
        vm: vm_state::save(running.vm.fd()).unwrap(),
        devices: DevicesState::default(),
    };
    let given = cpuid::filter_cpuid(&host_cpuid(), 0, 1).unwrap();
    bundle::write(
        SnapshotFiles::create_in(dir).unwrap(),
        &running.vm,
        &state,
        Binding {
            plan: None,
            artifacts: None,
            epoch: 3,
            cpu: CpuRequirement::of_guest(given.as_slice()),
        },
    )
    .unwrap();
    let before = running.port_bytes();
    let after_end = running.end();
    assert_eq!(before, after_end, "the vCPU ran on after it paused");
    seal(dir, &key());
    before
}

fn restore(dir: &Path, expect: &Expect<'_>) -> Result<Running, SnapshotError> {
    restore_with_port(dir, expect, TEST_PORT)
}

/// Restores the snapshot in `dir`, recording what the guest writes to port `port_at`.
fn restore_with_port(
    dir: &Path,
    expect: &Expect<'_>,
    port_at: u16,
) -> Result<Running, SnapshotError> {
    let opened = bundle::open(dir, expect)?;
    let vm = bundle::restore_vm(&opened)?;
    let vcpu = Vcpu::new(vm.fd(), 0).unwrap();
    cpu::restore(vcpu.fd(), &opened.state.vcpus[0])?;
    Ok(start(vm, vcpu, port_at))
}

fn host_cpuid() -> kvm_bindings::CpuId {
    cpuid::offered(&kvm_ioctls::Kvm::new().unwrap()).unwrap()
}

#[test]
fn a_restored_vm_counts_on_from_where_it_paused_and_two_restores_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let before = take_snapshot(dir.path());
    let counted = assert_counts_on(&before);
    assert!(counted >= 100, "{counted}");

    let trusted = trusted();
    let cpuid = host_cpuid();
    let expect = Expect {
        trusted: &trusted,
        plan: None,
        pins: None,
        min_epoch: 3,
        host_cpuid: &cpuid,
    };
    // The file this process wrote, untouched: taken as written, not hashed again.
    assert!(!bundle::open(dir.path(), &expect).unwrap().memory_hashed);
    let memory_digest = |p: &Path| Sha256Digest::of(&std::fs::read(p.join(MEMORY_FILE)).unwrap());
    let sealed_digest = memory_digest(dir.path());

    // Two VMs from the one snapshot at once: each counts on from the same point, alone.
    let a = restore(dir.path(), &expect).unwrap();
    let b = restore(dir.path(), &expect).unwrap();
    a.wait_for_bytes(before.len() / 4 * 4 / 2 + 400);
    b.wait_for_bytes(400);
    let a_bytes = a.end();
    let b_bytes = b.end();
    for bytes in [&a_bytes, &b_bytes] {
        let mut whole = before.clone();
        whole.extend_from_slice(bytes);
        let n = assert_counts_on(&whole);
        assert!(n >= counted + 100, "{n} words after {counted}");
    }
    // Their writes were their own: the file is as sealed.
    assert_eq!(memory_digest(dir.path()), sealed_digest);
    // The memory file is sparse: most of 32 MiB was never touched.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.path().join(MEMORY_FILE)).unwrap();
    assert_eq!(meta.len(), MEM_BYTES);
    assert!(
        meta.blocks() * 512 < MEM_BYTES / 2,
        "{} blocks",
        meta.blocks()
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    // Still the file as written after two restores (reads, and private writes).
    assert!(!bundle::open(dir.path(), &expect).unwrap().memory_hashed);

    // One byte changed in place (the same inode), its modification time put back: the
    // change time moved, so the file is hashed again and refused.
    let path = dir.path().join(MEMORY_FILE);
    let mtime = meta.modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a], u64::from(COUNTER_ADDR) + 4096).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let refused = bundle::open(dir.path(), &expect).unwrap_err();
    assert_eq!(
        refused.refusal_reason(),
        Some("memory_mismatch"),
        "{refused}"
    );
}

/// Copies the snapshot in `from` to a fresh directory, lets `change` alter it, and
/// returns the restore's refusal reason.
fn refusal_after(
    from: &Path,
    change: impl FnOnce(&Path),
    min_epoch: u64,
    plan: Option<&PlanBinding>,
) -> (&'static str, String) {
    let to = tempfile::tempdir().unwrap();
    for f in [MEMORY_FILE, STATE_FILE, UNSIGNED_FILE, SEALED_FILE] {
        std::fs::copy(from.join(f), to.path().join(f)).unwrap();
    }
    change(to.path());
    let trusted = trusted();
    let cpuid = host_cpuid();
    let expect = Expect {
        trusted: &trusted,
        plan,
        pins: None,
        min_epoch,
        host_cpuid: &cpuid,
    };
    let err = bundle::open(to.path(), &expect).unwrap_err();
    let reason = err
        .refusal_reason()
        .unwrap_or_else(|| panic!("not a refusal: {err}"));
    (reason, err.to_string())
}

/// Rewrites the manifest with `edit` and seals it again with the trusted key.
fn reseal(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(UNSIGNED_FILE)).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(dir.join(UNSIGNED_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    seal(dir, &key());
}

/// What is changed, how, the sandbox's epoch, the refusal expected.
type Case = (&'static str, Box<dyn FnOnce(&Path)>, u64, &'static str);

#[test]
fn a_tampered_stale_or_foreign_snapshot_is_refused_before_anything_is_mapped() {
    let dir = tempfile::tempdir().unwrap();
    take_snapshot(dir.path());
    let d = dir.path();
    let flip = |name: &'static str, at: u64| {
        move |p: &Path| {
            let mut bytes = std::fs::read(p.join(name)).unwrap();
            let i = usize::try_from(at).unwrap().min(bytes.len() - 1);
            bytes[i] ^= 1;
            std::fs::write(p.join(name), bytes).unwrap();
        }
    };
    let cases: Vec<Case> = vec![
        (
            "one byte of memory",
            Box::new(flip(MEMORY_FILE, PAYLOAD_ADDR + 3)),
            3,
            "memory_mismatch",
        ),
        (
            "one byte of a zero page",
            Box::new(flip(MEMORY_FILE, 20 << 20)),
            3,
            "memory_mismatch",
        ),
        (
            "memory one byte short",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.join(MEMORY_FILE))
                    .unwrap();
                f.set_len(MEM_BYTES - 1).unwrap();
            }),
            3,
            "memory_mismatch",
        ),
        (
            "memory one byte long",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.join(MEMORY_FILE))
                    .unwrap();
                f.set_len(MEM_BYTES + 1).unwrap();
            }),
            3,
            "memory_mismatch",
        ),
        (
            "the state",
            Box::new(flip(STATE_FILE, 200)),
            3,
            "state_mismatch",
        ),
        (
            "the state truncated",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p.join(STATE_FILE)).unwrap();
                std::fs::write(p.join(STATE_FILE), &bytes[..bytes.len() / 2]).unwrap();
            }),
            3,
            "state_mismatch",
        ),
        (
            "the manifest edited after sealing",
            Box::new(|p: &Path| {
                // The trusted signature kept, the payload swapped for an edited one.
                let sealed = std::fs::read(p.join(SEALED_FILE)).unwrap();
                let mut env = Envelope::from_json(&sealed).unwrap();
                let text = std::fs::read_to_string(p.join(UNSIGNED_FILE)).unwrap();
                let edited = text.replace("\"epoch\": 3", "\"epoch\": 9");
                assert_ne!(edited, text);
                let other = SigningKey::from_bytes(&[9; 32]);
                env.payload =
                    Envelope::sign(manifest::PAYLOAD_TYPE, edited.as_bytes(), &other).payload;
                std::fs::write(p.join(SEALED_FILE), env.to_json()).unwrap();
            }),
            3,
            "snapshot_unsigned",
        ),
        (
            "sealed by an untrusted key",
            Box::new(|p: &Path| seal(p, &SigningKey::from_bytes(&[7; 32]))),
            3,
            "snapshot_unsigned",
        ),
        (
            "no seal",
            Box::new(|p: &Path| std::fs::remove_file(p.join(SEALED_FILE)).unwrap()),
            3,
            "snapshot_format",
        ),
        (
            "older than the sandbox's epoch",
            Box::new(|_: &Path| {}),
            4,
            "rollback",
        ),
        (
            "from another VMM build",
            Box::new(|p: &Path| reseal(p, |m| m.vmm_build = "mvm-vmm 0.0.0 snapshot-v0".into())),
            3,
            "vmm_mismatch",
        ),
        (
            "of another format",
            Box::new(|p: &Path| reseal(p, |m| m.format = manifest::FORMAT + 1)),
            3,
            "vmm_mismatch",
        ),
        (
            "needing a CPU feature this host lacks",
            Box::new(|p: &Path| {
                reseal(p, |m| {
                    // Leaf 7.0 EBX bit 31 (AVX-512VL): neither test host offers it.
                    let f = m
                        .cpu
                        .features
                        .iter_mut()
                        .find(|f| f.leaf == 7 && f.register == "ebx")
                        .unwrap();
                    f.bits |= 1 << 31;
                })
            }),
            3,
            "cpu_mismatch",
        ),
        (
            "of another vendor",
            Box::new(|p: &Path| reseal(p, |m| m.cpu.vendor = "CentaurHauls".into())),
            3,
            "cpu_mismatch",
        ),
        (
            "with a layout that is not this VMM's",
            Box::new(|p: &Path| reseal(p, |m| m.layout[0].file_offset = 4096)),
            3,
            "snapshot_format",
        ),
        (
            "a state file that is a symlink",
            Box::new(|p: &Path| {
                std::fs::rename(p.join(STATE_FILE), p.join("real-state")).unwrap();
                std::os::unix::fs::symlink(p.join("real-state"), p.join(STATE_FILE)).unwrap();
            }),
            3,
            "snapshot_format",
        ),
    ];
    for (what, change, epoch, want) in cases {
        let (reason, message) = refusal_after(d, change, epoch, None);
        assert_eq!(reason, want, "{what}: {message}");
    }

    // Taken without a plan, restored under one (and the other way round): refused.
    let plan = PlanBinding {
        id: "p1".into(),
        digest: Sha256Digest::of(b"a plan"),
    };
    let (reason, message) = refusal_after(d, |_| {}, 3, Some(&plan));
    assert_eq!(reason, "plan_mismatch", "{message}");
    let (reason, message) =
        refusal_after(d, |p| reseal(p, |m| m.plan = Some(plan.clone())), 3, None);
    assert_eq!(reason, "plan_mismatch", "{message}");
    let other = PlanBinding {
        id: "p1".into(),
        digest: Sha256Digest::of(b"another plan"),
    };
    let (reason, message) = refusal_after(
        d,
        |p| reseal(p, |m| m.plan = Some(plan.clone())),
        3,
        Some(&other),
    );
    assert_eq!(reason, "plan_mismatch", "{message}");
}

/// The serial port's data register.
const SERIAL_PORT: u16 = 0x3f8;

/// Counts for ever in memory and writes the count's low byte to the serial port.
fn serial_counting_payload() -> Vec<u8> {
    let c = COUNTER_ADDR.to_le_bytes();
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let body_start = code.len();
    code.extend_from_slice(&[0x48, 0xff, 0x04, 0x25]); // inc qword [disp32]
    code.extend_from_slice(&c);
    code.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25]); // mov rax, [disp32]
    code.extend_from_slice(&c);
    code.push(0xee); // out dx, al
    let back = code.len() + 2 - body_start;
    code.extend_from_slice(&[0xeb, u8::try_from(256 - back).unwrap()]); // jmp body
    code
}

/// Bytes 1, 2, 3, ... (mod 256) from the start: how many.
fn assert_bytes_count_on(bytes: &[u8]) -> usize {
    for (i, b) in bytes.iter().enumerate() {
        let want = u8::try_from((i + 1) % 256).unwrap();
        assert_eq!(*b, want, "byte {i} of {}", bytes.len());
    }
    bytes.len()
}

fn wait_for_file_len(path: &Path, n: u64, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) < n {
        assert!(child.try_wait().unwrap().is_none(), "the VMM ended early");
        assert!(
            Instant::now() < deadline,
            "the guest did not write {n} bytes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the VMM did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The jailed `mvm-vmm` running the serial counter with `--snapshot-dir D/snap`, its
/// console in `D/console`, its boot report in `D/report.json`, and `extra` arguments.
fn spawn_serial_counter(d: &Path, extra: &[String]) -> std::process::Child {
    let kernel = support::payload_vmlinux(d, &serial_counting_payload());
    std::fs::create_dir(d.join("snap")).unwrap();
    support::vmm()
        .args(["--dev", "--kernel"])
        .arg(&kernel)
        .arg("--console-log")
        .arg(d.join("console"))
        .arg("--boot-report")
        .arg(d.join("report.json"))
        .arg("--snapshot-dir")
        .arg(d.join("snap"))
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Signals the child and waits for it; its exit code and stderr.
fn signal_and_wait(child: &mut std::process::Child, signal: i32) -> (Option<i32>, String) {
    // SAFETY: signalling the child the test spawned and has not reaped.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), signal) };
    wait_with_stderr(child)
}

/// Waits for the child; its exit code and stderr.
fn wait_with_stderr(child: &mut std::process::Child) -> (Option<i32>, String) {
    let status = wait_exit(child);
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

fn exit_and_stderr(mut child: std::process::Child) -> (Option<i32>, String) {
    wait_with_stderr(&mut child)
}

#[test]
fn sigusr2_snapshots_the_jailed_vmm_and_the_snapshot_restores_where_it_stopped() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, console, report) = (d.join("snap"), d.join("console"), d.join("report.json"));
    let mut child = spawn_serial_counter(d, &["--snapshot-epoch".into(), "5".into()]);
    wait_for_file_len(&console, 300, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["exit_reason"], "snapshotted", "{report}");
    let before = std::fs::read(&console).unwrap();
    assert!(assert_bytes_count_on(&before) >= 300);

    let m: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join(UNSIGNED_FILE)).unwrap()).unwrap();
    assert_eq!(
        (m.epoch, m.vcpus, m.mem_bytes, m.plan.clone()),
        (5, 1, 128 << 20, None)
    );
    // Written under a write lease by the jailed, filtered VMM: its identity is sealed.
    let written = m
        .memory_file
        .as_ref()
        .unwrap_or_else(|| panic!("no identity of the memory file sealed: {stderr}"));
    assert_eq!(written.bytes, 128 << 20);
    seal(&snap, &key());
    let trusted = trusted();
    let cpuid = host_cpuid();
    let expect = Expect {
        trusted: &trusted,
        plan: None,
        pins: None,
        min_epoch: 5,
        host_cpuid: &cpuid,
    };
    assert!(!bundle::open(&snap, &expect).unwrap().memory_hashed);
    let restored = restore_with_port(&snap, &expect, SERIAL_PORT).unwrap();
    restored.wait_for_bytes(300);
    let after = restored.end();
    let mut whole = before.clone();
    whole.extend_from_slice(&after);
    assert!(assert_bytes_count_on(&whole) >= before.len() + 300);
}

#[test]
fn a_vm_with_a_vsock_device_restores_with_the_same_device_and_not_without_it() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, console) = (d.join("snap"), d.join("console"));
    let vsock = format!("cid=3,uds={}", d.join("v.sock").display());
    let mut child = spawn_serial_counter(d, &["--vsock".into(), vsock.clone()]);
    wait_for_file_len(&console, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    seal(&snap, &key());
    let first = std::fs::read(&console).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join(STATE_FILE)).unwrap()).unwrap();
    let virtio = &state["machine"]["devices"]["virtio"];
    assert_eq!(virtio[0]["name"], "virtio-vsock", "{virtio}");
    // The guest never drove the device: its transport is as the VMM made it.
    assert_eq!(virtio[0]["transport"]["status"], 0, "{virtio}");
    assert!(state["machine"]["devices"]["serial"].is_object());
    // Only the chunks that hold data are indexed (and hashed at restore).
    let data = state["memory"]["data"].as_array().unwrap().len();
    assert!(data > 0 && data < 128 / 2, "{data} of 128 chunks hold data");

    // Without the device: refused before anything runs.
    let console2 = d.join("console2");
    let child = spawn_restore(d, &snap, &console2, &[]);
    let (code, stderr) = exit_and_stderr(child);
    assert_eq!(code, Some(25), "{stderr}");
    assert!(stderr.contains("device_mismatch"), "{stderr}");

    // With it: the count goes on, the socket is there again.
    let mut child = spawn_restore(d, &snap, &console2, &["--vsock", &vsock]);
    wait_for_file_len(&console2, 200, &mut child);
    assert!(d.join("v.sock").exists());
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let second = std::fs::read(&console2).unwrap();
    assert_bytes_count_on(&[first, second].concat());
}

/// `mvm-vmm --restore DIR --dev --trust KEY` with `extra` arguments.
fn spawn_restore(d: &Path, snap: &Path, console: &Path, extra: &[&str]) -> std::process::Child {
    let public = d.join("seal.pub");
    std::fs::write(
        &public,
        mvm_loader::dsse::format_public_key(&key().verifying_key()),
    )
    .unwrap();
    support::vmm()
        .arg("--restore")
        .arg(snap)
        .arg("--trust")
        .arg(&public)
        .arg("--dev")
        .arg("--console-log")
        .arg(console)
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_jailed_vmm_restores_a_snapshot_and_snapshots_it_again_and_refuses_a_bad_one() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, console) = (d.join("snap"), d.join("console"));
    let mut child = spawn_serial_counter(d, &["--snapshot-epoch".into(), "5".into()]);
    wait_for_file_len(&console, 200, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    seal(&snap, &key());
    let first = std::fs::read(&console).unwrap();

    // Restored by the VMM, jailed and filtered, and snapshotted again at epoch 6.
    let snap2 = d.join("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let console2 = d.join("console2");
    let events = d.join("events.jsonl");
    let report = d.join("report2.json");
    let snap2_arg = snap2.to_str().unwrap().to_owned();
    let events_arg = events.to_str().unwrap().to_owned();
    let report_arg = report.to_str().unwrap().to_owned();
    let mut child = spawn_restore(
        d,
        &snap,
        &console2,
        &[
            "--restore-min-epoch",
            "5",
            "--snapshot-dir",
            &snap2_arg,
            "--snapshot-epoch",
            "6",
            "--events",
            &events_arg,
            "--boot-report",
            &report_arg,
        ],
    );
    wait_for_file_len(&console2, 200, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    let second = std::fs::read(&console2).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["exit_reason"], "snapshotted", "{report}");
    assert_eq!(
        report["jail"]["kind"],
        if support::is_root() {
            "root"
        } else {
            "user-namespace"
        },
        "{report}"
    );
    let log = std::fs::read_to_string(&events).unwrap();
    let restored = log
        .lines()
        .find(|l| l.contains("snapshot_restored"))
        .unwrap_or_else(|| panic!("{log}"));
    let restored: serde_json::Value = serde_json::from_str(restored).unwrap();
    let sealed: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join(UNSIGNED_FILE)).unwrap()).unwrap();
    assert_eq!(
        restored["fields"]["memory_sha256"],
        sealed.memory.sha256.to_string(),
        "{restored}"
    );
    assert_eq!(restored["fields"]["epoch"], 5);
    seal(&snap2, &key());

    // And once more from the second snapshot: three runs, one count.
    let console3 = d.join("console3");
    let mut child = spawn_restore(d, &snap2, &console3, &["--restore-min-epoch", "6"]);
    wait_for_file_len(&console3, 200, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let third = std::fs::read(&console3).unwrap();
    let whole: Vec<u8> = [first, second, third].concat();
    assert_bytes_count_on(&whole);

    // Refused before anything runs: the first snapshot at the sandbox's epoch 6
    // (rollback), and with one byte of its memory changed.
    let console4 = d.join("console4");
    let child = spawn_restore(d, &snap, &console4, &["--restore-min-epoch", "6"]);
    let (code, stderr) = exit_and_stderr(child);
    assert_eq!(code, Some(25), "{stderr}");
    assert!(stderr.contains("rollback"), "{stderr}");
    let mut memory = std::fs::read(snap.join(MEMORY_FILE)).unwrap();
    memory[0x20_0000] ^= 1;
    std::fs::write(snap.join(MEMORY_FILE), memory).unwrap();
    let events4 = d.join("events4.jsonl");
    let child = spawn_restore(
        d,
        &snap,
        &console4,
        &[
            "--restore-min-epoch",
            "5",
            "--events",
            events4.to_str().unwrap(),
        ],
    );
    let (code, stderr) = exit_and_stderr(child);
    assert_eq!(code, Some(25), "{stderr}");
    assert!(stderr.contains("memory_mismatch"), "{stderr}");
    let log = std::fs::read_to_string(&events4).unwrap();
    assert!(
        log.contains("boot_refused") && log.contains("memory_mismatch"),
        "{log}"
    );
    assert!(!log.contains("snapshot_restored"), "{log}");
    assert_eq!(
        std::fs::metadata(&console4).map(|m| m.len()).unwrap_or(0),
        0
    );
}

#[test]
fn a_host_writer_on_the_memory_file_is_refused_before_and_stops_the_vm_after() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, console) = (d.join("snap"), d.join("console"));
    let mut child = spawn_serial_counter(d, &[]);
    wait_for_file_len(&console, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    seal(&snap, &key());

    // Open for writing somewhere: no lease, no restore.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join(MEMORY_FILE))
        .unwrap();
    let console2 = d.join("console2");
    let (code, stderr) = exit_and_stderr(spawn_restore(d, &snap, &console2, &[]));
    assert_eq!(code, Some(25), "{stderr}");
    assert!(stderr.contains("memory_unleased"), "{stderr}");
    drop(writer);

    // Restored, then a host process opens the file for writing: it is held back, the VM
    // is stopped, and only then does the writer get in.
    let mut child = spawn_restore(d, &snap, &console2, &[]);
    wait_for_file_len(&console2, 100, &mut child);
    let path = snap.join(MEMORY_FILE);
    let started = Instant::now();
    let opener = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(path);
        (f.is_ok(), Instant::now())
    });
    let (code, stderr) = wait_with_stderr(&mut child);
    let ended = Instant::now();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("opened the snapshot's memory file for writing"),
        "{stderr}"
    );
    let (opened, opened_at) = opener.join().unwrap();
    // In well under the 45 s a lease holds a writer back: the VMM let go by ending.
    assert!(opened);
    assert!(opened_at.duration_since(started) < Duration::from_secs(20));
    assert!(
        ended.duration_since(started) < Duration::from_secs(20),
        "the VM took {:?} to stop",
        ended.duration_since(started)
    );
}

#[test]
fn a_planned_snapshot_restores_under_its_plan_whose_nonce_is_spent_and_under_no_other() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = support::payload_vmlinux(d, &serial_counting_payload());
    let cmdline = "console=ttyS0 quiet";
    let admission = SigningKey::from_bytes(&[1; 32]);
    let trust = d.join("admission.pub");
    std::fs::write(
        &trust,
        mvm_loader::dsse::format_public_key(&admission.verifying_key()),
    )
    .unwrap();
    let signed = |nonce: &str, name: &str| {
        let plan = support::test_plan(&kernel, cmdline, &nonce.repeat(16));
        let signed = mvm_loader::plan::envelope::sign_plan(plan, &admission).unwrap();
        let path = d.join(name);
        std::fs::write(&path, signed.envelope.to_json()).unwrap();
        path
    };
    let plan = signed("b1", "plan.json");
    let other = signed("b2", "other.json");
    let replay = d.join("replay");
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let console = d.join("console");
    let mut child = support::vmm()
        .arg("--plan")
        .arg(&plan)
        .arg("--trust")
        .arg(&trust)
        .arg("--replay-store")
        .arg(&replay)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", cmdline])
        .arg("--console-log")
        .arg(&console)
        .arg("--snapshot-dir")
        .arg(&snap)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file_len(&console, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join(UNSIGNED_FILE)).unwrap()).unwrap();
    assert_eq!(m.plan.as_ref().map(|p| p.id.as_str()), Some("vmm-test"));
    // Sealed by the admission key, as the runtime will.
    seal(&snap, &admission);
    let first = std::fs::read(&console).unwrap();

    let restore = |plan: Option<&Path>, console: &Path| {
        let mut cmd = support::vmm();
        cmd.arg("--restore").arg(&snap).arg("--trust").arg(&trust);
        match plan {
            Some(p) => cmd.arg("--plan").arg(p).arg("--replay-store").arg(&replay),
            None => cmd.arg("--dev"),
        };
        cmd.arg("--console-log")
            .arg(console)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Another plan, and no plan: refused.
    let console2 = d.join("console2");
    for p in [Some(other.as_path()), None] {
        let (code, stderr) = exit_and_stderr(restore(p, &console2));
        assert_eq!(code, Some(25), "{stderr}");
        assert!(stderr.contains("plan_mismatch"), "{stderr}");
    }
    // Its own plan, though the boot spent its nonce: restored, counting on.
    let mut child = restore(Some(&plan), &console2);
    wait_for_file_len(&console2, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let second = std::fs::read(&console2).unwrap();
    assert_bytes_count_on(&[first, second].concat());
}

#[test]
fn with_snapshot_continue_the_vm_runs_on_after_its_snapshot_and_the_snapshot_restores() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, console, report) = (d.join("snap"), d.join("console"), d.join("report.json"));
    let mut child = spawn_serial_counter(d, &["--snapshot-continue".into()]);
    wait_for_file_len(&console, 300, &mut child);
    // SAFETY: signalling the child the test spawned and has not reaped.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGUSR2) };
    // The manifest is written last: once it is there, the snapshot is whole.
    let manifest = snap.join(UNSIGNED_FILE);
    wait_for_file_len(&manifest, 2, &mut child);
    let at_snapshot = std::fs::metadata(&console).unwrap().len();
    // The VM goes on: it counts well past the snapshot, one byte after the other.
    wait_for_file_len(&console, at_snapshot + 600, &mut child);
    // A second SIGUSR2 has no directory left to write to: logged, and the VM runs on.
    // SAFETY: as above.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGUSR2) };
    let now = std::fs::metadata(&console).unwrap().len();
    wait_for_file_len(&console, now + 300, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("already used"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_ne!(report["exit_reason"], "snapshotted", "{report}");
    let source = std::fs::read(&console).unwrap();
    assert!(assert_bytes_count_on(&source) >= usize::try_from(at_snapshot).unwrap() + 900);

    // The snapshot it left restores and counts on from where it was taken.
    seal(&snap, &key());
    let trusted = trusted();
    let cpuid = host_cpuid();
    let expect = Expect {
        trusted: &trusted,
        plan: None,
        pins: None,
        min_epoch: 0,
        host_cpuid: &cpuid,
    };
    let restored = restore_with_port(&snap, &expect, SERIAL_PORT).unwrap();
    restored.wait_for_bytes(300);
    let after = restored.end();
    let first = usize::from(after[0]);
    for (i, b) in after.iter().enumerate() {
        assert_eq!(
            usize::from(*b),
            (first + i) % 256,
            "byte {i} of the restore"
        );
    }
}

#[test]
fn an_artifact_bound_snapshot_restores_under_fresh_plans_that_pin_the_same_and_spends_each() {
    support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = support::payload_vmlinux(d, &serial_counting_payload());
    let cmdline = "console=ttyS0 quiet";
    let admission = SigningKey::from_bytes(&[3; 32]);
    let trust = d.join("admission.pub");
    std::fs::write(
        &trust,
        mvm_loader::dsse::format_public_key(&admission.verifying_key()),
    )
    .unwrap();
    let signed = |nonce: &str, name: &str, edit: &dyn Fn(&mut mvm_loader::plan::Plan)| {
        let mut plan = support::test_plan(&kernel, cmdline, &nonce.repeat(16));
        plan.plan_id = name.to_owned();
        edit(&mut plan);
        let signed = mvm_loader::plan::envelope::sign_plan(plan, &admission).unwrap();
        let path = d.join(name);
        std::fs::write(&path, signed.envelope.to_json()).unwrap();
        path
    };
    let warm = signed("a1", "warm-boot", &|_| {});
    let run1 = signed("a2", "run-1", &|_| {});
    let run2 = signed("a3", "run-2", &|_| {});
    let bigger = signed("a4", "bigger", &|p| p.resources.memory_mib = 128);
    let other_cmdline = signed("a5", "other-cmdline", &|p| {
        p.artifacts.cmdline = mvm_loader::measure::Sha256Digest::of(b"console=ttyS0")
    });
    let replay = d.join("replay");
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let console = d.join("console");
    let mut child = support::vmm()
        .arg("--plan")
        .arg(&warm)
        .arg("--trust")
        .arg(&trust)
        .arg("--replay-store")
        .arg(&replay)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", cmdline, "--mem-mib", "64"])
        .arg("--console-log")
        .arg(&console)
        .arg("--snapshot-dir")
        .arg(&snap)
        .arg("--snapshot-bind-artifacts")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file_len(&console, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGUSR2);
    assert_eq!(code, Some(0), "{stderr}");
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join(UNSIGNED_FILE)).unwrap()).unwrap();
    assert_eq!(m.plan, None);
    assert_eq!(
        m.artifacts.as_ref().map(|a| a.cmdline),
        Some(mvm_loader::measure::Sha256Digest::of(cmdline.as_bytes()))
    );
    seal(&snap, &admission);
    let first = std::fs::read(&console).unwrap();

    let restore = |plan: Option<&Path>, console: &Path| {
        let mut cmd = support::vmm();
        cmd.arg("--restore").arg(&snap).arg("--trust").arg(&trust);
        match plan {
            Some(p) => cmd.arg("--plan").arg(p).arg("--replay-store").arg(&replay),
            None => cmd.arg("--dev"),
        };
        cmd.arg("--console-log")
            .arg(console)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let console2 = d.join("console2");
    // Another command line or memory size, or no plan: refused before anything runs.
    for p in [Some(other_cmdline.as_path()), Some(bigger.as_path()), None] {
        let (code, stderr) = exit_and_stderr(restore(p, &console2));
        assert_eq!(code, Some(25), "{p:?}: {stderr}");
        assert!(stderr.contains("plan_mismatch"), "{p:?}: {stderr}");
    }
    // The warm boot's own plan: its nonce is spent.
    let (code, stderr) = exit_and_stderr(restore(Some(&warm), &console2));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("replay"), "{stderr}");
    // A fresh plan that pins the same: restored, counting on from the snapshot.
    let mut child = restore(Some(&run1), &console2);
    wait_for_file_len(&console2, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let second = std::fs::read(&console2).unwrap();
    assert_bytes_count_on(&[first.clone(), second].concat());
    // That plan is spent now too; another fresh one restores again.
    let console3 = d.join("console3");
    let (code, stderr) = exit_and_stderr(restore(Some(&run1), &console3));
    assert!(stderr.contains("replay"), "{code:?}: {stderr}");
    let mut child = restore(Some(&run2), &console3);
    wait_for_file_len(&console3, 100, &mut child);
    let (code, stderr) = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert_bytes_count_on(&[first, std::fs::read(&console3).unwrap()].concat());
}
