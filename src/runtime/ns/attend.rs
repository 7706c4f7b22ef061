//! While a namespace container runs: waiting for its process with the
//! host's signals forwarded to it, and relaying its terminal to vmc's stdio.

use super::*;

/// Waits for the started process, forwarding signals; with a terminal, also
/// relays it to vmc's stdio and passes on size changes (SIGWINCH).
pub(super) fn attend(
    pid: libc::pid_t,
    set: &libc::sigset_t,
    terminal: Option<OwnedFd>,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    match terminal {
        None => Ok(wait_forwarding(pid, set)),
        Some(master) => {
            let _raw = forward_stdin.then(crate::runtime::tty::RawMode::enter);
            relay_terminal(pid, set, &master, forward_stdin)
        }
    }
}

/// The terminal's relay, in this thread alone: after `vmc exec` has joined
/// the container's PID namespace, the kernel refuses to create threads
/// (their PID namespace would differ from their children's). One poll loop
/// over a signalfd, the master and vmc's stdin.
fn relay_terminal(
    pid: libc::pid_t,
    set: &libc::sigset_t,
    master: &OwnedFd,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: set is a valid sigset_t (its signals are blocked: block_forwarded).
    let sfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    check(sfd, "signalfd")?;
    // SAFETY: signalfd returned a fresh descriptor that we now own.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    let m = master.as_raw_fd();
    let mut stdin_open = forward_stdin;
    let mut master_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    let mut code = None;
    while code.is_none() {
        let mut fds = [
            pollfd(sfd.as_raw_fd(), libc::POLLIN),
            pollfd(if master_open { m } else { -1 }, libc::POLLIN),
            pollfd(if stdin_open { 0 } else { -1 }, libc::POLLIN),
        ];
        // SAFETY: fds is a valid array of pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            master_open = copy_to_stdout(m, &mut buf);
        }
        if fds[2].revents != 0 {
            match vmc_spawn::sys::read(0, &mut buf) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let _ = vmc_spawn::sys::write_all(m, &[crate::runtime::tty::EOF_BYTE]);
                }
                Ok(n) => {
                    if vmc_spawn::sys::write_all(m, &buf[..n]).is_err() {
                        stdin_open = false;
                    }
                }
            }
        }
        if fds[0].revents != 0 {
            // SAFETY: signalfd_siginfo is plain data, filled by read.
            let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            // SAFETY: reads at most size_of(si) bytes into si.
            let n = unsafe {
                libc::read(
                    sfd.as_raw_fd(),
                    (&mut si as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n <= 0 {
                continue;
            }
            match si.ssi_signo as libc::c_int {
                libc::SIGCHLD => code = reap(pid),
                libc::SIGWINCH => {
                    if let Some(size) = crate::runtime::tty::host_size() {
                        crate::runtime::tty::resize(master, size);
                    }
                }
                // SAFETY: kill on our own child.
                sig => unsafe {
                    libc::kill(pid, sig);
                },
            }
        }
    }
    // What the process wrote before it exited. The master reports a hang-up
    // once the last holder of the terminal is gone; a process that escaped
    // the exit (an exec'd command's background child) may hold it, so the
    // wait for more output is bounded.
    while master_open {
        let mut fds = [pollfd(m, libc::POLLIN)];
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), 1, 500) } <= 0 {
            break;
        }
        master_open = copy_to_stdout(m, &mut buf);
    }
    Ok(code.unwrap_or(EXIT_LOST))
}

/// Exit code when the status of the container's process could not be read.
const EXIT_LOST: i32 = 125;

fn pollfd(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// One read from the master to vmc's stdout; false once the terminal is
/// closed (EIO after the last slave descriptor went away).
fn copy_to_stdout(master: libc::c_int, buf: &mut [u8]) -> bool {
    match vmc_spawn::sys::read(master, buf) {
        Ok(0) => false,
        Ok(n) => {
            let _ = vmc_spawn::sys::write_all(1, &buf[..n]);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::Interrupted,
    }
}

/// The exit code of `pid` if it has ended (Docker's: 128 + signal).
fn reap(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid on our child with a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return None;
    }
    let st = if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    };
    Some(st.shell_code())
}

/// Blocks the signals vmc forwards to a container (SIGWINCH resizes its
/// terminal, if it has one) and SIGCHLD, to wait.
pub fn block_forwarded() -> libc::sigset_t {
    crate::runtime::block_signals(&[libc::SIGWINCH, libc::SIGCHLD])
}

/// Waits for `pid`, forwarding the blocked signals to it; its exit code as
/// Docker reports it.
fn wait_forwarding(pid: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        if let Some(code) = reap(pid) {
            return code;
        }
        let mut sig = 0;
        // SAFETY: set and sig are valid.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill on our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}
