//! The guest-signal port: how a guest tells the VMM about milestones it cannot
//! express through any emulated hardware. Documented for guest authors in
//! `docs/guest-signals.md`.
//!
//! A guest writes one byte to [`GUEST_SIGNAL_PORT`] (`outb`, after
//! `ioperm(0x600, 1, 1)` from userspace). Values:
//!
//! | byte | meaning |
//! |------|---------|
//! | 0x01 | init reached (PID 1 is running) |
//! | 0x02 | agent ready (the guest agent serves RPC) |
//! | 0x03 | poweroff requested |
//!
//! The poweroff signal exists because the microVM has no ACPI: a Linux guest's
//! `poweroff` ends in a `hlt` loop that the VMM cannot tell from an idle CPU.
//! Unknown values and other access widths are ignored (and logged), so a
//! guest cannot make the VMM fail through this port.

use crate::bus::BusDevice;

/// The I/O port the guest writes signals to.
pub const GUEST_SIGNAL_PORT: u64 = 0x600;
/// The device decodes exactly one port.
pub const GUEST_SIGNAL_PORT_LEN: u64 = 1;

/// Byte value for [`GuestSignal::InitReached`].
pub const SIGNAL_INIT_REACHED: u8 = 0x01;
/// Byte value for [`GuestSignal::AgentReady`].
pub const SIGNAL_AGENT_READY: u8 = 0x02;
/// Byte value for [`GuestSignal::PoweroffRequested`].
pub const SIGNAL_POWEROFF: u8 = 0x03;

/// A milestone or request from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestSignal {
    /// The guest's init (PID 1) is running.
    InitReached,
    /// The guest agent is ready to serve RPC.
    AgentReady,
    /// The guest asks to be powered off.
    PoweroffRequested,
}

impl GuestSignal {
    /// Decodes one byte written to the port; `None` for unknown values.
    pub fn from_byte(value: u8) -> Option<Self> {
        match value {
            SIGNAL_INIT_REACHED => Some(Self::InitReached),
            SIGNAL_AGENT_READY => Some(Self::AgentReady),
            SIGNAL_POWEROFF => Some(Self::PoweroffRequested),
            _ => None,
        }
    }

    /// The byte a guest writes for this signal.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::InitReached => SIGNAL_INIT_REACHED,
            Self::AgentReady => SIGNAL_AGENT_READY,
            Self::PoweroffRequested => SIGNAL_POWEROFF,
        }
    }
}

/// The port device; `on_signal` runs on the vCPU thread for each valid write.
pub struct GuestSignalDevice {
    on_signal: Box<dyn FnMut(GuestSignal) + Send>,
}

impl GuestSignalDevice {
    /// A port that reports each decoded signal to `on_signal`.
    pub fn new(on_signal: Box<dyn FnMut(GuestSignal) + Send>) -> Self {
        Self { on_signal }
    }
}

impl BusDevice for GuestSignalDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [value]) => match GuestSignal::from_byte(*value) {
                Some(signal) => (self.on_signal)(signal),
                None => tracing::warn!(value, "guest signal port: unknown value ignored"),
            },
            _ => tracing::warn!(
                offset,
                len = data.len(),
                "guest signal port: non-byte write ignored"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn decodes_each_signal_and_ignores_the_rest() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = GuestSignalDevice::new(Box::new(move |sig| s.lock().unwrap().push(sig)));
        dev.write(0, &[0x01]);
        dev.write(0, &[0x00]);
        dev.write(0, &[0x02]);
        dev.write(0, &[0x03, 0x00]);
        dev.write(0, &[0xff]);
        dev.write(0, &[0x03]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                GuestSignal::InitReached,
                GuestSignal::AgentReady,
                GuestSignal::PoweroffRequested
            ]
        );
    }

    #[test]
    fn byte_round_trip() {
        for v in 0..=u8::MAX {
            if let Some(sig) = GuestSignal::from_byte(v) {
                assert_eq!(sig.as_byte(), v);
            }
        }
        assert_eq!(GuestSignal::from_byte(4), None);
    }
}
