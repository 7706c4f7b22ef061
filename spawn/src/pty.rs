//! The child's stdio: the descriptors the parent passed, or the container's
//! pseudo-terminal, opened by the child inside the container root and made
//! its controlling terminal.

use std::os::fd::RawFd;

use crate::sys;
use vmc_proto::WinSize;

/// In the child, a session leader inside the container root: opens a new
/// pseudo-terminal from the root's /dev/ptmx, sends the master over `sock`,
/// and makes the slave its controlling terminal and stdio, sized `size` and
/// owned by the user the process will run as. Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
pub(super) unsafe fn open_terminal(sock: RawFd, size: WinSize, uid: libc::uid_t) -> libc::c_int {
    // SAFETY: system calls on descriptors this function opens and on
    // stack data; each result is checked.
    unsafe {
        let master = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            return -1;
        }
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) < 0 {
            return -1;
        }
        // The slave of this master, opened without a path lookup (Linux 4.13).
        let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
        if slave < 0 {
            return -1;
        }
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        if libc::ioctl(slave, libc::TIOCSWINSZ, &ws) < 0 {
            return -1;
        }
        // Like a login: the terminal belongs to the user; a failure (a
        // read-only devpts) leaves it usable through the open descriptors.
        libc::fchown(slave, uid, libc::gid_t::MAX);
        if sys::send_fd_raw(sock, master) < 0 {
            return -1;
        }
        libc::close(master);
        libc::close(sock);
        if install_stdio([slave; 3]) < 0 {
            return -1;
        }
        if slave > 2 {
            libc::close(slave);
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return -1;
        }
    }
    0
}

/// Makes `stdio` the child's descriptors 0, 1 and 2. Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
pub(super) unsafe fn install_stdio(stdio: [RawFd; 3]) -> libc::c_int {
    // SAFETY: fcntl and dup2 on descriptors the parent passed.
    unsafe {
        for (target, &fd) in stdio.iter().enumerate() {
            if fd == target as RawFd {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return -1;
                }
            } else if libc::dup2(fd, target as RawFd) < 0 {
                return -1;
            }
        }
    }
    0
}
