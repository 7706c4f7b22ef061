//! virtio-fs (virtio spec 5.11), the transport half. The guest's FUSE
//! driver puts requests on the queues; each is checked and passed, as one
//! message, to a file server on a SEQPACKET socket (vmc's `__fs-server`, a
//! sandboxed process of its own), and the server's reply is written back
//! into the request's device-writable buffers. The VMM opens no file of a
//! volume: it has none of the rights on them the server has, and a bug
//! here cannot reach past the bytes it copies.
//!
//! Replies are matched to requests by the FUSE `unique` id, not by order,
//! so a request the server answers never (or a hostile guest's duplicate
//! id) cannot make a later reply land in the wrong buffers. FORGET
//! requests, which FUSE never answers, are completed once sent. Without a
//! server (a VM with no volumes) every request is answered ENODEV here.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::{
    read_config_bytes, ActivateContext, ActivateError, EventRegistry, Mem, Signal, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Device type id (virtio spec 5.11).
pub const TYPE_FS: u32 = 26;
/// The largest request or reply passed on: the server's 1 MiB of data
/// (FUSE max_write, and a read's reply) and the headers.
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;
/// The tag the guest mounts (`mount -t virtiofs vmc /dir`).
pub const TAG: &str = "vmc";

const QUEUE_SIZE: u16 = 128;
const HIPRIO: usize = 0;
const REQUEST: usize = 1;
/// Requests sent and not yet answered, at most (a guest that posts more
/// gets EBUSY: its driver never has more than its queues hold).
const MAX_PENDING: usize = 2 * QUEUE_SIZE as usize;
/// Bytes of requests waiting for room in the socket, at most: past it
/// (or [`MAX_PENDING`]) the queues are left alone until the server
/// answers, so a guest cannot make the VMM hold more.
const MAX_OUTBOX_BYTES: usize = 4 << 20;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;
/// Event sub-token of the server socket.
const BACKEND_SUB: u64 = 1;

/// A request passed on and waiting for its reply.
struct Pending {
    queue: usize,
    head: u16,
    writable: Vec<(GuestAddress, u32)>,
}

struct Active {
    mem: Mem,
    queues: Vec<Queue>,
    signal: Arc<dyn Signal>,
    registry: EventRegistry,
}

/// The virtio-fs device of one VM.
pub struct Fs {
    backend: Option<OwnedFd>,
    state: Option<Active>,
    pending: HashMap<u64, Pending>,
    /// Requests the socket had no room for yet, oldest first.
    outbox: VecDeque<(u64, Vec<u8>, Option<Pending>)>,
    /// The bytes in `outbox`.
    outbox_bytes: usize,
    /// A queue was left with requests on it for want of room: taken again
    /// once replies or the socket free some.
    blocked: bool,
    /// [`MAX_PENDING`] (lower in tests).
    max_pending: usize,
}

impl Fs {
    /// A device whose requests go to the file server at the other end of
    /// `backend` (a SEQPACKET socket), or are refused without one.
    pub fn new(backend: Option<OwnedFd>) -> io::Result<Fs> {
        if let Some(b) = &backend {
            set_nonblocking(b)?;
        }
        Ok(Fs {
            backend,
            state: None,
            pending: HashMap::new(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            blocked: false,
            max_pending: MAX_PENDING,
        })
    }

    fn config_bytes() -> [u8; 40] {
        // tag[36] (NUL padded), num_request_queues u32.
        let mut c = [0u8; 40];
        c[..TAG.len()].copy_from_slice(TAG.as_bytes());
        c[36..].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// Takes what the driver made available on queue `qi`.
    fn process_queue(&mut self, qi: usize) {
        let Some(a) = &mut self.state else { return };
        let Some(queue) = a.queues.get_mut(qi) else {
            return;
        };
        let mem = a.mem.clone();
        let mut chains = Vec::new();
        // What may be taken now: each chain taken is a request held until
        // its reply (or until the socket takes it).
        let mut slots = self
            .max_pending
            .saturating_sub(self.pending.len() + self.outbox.len());
        let mut bytes = MAX_OUTBOX_BYTES.saturating_sub(self.outbox_bytes);
        loop {
            if queue.disable_notification(&mem).is_err() {
                break;
            }
            let mut popped = false;
            let mut full = false;
            while slots > 0 && bytes > 0 {
                let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                    break;
                };
                popped = true;
                let c = read_chain(&mem, chain);
                slots -= 1;
                bytes = bytes.saturating_sub(c.1.as_ref().map_or(0, Vec::len));
                chains.push(c);
            }
            if slots == 0 || bytes == 0 {
                full = true;
            }
            if full {
                self.blocked = true;
                let _ = queue.enable_notification(&mem);
                break;
            }
            match queue.enable_notification(&mem) {
                Ok(true) if popped => continue,
                Ok(true) => {
                    log::warn!("virtio-fs: the driver's available ring is inconsistent; ignored until its next notification");
                    break;
                }
                _ => break,
            }
        }
        let mut done = Vec::new();
        for (head, request, writable) in chains {
            let p = Pending {
                queue: qi,
                head,
                writable,
            };
            match self.take_request(request, p) {
                Ok(()) => {}
                Err((p, errno, unique)) => done.push((p, error_reply(unique, errno))),
            }
        }
        self.flush_outbox();
        for (p, reply) in done {
            self.complete(p, &reply);
        }
        self.notify();
    }

    /// Checks a request and queues it for the server; an error is the
    /// errno to answer with (and the request's unique id).
    fn take_request(
        &mut self,
        request: Option<Vec<u8>>,
        p: Pending,
    ) -> Result<(), (Pending, i32, u64)> {
        let Some(request) = request else {
            return Err((p, libc::EINVAL, 0));
        };
        if request.len() < IN_HEADER {
            return Err((p, libc::EINVAL, 0));
        }
        let len = u32::from_le_bytes(request[0..4].try_into().unwrap()) as usize;
        let opcode = u32::from_le_bytes(request[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(request[8..16].try_into().unwrap());
        if len != request.len() {
            return Err((p, libc::EINVAL, unique));
        }
        if self.backend.is_none() {
            return Err((p, libc::ENODEV, unique));
        }
        if matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET) {
            // Never answered by FUSE: done once it is sent.
            self.outbox_bytes += request.len();
            self.outbox.push_back((unique, request, None));
            self.complete(p, &[]);
            return Ok(());
        }
        let waiting = self.outbox.iter().filter(|o| o.2.is_some()).count();
        if self.pending.contains_key(&unique)
            || self.outbox.iter().any(|o| o.0 == unique && o.2.is_some())
        {
            return Err((p, libc::EINVAL, unique));
        }
        if self.pending.len() + waiting >= self.max_pending {
            return Err((p, libc::EBUSY, unique));
        }
        self.outbox_bytes += request.len();
        self.outbox.push_back((unique, request, Some(p)));
        Ok(())
    }

    /// Sends what the socket takes; watches for room when it is full.
    fn flush_outbox(&mut self) {
        let Some(backend) = &self.backend else {
            return;
        };
        let fd = backend.as_raw_fd();
        while let Some((unique, msg, _)) = self.outbox.front() {
            // SAFETY: send from a buffer of the length given.
            let n = unsafe {
                libc::send(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => {
                        // The server is gone, or refuses the message.
                        let unique = *unique;
                        let (_, msg, p) = self.outbox.pop_front().expect("a front");
                        self.outbox_bytes -= msg.len();
                        log::warn!("virtio-fs: the file server does not take a request: {e}");
                        if let Some(p) = p {
                            self.complete(p, &error_reply(unique, libc::EIO));
                        }
                        continue;
                    }
                }
            }
            let (unique, msg, p) = self.outbox.pop_front().expect("a front");
            self.outbox_bytes -= msg.len();
            if let Some(p) = p {
                self.pending.insert(unique, p);
            }
        }
        self.watch_backend();
    }

    fn watch_backend(&self) {
        let (Some(a), Some(b)) = (&self.state, &self.backend) else {
            return;
        };
        let mut ev = EventSet::IN | EventSet::READ_HANG_UP;
        if !self.outbox.is_empty() {
            ev |= EventSet::OUT;
        }
        let _ = a.registry.modify(b.as_raw_fd(), ev, BACKEND_SUB);
    }

    /// Reads the server's replies and completes their requests.
    fn read_replies(&mut self) {
        let Some(backend) = &self.backend else {
            return;
        };
        let fd = backend.as_raw_fd();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            // SAFETY: recv into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => break,
                    _ => {
                        self.backend_gone();
                        return;
                    }
                }
            }
            if n == 0 {
                self.backend_gone();
                return;
            }
            let n = n as usize;
            if n > buf.len() || n < OUT_HEADER {
                log::warn!("virtio-fs: the file server sent a reply of {n} bytes; dropped");
                continue;
            }
            let reply = &buf[..n];
            let len = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
            let unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
            if len != n {
                log::warn!("virtio-fs: a reply says {len} bytes and has {n}; dropped");
                continue;
            }
            if let Some(p) = self.pending.remove(&unique) {
                self.complete(p, reply);
            }
        }
        self.notify();
    }

    /// The server closed its end: every request waiting is answered EIO,
    /// and the socket is no longer watched (it would wake the loop for
    /// ever).
    fn backend_gone(&mut self) {
        if let (Some(a), Some(b)) = (&self.state, &self.backend) {
            a.registry.remove(b.as_raw_fd());
        }
        self.backend = None;
        let waiting: Vec<(u64, Pending)> = self
            .pending
            .drain()
            .chain(
                self.outbox
                    .drain(..)
                    .filter_map(|(u, _, p)| p.map(|p| (u, p))),
            )
            .collect();
        self.outbox_bytes = 0;
        for (unique, p) in waiting {
            self.complete(p, &error_reply(unique, libc::EIO));
        }
        self.notify();
        self.resume();
    }

    /// Takes the queues again if they were left for want of room.
    fn resume(&mut self) {
        if std::mem::take(&mut self.blocked) {
            self.process_queue(HIPRIO);
            self.process_queue(REQUEST);
        }
    }

    /// Writes `reply` into the request's buffers and returns the chain to
    /// the driver; a reply larger than the buffers becomes an EIO reply.
    fn complete(&mut self, p: Pending, reply: &[u8]) {
        let Some(a) = &mut self.state else { return };
        let capacity: u64 = p.writable.iter().map(|w| w.1 as u64).sum();
        let fallback;
        let reply = if reply.len() as u64 > capacity && reply.len() >= OUT_HEADER {
            let unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
            fallback = error_reply(unique, libc::EIO);
            &fallback[..]
        } else {
            reply
        };
        let mut written = 0usize;
        for (addr, len) in &p.writable {
            if written >= reply.len() {
                break;
            }
            let n = (*len as usize).min(reply.len() - written);
            if a.mem
                .write_slice(&reply[written..written + n], *addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        if let Some(q) = a.queues.get_mut(p.queue) {
            if q.add_used(&a.mem, p.head, written as u32).is_err() {
                log::warn!("virtio-fs: cannot add used descriptor {}", p.head);
            }
        }
    }

    fn notify(&mut self) {
        let Some(a) = &mut self.state else { return };
        let mut signal = false;
        for q in a.queues.iter_mut() {
            if q.needs_notification(&a.mem).unwrap_or(true) {
                signal = true;
            }
        }
        if signal {
            a.signal.used();
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A FUSE reply carrying only an error (`-errno`) for request `unique`.
fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut r = Vec::with_capacity(OUT_HEADER);
    r.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    r.extend_from_slice(&(-errno).to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r
}

/// A chain's head, its readable bytes (`None` when they cannot be read or
/// exceed [`MAX_MESSAGE`], or a readable descriptor follows a writable
/// one), and its writable buffers.
fn read_chain(
    mem: &Mem,
    chain: virtio_queue::DescriptorChain<&Mem>,
) -> (u16, Option<Vec<u8>>, Vec<(GuestAddress, u32)>) {
    let head = chain.head_index();
    let mut request = Some(Vec::new());
    let mut writable = Vec::new();
    for d in chain {
        if d.is_write_only() {
            writable.push((d.addr(), d.len()));
            continue;
        }
        let Some(r) = &mut request else { continue };
        let len = d.len() as usize;
        if !writable.is_empty() || r.len() + len > MAX_MESSAGE {
            request = None;
            continue;
        }
        let start = r.len();
        r.resize(start + len, 0);
        if mem.read_slice(&mut r[start..], d.addr()).is_err() {
            request = None;
        }
    }
    (head, request, writable)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // The high-priority queue (FORGETs) and one request queue.
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&Self::config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: ctx.queues.len(),
            });
        }
        if let Some(b) = &self.backend {
            ctx.registry
                .add(
                    b.as_raw_fd(),
                    EventSet::IN | EventSet::READ_HANG_UP,
                    BACKEND_SUB,
                )
                .map_err(ActivateError::Backend)?;
        }
        self.state = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            signal: ctx.interrupt,
            registry: ctx.registry,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let (Some(a), Some(b)) = (self.state.take(), &self.backend) {
            a.registry.remove(b.as_raw_fd());
        }
        self.pending.clear();
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.blocked = false;
    }

    fn queues(&self) -> &[Queue] {
        self.state.as_ref().map_or(&[], |a| a.queues.as_slice())
    }

    fn queue_notify(&mut self, idx: usize) {
        self.process_queue(idx);
    }

    fn backend_event(&mut self, _sub: u64, events: EventSet) {
        if events.contains(EventSet::OUT) {
            self.flush_outbox();
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.read_replies();
        }
        self.resume();
    }

    /// Requests in flight: a snapshot waits until the server answered them.
    fn connection_count(&self) -> usize {
        self.pending.len() + self.outbox.len()
    }
}

#[cfg(test)]
mod tests;
