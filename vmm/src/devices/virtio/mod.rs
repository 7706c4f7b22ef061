//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] turns guest
//! register accesses into feature negotiation and queue setup, then hands the
//! device its queues on DRIVER_OK. Queue notifications arrive on one ioeventfd
//! per queue, handled by the event loop, never by the vCPU thread.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as the devices see it.
pub type Mem = GuestMemoryMmap;

/// Feature bits shared by all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Bits of the interrupt status register.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Raises the device's interrupt. Generic so queue handlers can be tested
/// without KVM.
pub trait Signal: Send + Sync {
    /// Used buffers were added to a queue.
    fn used(&self);
    /// The device configuration (or status) changed.
    fn config(&self);
}

/// The interrupt of one virtio-mmio device: an irqfd plus the ISR bits the
/// driver reads and acknowledges through the transport.
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd,
            status: AtomicU32::new(0),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.fire();
    }

    fn fire(&self) {
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt: {e}");
        }
    }

    /// Signals the interrupt again if any status bit is still set (the
    /// driver has not acknowledged it); returns whether it did.
    pub fn resend_pending(&self) -> bool {
        let pending = self.status() != 0;
        if pending {
            self.fire();
        }
        pending
    }

    /// The value of InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets bits without raising the interrupt (restoring a snapshot).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl Signal for Interrupt {
    fn used(&self) {
        self.raise(INT_VRING);
    }
    fn config(&self) {
        self.raise(INT_CONFIG);
    }
}

/// Identifies what an epoll event is for. Packed into the 64-bit epoll data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The VMM must stop (reset, error, or a stop request).
    Exit,
    /// Queue `queue` of device `dev` was notified.
    Queue { dev: u8, queue: u16 },
    /// A device's own descriptor (e.g. a vsock host socket), `sub` chosen by the device.
    Device { dev: u8, sub: u64 },
}

const SUB_MASK: u64 = (1 << 48) - 1;

impl Token {
    pub fn encode(self) -> u64 {
        match self {
            Token::Exit => 0,
            Token::Queue { dev, queue } => (1 << 56) | ((dev as u64) << 48) | queue as u64,
            Token::Device { dev, sub } => (2 << 56) | ((dev as u64) << 48) | (sub & SUB_MASK),
        }
    }

    pub fn decode(v: u64) -> Option<Token> {
        let dev = ((v >> 48) & 0xff) as u8;
        match v >> 56 {
            0 if v == 0 => Some(Token::Exit),
            1 => Some(Token::Queue {
                dev,
                queue: (v & 0xffff) as u16,
            }),
            2 => Some(Token::Device {
                dev,
                sub: v & SUB_MASK,
            }),
            _ => None,
        }
    }
}

/// Lets a device add and remove its own descriptors in the VMM's epoll set.
#[derive(Clone)]
pub struct EventRegistry {
    epoll: Arc<Epoll>,
    dev: u8,
}

impl EventRegistry {
    pub fn new(epoll: Arc<Epoll>, dev: u8) -> Self {
        EventRegistry { epoll, dev }
    }

    /// Watches `fd` for `events`; the device's `backend_event` gets `sub`.
    pub fn add(&self, fd: RawFd, events: EventSet, sub: u64) -> std::io::Result<()> {
        let token = Token::Device { dev: self.dev, sub }.encode();
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, events: EventSet, sub: u64) -> std::io::Result<()> {
        let token = Token::Device { dev: self.dev, sub }.encode();
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: Mem,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<dyn Signal>,
    pub registry: EventRegistry,
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device backend: {0}")]
    Backend(std::io::Error),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; most devices ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Drops the queues and returns to the inactive state.
    fn reset(&mut self);
    /// The queues of an active device (empty when inactive), for snapshots.
    fn queues(&self) -> &[Queue];
    /// The driver notified queue `idx`.
    fn queue_notify(&mut self, idx: usize);
    /// A descriptor the device registered became ready.
    fn backend_event(&mut self, _sub: u64, _events: EventSet) {}
    /// Open host connections (vsock); a snapshot waits for none.
    fn connection_count(&self) -> usize {
        0
    }
    /// The device's own state for a snapshot, beyond its transport and
    /// queues (which the transport saves). None by default.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes what [`Self::save_state`] wrote on a device of the same kind,
    /// before the device is started from the snapshot's queues. Returns
    /// whether the configuration the guest saw differs from this device's
    /// (the transport then tells the driver).
    fn restore_state(&mut self, _state: &[u8]) -> Result<ConfigChange, StateError> {
        Ok(ConfigChange::Same)
    }
}

/// Whether a restored device's configuration space differs from the one the
/// guest read before the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigChange {
    Same,
    Changed,
}

/// A device's saved state that does not fit the device.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{got} bytes of device state, {expected} expected")]
    Size { got: usize, expected: usize },
}

/// Reads `data.len()` bytes at `offset` of a little-endian config struct;
/// out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(o as usize))
            .copied()
            .unwrap_or(0);
    }
}

/// Drains a queue with notifications suppressed, re-checking after
/// re-enabling them (so no buffer slips through), then signals the driver
/// once if the ring's event index asks for it.
///
/// `handle` gets each chain and returns the number of bytes it wrote to it,
/// or `None` to stop (the chain is put back for a later attempt).
pub fn drain_queue<F>(queue: &mut Queue, mem: &Mem, signal: &dyn Signal, mut handle: F)
where
    F: FnMut(&mut virtio_queue::DescriptorChain<&Mem>) -> Option<u32>,
{
    let mut used_any = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut stopped = false;
        let mut popped = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            match handle(&mut chain) {
                Some(len) => {
                    if queue.add_used(mem, head, len).is_err() {
                        log::warn!("virtio: cannot add used descriptor {head}");
                    }
                    used_any = true;
                }
                None => {
                    queue.go_to_previous_position();
                    stopped = true;
                    break;
                }
            }
        }
        if stopped {
            let _ = queue.enable_notification(mem);
            break;
        }
        match queue.enable_notification(mem) {
            // More arrived meanwhile: another pass.
            Ok(true) if popped => continue,
            // "More" that cannot be taken (an available index the ring
            // cannot hold: the fuzzer's hang): not another pass, for ever.
            Ok(true) => {
                log::warn!("virtio: the driver's available ring is inconsistent; ignored until its next notification");
                break;
            }
            _ => break,
        }
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        signal.used();
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for device tests: guest memory and a counting interrupt.
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::GuestAddress;

    use super::*;

    #[derive(Default)]
    pub struct CountingSignal {
        pub used: AtomicUsize,
        pub config: AtomicUsize,
    }

    impl Signal for CountingSignal {
        fn used(&self) {
            self.used.fetch_add(1, Ordering::SeqCst);
        }
        fn config(&self) {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    pub fn registry() -> EventRegistry {
        EventRegistry::new(Arc::new(Epoll::new().unwrap()), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Exit,
            Token::Queue { dev: 3, queue: 2 },
            Token::Device {
                dev: 255,
                sub: (1 << 48) - 1,
            },
            Token::Device { dev: 0, sub: 0 },
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(7 << 56), None);
    }

    /// Found by the `virtio` fuzz target: an available index further ahead
    /// than the ring holds made drain_queue spin for ever (nothing could be
    /// popped, yet re-enabling notifications always found "more"), so a
    /// guest could hold a VMM thread at 100 % CPU with one store.
    #[test]
    fn an_available_index_the_ring_cannot_hold_does_not_spin_the_device() {
        use virtio_queue::QueueT;
        use vm_memory::Bytes;
        let mem = testing::memory();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        // avail.idx = 1000: 1000 buffers "available" in a ring of 16.
        mem.write_obj(1000u16, vm_memory::GuestAddress(0x2002))
            .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let signal = testing::CountingSignal::default();
            let mut handled = 0;
            drain_queue(&mut q, &mem, &signal, |_| {
                handled += 1;
                Some(0)
            });
            let _ = done_tx.send(handled);
        });
        // A liveness bound (the drain does no work at all), not a timing.
        let handled = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("drain_queue spins on an inconsistent available ring");
        assert_eq!(handled, 0);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
