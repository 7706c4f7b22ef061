//! The Intel MultiProcessor table (MP spec 1.4): without ACPI it is how the
//! guest finds its CPUs and the IOAPIC.
//!
//! Written here because no rust-vmm crate provides it. Layout: the floating
//! pointer at the start of the EBDA (scanned by Linux in the last KiB below
//! 640 KiB), then the configuration table with one processor entry per vCPU,
//! an ISA bus, the IOAPIC, its 24 interrupt sources and the two local
//! interrupts (ExtINT, NMI).

use vm_memory::{Bytes, GuestAddress};

use super::super::memory::{EBDA_START, IRQ_MAX};
use crate::devices::virtio::Mem;

const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6, model 1, stepping 3: a generic value the kernel ignores beyond display.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 3;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;

/// The most vCPUs the table (and vmc) supports.
pub const MAX_CPUS: u8 = 64;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs: between 1 and {MAX_CPUS} are supported")]
    CpuCount(u8),
    #[error("the MP table does not fit in guest memory")]
    Memory,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table (header + entries) for `cpus` vCPUs.
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus + 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irq type, flags (conforming polarity/trigger), source bus, source irq,
        // destination IOAPIC, destination pin
        entries.extend_from_slice(&[ENTRY_INTSRC, IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = (44 + entries.len()) as u16;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&len.to_le_bytes());
    t.push(4); // spec revision 1.4
    t.push(0); // checksum, below
    t.extend_from_slice(b"VMC     "); // OEM id
    t.extend_from_slice(b"MICROVM     "); // product id
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = 4; // spec revision 1.4
    f[10] = checksum(&f);
    f
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn write(mem: &Mem, cpus: u8) -> Result<(), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let table_addr = EBDA_START as u32 + 16;
    mem.write_slice(&floating_pointer(table_addr), GuestAddress(EBDA_START))
        .map_err(|_| MptableError::Memory)?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr as u64))
        .map_err(|_| MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_count_every_cpu() {
        let mem = memory();
        for cpus in [1u8, 2, 64] {
            write(&mem, cpus).unwrap();
            let mut f = [0u8; 16];
            mem.read_slice(&mut f, GuestAddress(EBDA_START)).unwrap();
            assert_eq!(&f[..4], b"_MP_");
            assert_eq!(sum(&f), 0);
            let addr = u32::from_le_bytes(f[4..8].try_into().unwrap()) as u64;
            let mut hdr = [0u8; 44];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            assert_eq!(&hdr[..4], b"PCMP");
            let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
            let mut table = vec![0u8; len];
            mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
            assert_eq!(sum(&table), 0);
            let count = u16::from_le_bytes([hdr[34], hdr[35]]) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 24 + 2);
            assert_eq!(len, 44 + cpus as usize * 20 + 8 + 8 + 24 * 8 + 16);
            // The first processor is the BSP, the last one is enabled.
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            assert_eq!(table[44 + (cpus as usize - 1) * 20 + 1], cpus - 1);
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        let mem = memory();
        assert!(write(&mem, 0).is_err());
        assert!(write(&mem, MAX_CPUS + 1).is_err());
    }
}
