//! The legacy devices on the PIO bus: COM1 (the guest's serial console, fed from the
//! VMM's stdin by the `console-in` thread), the i8042 reset line, and the guest-signal
//! port (boot milestones and poweroff). None of them has its own thread or backend to
//! open; they run on the vCPU thread that touches their port.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;
use mvm_devices::legacy::{
    guest_signal, i8042, serial, EventFdTrigger, GuestSignal, GuestSignalDevice, I8042Device,
    SerialDevice,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot_report::{BootTimeline, Phase};
use crate::device_manager::DeviceManager;
use crate::error::{host_err, BootError};
use crate::exit::ExitReason;
use crate::vcpu::VmStopper;
use mvm_seccomp::{allow, roles, Role};

/// The guest-signal port's handler: milestones go to the timeline, poweroff
/// ends the VM.
pub fn guest_signal_handler(
    timeline: Arc<BootTimeline>,
    stopper: VmStopper,
) -> Box<dyn FnMut(GuestSignal) + Send> {
    Box::new(move |signal| match signal {
        GuestSignal::InitReached => timeline.mark(Phase::InitReached),
        GuestSignal::AgentReady => timeline.mark(Phase::AgentReady),
        GuestSignal::PoweroffRequested => stopper.stop(ExitReason::Poweroff),
    })
}

/// The serial console's sink: records the first byte in the timeline, and
/// stops writing (without failing the UART) if the destination breaks.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    timeline: Arc<BootTimeline>,
    broken: bool,
}

impl ConsoleWriter {
    /// Wraps `out`.
    pub fn new(out: Box<dyn Write + Send>, timeline: Arc<BootTimeline>) -> Self {
        Self {
            out,
            timeline,
            broken: false,
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.timeline.mark(Phase::FirstSerialByte);
        }
        if self.broken {
            return Ok(buf.len());
        }
        match self.out.write(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!("guest console output failed, discarding from now on: {e}");
                self.broken = true;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.broken {
            if let Err(e) = self.out.flush() {
                tracing::warn!("guest console flush failed, discarding from now on: {e}");
                self.broken = true;
            }
        }
        Ok(())
    }
}

/// COM1, shared between the PIO bus and the console input thread.
pub type SharedSerial = Arc<Mutex<SerialDevice<ConsoleWriter>>>;

/// Puts COM1 (in `serial_state`, for a restore), the i8042 reset line and the
/// guest-signal port on the PIO bus.
pub fn attach_legacy_devices(
    vm: &VmFd,
    devices: &mut DeviceManager,
    console: Box<dyn Write + Send>,
    timeline: &Arc<BootTimeline>,
    stopper: &VmStopper,
    serial_state: Option<&mvm_devices::legacy::serial::UartState>,
) -> Result<SharedSerial, BootError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
    vm.register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|source| BootError::Kvm {
            what: "KVM_IRQFD (COM1)",
            source,
        })?;
    let trigger = EventFdTrigger::new(irq);
    let writer = ConsoleWriter::new(console, timeline.clone());
    let uart = match serial_state {
        None => SerialDevice::new(trigger, writer),
        // A restored VM's UART, as its driver left it.
        Some(state) => {
            SerialDevice::from_state(trigger, writer, state).map_err(BootError::BootState)?
        }
    };
    let serial = Arc::new(Mutex::new(uart));
    devices.attach_pio(
        serial.clone(),
        serial::COM1_PORT_BASE,
        serial::COM1_PORT_LEN,
    )?;

    let reset = stopper.clone();
    let i8042 = I8042Device::new(Box::new(move || reset.stop(ExitReason::ResetI8042)));
    devices.attach_pio(
        Arc::new(Mutex::new(i8042)),
        i8042::I8042_PORT_BASE,
        i8042::I8042_PORT_LEN,
    )?;

    let signals = GuestSignalDevice::new(guest_signal_handler(timeline.clone(), stopper.clone()));
    devices.attach_pio(
        Arc::new(Mutex::new(signals)),
        guest_signal::GUEST_SIGNAL_PORT,
        guest_signal::GUEST_SIGNAL_PORT_LEN,
    )?;
    Ok(serial)
}

/// The `console-in` thread: the VMM's stdin to the serial port.
pub const CONSOLE_INPUT_ROLE: Role = Role::new("console-input", || {
    roles::thread([
        allow!(SYS_read, "read the VMM's stdin"),
        allow!(
            SYS_clock_nanosleep,
            "back off 5 ms while the UART's input FIFO is full"
        ),
        allow!(
            SYS_nanosleep,
            "the same back-off, on libcs that use nanosleep"
        ),
        allow!(
            SYS_close,
            "when stdin ends as the VM stops, this thread may drop the last reference to the serial port, which closes its output (seen as a SIGSYS in CI)"
        ),
    ])
});

/// Feeds the VMM's stdin to the guest's serial port until EOF.
pub fn spawn_console_input(serial: SharedSerial) -> Result<(), BootError> {
    mvm_devices::thread::builder("console-in")
        .spawn(move || {
            crate::seccomp::enter(&CONSOLE_INPUT_ROLE, "console-in");
            let mut stdin = io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = buf.get(..n).unwrap_or_default();
                while !pending.is_empty() {
                    let taken = match serial.lock() {
                        Ok(mut s) => s.enqueue_input(pending),
                        Err(_) => return,
                    };
                    pending = pending.get(taken..).unwrap_or_default();
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(drop)
        .map_err(host_err("spawning the console input thread"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    use crate::vcpu::VmEvent;

    struct FailingSink;
    impl Write for FailingSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn console_writer_marks_the_first_byte_and_survives_a_broken_sink() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let mut w = ConsoleWriter::new(Box::new(FailingSink), timeline.clone());
        w.write_all(&[]).unwrap();
        assert_eq!(timeline.get(Phase::FirstSerialByte), None);
        // A broken console must not fail the UART (and so the guest).
        w.write_all(b"x").unwrap();
        w.flush().unwrap();
        w.write_all(b"y").unwrap();
        assert!(timeline.get(Phase::FirstSerialByte).is_some());
    }

    #[test]
    fn guest_signals_mark_milestones_and_poweroff_stops_once() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut handler = guest_signal_handler(timeline.clone(), VmStopper::new(tx, stop.clone()));
        handler(GuestSignal::InitReached);
        handler(GuestSignal::AgentReady);
        assert!(!stop.load(Ordering::Acquire));
        handler(GuestSignal::PoweroffRequested);
        handler(GuestSignal::PoweroffRequested);
        assert!(stop.load(Ordering::Acquire));
        assert!(timeline.get(Phase::InitReached).is_some());
        assert!(timeline.get(Phase::AgentReady).is_some());
        let events: Vec<VmEvent> = rx.try_iter().collect();
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0], VmEvent::Exit(ExitReason::Poweroff)));
    }
}
