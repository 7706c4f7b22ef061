//! `--init`: a tiny init as PID 1 of a container (Docker's `docker-init`,
//! which is tini). In namespace mode the agent's static binary is bound
//! read-only at `/sbin/docker-init` in the container; in a microVM the
//! agent execs its own binary from outside the root; either runs under that name
//! with the command after it: it starts the command as its child, passes it
//! every signal it gets, reaps every process that ends in the container
//! (orphans are re-parented to it), and exits as the command did (128+N
//! when a signal N ended it).

use std::ffi::CString;

/// Whether this binary was started as the container's init (by its name).
pub fn called_as_init(argv0: &str) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "docker-init")
}

/// The signals passed on to the command: every one a process may catch,
/// but SIGCHLD (the init's own) and the ones that stop a terminal's job.
fn forwarded() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigfillset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for s in [
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGABRT,
            libc::SIGTRAP,
            libc::SIGSYS,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ] {
            libc::sigdelset(&mut set, s);
        }
        set
    }
}

fn fail(what: &str) -> ! {
    eprintln!("docker-init: {what}");
    std::process::exit(125)
}

/// Runs the init over `args` (its own name first, then `--` optionally,
/// then the command); never returns.
pub fn main(args: Vec<String>) -> ! {
    // Its name in ps when a microVM's agent exec'd it by descriptor (whose
    // name would be the descriptor's number).
    // SAFETY: PR_SET_NAME copies at most 16 bytes of a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"docker-init".as_ptr()) };
    let mut cmd = &args[1..];
    if cmd.first().is_some_and(|a| a == "--") {
        cmd = &cmd[1..];
    }
    if cmd.is_empty() {
        fail("no command given: docker-init [--] CMD [ARG...]");
    }
    let Ok(argv) = cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        fail("an argument holds a NUL byte")
    };
    let set = forwarded();
    // SAFETY: sigset_t is plain data, emptied by sigemptyset.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sets; the mask is this (single-threaded) process's.
    // vmc starts it with every signal blocked: what arrived before this
    // stays pending and is passed on below.
    unsafe {
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // SAFETY: fork in a single-threaded process.
    let child = unsafe { libc::fork() };
    if child < 0 {
        fail(&format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: the child unblocks every signal (the command starts as
        // any other) and execs a NULL-terminated argv of live CStrings;
        // execvp searches PATH as a shell would.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execvp(ptrs[0], ptrs.as_ptr());
        }
        let e = std::io::Error::last_os_error();
        eprintln!("docker-init: exec {}: {e}", cmd[0]);
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        // SAFETY: _exit in the forked child.
        unsafe { libc::_exit(code) };
    }
    loop {
        // Reap everything that ended: the command's end ends the init.
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                let code = if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    libc::WEXITSTATUS(status)
                };
                std::process::exit(code);
            }
        }
        // SAFETY: siginfo_t is plain data filled by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ts = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: valid set, info and timeout.
        let sig = unsafe { libc::sigtimedwait(&set, &mut info, &ts) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill of our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_is_known_by_its_name() {
        assert!(called_as_init("/sbin/docker-init"));
        assert!(called_as_init("docker-init"));
        assert!(!called_as_init("/sbin/vmc-guest"));
        assert!(!called_as_init("/sbin/docker-init2"));
    }
}
