//! AF_VSOCK stream sockets (std has none; the `vsock` crate would pull in nix for
//! three system calls).

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmc_spawn::sys::{self, check};

/// A listening vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds to `port` on any CID and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: socket() returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: addr is a valid sockaddr_vm and the length matches it.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(VsockListener { fd })
    }

    /// Accepts one connection (blocking).
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed by accept4.
            let ret = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(ret) {
                // SAFETY: accept4 returned a new descriptor we now own.
                Ok(fd) => return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) })),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connected vsock stream.
pub struct VsockStream(pub OwnedFd);

impl VsockStream {
    /// Shuts down the write half (the peer sees end of stream).
    pub fn shutdown_write(&self) {
        // SAFETY: shutdown on a socket we own; failure is harmless here.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) };
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.0.as_raw_fd(), buf)
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::write(self.0.as_raw_fd(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
