//! Where a redirected connection was going: netfilter's record of the destination
//! before `dnat` rewrote it to the proxy.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;

use super::OriginalDst;

/// The original destination of `stream`, as `how` says to learn it.
pub(super) fn original_destination(
    stream: &TcpStream,
    how: OriginalDst,
) -> io::Result<SocketAddrV4> {
    match how {
        OriginalDst::Fixed(address) => Ok(address),
        OriginalDst::Netfilter => netfilter(stream),
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: conntrack's original destination (the socket's
/// own local address when the connection was not NATed).
fn netfilter(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    let mut address = libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let size = std::mem::size_of::<libc::sockaddr_in>();
    let mut len = libc::socklen_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: the descriptor is the open socket `stream` owns for the whole call;
    // `address` is a writable sockaddr_in and `len` holds its exact size, so the kernel
    // writes at most that many bytes into it and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut address).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let family_ok = libc::c_int::from(address.sin_family) == libc::AF_INET;
    if !family_ok || usize::try_from(len).ok() != Some(size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST did not give an IPv4 address",
        ));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)),
        u16::from_be(address.sin_port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn fixed_is_fixed_and_netfilter_answers_or_fails_cleanly() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let fixed = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 443);
        assert_eq!(
            original_destination(&server, OriginalDst::Fixed(fixed)).unwrap(),
            fixed
        );
        // Without conntrack (no nf_conntrack loaded) this is ENOENT/ENOPROTOOPT; with it,
        // an un-NATed connection's original destination is its own local address.
        match original_destination(&server, OriginalDst::Netfilter) {
            Ok(address) => assert_eq!(
                std::net::SocketAddr::V4(address),
                server.local_addr().unwrap()
            ),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
        drop(client);
    }
}
