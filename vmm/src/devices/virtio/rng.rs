//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use std::io::Write;
use std::sync::Arc;

use virtio_queue::Queue;

use super::{
    drain_queue, ActivateContext, ActivateError, Mem, Signal, VirtioDevice, TYPE_RNG,
    VIRTIO_RING_F_EVENT_IDX,
};

/// At most this much entropy per request; the guest asks again for more.
const MAX_PER_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    state: Option<(Mem, Queue, Arc<dyn Signal>)>,
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let Some(q) = ctx.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.state = Some((ctx.mem, q, ctx.interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn queues(&self) -> &[Queue] {
        self.state
            .as_ref()
            .map_or(&[], |(_, q, _)| std::slice::from_ref(q))
    }

    fn queue_notify(&mut self, _idx: usize) {
        let Some((mem, queue, signal)) = &mut self.state else {
            return;
        };
        let mut buf = vec![0u8; MAX_PER_REQUEST];
        drain_queue(queue, mem, &**signal, |chain| {
            let Ok(mut w) = chain.clone().writer::<()>(mem) else {
                return Some(0);
            };
            let n = w.available_bytes().min(MAX_PER_REQUEST);
            if !fill_random(&mut buf[..n]) {
                return Some(0);
            }
            Some(w.write_all(&buf[..n]).map(|_| n as u32).unwrap_or(0))
        });
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::testing::{memory, registry, CountingSignal};
    use super::*;

    #[test]
    fn fills_writable_buffers_and_skips_readable_ones() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10000, 4096, 2, 0)),
            RawDescriptor::from(Descriptor::new(0x20000, 64, 0, 0)),
            RawDescriptor::from(Descriptor::new(0xfff0_0000, 64, 2, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut rng = Rng::default();
        let sig = Arc::new(CountingSignal::default());
        rng.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            interrupt: sig,
            registry: registry(),
        })
        .unwrap();
        rng.queue_notify(0);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert!(
            got.iter().filter(|&&b| b == 0).count() < 100,
            "random bytes"
        );
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 4096);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 0);
        assert_eq!(vq.used().ring().ref_at(2).unwrap().load().len(), 0);
    }
}
