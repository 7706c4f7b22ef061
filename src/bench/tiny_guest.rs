//! A purpose-built guest of a few dozen bytes: an ELF with a PVH entry that
//! writes a message to COM1, optionally reads the first virtio-mmio device's
//! magic value ("virt") through an MMIO exit, and resets the machine through
//! the i8042. It boots in milliseconds, so the VMM's own paths (ELF/PVH
//! loading, vCPU setup, port and MMIO exits, the reset) can be tested and
//! timed without a Linux boot.

/// Guest-physical load address (the kernel load area's start).
pub const LOAD_ADDR: u64 = 0x10_0000;

fn code(msg: &[u8], read_mmio: bool, reset: bool) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    let msg_fixup = c.len() + 1;
    c.extend_from_slice(&[0xbe, 0, 0, 0, 0]); // mov esi, msg
                                              // loop: mov al,[esi]; test al,al; jz done; out dx,al; inc esi; jmp loop
    c.extend_from_slice(&[0x8a, 0x06, 0x84, 0xc0, 0x74, 0x04, 0xee, 0x46, 0xeb, 0xf6]);
    if read_mmio {
        c.extend_from_slice(&[0xa1, 0x00, 0x00, 0x00, 0xd0]); // mov eax, [0xd0000000]
        c.push(0xee); // out dx, al
        for _ in 0..3 {
            c.extend_from_slice(&[0xc1, 0xe8, 0x08, 0xee]); // shr eax, 8; out dx, al
        }
        c.extend_from_slice(&[0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    }
    if reset {
        c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    }
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    let msg_addr = LOAD_ADDR as u32 + c.len() as u32;
    c[msg_fixup..msg_fixup + 4].copy_from_slice(&msg_addr.to_le_bytes());
    c.extend_from_slice(msg);
    c.push(0);
    c
}

/// The guest as an ELF64 image with a PVH (XEN_ELFNOTE_PHYS32_ENTRY) note:
/// prints `msg`, optionally reads the virtio-mmio magic, then resets.
pub fn elf(msg: &[u8], read_mmio: bool) -> Vec<u8> {
    wrap(&code(msg, read_mmio, true))
}

/// Like [`elf`] but halts forever instead of resetting (for stop tests).
pub fn elf_halting(msg: &[u8]) -> Vec<u8> {
    wrap(&code(msg, false, false))
}

fn wrap(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = 0x1000usize;

    let mut f = vec![0u8; code_off + code.len()];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD_ADDR); // e_entry
    put64(&mut f, 32, EHDR as u64); // e_phoff
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2); // e_phnum
                          // PT_LOAD
    let p = EHDR;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5); // R+X
    put64(&mut f, p + 8, code_off as u64);
    put64(&mut f, p + 16, LOAD_ADDR);
    put64(&mut f, p + 24, LOAD_ADDR);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE
    let p = EHDR + PHDR;
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, note_off as u64);
    put64(&mut f, p + 32, note.len() as u64);
    put64(&mut f, p + 40, note.len() as u64);
    put64(&mut f, p + 48, 4);
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f[code_off..].copy_from_slice(code);
    f
}
