//! Starting a workload process inside the container root: on the host
//! (with an isolation plan) its own namespaces and pivot_root into the
//! assembled root, in a microVM chroot (the VM is the boundary); then user,
//! cwd, execve.
//!
//! Written on fork/execve rather than `std::process::Command` because PID 1's
//! reaper collects every child with `waitpid(-1)`, while `Command::spawn`
//! itself waits for a child whose exec failed and asserts that this wait
//! succeeds, which races with the reaper. Everything is prepared before the
//! fork; the child only makes system calls.
//!
//! The parts: `isolation` (how a container on the host is confined, and
//! that description prepared for the child), `resolve` (the executable,
//! user and paths looked up in the root before the fork), `child` (what
//! runs in the forked child before execve), `confine` (the child's side of
//! the isolation: root preparation, mounts, capabilities) and `pty` (the
//! container's pseudo-terminal).
//!
//! This crate is used by the guest agent (vmc-guest, inside the microVM) and
//! by namespace mode on the host (vmc), so a container is confined by the
//! same code in both. It builds only on `vmc-proto`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

use vmc_proto::{ProcessSpec, StartFailure, WinSize};

use crate::sys::cstr;
use crate::user::ExecUser;

/// Small checked wrappers around system calls.
pub mod sys;
/// Recording a test's skips for the harness (used by tests only; tiny).
pub mod testing;
/// An overlayfs upper directory as an OCI layer tar.
pub mod upper;
/// `USER` resolution against the container's passwd and group files.
pub mod user;
pub mod walk;

mod child;
mod confine;
mod isolation;
mod pty;
mod resolve;

use child::child_main;
use isolation::{prepare_isolation, PreparedIsolation};
pub use isolation::{Isolation, RootOp, SeccompProgram, DOCKER_DEFAULT_CAPS};
pub use resolve::{
    clean_path, executables_in, open_dir_in_root, open_path_in_root, read_in_root_path,
    resolve_ahead, DEFAULT_PATH, MAX_ID_FILE,
};
use resolve::{read_in_root, resolve_executable};

/// A start failure with the Docker-style message the CLI prints.
#[derive(Debug)]
pub struct SpawnError {
    pub kind: StartFailure,
    pub message: String,
}

impl SpawnError {
    fn setup(message: impl Into<String>) -> Self {
        SpawnError {
            kind: StartFailure::Setup,
            message: message.into(),
        }
    }
}

/// Everything the child needs, prepared before fork.
pub struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    root: CString,
    cwd_prefixes: Vec<CString>,
    cwd: CString,
    user: ExecUser,
    iso: Option<PreparedIsolation>,
    /// The child asks to be traced before its execve, so that it stops
    /// (SIGTRAP) at the entry of the new program: see [`Prepared::stop_at_entry`].
    trace_exec: bool,
    /// In a microVM, which PID namespace the process starts in.
    pid_ns: PidNamespace,
    /// Exec'd instead of `path` (an executable outside the root, opened
    /// before the fork): see [`Prepared::exec_init`].
    exec_fd: Option<OwnedFd>,
    /// The process starts with every signal blocked (an init that takes
    /// them with sigtimedwait), not with an empty mask.
    signals_blocked: bool,
    /// Descriptors 3 to 3 + this - 1 are passed on to the process.
    pass_fds: libc::c_int,
    /// The gate runs once the child's setup is done: see
    /// [`Prepared::gate_after_setup`].
    gate_after_setup: bool,
}

/// The PID namespace of a process started without an isolation plan (in a
/// microVM; a namespace container's come with its plan).
#[derive(Default)]
pub enum PidNamespace {
    /// The caller's.
    #[default]
    Inherit,
    /// A new one, of which the process is PID 1 (a container's workload, as
    /// in Docker: signals it has no handler for do not end it, and orphans
    /// are re-parented to it). It mounts that namespace's /proc over the
    /// root's /proc before its exec, so that every process started in the
    /// root later sees the container's processes under their own numbers.
    New,
    /// An existing one (`/proc/PID/ns/pid` of a workload started `New`):
    /// `exec` into a running container.
    Join(OwnedFd),
}

impl Prepared {
    /// The started process stops at the entry of its executable, traced by
    /// the thread that spawned it: its parent sees a stop with SIGTRAP (a
    /// `waitpid` status), and may then detach it (`PTRACE_DETACH`) stopped
    /// or running.
    pub fn stop_at_entry(&mut self) {
        self.trace_exec = true;
    }

    /// The process execs `init` (an executable outside the container
    /// root, opened by the caller) under the name `name`, with the prepared
    /// command after `--` as its arguments: `--init` in a microVM, where the
    /// agent's own binary is the init and nothing is added to the root.
    pub fn exec_init(&mut self, name: &str, init: OwnedFd) -> Result<(), SpawnError> {
        self.exec_through(name)?;
        self.exec_fd = Some(init);
        Ok(())
    }

    /// The process gets exactly these supplementary groups (an OCI
    /// bundle's `additionalGids`), not the user's from the root's
    /// /etc/group.
    pub fn set_groups(&mut self, groups: Vec<libc::gid_t>) {
        self.user.groups = groups;
    }

    /// Descriptors 3 to 3 + `n` - 1 of the caller reach the process as they
    /// are (runc's `--preserve-fds`); every other one is closed at its exec.
    pub fn pass_fds(&mut self, n: u32) {
        self.pass_fds = n.min(1 << 20) as libc::c_int;
    }

    /// A [`Gate`] given to [`spawn_with`] runs only once the child has done
    /// all its setup and waits to exec: a failure of that setup is reported
    /// without the gate running at all. (Otherwise the gate runs while the
    /// child sets up, which is faster.)
    pub fn gate_after_setup(&mut self) {
        self.gate_after_setup = true;
    }

    /// Where the process's PID namespace comes from; see [`PidNamespace`].
    pub fn set_pid_namespace(&mut self, ns: PidNamespace) {
        self.pid_ns = ns;
    }

    /// The process execs `init` (a path in the root, which need not exist
    /// yet: a mount op may put it there) with the prepared command after
    /// `--` as its arguments (`--init`); the command was found as usual.
    ///
    /// The init starts with every signal blocked: one sent before it has
    /// set up its forwarding waits for it (a PID 1 drops signals it has no
    /// handler for), so a `stop` right after the start is not lost.
    pub fn exec_through(&mut self, init: &str) -> Result<(), SpawnError> {
        let c = |s: &str| CString::new(s).map_err(|_| SpawnError::setup("a path holds a NUL byte"));
        self.path = c(init)?;
        self.argv.splice(0..0, [c(init)?, c("--")?]);
        self.signals_blocked = true;
        Ok(())
    }
}

/// Reads up to `limit` bytes of the executable `p` would exec, from inside
/// its root (symlinks resolve within it), and discards them: a VM snapshot
/// taken next holds them in its page cache. Returns the bytes read.
///
/// Read twice: the second read moves the pages to the active LRU list.
/// Otherwise every run restored from the snapshot would move them there
/// itself when its process exits (the kernel marks each page a process had
/// mapped as accessed on unmap, and a second access activates it), a few
/// hundred milliseconds of guest-kernel work under software virtualisation.
pub fn warm(p: &Prepared, limit: u64) -> io::Result<u64> {
    let root = OwnedFd::from(std::fs::File::open(p.root.to_string_lossy().as_ref())?);
    let path = p.path.to_string_lossy();
    let fd = resolve::open_in_root(&root, path.trim_start_matches('/'), libc::O_RDONLY as u64)?;
    let mut file = std::fs::File::from(fd);
    let n = io::copy(&mut io::Read::take(&file, limit), &mut io::sink())?;
    io::Seek::rewind(&mut file)?;
    io::copy(&mut io::Read::take(&file, limit), &mut io::sink())?;
    Ok(n)
}

/// Validates `spec` against the container root and prepares it for [`spawn`].
pub fn prepare(spec: &ProcessSpec, root: &str) -> Result<Prepared, SpawnError> {
    if spec.args.is_empty() {
        return Err(SpawnError::setup("no command given"));
    }
    // Opened only when something is looked up in the root.
    let root_fd = || {
        std::fs::File::open(root)
            .map(OwnedFd::from)
            .map_err(|e| SpawnError::setup(format!("container root {root}: {e}")))
    };
    let user = match &spec.resolved {
        Some(r) => ExecUser {
            uid: r.uid,
            gid: r.gid,
            groups: r.groups.clone(),
            home: r.home.clone(),
        },
        None => {
            let root_fd = root_fd()?;
            user::resolve(
                &spec.user,
                &read_in_root(&root_fd, "/etc/passwd"),
                &read_in_root(&root_fd, "/etc/group"),
            )
            .map_err(|e| SpawnError::setup(e.to_string()))?
        }
    };
    let mut env: Vec<String> = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    // A backend workaround the VMM passed to the agent (see vmc's backend.rs)
    // applies to every process, unless the container sets its own.
    if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
        if !env.iter().any(|e| e.starts_with("GLIBC_TUNABLES=")) {
            env.push(format!("GLIBC_TUNABLES={t}"));
        }
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let path_var = resolve::path_var(&env).to_string();
    let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };
    if !cwd.starts_with('/') {
        return Err(SpawnError::setup(format!(
            "the working directory '{cwd}' is invalid, it needs to be an absolute path"
        )));
    }
    // As Docker cleans WorkingDir: the directories created below and the
    // chdir must name the same place ("/a/b/../c" is /a/c).
    let cwd = &clean_path(cwd);
    let path = match &spec.resolved {
        Some(r) => r.path.clone(),
        None => resolve_executable(&root_fd()?, &spec.args[0], &path_var, cwd)?,
    };
    let mut cwd_prefixes = Vec::new();
    let mut acc = String::new();
    for c in Path::new(cwd).components() {
        if let Component::Normal(n) = c {
            acc.push('/');
            acc.push_str(&n.to_string_lossy());
            cwd_prefixes.push(cstr(&acc).map_err(|e| SpawnError::setup(e.to_string()))?);
        }
    }
    let c =
        |s: &str| CString::new(s).map_err(|_| SpawnError::setup("argument contains a NUL byte"));
    Ok(Prepared {
        path: c(&path)?,
        argv: spec.args.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
        envp: env.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
        root: c(root)?,
        cwd_prefixes,
        cwd: c(cwd)?,
        user,
        iso: None,
        trace_exec: false,
        pid_ns: PidNamespace::Inherit,
        exec_fd: None,
        signals_blocked: false,
        pass_fds: 0,
        gate_after_setup: false,
    })
}

/// Like [`prepare`], for a container started on the host: `root` is where
/// the child's first `RootOp`s mount the container root, and `view` a
/// directory showing the same files now (the image's top layer stack, or
/// the same path when already mounted), used to resolve the user and the
/// executable before the fork.
pub fn prepare_isolated(
    spec: &ProcessSpec,
    root: &str,
    view: &str,
    iso: &Isolation,
) -> Result<Prepared, SpawnError> {
    let mut p = prepare(spec, view)?;
    p.root = cstr(root).map_err(|e| SpawnError::setup(e.to_string()))?;
    p.iso = Some(prepare_isolation(iso).map_err(|e| SpawnError::setup(e.to_string()))?);
    Ok(p)
}

/// Where in the child a step failed; reported with errno through a pipe.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Step {
    Stdio = 1,
    Namespace,
    Root,
    Session,
    Identity,
    Workdir,
    Exec,
    Isolate,
    Terminal,
    Gate,
    Seccomp,
    Proc,
}

impl Step {
    fn describe(v: u8) -> &'static str {
        match v {
            1 => "set up stdio",
            2 => "create the mount namespace",
            3 => "enter the container root",
            4 => "start a session",
            5 => "switch user",
            6 => "enter the working directory",
            8 => "isolate the container (namespaces, mounts, capabilities)",
            9 => "open a pseudo-terminal (/dev/ptmx)",
            10 => "wait for the container's setup",
            11 => "install the seccomp filter",
            12 => "mount /proc of the container's PID namespace",
            _ => "exec",
        }
    }
}

/// The workload's stdin, stdout and stderr.
#[derive(Clone, Copy)]
enum ChildIo {
    /// These descriptors (the child's ends of pipes, or inherited ones).
    Fds([RawFd; 3]),
    /// A new pseudo-terminal, opened by the child inside the container root
    /// (so that it belongs to the container's devpts and `tty` names
    /// /dev/pts/N there); the master is sent back over `sock`.
    Pty { sock: RawFd, size: WinSize },
}

/// What the child of [`vfork_spawn`] needs, on the parent's stack.
struct VforkArgs<'a> {
    p: &'a Prepared,
    io: ChildIo,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    groups: &'a [libc::gid_t],
    err_fd: RawFd,
}

extern "C" fn vfork_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the VforkArgs of vfork_spawn, alive while the parent is
    // suspended (until this child execs or exits); child_main never returns.
    unsafe {
        let a = &*(arg as *const VforkArgs);
        child_main(a.p, a.io, a.argv, a.envp, a.groups, a.err_fd, [-1, -1])
    }
}

/// Starts the child with clone(CLONE_VM | CLONE_VFORK | `flags`) on a stack
/// of its own: the parent is suspended until the child execs or exits.
/// Returns its pid, or -1 (errno set).
///
/// # Safety
/// The child runs `child_main`, which only makes system calls on data
/// prepared before (nothing allocates or takes a lock that the suspended
/// parent could hold), then execs or `_exit`s.
unsafe fn vfork_spawn(args: &VforkArgs, flags: libc::c_int) -> libc::pid_t {
    const STACK: usize = 256 * 1024;
    // Zeroed allocations this large are fresh mappings: only the pages the
    // child touches are faulted in.
    let mut stack = vec![0u8; STACK];
    // SAFETY: one past the end of the allocation, the top of a stack that
    // grows down: 16-byte aligned, as malloc's blocks are and STACK is a
    // multiple of 16.
    let top = unsafe { stack.as_mut_ptr().add(STACK) };
    // SAFETY: the callback and its argument stay valid until the child
    // execs or exits, which CLONE_VFORK waits for before clone returns.
    unsafe {
        libc::clone(
            vfork_child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | flags | libc::SIGCHLD,
            args as *const VforkArgs as *mut libc::c_void,
        )
    }
}

impl PidNamespace {
    fn is_join(&self) -> bool {
        matches!(self, PidNamespace::Join(_))
    }
}

/// The calling thread's children start in another PID namespace until this
/// is dropped, which returns them to the thread's own.
struct JoinedPidNs(OwnedFd);

impl JoinedPidNs {
    fn enter(ns: &OwnedFd) -> Result<JoinedPidNs, SpawnError> {
        // The namespace this thread lives in (its "active" one), which it
        // may always enter again.
        let own = std::fs::File::open("/proc/thread-self/ns/pid")
            .map_err(|e| SpawnError::setup(format!("/proc/thread-self/ns/pid: {e}")))?;
        // SAFETY: setns on a namespace descriptor we hold.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            return Err(SpawnError::setup(format!(
                "entering the container's PID namespace: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(JoinedPidNs(own.into()))
    }
}

impl Drop for JoinedPidNs {
    fn drop(&mut self) {
        // SAFETY: setns on the thread's own namespace, which it may enter.
        unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWPID) };
    }
}

/// Forks and execs `p` with the given stdio descriptors (child ends).
/// Returns the pid; the process is reaped by the reaper.
pub fn spawn(p: &Prepared, stdio: [RawFd; 3]) -> Result<u32, SpawnError> {
    spawn_io(p, ChildIo::Fds(stdio), None)
}

/// Forks and execs `p` on a new pseudo-terminal of `size`, which becomes its
/// controlling terminal and stdio. Returns the pid and the terminal's master.
pub fn spawn_pty(p: &Prepared, size: WinSize) -> Result<(u32, OwnedFd), SpawnError> {
    let (pid, master) = spawn_with(p, Some(size), [0, 1, 2], None)?;
    let master = master.ok_or_else(|| SpawnError::setup("no terminal"))?;
    Ok((pid, master))
}

/// Work the parent does for a child that exists but has not exec'd yet
/// (e.g. connecting its new network namespace); the child execs only once
/// it returns Ok, and fails with the error's message otherwise.
pub type Gate<'a> = &'a mut dyn FnMut(u32) -> Result<(), Box<dyn std::error::Error>>;

/// [`spawn`] or [`spawn_pty`] (with `tty`), with an optional [`Gate`].
pub fn spawn_with(
    p: &Prepared,
    tty: Option<WinSize>,
    stdio: [RawFd; 3],
    gate: Option<Gate>,
) -> Result<(u32, Option<OwnedFd>), SpawnError> {
    let Some(size) = tty else {
        return spawn_io(p, ChildIo::Fds(stdio), gate).map(|pid| (pid, None));
    };
    let (ours, theirs) =
        sys::socketpair().map_err(|e| SpawnError::setup(format!("socketpair: {e}")))?;
    let pid = spawn_io(
        p,
        ChildIo::Pty {
            sock: theirs.as_raw_fd(),
            size,
        },
        gate,
    )?;
    drop(theirs);
    // The child sent the master before it exec'd, and spawn_io returned only
    // after the exec: it is waiting in the socket.
    let master = sys::recv_fd(&ours)
        .map_err(|e| SpawnError::setup(format!("receiving the terminal: {e}")))?;
    Ok((pid, Some(master)))
}

/// Like [`spawn_with`] on a new pseudo-terminal of `size`, for a process
/// prepared with [`Prepared::gate_after_setup`]: the gate gets the
/// terminal's master as well as the pid, before the process execs (an OCI
/// runtime hands it to its caller's console socket at `create`).
pub fn spawn_pty_gated(
    p: &Prepared,
    size: WinSize,
    gate: &mut dyn FnMut(u32, OwnedFd) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<u32, SpawnError> {
    if !p.gate_after_setup {
        return Err(SpawnError::setup(
            "spawn_pty_gated needs Prepared::gate_after_setup",
        ));
    }
    let (ours, theirs) =
        sys::socketpair().map_err(|e| SpawnError::setup(format!("socketpair: {e}")))?;
    let mut with_master = |pid: u32| -> Result<(), Box<dyn std::error::Error>> {
        // Sent by the child before it reported its setup done, which is
        // when a gate run after setup runs.
        let master = sys::recv_fd(&ours)?;
        gate(pid, master)
    };
    let io = ChildIo::Pty {
        sock: theirs.as_raw_fd(),
        size,
    };
    spawn_io(p, io, Some(&mut with_master))
}

fn spawn_io(p: &Prepared, io: ChildIo, gate: Option<Gate>) -> Result<u32, SpawnError> {
    let ptrs = |v: &[CString]| {
        let mut out: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
        out.push(std::ptr::null());
        out
    };
    let argv = ptrs(&p.argv);
    let envp = ptrs(&p.envp);
    let groups: Vec<libc::gid_t> = p.user.groups.clone();
    let (err_r, err_w) = sys::pipe().map_err(|e| SpawnError::setup(e.to_string()))?;
    let gate_pipe = match gate {
        Some(_) => Some(sys::pipe().map_err(|e| SpawnError::setup(e.to_string()))?),
        None => None,
    };
    let gate_fd = gate_pipe.as_ref().map_or(-1, |(r, _)| r.as_raw_fd());
    let gate_w = gate_pipe.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());

    let gate_fds = [gate_fd, gate_w];
    let new_pid_ns = match p.pid_ns {
        PidNamespace::New => libc::CLONE_NEWPID,
        _ => 0,
    };
    // Joined for the clone below only (by this thread: a PID namespace
    // entered with setns is where the caller's next children start).
    let joined = match &p.pid_ns {
        PidNamespace::Join(ns) => Some(JoinedPidNs::enter(ns)?),
        _ => None,
    };
    let pid = match p.iso.as_ref().map(|i| i.clone_flags).unwrap_or(0) | new_pid_ns {
        // In a microVM (no isolation plan, no gate): share the memory
        // until the exec, as posix_spawn does, instead of copying the page
        // tables and taking a copy-on-write fault for every page either
        // side writes next; each is guest-kernel work that software
        // virtualisation interprets.
        0 | libc::CLONE_NEWPID if gate_fds == [-1, -1] && p.iso.is_none() => {
            let args = VforkArgs {
                p,
                io,
                argv: &argv,
                envp: &envp,
                groups: &groups,
                err_fd: err_w.as_raw_fd(),
            };
            // SAFETY: see vfork_spawn.
            unsafe { vfork_spawn(&args, new_pid_ns) }
        }
        // SAFETY: fork in a multithreaded process: the child below only makes
        // async-signal-safe system calls on data prepared before the fork,
        // then execs or _exits.
        0 => unsafe { libc::fork() },
        // SAFETY: as fork: clone without a new stack or CLONE_VM behaves as
        // fork, with the new namespaces for the child.
        flags => unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as libc::pid_t
        },
    };
    let clone_error = io::Error::last_os_error();
    drop(joined);
    if pid < 0 {
        // A namespace whose PID 1 has exited takes no new process.
        if p.pid_ns.is_join() && clone_error.raw_os_error() == Some(libc::ENOMEM) {
            return Err(SpawnError::setup("the container's main process has exited"));
        }
        return Err(SpawnError::setup(format!("fork (clone): {clone_error}")));
    }
    if pid == 0 {
        // SAFETY: see above; child_main never returns.
        unsafe { child_main(p, io, &argv, &envp, &groups, err_w.as_raw_fd(), gate_fds) }
    }
    drop(err_w);
    let mut gate_failure = None;
    // Waiting for the child's word that its setup is done: a zero byte, or
    // the start of an error report (kept for the read below), or nothing
    // (it died).
    let mut first = None;
    let waited = p.gate_after_setup && gate_pipe.is_some();
    if waited {
        let mut b = [0u8; 1];
        if read_full(&err_r, &mut b) == 1 {
            first = Some(b[0]);
        }
    }
    let child_ready = !waited || first == Some(0);
    if let (Some(gate), Some((r, w)), true) = (gate, gate_pipe, child_ready) {
        drop(r);
        match gate(pid as u32) {
            // The child waits for this byte before it execs.
            Ok(()) => {
                let _ = sys::write_all(w.as_raw_fd(), b"1");
            }
            // Closing the pipe unread makes the child give up.
            Err(e) => gate_failure = Some(e),
        }
    }
    let mut buf = [0u8; 9];
    let n = match first {
        // An error report's first byte, read above.
        Some(step) if step != 0 => {
            buf[0] = step;
            1 + read_full(&err_r, &mut buf[1..])
        }
        // The child died before reaching the gate without a word.
        None if waited => {
            return Err(SpawnError::setup(
                "the container's process ended during its setup",
            ))
        }
        _ => read_full(&err_r, &mut buf),
    };
    // A gate that failed because the child had already failed (its network
    // namespace gone with it) says less than the child's own report.
    if let Some(e) = gate_failure {
        if n == 0 || buf[0] == Step::Gate as u8 {
            return Err(SpawnError::setup(e.to_string()));
        }
    }
    if n == 0 {
        return Ok(pid as u32);
    }
    let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let err = io::Error::from_raw_os_error(errno);
    let prog = p.argv[0].to_string_lossy();
    let kind = match (buf[0], errno) {
        (7, libc::ENOENT) => StartFailure::NotFound,
        (7, libc::EACCES | libc::ENOEXEC | libc::EPERM | libc::EISDIR) => {
            StartFailure::CannotExecute
        }
        _ => StartFailure::Setup,
    };
    let message = if buf[0] == Step::Exec as u8 {
        format!("exec {prog}: {err}")
    } else if buf[0] == Step::Workdir as u8 {
        // Named, as `-w` or the image's WorkingDir is the likely mistake.
        format!(
            "the working directory {} cannot be entered: {err}",
            p.cwd.to_string_lossy()
        )
    } else {
        // The root preparation step that failed, named (a volume mounted
        // onto a file of the image, say).
        let op = u32::from_ne_bytes([buf[5], buf[6], buf[7], buf[8]]);
        let failed = p
            .iso
            .as_ref()
            .and_then(|i| i.ops.get(op as usize))
            .filter(|_| buf[0] == Step::Isolate as u8);
        match failed {
            Some(o) if errno == libc::ENOTDIR && o.kind == 1 => format!(
                "failed to {}: {}: {err} (a directory mounted onto a file, or a file onto a directory?)",
                Step::describe(buf[0]),
                o.what
            ),
            Some(o) => format!("failed to {}: {}: {err}", Step::describe(buf[0]), o.what),
            None => format!("failed to {}: {err}", Step::describe(buf[0])),
        }
    };
    Err(SpawnError { kind, message })
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match sys::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::sync::Mutex;

    /// Tests that fork or write executables run one at a time: a child
    /// forked by another test could hold a fresh executable open for
    /// writing (ETXTBSY), and each test reaps only its own children.
    static FORKS: Mutex<()> = Mutex::new(());

    fn forks() -> std::sync::MutexGuard<'static, ()> {
        FORKS.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(root: &Path, rel: &str, text: &str, mode: u32) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn root_fd(root: &Path) -> OwnedFd {
        OwnedFd::from(fs::File::open(root).unwrap())
    }

    fn spec(args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    fn strings(v: &[CString]) -> Vec<String> {
        v.iter().map(|c| c.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn path_lookup_takes_the_first_executable_in_path_order() {
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        file(d.path(), "a/tool", "x", 0o644);
        file(d.path(), "b/tool", "x", 0o755);
        file(d.path(), "c/tool", "x", 0o755);
        let root = root_fd(d.path());
        // A non-executable match earlier in PATH does not stop the search.
        let found = resolve_executable(&root, "tool", "/a:/b/:/c", "/").unwrap();
        assert_eq!(found, "/b/tool");
        // Only non-executable matches: the first is reported as denied.
        let e = resolve_executable(&root, "tool", "/a:/nowhere", "/").unwrap_err();
        assert_eq!(e.kind, StartFailure::CannotExecute);
        assert_eq!(e.message, "exec: \"/a/tool\": permission denied");
        let e = resolve_executable(&root, "nope", "/a:/b", "/").unwrap_err();
        assert_eq!(e.kind, StartFailure::NotFound);
        assert_eq!(
            e.message,
            "exec: \"nope\": executable file not found in $PATH"
        );
    }

    #[test]
    fn relative_paths_and_empty_path_entries_start_at_the_working_directory() {
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        file(d.path(), "srv/app/run", "x", 0o755);
        let root = root_fd(d.path());
        // An empty PATH entry is the working directory, as for execvp.
        assert_eq!(
            resolve_executable(&root, "run", "/bin::/usr/bin", "/srv/app/").unwrap(),
            "./run"
        );
        assert_eq!(
            resolve_executable(&root, "app/run", "/bin", "/srv").unwrap(),
            "app/run"
        );
        let e = resolve_executable(&root, "./run", "/bin", "/").unwrap_err();
        assert_eq!(e.kind, StartFailure::NotFound);
        assert_eq!(
            e.message,
            "exec: \"./run\": stat ./run: no such file or directory"
        );
    }

    #[test]
    fn directories_are_not_executables() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("bin/tool")).unwrap();
        let e = resolve_executable(&root_fd(d.path()), "tool", "/bin", "/").unwrap_err();
        assert_eq!(e.kind, StartFailure::CannotExecute);
    }

    #[test]
    fn image_symlinks_resolve_inside_the_root() {
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        // An executable outside the root that hostile links point at.
        file(d.path(), "outside/prog", "x", 0o755);
        fs::create_dir_all(root.join("bin")).unwrap();
        symlink("../../outside/prog", root.join("bin/up")).unwrap();
        symlink(d.path().join("outside/prog"), root.join("bin/abs")).unwrap();
        let fd = root_fd(&root);
        for prog in ["up", "abs"] {
            let e = resolve_executable(&fd, prog, "/bin", "/").unwrap_err();
            assert_eq!(e.kind, StartFailure::NotFound, "{prog}");
        }
        let e = resolve_executable(&fd, "../../outside/prog", "/bin", "/").unwrap_err();
        assert_eq!(e.kind, StartFailure::NotFound);
        // An absolute link is followed from the container's root.
        file(&root, "usr/lib/real", "x", 0o755);
        symlink("/usr/lib/real", root.join("bin/sh")).unwrap();
        assert_eq!(
            resolve_executable(&fd, "sh", "/bin", "/").unwrap(),
            "/bin/sh"
        );
    }

    #[test]
    fn clean_path_is_lexical_and_stays_under_the_root() {
        assert_eq!(clean_path("/"), "/");
        assert_eq!(clean_path("/a/b/../c"), "/a/c");
        assert_eq!(clean_path("//a/./b//"), "/a/b");
        assert_eq!(clean_path("/../../etc"), "/etc");
        assert_eq!(clean_path("/a/.."), "/");
    }

    fn passwd_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        file(
            d.path(),
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            0o644,
        );
        file(d.path(), "etc/group", "root:x:0:\nusers:x:100:app\n", 0o644);
        file(d.path(), "bin/sh", "x", 0o755);
        d
    }

    /// The environment without what the agent's own environment may add.
    fn envp(p: &Prepared) -> Vec<String> {
        strings(&p.envp)
            .into_iter()
            .filter(|e| !e.starts_with("GLIBC_TUNABLES="))
            .collect()
    }

    #[test]
    fn prepare_fills_in_path_home_and_the_user() {
        let _g = forks();
        let d = passwd_root();
        let root = d.path().to_str().unwrap();
        let mut s = spec(&["sh", "-c", "true"]);
        s.user = "app".into();
        s.env = vec!["A=1".into()];
        let p = prepare(&s, root).unwrap();
        assert_eq!(p.path.to_str().unwrap(), "/bin/sh");
        assert_eq!(strings(&p.argv), ["sh", "-c", "true"]);
        assert_eq!(
            envp(&p),
            ["A=1", &format!("PATH={DEFAULT_PATH}"), "HOME=/home/app"]
        );
        assert_eq!((p.user.uid, p.user.gid), (1000, 1000));
        assert_eq!(p.user.groups, [1000, 100]);
        assert_eq!(p.cwd.to_str().unwrap(), "/");
        assert!(p.cwd_prefixes.is_empty());

        // The container's own PATH and HOME win; its PATH finds argv[0].
        s.env = vec!["PATH=/nowhere:/bin".into(), "HOME=/srv".into()];
        let p = prepare(&s, root).unwrap();
        assert_eq!(envp(&p), ["PATH=/nowhere:/bin", "HOME=/srv"]);
        s.env = vec!["PATH=/nowhere".into()];
        assert_eq!(
            prepare(&s, root).err().unwrap().kind,
            StartFailure::NotFound
        );
    }

    #[test]
    fn prepare_takes_a_resolution_made_ahead_and_reads_nothing_in_the_root() {
        let _g = forks();
        // A root with neither passwd nor the executable: nothing is read.
        let d = tempfile::tempdir().unwrap();
        let mut s = spec(&["app", "x"]);
        s.user = "app".into();
        s.resolved = Some(vmc_proto::Resolved {
            path: "/opt/app".into(),
            uid: 7,
            gid: 8,
            groups: vec![8, 9],
            home: "/home/app".into(),
        });
        let p = prepare(&s, d.path().to_str().unwrap()).unwrap();
        assert_eq!(p.path.to_str().unwrap(), "/opt/app");
        assert_eq!((p.user.uid, p.user.gid), (7, 8));
        assert_eq!(p.user.groups, [8, 9]);
        assert_eq!(
            envp(&p),
            [&format!("PATH={DEFAULT_PATH}"), "HOME=/home/app"]
        );
        // Without it, the same spec is looked up in the root, and fails.
        s.resolved = None;
        assert!(prepare(&s, d.path().to_str().unwrap()).is_err());
    }

    #[test]
    fn id_files_are_read_up_to_a_bound() {
        let d = tempfile::tempdir().unwrap();
        let line = "app:x:1000:1000::/home/app:/bin/sh\n";
        let big = line.repeat((MAX_ID_FILE as usize) / line.len() + 100);
        file(d.path(), "etc/passwd", &big, 0o644);
        let read = read_in_root_path(d.path(), "/etc/passwd");
        assert_eq!(read.len() as u64, MAX_ID_FILE);
        assert!(read.starts_with(line));
        assert_eq!(read_in_root_path(&d.path().join("none"), "/etc/passwd"), "");
    }

    #[test]
    fn prepare_cleans_the_working_directory() {
        let _g = forks();
        let d = passwd_root();
        let mut s = spec(&["/bin/sh"]);
        s.cwd = "/srv/app/../data/./x/".into();
        let p = prepare(&s, d.path().to_str().unwrap()).unwrap();
        assert_eq!(p.cwd.to_str().unwrap(), "/srv/data/x");
        assert_eq!(
            strings(&p.cwd_prefixes),
            ["/srv", "/srv/data", "/srv/data/x"]
        );
    }

    #[test]
    fn prepare_rejects_bad_specs() {
        let _g = forks();
        let d = passwd_root();
        let root = d.path().to_str().unwrap();
        let msg = |s: &ProcessSpec, root: &str| {
            let e = prepare(s, root).err().unwrap();
            (e.kind, e.message)
        };
        assert_eq!(
            msg(&spec(&[]), root),
            (StartFailure::Setup, "no command given".into())
        );
        let mut s = spec(&["/bin/sh"]);
        s.cwd = "srv".into();
        assert_eq!(
            msg(&s, root),
            (
                StartFailure::Setup,
                "the working directory 'srv' is invalid, it needs to be an absolute path".into()
            )
        );
        let s = spec(&["/bin/sh", "a\0b"]);
        assert_eq!(
            msg(&s, root),
            (StartFailure::Setup, "argument contains a NUL byte".into())
        );
        let mut s = spec(&["/bin/sh"]);
        s.user = "nobody".into();
        assert_eq!(msg(&s, root).0, StartFailure::Setup);
        let missing = d.path().join("missing");
        let (kind, m) = msg(&spec(&["/bin/sh"]), missing.to_str().unwrap());
        assert_eq!(kind, StartFailure::Setup);
        assert!(m.starts_with(&format!("container root {}: ", missing.display())));
        let iso = Isolation {
            hostname: Some("a\0b".into()),
            ..Default::default()
        };
        let e = prepare_isolated(&spec(&["/bin/sh"]), root, root, &iso)
            .err()
            .unwrap();
        assert_eq!(e.kind, StartFailure::Setup);
    }

    /// Prepares `args` to run on the host itself (no pivot), as root.
    fn on_host(args: &[&str], cwd: &str) -> Prepared {
        let mut s = spec(args);
        s.cwd = cwd.into();
        s.env = vec!["PATH=/usr/bin:/bin".into()];
        let iso = Isolation {
            in_root: true,
            ..Default::default()
        };
        prepare_isolated(&s, "/", "/", &iso).unwrap()
    }

    fn wait(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: status is a valid out pointer; pid is our own child.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(r, pid as libc::pid_t);
        status
    }

    /// Runs `p` with stdin on /dev/null; returns its stdout and raw status.
    fn run(p: &Prepared) -> Result<(String, i32), SpawnError> {
        let null = OwnedFd::from(fs::File::open("/dev/null").unwrap());
        let (out_r, out_w) = sys::pipe().unwrap();
        let pid = spawn(p, [null.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()])?;
        drop(out_w);
        let out = io::read_to_string(fs::File::from(out_r)).unwrap();
        Ok((out, wait(pid)))
    }

    #[test]
    fn spawned_process_gets_args_env_cwd_and_exit_code() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        let cwd = d.path().join("w/b/../c");
        let p = on_host(
            &["sh", "-c", "echo \"$0 $HOME $PATH\"; pwd; exit 7", "zero"],
            cwd.to_str().unwrap(),
        );
        let (out, status) = run(&p).unwrap();
        // The working directory is created, cleaned ("b/.." gone).
        let want = d.path().join("w/c");
        assert_eq!(
            out,
            format!("zero /root /usr/bin:/bin\n{}\n", want.display())
        );
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
        assert!(!d.path().join("w/b").exists());
    }

    #[test]
    fn exec_and_setup_failures_are_reported_with_their_step() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        // Executable bits on something the kernel cannot run: ENOEXEC.
        file(d.path(), "junk", "not a program\n", 0o755);
        let junk = d.path().join("junk");
        let p = on_host(&[junk.to_str().unwrap()], "/");
        let e = run(&p).err().unwrap();
        assert_eq!(e.kind, StartFailure::CannotExecute);
        assert_eq!(
            e.message,
            format!("exec {}: Exec format error (os error 8)", junk.display())
        );
        // A working directory under a regular file cannot be entered.
        let cwd = junk.join("sub");
        let e = run(&on_host(&["true"], cwd.to_str().unwrap()))
            .err()
            .unwrap();
        assert_eq!(e.kind, StartFailure::Setup);
        assert_eq!(
            e.message,
            format!(
                "the working directory {} cannot be entered: Not a directory (os error 20)",
                cwd.display()
            )
        );
    }

    #[test]
    fn the_gate_decides_whether_the_child_execs() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("ran");
        let cmd = format!("echo > {}", marker.display());
        let p = on_host(&["sh", "-c", &cmd], "/");
        let mut seen = 0;
        let mut refuse = |pid: u32| {
            seen = pid;
            Err("no network for you".into())
        };
        let e = spawn_with(&p, None, [0, 1, 2], Some(&mut refuse))
            .err()
            .unwrap();
        assert_eq!(e.kind, StartFailure::Setup);
        assert_eq!(e.message, "no network for you");
        // The child gave up before exec: exit 127, nothing ran.
        let status = wait(seen);
        assert_eq!(libc::WEXITSTATUS(status), 127);
        assert!(!marker.exists());

        let mut seen = 0;
        let mut allow = |pid: u32| {
            seen = pid;
            Ok(())
        };
        let (pid, master) = spawn_with(&p, None, [0, 1, 2], Some(&mut allow)).unwrap();
        assert!(master.is_none());
        assert_eq!(pid, seen);
        assert_eq!(wait(pid), 0);
        assert!(marker.exists());
    }

    #[test]
    fn pty_process_has_a_sized_controlling_terminal() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let p = on_host(
            &["sh", "-c", "test -t 0 && test -t 1 && stty size && exit 3"],
            "/",
        );
        let (pid, master) = spawn_pty(
            &p,
            WinSize {
                rows: 30,
                cols: 100,
            },
        )
        .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        // The master reads EIO once the last slave descriptor is closed.
        while let Ok(n @ 1..) = sys::read(master.as_raw_fd(), &mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&out), "30 100\r\n");
        assert_eq!(libc::WEXITSTATUS(wait(pid)), 3);
    }

    /// Runs `f` on a thread of its own whose mount namespace is its own
    /// and private: what it mounts is seen nowhere else and goes with it.
    fn in_private_mounts<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            sys::unshare_mounts(libc::CLONE_FS).unwrap();
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    #[test]
    fn process_runs_pivoted_into_the_root_as_its_user() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let d = passwd_root();
        let root = d.path().to_path_buf();
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        file(&root, "marker", "inside\n", 0o644);
        let script = "/bin/busybox cat /marker; /bin/busybox id -u; \
                      /bin/busybox pwd; echo $HOME; /bin/busybox ls /tmp";
        let mut s = spec(&["/bin/busybox", "sh", "-c", script]);
        s.user = "app".into();
        s.cwd = "/work/dir".into();
        // The root bound onto itself, in a mount namespace of this thread
        // alone.
        let out = in_private_mounts(move || {
            let r = root.to_str().unwrap();
            sys::mount(Some(r), r, None, libc::MS_BIND, None).unwrap();
            let p = prepare(&s, r).unwrap();
            run(&p).unwrap()
        });
        // The host's /tmp is not visible: the root has none.
        assert_eq!(
            out.0,
            "inside\n1000\n/work/dir\n/home/app\nls: /tmp: No such file or directory\n"
        );
        assert_eq!(libc::WEXITSTATUS(out.1), 1);
        assert!(d.path().join("work/dir").is_dir());
    }

    /// A workload started in a new PID namespace is its PID 1 and sees its
    /// own /proc; a process joining the namespace sees the same; a signal
    /// the workload has no handler for does not end it (Docker's PID 1).
    #[test]
    fn a_workload_is_pid_1_of_a_namespace_that_execs_join() {
        if !crate::testing::root() {
            return;
        }
        let _g = forks();
        let d = passwd_root();
        let root = d.path().to_path_buf();
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        // The new namespace's /proc is mounted in this thread's own mount
        // namespace.
        let out = in_private_mounts(move || {
            let r = root.to_str().unwrap();
            let (ready_r, ready_w) = sys::pipe().unwrap();
            let null = OwnedFd::from(fs::File::open("/dev/null").unwrap());
            let script = "echo $$ >&2; /bin/busybox sleep 1000";
            let mut p = prepare(&spec(&["/bin/busybox", "sh", "-c", script]), r).unwrap();
            p.set_pid_namespace(PidNamespace::New);
            let io = [null.as_raw_fd(), null.as_raw_fd(), ready_w.as_raw_fd()];
            let workload = spawn(&p, io).unwrap();
            drop(ready_w);
            let mut first = [0u8; 2];
            assert_eq!(read_full(&ready_r, &mut first), 2);
            // The shell said its pid before it exec'd sleep: wait for the
            // exec (meanwhile PID 1's cmdline is the shell's, or empty).
            let cmdline = format!("/proc/{workload}/cmdline");
            for _ in 0..10_000 {
                if fs::read(&cmdline)
                    .unwrap_or_default()
                    .starts_with(b"/bin/busybox\0sleep")
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let ns = OwnedFd::from(fs::File::open(format!("/proc/{workload}/ns/pid")).unwrap());
            // Ignored by PID 1 without a handler (it would end it otherwise).
            // SAFETY: kill takes plain integers; workload is our child.
            unsafe { libc::kill(workload as i32, libc::SIGTERM) };
            let script = "echo $$; /bin/busybox cat /proc/1/cmdline | /bin/busybox tr '\\0' ' '";
            let mut p = prepare(&spec(&["/bin/busybox", "sh", "-c", script]), r).unwrap();
            p.set_pid_namespace(PidNamespace::Join(ns.try_clone().unwrap()));
            let (joined, status) = run(&p).unwrap();
            assert_eq!(libc::WEXITSTATUS(status), 0);
            // SAFETY: as above.
            unsafe { libc::kill(workload as i32, libc::SIGKILL) };
            let ended = wait(workload);
            let mut p = prepare(&spec(&["/bin/busybox", "true"]), r).unwrap();
            p.set_pid_namespace(PidNamespace::Join(ns));
            let late = run(&p).map(|_| ()).unwrap_err().message;
            // The thread's own namespace is back: its children are not
            // started in the container's.
            let (out_r, out_w) = sys::pipe().unwrap();
            let p = prepare(&spec(&["/bin/busybox", "sh", "-c", "echo $$"]), r).unwrap();
            let pid = spawn(&p, [null.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()]).unwrap();
            drop(out_w);
            let said = io::read_to_string(fs::File::from(out_r)).unwrap();
            wait(pid);
            let mine = said.trim() == pid.to_string();
            (first, joined, ended, late, mine)
        });
        let (first, joined, ended, late, mine) = out;
        assert_eq!(&first, b"1\n");
        let mut lines = joined.lines();
        let exec_pid: u32 = lines.next().unwrap().parse().unwrap();
        assert!(exec_pid > 1, "{joined}");
        // The shell exec'd its last command.
        assert_eq!(lines.next(), Some("/bin/busybox sleep 1000 "));
        assert!(
            libc::WIFSIGNALED(ended) && libc::WTERMSIG(ended) == libc::SIGKILL,
            "{ended:#x}"
        );
        assert_eq!(late, "the container's main process has exited");
        assert!(mine, "a later child started in the container's namespace");
    }
}
