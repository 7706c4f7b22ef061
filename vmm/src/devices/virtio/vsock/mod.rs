//! virtio-vsock emulated in the VMM (no /dev/vhost-vsock needed), with the
//! host side on Unix sockets (see [`muxer`]). Packets are parsed from and
//! written to guest buffers with the rust-vmm `virtio-vsock` crate, which
//! checks every descriptor's direction and size.

pub mod muxer;
pub mod packet;

use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use super::{
    drain_queue, read_config_bytes, ActivateContext, ActivateError, Mem, Signal, VirtioDevice,
    TYPE_VSOCK, VIRTIO_RING_F_EVENT_IDX,
};
use muxer::Muxer;
use packet::{Hdr, TYPE_STREAM};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest payload accepted in one packet from the guest (Linux sends <= 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

struct Active {
    mem: Mem,
    queues: Vec<Queue>,
    signal: Arc<dyn Signal>,
}

/// The vsock device of one VM.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    state: Option<Active>,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Vsock> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(cid, uds_path)?,
            state: None,
        })
    }

    fn process_tx(&mut self) {
        let Some(a) = &mut self.state else { return };
        let muxer = &mut self.muxer;
        let mem = &a.mem;
        let cid = self.cid;
        let mut data = Vec::new();
        drain_queue(&mut a.queues[TX], mem, &*a.signal, |chain| {
            let pkt = match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    log::debug!("vsock: dropping malformed tx packet: {e}");
                    return Some(0);
                }
            };
            let hdr = Hdr {
                src_cid: pkt.src_cid(),
                dst_cid: pkt.dst_cid(),
                src_port: pkt.src_port(),
                dst_port: pkt.dst_port(),
                op: pkt.op(),
                flags: pkt.flags(),
                buf_alloc: pkt.buf_alloc(),
                fwd_cnt: pkt.fwd_cnt(),
            };
            if pkt.src_cid() != cid {
                return Some(0);
            }
            if pkt.type_() != TYPE_STREAM {
                // Only stream sockets exist here; refuse anything else.
                muxer.reject(&hdr);
                return Some(0);
            }
            data.clear();
            if let Some(slice) = pkt.data_slice() {
                let len = (pkt.len() as usize).min(slice.len());
                data.resize(len, 0);
                if slice.read_slice(&mut data, 0).is_err() {
                    return Some(0);
                }
            }
            muxer.on_guest_packet(&hdr, &data);
            Some(0)
        });
    }

    fn process_rx(&mut self) {
        let Some(a) = &mut self.state else { return };
        if !self.muxer.has_rx() {
            return;
        }
        let muxer = &mut self.muxer;
        let mem = &a.mem;
        drain_queue(&mut a.queues[RX], mem, &*a.signal, |chain| {
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    log::debug!("vsock: unusable rx buffer: {e}");
                    return Some(0);
                }
            };
            let room = pkt.data_slice().map_or(0, |s| s.len());
            let (hdr, data) = muxer.next_rx(room)?;
            if let Some(slice) = pkt.data_slice() {
                if !data.is_empty() && slice.write_slice(&data, 0).is_err() {
                    return Some(0);
                }
            }
            pkt.set_src_cid(hdr.src_cid)
                .set_dst_cid(hdr.dst_cid)
                .set_src_port(hdr.src_port)
                .set_dst_port(hdr.dst_port)
                .set_type(TYPE_STREAM)
                .set_op(hdr.op)
                .set_flags(hdr.flags)
                .set_buf_alloc(hdr.buf_alloc)
                .set_fwd_cnt(hdr.fwd_cnt)
                .set_len(data.len() as u32);
            Some((PKT_HEADER_SIZE + data.len()) as u32)
        });
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: ctx.queues.len(),
            });
        }
        self.muxer
            .activate(ctx.registry)
            .map_err(ActivateError::Backend)?;
        self.state = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            signal: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.muxer.reset();
        self.state = None;
    }

    fn queues(&self) -> &[Queue] {
        self.state.as_ref().map_or(&[], |a| a.queues.as_slice())
    }

    fn queue_notify(&mut self, idx: usize) {
        match idx {
            TX => self.process_tx(),
            RX => {}
            _ => return, // event queue: nothing to consume
        }
        self.process_rx();
    }

    fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    fn backend_event(&mut self, sub: u64, events: EventSet) {
        self.muxer.on_event(sub, events);
        self.process_rx();
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
    use super::packet::op;
    use super::*;

    const CID: u64 = 3;

    /// Writes a raw vsock header at `at`.
    fn write_hdr(mem: &Mem, at: u64, h: &Hdr, len: u32, type_: u16) {
        let mut b = Vec::with_capacity(44);
        b.extend_from_slice(&h.src_cid.to_le_bytes());
        b.extend_from_slice(&h.dst_cid.to_le_bytes());
        b.extend_from_slice(&h.src_port.to_le_bytes());
        b.extend_from_slice(&h.dst_port.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&type_.to_le_bytes());
        b.extend_from_slice(&h.op.to_le_bytes());
        b.extend_from_slice(&h.flags.to_le_bytes());
        b.extend_from_slice(&h.buf_alloc.to_le_bytes());
        b.extend_from_slice(&h.fwd_cnt.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    fn read_u16(mem: &Mem, at: u64) -> u16 {
        mem.read_obj::<u16>(GuestAddress(at)).unwrap()
    }

    #[test]
    fn host_connect_reaches_the_guest_as_a_request_packet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        let mut dev = Vsock::new(CID, &path).unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), CID);

        let mem = memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // Two rx buffers: header and data in separate descriptors (Linux 6.1 style).
        rxq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x10000, 44, 2 | 1, 1)),
                RawDescriptor::from(Descriptor::new(0x11000, 4096, 2, 0)),
                RawDescriptor::from(Descriptor::new(0x20000, 44, 2 | 1, 3)),
                RawDescriptor::from(Descriptor::new(0x21000, 4096, 2, 0)),
            ],
            0,
        )
        .unwrap();
        let sig = Arc::new(CountingSignal::default());
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                rxq.create_queue().unwrap(),
                txq.create_queue().unwrap(),
                evq.create_queue().unwrap(),
            ],
            interrupt: sig.clone(),
            registry: registry(),
        })
        .unwrap();

        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        dev.backend_event(muxer::LISTENER_SUB, EventSet::IN);
        // REQUEST: op at offset 30 of the header, dst_port at 20.
        assert_eq!(read_u16(&mem, 0x10000 + 30), op::REQUEST);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10000 + 20)).unwrap(),
            1024
        );
        let local = mem.read_obj::<u32>(GuestAddress(0x10000 + 16)).unwrap();
        assert_eq!(rxq.used().idx().load(), 1);

        // The guest answers on the tx queue.
        write_hdr(
            &mem,
            0x30000,
            &Hdr {
                src_cid: CID,
                dst_cid: 2,
                src_port: 1024,
                dst_port: local,
                op: op::RESPONSE,
                buf_alloc: 65536,
                ..Default::default()
            },
            0,
            TYPE_STREAM,
        );
        write_hdr(
            &mem,
            0x31000,
            &Hdr {
                src_cid: CID,
                dst_cid: 2,
                src_port: 1024,
                dst_port: local,
                op: op::RW,
                buf_alloc: 65536,
                ..Default::default()
            },
            3,
            TYPE_STREAM,
        );
        mem.write_slice(b"abc", GuestAddress(0x32000)).unwrap();
        txq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x30000, 44, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x31000, 44, 1, 2)),
                RawDescriptor::from(Descriptor::new(0x32000, 3, 0, 0)),
            ],
            0,
        )
        .unwrap();
        dev.queue_notify(TX);
        let mut line = [0u8; 64];
        host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"abc") {
            let n = host.read(&mut line).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&line[..n]);
        }
        assert_eq!(got, format!("OK {local}\nabc").into_bytes());
        assert_eq!(txq.used().idx().load(), 2);

        // Host data flows into the second rx buffer.
        host.write_all(b"xyz").unwrap();
        let id = 1; // the first connection's event id
        dev.backend_event(id, EventSet::IN);
        assert_eq!(read_u16(&mem, 0x20000 + 30), op::RW);
        let mut d = [0u8; 3];
        mem.read_slice(&mut d, GuestAddress(0x21000)).unwrap();
        assert_eq!(&d, b"xyz");
        assert_eq!(rxq.used().idx().load(), 2);
    }
}
