//! Initial vCPU state for the two entry protocols vmc uses:
//!
//! * PVH (vmlinux with a Xen ELF note): 32-bit protected mode, paging off,
//!   flat segments, `rbx` = `hvm_start_info`.
//! * Linux 64-bit boot protocol (bzImage, or vmlinux without PVH): long mode
//!   with an identity map of the first GiB, `rsi` = zero page.
//!
//! Plus what every vCPU needs: CPUID (with its APIC id and topology), the boot
//! MSRs, the x87/SSE control words and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::super::memory::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PDE, PDPTE, PML4, PVH_INFO, ZERO_PAGE};
use crate::devices::virtio::Mem;

/// Which entry protocol the kernel is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    Pvh,
    Linux64,
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing boot tables to guest memory")]
    Memory,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Packs a GDT descriptor from access/flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The KVM segment register a GDT descriptor loads at `index`.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 1 - present,
        padding: 0,
    }
}

/// The boot GDT for `mode`: null, code, data, TSS.
fn gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        EntryMode::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// Special registers (and the boot GDT/page tables they point at).
pub fn setup_sregs(mem: &Mem, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), CpuError> {
    let table = gdt(mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + i as u64 * 8))
            .map_err(|_| CpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(|_| CpuError::Memory)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let tss = segment(table[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))
}

/// Identity-maps the first GiB with 2 MiB pages.
fn write_identity_map(mem: &Mem) -> Result<(), CpuError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|_| CpuError::Memory)
    };
    w(PDPTE | 0x03, PML4)?;
    w(PDE | 0x03, PDPTE)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PDE + i * 8)?;
    }
    Ok(())
}

/// General registers for the boot vCPU.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), CpuError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))
}

/// The MSRs a booting kernel expects cleared or set.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries: Vec<kvm_msr_entry> = [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, 1),          // fast strings
        (MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Kvm {
        what: "build msr list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("set msrs"))?;
    if n != entries.len() {
        // Some backends refuse a boot MSR; the kernel sets them itself anyway.
        log::debug!(
            "KVM accepted {n} of {} boot MSRs (first refused: {:#x})",
            entries.len(),
            entries[n].index
        );
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const LVT0: usize = 0x350;
    const LVT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    for (off, mode) in [(LVT0, EXTINT), (LVT1, NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`.
pub fn vcpu_cpuid(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let bits_for_count = (count as u32).next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU
                }
            }
            0x4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count as u32 - 1) << 26);
            }
            0x7 if e.index == 0 => {
                e.edx &= !(1 << 29); // no IA32_ARCH_CAPABILITIES
            }
            0xb | 0x1f => {
                e.edx = id as u32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = bits_for_count;
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_001e => {
                e.eax = id as u32;
                e.ebx = (e.ebx & !0xff) | id as u32;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_kvm_expects() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.selector, code64.l, code64.db, code64.type_),
            (8, 1, 0, 0xb)
        );
        assert_eq!(
            (code64.limit, code64.present, code64.s, code64.g),
            (0xffff_ffff, 1, 1, 1)
        );
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.s, tss.g, tss.selector), (0x67, 0, 0, 24));
        let null = segment(0, 0);
        assert_eq!(null.unusable, 1);
        let based = segment(gdt_entry(0x0093, 0x1234_5678, 0xfff), 2);
        assert_eq!(based.base, 0x1234_5678);
    }

    #[test]
    fn cpuid_carries_apic_id_topology_and_hides_arch_capabilities() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = vcpu_cpuid(&base, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!(s[1].edx & (1 << 29), 0);
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (2, 4, 3));
    }
}
