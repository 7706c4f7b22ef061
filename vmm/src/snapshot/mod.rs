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
//! they write. `state.bin` also holds the memory image's [`MemorySeal`]: a
//! SHA-256 of its non-zero pages and the file's identity when it was saved
//! (inode, size, ctime). Reading 256 MiB on every warm start would cost more
//! than the restore, so a restore checks the identity (one fstat) and hashes
//! the file only when it changed: any write to the file, a copy or a
//! truncation moves its ctime, which no user can set back.

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
pub const FORMAT_VERSION: u32 = 2;

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

// The transport's state types belong to the transport they describe.
pub use crate::devices::virtio::mmio::{QueueSnap, TransportSnap};

/// What `memory.img` held when it was saved (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySeal {
    /// SHA-256 over each non-zero page: its file offset (u64, little
    /// endian), then its 4096 bytes, in file order.
    pub digest: [u8; 32],
    pub ino: u64,
    pub size: u64,
    pub ctime: (i64, i64),
}

impl MemorySeal {
    fn of(file: &File, digest: [u8; 32]) -> std::io::Result<MemorySeal> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(MemorySeal {
            digest,
            ino: m.ino(),
            size: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Checks `file` against the seal: the same file untouched since the
    /// save, or one whose non-zero pages hash to the saved digest.
    pub fn check(&self, file: &File) -> Result<(), SnapshotError> {
        let now = MemorySeal::of(file, self.digest)?;
        if now == *self {
            return Ok(());
        }
        if now.size != self.size {
            return Err(SnapshotError::Invalid(format!(
                "memory.img holds {} bytes, it was saved with {}",
                now.size, self.size
            )));
        }
        if digest_pages(file)? != self.digest {
            return Err(SnapshotError::Invalid(
                "memory.img is corrupted (checksum mismatch)".into(),
            ));
        }
        Ok(())
    }
}

const PAGE: usize = 4096;

/// Adds one page to a [`MemorySeal`] digest.
fn hash_page(h: &mut Sha256, offset: u64, page: &[u8]) {
    h.update(offset.to_le_bytes());
    h.update(page);
}

/// The [`MemorySeal`] digest of `file`, reading only its data extents
/// (SEEK_DATA/SEEK_HOLE): the holes of a sparse image are zero pages, which
/// the digest leaves out, as it does zero pages a copy may have filled in.
fn digest_pages(file: &File) -> std::io::Result<[u8; 32]> {
    use std::os::fd::AsRawFd;
    let size = file.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor we hold.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let start = (data as u64) / PAGE as u64 * PAGE as u64;
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len()).div_ceil(PAGE) * PAGE;
            let n = n.min((size - off) as usize);
            file.read_exact_at(&mut buf[..n], off)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    hash_page(&mut h, off + (i * PAGE) as u64, page);
                }
            }
            off += n as u64;
        }
        pos = end.max(off);
    }
    Ok(h.finalize().into())
}

/// The whole machine (memory lives in its own file).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// What the snapshot was made from; compared before use.
    pub key: String,
    pub mem_size: u64,
    /// What `memory.img` held when saved.
    pub memory: MemorySeal,
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
        self.write_into(&mut File::create(dir.join("state.bin"))?)
    }

    /// Writes the `state.bin` format into `f` (an empty file).
    pub fn write_into(&self, f: &mut File) -> Result<(), SnapshotError> {
        let payload =
            postcard::to_stdvec(self).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
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

/// The two files of a snapshot, open for writing (empty).
pub struct Files {
    pub state: File,
    pub memory: File,
}

impl Files {
    /// Creates `state.bin` and `memory.img` (mode 0600) in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Files> {
        Ok(Files {
            state: private_file(&dir.join("state.bin"))?,
            memory: private_file(&dir.join("memory.img"))?,
        })
    }
}

/// Creates `path` for writing with mode 0600 (truncating it).
fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes guest RAM to `path` as a sparse file: only resident pages that are
/// not all zero are written. Call with every vCPU paused and every device
/// locked, so nothing changes guest memory meanwhile. Returns the file's seal.
pub fn dump_memory(mem: &Mem, path: &Path) -> Result<MemorySeal, SnapshotError> {
    // Guest memory: the guest's secrets, readable by vmc's user alone.
    dump_memory_into(mem, &private_file(path)?)
}

/// [`dump_memory`] into `f`, an empty file open for writing.
pub fn dump_memory_into(mem: &Mem, f: &File) -> Result<MemorySeal, SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total)?;
    let mut h = Sha256::new();
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
                let at = file_off + start as u64;
                f.write_all_at(&bytes[start..end], at)?;
                hash_page(&mut h, at, &bytes[start..end]);
            }
            page += 1;
        }
        file_off += len as u64;
    }
    f.sync_all()?;
    Ok(MemorySeal::of(f, h.finalize().into())?)
}

/// Maps `path` as guest RAM with the given layout, private copy-on-write,
/// once it has passed `seal`'s check (None: unchecked, for inspection).
pub fn map_memory(
    path: &Path,
    regions: &[(GuestAddress, usize)],
    seal: Option<&MemorySeal>,
) -> Result<Mem, SnapshotError> {
    let file = File::open(path)?;
    let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
    if file.metadata()?.len() != total {
        return Err(SnapshotError::Invalid(format!(
            "memory.img holds {} bytes, the VM has {total}",
            file.metadata()?.len()
        )));
    }
    if let Some(seal) = seal {
        seal.check(&file)?;
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
        let seal = dump_memory(&mem, &p).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "sparse: {} blocks",
            meta.blocks()
        );
        let back = map_memory(&p, &layout, Some(&seal)).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(back.read_obj::<u8>(GuestAddress(0x80_0fff)).unwrap(), 7);
        // Private: writes to the restored memory never reach the file.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let again = map_memory(&p, &layout, Some(&seal)).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(
            map_memory(&p, &[(GuestAddress(0), 8 << 20)], None).is_err(),
            "size mismatch refused"
        );
    }

    /// The seal: an untouched file passes on its identity; a copy (a new
    /// inode and ctime) passes on its content, zero pages filled in or not;
    /// a changed byte, in a page that held data or in a hole, is refused;
    /// so is a truncated file.
    #[test]
    fn memory_images_are_checked_against_their_seal() {
        let dir = tempfile::tempdir().unwrap();
        let layout = [(GuestAddress(0), 4 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&layout).unwrap();
        mem.write_slice(b"kernel text", GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[9u8; 8192], GuestAddress(0x20_0000))
            .unwrap();
        let p = dir.path().join("memory.img");
        let seal = dump_memory(&mem, &p).unwrap();
        let open = |p: &Path| File::open(p).unwrap();
        seal.check(&open(&p)).unwrap();
        // A dense copy: every zero page written out.
        let copy = dir.path().join("copy.img");
        std::fs::write(&copy, std::fs::read(&p).unwrap()).unwrap();
        assert_ne!(MemorySeal::of(&open(&copy), seal.digest).unwrap(), seal);
        seal.check(&open(&copy)).unwrap();
        map_memory(&copy, &layout, Some(&seal)).unwrap();
        // One byte changed where data was, or where a hole was.
        for at in [0x10_0003u64, 0x30_0000] {
            let bad = dir.path().join(format!("bad-{at:x}.img"));
            std::fs::copy(&p, &bad).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&bad)
                .unwrap()
                .write_all_at(b"X", at)
                .unwrap();
            let e = map_memory(&bad, &layout, Some(&seal))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("memory.img is corrupted"), "{e}");
        }
        // Written in place: the same inode, a new ctime.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"Y", 0x20_0000).unwrap();
        drop(f);
        let e = seal.check(&open(&p)).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        // Truncated.
        let short = dir.path().join("short.img");
        std::fs::copy(&copy, &short).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&short)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let e = seal.check(&open(&short)).unwrap_err().to_string();
        assert!(e.contains("saved with"), "{e}");
    }

    #[test]
    fn state_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let st = VmState {
            key: "k".into(),
            mem_size: 1,
            memory: MemorySeal {
                digest: [0; 32],
                ino: 0,
                size: 0,
                ctime: (0, 0),
            },
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
