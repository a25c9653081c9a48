//! The i8042 keyboard controller, reduced to the one thing a microVM guest uses
//! it for: the CPU reset line. Linux reboots (`reboot=k`, and the fallback
//! chain after a `panic=-1` panic) by writing the "pulse reset line" command
//! (0xFE) to the command port.
//!
//! There is no keyboard behind it. The status register always reads
//! [`I8042_STATUS_NO_CONTROLLER`]: "output buffer full, input buffer empty",
//! and the data port reads 0xFF. Linux's i8042 driver drains the output buffer
//! at probe time, gives up after 16 reads ("No controller found") instead of
//! polling for half a second per command; its reset path only waits for an
//! empty input buffer, so the 0xFE command arrives at once.

use crate::bus::BusDevice;

/// First port the device decodes (data port).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64: data at offset 0, status/command at offset 4.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the status (read) / command (write) port from the base.
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// Status register value: OBF set (bit 0), IBF clear (bit 1).
pub const I8042_STATUS_NO_CONTROLLER: u8 = 0x01;
/// Data register value: nothing behind the controller.
pub const I8042_DATA_EMPTY: u8 = 0xff;
/// Command byte: pulse the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// The reset line. `on_reset` runs (on the vCPU thread) each time the guest
/// pulses it; the VMM ends the VM there.
pub struct I8042Device {
    on_reset: Box<dyn FnMut() + Send>,
}

impl I8042Device {
    /// A controller that calls `on_reset` when the guest asks for a reset.
    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == I8042_COMMAND_OFFSET {
            I8042_STATUS_NO_CONTROLLER
        } else {
            I8042_DATA_EMPTY
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data == [I8042_CMD_RESET_CPU] {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn device() -> (I8042Device, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let dev = I8042Device::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, count)
    }

    #[test]
    fn reset_command_pulls_the_line() {
        let (mut dev, count) = device();
        dev.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn other_writes_do_nothing() {
        let (mut dev, count) = device();
        dev.write(0, &[I8042_CMD_RESET_CPU]); // data port, not command
        dev.write(I8042_COMMAND_OFFSET, &[0xad]); // disable keyboard
        dev.write(I8042_COMMAND_OFFSET, &[0xfe, 0]); // wrong width
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn status_reads_as_no_controller_ready_for_commands() {
        let (mut dev, _) = device();
        let mut status = [0xaau8];
        dev.read(I8042_COMMAND_OFFSET, &mut status);
        // Input buffer empty (a reset command is accepted at once), output
        // buffer "full" (a probing driver drains it and finds no controller).
        assert_eq!(status[0] & 0x02, 0);
        assert_eq!(status[0] & 0x01, 1);
        let mut data = [0u8];
        dev.read(0, &mut data);
        assert_eq!(data, [0xff]);
    }
}
