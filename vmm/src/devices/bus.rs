//! Address buses for port I/O and MMIO exits: each device owns a range; an
//! access goes to the device whose range contains it, with the offset from
//! the range's start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes on a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between vCPU threads.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// A set of non-overlapping device ranges.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, SharedDevice)>,
}

impl Bus {
    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(_, (r, _))| r.base + r.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (_, (r, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - r.base;
        (offset < r.len).then_some((offset, dev))
    }

    /// Dispatches a read; returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        log: Vec<(char, u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.log.push(('r', offset, data.len()));
            data.fill(0xab);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push(('w', offset, data.len()));
        }
    }

    #[test]
    fn accesses_reach_the_owning_device_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 0xab);
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x65, &[0]));
        assert!(!bus.read(0x400, &mut d));
        assert_eq!(a.lock().unwrap().log, vec![('r', 5, 1)]);
        assert_eq!(b.lock().unwrap().log, vec![('w', 4, 1)]);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(d.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.insert(d.clone(), 0x10ff, 0x10).is_err());
        assert!(bus.insert(d.clone(), 0xf00, 0x101).is_err());
        assert!(bus.insert(d.clone(), 0x2000, 0).is_err());
        assert!(bus.insert(d.clone(), u64::MAX, 2).is_err());
        bus.insert(d, 0x1100, 0x100).unwrap();
    }
}
