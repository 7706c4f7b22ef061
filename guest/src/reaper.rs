//! PID 1 reaps every process in the VM. Sessions learn their own process's
//! status through a pipe; orphans are reaped and forgotten.
//!
//! SIGCHLD is blocked in every thread (the mask is set before any thread
//! starts) and collected with sigwaitinfo by one reaper thread. Processes are
//! spawned under the registry lock, so a child that exits at once is still
//! found in the registry when the reaper looks it up.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

use vmc_guest::sys;

/// Maps a pid to the write end of its session's exit pipe.
static WAITERS: OnceLock<Mutex<HashMap<u32, OwnedFd>>> = OnceLock::new();

fn waiters() -> &'static Mutex<HashMap<u32, OwnedFd>> {
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

extern "C" fn on_sigchld(_: libc::c_int) {}

/// Blocks SIGCHLD in the calling thread (call before starting threads) and
/// installs a no-op handler so the kernel never discards it for PID 1.
pub fn block_sigchld() {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the handler is an extern "C" fn with the right signature.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
}

/// Runs `spawn` with the registry locked and registers the returned pid.
/// Returns the spawn result and the read end of the pipe that will receive
/// the raw wait status.
pub fn spawn_registered<T>(
    spawn: impl FnOnce() -> io::Result<(T, u32)>,
) -> io::Result<(T, u32, OwnedFd)> {
    let (rx, tx) = sys::pipe()?;
    let mut map = waiters().lock().unwrap_or_else(|e| e.into_inner());
    let (value, pid) = spawn()?;
    map.insert(pid, tx);
    Ok((value, pid, rx))
}

/// Reads the raw wait status a session's pipe received.
pub fn read_status(rx: &OwnedFd) -> io::Result<i32> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match sys::read(rx.as_raw_fd(), &mut b[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(i32::from_ne_bytes(b))
}

/// The reaper loop; never returns.
pub fn run() -> ! {
    // SAFETY: as in block_sigchld.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    loop {
        reap_all();
        // SAFETY: set is initialised; a null siginfo pointer is allowed.
        unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
    }
}

fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let tx = waiters()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid as u32));
        if let Some(tx) = tx {
            let _ = sys::write_all(tx.as_raw_fd(), &status.to_ne_bytes());
        }
    }
}

/// Decodes a raw wait status.
pub fn decode(status: i32) -> vmc_guest::ExitStatus {
    if libc::WIFSIGNALED(status) {
        vmc_guest::ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        vmc_guest::ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}
