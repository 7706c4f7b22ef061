//! What runs in the forked child before execve: stdio, session, the
//! container root, user, working directory, gate and seccomp, each step
//! reported through the error pipe when it fails.

use std::os::fd::{AsRawFd, RawFd};

use super::confine::{confine, isolate_root};
use super::pty::{install_stdio, open_terminal};
use super::{ChildIo, Prepared, Step};
use crate::sys;

/// The forked child. Only system calls from here on.
///
/// # Safety
/// Must only be called in the child right after fork.
pub(super) unsafe fn child_main(
    p: &Prepared,
    io: ChildIo,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    groups: &[libc::gid_t],
    err_fd: RawFd,
    [gate_fd, gate_w]: [RawFd; 2],
) -> ! {
    let fail = |step: Step| -> ! {
        // SAFETY: __errno_location is always valid in the calling thread.
        let errno = unsafe { *libc::__errno_location() };
        let e = errno.to_ne_bytes();
        let op = super::confine::FAILED_OP
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_ne_bytes();
        let msg = [
            step as u8, e[0], e[1], e[2], e[3], op[0], op[1], op[2], op[3],
        ];
        // SAFETY: writing a stack buffer to our error pipe, then exiting without unwinding.
        unsafe {
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: all calls below are system calls on valid, NUL-terminated data
    // prepared by the parent; each result is checked.
    unsafe {
        // First: the exec of the workload makes it dumpable again.
        if p.iso.as_ref().is_some_and(|i| i.non_dumpable)
            && libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) < 0
        {
            fail(Step::Isolate);
        }
        // Only the parent writes the gate: closed here, the read below sees
        // end of file when the parent gives up without writing.
        if gate_w >= 0 {
            libc::close(gate_w);
        }
        // The agent blocks SIGCHLD; the workload starts with an empty mask
        // (an init with a full one: see Prepared::exec_through).
        let mut set: libc::sigset_t = std::mem::zeroed();
        if p.signals_blocked {
            libc::sigfillset(&mut set);
        } else {
            libc::sigemptyset(&mut set);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        if let ChildIo::Fds(stdio) = io {
            if install_stdio(stdio) < 0 {
                fail(Step::Stdio);
            }
        }
        if libc::setsid() < 0 {
            fail(Step::Session);
        }
        if !p.iso.as_ref().is_some_and(|i| i.in_root) {
            if let Err(step) = enter_root(p) {
                fail(step);
            }
        }
        if let ChildIo::Pty { sock, size } = io {
            if open_terminal(sock, size, p.user.uid) < 0 {
                fail(Step::Terminal);
            }
        }
        for d in &p.cwd_prefixes {
            libc::mkdir(d.as_ptr(), 0o755);
        }
        if let Some(iso) = &p.iso {
            if confine(iso) < 0 {
                fail(Step::Isolate);
            }
        }
        // Raw system calls, not glibc's wrappers: those change the
        // credentials of every thread glibc knows of and wait for them, and
        // a child made by a raw clone of a multithreaded parent still lists
        // the parent's threads, so it would wait forever.
        // In a user namespace whose setgroups is denied (rootless namespace
        // mode maps one id) the supplementary groups cannot change: EPERM
        // there leaves them as they are.
        if (libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
            && *libc::__errno_location() != libc::EPERM)
            || libc::syscall(libc::SYS_setgid, p.user.gid) < 0
            || libc::syscall(libc::SYS_setuid, p.user.uid) < 0
        {
            fail(Step::Identity);
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            fail(Step::Workdir);
        }
        if p.iso.as_ref().is_some_and(|i| i.no_new_privs)
            && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
        {
            fail(Step::Isolate);
        }
        if gate_fd >= 0 {
            // At the gate, its setup done: a zero byte says so to a parent
            // that waits for it (an error report starts with its step, 1
            // or more).
            if p.gate_after_setup && libc::write(err_fd, [0u8].as_ptr().cast(), 1) != 1 {
                fail(Step::Gate);
            }
            let mut go = 0u8;
            if libc::read(gate_fd, (&mut go as *mut u8).cast(), 1) != 1 {
                *libc::__errno_location() = libc::ECANCELED;
                fail(Step::Gate);
            }
        }
        // Nothing but stdio (and descriptors passed on on purpose) crosses
        // into the workload, whatever the parent held open (the error pipe
        // closes with the exec).
        if sys::cloexec_from(3 + p.pass_fds) < 0 {
            fail(Step::Stdio);
        }
        // Last, so that the filters judge the workload's system calls and
        // none of vmc's setup (a filter that refuses execve fails here).
        if let Some(iso) = &p.iso {
            for prog in &iso.seccomp {
                let fprog = libc::sock_fprog {
                    len: prog.0.len() as libc::c_ushort,
                    filter: prog.0.as_ptr().cast_mut(),
                };
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ) < 0
                {
                    fail(Step::Seccomp);
                }
            }
        }
        if p.trace_exec && libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
            fail(Step::Exec);
        }
        match &p.exec_fd {
            Some(fd) => {
                libc::syscall(
                    libc::SYS_execveat,
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
            None => {
                libc::execve(p.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
        }
        fail(Step::Exec)
    }
}

/// The child's own mount namespace, pivoted into the container root.
///
/// # Safety
/// Child after fork only.
unsafe fn enter_root(p: &Prepared) -> Result<(), Step> {
    let root_c = c"/";
    if p.iso.is_none() {
        // In a microVM (no isolation plan): the VM is the boundary, and its
        // workload is root of the guest, which could reach the agent's
        // mount namespace through /proc/1 from one of its own as well. So
        // chroot, not a mount namespace of its own and pivot_root: the same
        // view of the root for a fraction of the guest-kernel work (copying
        // the mount table and detaching the old root cost about 0.3 s per
        // process under software virtualisation), and the container's
        // processes share their mounts, as a Docker container's do.
        // SAFETY: chroot and chdir on NUL-terminated strings.
        unsafe {
            if libc::chroot(p.root.as_ptr()) < 0 || libc::chdir(root_c.as_ptr()) < 0 {
                return Err(Step::Root);
            }
            // PID 1 of a new PID namespace: its /proc over the guest's, in
            // the mount namespace the container's processes share.
            if matches!(p.pid_ns, super::PidNamespace::New)
                && libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) < 0
            {
                return Err(Step::Proc);
            }
        }
        return Ok(());
    }
    // SAFETY: system calls on NUL-terminated data prepared before the fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) < 0 {
            return Err(Step::Namespace);
        }
        if libc::mount(
            std::ptr::null(),
            root_c.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) < 0
        {
            return Err(Step::Namespace);
        }
        if let Some(iso) = &p.iso {
            // Opened in this mount namespace: a mount through a descriptor
            // of another namespace's mount is refused.
            let root = libc::open(
                p.root.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if root < 0 || isolate_root(iso, root) < 0 {
                return Err(Step::Isolate);
            }
            libc::close(root);
        }
        // pivot_root(".", ".") stacks the old root on the new one; detaching
        // it leaves the container root as the whole view.
        let dot = c".";
        if libc::chdir(p.root.as_ptr()) < 0
            || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) < 0
            || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) < 0
            || libc::chdir(root_c.as_ptr()) < 0
        {
            return Err(Step::Root);
        }
    }
    Ok(())
}
