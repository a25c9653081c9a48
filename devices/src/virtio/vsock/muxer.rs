//! The vsock muxer: routes guest packets to connections and host sockets to guest
//! packets.
//!
//! It owns the VM's listening Unix socket, the host sockets still sending their
//! `CONNECT` line, and every [`Connection`]. All of them are non-blocking and watched
//! by the muxer's own epoll set, whose fd the device thread's loop watches in turn.
//! An fd is in the set only while its connection wants something from it, so a
//! level-triggered set never spins on a socket the device cannot serve yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, Connection};
use super::metrics::{VsockCounts, VsockMetrics};
use super::packet::{Op, PacketError, TxPacket, VsockHeader};
use super::unix::{connect_nonblocking, host_port_path, parse_connect_line, MAX_CONNECT_LINE};
use super::{
    MAX_CONNECTIONS, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
};

/// Most RSTs for unknown connections waiting for RX buffers; past this a guest that
/// floods the device with stray packets gets no answer.
const MAX_PENDING_RST: usize = 256;
/// First host-side port given to host-initiated connections (as Firecracker does,
/// well above the ports guests listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host `CONNECT` waits for the guest to accept (or refuse) before the
/// device gives up: the host socket is closed and the guest told with an RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Events fetched per epoll_wait.
const EPOLL_BATCH: usize = 64;
/// Most epoll_wait rounds per call; whatever is left wakes the device loop again.
const EPOLL_ROUNDS: usize = 8;

/// Why the muxer could not start.
#[derive(Debug, Error)]
pub enum MuxerError {
    /// The VM's socket path is taken (a stale socket or another VM).
    #[error("vsock socket path {0} already exists")]
    PathExists(PathBuf),
    /// bind/listen failed.
    #[error("vsock cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// epoll setup failed.
    #[error("vsock epoll: {0}")]
    Epoll(#[source] io::Error),
}

/// A connection key: (host-side port, guest-side port).
type ConnKey = (u32, u32);

/// A host socket that has connected but not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What an fd in the epoll set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdOwner {
    Listener,
    Pending,
    Conn(ConnKey),
    ConnectTimer,
}

/// The host end of one VM's vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection<UnixStream>>,
    pending: HashMap<RawFd, PendingConnect>,
    owners: HashMap<RawFd, FdOwner>,
    /// The events each registered fd is watched for.
    watched: HashMap<RawFd, EventSet>,
    rx_ready: VecDeque<ConnKey>,
    rx_ready_set: HashSet<ConnKey>,
    rst_queue: VecDeque<VsockHeader>,
    next_local_port: u32,
    /// When each host-initiated connection still waiting for the guest gives up.
    connect_deadlines: HashMap<ConnKey, Instant>,
    /// Fires at the earliest of `connect_deadlines`.
    connect_timer: TimerFd,
    /// The deadline `connect_timer` is armed for.
    timer_armed_for: Option<Instant>,
    /// The timer expired and must be re-armed or cleared, or it stays readable.
    timer_fired: bool,
    connect_timeout: Duration,
    metrics: Arc<VsockMetrics>,
}

impl Muxer {
    /// Listens on `uds_path` for a guest with CID `guest_cid`. Removing the socket
    /// file afterwards is the owner's job (mvm-vmm does it on its main thread): the
    /// device thread's seccomp filter has no `unlink`.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, MuxerError> {
        if uds_path.exists() {
            return Err(MuxerError::PathExists(uds_path.to_owned()));
        }
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let connect_timer = TimerFd::new()
            .map_err(|e| MuxerError::Epoll(io::Error::from_raw_os_error(e.errno())))?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            pending: HashMap::new(),
            owners: HashMap::new(),
            watched: HashMap::new(),
            rx_ready: VecDeque::new(),
            rx_ready_set: HashSet::new(),
            rst_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            connect_deadlines: HashMap::new(),
            connect_timer,
            timer_armed_for: None,
            timer_fired: false,
            connect_timeout: CONNECT_TIMEOUT,
            metrics,
        };
        let fd = m.listener.as_raw_fd();
        m.owners.insert(fd, FdOwner::Listener);
        m.watch(fd, EventSet::IN).map_err(MuxerError::Epoll)?;
        let fd = m.connect_timer.as_raw_fd();
        m.owners.insert(fd, FdOwner::ConnectTimer);
        m.watch(fd, EventSet::IN).map_err(MuxerError::Epoll)?;
        Ok(m)
    }

    /// Changes how long a host `CONNECT` waits for the guest (tests).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// Gives up on host-initiated connections the guest has not answered in time,
    /// then arms the timer for the next deadline (arming also clears its expiry, so
    /// it is never read and never blocks).
    fn expire_connects(&mut self) {
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .connect_deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.connect_deadlines.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.state() != ConnState::Connecting {
                continue;
            }
            tracing::info!(
                port = key.1,
                "vsock: guest did not answer a host CONNECT in time"
            );
            VsockMetrics::add(&self.metrics.connect_timeouts, 1);
            // Close the host socket now; the guest hears an RST for its half.
            conn.close_silently();
            let request = VsockHeader {
                src_cid: self.guest_cid,
                dst_cid: VMADDR_CID_HOST,
                src_port: key.1,
                dst_port: key.0,
                op: VIRTIO_VSOCK_OP_REQUEST,
                type_: VIRTIO_VSOCK_TYPE_STREAM,
                ..VsockHeader::default()
            };
            self.refresh(key);
            self.queue_rst(&request);
        }
        self.rearm_connect_timer(now);
    }

    fn rearm_connect_timer(&mut self, now: Instant) {
        self.connect_deadlines.retain(|k, _| {
            self.conns
                .get(k)
                .is_some_and(|c| c.state() == ConnState::Connecting)
        });
        let next = self.connect_deadlines.values().min().copied();
        if next == self.timer_armed_for && !self.timer_fired {
            return;
        }
        let result = match next {
            // A zero duration would disarm it: fire in a millisecond at the earliest.
            Some(at) => self.connect_timer.reset(
                at.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.connect_timer.clear(),
        };
        match result {
            Ok(()) => {
                self.timer_armed_for = next;
                self.timer_fired = false;
            }
            Err(e) => tracing::warn!(error = %e, "vsock: cannot arm the connect timer"),
        }
    }

    /// The muxer's epoll fd: readable when some host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The VM's socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Counters.
    pub fn stats(&self) -> VsockCounts {
        self.metrics.counts()
    }

    /// Connections tracked now (established, connecting, or closing).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn slots_used(&self) -> usize {
        self.conns.len().saturating_add(self.pending.len())
    }

    /// Whether some packet may be waiting for the guest (a subsequent
    /// [`Muxer::next_rx`] can still come back empty).
    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// Drops every connection (device reset): host sockets are closed, the listener
    /// stays.
    pub fn reset(&mut self) {
        let fds: Vec<RawFd> = self
            .owners
            .iter()
            .filter(|(_, o)| !matches!(o, FdOwner::Listener | FdOwner::ConnectTimer))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.unwatch(fd);
            self.owners.remove(&fd);
        }
        self.conns.clear();
        self.pending.clear();
        self.rx_ready.clear();
        self.rx_ready_set.clear();
        self.rst_queue.clear();
        self.connect_deadlines.clear();
        self.rearm_connect_timer(Instant::now());
    }

    fn watch(&mut self, fd: RawFd, wanted: EventSet) -> io::Result<()> {
        let current = self.watched.get(&fd).copied();
        if current == Some(wanted) {
            return Ok(());
        }
        let data = u64::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if wanted.is_empty() {
            self.unwatch(fd);
            return Ok(());
        }
        let op = if current.is_some() {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        self.epoll.ctl(op, fd, EpollEvent::new(wanted, data))?;
        self.watched.insert(fd, wanted);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        if self.watched.remove(&fd).is_some() {
            // Deleting a registered fd only fails if it is already closed, which
            // removes it from the set anyway.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Brings a connection's epoll registration, RX readiness and lifetime up to date
    /// after anything touched it.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_finished() {
            self.unwatch(fd);
            self.owners.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        let mut wanted = EventSet::empty();
        if conn.wants_read() {
            wanted |= EventSet::IN;
        }
        if conn.wants_write() {
            wanted |= EventSet::OUT;
        }
        let pending_rx = conn.has_pending_rx();
        if let Err(e) = self.watch(fd, wanted) {
            tracing::warn!(error = %e, "vsock: cannot watch a host socket, resetting it");
            if let Some(c) = self.conns.get_mut(&key) {
                c.reset();
            }
        }
        let pending_rx = pending_rx || self.conns.get(&key).is_some_and(|c| c.has_pending_rx());
        if pending_rx && self.rx_ready_set.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    /// Handles whatever the host sockets have for us; never blocks.
    pub fn process_host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); EPOLL_BATCH];
        // Handling one socket can make another ready (an accepted socket already holds
        // its CONNECT line), so look again, a bounded number of times.
        for _ in 0..EPOLL_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: epoll_wait failed");
                    return;
                }
            };
            for ev in events.iter().take(n) {
                let Ok(fd) = RawFd::try_from(ev.data()) else {
                    continue;
                };
                let set = EventSet::from_bits_truncate(ev.events());
                self.on_fd_event(fd, set);
            }
            if n == 0 {
                break;
            }
        }
        self.expire_connects();
    }

    fn on_fd_event(&mut self, fd: RawFd, set: EventSet) {
        match self.owners.get(&fd).copied() {
            Some(FdOwner::Listener) => self.accept_all(),
            Some(FdOwner::Pending) => self.read_connect_line(fd),
            // Handled by `expire_connects` after every batch, which then re-arms or
            // clears the timer: that also clears its expiry, so it stops being
            // readable.
            Some(FdOwner::ConnectTimer) => self.timer_fired = true,
            Some(FdOwner::Conn(key)) => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        conn.on_host_readable();
                    }
                    if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                        conn.on_host_writable();
                    }
                }
                self.refresh(key);
            }
            None => self.unwatch(fd),
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.slots_used() >= MAX_CONNECTIONS {
                        VsockMetrics::add(&self.metrics.refused_over_limit, 1);
                        tracing::warn!("vsock: host connection refused, {MAX_CONNECTIONS} in use");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.pending.insert(
                        fd,
                        PendingConnect {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.owners.insert(fd, FdOwner::Pending);
                    if self.watch(fd, EventSet::IN).is_err() {
                        self.drop_pending(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "vsock: accept failed");
                    }
                    return;
                }
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd) {
        self.unwatch(fd);
        self.owners.remove(&fd);
        self.pending.remove(&fd);
    }

    /// Reads the `CONNECT` line one byte at a time, so bytes the host sends after it
    /// stay in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return self.drop_pending(fd);
        };
        let port = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => return self.drop_pending(fd),
                Ok(_) => {
                    p.line.extend_from_slice(&b);
                    if b == [b'\n'] {
                        match parse_connect_line(&p.line) {
                            Ok(port) => break port,
                            Err(e) => {
                                tracing::info!(error = %e, "vsock: bad host CONNECT line");
                                return self.drop_pending(fd);
                            }
                        }
                    }
                    if p.line.len() >= MAX_CONNECT_LINE {
                        tracing::info!("vsock: host CONNECT line too long");
                        return self.drop_pending(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_pending(fd),
            }
        };
        self.unwatch(fd);
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let Some(local_port) = self.allocate_local_port(port) else {
            self.owners.remove(&fd);
            return;
        };
        let key = (local_port, port);
        let conn = Connection::new_host_initiated(p.stream, self.guest_cid, local_port, port);
        self.owners.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        if let Some(deadline) = Instant::now().checked_add(self.connect_timeout) {
            self.connect_deadlines.insert(key, deadline);
        }
        self.refresh(key);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    fn queue_rst(&mut self, to: &VsockHeader) {
        if to.op == VIRTIO_VSOCK_OP_RST {
            return;
        }
        if self.rst_queue.len() >= MAX_PENDING_RST {
            return;
        }
        VsockMetrics::add(&self.metrics.rst_sent, 1);
        self.rst_queue.push_back(VsockHeader {
            src_cid: to.dst_cid,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Handles one packet from the guest: `raw` is what the TX chain held, `parsed`
    /// the result of parsing it.
    pub fn on_guest_packet(&mut self, raw: &[u8], parsed: Result<TxPacket<'_>, PacketError>) {
        let pkt = match parsed {
            Ok(p) => p,
            Err(e) => {
                VsockMetrics::add(&self.metrics.dropped_packets, 1);
                tracing::debug!(error = %e, "vsock: guest packet refused");
                if e.deserves_rst() {
                    if let Some(h) = VsockHeader::from_prefix(raw) {
                        if h.src_cid == self.guest_cid {
                            self.queue_rst(&h);
                        }
                    }
                }
                return;
            }
        };
        let key = (pkt.hdr.dst_port, pkt.hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(&pkt);
            self.refresh(key);
            return;
        }
        match pkt.op {
            Op::Request => self.guest_connect(&pkt.hdr),
            Op::Rst => {}
            _ => self.queue_rst(&pkt.hdr),
        }
    }

    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if self.slots_used() >= MAX_CONNECTIONS {
            VsockMetrics::add(&self.metrics.refused_over_limit, 1);
            tracing::warn!(
                port = hdr.dst_port,
                "vsock: guest connection refused, {MAX_CONNECTIONS} in use"
            );
            return self.queue_rst(hdr);
        }
        let path = host_port_path(&self.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock: no host listener");
                return self.queue_rst(hdr);
            }
        };
        let key = (hdr.dst_port, hdr.src_port);
        let fd = stream.as_raw_fd();
        let conn = Connection::new_guest_initiated(stream, self.guest_cid, hdr);
        self.owners.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// The next packet for the guest, its payload in `buf[..hdr.len]`; `buf` is as
    /// long as the guest's RX buffer can hold.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some(h);
        }
        // Each ready connection gets one turn; one that still has something it
        // cannot send into this buffer goes to the back and waits for the next.
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            self.rx_ready_set.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let out = conn.next_rx(buf);
            self.refresh(key);
            if out.is_some() {
                return out;
            }
        }
        None
    }

    /// Guest bytes the connection between host port `local` and guest port `peer`
    /// holds for a slow host reader.
    pub fn buffered(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.get(&(local, peer)).map(Connection::buffered)
    }

    /// The state of the connection between host port `local` and guest port `peer`.
    pub fn connection_state(&self, local: u32, peer: u32) -> Option<ConnState> {
        self.conns.get(&(local, peer)).map(Connection::state)
    }
}
