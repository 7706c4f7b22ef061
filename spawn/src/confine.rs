//! The child's side of an [`Isolation`](super::Isolation): the root
//! preparation steps carried out inside the root (openat2 with
//! RESOLVE_IN_ROOT, mounts through `/proc/self/fd`), hostname, loopback,
//! and dropping capabilities.

use std::ffi::CString;
use std::os::fd::RawFd;

use super::isolation::{PreparedIsolation, PreparedOp, MAX_CAP};

/// openat2 with RESOLVE_IN_ROOT: `path` (relative) inside the directory
/// `root`, its symlinks and `..` confined to it. -1 on failure.
///
/// # Safety
/// Child after fork only (a system call on prepared data).
unsafe fn open_in_root_raw(root: RawFd, path: &CString, flags: libc::c_int) -> libc::c_int {
    // SAFETY: open_how is plain data (all-zero valid); path is NUL-terminated.
    unsafe {
        let mut how: libc::open_how = std::mem::zeroed();
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT;
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as libc::c_int
    }
}

/// Runs `f` on the directory of `op`'s path, opened inside the root.
///
/// # Safety
/// Child after fork only.
unsafe fn at_dir(
    root: RawFd,
    op: &PreparedOp,
    f: impl FnOnce(RawFd) -> libc::c_int,
) -> libc::c_int {
    // SAFETY: system calls on a descriptor opened here.
    unsafe {
        let dir = open_in_root_raw(root, &op.dir, libc::O_PATH | libc::O_DIRECTORY);
        if dir < 0 {
            return -1;
        }
        let r = f(dir);
        let errno = *libc::__errno_location();
        libc::close(dir);
        *libc::__errno_location() = errno;
        r
    }
}

/// `/proc/self/fd/N` for descriptor `fd`, NUL-terminated in `buf`: the path
/// through which mount(2) reaches exactly the file opened.
fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut n = fd as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

/// A mount step: its target (and an in-root source) opened inside the root
/// first, then mounted through `/proc/self/fd`, so that the kernel never
/// walks an image's path itself. Each step opens its target afresh, so a
/// remount reaches the mount a previous step stacked there.
///
/// # Safety
/// Child after fork only.
unsafe fn mount_in_root(root: RawFd, op: &PreparedOp) -> libc::c_int {
    // SAFETY: system calls on descriptors opened here and prepared strings.
    unsafe {
        let target = open_in_root_raw(root, &op.a, libc::O_PATH);
        if target < 0 {
            return -1;
        }
        let mut source = -1;
        if op.source_in_root {
            source = open_in_root_raw(root, &op.b, libc::O_PATH);
            if source < 0 {
                libc::close(target);
                return -1;
            }
        }
        let (mut tbuf, mut sbuf) = ([0u8; 32], [0u8; 32]);
        let opt = |c: &CString| {
            if c.is_empty() {
                std::ptr::null()
            } else {
                c.as_ptr()
            }
        };
        let src = if source >= 0 {
            fd_path(source, &mut sbuf)
        } else {
            opt(&op.b)
        };
        let r = libc::mount(
            src,
            fd_path(target, &mut tbuf),
            opt(&op.c),
            op.flags,
            opt(&op.d).cast(),
        );
        let errno = *libc::__errno_location();
        libc::close(target);
        if source >= 0 {
            libc::close(source);
        }
        *libc::__errno_location() = errno;
        r
    }
}

/// The root preparation step that failed (its index), for the report to
/// the parent; `u32::MAX` when none did. Written only by the child after
/// fork (its own copy of this memory).
pub(super) static FAILED_OP: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(u32::MAX);

/// In the child, in its own mount namespace: runs the root preparation,
/// sets the hostname and brings loopback up. Returns -1 on failure (errno set).
///
/// # Safety
/// Child after fork only: system calls on prepared data.
pub(super) unsafe fn isolate_root(iso: &PreparedIsolation, root: RawFd) -> libc::c_int {
    // SAFETY: system calls on NUL-terminated strings prepared before the fork.
    unsafe {
        // A container on the host dies with the vmc process that supervises
        // it, even when that process is killed with SIGKILL.
        if !iso.outlives_parent
            && libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
        {
            return -1;
        }
        for (i, op) in iso.ops.iter().enumerate() {
            let r = match op.kind {
                0 => at_dir(root, op, |dir| {
                    let r = libc::mkdirat(dir, op.name.as_ptr(), op.mode as libc::mode_t);
                    if r < 0 && *libc::__errno_location() == libc::EEXIST {
                        0
                    } else {
                        r
                    }
                }),
                1 => mount_in_root(root, op),
                2 => at_dir(root, op, |dir| {
                    libc::symlinkat(op.c.as_ptr(), dir, op.name.as_ptr())
                }),
                4 => {
                    let fd = libc::open(op.a.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        -1
                    } else {
                        let data = op.b.as_bytes();
                        let n = libc::write(fd, data.as_ptr().cast(), data.len());
                        libc::close(fd);
                        if n == data.len() as isize {
                            0
                        } else {
                            -1
                        }
                    }
                }
                _ => at_dir(root, op, |dir| {
                    let fd = libc::openat(
                        dir,
                        op.name.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                        op.mode as libc::c_uint,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd.min(0)
                }),
            };
            if r < 0 && !op.optional {
                FAILED_OP.store(i as u32, std::sync::atomic::Ordering::Relaxed);
                return -1;
            }
        }
        if iso.cgroupns && libc::unshare(libc::CLONE_NEWCGROUP) < 0 {
            return -1;
        }
        if let Some(h) = &iso.hostname {
            if libc::sethostname(h.as_ptr(), h.as_bytes().len()) < 0 {
                return -1;
            }
        }
        if iso.loopback_up {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return -1;
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                req.ifr_name[i] = *b as libc::c_char;
            }
            let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) >= 0 && {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) >= 0
            };
            libc::close(fd);
            if !ok {
                return -1;
            }
        }
        0
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// In the child, after pivoting, before switching user: drops every
/// capability outside `keep_caps` (bounding set first, then the process's
/// sets). Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
pub(super) unsafe fn confine(iso: &PreparedIsolation) -> libc::c_int {
    let Some(keep) = iso.keep_caps else { return 0 };
    // SAFETY: prctl and capset on plain data.
    unsafe {
        for cap in 0..=MAX_CAP {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return -1;
            }
        }
        let header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        // CAP_SETGID and CAP_SETUID stay until the exec, whatever the set
        // kept: switching the user needs them. The exec takes them away:
        // a root process gets the bounding set (without them unless kept),
        // and the switch to another user empties a process's sets.
        let setid = (1u64 << 6) | (1u64 << 7);
        let lo = (keep | setid) as u32;
        let hi = (keep >> 32) as u32;
        // The inheritable set is empty, as Docker's since 20.10.14
        // (CVE-2022-24769): a file with inheritable file capabilities gets
        // nothing from it across execve.
        let data = [
            CapData {
                effective: lo,
                permitted: lo,
                inheritable: 0,
            },
            CapData {
                effective: hi,
                permitted: hi,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0 {
            return -1;
        }
        0
    }
}
