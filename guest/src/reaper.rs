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

use vmc_spawn::sys;

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

pub(crate) fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let mut map = waiters().lock().unwrap_or_else(|e| e.into_inner());
        // A traced child's stop (a parked process at its entry: see
        // session.rs) goes to its session too; it stays registered.
        let tx = if libc::WIFSTOPPED(status) {
            map.get(&(pid as u32)).and_then(|tx| tx.try_clone().ok())
        } else {
            map.remove(&(pid as u32))
        };
        drop(map);
        if let Some(tx) = tx {
            let _ = sys::write_all(tx.as_raw_fd(), &status.to_ne_bytes());
        }
    }
}

/// Decodes a raw wait status.
pub fn decode(status: i32) -> vmc_proto::ExitStatus {
    if libc::WIFSIGNALED(status) {
        vmc_proto::ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        vmc_proto::ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testns::{children, fork_child, wait_exited};
    use vmc_proto::ExitStatus;

    fn exit_5() -> ! {
        // SAFETY: _exit ends the forked child without unwinding.
        unsafe { libc::_exit(5) }
    }

    fn pause_forever() -> ! {
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }

    fn registered(pid: u32) -> bool {
        waiters()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&pid)
    }

    #[test]
    fn wait_statuses_decode_to_codes_and_signals() {
        assert_eq!(decode(0), ExitStatus::Code(0));
        assert_eq!(decode(7 << 8), ExitStatus::Code(7));
        assert_eq!(decode(255 << 8), ExitStatus::Code(255));
        assert_eq!(decode(libc::SIGKILL), ExitStatus::Signal(9));
        // Killed with a core dump (0x80): still the signal.
        assert_eq!(decode(libc::SIGSEGV | 0x80), ExitStatus::Signal(11));
    }

    #[test]
    fn status_is_read_whole_or_not_at_all() {
        let (rx, tx) = sys::pipe().unwrap();
        let b = 0x0102_0304i32.to_ne_bytes();
        sys::write_all(tx.as_raw_fd(), &b[..1]).unwrap();
        sys::write_all(tx.as_raw_fd(), &b[1..]).unwrap();
        assert_eq!(read_status(&rx).unwrap(), 0x0102_0304);
        // A writer gone after part of a status (or none) is end of file.
        sys::write_all(tx.as_raw_fd(), &b[..2]).unwrap();
        drop(tx);
        let e = read_status(&rx).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn registered_child_gets_its_status_even_when_it_exited_at_once() {
        let _g = children();
        let (seen, pid, rx) = spawn_registered(|| {
            // Spawning happens under the registry lock.
            let locked = waiters().try_lock().is_err();
            let pid = fork_child(exit_5);
            // Exited before it is registered: the reaper must still find it.
            wait_exited(pid);
            Ok((locked, pid))
        })
        .unwrap();
        assert!(seen);
        assert!(registered(pid));
        reap_all();
        assert_eq!(decode(read_status(&rx).unwrap()), ExitStatus::Code(5));
        assert!(!registered(pid));
    }

    #[test]
    fn killed_child_reports_the_signal() {
        let _g = children();
        let (_, pid, rx) = spawn_registered(|| Ok(((), fork_child(pause_forever)))).unwrap();
        // SAFETY: kill takes plain integers; pid is our child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        wait_exited(pid);
        reap_all();
        assert_eq!(decode(read_status(&rx).unwrap()), ExitStatus::Signal(9));
    }

    #[test]
    fn orphans_are_reaped_and_forgotten() {
        let _g = children();
        let pid = fork_child(exit_5);
        wait_exited(pid);
        reap_all();
        // Gone: no zombie left to wait for.
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        assert_eq!(r, -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ECHILD)
        );
        assert!(!registered(pid));
    }

    #[test]
    fn failed_spawn_registers_nothing() {
        let _g = children();
        let before = waiters().lock().unwrap().len();
        let r: io::Result<((), u32, OwnedFd)> =
            spawn_registered(|| Err(io::Error::other("no such program")));
        assert_eq!(r.err().unwrap().to_string(), "no such program");
        assert_eq!(waiters().lock().unwrap().len(), before);
    }

    #[test]
    fn sigchld_is_blocked_and_handled() {
        let (blocked, handler, flags) = std::thread::spawn(|| {
            block_sigchld();
            // SAFETY: sigset_t and sigaction are plain data, filled by the queries.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
                let mut sa: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut sa);
                (
                    libc::sigismember(&set, libc::SIGCHLD),
                    sa.sa_sigaction,
                    sa.sa_flags,
                )
            }
        })
        .join()
        .unwrap();
        assert_eq!(blocked, 1);
        // A handler, not SIG_DFL: PID 1's default would discard SIGCHLD.
        // (Not compared with `on_sigchld`'s address: Rust does not promise
        // one address per function across codegen units.)
        assert!(
            handler != libc::SIG_DFL && handler != libc::SIG_IGN,
            "{handler:#x}"
        );
        assert_eq!(
            flags & (libc::SA_RESTART | libc::SA_NOCLDSTOP),
            libc::SA_RESTART | libc::SA_NOCLDSTOP
        );
    }
}
