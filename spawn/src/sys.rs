//! Thin checked wrappers over the libc calls the agent needs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Converts a path to a C string; paths with NUL bytes are invalid input.
pub fn cstr(p: impl AsRef<Path>) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_ref().as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Turns a `-1` return into the current errno.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// mount(2) with optional source, fstype and data.
pub fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data) as *const libc::c_void,
        )
    };
    check(ret)
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("mount {target}: {e}")))
}

/// Leaves the current mount namespace for a new one (`unshare(CLONE_NEWNS
/// | flags)`) whose mounts are all private: what is mounted in it is seen
/// nowhere else and goes with it. With `CLONE_FS` in `flags`, for the
/// calling thread only.
pub fn unshare_mounts(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | flags) })
        .map_err(|e| io::Error::new(e.kind(), format!("unshare: {e}")))?;
    // SAFETY: a null source, fstype and data with a NUL-terminated target.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map(|_| ())
    .map_err(|e| io::Error::new(e.kind(), format!("making / private: {e}")))
}

/// Opens directory `path` as an O_PATH descriptor (a root to resolve
/// paths in, or a mount point).
pub fn open_dir_path(path: impl AsRef<Path>) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: open on a NUL-terminated path; the result is checked.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a pipe with both ends close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets or clears O_NONBLOCK.
pub fn set_nonblocking(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; no pointers involved.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) })?;
    Ok(())
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes all of `buf`, retrying on EINTR and short writes (blocking fd).
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded; both descriptors are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one descriptor in a control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct FdCmsg([u8; 64]);

/// Sends descriptor `fd` over the Unix socket `sock` (SCM_RIGHTS) with one
/// byte of data. Async-signal-safe (no allocation): usable in a forked child.
/// Returns -1 on failure.
///
/// # Safety
/// `sock` and `fd` must be open descriptors.
pub unsafe fn send_fd_raw(sock: RawFd, fd: RawFd) -> libc::c_int {
    let mut byte = [0u8; 1];
    let mut cbuf = FdCmsg([0; 64]);
    // SAFETY: msghdr and iovec point at the stack buffers above, which
    // outlive the call; CMSG_SPACE(4) is well below the 64 bytes of cbuf.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) == 1 {
            0
        } else {
            -1
        }
    }
}

/// Receives one descriptor sent with [`send_fd_raw`]; it arrives close-on-exec.
pub fn recv_fd(sock: &impl AsRawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut cbuf = FdCmsg([0; 64]);
    // SAFETY: as in send_fd_raw; the kernel writes at most msg_controllen
    // bytes of control data into cbuf, and we read a descriptor only from a
    // complete SCM_RIGHTS message of the right length.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n == 0
            || cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            || (*cmsg).cmsg_len as usize
                != libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize
        {
            return Err(io::Error::other("no descriptor in the message"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Sets the size of the terminal `fd` (a pty master or slave); the kernel
/// sends SIGWINCH to the terminal's foreground process group.
pub fn set_winsize(fd: &impl AsRawFd, size: vmc_proto::WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Closes every descriptor from 3 up: what a process inherited without
/// asking (an open directory, a socket, a terminal of its parent's) must not
/// reach a container. Called first thing in vmc's `main`, before any thread
/// or descriptor of its own exists.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range takes plain integers; nothing above 2 is in use yet.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } == 0 {
        return Ok(());
    }
    // Kernels before 5.9: close what /proc lists (collected first: closing
    // while reading the directory would close the directory's own fd).
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: an inherited descriptor nobody in this process owns (the
        // directory's own, already closed, fails with EBADF, ignored).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// In a forked child right before execve: marks every descriptor from
/// `first` (3 but for descriptors passed on on purpose) up close-on-exec, so that nothing the parent held open without O_CLOEXEC
/// reaches the new program; the child's own error pipe keeps working until
/// the exec succeeds. Returns -1 when neither close_range nor the bounded
/// fallback could be applied.
///
/// # Safety
/// Child after fork only (system calls, no allocation).
pub unsafe fn cloexec_from(first: libc::c_int) -> libc::c_int {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range and fcntl on plain integers.
    unsafe {
        let first = first.max(3);
        if libc::syscall(
            libc::SYS_close_range,
            first as u32,
            u32::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return 0;
        }
        // Before 5.11: every possible descriptor below the open-files limit.
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) < 0 {
            return -1;
        }
        let max = lim.rlim_cur.min(1 << 20) as libc::c_int;
        for fd in first..max {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
        0
    }
}
