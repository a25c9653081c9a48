//! Legacy x86 devices: the 16550 serial console, the i8042 reset line, and the
//! guest-signal port a guest uses to say "init reached", "agent ready" and
//! "power me off".
//!
//! All three sit on the port-I/O bus and are driven synchronously from the vCPU
//! thread that exits on the access. None of them owns a thread; whatever they
//! need to tell the VMM leaves through a callback or an eventfd given at
//! construction, so each is unit-testable by feeding register accesses.

pub mod guest_signal;
pub mod i8042;
pub mod serial;

pub use guest_signal::{GuestSignal, GuestSignalDevice};
pub use i8042::I8042Device;
pub use serial::{EventFdTrigger, SerialDevice};
