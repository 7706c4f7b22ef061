//! Test support: running code in namespaces of its own, so that tests can
//! mount, configure interfaces or set the hostname on the host safely.

use std::io;

/// Runs `f` in a new thread that first unshares `flags` (`CLONE_NEWNS`,
/// `CLONE_NEWNET`, `CLONE_NEWUTS`: all per-thread). A new mount namespace
/// is made private, so nothing mounted in it shows outside; it ends with
/// the thread. Panics in `f` are the caller's.
pub fn in_namespaces<T: Send + 'static>(
    flags: libc::c_int,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare takes plain flags.
        let r = unsafe { libc::unshare(flags) };
        assert_eq!(r, 0, "unshare: {}", io::Error::last_os_error());
        if flags & libc::CLONE_NEWNS != 0 {
            vmc_spawn::sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None).unwrap();
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Held by tests that fork or reap: the reaper's `waitpid(-1)` collects
/// any child of the test process.
pub static CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn children() -> std::sync::MutexGuard<'static, ()> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forks a child that runs `child` (system calls only) and never returns.
pub fn fork_child(child: fn() -> !) -> u32 {
    // SAFETY: the child only makes the system calls of `child`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        child()
    }
    pid as u32
}

/// Blocks until child `pid` has exited, leaving it to be reaped.
pub fn wait_exited(pid: u32) {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid out pointer; WNOWAIT leaves the zombie.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(r, 0, "waitid: {}", io::Error::last_os_error());
}
