//! The 16550A UART the guest uses as its console (`console=ttyS0`).
//!
//! The register model is `vm-superio`'s `Serial`; this module adapts it to the
//! [`BusDevice`] trait and raises its interrupt through an eventfd that the VMM
//! registers as an irqfd for the UART's IRQ line.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// I/O port base of COM1.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// Number of ports a 16550 decodes (THR/RBR .. SCR).
pub const COM1_PORT_LEN: u64 = 8;
/// ISA IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// A [`Trigger`] that signals an eventfd (registered with KVM as an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's registers and receive FIFO, as a snapshot keeps them (`vm-superio`'s
/// `SerialState`, field for field, with serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for UartState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for vm_superio::serial::SerialState {
    fn from(s: &UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 on the port bus: guest output goes to `W` (stdout or a log file).
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART that writes guest output to `out` and interrupts through `irq`.
    pub fn new(irq: EventFdTrigger, out: W) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// A UART in `state` (a snapshot's), writing to `out` and interrupting through `irq`.
    /// A receive FIFO longer than the UART's is refused.
    pub fn from_state(irq: EventFdTrigger, out: W, state: &UartState) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState::from(state);
        Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("serial state: {e}"))
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> UartState {
        self.uart.state().into()
    }

    /// Queues host input for the guest to read; returns how many bytes fit in
    /// the receive FIFO (the rest must be offered again later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::warn!("serial input dropped: {e}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.uart.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [byte]) => *byte = self.uart.read(reg),
            (_, data) => {
                tracing::debug!(offset, len = data.len(), "serial: unsupported read width");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [value]) => {
                if let Err(e) = self.uart.write(reg, *value) {
                    tracing::warn!("serial write to register {reg}: {e}");
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "serial: unsupported write width"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line status register offset and its "THR empty" bits.
    const LSR: u64 = 5;
    /// Interrupt enable register.
    const IER: u64 = 1;

    fn device() -> SerialDevice<Vec<u8>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        SerialDevice::new(EventFdTrigger::new(evt), Vec::new())
    }

    #[test]
    fn output_bytes_reach_the_writer() {
        let mut dev = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.writer().as_slice(), b"hi\n");
    }

    #[test]
    fn transmitter_reads_as_empty() {
        let mut dev = device();
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let mut dev = device();
        dev.write(IER, &[0x01]); // received-data-available interrupt
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(dev.uart.interrupt_evt().event_fd().read().unwrap(), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [b'a']);
    }

    #[test]
    fn a_uart_restored_from_its_state_reads_the_same() {
        let mut dev = device();
        dev.write(3, &[0x80]); // LCR: DLAB
        dev.write(0, &[0x0c]); // divisor 12
        dev.write(3, &[0x03]); // LCR: 8N1
        dev.write(IER, &[0x01]);
        dev.write(7, &[0x5a]); // scratch
        assert_eq!(dev.enqueue_input(b"xy"), 2);
        let state = dev.state();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back =
            SerialDevice::from_state(EventFdTrigger::new(evt), Vec::new(), &state).unwrap();
        assert_eq!(back.state(), state);
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        back.read(0, &mut b);
        assert_eq!(b, [b'x']);
        let mut too_full = state.clone();
        too_full.in_buffer = vec![0; 1 << 12];
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::from_state(EventFdTrigger::new(evt), Vec::new(), &too_full).is_err());
    }

    #[test]
    fn wide_accesses_are_ignored_not_fatal() {
        let mut dev = device();
        dev.write(0, &[1, 2]);
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        assert!(dev.writer().is_empty());
        dev.write(u64::MAX, &[1]);
        assert!(dev.writer().is_empty());
    }
}
