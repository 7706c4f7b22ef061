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
            vmc_guest::sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None).unwrap();
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
