//! The file server behind a microVM's volumes (`vmc __fs-server`): FUSE
//! over a SEQPACKET socket whose other end is the VMM's virtio-fs device
//! (`vmc_vmm::devices::virtio::fs`), one request per message, served by
//! fuse-backend-rs's passthrough filesystem (the one Cloud Hypervisor's and
//! Kata's virtiofsd grew from) rather than a FUSE server of vmc's own.
//!
//! The server's root is a tmpfs holding the container's shares, each a
//! bind mount at `/0`, `/1`, ... (read-only ones are read-only mounts: the
//! host kernel refuses the writes, whatever the guest sends), and the
//! process is pivoted into it in mount, network, IPC and UTS namespaces of
//! its own: a `..` from the root stays at the root, so a guest that sends
//! any lookup it likes reaches nothing but the shares. It keeps only the
//! capabilities a file server needs to act for the guest's users (CHOWN,
//! DAC_OVERRIDE, FOWNER, FSETID, SETUID, SETGID: files are made with the
//! guest's uid and gid, as Docker's volumes show them), not MKNOD or
//! SYS_ADMIN, sets no_new_privs, and takes a seccomp filter of the calls
//! a file server makes ([`ALLOWED`]; any other fails with EPERM).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

use crate::vmm::devices::virtio::fs::MAX_MESSAGE;

/// One directory the guest sees, at `/N` of the share.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub source: PathBuf,
    pub readonly: bool,
}

fn sys(what: &str) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        return Err(sys(what)(io::Error::last_os_error()));
    }
    Ok(())
}

/// The capabilities the server keeps (numbers from linux/capability.h).
const KEEP_CAPS: [u32; 6] = [
    0, // CHOWN
    1, // DAC_OVERRIDE
    3, // FOWNER
    4, // FSETID
    6, // SETGID
    7, // SETUID
];

/// Builds the sandbox in `scratch` (an empty directory of the container's
/// state) and enters it. The process must be single-threaded.
fn sandbox(scratch: &Path, shares: &[Share]) -> io::Result<PassthroughFs> {
    vmc_spawn::sys::unshare_mounts(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)?;
    std::fs::create_dir_all(scratch).map_err(sys("the server's root"))?;
    let root = scratch.display().to_string();
    vmc_spawn::sys::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )
    .map_err(sys("mounting the server's root"))?;
    for (i, s) in shares.iter().enumerate() {
        let at = scratch.join(i.to_string());
        let dir = std::fs::metadata(&s.source)
            .map_err(sys(&format!("{}", s.source.display())))?
            .is_dir();
        if dir {
            std::fs::create_dir(&at)?;
        } else {
            std::fs::write(&at, b"")?;
        }
        let src = s.source.display().to_string();
        let dst = at.display().to_string();
        vmc_spawn::sys::mount(Some(&src), &dst, None, libc::MS_BIND, None)
            .map_err(sys(&format!("binding {src}")))?;
        let ro = if s.readonly { libc::MS_RDONLY } else { 0 };
        vmc_spawn::sys::mount(
            None,
            &dst,
            None,
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | ro
                | super::ns::locked_flags(&s.source),
            None,
        )
        .map_err(sys(&format!("remounting {src}")))?;
    }
    // /proc/self/fd is opened now, before the pivot leaves no /proc.
    let fs = PassthroughFs::new(Config {
        root_dir: "/".into(),
        do_import: true,
        xattr: false,
        inode_file_handles: false,
        cache_policy: CachePolicy::Auto,
        ..Default::default()
    })
    .map_err(sys("starting the passthrough filesystem"))?;
    let c = vmc_spawn::sys::cstr(scratch)?;
    crate::vmm::jail::pivot_into(&c).map_err(sys("entering the server's root"))?;
    fs.import().map_err(sys("opening the shares"))?;
    // The server holds a descriptor per inode the guest knows.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    drop_capabilities()?;
    install_filter()?;
    Ok(fs)
}

/// The system calls the server makes once it serves: a file server's on
/// descriptors it holds (`*at` calls relative to them, reads and writes,
/// owners, modes, times, links), its socket, switching to the guest's ids
/// per request, memory, threads' locks, signals, time. Anything else
/// (mount, ptrace, bpf, keyctl, namespaces, module loading, a new process,
/// execve, sockets of its own...) fails with EPERM: a request the
/// passthrough filesystem serves with a call not listed here is refused,
/// not the server killed.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_copy_file_range,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_llistxattr,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prlimit64,
];

/// Installs the [`ALLOWED`] filter on the process (its one thread).
fn install_filter() -> io::Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let rules = ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp on {}: {e}", std::env::consts::ARCH)))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| io::Error::other(format!("the server's seccomp filter: {e}")))?;
    seccompiler::apply_filter(&filter).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Keeps only [`KEEP_CAPS`] (bounding, permitted, effective; inheritable
/// empty) and sets no_new_privs.
fn drop_capabilities() -> io::Result<()> {
    let keep: u64 = KEEP_CAPS.iter().map(|c| 1u64 << c).sum();
    for cap in 0..64u32 {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL past the last
            // capability the kernel knows is expected.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let d = [
        Data {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        Data {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header and two data structs, as the ABI asks.
    unsafe {
        check(
            libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) as libc::c_int,
            "capset",
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "no_new_privs",
        )?;
    }
    Ok(())
}

/// Serves FUSE requests from `sock` until its peer (the VMM) closes it.
pub fn serve(sock: OwnedFd, scratch: &Path, shares: &[Share]) -> io::Result<()> {
    let fs = sandbox(scratch, shares)?;
    let server = Server::new(fs);
    let mut inbuf = vec![0u8; MAX_MESSAGE];
    let mut outbuf = vec![0u8; MAX_MESSAGE];
    let fd = sock.as_raw_fd();
    loop {
        // SAFETY: recv into a buffer of the length given.
        let n = unsafe { libc::recv(fd, inbuf.as_mut_ptr().cast(), inbuf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            return Ok(());
        }
        if n > inbuf.len() {
            log::warn!("fs-server: a request of {n} bytes; dropped");
            continue;
        }
        let reader = Reader::from_fuse_buffer(FuseBuf::new(&mut inbuf[..n]))
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        let writer = FuseDevWriter::<()>::new(fd, &mut outbuf)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        // A request the server cannot parse is answered by nothing; the
        // device matches replies by id, so nothing else is held up.
        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
            log::debug!("fs-server: {e:?}");
        }
    }
}

/// A running file server; killed (and reaped) when dropped.
pub struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SEQPACKET socket pair, both ends close-on-exec, with buffers that
/// hold a few of the largest messages (root may set them past the
/// system's default maximum; otherwise the default stands).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let pair = crate::vmm::jail::seqpacket_pair()?;
    let size: libc::c_int = (4 * MAX_MESSAGE) as libc::c_int;
    for fd in [pair.0.as_raw_fd(), pair.1.as_raw_fd()] {
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            // SAFETY: setsockopt with an int of its size.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            // Without CAP_NET_ADMIN the system's maximum (net.core.wmem_max)
            // stands, and a 1 MiB read or write could not cross: refused
            // now rather than failing the guest's large reads later.
            if r < 0 {
                return Err(io::Error::other(
                    "volumes in a microVM need vmc to run as root (the file server's socket carries 1 MiB messages, past this system's socket buffer limit without CAP_NET_ADMIN)",
                ));
            }
        }
    }
    Ok(pair)
}

/// The command that starts a file server for `shares` (its root built in
/// `scratch`) on socket `sock`, which the child gets as descriptor 3 and
/// nothing else of this process's (every other descriptor above 2 is
/// closed before the exec). It dies with the process that starts it.
pub fn command(
    sock: &OwnedFd,
    scratch: &Path,
    shares: &[Share],
) -> io::Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    let fd = sock.as_raw_fd();
    let mut cmd = std::process::Command::new(super::jail::vmc_binary());
    cmd.arg0("vmc")
        .arg("__fs-server")
        .arg("--fd")
        .arg("3")
        .arg("--scratch")
        .arg(scratch)
        .arg("--shares")
        .arg(serde_json::to_string(shares).map_err(io::Error::other)?);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) < 0
                || libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Starts a file server for `shares` (its root built in `scratch`, an
/// empty directory); returns it and the VMM's end of its socket.
pub fn start(shares: &[Share], scratch: &Path) -> io::Result<(Running, OwnedFd)> {
    let (vmm_end, server_end) = socket_pair()?;
    std::fs::create_dir_all(scratch)?;
    let child = command(&server_end, scratch, shares)?
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(sys("starting the volume file server"))?;
    drop(server_end);
    Ok((Running(child), vmm_end))
}
