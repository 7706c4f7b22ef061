//! virtio-net emulated in the VMM with a user-mode backend: passt, speaking
//! the qemu socket protocol (each Ethernet frame preceded by its length as a
//! 32-bit big-endian integer) on a Unix stream socket. No TAP device, no
//! /dev/vhost-net, no root.
//!
//! Receive uses mergeable buffers (VIRTIO_NET_F_MRG_RXBUF): a frame larger
//! than one of the driver's buffers spans several, so the MTU can be passt's
//! 65520 without the driver posting 64 KiB buffers. Frames from passt carry
//! valid checksums, which the driver is told (VIRTIO_NET_F_GUEST_CSUM,
//! DATA_VALID) so that it does not verify them again; the driver computes
//! its own (no VIRTIO_NET_F_CSUM): passt takes whole frames.
//!
//! Everything the guest hands over is checked: a transmit chain must be
//! readable descriptors only, at least a header long and at most a header
//! plus the largest frame; receive chains must be writable. A bad chain is
//! returned unused (length 0) and dropped.
//!
//! Written here because the rust-vmm crates stop at the queue: there is no
//! published virtio-net device for a socket backend (Firecracker's and
//! Cloud Hypervisor's are tied to TAP).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::EventSet;

use super::{
    read_config_bytes, ActivateContext, ActivateError, EventRegistry, Mem, Signal, VirtioDevice,
    TYPE_NET, VIRTIO_RING_F_EVENT_IDX,
};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Feature bits (virtio spec 5.1.3).
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

/// `struct virtio_net_hdr_v1`: 12 bytes with VERSION_1.
pub const HDR_LEN: usize = 12;
const HDR_F_DATA_VALID: u8 = 2;
const STATUS_LINK_UP: u16 = 1;

/// passt's default MTU, and so the largest frame: MTU + Ethernet header.
pub const MTU: u16 = 65520;
pub const MAX_FRAME: usize = MTU as usize + 14;

/// Frames from passt held while the guest has no receive buffers; beyond
/// this the socket is not read (passt then queues or drops, as a full NIC).
const MAX_RX_QUEUED: usize = 256;
/// Bytes for passt held while its socket is full; beyond this the transmit
/// queue is not consumed until the socket drains.
const MAX_TX_BUFFERED: usize = 1 << 20;

/// Event sub-token of the backend socket.
const BACKEND_SUB: u64 = 1;

struct Active {
    mem: Mem,
    queues: Vec<Queue>,
    signal: Arc<dyn Signal>,
    registry: EventRegistry,
}

/// The network device of one VM.
pub struct Net {
    mac: [u8; 6],
    backend: UnixStream,
    acked: u64,
    state: Option<Active>,
    /// Bytes read from passt, not yet a whole frame.
    rx_partial: Vec<u8>,
    /// Whole frames from passt waiting for guest buffers.
    rx_frames: VecDeque<Vec<u8>>,
    /// Length-prefixed frames for passt not yet written.
    tx_out: VecDeque<u8>,
    /// The backend closed or failed: frames are dropped.
    backend_gone: bool,
}

impl Net {
    /// A device with hardware address `mac` whose frames go to and come
    /// from `backend` (a connected stream socket to passt).
    pub fn new(mac: [u8; 6], backend: UnixStream) -> io::Result<Net> {
        backend.set_nonblocking(true)?;
        Ok(Net {
            mac,
            backend,
            acked: 0,
            state: None,
            rx_partial: Vec::new(),
            rx_frames: VecDeque::new(),
            tx_out: VecDeque::new(),
            backend_gone: false,
        })
    }

    fn config_bytes(&self) -> [u8; 12] {
        // mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&MTU.to_le_bytes());
        c
    }

    /// Moves the guest's transmit chains into the outgoing buffer.
    fn process_tx(&mut self) {
        let Some(a) = &mut self.state else { return };
        let mut used_any = false;
        let mut frame = Vec::with_capacity(2048);
        // Whether a chain was taken since notifications were last turned
        // back on: "more available" that cannot be popped (an index the
        // ring cannot hold) must not loop for ever.
        let mut progress = true;
        loop {
            if self.tx_out.len() >= MAX_TX_BUFFERED {
                break;
            }
            let _ = a.queues[TX].disable_notification(&a.mem);
            let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) else {
                match a.queues[TX].enable_notification(&a.mem) {
                    Ok(true) if progress => {
                        progress = false;
                        continue;
                    }
                    _ => break,
                }
            };
            progress = true;
            let head = chain.head_index();
            frame.clear();
            if read_tx_chain(&a.mem, chain, &mut frame) && !self.backend_gone {
                let len = (frame.len() - HDR_LEN) as u32;
                self.tx_out.extend(len.to_be_bytes());
                self.tx_out.extend(&frame[HDR_LEN..]);
            }
            if a.queues[TX].add_used(&a.mem, head, 0).is_err() {
                log::warn!("virtio-net: cannot return tx descriptor {head}");
            }
            used_any = true;
        }
        if used_any && a.queues[TX].needs_notification(&a.mem).unwrap_or(true) {
            a.signal.used();
        }
        self.flush_backend();
    }

    /// Writes what the socket takes; watches for room when it is full.
    fn flush_backend(&mut self) {
        while !self.tx_out.is_empty() && !self.backend_gone {
            let (a, _) = self.tx_out.as_slices();
            match self.backend.write(a) {
                Ok(0) => self.backend_gone = true,
                Ok(n) => {
                    self.tx_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.backend_gone = true,
            }
        }
        if self.backend_gone {
            self.tx_out.clear();
        }
        self.watch_backend();
    }

    fn watch_backend(&self) {
        let Some(a) = &self.state else { return };
        if self.backend_gone {
            // Level-triggered: a closed socket would wake the loop forever.
            a.registry.remove(self.backend.as_raw_fd());
            return;
        }
        let mut ev = EventSet::READ_HANG_UP;
        if self.rx_frames.len() < MAX_RX_QUEUED {
            ev |= EventSet::IN;
        }
        if !self.tx_out.is_empty() {
            ev |= EventSet::OUT;
        }
        let _ = a.registry.modify(self.backend.as_raw_fd(), ev, BACKEND_SUB);
    }

    /// Reads frames from passt (up to the queue limit).
    fn read_backend(&mut self) {
        let mut buf = vec![0u8; 256 * 1024];
        while self.rx_frames.len() < MAX_RX_QUEUED && !self.backend_gone {
            match self.backend.read(&mut buf) {
                Ok(0) => self.backend_gone = true,
                Ok(n) => {
                    self.rx_partial.extend_from_slice(&buf[..n]);
                    if !self.split_frames() {
                        log::warn!("virtio-net: the backend sent a frame over {MAX_FRAME} bytes; disconnected");
                        self.backend_gone = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.backend_gone = true,
            }
        }
    }

    /// Cuts whole frames off `rx_partial`; false on an impossible length.
    fn split_frames(&mut self) -> bool {
        let mut pos = 0;
        while self.rx_partial.len() - pos >= 4 {
            let len = u32::from_be_bytes(
                self.rx_partial[pos..pos + 4]
                    .try_into()
                    .expect("four bytes"),
            ) as usize;
            if len > MAX_FRAME {
                return false;
            }
            if self.rx_partial.len() - pos - 4 < len {
                break;
            }
            self.rx_frames
                .push_back(self.rx_partial[pos + 4..pos + 4 + len].to_vec());
            pos += 4 + len;
        }
        self.rx_partial.drain(..pos);
        true
    }

    /// Gives queued frames to the guest while it has buffers for them.
    fn process_rx(&mut self) {
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let data_valid = self.acked & F_GUEST_CSUM != 0;
        let Some(a) = &mut self.state else { return };
        let mut used_any = false;
        // As in process_tx: one more try after re-enabling, not for ever.
        let mut progress = true;
        while let Some(frame) = self.rx_frames.front() {
            match deliver(&a.mem, &mut a.queues[RX], frame, mrg, data_valid) {
                Delivery::Done => {
                    self.rx_frames.pop_front();
                    used_any = true;
                    progress = true;
                }
                Delivery::Dropped => {
                    self.rx_frames.pop_front();
                    used_any = true;
                    progress = true;
                }
                Delivery::NoBuffers => {
                    // Asked to be told when the driver adds buffers.
                    if progress {
                        if let Ok(true) = a.queues[RX].enable_notification(&a.mem) {
                            progress = false;
                            continue;
                        }
                    } else {
                        let _ = a.queues[RX].enable_notification(&a.mem);
                    }
                    break;
                }
            }
        }
        if used_any && a.queues[RX].needs_notification(&a.mem).unwrap_or(true) {
            a.signal.used();
        }
        self.watch_backend();
    }
}

/// Reads a transmit chain (header + frame) into `out`; false if the chain
/// is malformed: a writable descriptor, an unreadable address, shorter than
/// a header or longer than a header plus the largest frame.
fn read_tx_chain(mem: &Mem, chain: virtio_queue::DescriptorChain<&Mem>, out: &mut Vec<u8>) -> bool {
    for d in chain {
        if d.is_write_only() {
            return false;
        }
        let len = d.len() as usize;
        if out.len() + len > HDR_LEN + MAX_FRAME {
            return false;
        }
        let start = out.len();
        out.resize(start + len, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            return false;
        }
    }
    out.len() > HDR_LEN
}

enum Delivery {
    Done,
    /// The frame cannot be placed (bad buffers): dropped.
    Dropped,
    /// Not enough buffers now; the frame stays queued.
    NoBuffers,
}

/// Writes one frame into receive chains: one chain, or with mergeable
/// buffers as many as it needs, the header's num_buffers saying how many.
fn deliver(mem: &Mem, q: &mut Queue, frame: &[u8], mrg: bool, data_valid: bool) -> Delivery {
    let total = HDR_LEN + frame.len();
    // (head, writable regions) of each chain taken.
    let mut taken: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
    let mut room = 0usize;
    while room < total {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            for _ in 0..taken.len() {
                q.go_to_previous_position();
            }
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let mut regions = Vec::new();
        let mut ok = true;
        for d in chain {
            if !d.is_write_only()
                || !mem.check_range(d.addr(), d.len() as usize, Permissions::Write)
            {
                ok = false;
                break;
            }
            regions.push((d.addr(), d.len() as usize));
        }
        let cap: usize = regions.iter().map(|r| r.1).sum();
        if !ok || (taken.is_empty() && cap < HDR_LEN) {
            // A chain the device cannot use: returned empty, frame dropped.
            let _ = q.add_used(mem, head, 0);
            for (h, _) in &taken {
                let _ = q.add_used(mem, *h, 0);
            }
            return Delivery::Dropped;
        }
        room += cap;
        taken.push((head, regions));
        if !mrg && room < total {
            // Without mergeable buffers a frame must fit one chain.
            for (h, _) in &taken {
                let _ = q.add_used(mem, *h, 0);
            }
            return Delivery::Dropped;
        }
    }
    let mut hdr = [0u8; HDR_LEN];
    if data_valid {
        hdr[0] = HDR_F_DATA_VALID;
    }
    hdr[10..12].copy_from_slice(&(taken.len() as u16).to_le_bytes());
    let mut src: Vec<&[u8]> = vec![&hdr, frame];
    for (head, regions) in &taken {
        let mut written = 0usize;
        for (addr, len) in regions {
            let mut off = 0usize;
            while off < *len {
                let Some(cur) = src.first_mut() else { break };
                if cur.is_empty() {
                    src.remove(0);
                    continue;
                }
                let n = cur.len().min(len - off);
                // Checked by check_range above.
                let _ = mem.write_slice(&cur[..n], addr.unchecked_add(off as u64));
                *cur = &cur[n..];
                off += n;
            }
            written += off;
        }
        let _ = q.add_used(mem, *head, written as u32);
    }
    Delivery::Done
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX | F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | F_GUEST_CSUM
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: ctx.queues.len(),
            });
        }
        ctx.registry
            .add(
                self.backend.as_raw_fd(),
                EventSet::IN | EventSet::READ_HANG_UP,
                BACKEND_SUB,
            )
            .map_err(ActivateError::Backend)?;
        self.state = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            signal: ctx.interrupt,
            registry: ctx.registry,
        });
        self.read_backend();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.state.take() {
            a.registry.remove(self.backend.as_raw_fd());
        }
        self.rx_frames.clear();
        self.tx_out.clear();
    }

    fn queues(&self) -> &[Queue] {
        self.state.as_ref().map_or(&[], |a| a.queues.as_slice())
    }

    fn queue_notify(&mut self, idx: usize) {
        match idx {
            TX => self.process_tx(),
            RX => {
                self.read_backend();
                self.process_rx();
            }
            _ => {}
        }
    }

    fn backend_event(&mut self, _sub: u64, events: EventSet) {
        if events.contains(EventSet::OUT) {
            self.flush_backend();
            // Room again: take the transmit chains left waiting.
            self.process_tx();
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.read_backend();
            self.process_rx();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::super::testing::{memory, registry, CountingSignal};
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT

    struct Setup<'a> {
        dev: Net,
        passt: UnixStream,
        rxq: MockSplitQueue<'a, Mem>,
        txq: MockSplitQueue<'a, Mem>,
    }

    fn setup(mem: &Mem, features: u64) -> Setup<'_> {
        let (ours, passt) = UnixStream::pair().unwrap();
        passt
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut dev = Net::new(MAC, ours).unwrap();
        dev.ack_features(features);
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x4000), 16);
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
            interrupt: Arc::new(CountingSignal::default()),
            registry: registry(),
        })
        .unwrap();
        Setup {
            dev,
            passt,
            rxq,
            txq,
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    #[test]
    fn config_has_the_mac_link_up_and_mtu() {
        let (a, _b) = UnixStream::pair().unwrap();
        let dev = Net::new(MAC, a).unwrap();
        let mut c = [0u8; 12];
        dev.read_config(0, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), MTU);
    }

    #[test]
    fn transmitted_frames_reach_passt_length_prefixed() {
        let mem = memory();
        let mut s = setup(&mem, 0);
        let f = frame(1000);
        // Header and frame in separate descriptors.
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(&f, GuestAddress(0x11000)).unwrap();
        s.txq
            .add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(0x10000, HDR_LEN as u32, N, 1)),
                    RawDescriptor::from(Descriptor::new(0x11000, 1000, 0, 0)),
                ],
                0,
            )
            .unwrap();
        s.dev.queue_notify(TX);
        let mut got = vec![0u8; 4 + 1000];
        s.passt.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &1000u32.to_be_bytes());
        assert_eq!(&got[4..], &f[..]);
        assert_eq!(s.txq.used().idx().load(), 1);
    }

    /// Found by the `virtio` fuzz target: an available index further ahead
    /// than the ring holds made process_tx (and process_rx) loop for ever,
    /// one VMM thread at 100 % CPU from one guest store.
    #[test]
    fn an_available_index_the_ring_cannot_hold_does_not_spin_either_queue() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = memory();
            let mut s = setup(&mem, 0);
            // avail.idx of both rings: 1000 buffers "available" in 16 slots.
            s.txq.avail().idx().store(1000);
            s.rxq.avail().idx().store(1000);
            s.dev.queue_notify(TX);
            // A frame from passt with no usable receive buffer.
            let f = frame(60);
            s.passt.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
            s.passt.write_all(&f).unwrap();
            s.dev.backend_event(BACKEND_SUB, EventSet::IN);
            s.dev.queue_notify(RX);
            let _ = done_tx.send(s.txq.used().idx().load());
        });
        // A liveness bound (nothing can be taken), not a timing.
        let used = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("virtio-net spins on an inconsistent available ring");
        assert_eq!(used, 0);
    }

    #[test]
    fn malformed_transmit_chains_are_dropped() {
        let mem = memory();
        let mut s = setup(&mem, 0);
        s.txq
            .add_desc_chains(
                &[
                    // Writable: not a transmit buffer.
                    RawDescriptor::from(Descriptor::new(0x10000, 100, W, 0)),
                    // Only a header.
                    RawDescriptor::from(Descriptor::new(0x11000, HDR_LEN as u32, 0, 0)),
                    // Outside guest memory.
                    RawDescriptor::from(Descriptor::new(0xffff_0000, 100, 0, 0)),
                    // Longer than a header plus the largest frame.
                    RawDescriptor::from(Descriptor::new(
                        0x20000,
                        (HDR_LEN + MAX_FRAME + 1) as u32,
                        0,
                        0,
                    )),
                ],
                0,
            )
            .unwrap();
        s.dev.queue_notify(TX);
        assert_eq!(s.txq.used().idx().load(), 4, "every chain returned");
        s.passt.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        assert!(s.passt.read(&mut b).is_err(), "nothing reached passt");
    }

    #[test]
    fn a_large_frame_spans_mergeable_buffers() {
        let mem = memory();
        let mut s = setup(&mem, F_MRG_RXBUF | F_GUEST_CSUM);
        s.rxq
            .add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(0x10000, 2048, W, 0)),
                    RawDescriptor::from(Descriptor::new(0x20000, 2048, W, 0)),
                ],
                0,
            )
            .unwrap();
        let f = frame(3000);
        let mut msg = (f.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&f);
        s.passt.write_all(&msg).unwrap();
        s.dev.backend_event(BACKEND_SUB, EventSet::IN);
        assert_eq!(s.rxq.used().idx().load(), 2);
        let u0 = s.rxq.used().ring().ref_at(0).unwrap().load();
        let u1 = s.rxq.used().ring().ref_at(1).unwrap().load();
        assert_eq!(u0.len() + u1.len(), (HDR_LEN + 3000) as u32);
        let mut hdr = [0u8; HDR_LEN];
        mem.read_slice(&mut hdr, GuestAddress(0x10000)).unwrap();
        assert_eq!(hdr[0], HDR_F_DATA_VALID);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2, "num_buffers");
        let mut got = vec![0u8; 2048 - HDR_LEN];
        mem.read_slice(&mut got, GuestAddress(0x10000 + HDR_LEN as u64))
            .unwrap();
        let mut rest = vec![0u8; 3000 - got.len()];
        mem.read_slice(&mut rest, GuestAddress(0x20000)).unwrap();
        got.extend(rest);
        assert_eq!(got, f);
    }

    #[test]
    fn frames_wait_for_buffers_and_oversized_ones_disconnect() {
        let mem = memory();
        let mut s = setup(&mem, F_MRG_RXBUF);
        let f = frame(100);
        let mut msg = (f.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&f);
        s.passt.write_all(&msg).unwrap();
        s.dev.backend_event(BACKEND_SUB, EventSet::IN);
        assert_eq!(s.rxq.used().idx().load(), 0, "no buffers yet");
        s.rxq
            .add_desc_chains(
                &[RawDescriptor::from(Descriptor::new(0x10000, 4096, W, 0))],
                0,
            )
            .unwrap();
        s.dev.queue_notify(RX);
        assert_eq!(s.rxq.used().idx().load(), 1);
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x10000 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, f);

        // A length no Ethernet frame has: the backend is dropped, the VMM lives.
        s.passt
            .write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
            .unwrap();
        s.dev.backend_event(BACKEND_SUB, EventSet::IN);
        assert!(s.dev.backend_gone);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped() {
        let mem = memory();
        let mut s = setup(&mem, 0);
        s.rxq
            .add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(0x10000, 1024, W, 0)),
                    RawDescriptor::from(Descriptor::new(0x20000, 4096, W, 0)),
                ],
                0,
            )
            .unwrap();
        let f = frame(2000);
        let mut msg = (f.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&f);
        // Then a small one, which fits.
        msg.extend_from_slice(&10u32.to_be_bytes());
        msg.extend_from_slice(&frame(10));
        s.passt.write_all(&msg).unwrap();
        s.dev.backend_event(BACKEND_SUB, EventSet::IN);
        assert_eq!(s.rxq.used().idx().load(), 2);
        assert_eq!(s.rxq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(
            s.rxq.used().ring().ref_at(1).unwrap().load().len(),
            (HDR_LEN + 10) as u32
        );
    }
}
