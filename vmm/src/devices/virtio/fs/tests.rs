use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::super::testing::{memory, registry, CountingSignal};
use super::*;

const W: u16 = 2; // VRING_DESC_F_WRITE
const N: u16 = 1; // VRING_DESC_F_NEXT

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    crate::jail::seqpacket_pair().unwrap()
}

/// A FUSE request: in header (len, opcode, unique, nodeid, uid, gid, pid,
/// padding) and `body`.
fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&1u64.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn reply(unique: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((OUT_HEADER + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&0i32.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(body);
    r
}

fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: recv into a buffer of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

fn send(fd: &OwnedFd, msg: &[u8]) {
    // SAFETY: send from a buffer of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    assert_eq!(n as usize, msg.len());
}

struct Setup<'a> {
    dev: Fs,
    q: MockSplitQueue<'a, Mem>,
    signal: Arc<CountingSignal>,
}

fn setup(mem: &Mem, backend: Option<OwnedFd>) -> Setup<'_> {
    let mut dev = Fs::new(backend).unwrap();
    let hiprio = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
    let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
    let signal = Arc::new(CountingSignal::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![hiprio.create_queue().unwrap(), q.create_queue().unwrap()],
        interrupt: signal.clone(),
        registry: registry(),
    })
    .unwrap();
    Setup { dev, q, signal }
}

/// Puts `req` at `at` and a writable buffer of `room` bytes at `at +
/// 0x1000` on the request queue, as chain number `n` (descriptors 2n, 2n+1).
fn post(mem: &Mem, q: &MockSplitQueue<Mem>, n: u16, at: u64, req: &[u8], room: u32) {
    mem.write_slice(req, GuestAddress(at)).unwrap();
    q.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(at, req.len() as u32, N, 2 * n + 1)),
            RawDescriptor::from(Descriptor::new(at + 0x1000, room, W, 0)),
        ],
        2 * n,
    )
    .unwrap();
}

fn used(q: &MockSplitQueue<Mem>, i: u16) -> (u32, u32) {
    let e = q.used().ring().ref_at(i as usize).unwrap().load();
    (e.id(), e.len())
}

fn read(mem: &Mem, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    b
}

/// Requests reach the server as they are; replies, in any order, land in
/// the buffers of the request with their unique id.
#[test]
fn requests_go_to_the_server_and_replies_find_their_request() {
    let mem = memory();
    let (ours, server) = seqpacket_pair();
    let mut s = setup(&mem, Some(ours));
    let r1 = request(1, 7, b"name\0");
    let r2 = request(3, 9, &[0u8; 16]);
    post(&mem, &s.q, 0, 0x10000, &r1, 256);
    post(&mem, &s.q, 1, 0x20000, &r2, 256);
    s.dev.queue_notify(1);
    assert_eq!(recv(&server).unwrap(), r1);
    assert_eq!(recv(&server).unwrap(), r2);
    assert_eq!(s.q.used().idx().load(), 0, "nothing answered yet");
    assert_eq!(s.dev.connection_count(), 2);

    let a2 = reply(9, b"attr");
    send(&server, &a2);
    s.dev.backend_event(BACKEND_SUB, EventSet::IN);
    assert_eq!(used(&s.q, 0), (2, a2.len() as u32));
    assert_eq!(read(&mem, 0x21000, a2.len()), a2);
    let a1 = reply(7, b"entry");
    send(&server, &a1);
    s.dev.backend_event(BACKEND_SUB, EventSet::IN);
    assert_eq!(used(&s.q, 1), (0, a1.len() as u32));
    assert_eq!(read(&mem, 0x11000, a1.len()), a1);
    assert_eq!(s.dev.connection_count(), 0);
    assert!(s.signal.used.load(std::sync::atomic::Ordering::SeqCst) > 0);
    // A reply for no request is dropped.
    send(&server, &reply(1234, b""));
    s.dev.backend_event(BACKEND_SUB, EventSet::IN);
    assert_eq!(s.q.used().idx().load(), 2);
}

/// What the device answers itself: no server (ENODEV), a header whose
/// length is not the request's (EINVAL, nothing sent), a unique id already
/// waiting (EINVAL), a reply too big for the buffers (EIO), and a server
/// that went away (EIO for everything waiting).
#[test]
fn bad_requests_and_a_missing_server_are_answered_by_the_device() {
    let errno_of = |b: &[u8]| i32::from_le_bytes(b[4..8].try_into().unwrap());
    let mem = memory();
    let mut s = setup(&mem, None);
    post(&mem, &s.q, 0, 0x10000, &request(1, 5, b"x\0"), 64);
    s.dev.queue_notify(1);
    assert_eq!(used(&s.q, 0), (0, 16));
    assert_eq!(errno_of(&read(&mem, 0x11000, 16)), -libc::ENODEV);

    let (ours, server) = seqpacket_pair();
    let mut s = setup(&mem, Some(ours));
    let mut lying = request(1, 6, b"x\0");
    lying[0] = 200;
    post(&mem, &s.q, 0, 0x10000, &lying, 64);
    post(&mem, &s.q, 1, 0x20000, &request(1, 8, b"a\0"), 20);
    post(&mem, &s.q, 2, 0x30000, &request(1, 8, b"b\0"), 64);
    s.dev.queue_notify(1);
    assert_eq!(used(&s.q, 0), (0, 16));
    assert_eq!(errno_of(&read(&mem, 0x11000, 16)), -libc::EINVAL);
    assert_eq!(used(&s.q, 1), (4, 16), "the duplicate id is refused");
    assert_eq!(errno_of(&read(&mem, 0x31000, 16)), -libc::EINVAL);
    assert!(recv(&server).is_some(), "the first id-8 request was sent");
    assert!(recv(&server).is_none(), "nothing else was");
    send(&server, &reply(8, &[7u8; 100]));
    s.dev.backend_event(BACKEND_SUB, EventSet::IN);
    assert_eq!(used(&s.q, 2), (2, 16), "20 bytes of room: an EIO header");
    assert_eq!(errno_of(&read(&mem, 0x21000, 16)), -libc::EIO);

    post(&mem, &s.q, 3, 0x40000, &request(1, 11, b"c\0"), 64);
    s.dev.queue_notify(1);
    drop(server);
    s.dev.backend_event(BACKEND_SUB, EventSet::READ_HANG_UP);
    assert_eq!(used(&s.q, 3), (6, 16));
    assert_eq!(errno_of(&read(&mem, 0x41000, 16)), -libc::EIO);
    assert_eq!(s.dev.connection_count(), 0);
}

/// FORGET is never answered by FUSE: sent, and done at once.
#[test]
fn forgets_are_completed_once_sent() {
    let mem = memory();
    let (ours, server) = seqpacket_pair();
    let mut s = setup(&mem, Some(ours));
    let f = request(FUSE_FORGET, 3, &1u64.to_le_bytes());
    mem.write_slice(&f, GuestAddress(0x10000)).unwrap();
    s.q.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(
            0x10000,
            f.len() as u32,
            0,
            0,
        ))],
        0,
    )
    .unwrap();
    s.dev.queue_notify(1);
    assert_eq!(recv(&server).unwrap(), f);
    assert_eq!(used(&s.q, 0), (0, 0));
    assert_eq!(s.dev.connection_count(), 0);
}

/// A request with a readable part after a writable one, or beyond
/// MAX_MESSAGE, or at an address outside guest memory, is refused without
/// touching the server.
#[test]
fn malformed_chains_are_refused() {
    let mem = memory();
    let (ours, server) = seqpacket_pair();
    let mut s = setup(&mem, Some(ours));
    let r = request(1, 1, b"n\0");
    mem.write_slice(&r, GuestAddress(0x10000)).unwrap();
    s.q.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(0x11000, 64, W | N, 1)),
            RawDescriptor::from(Descriptor::new(0x10000, r.len() as u32, N, 2)),
            RawDescriptor::from(Descriptor::new(0x12000, 64, W, 0)),
            RawDescriptor::from(Descriptor::new(0xfff0_0000, 64, N, 4)),
            RawDescriptor::from(Descriptor::new(0x13000, 64, W, 0)),
            RawDescriptor::from(Descriptor::new(0x10000, u32::MAX, N, 6)),
            RawDescriptor::from(Descriptor::new(0x14000, 64, W, 0)),
        ],
        0,
    )
    .unwrap();
    s.dev.queue_notify(1);
    assert_eq!(s.q.used().idx().load(), 3);
    assert!(recv(&server).is_none());
    assert_eq!(
        Fs::config_bytes()[..4],
        *b"vmc\0",
        "the tag the agent mounts"
    );
}

/// Found in review: a guest that keeps making requests available (its
/// avail index raised again and again, one chain re-posted) made the
/// device take and hold request after request, without bound. Now at most
/// the bound are held (MAX_PENDING; 4 here); the rest stay on the ring
/// until the server answers, and the device takes them then.
#[test]
fn a_guest_posting_more_than_the_bound_gets_no_more_held() {
    let mem = memory();
    let (ours, server) = seqpacket_pair();
    let mut s = setup(&mem, Some(ours));
    s.dev.max_pending = 4;
    for n in 0..7u16 {
        let at = 0x10000 + u64::from(n) * 0x2000;
        post(
            &mem,
            &s.q,
            n,
            at,
            &request(1, u64::from(n) + 1, b"name\0"),
            64,
        );
    }
    s.dev.queue_notify(1);
    let mut seen = Vec::new();
    while let Some(m) = recv(&server) {
        seen.push(m);
    }
    assert_eq!(
        (
            s.dev.connection_count(),
            seen.len(),
            s.q.used().idx().load()
        ),
        (4, 4, 0),
        "four held, three left on the ring"
    );
    // One answer frees one place: the device takes one more.
    send(&server, &reply(1, b""));
    s.dev.backend_event(BACKEND_SUB, EventSet::IN);
    assert_eq!(s.q.used().idx().load(), 1);
    assert_eq!(s.dev.connection_count(), 4);
    assert_eq!(recv(&server).unwrap(), request(1, 5, b"name\0"));
}
