//! `vsock_connection`: a sequence of guest packets, host stream events and RX buffers
//! driven through one [`Connection`], the per-connection state machine with credit flow
//! control, over an in-memory host stream.
//!
//! Invariants after every step: the device never holds more than `buf_alloc` guest
//! bytes and its credit accounting adds up; the host receives exactly the guest data the
//! device accepted, in order, after the `OK <port>` line; every header the device sends
//! reports as `fwd_cnt` exactly the guest bytes written to the host; RW payloads never
//! exceed the guest's announced free space or the RX buffer; a closed connection never
//! reopens; `has_pending_rx() == false` means `next_rx` has nothing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use mvm_devices::virtio::vsock::connection::{ConnState, Connection, HostStream};
use mvm_devices::virtio::vsock::packet::{parse_tx_packet, VsockHeader};
use mvm_devices::virtio::vsock::{
    CONN_BUF_ALLOC, MAX_PKT_DATA, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST,
    VSOCK_HDR_SIZE,
};

use crate::input::Input;

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// The host-side port of the connection.
pub const LOCAL_PORT: u32 = 1024;
/// The guest-side port.
pub const PEER_PORT: u32 = 5000;

/// The host end's state, shared by the stream the connection owns and the harness
/// (which plays the host process acting on its end between the device's calls).
#[derive(Debug, Default)]
pub struct HostEnd {
    /// Everything written to the host.
    pub written: Vec<u8>,
    /// Bytes the host will still take before a write would block.
    pub room: usize,
    /// Bytes the host has for the guest.
    pub input: VecDeque<u8>,
    /// The host closed its write side: reads end in end of file.
    pub eof: bool,
    /// Every call fails.
    pub broken: bool,
    /// `shutdown_write` was called.
    pub shut_wr: bool,
}

/// An in-memory, non-blocking host stream over a shared [`HostEnd`].
#[derive(Debug, Clone, Default)]
pub struct MemStream(pub Rc<RefCell<HostEnd>>);

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut end = self.0.borrow_mut();
        if end.broken {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if end.input.is_empty() {
            return if end.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        end.input.read(buf)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut end = self.0.borrow_mut();
        if end.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        // A real socket would answer EPIPE and the host would miss bytes it was owed
        // (fuzz/regressions/vsock_connection/host-prefix-after-shutdown).
        assert!(
            !end.shut_wr,
            "write after shutdown_write (host bytes owed after the half-close)"
        );
        let n = buf.len().min(end.room);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        end.written.extend_from_slice(&buf[..n]);
        end.room -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HostStream for MemStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.borrow_mut().shut_wr = true;
        Ok(())
    }
}

/// Op codes of the input, one byte each, followed by their operands.
pub mod op {
    /// A guest packet: u8 op, u8 flags, u32 buf_alloc, u32 fwd_cnt, u16 len, then len bytes.
    pub const GUEST_PACKET: u8 = 0;
    /// The host stream became readable.
    pub const HOST_READABLE: u8 = 1;
    /// The host reader made u16 bytes of room; the stream became writable.
    pub const HOST_WRITABLE: u8 = 2;
    /// The guest posted an RX buffer of u16 bytes (header included).
    pub const RX_BUFFER: u8 = 3;
    /// The host wrote u16 bytes (taken from the input) for the guest.
    pub const HOST_DATA: u8 = 4;
    /// The host closed its write side.
    pub const HOST_EOF: u8 = 5;
    /// The host stream broke.
    pub const HOST_BROKEN: u8 = 6;
    /// The device reset the connection.
    pub const RESET: u8 = 7;
    /// Number of op codes.
    pub const COUNT: u8 = 8;
}

/// What the harness believes the connection did.
struct Model {
    /// Guest bytes the device accepted, in order.
    accepted: Vec<u8>,
    /// The `OK <port>\n` line, once the connection is established (host-initiated).
    prefix_len: usize,
    ever_closed: bool,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let host_initiated = input.bool();
    let stream = MemStream::default();
    stream.0.borrow_mut().room = usize::from(input.u16());
    let mut conn = if host_initiated {
        Connection::new_host_initiated(stream, GUEST_CID, LOCAL_PORT, PEER_PORT)
    } else {
        let request = guest_header(
            mvm_devices::virtio::vsock::VIRTIO_VSOCK_OP_REQUEST,
            0,
            input.u32(),
            input.u32(),
            0,
        );
        Connection::new_guest_initiated(stream, GUEST_CID, &request)
    };
    let mut model = Model {
        accepted: Vec::new(),
        prefix_len: 0,
        ever_closed: false,
    };
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        step(&mut conn, &mut model, &mut input);
        check(&conn, &mut model);
    }
}

fn guest_header(op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VMADDR_CID_HOST,
        src_port: PEER_PORT,
        dst_port: LOCAL_PORT,
        len,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

fn step(conn: &mut Connection<MemStream>, model: &mut Model, input: &mut Input<'_>) {
    match input.u8() % op::COUNT {
        op::GUEST_PACKET => {
            let vsock_op = u16::from(input.u8() % 9);
            let flags = u32::from(input.u8() % 4);
            let buf_alloc = input.u32();
            let fwd_cnt = input.u32();
            let len = u32::from(input.u16()).min(MAX_PKT_DATA);
            let payload = input.take(len as usize);
            let hdr = guest_header(vsock_op, flags, buf_alloc, fwd_cnt, payload.len() as u32);
            let mut wire = hdr.to_bytes().to_vec();
            wire.extend_from_slice(payload);
            let Ok(pkt) = parse_tx_packet(&wire, GUEST_CID) else {
                return;
            };
            let was = conn.state();
            let before = conn.buffered();
            conn.on_guest_packet(&pkt);
            if was == ConnState::Connecting && conn.state() == ConnState::Established {
                model.prefix_len = format!("OK {LOCAL_PORT}\n").len();
            }
            let accepted = was == ConnState::Established
                && conn.state() == ConnState::Established
                && hdr.op == VIRTIO_VSOCK_OP_RW;
            if accepted {
                model.accepted.extend_from_slice(pkt.data);
            } else if hdr.op == VIRTIO_VSOCK_OP_RW && conn.state() != ConnState::Closed {
                assert_eq!(conn.buffered(), before, "unaccepted data was buffered");
            }
        }
        op::HOST_READABLE => conn.on_host_readable(),
        op::HOST_WRITABLE => {
            let room = usize::from(input.u16());
            conn_stream_mut(conn, |s| s.room = s.room.saturating_add(room));
            conn.on_host_writable();
        }
        op::RX_BUFFER => {
            let size = usize::from(input.u16());
            rx(conn, model, size);
        }
        op::HOST_DATA => {
            let n = usize::from(input.u16());
            let bytes = input.take(n).to_vec();
            conn_stream_mut(conn, |s| s.input.extend(bytes));
        }
        op::HOST_EOF => conn_stream_mut(conn, |s| s.eof = true),
        op::HOST_BROKEN => conn_stream_mut(conn, |s| s.broken = true),
        _ => conn.reset(),
    }
}

fn conn_stream_mut(conn: &mut Connection<MemStream>, f: impl FnOnce(&mut HostEnd)) {
    f(&mut conn.stream().0.borrow_mut());
}

fn rx(conn: &mut Connection<MemStream>, model: &mut Model, size: usize) {
    let pending = conn.has_pending_rx();
    let peer_free = conn.peer_free();
    let room = size
        .saturating_sub(VSOCK_HDR_SIZE)
        .min(MAX_PKT_DATA as usize);
    let mut buf = vec![0u8; room];
    let Some(hdr) = conn.next_rx(&mut buf) else {
        return;
    };
    assert!(
        pending,
        "next_rx produced {hdr:?} while has_pending_rx was false"
    );
    assert_eq!(hdr.src_cid, VMADDR_CID_HOST);
    assert_eq!(hdr.dst_cid, GUEST_CID);
    assert_eq!(hdr.src_port, LOCAL_PORT);
    assert_eq!(hdr.dst_port, PEER_PORT);
    assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
    let written_guest_bytes = conn
        .stream()
        .0
        .borrow()
        .written
        .len()
        .saturating_sub(model.prefix_len);
    assert_eq!(
        hdr.fwd_cnt as usize, written_guest_bytes,
        "fwd_cnt does not count the guest bytes the host received"
    );
    if hdr.op == VIRTIO_VSOCK_OP_RW {
        assert!(hdr.len > 0, "empty RW packet");
        assert!(
            hdr.len as usize <= room,
            "RW payload larger than the RX buffer"
        );
        assert!(
            hdr.len <= peer_free,
            "RW payload {} past the guest's credit {peer_free}",
            hdr.len
        );
    } else {
        assert_eq!(hdr.len, 0, "control packet with data");
    }
}

fn check(conn: &Connection<MemStream>, model: &mut Model) {
    let buffered = conn.buffered();
    assert!(
        buffered <= CONN_BUF_ALLOC as usize,
        "buffered {buffered} past buf_alloc"
    );
    if conn.state() != ConnState::Closed {
        assert_eq!(
            conn.guest_credit() as usize + buffered,
            CONN_BUF_ALLOC as usize,
            "credit accounting does not add up"
        );
    }
    if model.ever_closed {
        assert_eq!(
            conn.state(),
            ConnState::Closed,
            "a closed connection reopened"
        );
    }
    if conn.state() == ConnState::Closed {
        model.ever_closed = true;
    }
    let end = conn.stream().0.borrow();
    let written = &end.written;
    let prefix = format!("OK {LOCAL_PORT}\n");
    let (head, guest_bytes) = written.split_at(model.prefix_len.min(written.len()));
    assert!(
        prefix.as_bytes().starts_with(head),
        "host got {head:?} before the data"
    );
    assert!(
        model.accepted.starts_with(guest_bytes),
        "host received bytes the guest did not send, or out of order"
    );
    if conn.state() == ConnState::Established && written.len() >= model.prefix_len {
        assert_eq!(
            guest_bytes.len() + buffered,
            model.accepted.len(),
            "accepted guest bytes lost"
        );
    }
}
