//! The virtio-mmio transport (virtio 1.2 section 4.2), version 2 register layout.
//!
//! Written here because rust-vmm publishes no virtio-mmio transport crate
//! (vm-virtio's `virtio-device` is unpublished). Every guest write is checked
//! against the device status state machine: queue setup only before
//! DRIVER_OK, features only between DRIVER and FEATURES_OK, and a device
//! whose driver gives invalid queues is marked DEVICE_NEEDS_RESET.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ConfigChange, EventRegistry, Interrupt, Mem, Signal, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use serde::{Deserialize, Serialize};

/// One virtio queue's registers and ring positions, as a snapshot keeps
/// them (`vmm::snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// One virtio-mmio transport's state, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnap {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub active: bool,
    pub queues: Vec<QueueSnap>,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: Vec<u8>,
}

/// Why a snapshot's transport state does not fit this transport.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("device type {snapshot} in the snapshot, {here} here")]
    DeviceType { snapshot: u32, here: u32 },
    #[error("queue sizes {snapshot:?} in the snapshot, {here:?} here")]
    QueueSizes { snapshot: Vec<u16>, here: Vec<u16> },
    #[error("invalid queue in the snapshot")]
    Queue,
    #[error("the snapshot's features are not offered here")]
    Features,
    #[error("the device did not start from the snapshot's queues")]
    NotStarted,
    #[error("device type {0}: {1}")]
    State(u32, super::StateError),
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x0043_4d56; // "VMC"

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of QueueNotify, where the ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One virtio device behind the mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Mem,
    interrupt: Arc<Interrupt>,
    registry: EventRegistry,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device`; `queue_evts` are the ioeventfds (one per queue).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        registry: EventRegistry,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let mut t = MmioTransport {
            device,
            mem,
            interrupt,
            registry,
            queues: Vec::new(),
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
        };
        t.fresh_queues();
        t
    }

    fn dev(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh_queues(&mut self) {
        let sizes = self.dev().queue_max_sizes().to_vec();
        self.queues = sizes
            .into_iter()
            .filter_map(|max| Queue::new(max).ok())
            .collect();
    }

    /// The device status register (for tests and state dumps).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.dev().device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => {
                let f = self.offered_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => queue.map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn offered_features(&self) -> u64 {
        self.dev().features() | VIRTIO_F_VERSION_1
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                let negotiating =
                    self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
                if negotiating {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a write that reaches us is
                // forwarded the same way (or ignored for a bad queue index).
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }

    /// Queue addresses may change only while the queue is not ready.
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                f(q);
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (spec 3.1.1); anything else is a bug
        // in the driver that we refuse.
        if v & self.status != self.status {
            log::warn!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        if added & status::FEATURES_OK != 0 && !self.features_ok() {
            // Leave FEATURES_OK clear: the driver reads it back and fails.
            self.status = v & !status::FEATURES_OK;
            return;
        }
        self.status = v;
        if added & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn features_ok(&mut self) -> bool {
        let offered = self.offered_features();
        let f = self.driver_features;
        if f & !offered != 0 || f & VIRTIO_F_VERSION_1 == 0 {
            log::warn!("virtio-mmio: driver accepted features {f:#x} outside {offered:#x}");
            return false;
        }
        self.dev().ack_features(f);
        true
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.needs_reset("DRIVER_OK without FEATURES_OK");
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            if q.ready() && !q.is_valid(&self.mem) {
                self.needs_reset("a queue lies outside guest memory or is misaligned");
                return;
            }
            q.set_event_idx(event_idx);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: std::mem::take(&mut self.queues),
            interrupt: self.interrupt.clone() as Arc<dyn Signal>,
            registry: self.registry.clone(),
        };
        let res = self.dev().activate(ctx);
        match res {
            Ok(()) => self.active = true,
            Err(e) => {
                self.fresh_queues();
                self.needs_reset(&e.to_string());
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        log::warn!(
            "virtio-mmio: device type {} not started: {why}",
            self.dev().device_type()
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.config();
    }

    fn reset(&mut self) {
        if self.active {
            self.dev().reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        self.fresh_queues();
    }
}

fn queue_snap(q: &Queue) -> QueueSnap {
    QueueSnap {
        max_size: q.max_size(),
        size: q.size(),
        ready: q.ready(),
        desc_table: q.desc_table(),
        avail_ring: q.avail_ring(),
        used_ring: q.used_ring(),
        next_avail: q.next_avail(),
        next_used: q.next_used(),
        event_idx: q.event_idx_enabled(),
    }
}

fn queue_from(s: &QueueSnap) -> Option<Queue> {
    let mut q = Queue::new(s.max_size).ok()?;
    q.set_size(s.size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(s.desc_table);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(s.avail_ring);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(s.used_ring);
    q.set_used_ring_address(lo, hi);
    q.set_next_avail(s.next_avail);
    q.set_next_used(s.next_used);
    q.set_event_idx(s.event_idx);
    q.set_ready(s.ready);
    Some(q)
}

impl MmioTransport {
    /// The transport's registers and queue positions, for a snapshot.
    pub fn snapshot(&self) -> TransportSnap {
        self.snapshot_of(&*self.dev())
    }

    /// Like [`Self::snapshot`], with the device already locked by the caller
    /// (who holds every device so that no queue moves meanwhile).
    pub fn snapshot_of(&self, dev: &dyn VirtioDevice) -> TransportSnap {
        let queues = if self.active {
            dev.queues().iter().map(queue_snap).collect()
        } else {
            self.queues.iter().map(queue_snap).collect()
        };
        TransportSnap {
            device_type: dev.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            active: self.active,
            queues,
            device: dev.save_state(),
        }
    }

    /// Loads a snapshot into a fresh transport of the same device type,
    /// starting the device if it was running. Returns whether the device's
    /// configuration changed since the guest read it (see
    /// [`Self::config_changed`]).
    pub fn restore(&mut self, s: &TransportSnap) -> Result<ConfigChange, RestoreError> {
        let (here, sizes) = {
            let dev = self.dev();
            (dev.device_type(), dev.queue_max_sizes().to_vec())
        };
        if s.device_type != here {
            return Err(RestoreError::DeviceType {
                snapshot: s.device_type,
                here,
            });
        }
        let snap_sizes: Vec<u16> = s.queues.iter().map(|q| q.max_size).collect();
        if snap_sizes != sizes {
            return Err(RestoreError::QueueSizes {
                snapshot: snap_sizes,
                here: sizes,
            });
        }
        self.queues = s
            .queues
            .iter()
            .map(queue_from)
            .collect::<Option<Vec<_>>>()
            .ok_or(RestoreError::Queue)?;
        let change = self
            .dev()
            .restore_state(&s.device)
            .map_err(|e| RestoreError::State(here, e))?;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.clear();
        if s.interrupt_status != 0 {
            self.interrupt.set(s.interrupt_status);
        }
        if s.active {
            if self.driver_features & !self.offered_features() != 0 {
                return Err(RestoreError::Features);
            }
            self.dev().ack_features(self.driver_features);
            self.activate();
            if !self.active {
                return Err(RestoreError::NotStarted);
            }
        }
        Ok(change)
    }

    /// Tells the driver the device configuration changed (e.g. a disk's size).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.config();
    }

    /// Whether the device raised an interrupt the driver has not yet
    /// acknowledged (the guest has work to look at).
    pub fn interrupt_pending(&self) -> bool {
        self.active && self.interrupt.status() != 0
    }

    /// After a restore: signals again an interrupt the snapshot shows raised
    /// but not acknowledged. The host kernel injects an irqfd interrupt
    /// asynchronously (a work item), so a snapshot taken between a device's
    /// raise and the injection holds the status bit but no pending vector;
    /// with EVENT_IDX the device never signals that queue again (the driver's
    /// used_event stays behind), and the guest would wait forever. A
    /// duplicate costs the driver one status read.
    pub fn redeliver_interrupt(&self) -> bool {
        self.active && self.interrupt.resend_pending()
    }

    /// Makes the device look at every queue, as if the driver had notified
    /// it: a notification pending at snapshot time must not be lost.
    pub fn kick_queues(&self) {
        for e in &self.queue_evts {
            let _ = e.write(1);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.dev().read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.dev().write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::GuestAddress;

    use super::super::testing::{memory, registry};
    use super::super::{ActivateError, INT_VRING};
    use super::*;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        queues_got: usize,
        queues: Vec<Queue>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[9, 8, 7, 6], offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.queues_got = ctx.queues.len();
            self.queues = ctx.queues;
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn queues(&self) -> &[Queue] {
            &self.queues
        }
        fn queue_notify(&mut self, _idx: usize) {}
    }

    fn transport() -> (
        MmioTransport,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
        Vec<EventFd>,
    ) {
        let (t, a, r, e, _) = transport_and_irq();
        (t, a, r, e)
    }

    fn transport_and_irq() -> (
        MmioTransport,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
        Vec<EventFd>,
        EventFd,
    ) {
        let dev = Dummy::default();
        let (a, r) = (dev.activations.clone(), dev.resets.clone());
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_seen = irq.try_clone().unwrap();
        let t = MmioTransport::new(
            Arc::new(Mutex::new(dev)),
            memory(),
            Arc::new(Interrupt::new(irq)),
            registry(),
            evts,
        );
        (t, a, r, clones, irq_seen)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, idx);
        wr(t, reg::QUEUE_NUM, 16);
        for (lo, off) in [
            (reg::QUEUE_DESC_LOW, 0),
            (reg::QUEUE_DRIVER_LOW, 0x1000),
            (reg::QUEUE_DEVICE_LOW, 0x2000),
        ] {
            wr(t, lo, (base + off) as u32);
            wr(t, lo + 4, ((base + off) >> 32) as u32);
        }
        wr(t, reg::QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport) {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, 1);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, 1 << 5);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 offered");
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 5);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        let mut cfg = [0u8; 2];
        t.read(reg::CONFIG + 1, &mut cfg);
        assert_eq!(cfg, [8, 7]);
    }

    #[test]
    fn full_negotiation_activates_the_device() {
        let (mut t, act, _, _) = transport();
        negotiate(&mut t);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn features_outside_the_offer_are_refused() {
        let (mut t, ..) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 7);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn a_queue_outside_memory_marks_the_device_for_reset() {
        let (mut t, act, ..) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0xfff_0000_0000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(act.load(Ordering::SeqCst), 0);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            rd(&mut t, reg::INTERRUPT_STATUS) & super::super::INT_CONFIG,
            0
        );
        // A reset brings it back.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_setup_after_driver_ok_is_ignored_and_reset_resets_the_device() {
        let (mut t, _, resets, _) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(
            rd(&mut t, reg::QUEUE_READY),
            0,
            "queues moved to the device"
        );
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(
            rd(&mut t, reg::QUEUE_NUM_MAX),
            16,
            "fresh queues after reset"
        );
    }

    #[test]
    fn notify_writes_reach_the_queue_eventfd_and_bad_indexes_are_ignored() {
        let (mut t, _, _, evts) = transport();
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        wr(&mut t, reg::QUEUE_NOTIFY, 99);
        assert!(evts[0].read().is_err());
        assert_eq!(evts[1].read().unwrap(), 1);
    }

    #[test]
    fn unaligned_and_odd_sized_register_accesses_are_harmless() {
        let (mut t, ..) = transport();
        let mut d = [0xffu8; 2];
        t.read(reg::MAGIC, &mut d);
        assert_eq!(d, [0, 0]);
        t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(t.status(), 0);
        let _ = GuestAddress(0);
    }

    #[test]
    fn an_active_transport_survives_snapshot_and_restore() {
        let (mut t, act, ..) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let snap = t.snapshot();
        assert!(snap.active);
        assert_eq!(snap.queues[1].desc_table, 0x20000);
        let (mut fresh, act2, ..) = transport();
        fresh.restore(&snap).unwrap();
        assert_eq!(
            act2.load(Ordering::SeqCst),
            1,
            "device started from the snapshot"
        );
        assert_eq!(fresh.snapshot(), snap);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        let mut bad = snap.clone();
        bad.device_type = 7;
        assert!(matches!(
            transport().0.restore(&bad),
            Err(RestoreError::DeviceType {
                snapshot: 7,
                here: 42
            })
        ));
        let mut bad = snap;
        bad.queues[0].desc_table = 0xfff_0000_0000;
        assert!(
            matches!(transport().0.restore(&bad), Err(RestoreError::NotStarted)),
            "queues are validated again (a queue outside memory does not start)"
        );
    }

    #[test]
    fn an_unacknowledged_interrupt_is_signalled_again_after_a_restore() {
        let (mut t, ..) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        // Raised, never acknowledged: the injection may have been in flight.
        t.interrupt.used();
        let snap = t.snapshot();
        assert_eq!(snap.interrupt_status, INT_VRING);
        let (mut fresh, _, _, _, irq) = transport_and_irq();
        fresh.restore(&snap).unwrap();
        assert!(irq.read().is_err(), "restoring alone signals nothing");
        assert!(fresh.redeliver_interrupt());
        assert_eq!(irq.read().unwrap(), 1, "the guest is interrupted again");
        assert_eq!(rd(&mut fresh, reg::INTERRUPT_STATUS), INT_VRING);

        // Acknowledged before the snapshot: nothing to deliver.
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        let (mut quiet, _, _, _, irq) = transport_and_irq();
        quiet.restore(&t.snapshot()).unwrap();
        assert!(!quiet.redeliver_interrupt());
        assert!(irq.read().is_err());
    }

    #[test]
    fn status_may_not_drop_bits() {
        let (mut t, ..) = transport();
        negotiate(&mut t);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(t.status() & status::FEATURES_OK, 0);
    }
}
