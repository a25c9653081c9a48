//! The boot report: when each phase of a VM's life happened, in microseconds
//! since the process started (monotonic clock), written as JSON on every exit
//! path when `--boot-report FILE` is given. Benchmarks read this file; nothing
//! parses log lines for timings.
//!
//! ```json
//! {"args_parsed":812,"plan_verified":null,"artifacts_measured":null,
//!  "kernel_loaded":9120,"vm_created":11005,"first_kvm_run":12110,
//!  "first_serial_byte":180220,"init_reached":410330,"agent_ready":null,
//!  "exit":520000,"exit_reason":"poweroff"}
//! ```
//!
//! With the jail on (started as root), `"jail"` says what it did:
//! `{"uid":65534,"gid":65534,"pid_namespace":true,"cgroup":"/sys/fs/cgroup/mvm/mvm-vmm-42"}`.
//!
//! With a net device, `"net"` holds its counters as the VMM exits, among them
//! `tx_denied` (frames the egress policy dropped; each destination's first drop is also an
//! `egress_dropped` event): `{"tx_frames":120,"tx_denied":7,"tx_malformed":0,..}`.
//!
//! Each phase is stamped when it ends, so the phases that happened are in field order
//! (non-decreasing) up to `first_kvm_run`: `args_parsed` as clap returns,
//! `plan_verified` when the signature, window and nonce passed, `artifacts_measured`
//! when the kernel, initramfs and command line matched the plan (after the
//! configuration was resolved and the files read), then `kernel_loaded`,
//! `vm_created` (after the jail) and `vcpus_ready` (devices attached, vCPUs
//! configured, before their threads start). `first_serial_byte` and `init_reached` may come in
//! either order. A phase that never happened is `null`: with `--dev`, `plan_verified`
//! and `artifacts_measured` are.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mvm_devices::virtio::net::{NetCounts, NetMetrics};
use mvm_devices::virtio::vsock::{VsockCounts, VsockMetrics};
use serde::Serialize;

/// A phase of the VM's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The command line parsed (stamped by `main` as clap returns; its values are
    /// checked against the plan and the host afterwards).
    ArgsParsed,
    /// The execution plan's signature, validity window and nonce verified.
    PlanVerified,
    /// The kernel, initramfs and command line measured against the plan.
    ArtifactsMeasured,
    /// Kernel (and initramfs) copied into guest memory.
    KernelLoaded,
    /// The KVM VM exists with its memory, irqchip and timer.
    VmCreated,
    /// Devices attached, boot tables written, every vCPU created and configured;
    /// no vCPU thread started yet.
    VcpusReady,
    /// The boot vCPU entered `KVM_RUN` for the first time.
    FirstKvmRun,
    /// The guest wrote its first byte to the serial console.
    FirstSerialByte,
    /// The guest signalled "init reached" on the guest-signal port.
    InitReached,
    /// The guest signalled "agent ready".
    AgentReady,
    /// The VMM decided to exit.
    Exit,
}

const PHASES: usize = 11;

impl Phase {
    fn slot(self) -> usize {
        self as usize
    }
}

/// Sentinel for "not yet".
const UNSET: u64 = u64::MAX;

/// Phase timestamps, settable once each from any thread.
#[derive(Debug)]
pub struct BootTimeline {
    start: Instant,
    marks: [AtomicU64; PHASES],
    exit_reason: Mutex<Option<String>>,
    jail: Mutex<Option<JailReport>>,
    net: Mutex<Option<Arc<NetMetrics>>>,
    vsock: Mutex<Option<Arc<VsockMetrics>>>,
}

/// The JSON document.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BootReport {
    /// See [`Phase::ArgsParsed`].
    pub args_parsed: Option<u64>,
    /// See [`Phase::PlanVerified`].
    pub plan_verified: Option<u64>,
    /// See [`Phase::ArtifactsMeasured`].
    pub artifacts_measured: Option<u64>,
    /// See [`Phase::KernelLoaded`].
    pub kernel_loaded: Option<u64>,
    /// See [`Phase::VmCreated`].
    pub vm_created: Option<u64>,
    /// See [`Phase::VcpusReady`].
    pub vcpus_ready: Option<u64>,
    /// See [`Phase::FirstKvmRun`].
    pub first_kvm_run: Option<u64>,
    /// See [`Phase::FirstSerialByte`].
    pub first_serial_byte: Option<u64>,
    /// See [`Phase::InitReached`].
    pub init_reached: Option<u64>,
    /// See [`Phase::AgentReady`].
    pub agent_ready: Option<u64>,
    /// See [`Phase::Exit`].
    pub exit: Option<u64>,
    /// Why the VMM exited (see `exit::ExitReason::code_name`).
    pub exit_reason: Option<String>,
    /// What the jail did; `null` when it did not run in full (`--no-jail`, or not
    /// started as root).
    pub jail: Option<JailReport>,
    /// The net device's counters when the report was written; `null` without one.
    pub net: Option<NetCounts>,
    /// The vsock device's counters when the report was written; `null` without one.
    pub vsock: Option<VsockCounts>,
}

/// The jail as applied (see `jail::start`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JailReport {
    /// Which jail: `root` (started as root) or `user-namespace` (started by an ordinary
    /// user; the same namespaces and root inside a user namespace of its own).
    pub kind: &'static str,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// The VMM is PID 1 of its own PID namespace.
    pub pid_namespace: bool,
    /// The VM's cgroup directory; `null` when skipped (logged).
    pub cgroup: Option<String>,
}

impl BootTimeline {
    /// A timeline whose zero is `start` (taken first thing in `main`).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: std::array::from_fn(|_| AtomicU64::new(UNSET)),
            exit_reason: Mutex::new(None),
            jail: Mutex::new(None),
            net: Mutex::new(None),
            vsock: Mutex::new(None),
        }
    }

    /// Microseconds since start, now.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(UNSET - 1)
    }

    /// Records `phase` now, unless it was already recorded.
    pub fn mark(&self, phase: Phase) {
        if let Some(slot) = self.marks.get(phase.slot()) {
            // Only the first mark counts.
            let _ =
                slot.compare_exchange(UNSET, self.now_us(), Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// When `phase` happened, if it did.
    pub fn get(&self, phase: Phase) -> Option<u64> {
        let v = self.marks.get(phase.slot())?.load(Ordering::Acquire);
        (v != UNSET).then_some(v)
    }

    /// Records the exit reason (first one wins) and the exit time.
    pub fn set_exit(&self, reason: &str) {
        if let Ok(mut r) = self.exit_reason.lock() {
            if r.is_none() {
                *r = Some(reason.to_string());
            }
        }
        self.mark(Phase::Exit);
    }

    /// Records what the jail did.
    pub fn set_jail(&self, jail: JailReport) {
        if let Ok(mut j) = self.jail.lock() {
            *j = Some(jail);
        }
    }

    /// Reports the net device's counters (read again each time the report is written).
    pub fn set_net_metrics(&self, metrics: Arc<NetMetrics>) {
        if let Ok(mut n) = self.net.lock() {
            *n = Some(metrics);
        }
    }

    /// Reports the vsock device's counters (read again each time the report is written).
    pub fn set_vsock_metrics(&self, metrics: Arc<VsockMetrics>) {
        if let Ok(mut v) = self.vsock.lock() {
            *v = Some(metrics);
        }
    }

    /// The report as it stands.
    pub fn report(&self) -> BootReport {
        let g = |p| self.get(p);
        BootReport {
            args_parsed: g(Phase::ArgsParsed),
            plan_verified: g(Phase::PlanVerified),
            artifacts_measured: g(Phase::ArtifactsMeasured),
            kernel_loaded: g(Phase::KernelLoaded),
            vm_created: g(Phase::VmCreated),
            vcpus_ready: g(Phase::VcpusReady),
            first_kvm_run: g(Phase::FirstKvmRun),
            first_serial_byte: g(Phase::FirstSerialByte),
            init_reached: g(Phase::InitReached),
            agent_ready: g(Phase::AgentReady),
            exit: g(Phase::Exit),
            exit_reason: self.exit_reason.lock().ok().and_then(|r| r.clone()),
            jail: self.jail.lock().ok().and_then(|j| j.clone()),
            net: self
                .net
                .lock()
                .ok()
                .and_then(|n| n.as_deref().map(NetMetrics::counts)),
            vsock: self
                .vsock
                .lock()
                .ok()
                .and_then(|v| v.as_deref().map(VsockMetrics::counts)),
        }
    }

    /// Writes the report as JSON to `path` (replacing it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut json = serde_json::to_vec_pretty(&self.report()).map_err(std::io::Error::other)?;
        json.push(b'\n');
        std::fs::write(path, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_set_once_and_monotonic() {
        let t = BootTimeline::new(Instant::now());
        t.mark(Phase::ArgsParsed);
        let first = t.get(Phase::ArgsParsed).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.mark(Phase::ArgsParsed);
        assert_eq!(t.get(Phase::ArgsParsed), Some(first));
        t.mark(Phase::VmCreated);
        assert!(t.get(Phase::VmCreated).unwrap() >= first + 1000);
        assert_eq!(t.get(Phase::AgentReady), None);
    }

    #[test]
    fn json_has_every_field_with_nulls() {
        let t = BootTimeline::new(Instant::now());
        t.mark(Phase::ArgsParsed);
        t.set_exit("poweroff");
        t.set_exit("ignored");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        t.write(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        for field in [
            "args_parsed",
            "plan_verified",
            "artifacts_measured",
            "kernel_loaded",
            "vm_created",
            "vcpus_ready",
            "first_kvm_run",
            "first_serial_byte",
            "init_reached",
            "agent_ready",
            "exit",
            "exit_reason",
            "jail",
            "net",
        ] {
            assert!(obj.contains_key(field), "missing {field}");
        }
        assert!(obj["jail"].is_null());
        assert!(obj["net"].is_null());
        assert!(obj["args_parsed"].is_u64());
        assert!(obj["vm_created"].is_null());
        assert_eq!(obj["exit_reason"], "poweroff");
        assert!(obj["exit"].as_u64().unwrap() >= obj["args_parsed"].as_u64().unwrap());
    }

    #[test]
    fn net_counters_are_read_when_the_report_is_written() {
        let t = BootTimeline::new(Instant::now());
        let m = Arc::new(NetMetrics::default());
        t.set_net_metrics(Arc::clone(&m));
        m.tx_denied.fetch_add(3, Ordering::Relaxed);
        m.rx_frames.fetch_add(5, Ordering::Relaxed);
        let net = t.report().net.unwrap();
        assert_eq!((net.tx_denied, net.rx_frames, net.tx_frames), (3, 5, 0));
        m.tx_denied.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.report().net.unwrap().tx_denied, 4);
    }

    #[test]
    fn vsock_counters_are_read_when_the_report_is_written() {
        let t = BootTimeline::new(Instant::now());
        assert!(t.report().vsock.is_none());
        let m = Arc::new(VsockMetrics::default());
        t.set_vsock_metrics(Arc::clone(&m));
        m.rx_packets.fetch_add(2, Ordering::Relaxed);
        m.rst_sent.fetch_add(1, Ordering::Relaxed);
        let v = t.report().vsock.unwrap();
        assert_eq!((v.rx_packets, v.rst_sent, v.tx_packets), (2, 1, 0));
    }
}
