//! Which device nodes a namespace container may use: Docker's default
//! allow-list, enforced by the devices cgroup (v1: `devices.deny` and
//! `devices.allow`; v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to
//! the container's cgroup). A container may create any node (`mknod`, for
//! images that ship some), but read or write only these. The container's
//! root and writable mounts are also `nodev` (see `ns.rs`), so a node made
//! anywhere there cannot be opened even without the cgroup.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Device type of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Char,
    Block,
}

/// Access bits, as the v1 files (`r`, `w`, `m`) and the BPF context
/// (BPF_DEVCG_ACC_*) number them.
pub const MKNOD: u32 = 1;
pub const READ: u32 = 2;
pub const WRITE: u32 = 4;

/// One allow rule: `None` for a wildcard major or minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

const fn rule(kind: Kind, major: Option<u32>, minor: Option<u32>, access: u32) -> Rule {
    Rule {
        kind,
        major,
        minor,
        access,
    }
}

const RWM: u32 = READ | WRITE | MKNOD;

/// Docker's defaults: mknod of anything; read and write of the nodes a
/// container's /dev holds (null, zero, full, random, urandom, tty, console,
/// ptmx, and the pseudo-terminals).
pub const ALLOWED: &[Rule] = &[
    rule(Kind::Char, None, None, MKNOD),
    rule(Kind::Block, None, None, MKNOD),
    rule(Kind::Char, Some(1), Some(3), RWM),
    rule(Kind::Char, Some(1), Some(5), RWM),
    rule(Kind::Char, Some(1), Some(7), RWM),
    rule(Kind::Char, Some(1), Some(8), RWM),
    rule(Kind::Char, Some(1), Some(9), RWM),
    rule(Kind::Char, Some(5), Some(0), RWM),
    rule(Kind::Char, Some(5), Some(1), RWM),
    rule(Kind::Char, Some(5), Some(2), RWM),
    rule(Kind::Char, Some(136), None, RWM),
];

/// A rule as a line of v1's `devices.allow` (`c 1:3 rwm`, `c 136:* rwm`).
pub fn v1_line(r: &Rule) -> String {
    let n = |v: Option<u32>| v.map_or("*".to_string(), |v| v.to_string());
    let mut access = String::new();
    for (bit, c) in [(READ, 'r'), (WRITE, 'w'), (MKNOD, 'm')] {
        if r.access & bit != 0 {
            access.push(c);
        }
    }
    let kind = match r.kind {
        Kind::Char => 'c',
        Kind::Block => 'b',
    };
    format!("{kind} {}:{} {access}", n(r.major), n(r.minor))
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8, // dst in the low nibble, src in the high one
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// The few eBPF opcodes the program needs (class | op | source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The v2 program for `rules`: it reads `struct bpf_cgroup_dev_ctx`
/// (`access_type` = access << 16 | type, `major`, `minor`) and returns 1
/// (allow) for the first rule that matches, 0 (deny) when none does.
///
/// Written out here, not taken from a crate: the rust-vmm and BPF crates
/// offer seccomp filters and full loaders, and this is a dozen instructions.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    // r1: the context. r2: access, r3: type, r4: major, r5: minor.
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV_X, 3, 2, 0, 0),
        insn(AND_K, 3, 0, 0, 0xffff),
        insn(RSH_K, 2, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules {
        let kind = match r.kind {
            Kind::Block => 1, // BPF_DEVCG_DEV_BLOCK
            Kind::Char => 2,  // BPF_DEVCG_DEV_CHAR
        };
        // Each test jumps past the rest of this rule's block when it fails.
        let mut tests: Vec<(u8, u8, i32)> = vec![(JNE_K, 3, kind)];
        let mut block: Vec<Insn> = Vec::new();
        // Access asked for outside the rule's: r6 = r2 & !allowed, must be 0.
        let denied_bits = (!r.access & RWM) as i32;
        if let Some(m) = r.major {
            tests.push((JNE_K, 4, m as i32));
        }
        if let Some(m) = r.minor {
            tests.push((JNE_K, 5, m as i32));
        }
        // Layout: type test, r6 = r2, r6 &= denied, r6 test, major/minor
        // tests, r0 = 1, exit.
        let len = tests.len() + 3 + 2;
        let mut at = 0usize;
        let jump =
            |code: u8, reg: u8, imm: i32, at: usize| insn(code, reg, 0, (len - at - 1) as i16, imm);
        block.push(jump(tests[0].0, tests[0].1, tests[0].2, at));
        at += 1;
        block.push(insn(MOV_X, 6, 2, 0, 0));
        block.push(insn(AND_K, 6, 0, 0, denied_bits));
        at += 2;
        block.push(jump(JNE_K, 6, 0, at));
        at += 1;
        for &(code, reg, imm) in &tests[1..] {
            block.push(jump(code, reg, imm, at));
            at += 1;
        }
        block.push(insn(MOV_K, 0, 0, 0, 1));
        block.push(insn(EXIT, 0, 0, 0, 0));
        debug_assert_eq!(block.len(), len);
        p.extend(block);
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Evaluates `program` on a device access as the kernel would: for the
/// unit tests, which check the program's decisions without loading it.
#[cfg(test)]
fn run(program: &[Insn], kind: Kind, major: u32, minor: u32, access: u32) -> u64 {
    let ty = match kind {
        Kind::Block => 1,
        Kind::Char => 2,
    };
    let ctx = [(access << 16) | ty, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    loop {
        let i = program[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        pc += 1;
        match i.code {
            LDX_W => {
                assert_eq!(src, 1, "loads only from the context");
                r[dst] = u64::from(ctx[i.off as usize / 4]);
            }
            AND_K => r[dst] &= i.imm as u64,
            RSH_K => r[dst] >>= i.imm,
            MOV_X => r[dst] = r[src],
            MOV_K => r[dst] = i.imm as u64,
            JNE_K => {
                if r[dst] != i.imm as u64 {
                    pc += i.off as usize;
                }
            }
            EXIT => return r[0],
            c => panic!("unknown opcode {c:#x}"),
        }
    }
}

// bpf(2) commands, program and attach types (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the rest of
/// the union (zero) is passed too, as the kernel requires unknown bytes to
/// be zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    rest: [u64; 12],
}

/// Loads the program for `rules` and attaches it to the cgroup v2
/// directory `cgroup`. The attachment holds the program: it lasts as long
/// as the cgroup, whatever becomes of this process.
pub fn attach_v2(cgroup: &Path, rules: &[Rule]) -> io::Result<()> {
    let prog = program(rules);
    let license = c"Apache-2.0";
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoad::default()
    };
    // SAFETY: load points at the instructions and license, which outlive
    // the call.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &load)? };
    // SAFETY: a fresh descriptor that we now own.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir = std::fs::File::open(cgroup)?;
    let attach = ProgAttach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..ProgAttach::default()
    };
    // SAFETY: attach holds descriptors only.
    unsafe { bpf(BPF_PROG_ATTACH, &attach)? };
    Ok(())
}

/// bpf(2) with `attr` (a `union bpf_attr` prefix, zero beyond its fields)
/// and its size; the call's non-negative result.
///
/// # Safety
/// Every pointer in `attr` must be valid for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live value of the size passed; the caller vouches
    // for the pointers inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_are_dockers_rules() {
        let lines: Vec<String> = ALLOWED.iter().map(v1_line).collect();
        assert_eq!(lines[0], "c *:* m");
        assert_eq!(lines[1], "b *:* m");
        assert!(lines.contains(&"c 1:3 rwm".to_string()));
        assert!(lines.contains(&"c 136:* rwm".to_string()));
        assert_eq!(lines.len(), 11);
    }

    #[test]
    fn the_program_allows_the_list_and_denies_the_rest() {
        let p = program(ALLOWED);
        let allow = |k, ma, mi, acc| run(&p, k, ma, mi, acc) == 1;
        // The container's own nodes: read, write, mknod.
        for (ma, mi) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 1),
            (5, 2),
        ] {
            assert!(allow(Kind::Char, ma, mi, READ | WRITE), "{ma}:{mi}");
            assert!(allow(Kind::Char, ma, mi, MKNOD), "{ma}:{mi}");
        }
        assert!(allow(Kind::Char, 136, 7, READ | WRITE));
        // Any node may be made, none other opened.
        assert!(allow(Kind::Char, 10, 232, MKNOD));
        assert!(allow(Kind::Block, 8, 0, MKNOD));
        for (k, ma, mi, what) in [
            (Kind::Char, 10, 232, "/dev/kvm"),
            (Kind::Char, 4, 0, "/dev/tty0"),
            (Kind::Char, 7, 0, "/dev/vcs"),
            (Kind::Char, 10, 237, "/dev/loop-control"),
            (Kind::Block, 8, 0, "/dev/sda"),
            (Kind::Block, 1, 3, "a block device with null's numbers"),
            (Kind::Char, 1, 1, "/dev/mem"),
            (Kind::Char, 1, 2, "/dev/kmem"),
        ] {
            for acc in [READ, WRITE, READ | WRITE, READ | MKNOD] {
                assert!(!allow(k, ma, mi, acc), "{what} {acc}");
            }
        }
    }

    /// The program, loaded and attached for real to a cgroup of the v2
    /// hierarchy (on a hybrid host, the unified mount): a child in that
    /// cgroup opens /dev/null but not /dev/kvm or /dev/mem.
    #[test]
    fn the_program_denies_for_real_in_a_v2_cgroup() {
        let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists());
        // SAFETY: geteuid has no preconditions.
        let Some(root) = unified.filter(|_| unsafe { libc::geteuid() } == 0) else {
            crate::testing::skip("needs root and a cgroup v2 hierarchy");
            return;
        };
        let dir = root.join(format!("vmc-devtest-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        attach_v2(&dir, ALLOWED).expect("load and attach");
        let procs = vmc_spawn::sys::cstr(dir.join("cgroup.procs")).unwrap();
        // A child joins the cgroup and tries the three; its exit code is a
        // bit mask of what opened.
        // SAFETY: the child only makes system calls, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: system calls on NUL-terminated literals.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(100);
                }
                let mut opened = 0;
                for (bit, path) in [(1, c"/dev/null"), (2, c"/dev/kvm"), (4, c"/dev/mem")] {
                    if libc::open(path.as_ptr(), libc::O_RDONLY) >= 0 {
                        opened |= bit;
                    }
                }
                libc::_exit(opened)
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = std::fs::remove_dir(&dir);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            1,
            "only /dev/null opened (1 = null, 2 = kvm, 4 = mem; 100 = could not join)"
        );
    }
}
