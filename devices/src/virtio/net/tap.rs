//! The host end of the network device: a tap interface, opened by name.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio
//! header (`TUNSETVNETHDRSZ`), so every read and write carries the same
//! `struct virtio_net_hdr_v1` the guest sees, and with no offloads (`TUNSETOFFLOAD 0`),
//! so the kernel checksums and segments everything before the device reads it. The fd is
//! non-blocking: a full tap drops a frame, it never stalls the device thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_SIZE;

/// The tun/tap clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name (`IFNAMSIZ` minus the NUL, linux/if.h).
pub const MAX_IFNAME_LEN: usize = 15;

/// How long [`Tap::open`] retries a tap that another process holds for a moment.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the device needs from its host end: whole frames, each with its virtio header,
/// in and out, without blocking.
pub trait FrameBackend: AsRawFd + Send {
    /// Reads one frame (virtio header first) into `buf`. `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (virtio header first). `WouldBlock` when the host side is full.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// Why the tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("tap name {0:?} must be 1 to 15 characters of A-Z a-z 0-9 _ . -")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_DEVICE}: {0}")]
    OpenTun(#[source] io::Error),
    /// An ioctl on the tap failed.
    #[error("tap {name}: {ioctl} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which ioctl.
        ioctl: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Tap {
    /// Opens (creating it if needed, which takes CAP_NET_ADMIN) the tap interface `name`.
    /// An interface created here disappears when the last fd on it closes, unless the host
    /// made it persistent (`ip tuntap add`).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.chars().take(32).collect()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        let ioctl_err = |ioctl: &'static str| TapError::Ioctl {
            name: name.to_owned(),
            ioctl,
            source: io::Error::last_os_error(),
        };

        // SAFETY: `ifreq` is plain old data (a byte array and a union of integers and
        // pointers); all zeroes is a valid value of it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap_or(0);
        // A tap takes one attachment at a time, and the runtime that made this one may
        // have a forked child holding a copy of its fd for a moment (until the child
        // execs): `EBUSY` is retried briefly before it counts.
        let start = std::time::Instant::now();
        loop {
            let mut attempt = ifr;
            // SAFETY: TUNSETIFF reads and writes one `ifreq`; `attempt` is a valid,
            // exclusively borrowed `ifreq` that outlives the call, and the fd is ours.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut attempt) } >= 0 {
                break;
            }
            let err = ioctl_err("TUNSETIFF");
            let busy = matches!(&err, TapError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::EBUSY));
            if !busy || start.elapsed() >= BUSY_WAIT {
                return Err(err);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let hdr_size = libc::c_int::try_from(VNET_HDR_SIZE).unwrap_or(0);
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid for
        // the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_size) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "tap 0", "tap/0", "tap%d"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
