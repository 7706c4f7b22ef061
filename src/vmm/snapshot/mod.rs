//! Snapshots of a running VM: every vCPU's registers (general, special,
//! XSAVE, XCRs, debug, MSRs, LAPIC, pending events, MP state, CPUID), the
//! in-kernel irqchip and KVM clock, the virtio transports and queues, and guest
//! memory.
//!
//! `state.bin` is a versioned header, a postcard payload and its SHA-256, so a
//! truncated, corrupted or foreign file is refused as a whole, never
//! half-loaded. `memory.img` is guest RAM as a sparse file (pages the guest
//! never touched are holes); a restored VM maps it `MAP_PRIVATE`, so VMs
//! restored from one snapshot share its page cache and pay only for the pages
//! they write.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::devices::virtio::Mem;

pub mod report;

const MAGIC: &[u8; 8] = b"VMCSNAP\0";
/// Bumped on any change to the state types below.
pub const FORMAT_VERSION: u32 = 1;

/// Errors saving or loading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the snapshot is not usable: {0}")]
    Invalid(String),
    #[error("the VM did not pause: {0}")]
    Pause(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// Reads the MSRs in `list` that KVM will give (some backends refuse a few).
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|_| SnapshotError::Invalid("too many MSRs".into()))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
    if n == entries.len() {
        return Ok(msrs.as_slice().to_vec());
    }
    // KVM stops at the first MSR it refuses: take them one by one.
    let mut out = Vec::new();
    for &index in list {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| SnapshotError::Invalid("MSR list".into()))?;
        match vcpu.get_msrs(&mut one) {
            Ok(1) => out.push(one.as_slice()[0]),
            _ => log::debug!("snapshot: MSR {index:#x} not readable, skipped"),
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Saves a vCPU that is out of KVM_RUN (paused after an EINTR return, so
    /// any pending I/O was completed by KVM).
    pub fn save(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, SnapshotError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("get MP state"))?;
        let regs = vcpu.get_regs().map_err(kvm("get regs"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
        let xsave = vcpu.get_xsave().map_err(kvm("get XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("get XCRs"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(kvm("get debug regs"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("get CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = get_msrs(vcpu, msr_list)?;
        // Events last: reading other state must not leave events pending.
        let events = vcpu.get_vcpu_events().map_err(kvm("get vCPU events"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Whether the vCPU was halted (HLT, waiting for an interrupt).
    pub fn halted(&self) -> bool {
        self.mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED
    }

    /// Loads the state into a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Invalid("CPUID".into()))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("set MP state"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("set regs"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("set sregs"))?;
        // SAFETY: the kvm_xsave was read by KVM_GET_XSAVE on the same kind of
        // host (the snapshot key includes the backend), so its size matches.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("set XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("set XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set debug regs"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("set LAPIC"))?;
        // The TSC first, so that the TSC deadline is relative to the right value.
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|m| m.index != 0x10);
        let list =
            Msrs::from_entries(&msrs).map_err(|_| SnapshotError::Invalid("MSR list".into()))?;
        let n = vcpu.set_msrs(&list).map_err(kvm("set MSRs"))?;
        if n != msrs.len() {
            return Err(SnapshotError::Invalid(format!(
                "KVM refused MSR {:#x} on restore",
                msrs[n].index
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }
}

/// One virtio queue's registers and ring positions.
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

/// One virtio-mmio transport.
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
}

/// The whole machine (memory lives in its own file).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// What the snapshot was made from; compared before use.
    pub key: String,
    pub mem_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
    pub devices: Vec<TransportSnap>,
}

/// Reads the PIC (master, slave) and IOAPIC state.
pub fn save_irqchips(vm: &VmFd) -> Result<Vec<kvm_irqchip>, SnapshotError> {
    (0..3)
        .map(|chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(kvm("get irqchip"))
                .map(|_| c)
        })
        .collect()
}

/// Restores the irqchips and the KVM clock.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    for c in &state.irqchips {
        vm.set_irqchip(c).map_err(kvm("set irqchip"))?;
    }
    let mut clock = state.clock;
    // Only the clock value is restored; the flags describe the old host.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("set clock"))
}

impl VmState {
    /// Writes `state.bin` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        let payload =
            postcard::to_stdvec(self).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let mut f = File::create(dir.join("state.bin"))?;
        f.write_all(MAGIC)?;
        f.write_all(&FORMAT_VERSION.to_le_bytes())?;
        f.write_all(&(payload.len() as u64).to_le_bytes())?;
        f.write_all(&payload)?;
        f.write_all(&Sha256::digest(&payload))?;
        f.sync_all()?;
        Ok(())
    }

    /// Reads `state.bin` from `dir`, checking magic, version, length and checksum.
    pub fn read(dir: &Path) -> Result<VmState, SnapshotError> {
        let mut data = Vec::new();
        File::open(dir.join("state.bin"))?.read_to_end(&mut data)?;
        if data.len() < 20 || &data[..8] != MAGIC {
            return Err(SnapshotError::Invalid(
                "state.bin is not a vmc snapshot".into(),
            ));
        }
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Invalid(format!(
                "snapshot format {version}, this vmc reads format {FORMAT_VERSION}"
            )));
        }
        let len = u64::from_le_bytes(data[12..20].try_into().unwrap_or_default()) as usize;
        if data.len() != 20 + len + 32 {
            return Err(SnapshotError::Invalid("state.bin is truncated".into()));
        }
        let payload = &data[20..20 + len];
        if Sha256::digest(payload).as_slice() != &data[20 + len..] {
            return Err(SnapshotError::Invalid(
                "state.bin is corrupted (checksum mismatch)".into(),
            ));
        }
        postcard::from_bytes(payload).map_err(|e| SnapshotError::Invalid(format!("state.bin: {e}")))
    }
}

/// Writes guest RAM to `path` as a sparse file: only resident pages that are
/// not all zero are written. Call with every vCPU paused and every device
/// locked, so nothing changes guest memory meanwhile.
pub fn dump_memory(mem: &Mem, path: &Path) -> Result<(), SnapshotError> {
    const PAGE: usize = 4096;
    let f = File::create(path)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total)?;
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        // Which pages were ever touched: untouched anonymous pages are holes.
        let mut resident = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: host..host+len is this region's mapping; resident has one byte per page.
        let r = unsafe { libc::mincore(host.cast(), len, resident.as_mut_ptr()) };
        if r != 0 {
            resident.fill(1);
        }
        // SAFETY: the region is mapped for len bytes and nothing writes it
        // during the dump (vCPUs paused, devices locked by the caller).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut page = 0;
        while page < resident.len() {
            let start = page * PAGE;
            let end = (start + PAGE).min(len);
            if resident[page] & 1 != 0 && bytes[start..end].iter().any(|&b| b != 0) {
                f.write_all_at(&bytes[start..end], file_off + start as u64)?;
            }
            page += 1;
        }
        file_off += len as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Maps `path` as guest RAM with the given layout, private copy-on-write.
pub fn map_memory(path: &Path, regions: &[(GuestAddress, usize)]) -> Result<Mem, SnapshotError> {
    let file = File::open(path)?;
    let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
    if file.metadata()?.len() != total {
        return Err(SnapshotError::Invalid(format!(
            "memory.img holds {} bytes, the VM has {total}",
            file.metadata()?.len()
        )));
    }
    let file = std::sync::Arc::new(file);
    let mut off = 0u64;
    let mut mapped = Vec::new();
    for &(addr, size) in regions {
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), off)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .map_err(|e| SnapshotError::Invalid(format!("mapping memory.img: {e}")))?;
        mapped.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| SnapshotError::Invalid("memory region overflows".into()))?,
        );
        off += size as u64;
    }
    GuestMemoryMmap::from_regions(mapped)
        .map_err(|e| SnapshotError::Invalid(format!("guest memory: {e}")))
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn memory_round_trips_through_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let layout = [(GuestAddress(0), 16 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&layout).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 4096], GuestAddress(0x80_0000))
            .unwrap();
        let p = dir.path().join("memory.img");
        dump_memory(&mem, &p).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "sparse: {} blocks",
            meta.blocks()
        );
        let back = map_memory(&p, &layout).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(back.read_obj::<u8>(GuestAddress(0x80_0fff)).unwrap(), 7);
        // Private: writes to the restored memory never reach the file.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let again = map_memory(&p, &layout).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(
            map_memory(&p, &[(GuestAddress(0), 8 << 20)]).is_err(),
            "size mismatch refused"
        );
    }

    #[test]
    fn state_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let st = VmState {
            key: "k".into(),
            mem_size: 1,
            vcpus: Vec::new(),
            irqchips: vec![kvm_irqchip::default()],
            clock: kvm_clock_data::default(),
            devices: Vec::new(),
        };
        st.write(dir.path()).unwrap();
        assert_eq!(VmState::read(dir.path()).unwrap().key, "k");
        let p = dir.path().join("state.bin");
        let mut data = std::fs::read(&p).unwrap();
        let last = data.len() - 40;
        data[last] ^= 0xff;
        std::fs::write(&p, &data).unwrap();
        let e = VmState::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains("corrupted"), "{e}");
        std::fs::write(&p, &data[..30]).unwrap();
        assert!(VmState::read(dir.path())
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
        std::fs::write(&p, b"garbage garbage garbage").unwrap();
        assert!(VmState::read(dir.path())
            .err()
            .unwrap()
            .to_string()
            .contains("not a vmc snapshot"));
        let mut other = std::fs::read(dir.path().join("state.bin")).unwrap();
        other.truncate(0);
        other.extend_from_slice(MAGIC);
        other.extend_from_slice(&99u32.to_le_bytes());
        other.extend_from_slice(&[0; 40]);
        std::fs::write(&p, &other).unwrap();
        assert!(VmState::read(dir.path())
            .err()
            .unwrap()
            .to_string()
            .contains("format 99"));
    }
}
