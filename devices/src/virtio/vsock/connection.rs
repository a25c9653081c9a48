//! One vsock stream connection between a guest socket and a host stream.
//!
//! The state machine sees validated guest packets ([`Connection::on_guest_packet`]),
//! readiness of the host stream ([`Connection::on_host_readable`],
//! [`Connection::on_host_writable`]) and RX buffers from the guest
//! ([`Connection::next_rx`]). It never blocks and never buffers without bound:
//!
//! - guest to host: the device offers the guest [`CONN_BUF_ALLOC`] bytes of credit
//!   (`buf_alloc`) and reports what it has written to the host stream (`fwd_cnt`);
//!   a guest that sends past its credit gets an RST, so at most `buf_alloc` bytes
//!   wait for a slow host reader.
//! - host to guest: the device reads from the host stream only as much as the
//!   guest's announced free space (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`), so
//!   a slow guest reader leaves the bytes in the host socket's kernel buffer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;

use super::packet::{Op, TxPacket, VsockHeader};
use super::{
    CONN_BUF_ALLOC, VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
};

/// The host end of a connection: a non-blocking byte stream that can be half-closed.
pub trait HostStream: Read + Write {
    /// Tells the host peer that no more bytes will come (`shutdown(SHUT_WR)`).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl HostStream for std::os::unix::net::UnixStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected (`CONNECT <port>`); a REQUEST is going to the guest and
    /// the device waits for its RESPONSE.
    Connecting,
    /// Both ends accepted; data flows within each side's credit.
    Established,
    /// The connection is over; an RST may still be waiting for an RX buffer.
    Closed,
}

/// A vsock stream connection. `S` is the host stream (a `UnixStream` in the device).
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    guest_cid: u64,
    /// The host-side port (the `src_port` of packets to the guest).
    local_port: u32,
    /// The guest-side port.
    peer_port: u32,
    state: ConnState,

    // Control packets owed to the guest, sent in this order of priority.
    pending_rst: bool,
    pending_request: bool,
    pending_response: bool,
    pending_shutdown_send: bool,
    pending_credit_update: bool,
    pending_credit_request: bool,

    /// Bytes for the host that are not guest data (the `OK <port>\n` line); sent first.
    host_prefix: Vec<u8>,
    /// Guest data not yet written to the host stream. At most `buf_alloc` bytes.
    tx_buf: VecDeque<u8>,
    /// The guest sends no more (SHUTDOWN with SEND).
    peer_shut_send: bool,
    /// The guest receives no more (SHUTDOWN with RCV).
    peer_shut_rcv: bool,
    /// `shutdown(SHUT_WR)` has been done on the host stream.
    host_write_shut: bool,
    /// The host stream reached end of file.
    host_eof: bool,
    /// The host stream had data last time we looked; reading is driven by RX
    /// buffers, not by readiness, so this stays set until a read would block.
    host_readable: bool,
    /// A CREDIT_REQUEST has been sent and not answered yet.
    credit_requested: bool,

    buf_alloc: u32,
    /// Guest bytes written to the host stream, ever.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last announced to the guest.
    fwd_cnt_announced: Wrapping<u32>,
    /// Host bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            pending_rst: false,
            pending_request: false,
            pending_response: false,
            pending_shutdown_send: false,
            pending_credit_update: false,
            pending_credit_request: false,
            host_prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_write_shut: false,
            host_eof: false,
            host_readable: false,
            credit_requested: false,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: Wrapping(0),
            fwd_cnt_announced: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// A connection the host opened with `CONNECT <peer_port>`: a REQUEST for the
    /// guest is pending.
    pub fn new_host_initiated(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::Connecting,
        );
        c.pending_request = true;
        c
    }

    /// A connection the guest opened with `hdr` (a REQUEST) and that the host side
    /// accepted: a RESPONSE for the guest is pending.
    pub fn new_guest_initiated(stream: S, guest_cid: u64, hdr: &VsockHeader) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            hdr.dst_port,
            hdr.src_port,
            ConnState::Established,
        );
        c.update_peer_credit(hdr);
        c.pending_response = true;
        c
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream (for registering it with epoll).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Guest bytes waiting for the host reader.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes the guest may still send to the host before it must wait for credit, by
    /// the device's accounting.
    pub fn guest_credit(&self) -> u32 {
        let held = u32::try_from(self.tx_buf.len()).unwrap_or(u32::MAX);
        self.buf_alloc.saturating_sub(held)
    }

    /// Bytes the device may still send to the guest, by the guest's last word.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the device should watch the host stream for input.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.peer_shut_rcv
            && !self.host_eof
            && !self.host_readable
    }

    /// Whether the device should watch the host stream for output space.
    pub fn wants_write(&self) -> bool {
        self.state != ConnState::Closed && (!self.host_prefix.is_empty() || !self.tx_buf.is_empty())
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_pending_rx(&self) -> bool {
        self.pending_rst
            || (self.state != ConnState::Closed
                && (self.pending_request
                    || self.pending_response
                    || self.pending_shutdown_send
                    || self.pending_credit_update
                    || self.pending_credit_request
                    || self.data_ready()))
    }

    /// Whether the connection is over and owes the guest nothing: the device can
    /// forget it (dropping the host stream closes it).
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Closed && !self.pending_rst
    }

    fn data_ready(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.peer_shut_rcv
            && !self.host_eof
            && (self.peer_free() > 0 || !self.credit_requested)
    }

    /// Ends the connection abruptly: the guest gets an RST, the host stream closes
    /// when the connection is dropped.
    pub fn reset(&mut self) {
        if self.state != ConnState::Closed {
            self.state = ConnState::Closed;
            self.pending_rst = true;
            self.tx_buf = VecDeque::new();
            self.host_prefix = Vec::new();
        }
    }

    /// Ends the connection without telling the guest (it sent the RST, or it is gone).
    pub fn close_silently(&mut self) {
        self.state = ConnState::Closed;
        self.pending_rst = false;
        self.tx_buf = VecDeque::new();
        self.host_prefix = Vec::new();
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        let new = Wrapping(hdr.fwd_cnt);
        if new != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_fwd_cnt = new;
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
    }

    /// Acts on a validated packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, pkt: &TxPacket<'_>) {
        if self.state == ConnState::Closed {
            // Whatever it is, the connection is gone; an RST is already owed or sent.
            return;
        }
        if pkt.op == Op::Rst {
            self.close_silently();
            return;
        }
        self.update_peer_credit(&pkt.hdr);
        match (self.state, pkt.op) {
            (ConnState::Connecting, Op::Response) => {
                self.state = ConnState::Established;
                self.host_prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host();
            }
            (ConnState::Connecting, _) => self.reset(),
            (ConnState::Established, Op::Rw) => self.on_guest_data(pkt.data),
            (ConnState::Established, Op::CreditUpdate) => {}
            (ConnState::Established, Op::CreditRequest) => self.pending_credit_update = true,
            (ConnState::Established, Op::Shutdown { rcv, send }) => {
                self.peer_shut_rcv |= rcv;
                self.peer_shut_send |= send;
                self.after_shutdown();
            }
            (ConnState::Established, Op::Request | Op::Response) => self.reset(),
            (_, Op::Rst) | (ConnState::Closed, _) => {}
        }
    }

    fn on_guest_data(&mut self, data: &[u8]) {
        if self.peer_shut_send {
            // Data after the guest said it would send no more.
            self.reset();
            return;
        }
        if self.host_write_shut {
            // The host end is gone for writing; nobody can take these bytes.
            self.reset();
            return;
        }
        let free = usize::try_from(self.guest_credit()).unwrap_or(0);
        if data.len() > free {
            tracing::warn!(
                local_port = self.local_port,
                peer_port = self.peer_port,
                len = data.len(),
                credit = free,
                "vsock: guest sent past its credit, resetting the connection"
            );
            self.reset();
            return;
        }
        let mut rest = data;
        if self.host_prefix.is_empty() && self.tx_buf.is_empty() {
            match write_some(&mut self.stream, rest) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(0));
                    rest = rest.get(n..).unwrap_or_default();
                }
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        self.tx_buf.extend(rest);
        self.maybe_announce_credit();
    }

    /// Writes as much buffered host-bound data as the host stream takes.
    pub fn on_host_writable(&mut self) {
        self.flush_to_host();
    }

    fn flush_to_host(&mut self) {
        if self.state == ConnState::Closed {
            return;
        }
        while !self.host_prefix.is_empty() {
            match write_some(&mut self.stream, &self.host_prefix) {
                Ok(0) => return,
                Ok(n) => {
                    self.host_prefix.drain(..n.min(self.host_prefix.len()));
                }
                Err(_) => return self.reset(),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n.min(self.tx_buf.len()));
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(0));
                }
                Err(_) => return self.reset(),
            }
        }
        self.maybe_announce_credit();
        self.after_shutdown();
    }

    /// Announces credit when the guest may be waiting for it: once a quarter of
    /// the buffer has been forwarded since the last announcement.
    fn maybe_announce_credit(&mut self) {
        let unannounced = (self.fwd_cnt - self.fwd_cnt_announced).0;
        if unannounced >= self.buf_alloc / 4 {
            self.pending_credit_update = true;
        }
    }

    /// Carries out the guest's shutdown once the buffered data has gone out.
    fn after_shutdown(&mut self) {
        // The `OK` line and the guest's data go out before the host sees end of file.
        if self.state != ConnState::Established
            || !self.host_prefix.is_empty()
            || !self.tx_buf.is_empty()
        {
            return;
        }
        if self.peer_shut_send && !self.host_write_shut {
            // Best effort: the host reader sees end of file.
            let _ = self.stream.shutdown_write();
            self.host_write_shut = true;
        }
        if self.peer_shut_send && self.peer_shut_rcv {
            // The guest closed both ways and everything it sent reached the host:
            // confirm with an RST, which frees the guest socket.
            self.state = ConnState::Closed;
            self.pending_rst = true;
        }
    }

    /// Notes that the host stream has input (or end of file, or an error) to read.
    pub fn on_host_readable(&mut self) {
        if self.state == ConnState::Established {
            self.host_readable = true;
        }
    }

    /// Produces the next packet for the guest, with its payload (if any) in
    /// `buf[..hdr.len]`. `buf` is sized to what the guest's RX buffer can hold;
    /// returns `None` when nothing is owed now.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
        if self.pending_rst {
            self.pending_rst = false;
            self.state = ConnState::Closed;
            return Some(self.header(VIRTIO_VSOCK_OP_RST, 0, 0));
        }
        if self.state == ConnState::Closed {
            return None;
        }
        if self.pending_request {
            self.pending_request = false;
            return Some(self.header(VIRTIO_VSOCK_OP_REQUEST, 0, 0));
        }
        if self.pending_response {
            self.pending_response = false;
            return Some(self.header(VIRTIO_VSOCK_OP_RESPONSE, 0, 0));
        }
        if self.data_ready() {
            if let Some(h) = self.read_host_data(buf) {
                return Some(h);
            }
            if self.pending_rst {
                return self.next_rx(buf);
            }
        }
        if self.pending_shutdown_send {
            self.pending_shutdown_send = false;
            return Some(self.header(VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND, 0));
        }
        if self.pending_credit_update {
            return Some(self.header(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0));
        }
        if self.pending_credit_request {
            self.pending_credit_request = false;
            return Some(self.header(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 0));
        }
        None
    }

    fn read_host_data(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
        let free = usize::try_from(self.peer_free()).unwrap_or(0);
        if free == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                return Some(self.header(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 0));
            }
            return None;
        }
        let want = free.min(buf.len());
        let dst = buf.get_mut(..want)?;
        if dst.is_empty() {
            // The RX buffer only fits a header; data waits for a bigger one.
            return None;
        }
        match self.stream.read(dst) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                self.pending_shutdown_send = true;
                None
            }
            Ok(n) => {
                let len = u32::try_from(n).ok()?;
                self.rx_cnt += Wrapping(len);
                Some(self.header(VIRTIO_VSOCK_OP_RW, 0, len))
            }
            Err(e) if is_transient(&e) => {
                self.host_readable = false;
                None
            }
            Err(_) => {
                self.reset();
                None
            }
        }
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> VsockHeader {
        // Every packet carries the current credit, so it counts as an announcement.
        self.fwd_cnt_announced = self.fwd_cnt;
        self.pending_credit_update = false;
        VsockHeader {
            src_cid: VMADDR_CID_HOST,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Writes what the stream takes without blocking; `Ok(0)` means it is full.
fn write_some<W: Write>(w: &mut W, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = data.get(done..) {
        if rest.is_empty() {
            break;
        }
        match w.write(rest) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::vsock::packet::parse_tx_packet;
    use crate::virtio::vsock::packet::write_rx_packet;
    use crate::virtio::vsock::VIRTIO_VSOCK_SHUTDOWN_RCV;

    /// An in-memory host stream: takes `write_room` bytes before blocking, hands out
    /// `input` then end of file (if `eof`) or would-block.
    #[derive(Debug, Default)]
    pub(crate) struct TestStream {
        pub written: Vec<u8>,
        pub write_room: usize,
        pub input: VecDeque<u8>,
        pub eof: bool,
        pub broken: bool,
        pub shut_wr: bool,
    }

    impl Read for TestStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::ConnectionReset));
            }
            if self.input.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::Error::from(io::ErrorKind::WouldBlock))
                };
            }
            self.input.read(buf)
        }
    }

    impl Write for TestStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let n = buf.len().min(self.write_room);
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            self.written.extend_from_slice(&buf[..n]);
            self.write_room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HostStream for TestStream {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut_wr = true;
            Ok(())
        }
    }

    const GUEST: u64 = 3;

    fn guest_hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST,
            dst_cid: VMADDR_CID_HOST,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn feed(c: &mut Connection<TestStream>, h: VsockHeader, data: &[u8]) {
        let mut wire = Vec::new();
        write_rx_packet(&mut wire, &h, data).unwrap();
        let p = parse_tx_packet(&wire, GUEST).unwrap();
        c.on_guest_packet(&p);
    }

    fn rx(c: &mut Connection<TestStream>) -> Option<(VsockHeader, Vec<u8>)> {
        let mut buf = vec![0u8; 4096];
        c.next_rx(&mut buf)
            .map(|h| (h, buf[..h.len as usize].to_vec()))
    }

    fn established(write_room: usize) -> Connection<TestStream> {
        let s = TestStream {
            write_room,
            ..Default::default()
        };
        let req = guest_hdr(VIRTIO_VSOCK_OP_REQUEST, 0, 8192, 0);
        let mut c = Connection::new_guest_initiated(s, GUEST, &req);
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_RESPONSE);
        c
    }

    #[test]
    fn host_initiated_handshake_sends_request_then_ok_line() {
        let s = TestStream {
            write_room: 1 << 20,
            ..Default::default()
        };
        let mut c = Connection::new_host_initiated(s, GUEST, 1 << 30, 52);
        assert!(c.has_pending_rx());
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_REQUEST);
        assert_eq!((h.src_cid, h.dst_cid), (VMADDR_CID_HOST, GUEST));
        assert_eq!((h.src_port, h.dst_port), (1 << 30, 52));
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert!(!c.has_pending_rx());
        let mut resp = guest_hdr(VIRTIO_VSOCK_OP_RESPONSE, 0, 4096, 0);
        resp.src_port = 52;
        resp.dst_port = 1 << 30;
        feed(&mut c, resp, &[]);
        assert_eq!(c.state(), ConnState::Established);
        assert_eq!(
            c.stream().written,
            format!("OK {}\n", 1u32 << 30).as_bytes()
        );
    }

    #[test]
    fn host_initiated_rst_closes_without_ok() {
        let mut c = Connection::new_host_initiated(TestStream::default(), GUEST, 7, 52);
        rx(&mut c).unwrap();
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RST, 0, 0, 0), &[]);
        assert!(c.is_finished());
        assert!(c.stream().written.is_empty());
        assert!(rx(&mut c).is_none());
    }

    #[test]
    fn data_before_response_is_reset() {
        let mut c = Connection::new_host_initiated(TestStream::default(), GUEST, 7, 52);
        rx(&mut c).unwrap();
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 2, 4096, 0), b"hi");
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_RST);
        assert!(c.is_finished());
    }

    #[test]
    fn guest_data_reaches_host_and_is_counted() {
        let mut c = established(1 << 20);
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 5, 8192, 0), b"hello");
        assert_eq!(c.stream().written, b"hello");
        assert_eq!(c.buffered(), 0);
        // fwd_cnt reaches the guest on the next packet.
        feed(
            &mut c,
            guest_hdr(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 8192, 0),
            &[],
        );
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, 5);
    }

    #[test]
    fn slow_host_reader_buffers_at_most_buf_alloc_then_rst() {
        let mut c = established(0);
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            feed(
                &mut c,
                guest_hdr(VIRTIO_VSOCK_OP_RW, 65536, 8192, 0),
                &chunk,
            );
        }
        assert_eq!(c.buffered(), CONN_BUF_ALLOC as usize);
        assert_eq!(c.guest_credit(), 0);
        assert!(c.wants_write());
        // One byte past the credit: the guest broke the protocol.
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 1, 8192, 0), b"x");
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_RST);
        assert_eq!(c.buffered(), 0);
        assert!(c.is_finished());
    }

    #[test]
    fn draining_the_buffer_returns_credit_to_the_guest() {
        let mut c = established(0);
        let chunk = vec![1u8; 65536];
        for _ in 0..4 {
            feed(
                &mut c,
                guest_hdr(VIRTIO_VSOCK_OP_RW, 65536, 8192, 0),
                &chunk,
            );
        }
        assert_eq!(c.guest_credit(), 0);
        assert!(!c.has_pending_rx());
        c.stream.write_room = 100_000;
        c.on_host_writable();
        assert_eq!(c.buffered(), CONN_BUF_ALLOC as usize - 100_000);
        assert_eq!(c.guest_credit(), 100_000);
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, 100_000);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert!(rx(&mut c).is_none());
    }

    #[test]
    fn host_data_respects_guest_credit_and_asks_for_more() {
        let mut c = established(1 << 20);
        c.stream.input.extend(vec![9u8; 20_000]);
        c.on_host_readable();
        assert!(!c.wants_read());
        // The guest offered 8192 bytes; 4096-byte RX buffers.
        let (h1, d1) = rx(&mut c).unwrap();
        let (h2, d2) = rx(&mut c).unwrap();
        assert_eq!((h1.op, h1.len, h2.len), (VIRTIO_VSOCK_OP_RW, 4096, 4096));
        assert_eq!(d1.len() + d2.len(), 8192);
        assert_eq!(c.peer_free(), 0);
        // Out of credit: one CREDIT_REQUEST, then silence.
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_CREDIT_REQUEST);
        assert!(!c.has_pending_rx());
        assert!(rx(&mut c).is_none());
        // The device did not read more than the credit from the host.
        assert_eq!(c.stream.input.len(), 20_000 - 8192);
        // The guest reads 4096 and says so.
        feed(
            &mut c,
            guest_hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 8192, 4096),
            &[],
        );
        assert!(c.has_pending_rx());
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!((h.op, h.len), (VIRTIO_VSOCK_OP_RW, 4096));
    }

    #[test]
    fn host_eof_becomes_shutdown_send_and_guest_close_becomes_rst() {
        let mut c = established(1 << 20);
        c.stream.input.extend(b"bye");
        c.stream.eof = true;
        c.on_host_readable();
        let (h, d) = rx(&mut c).unwrap();
        assert_eq!((h.op, d.as_slice()), (VIRTIO_VSOCK_OP_RW, &b"bye"[..]));
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_SHUTDOWN);
        assert_eq!(h.flags, VIRTIO_VSOCK_SHUTDOWN_SEND);
        assert!(!c.wants_read());
        let mut sh = guest_hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 0, 8192, 3);
        sh.flags = VIRTIO_VSOCK_SHUTDOWN_SEND | VIRTIO_VSOCK_SHUTDOWN_RCV;
        feed(&mut c, sh, &[]);
        assert!(c.stream.shut_wr);
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!(h.op, VIRTIO_VSOCK_OP_RST);
        assert!(c.is_finished());
    }

    #[test]
    fn guest_half_close_flushes_then_shuts_host_write() {
        let mut c = established(2);
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 5, 8192, 0), b"hello");
        let mut sh = guest_hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 0, 8192, 0);
        sh.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
        feed(&mut c, sh, &[]);
        // Data still buffered: no shutdown yet.
        assert!(!c.stream.shut_wr);
        c.stream.write_room = 100;
        c.on_host_writable();
        assert_eq!(c.stream.written, b"hello");
        assert!(c.stream.shut_wr);
        assert_eq!(c.state(), ConnState::Established);
        // The host can still answer.
        c.stream.input.extend(b"ok");
        c.on_host_readable();
        let (h, d) = rx(&mut c).unwrap();
        assert_eq!((h.op, d.as_slice()), (VIRTIO_VSOCK_OP_RW, &b"ok"[..]));
        // More data after SHUTDOWN(SEND) is a protocol error.
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 1, 8192, 2), b"x");
        assert_eq!(rx(&mut c).unwrap().0.op, VIRTIO_VSOCK_OP_RST);
    }

    #[test]
    fn guest_half_close_waits_for_the_ok_line() {
        // The host takes only 3 bytes: the OK line is still half-written when the
        // guest half-closes.
        let s = TestStream {
            write_room: 3,
            ..Default::default()
        };
        let mut c = Connection::new_host_initiated(s, GUEST, 1024, 52);
        rx(&mut c).unwrap();
        let mut resp = guest_hdr(VIRTIO_VSOCK_OP_RESPONSE, 0, 4096, 0);
        resp.dst_port = 1024;
        feed(&mut c, resp, &[]);
        assert_eq!(c.stream.written, b"OK ");
        let mut sh = guest_hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 0, 4096, 0);
        sh.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
        feed(&mut c, sh, &[]);
        assert!(!c.stream.shut_wr, "end of file before the OK line was out");
        assert!(c.wants_write());
        c.stream.write_room = 100;
        c.on_host_writable();
        assert_eq!(c.stream.written, b"OK 1024\n");
        assert!(c.stream.shut_wr);
    }

    #[test]
    fn guest_shutdown_rcv_stops_reading_host() {
        let mut c = established(10);
        let mut sh = guest_hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 0, 8192, 0);
        sh.flags = VIRTIO_VSOCK_SHUTDOWN_RCV;
        feed(&mut c, sh, &[]);
        assert!(!c.wants_read());
        c.stream.input.extend(b"unwanted");
        c.on_host_readable();
        assert!(!c.has_pending_rx());
    }

    #[test]
    fn host_errors_reset_the_connection() {
        let mut c = established(10);
        c.stream.broken = true;
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RW, 2, 8192, 0), b"hi");
        assert_eq!(rx(&mut c).unwrap().0.op, VIRTIO_VSOCK_OP_RST);

        let mut c = established(10);
        c.stream.broken = true;
        c.on_host_readable();
        assert_eq!(rx(&mut c).unwrap().0.op, VIRTIO_VSOCK_OP_RST);
        assert!(c.is_finished());
    }

    #[test]
    fn guest_rst_and_duplicate_request() {
        let mut c = established(10);
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_REQUEST, 0, 8192, 0), &[]);
        assert_eq!(rx(&mut c).unwrap().0.op, VIRTIO_VSOCK_OP_RST);

        let mut c = established(10);
        feed(&mut c, guest_hdr(VIRTIO_VSOCK_OP_RST, 0, 0, 0), &[]);
        assert!(c.is_finished());
        assert!(rx(&mut c).is_none());
    }

    #[test]
    fn hostile_credit_values_do_not_overflow() {
        let mut c = established(1 << 20);
        // fwd_cnt ahead of what was sent, and a zero buffer.
        feed(
            &mut c,
            guest_hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0, u32::MAX),
            &[],
        );
        assert_eq!(c.peer_free(), 0);
        feed(
            &mut c,
            guest_hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, u32::MAX, u32::MAX),
            &[],
        );
        c.stream.input.extend(vec![0u8; 10]);
        c.on_host_readable();
        let (h, _) = rx(&mut c).unwrap();
        assert_eq!((h.op, h.len), (VIRTIO_VSOCK_OP_RW, 10));
    }
}
