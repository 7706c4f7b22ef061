//! Guest physical memory: the layout vmc uses and the anonymous mapping behind it.
//!
//! RAM starts at 0. Above 3 GiB a 1 GiB hole is left for device MMIO, so larger
//! guests get a second region from 4 GiB. Mappings are `MAP_NORESERVE`
//! (vm-memory's default): the host pays only for pages the guest touches.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// GDT used for boot.
pub const BOOT_GDT: u64 = 0x500;
/// Empty IDT used for boot.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP: u64 = 0x6040;
/// PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6f00;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack for the 64-bit Linux boot protocol.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4: u64 = 0x9000;
pub const PDPTE: u64 = 0xa000;
pub const PDE: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Room for the command line, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Extended BIOS data area: the MP table lives here; not RAM for the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the kernel's load area.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IOAPIC pin given to virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IOAPIC pin (KVM's IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;
/// Serial port COM1 and its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

// Device windows must sit in the hole, never over RAM.
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && VIRTIO_MMIO_BASE < MMIO_GAP_END);

/// The RAM regions for a guest of `size` bytes.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps anonymous guest RAM.
pub fn create(size: u64) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
}

/// End of the RAM below the MMIO hole (where the initramfs goes, at the top).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The e820 map: (address, length, is_ram).
pub fn e820_map(size: u64) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    let low_end = low_ram_end(size);
    map.push((HIMEM_START, low_end - HIMEM_START));
    if size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, size - MMIO_GAP_START));
    }
    map
}

/// Sums a field (e.g. `Rss`, `Private_Dirty`) in KiB over this process's
/// mappings that start at the given host addresses (guest RAM), from
/// /proc/self/smaps.
pub fn smaps_kib(starts: &[u64], field: &str) -> u64 {
    smaps_kib_of("/proc/self/smaps", starts, field)
}

/// [`smaps_kib`] over the smaps file at `path` (another process's).
pub fn smaps_kib_of(path: &str, starts: &[u64], field: &str) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(path) else {
        return 0;
    };
    let prefix = format!("{field}:");
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(a) = u64::from_str_radix(start, 16) {
                    in_guest = starts.contains(&a);
                    continue;
                }
            }
        }
        if in_guest {
            if let Some(v) = line.strip_prefix(prefix.as_str()) {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Resident KiB of the guest RAM mappings starting at `starts`.
pub fn resident_kib(starts: &[u64]) -> u64 {
    smaps_kib(starts, "Rss")
}

/// Peak resident set size of this process, KiB (VmHWM).
pub fn peak_rss_kib() -> u64 {
    peak_rss_kib_of("/proc/self/status")
}

/// [`peak_rss_kib`] from the status file at `path` (another process's).
pub fn peak_rss_kib_of(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_guest_memory_shows_as_resident() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let mem = create(64 << 20).unwrap();
        let start = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap() as u64;
        let before = resident_kib(&[start]);
        for i in 0..256u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096)).unwrap();
        }
        let after = resident_kib(&[start]);
        assert!(after >= before + 1000, "{before} -> {after}");
        assert!(
            after <= 64 << 10,
            "MAP_NORESERVE: untouched pages cost nothing"
        );
        assert!(peak_rss_kib() >= after);
    }

    #[test]
    fn small_guests_have_one_region() {
        let r = ram_regions(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            e820_map(256 << 20),
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let size = 4u64 << 30;
        let r = ram_regions(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, size);
        let e = e820_map(size);
        assert_eq!(e[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(e[2], (MMIO_GAP_END, 1 << 30));
    }
}
