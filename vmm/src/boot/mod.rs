//! Loading the guest kernel and writing what it reads at boot: the command
//! line, the initramfs, the memory map (PVH start info or Linux zero page)
//! and the MP table. Kernel images are parsed by linux-loader.

pub mod cpu;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::memory::{
    e820_map, low_ram_end, CMDLINE, CMDLINE_MAX, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    PVH_INFO, PVH_MEMMAP, PVH_MODLIST, ZERO_PAGE,
};
use crate::devices::virtio::Mem;
pub use cpu::EntryMode;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// Errors loading or configuring the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a Linux kernel for x86_64 (neither an ELF vmlinux nor a bzImage): {detail}"
    )]
    NotAKernel { path: String, detail: String },
    #[error("the kernel command line is too long or invalid: {0}")]
    Cmdline(String),
    #[error("the initramfs ({0} bytes) does not fit in guest memory")]
    Initrd(usize),
    #[error("writing boot parameters: {0}")]
    Params(String),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// Where and how the kernel is entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    pub end: u64,
    setup_header: Option<setup_header>,
}

/// Loads `path` (vmlinux ELF, preferring its PVH entry, or a bzImage).
pub fn load_kernel(mem: &Mem, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: name.clone(),
        source,
    })?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let (entry, mode) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (a.0, EntryMode::Pvh),
                _ => (r.kernel_load.0, EntryMode::Linux64),
            };
            return Ok(LoadedKernel {
                entry,
                mode,
                end: r.kernel_end,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            // The 64-bit entry point is 0x200 into the protected-mode kernel.
            entry: r.kernel_load.0 + 0x200,
            mode: EntryMode::Linux64,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: name,
            detail: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
        }),
    }
}

/// Builds the command line from space-separated parts.
pub fn cmdline(parts: &[String]) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        c.insert_str(p)
            .map_err(|e| BootError::Cmdline(format!("{p}: {e}")))?;
    }
    Ok(c)
}

/// Places the initramfs at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &Mem,
    mem_size: u64,
    kernel_end: u64,
    data: &[u8],
) -> Result<(u64, u64), BootError> {
    let len = data.len() as u64;
    let top = low_ram_end(mem_size);
    let addr = top
        .checked_sub(len)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::Initrd(data.len()))?;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| BootError::Initrd(data.len()))?;
    Ok((addr, len))
}

/// Writes the command line, the memory map and the MP table.
pub fn configure(
    mem: &Mem,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
    cpus: u8,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    mptable::write(mem, cpus)?;
    let map = e820_map(mem_size);
    match kernel.mode {
        EntryMode::Pvh => write_pvh(mem, &map, initrd),
        EntryMode::Linux64 => write_zero_page(mem, kernel, &map, initrd, cmdline_len),
    }
}

fn write_pvh(mem: &Mem, map: &[(u64, u64)], initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let mut memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    memmap.push(hvm_memmap_table_entry {
        addr: MMIO_GAP_START,
        size: MMIO_GAP_END - MMIO_GAP_START,
        type_: E820_RESERVED,
        reserved: 0,
    });
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| BootError::Params(e.to_string()))
}

fn write_zero_page(
    mem: &Mem,
    kernel: &LoadedKernel,
    map: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if kernel.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size)) in map.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = E820_RAM;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), mem)
        .map_err(|e| BootError::Params(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::memory;

    #[test]
    fn files_that_are_not_kernels_are_named_as_such() {
        let mem = memory();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk");
        std::fs::write(&p, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        assert!(e.to_string().contains("is not a Linux kernel"));
        let e = load_kernel(&mem, &dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, BootError::Open { .. }));
    }

    /// A bzImage (the smallest one linux-loader takes: a boot sector with
    /// the setup header, one setup sector, then the protected-mode kernel)
    /// is loaded at 1 MiB and entered through the 64-bit boot protocol,
    /// 0x200 into it, with its setup header kept for the boot parameters.
    #[test]
    fn a_bzimage_is_entered_through_the_64_bit_boot_protocol() {
        let mem = memory();
        let mut image = vec![0u8; 1024];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 0x01; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        let kernel: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        image.extend_from_slice(&kernel);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bzImage");
        std::fs::write(&p, &image).unwrap();
        let k = load_kernel(&mem, &p).unwrap();
        assert_eq!(k.mode, EntryMode::Linux64);
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert!(k.end >= HIMEM_START + kernel.len() as u64);
        let mut loaded = vec![0u8; kernel.len()];
        mem.read_slice(&mut loaded, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(loaded, kernel, "the protected-mode kernel at 1 MiB");
        let header = k.setup_header.expect("its setup header");
        assert_eq!({ header.header }, u32::from_le_bytes(*b"HdrS"));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_above_the_kernel() {
        let mem = memory(); // 16 MiB
        let data = vec![7u8; 5000];
        let (addr, len) = load_initrd(&mem, 16 << 20, 0x20_0000, &data).unwrap();
        assert_eq!(len, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + len <= 16 << 20);
        assert!(load_initrd(&mem, 16 << 20, (16 << 20) - 100, &data).is_err());
    }

    #[test]
    fn command_line_parts_are_joined_and_bounded() {
        let c = cmdline(&["a=1".into(), String::new(), "b".into()]).unwrap();
        assert_eq!(c.as_cstring().unwrap().to_str().unwrap(), "a=1 b");
        assert!(cmdline(&["x".repeat(CMDLINE_MAX + 1)]).is_err());
    }
}
