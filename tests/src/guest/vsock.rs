//! The `vsock` mode: bulk transfers both ways over virtio-vsock, in both
//! connection directions, checked byte by byte.
//!
//! 1. The guest listens on [`GUEST_PORT`]; the host connects through the VM's
//!    Unix socket (`CONNECT <port>`), sends [`TRANSFER_BYTES`] of
//!    [`pattern`]`(SEED_HOST_TO_GUEST)` and half-closes; the guest checks them and
//!    answers with `pattern(SEED_GUEST_TO_HOST)`.
//! 2. The guest connects to the host (CID 2) on [`HOST_PORT`] (the host listens
//!    on `<uds>_<HOST_PORT>`), sends `pattern(SEED_GUEST_OUT)`, half-closes, and
//!    checks the host's `pattern(SEED_HOST_BACK)`.
//!
//! Then it prints [`VSOCK_OK`] and powers off.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    accept, bind, connect, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag,
    SockType, VsockAddr,
};

use super::{Ending, Guest, GuestError};

/// The port the guest listens on.
pub const GUEST_PORT: u32 = 5000;
/// The port the guest connects to on the host.
pub const HOST_PORT: u32 = 6000;
/// Bytes moved each way on each connection.
pub const TRANSFER_BYTES: usize = 16 << 20;
/// The line the mode prints when every byte arrived intact.
pub const VSOCK_OK: &str = "vsock ok";
/// Seed of the bytes the host sends on the host-initiated connection.
pub const SEED_HOST_TO_GUEST: u8 = 1;
/// Seed of the guest's answer on the host-initiated connection.
pub const SEED_GUEST_TO_HOST: u8 = 2;
/// Seed of the bytes the guest sends on the guest-initiated connection.
pub const SEED_GUEST_OUT: u8 = 3;
/// Seed of the host's answer on the guest-initiated connection.
pub const SEED_HOST_BACK: u8 = 4;

const VMADDR_CID_ANY: u32 = u32::MAX;
const VMADDR_CID_HOST: u32 = 2;
const CHUNK: usize = 64 * 1024;

/// Byte `i` of the stream with `seed`: cheap, position-dependent, and different
/// per seed, so a dropped, duplicated or reordered chunk shows.
pub fn pattern(seed: u8, i: usize) -> u8 {
    let x = (i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(seed).wrapping_mul(0x2545_f491_4f6c_dd1d));
    (x >> 56).to_le_bytes()[0] ^ (i.to_le_bytes()[0])
}

/// Writes `len` bytes of `pattern(seed)`.
pub fn send_pattern<W: Write>(w: &mut W, seed: u8, len: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        for (k, b) in buf.iter_mut().take(n).enumerate() {
            *b = pattern(seed, at + k);
        }
        w.write_all(buf.get(..n).unwrap_or_default())?;
        at += n;
    }
    Ok(())
}

/// Reads to end of file and checks the bytes are exactly `len` of `pattern(seed)`.
/// The error names the first offset that differs.
pub fn check_pattern<R: Read>(r: &mut R, seed: u8, len: usize) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0usize;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read failed after {at} bytes: {e}")),
        };
        for (k, b) in buf.iter().take(n).enumerate() {
            let want = pattern(seed, at + k);
            if *b != want {
                return Err(format!("byte {} is {b:#04x}, expected {want:#04x}", at + k));
            }
        }
        at += n;
        if at > len {
            return Err(format!("more than {len} bytes arrived"));
        }
    }
    if at == len {
        Ok(())
    } else {
        Err(format!("{at} bytes arrived, expected {len}"))
    }
}

fn sys(what: &str) -> impl FnOnce(nix::errno::Errno) -> GuestError + '_ {
    move |e| GuestError::Sys {
        what: what.to_owned(),
        source: std::io::Error::from(e),
    }
}

fn vsock_socket() -> Result<OwnedFd, GuestError> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("vsock socket"))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Sys {
        what: what.to_owned(),
        source,
    }
}

/// Runs the mode.
pub fn run(guest: &Guest) -> Result<Ending, GuestError> {
    let listener = vsock_socket()?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &VsockAddr::new(VMADDR_CID_ANY, GUEST_PORT),
    )
    .map_err(sys("vsock bind"))?;
    listen(&listener, Backlog::new(4).map_err(sys("backlog"))?).map_err(sys("vsock listen"))?;
    guest
        .console
        .say(&format!("vsock listening on {GUEST_PORT}"));

    // 1. Host-initiated.
    let fd = accept(std::os::fd::AsRawFd::as_raw_fd(&listener)).map_err(sys("vsock accept"))?;
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let conn: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let mut stream = File::from(conn.try_clone().map_err(io("dup"))?);
    check_pattern(&mut stream, SEED_HOST_TO_GUEST, TRANSFER_BYTES)
        .map_err(|e| GuestError::Check(format!("host-to-guest: {e}")))?;
    send_pattern(&mut stream, SEED_GUEST_TO_HOST, TRANSFER_BYTES).map_err(io("vsock send"))?;
    shutdown(std::os::fd::AsRawFd::as_raw_fd(&conn), Shutdown::Write)
        .map_err(sys("vsock shutdown"))?;
    // Wait for the host to close, so the bytes are not cut off by our close.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);
    drop(conn);
    guest.console.say("vsock host-initiated ok");

    // 2. Guest-initiated.
    let out = vsock_socket()?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&out),
        &VsockAddr::new(VMADDR_CID_HOST, HOST_PORT),
    )
    .map_err(sys("vsock connect to host"))?;
    let mut stream = File::from(out.try_clone().map_err(io("dup"))?);
    send_pattern(&mut stream, SEED_GUEST_OUT, TRANSFER_BYTES).map_err(io("vsock send"))?;
    shutdown(std::os::fd::AsRawFd::as_raw_fd(&out), Shutdown::Write)
        .map_err(sys("vsock shutdown"))?;
    check_pattern(&mut stream, SEED_HOST_BACK, TRANSFER_BYTES)
        .map_err(|e| GuestError::Check(format!("host-to-guest (guest-initiated): {e}")))?;
    guest.console.say(VSOCK_OK);
    Ok(Ending::PowerOff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_catches_damage() {
        let mut v = Vec::new();
        send_pattern(&mut v, 7, 200_000).unwrap();
        assert_eq!(v.len(), 200_000);
        check_pattern(&mut v.as_slice(), 7, 200_000).unwrap();
        assert!(check_pattern(&mut v.as_slice(), 8, 200_000).is_err());
        assert!(check_pattern(&mut &v[..199_999], 7, 200_000).is_err());
        let mut bad = v.clone();
        bad[123_456] ^= 1;
        let e = check_pattern(&mut bad.as_slice(), 7, 200_000).unwrap_err();
        assert!(e.contains("123456"), "{e}");
        // A chunk repeated: the position-dependence notices.
        let mut dup = v[..65536].to_vec();
        dup.extend_from_slice(&v[..65536]);
        assert!(check_pattern(&mut dup.as_slice(), 7, 131_072).is_err());
    }
}
