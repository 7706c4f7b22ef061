//! The host side of virtio-vsock on Unix sockets ("hybrid vsock", as
//! Firecracker and Cloud Hypervisor do it).
//!
//! * Host to guest: a host process connects to the VM's socket `PATH` and
//!   writes `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <host_port>\n` and the stream is the connection.
//! * Guest to host: a guest connection to CID 2, port P is bridged to the
//!   Unix socket `PATH_P`.
//!
//! Flow control follows the spec's credit scheme: we never send the guest more
//! than it advertised room for, and a guest that overruns the room we
//! advertised is reset. All host sockets are non-blocking and registered
//! edge-triggered, so a guest that stops reading never makes the VMM spin.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Hdr, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::virtio::EventRegistry;

/// Receive buffer we advertise per connection (guest -> host bytes in flight).
pub const CONN_BUF: u32 = 256 * 1024;
/// Most connections (and pending host handshakes) alive at once.
pub const MAX_CONNS: usize = 1024;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
/// Event sub-token of the listening socket.
pub const LISTENER_SUB: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// Host-side port.
    local: u32,
    /// Guest-side port.
    peer: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// We sent (or will send) REQUEST; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

#[derive(Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown: u32,
    rst: bool,
}

struct Conn {
    id: u64,
    stream: UnixStream,
    state: State,
    pending: Pending,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// The host socket may have data (edge-triggered: until a read would block).
    readable: bool,
    /// The host will send no more (EOF read).
    host_eof: bool,
    /// The guest will send no more: shut the host's write side once flushed.
    guest_done_sending: bool,
    /// The guest closed: flush, close, reset.
    closing: bool,
}

impl Conn {
    fn new(id: u64, stream: UnixStream, state: State) -> Conn {
        Conn {
            id,
            stream,
            state,
            pending: Pending::default(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            readable: false,
            host_eof: false,
            guest_done_sending: false,
            closing: false,
        }
    }

    /// Bytes the guest can still take.
    fn credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn has_rx(&self) -> bool {
        let p = &self.pending;
        p.rst
            || p.request
            || p.response
            || p.shutdown != 0
            || p.credit_update
            || (self.state == State::Established
                && self.readable
                && !self.host_eof
                && !self.closing
                && self.credit() > 0)
    }

    /// Writes buffered guest data to the host socket; updates fwd_cnt.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if (self.fwd_cnt - self.last_fwd_sent).0 >= CONN_BUF / 2 {
            self.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() {
            if self.closing {
                self.pending.rst = true;
            } else if self.guest_done_sending {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(())
    }
}

struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// All vsock connections of one VM.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    registry: Option<EventRegistry>,
    conns: HashMap<Key, Conn>,
    by_id: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    next_id: u64,
    next_local_port: u32,
    rx_ready: VecDeque<Key>,
    rx_set: HashSet<Key>,
    rsts: VecDeque<Hdr>,
}

/// Where a VMM's host ports start: at random in [2^30, 2^31). A guest
/// restored from a snapshot may still hold the template's last connection
/// (closing, on the template's port); a restored VMM that began where the
/// template did would reuse that port, and the guest would take the new
/// connection's request for the old socket's and drop it.
fn first_local_port() -> u32 {
    let mut r = [0u8; 4];
    // SAFETY: the pointer and length describe `r`.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    let r = if n == 4 {
        u32::from_ne_bytes(r)
    } else {
        std::process::id().wrapping_mul(0x9e37_79b9)
    };
    (1 << 30) | (r & ((1 << 30) - 1))
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Muxer> {
        let _ = std::fs::remove_file(uds_path);
        let listener = crate::uds::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            registry: None,
            conns: HashMap::new(),
            by_id: HashMap::new(),
            handshakes: HashMap::new(),
            next_id: LISTENER_SUB + 1,
            next_local_port: first_local_port(),
            rx_ready: VecDeque::new(),
            rx_set: HashSet::new(),
            rsts: VecDeque::new(),
        })
    }

    /// Starts serving: registers the listener with the event loop.
    pub fn activate(&mut self, registry: EventRegistry) -> io::Result<()> {
        registry.add(self.listener.as_raw_fd(), EventSet::IN, LISTENER_SUB)?;
        self.registry = Some(registry);
        Ok(())
    }

    /// Drops every connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        if let Some(r) = self.registry.take() {
            r.remove(self.listener.as_raw_fd());
            for c in self.conns.values() {
                r.remove(c.stream.as_raw_fd());
            }
            for h in self.handshakes.values() {
                r.remove(h.stream.as_raw_fd());
            }
        }
        self.conns.clear();
        self.by_id.clear();
        self.handshakes.clear();
        self.rx_ready.clear();
        self.rx_set.clear();
        self.rsts.clear();
    }

    /// Number of open connections (for tests and state reports).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn register(&self, stream: &UnixStream, id: u64) -> io::Result<()> {
        match &self.registry {
            Some(r) => r.add(
                stream.as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                id,
            ),
            None => Err(io::Error::other("vsock device not active")),
        }
    }

    fn mark_rx(&mut self, key: Key) {
        if self.rx_set.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_id.remove(&c.id);
            if let Some(r) = &self.registry {
                r.remove(c.stream.as_raw_fd());
            }
        }
    }

    /// Answers `hdr` with a reset (unless it is one).
    pub fn reject(&mut self, hdr: &Hdr) {
        if hdr.op == op::RST {
            return;
        }
        self.rsts.push_back(Hdr {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            op: op::RST,
            ..Default::default()
        });
    }

    /// Whether there is something to send to the guest.
    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    /// A packet from the guest (already checked to be a stream packet).
    pub fn on_guest_packet(&mut self, hdr: &Hdr, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == op::REQUEST {
                self.connect_to_host(key, hdr);
            } else {
                self.reject(hdr);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        let mut kill = false;
        match hdr.op {
            op::RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    conn.pending.rst = true;
                }
            }
            op::RW if conn.state == State::Established => {
                if conn.tx_buf.len() + data.len() > CONN_BUF as usize {
                    log::warn!("vsock: guest port {} overran its credit; reset", key.peer);
                    conn.pending.rst = true;
                } else {
                    conn.tx_buf.extend(data);
                    if conn.flush().is_err() {
                        conn.pending.rst = true;
                    }
                }
            }
            op::CREDIT_REQUEST => conn.pending.credit_update = true,
            op::CREDIT_UPDATE => {}
            op::SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    // Nothing more reaches the guest; stop reading the host.
                    conn.host_eof = true;
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    conn.closing = true;
                }
                if conn.flush().is_err() {
                    conn.pending.rst = true;
                }
            }
            op::RST => kill = true,
            _ => conn.pending.rst = true,
        }
        if kill {
            self.remove(key);
            return;
        }
        if self.conns.get(&key).is_some_and(Conn::has_rx) {
            self.mark_rx(key);
        }
    }

    fn connect_to_host(&mut self, key: Key, hdr: &Hdr) {
        // A jailed VMM has no host socket to reach (and may not make one):
        // the guest's connection is refused.
        if crate::jail::entered() || self.conns.len() + self.handshakes.len() >= MAX_CONNS {
            self.reject(hdr);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local);
        let stream = match crate::uds::connect(Path::new(&path)) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.reject(hdr);
                return;
            }
        };
        let id = self.alloc_id();
        if self.register(&stream, id).is_err() {
            self.reject(hdr);
            return;
        }
        let mut conn = Conn::new(id, stream, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        conn.pending.response = true;
        self.conns.insert(key, conn);
        self.by_id.insert(id, key);
        self.mark_rx(key);
    }

    /// An event on one of our sockets. `active` says whether the guest driver is up.
    pub fn on_event(&mut self, sub: u64, events: EventSet) {
        if sub == LISTENER_SUB {
            self.accept_all();
            return;
        }
        if self.handshakes.contains_key(&sub) {
            self.continue_handshake(sub);
            return;
        }
        let Some(&key) = self.by_id.get(&sub) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) && conn.flush().is_err() {
            conn.pending.rst = true;
        }
        if events.contains(EventSet::ERROR) {
            conn.pending.rst = true;
        }
        if conn.has_rx() {
            self.mark_rx(key);
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.registry.is_none()
                || self.conns.len() + self.handshakes.len() >= MAX_CONNS
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the host sees the connection close
            }
            let id = self.alloc_id();
            if self.register(&stream, id).is_ok() {
                self.handshakes.insert(
                    id,
                    Handshake {
                        stream,
                        buf: Vec::new(),
                    },
                );
                self.continue_handshake(id);
            }
        }
    }

    fn continue_handshake(&mut self, id: u64) {
        let Some(h) = self.handshakes.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; MAX_HANDSHAKE];
        let port = loop {
            match h.stream.read(&mut chunk) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    h.buf.extend_from_slice(&chunk[..n]);
                    if let Some(nl) = h.buf.iter().position(|&b| b == b'\n') {
                        if nl + 1 != h.buf.len() {
                            break Err(()); // data before OK: not our protocol
                        }
                        break parse_connect(&h.buf[..nl]).ok_or(());
                    }
                    if h.buf.len() > MAX_HANDSHAKE {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(h) = self.handshakes.remove(&id) else {
            return;
        };
        let Ok(peer) = port else {
            if let Some(r) = &self.registry {
                r.remove(h.stream.as_raw_fd());
            }
            return;
        };
        let local = self.alloc_local_port();
        let key = Key { local, peer };
        let mut conn = Conn::new(id, h.stream, State::Connecting);
        conn.pending.request = true;
        self.conns.insert(key, conn);
        self.by_id.insert(id, key);
        self.mark_rx(key);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(1 << 30);
            if !self.conns.keys().any(|k| k.local == p) {
                return p;
            }
        }
    }

    /// The next packet for the guest, with at most `max_data` bytes of payload.
    pub fn next_rx(&mut self, max_data: usize) -> Option<(Hdr, Vec<u8>)> {
        if let Some(h) = self.rsts.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            self.rx_set.remove(&key);
            let guest_cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some((opcode, flags, data)) = next_packet(conn, max_data) else {
                continue;
            };
            let hdr = Hdr {
                src_cid: HOST_CID,
                dst_cid: guest_cid,
                src_port: key.local,
                dst_port: key.peer,
                op: opcode,
                flags,
                buf_alloc: CONN_BUF,
                fwd_cnt: conn.fwd_cnt.0,
            };
            conn.last_fwd_sent = conn.fwd_cnt;
            conn.pending.credit_update = false;
            if opcode == op::RST {
                self.remove(key);
            } else if conn.has_rx() {
                self.mark_rx(key);
            }
            return Some((hdr, data));
        }
        None
    }
}

/// Picks what a connection sends next: control packets first, then data.
fn next_packet(conn: &mut Conn, max_data: usize) -> Option<(u16, u32, Vec<u8>)> {
    let p = &mut conn.pending;
    if p.rst {
        return Some((op::RST, 0, Vec::new()));
    }
    if p.request {
        p.request = false;
        return Some((op::REQUEST, 0, Vec::new()));
    }
    if p.response {
        p.response = false;
        return Some((op::RESPONSE, 0, Vec::new()));
    }
    if conn.state == State::Established && conn.readable && !conn.host_eof && !conn.closing {
        let want = (conn.credit() as usize).min(max_data);
        if want > 0 {
            let mut buf = vec![0u8; want];
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        conn.host_eof = true;
                        conn.pending.shutdown |= SHUTDOWN_SEND;
                        break;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        conn.rx_cnt += n as u32;
                        return Some((op::RW, 0, buf));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.readable = false;
                        break;
                    }
                    Err(_) => {
                        conn.host_eof = true;
                        conn.pending.rst = true;
                        return Some((op::RST, 0, Vec::new()));
                    }
                }
            }
        }
    }
    let p = &mut conn.pending;
    if p.shutdown != 0 {
        let f = std::mem::take(&mut p.shutdown);
        return Some((op::SHUTDOWN, f, Vec::new()));
    }
    if p.credit_update {
        return Some((op::CREDIT_UPDATE, 0, Vec::new()));
    }
    None
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests;
