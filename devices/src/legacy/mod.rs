//! Legacy x86 devices: the 16550 serial console and the i8042 reset line.
