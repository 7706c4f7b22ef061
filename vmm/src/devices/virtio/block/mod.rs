//! virtio-blk backed by a host file: read-only (image) or read-write (scratch).
//!
//! Written here: rust-vmm publishes no virtio-blk device crate.

pub mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;

use super::{
    drain_queue, read_config_bytes, ActivateContext, ActivateError, ConfigChange, Mem, Signal,
    StateError, VirtioDevice, TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};
use request::{Disk, SECTOR_SIZE};

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

const QUEUE_SIZE: u16 = 256;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is in use by another VM (it is locked)")]
    Locked { path: String },
}

struct Active {
    mem: Mem,
    queue: Queue,
    signal: Arc<dyn Signal>,
}

/// A virtio block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: Vec<u8>,
    config: Vec<u8>,
    acked: u64,
    state: Option<Active>,
    buf: Vec<u8>,
}

impl Block {
    /// Opens `path`; read-write disks are locked exclusively, read-only ones shared.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: name.clone(),
                source,
            })?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked { path: name });
        }
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: name.clone(),
                source,
            })?
            .len();
        Ok(Block::from_file(file, len, read_only, id))
    }

    /// A device over an already open file of `len` bytes (the tail beyond
    /// the last whole sector is not visible to the guest).
    pub fn from_file(file: File, len: u64, read_only: bool, id: &str) -> Block {
        let capacity = len / SECTOR_SIZE * SECTOR_SIZE;
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&(capacity / SECTOR_SIZE).to_le_bytes()); // capacity
        config.extend_from_slice(&0u32.to_le_bytes()); // size_max (not offered)
        config.extend_from_slice(&(QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
        Block {
            file,
            read_only,
            capacity,
            id: id.as_bytes().to_vec(),
            config,
            acked: 0,
            state: None,
            buf: Vec::new(),
        }
    }

    fn process(&mut self) {
        let Some(active) = &mut self.state else {
            return;
        };
        let disk = Disk {
            file: &self.file,
            capacity: self.capacity,
            read_only: self.read_only,
            id: &self.id,
        };
        let buf = &mut self.buf;
        let mem = &active.mem;
        drain_queue(&mut active.queue, mem, &*active.signal, |chain| {
            Some(request::handle(chain, mem, &disk, buf))
        });
        // Do not keep a large bounce buffer around after a big request.
        if self.buf.capacity() > (1 << 20) {
            self.buf = Vec::new();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        F_SEG_MAX | F_FLUSH | VIRTIO_RING_F_EVENT_IDX | ro
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let Some(queue) = ctx.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.state = Some(Active {
            mem: ctx.mem,
            queue,
            signal: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn queues(&self) -> &[Queue] {
        self.state
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn queue_notify(&mut self, idx: usize) {
        if idx == 0 {
            self.process();
        }
    }

    /// The capacity the guest saw: a snapshot made with placeholder disks is
    /// restored with the real ones, whose size the driver must re-read.
    fn save_state(&self) -> Vec<u8> {
        (self.capacity / SECTOR_SIZE).to_le_bytes().to_vec()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<ConfigChange, StateError> {
        let saved: [u8; 8] = state.try_into().map_err(|_| StateError::Size {
            got: state.len(),
            expected: 8,
        })?;
        Ok(
            if u64::from_le_bytes(saved) == self.capacity / SECTOR_SIZE {
                ConfigChange::Same
            } else {
                ConfigChange::Changed
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::atomic::Ordering;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::testing::{memory, registry, CountingSignal};
    use super::request::*;
    use super::*;

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE
    const NEXT: u16 = 1;

    struct Rig<'a> {
        vq: MockSplitQueue<'a, Mem>,
        next_desc: u16,
    }

    impl<'a> Rig<'a> {
        /// Adds a chain of (addr, len, device-writable) descriptors.
        fn chain(&mut self, parts: &[(u64, u32, bool)]) {
            let start = self.next_desc;
            let descs: Vec<RawDescriptor> = parts
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let last = i + 1 == parts.len();
                    let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
                    let next = if last { 0 } else { start + i as u16 + 1 };
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect();
            self.vq.add_desc_chains(&descs, start).unwrap();
            self.next_desc += parts.len() as u16;
        }
    }

    fn header(mem: &Mem, at: u64, t: u32, sector: u64) {
        let h = Header {
            type_: t.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        mem.write_obj(h, GuestAddress(at)).unwrap();
    }

    fn device(ro: bool) -> (Block, File) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0x5a; 8 * 512]).unwrap();
        let dev = Block::from_file(f.try_clone().unwrap(), 8 * 512 + 100, ro, "vmc-disk-1");
        (dev, f)
    }

    /// A snapshot made with a placeholder disk, restored onto the real one:
    /// the device says its configuration changed, so that the driver
    /// re-reads the capacity; the same disk, or one of the same size, does
    /// not; state of another shape is refused.
    #[test]
    fn restored_state_reports_a_changed_capacity() {
        let (dev, _f) = device(false);
        let saved = dev.save_state();
        assert_eq!(saved, 8u64.to_le_bytes());
        let (mut same, _g) = device(true);
        assert_eq!(same.restore_state(&saved).unwrap(), ConfigChange::Same);
        let placeholder = Block::from_file(tempfile::tempfile().unwrap(), 0, true, "p");
        let (mut real, _h) = device(false);
        assert_eq!(
            real.restore_state(&placeholder.save_state()).unwrap(),
            ConfigChange::Changed
        );
        let e = real.restore_state(&[1, 2, 3]).unwrap_err();
        assert_eq!(e.to_string(), "3 bytes of device state, 8 expected");
    }

    fn run(dev: &mut Block, mem: &Mem, vq: &MockSplitQueue<Mem>) -> Arc<CountingSignal> {
        let sig = Arc::new(CountingSignal::default());
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            interrupt: sig.clone(),
            registry: registry(),
        })
        .unwrap();
        dev.queue_notify(0);
        sig
    }

    fn used(vq: &MockSplitQueue<Mem>, i: u16) -> u32 {
        vq.used().ring().ref_at(i as usize).unwrap().load().len()
    }

    #[test]
    fn config_reports_whole_sectors_and_features_follow_read_only() {
        let (dev, _) = device(true);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_ne!(dev.features() & F_RO, 0);
        assert_eq!(device(false).0.features() & F_RO, 0);
    }

    #[test]
    fn read_write_flush_and_id() {
        let mem = memory();
        let (mut dev, mut file) = device(false);
        let mut rig = Rig {
            vq: MockSplitQueue::create(&mem, GuestAddress(0), 32),
            next_desc: 0,
        };
        // 1: write 1024 bytes of 0x11 at sector 2.
        header(&mem, 0x10000, T_OUT, 2);
        mem.write_slice(&[0x11; 1024], GuestAddress(0x11000))
            .unwrap();
        rig.chain(&[
            (0x10000, 16, false),
            (0x11000, 1024, false),
            (0x12000, 1, true),
        ]);
        // 2: read 512 bytes at sector 2 into two descriptors.
        header(&mem, 0x13000, T_IN, 2);
        rig.chain(&[
            (0x13000, 16, false),
            (0x14000, 256, true),
            (0x15000, 256, true),
            (0x16000, 1, true),
        ]);
        // 3: flush; 4: get id.
        header(&mem, 0x17000, T_FLUSH, 0);
        rig.chain(&[(0x17000, 16, false), (0x17100, 1, true)]);
        header(&mem, 0x18000, T_GET_ID, 0);
        rig.chain(&[
            (0x18000, 16, false),
            (0x18100, 20, true),
            (0x18200, 1, true),
        ]);

        let sig = run(&mut dev, &mem, &rig.vq);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), S_OK);
        let mut disk = vec![0u8; 8 * 512];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut disk).unwrap();
        assert!(disk[1024..2048].iter().all(|&b| b == 0x11));
        assert!(disk[..1024].iter().all(|&b| b == 0x5a));

        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x16000)).unwrap(), S_OK);
        let mut got = [0u8; 256];
        mem.read_slice(&mut got, GuestAddress(0x15000)).unwrap();
        assert!(got.iter().all(|&b| b == 0x11));
        assert_eq!(used(&rig.vq, 0), 1);
        assert_eq!(used(&rig.vq, 1), 513);

        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x17100)).unwrap(), S_OK);
        let mut id = [0u8; 10];
        mem.read_slice(&mut id, GuestAddress(0x18100)).unwrap();
        assert_eq!(&id, b"vmc-disk-1");
        assert_eq!(rig.vq.used().idx().load(), 4);
        assert!(sig.used.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn bad_requests_get_error_status_not_a_crash() {
        let mem = memory();
        let (mut dev, _) = device(false);
        let mut rig = Rig {
            vq: MockSplitQueue::create(&mem, GuestAddress(0), 32),
            next_desc: 0,
        };
        mem.write_slice(&[0xff; 8], GuestAddress(0x12000)).unwrap();
        // Past the end of the disk.
        header(&mem, 0x10000, T_IN, 8);
        rig.chain(&[
            (0x10000, 16, false),
            (0x11000, 512, true),
            (0x12000, 1, true),
        ]);
        // Not a whole sector.
        header(&mem, 0x10100, T_OUT, 0);
        rig.chain(&[
            (0x10100, 16, false),
            (0x11000, 100, false),
            (0x12001, 1, true),
        ]);
        // Unknown type.
        header(&mem, 0x10200, 99, 0);
        rig.chain(&[(0x10200, 16, false), (0x12002, 1, true)]);
        // Header too short.
        rig.chain(&[(0x10300, 8, false), (0x12003, 1, true)]);
        // Data buffer outside guest memory.
        header(&mem, 0x10400, T_IN, 0);
        rig.chain(&[
            (0x10400, 16, false),
            (0xffff_0000, 512, true),
            (0x12004, 1, true),
        ]);
        // No status byte at all.
        header(&mem, 0x10500, T_IN, 0);
        rig.chain(&[(0x10500, 16, false)]);
        // Sector overflow.
        header(&mem, 0x10600, T_IN, u64::MAX);
        rig.chain(&[
            (0x10600, 16, false),
            (0x11000, 512, true),
            (0x12006, 1, true),
        ]);

        run(&mut dev, &mem, &rig.vq);
        let st = |off: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + off)).unwrap();
        assert_eq!(st(0), S_IOERR);
        assert_eq!(st(1), S_IOERR);
        assert_eq!(st(2), S_UNSUPP);
        assert_eq!(st(3), S_IOERR);
        assert_eq!(st(6), S_IOERR);
        assert_eq!(rig.vq.used().idx().load(), 7, "every chain is returned");
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mem = memory();
        let (mut dev, mut file) = device(true);
        let mut rig = Rig {
            vq: MockSplitQueue::create(&mem, GuestAddress(0), 32),
            next_desc: 0,
        };
        header(&mem, 0x10000, T_OUT, 0);
        mem.write_slice(&[0x22; 512], GuestAddress(0x11000))
            .unwrap();
        rig.chain(&[
            (0x10000, 16, false),
            (0x11000, 512, false),
            (0x12000, 1, true),
        ]);
        run(&mut dev, &mem, &rig.vq);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), S_IOERR);
        let mut first = [0u8; 512];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut first).unwrap();
        assert!(first.iter().all(|&b| b == 0x5a));
        let _ = QueueT::ready(&rig.vq.create_queue::<Queue>().unwrap());
    }

    #[test]
    fn a_second_writer_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let _a = Block::open(&p, false, "a").unwrap();
        assert!(matches!(
            Block::open(&p, false, "b"),
            Err(BlockError::Locked { .. })
        ));
        assert!(matches!(
            Block::open(&dir.path().join("missing"), true, "c"),
            Err(BlockError::Open { .. })
        ));
    }
}
