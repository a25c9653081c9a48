//! A virtio-mmio slot driven by hand: the driver unbound through sysfs, the 4 KiB register
//! window mapped from `/dev/mem`, and every access a real load or store, so each one
//! reaches the VMM as a KVM MMIO exit of exactly that width.

use std::arch::asm;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::dma::PAGE;
use super::ring::Vq;

/// Register offsets (linux/virtio_mmio.h).
pub mod reg {
    /// MagicValue.
    pub const MAGIC: usize = 0x000;
    /// Version.
    pub const VERSION: usize = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: usize = 0x008;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: usize = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: usize = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: usize = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: usize = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: usize = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: usize = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: usize = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: usize = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: usize = 0x064;
    /// Status.
    pub const STATUS: usize = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: usize = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    /// QueueDriverLow.
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    /// QueueDeviceLow.
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    /// Device config space.
    pub const CONFIG: usize = 0x100;
}

/// Status bits (linux/virtio_config.h).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACK: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 64;
    /// FAILED.
    pub const FAILED: u32 = 128;
}

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// VIRTIO_F_VERSION_1 is bit 0 of feature word 1.
pub const VERSION_1_WORD1: u32 = 1;

/// How long a scenario waits for the device thread to react.
pub const REACT: Duration = Duration::from_secs(10);

/// One `virtio_mmio.device=SIZE@BASE:IRQ` entry of the kernel command line, in order:
/// the Nth entry is platform device `virtio-mmio.N`.
pub fn cmdline_slots(cmdline: &str) -> Vec<u64> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(|v| {
            let base = v.split_once('@')?.1.split(':').next()?;
            u64::from_str_radix(base.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

/// A mapped register window.
#[derive(Debug)]
pub struct Slot {
    ptr: NonNull<u8>,
    /// Guest-physical base.
    pub base: u64,
    /// `virtio-mmio.N`.
    pub platform: String,
}

/// Unbinds the virtio-mmio driver from `platform` (`virtio-mmio.N`); already unbound is fine.
pub fn unbind(platform: &str) -> Result<(), String> {
    let driver = format!("/sys/bus/platform/devices/{platform}/driver");
    if std::fs::symlink_metadata(&driver).is_err() {
        return Ok(());
    }
    std::fs::write("/sys/bus/platform/drivers/virtio-mmio/unbind", platform)
        .map_err(|e| format!("unbind {platform}: {e}"))
}

/// Binds the virtio-mmio driver to `platform` again (the guest driver probes and resets it).
pub fn bind(platform: &str) -> Result<(), String> {
    std::fs::write("/sys/bus/platform/drivers/virtio-mmio/bind", platform)
        .map_err(|e| format!("bind {platform}: {e}"))
}

impl Slot {
    /// Maps the slot at `base` through `/dev/mem`.
    pub fn map(base: u64, platform: &str) -> Result<Self, String> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(|e| format!("open /dev/mem: {e}"))?;
        let offset = libc::off_t::try_from(base).map_err(|e| e.to_string())?;
        // SAFETY: a new shared mapping of the device window; the fd is valid for the call
        // and the kernel checks the range against STRICT_DEVMEM. Checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                offset,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(format!(
                "mmap /dev/mem at {base:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or("mmap returned null")?;
        let slot = Self {
            ptr,
            base,
            platform: platform.to_owned(),
        };
        let magic = slot.r32(reg::MAGIC);
        if magic != MAGIC {
            return Err(format!(
                "{platform} at {base:#x}: magic {magic:#x}, not a virtio-mmio slot"
            ));
        }
        Ok(slot)
    }

    /// The address of `width` bytes at `off`, if they lie inside the window.
    fn at(&self, off: usize, width: usize) -> Option<*mut u8> {
        (off + width <= PAGE).then(|| {
            // SAFETY: off + width <= PAGE, inside the mapping owned by self.
            unsafe { self.ptr.as_ptr().add(off) }
        })
    }

    // Every access is one `mov` of exactly the scenario's width, written in assembly: Rust's
    // volatile accesses require alignment, and unaligned register accesses are scenarios.

    /// A 4-byte read at `off` (any alignment).
    pub fn r32(&self, off: usize) -> u32 {
        let Some(p) = self.at(off, 4) else { return 0 };
        let v: u32;
        // SAFETY: p is inside the live mapping (checked by `at`); the load touches 4 bytes
        // of device memory and nothing else.
        unsafe {
            asm!("mov {v:e}, dword ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// A 1-byte read.
    pub fn r8(&self, off: usize) -> u8 {
        let Some(p) = self.at(off, 1) else { return 0 };
        let v: u8;
        // SAFETY: as in `r32`, 1 byte.
        unsafe {
            asm!("mov {v}, byte ptr [{p}]", p = in(reg) p, v = out(reg_byte) v, options(nostack, preserves_flags))
        };
        v
    }

    /// A 2-byte read.
    pub fn r16(&self, off: usize) -> u16 {
        let Some(p) = self.at(off, 2) else { return 0 };
        let v: u16;
        // SAFETY: as in `r32`, 2 bytes.
        unsafe {
            asm!("mov {v:x}, word ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// An 8-byte read.
    pub fn r64(&self, off: usize) -> u64 {
        let Some(p) = self.at(off, 8) else { return 0 };
        let v: u64;
        // SAFETY: as in `r32`, 8 bytes.
        unsafe {
            asm!("mov {v}, qword ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// A 4-byte write (any alignment). Earlier stores to the rings are ordered before it.
    pub fn w32(&self, off: usize, v: u32) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let Some(p) = self.at(off, 4) else { return };
        // SAFETY: p is inside the live mapping (checked by `at`); the store touches 4 bytes
        // of device memory and nothing else.
        unsafe {
            asm!("mov dword ptr [{p}], {v:e}", p = in(reg) p, v = in(reg) v, options(nostack, preserves_flags))
        };
    }

    /// A 1-byte write.
    pub fn w8(&self, off: usize, v: u8) {
        let Some(p) = self.at(off, 1) else { return };
        // SAFETY: as in `w32`, 1 byte.
        unsafe {
            asm!("mov byte ptr [{p}], {v}", p = in(reg) p, v = in(reg_byte) v, options(nostack, preserves_flags))
        };
    }

    /// A 2-byte write.
    pub fn w16(&self, off: usize, v: u16) {
        let Some(p) = self.at(off, 2) else { return };
        // SAFETY: as in `w32`, 2 bytes.
        unsafe {
            asm!("mov word ptr [{p}], {v:x}", p = in(reg) p, v = in(reg) v, options(nostack, preserves_flags))
        };
    }

    /// An 8-byte write (one instruction, one 8-byte MMIO exit).
    pub fn w64(&self, off: usize, v: u64) {
        let Some(p) = self.at(off, 8) else { return };
        // SAFETY: as in `w32`, 8 bytes.
        unsafe {
            asm!("mov qword ptr [{p}], {v}", p = in(reg) p, v = in(reg) v, options(nostack, preserves_flags))
        };
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.r32(reg::STATUS)
    }

    /// Whether the device reports NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status() & status::NEEDS_RESET != 0
    }

    /// Waits up to [`REACT`] for NEEDS_RESET.
    pub fn expect_needs_reset(&self, what: &str) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < REACT {
            if self.needs_reset() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!(
            "{what}: device did not report NEEDS_RESET (status {:#x})",
            self.status()
        ))
    }

    /// Fails if the device reports NEEDS_RESET.
    pub fn expect_healthy(&self, what: &str) -> Result<(), String> {
        if self.needs_reset() {
            Err(format!(
                "{what}: unexpected NEEDS_RESET (status {:#x})",
                self.status()
            ))
        } else {
            Ok(())
        }
    }

    /// Resets the device and waits until Status reads 0.
    pub fn reset(&self) -> Result<(), String> {
        self.w32(reg::STATUS, 0);
        let start = Instant::now();
        while start.elapsed() < REACT {
            if self.status() == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
            self.w32(reg::STATUS, 0);
        }
        Err(format!(
            "{}: status {:#x} after reset",
            self.platform,
            self.status()
        ))
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept `word0` and VERSION_1, FEATURES_OK (checked).
    pub fn negotiate(&self, word0: u32) -> Result<(), String> {
        self.reset()?;
        self.w32(reg::STATUS, status::ACK);
        self.w32(reg::STATUS, status::ACK | status::DRIVER);
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let offered = self.r32(reg::DEVICE_FEATURES);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, word0 & offered);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, VERSION_1_WORD1);
        self.w32(
            reg::STATUS,
            status::ACK | status::DRIVER | status::FEATURES_OK,
        );
        let s = self.status();
        if s & status::FEATURES_OK == 0 {
            return Err(format!(
                "{}: FEATURES_OK refused (status {s:#x})",
                self.platform
            ));
        }
        Ok(())
    }

    /// Programs queue `index` from `vq`'s addresses and size, without QueueReady.
    pub fn program_queue(&self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(reg::QUEUE_SEL, index);
        self.w32(reg::QUEUE_NUM, size);
        for (low, value) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            self.w32(low, u32::try_from(value & 0xffff_ffff).unwrap_or(0));
            self.w32(low + 4, u32::try_from(value >> 32).unwrap_or(0));
        }
    }

    /// Programs queue `index` for `vq` and sets QueueReady; fails if the device refused.
    pub fn add_queue(&self, index: u32, vq: &Vq) -> Result<(), String> {
        self.program_queue(
            index,
            u32::from(vq.size),
            vq.desc_addr(),
            vq.avail_addr(),
            vq.used_addr(),
        );
        self.w32(reg::QUEUE_READY, 1);
        if self.r32(reg::QUEUE_READY) != 1 {
            return Err(format!(
                "{}: queue {index} not ready (status {:#x})",
                self.platform,
                self.status()
            ));
        }
        Ok(())
    }

    /// Sets DRIVER_OK; fails if the device did not take it.
    pub fn driver_ok(&self) -> Result<(), String> {
        self.w32(
            reg::STATUS,
            status::ACK | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let s = self.status();
        if s & status::DRIVER_OK == 0 || s & status::NEEDS_RESET != 0 {
            return Err(format!(
                "{}: DRIVER_OK refused (status {s:#x})",
                self.platform
            ));
        }
        Ok(())
    }

    /// Kicks queue `index`.
    pub fn notify(&self, index: u32) {
        self.w32(reg::QUEUE_NOTIFY, index);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), PAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_from_the_cmdline_in_order() {
        let c = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 quiet \
                 virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=bad";
        assert_eq!(cmdline_slots(c), vec![0xd000_0000, 0xd000_1000]);
        assert!(cmdline_slots("quiet").is_empty());
    }
}
