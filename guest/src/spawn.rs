//! Starting a workload process inside the container root: its own mount
//! namespace, pivot_root into the assembled root, then user, cwd, execve.
//!
//! Written on fork/execve rather than `std::process::Command` because PID 1's
//! reaper collects every child with `waitpid(-1)`, while `Command::spawn`
//! itself waits for a child whose exec failed and asserts that this wait
//! succeeds, which races with the reaper. Everything is prepared before the
//! fork; the child only makes system calls.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

use crate::{ProcessSpec, StartFailure, WinSize};

use crate::sys::{self, check, cstr};
use crate::user::{self, ExecUser};

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

/// One step of preparing a container's root in the child, before it pivots
/// into it (namespace mode). The paths of `Mkdir`, `Touch`, a `Symlink`'s
/// link and a `Mount`'s target are inside the root, absolute as the
/// container sees them (`/dev/pts`), and resolve inside it (openat2 with
/// RESOLVE_IN_ROOT): a symlink of the image (`/etc -> /some/host/dir`) never
/// leads a step out onto the host. A `Mount`'s source is a host path unless
/// `source_in_root`; a `Write`'s path is a host path.
#[derive(Debug, Clone)]
pub enum RootOp {
    Mkdir(String, u32),
    /// mount(2); `optional` steps may fail (a path the image lacks).
    Mount {
        source: String,
        /// The source is a path inside the root (a bind of a part of it).
        source_in_root: bool,
        target: String,
        fstype: String,
        flags: libc::c_ulong,
        data: String,
        optional: bool,
    },
    Symlink {
        target: String,
        link: String,
    },
    /// An empty file to bind-mount onto.
    Touch(String),
    /// Write `data` to an existing file (joining a cgroup: `0` to its
    /// `cgroup.procs`).
    Write {
        path: String,
        data: String,
    },
}

/// How a container started on the host is confined (namespace mode). The
/// microVM needs none of this: the VM is the boundary.
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// Namespaces for the new process (`CLONE_NEWPID | CLONE_NEWUTS | ...`);
    /// with CLONE_NEWPID the workload is PID 1 of its namespace.
    pub clone_flags: libc::c_int,
    /// Root preparation, run in the child's own mount namespace.
    pub ops: Vec<RootOp>,
    pub hostname: Option<String>,
    /// Bring the loopback interface up (a new network namespace has it down).
    pub loopback_up: bool,
    /// Capabilities kept (bit n = capability n); all others are dropped from
    /// the bounding, permitted and effective sets (the inheritable set is
    /// emptied).
    pub keep_caps: Option<u64>,
    pub no_new_privs: bool,
    /// Already in the container's mount namespace, at its root (`vmc exec`
    /// after setns): no new mount namespace, no pivot.
    pub in_root: bool,
    /// The child is not dumpable until it execs the workload: a process of
    /// the container cannot open its /proc/PID/exe (vmc's binary) or
    /// ptrace it meanwhile. (Not in a user namespace vmc made: there the
    /// parent would lose access to the child's /proc files.)
    pub non_dumpable: bool,
    /// seccomp filters installed, in order, right before the workload's
    /// execve (with `no_new_privs`, which they require); the kernel applies
    /// all of them to every system call and the most restrictive answer wins.
    pub seccomp: Vec<SeccompProgram>,
}

/// One classic-BPF seccomp program (see seccomp(2)), compiled by the caller.
#[derive(Clone, Default)]
pub struct SeccompProgram(pub Vec<libc::sock_filter>);

impl std::fmt::Debug for SeccompProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeccompProgram({} instructions)", self.0.len())
    }
}

/// Docker's default capability set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP.
pub const DOCKER_DEFAULT_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// The highest capability number the kernel may know (CAP_LAST_CAP is 40 in 6.x).
const MAX_CAP: u32 = 63;

/// A [`RootOp`] as the child carries it out, allocated before the fork.
/// In-root paths are relative to the root (`dev/pts`), split into their
/// directory (`dir`, "" for the root itself) and last `name`.
struct PreparedOp {
    kind: u8, // 0 mkdir, 1 mount, 2 symlink, 3 touch, 4 write
    /// mkdir, touch, symlink: the directory and name of the path in the root;
    /// mount: the target and (in root) source; write: the host path in `a`.
    a: CString,
    b: CString,
    dir: CString,
    name: CString,
    /// mount: fstype and data; symlink: the link's content in `c`.
    c: CString,
    d: CString,
    flags: libc::c_ulong,
    mode: u32,
    optional: bool,
    source_in_root: bool,
}

/// `path` inside the root, relative to it: `/dev/pts` -> `dev/pts`.
fn in_root(path: &str) -> io::Result<CString> {
    let rel = path.trim_start_matches('/');
    cstr(if rel.is_empty() { "." } else { rel })
}

/// The directory and last name of a path in the root; the name must be an
/// ordinary one.
fn split_in_root(path: &str) -> io::Result<(CString, CString)> {
    let rel = path.trim_start_matches('/').trim_end_matches('/');
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    if matches!(name, "" | "." | "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{path}' does not name an entry of the root"),
        ));
    }
    Ok((cstr(if dir.is_empty() { "." } else { dir })?, cstr(name)?))
}

struct PreparedIsolation {
    clone_flags: libc::c_int,
    /// unshare(CLONE_NEWCGROUP) after the root ops (which join cgroups).
    cgroupns: bool,
    ops: Vec<PreparedOp>,
    hostname: Option<CString>,
    loopback_up: bool,
    keep_caps: Option<u64>,
    no_new_privs: bool,
    in_root: bool,
    non_dumpable: bool,
    seccomp: Vec<SeccompProgram>,
}

fn prepare_isolation(iso: &Isolation) -> io::Result<PreparedIsolation> {
    // Without no_new_privs the kernel takes a filter only from a process
    // with CAP_SYS_ADMIN, which the child has dropped by then.
    if !iso.seccomp.is_empty() && !iso.no_new_privs {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a seccomp filter needs no_new_privs",
        ));
    }
    if let Some(p) = iso
        .seccomp
        .iter()
        .find(|p| p.0.is_empty() || p.0.len() > 4096)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a seccomp program of {} instructions (1 to 4096)",
                p.0.len()
            ),
        ));
    }
    let empty = || CString::new("").expect("no NUL");
    let op = |kind: u8| PreparedOp {
        kind,
        a: empty(),
        b: empty(),
        dir: empty(),
        name: empty(),
        c: empty(),
        d: empty(),
        flags: 0,
        mode: 0,
        optional: false,
        source_in_root: false,
    };
    let ops = iso
        .ops
        .iter()
        .map(|o| {
            Ok(match o {
                RootOp::Mkdir(p, mode) => {
                    let (dir, name) = split_in_root(p)?;
                    PreparedOp {
                        dir,
                        name,
                        mode: *mode,
                        ..op(0)
                    }
                }
                RootOp::Mount {
                    source,
                    source_in_root,
                    target,
                    fstype,
                    flags,
                    data,
                    optional,
                } => PreparedOp {
                    a: in_root(target)?,
                    b: if *source_in_root {
                        in_root(source)?
                    } else {
                        cstr(source)?
                    },
                    c: cstr(fstype)?,
                    d: cstr(data)?,
                    flags: *flags,
                    optional: *optional,
                    source_in_root: *source_in_root,
                    ..op(1)
                },
                RootOp::Symlink { target, link } => {
                    let (dir, name) = split_in_root(link)?;
                    PreparedOp {
                        dir,
                        name,
                        c: cstr(target)?,
                        optional: true,
                        ..op(2)
                    }
                }
                RootOp::Write { path, data } => PreparedOp {
                    a: cstr(path)?,
                    b: CString::new(data.as_bytes()).map_err(io::Error::other)?,
                    ..op(4)
                },
                RootOp::Touch(p) => {
                    let (dir, name) = split_in_root(p)?;
                    PreparedOp {
                        dir,
                        name,
                        mode: 0o644,
                        optional: true,
                        ..op(3)
                    }
                }
            })
        })
        .collect::<io::Result<_>>()?;
    Ok(PreparedIsolation {
        // A new cgroup namespace is made in the child once it has joined
        // its cgroups (the first ops), so that they are its root, as in
        // Docker; made at clone time, the root would be vmc's cgroup.
        clone_flags: iso.clone_flags & !libc::CLONE_NEWCGROUP,
        cgroupns: iso.clone_flags & libc::CLONE_NEWCGROUP != 0,
        ops,
        hostname: iso.hostname.as_deref().map(cstr).transpose()?,
        loopback_up: iso.loopback_up,
        keep_caps: iso.keep_caps,
        no_new_privs: iso.no_new_privs,
        in_root: iso.in_root,
        non_dumpable: iso.non_dumpable,
        seccomp: iso.seccomp.clone(),
    })
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Opens `path` inside `root` (symlinks resolve within the root) as O_PATH.
fn open_in_root(root: &OwnedFd, path: &str, flags: u64) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: open_how is plain data; all-zero is valid (and required for unused fields).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags | libc::O_CLOEXEC as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: p is NUL-terminated and how is a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: openat2 returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_in_root(root: &OwnedFd, path: &str) -> String {
    open_in_root(root, path, libc::O_RDONLY as u64)
        .map(|fd| std::io::read_to_string(std::fs::File::from(fd)).unwrap_or_default())
        .unwrap_or_default()
}

/// Looks up argv\[0\] as execvp would, but inside `root`.
/// Finds `prog` as execve will (relative paths from the working directory
/// `cwd`, where the child execs), checking inside the container's root.
fn resolve_executable(
    root: &OwnedFd,
    prog: &str,
    path_var: &str,
    cwd: &str,
) -> Result<String, SpawnError> {
    let not_found = || SpawnError {
        kind: StartFailure::NotFound,
        message: if prog.contains('/') {
            format!("exec: \"{prog}\": stat {prog}: no such file or directory")
        } else {
            format!("exec: \"{prog}\": executable file not found in $PATH")
        },
    };
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.to_string()]
    } else {
        path_var
            .split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
            .collect()
    };
    let mut denied = None;
    for c in candidates {
        let in_root = if c.starts_with('/') {
            c.clone()
        } else {
            format!("{}/{c}", cwd.trim_end_matches('/'))
        };
        let Ok(fd) = open_in_root(root, &in_root, libc::O_PATH as u64) else {
            continue;
        };
        // SAFETY: stat is plain data filled by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open; st is a valid out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            continue;
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0 {
            return Ok(c);
        }
        denied.get_or_insert(c);
    }
    match denied {
        Some(c) => Err(SpawnError {
            kind: StartFailure::CannotExecute,
            message: format!("exec: \"{c}\": permission denied"),
        }),
        None => Err(not_found()),
    }
}

/// Lexically cleans an absolute path: no `.`, `..` or empty components;
/// `..` at the root stays at the root.
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
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
}

/// Validates `spec` against the container root and prepares it for [`spawn`].
pub fn prepare(spec: &ProcessSpec, root: &str) -> Result<Prepared, SpawnError> {
    if spec.args.is_empty() {
        return Err(SpawnError::setup("no command given"));
    }
    let root_fd = std::fs::File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| SpawnError::setup(format!("container root {root}: {e}")))?;
    let user = user::resolve(
        &spec.user,
        &read_in_root(&root_fd, "/etc/passwd"),
        &read_in_root(&root_fd, "/etc/group"),
    )
    .map_err(|e| SpawnError::setup(e.to_string()))?;
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
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };
    if !cwd.starts_with('/') {
        return Err(SpawnError::setup(format!(
            "the working directory '{cwd}' is invalid, it needs to be an absolute path"
        )));
    }
    // As Docker cleans WorkingDir: the directories created below and the
    // chdir must name the same place ("/a/b/../c" is /a/c).
    let cwd = &clean_path(cwd);
    let path = resolve_executable(&root_fd, &spec.args[0], &path_var, cwd)?;
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

    let pid = match p.iso.as_ref().map(|i| i.clone_flags).unwrap_or(0) {
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
    if pid < 0 {
        return Err(SpawnError::setup(format!(
            "fork (clone): {}",
            io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        // SAFETY: see above; child_main never returns.
        unsafe {
            child_main(
                p,
                io,
                &argv,
                &envp,
                &groups,
                err_w.as_raw_fd(),
                [gate_fd, gate_w],
            )
        }
    }
    drop(err_w);
    let mut gate_failure = None;
    if let (Some(gate), Some((r, w))) = (gate, gate_pipe) {
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
    let mut buf = [0u8; 5];
    let n = read_full(&err_r, &mut buf);
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
    } else {
        format!("failed to {}: {err}", Step::describe(buf[0]))
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

/// The forked child. Only system calls from here on.
///
/// # Safety
/// Must only be called in the child right after fork.
unsafe fn child_main(
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
        let msg = [step as u8, e[0], e[1], e[2], e[3]];
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
        // The agent blocks SIGCHLD; the workload starts with an empty mask.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
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
            let mut go = 0u8;
            if libc::read(gate_fd, (&mut go as *mut u8).cast(), 1) != 1 {
                *libc::__errno_location() = libc::ECANCELED;
                fail(Step::Gate);
            }
        }
        // Nothing but stdio crosses into the workload, whatever the
        // parent held open (the error pipe closes with the exec).
        if sys::cloexec_from_3() < 0 {
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
        libc::execve(p.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(Step::Exec)
    }
}

/// Makes `stdio` the child's descriptors 0, 1 and 2. Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
unsafe fn install_stdio(stdio: [RawFd; 3]) -> libc::c_int {
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

/// In the child, a session leader inside the container root: opens a new
/// pseudo-terminal from the root's /dev/ptmx, sends the master over `sock`,
/// and makes the slave its controlling terminal and stdio, sized `size` and
/// owned by the user the process will run as. Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
unsafe fn open_terminal(sock: RawFd, size: WinSize, uid: libc::uid_t) -> libc::c_int {
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

/// openat2 with RESOLVE_IN_ROOT: `path` (relative) inside the directory
/// `root`, its symlinks and `..` confined to it. -1 on failure.
///
/// # Safety
/// Child after fork only (a system call on prepared data).
unsafe fn open_in_root_raw(root: RawFd, path: &CString, flags: libc::c_int) -> libc::c_int {
    // SAFETY: open_how is plain data (all-zero valid); path is NUL-terminated.
    unsafe {
        let mut how: libc::open_how = std::mem::zeroed();
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT;
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as libc::c_int
    }
}

/// Runs `f` on the directory of `op`'s path, opened inside the root.
///
/// # Safety
/// Child after fork only.
unsafe fn at_dir(
    root: RawFd,
    op: &PreparedOp,
    f: impl FnOnce(RawFd) -> libc::c_int,
) -> libc::c_int {
    // SAFETY: system calls on a descriptor opened here.
    unsafe {
        let dir = open_in_root_raw(root, &op.dir, libc::O_PATH | libc::O_DIRECTORY);
        if dir < 0 {
            return -1;
        }
        let r = f(dir);
        let errno = *libc::__errno_location();
        libc::close(dir);
        *libc::__errno_location() = errno;
        r
    }
}

/// `/proc/self/fd/N` for descriptor `fd`, NUL-terminated in `buf`: the path
/// through which mount(2) reaches exactly the file opened.
fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut n = fd as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

/// A mount step: its target (and an in-root source) opened inside the root
/// first, then mounted through `/proc/self/fd`, so that the kernel never
/// walks an image's path itself. Each step opens its target afresh, so a
/// remount reaches the mount a previous step stacked there.
///
/// # Safety
/// Child after fork only.
unsafe fn mount_in_root(root: RawFd, op: &PreparedOp) -> libc::c_int {
    // SAFETY: system calls on descriptors opened here and prepared strings.
    unsafe {
        let target = open_in_root_raw(root, &op.a, libc::O_PATH);
        if target < 0 {
            return -1;
        }
        let mut source = -1;
        if op.source_in_root {
            source = open_in_root_raw(root, &op.b, libc::O_PATH);
            if source < 0 {
                libc::close(target);
                return -1;
            }
        }
        let (mut tbuf, mut sbuf) = ([0u8; 32], [0u8; 32]);
        let opt = |c: &CString| {
            if c.is_empty() {
                std::ptr::null()
            } else {
                c.as_ptr()
            }
        };
        let src = if source >= 0 {
            fd_path(source, &mut sbuf)
        } else {
            opt(&op.b)
        };
        let r = libc::mount(
            src,
            fd_path(target, &mut tbuf),
            opt(&op.c),
            op.flags,
            opt(&op.d).cast(),
        );
        let errno = *libc::__errno_location();
        libc::close(target);
        if source >= 0 {
            libc::close(source);
        }
        *libc::__errno_location() = errno;
        r
    }
}

/// In the child, in its own mount namespace: runs the root preparation,
/// sets the hostname and brings loopback up. Returns -1 on failure (errno set).
///
/// # Safety
/// Child after fork only: system calls on prepared data.
unsafe fn isolate_root(iso: &PreparedIsolation, root: RawFd) -> libc::c_int {
    // SAFETY: system calls on NUL-terminated strings prepared before the fork.
    unsafe {
        // A container on the host dies with the vmc process that supervises
        // it, even when that process is killed with SIGKILL.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return -1;
        }
        for op in &iso.ops {
            let r = match op.kind {
                0 => at_dir(root, op, |dir| {
                    let r = libc::mkdirat(dir, op.name.as_ptr(), op.mode as libc::mode_t);
                    if r < 0 && *libc::__errno_location() == libc::EEXIST {
                        0
                    } else {
                        r
                    }
                }),
                1 => mount_in_root(root, op),
                2 => at_dir(root, op, |dir| {
                    libc::symlinkat(op.c.as_ptr(), dir, op.name.as_ptr())
                }),
                4 => {
                    let fd = libc::open(op.a.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        -1
                    } else {
                        let data = op.b.as_bytes();
                        let n = libc::write(fd, data.as_ptr().cast(), data.len());
                        libc::close(fd);
                        if n == data.len() as isize {
                            0
                        } else {
                            -1
                        }
                    }
                }
                _ => at_dir(root, op, |dir| {
                    let fd = libc::openat(
                        dir,
                        op.name.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                        op.mode as libc::c_uint,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd.min(0)
                }),
            };
            if r < 0 && !op.optional {
                return -1;
            }
        }
        if iso.cgroupns && libc::unshare(libc::CLONE_NEWCGROUP) < 0 {
            return -1;
        }
        if let Some(h) = &iso.hostname {
            if libc::sethostname(h.as_ptr(), h.as_bytes().len()) < 0 {
                return -1;
            }
        }
        if iso.loopback_up {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return -1;
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                req.ifr_name[i] = *b as libc::c_char;
            }
            let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) >= 0 && {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) >= 0
            };
            libc::close(fd);
            if !ok {
                return -1;
            }
        }
        0
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// In the child, after pivoting, before switching user: drops every
/// capability outside `keep_caps` (bounding set first, then the process's
/// sets). Returns -1 on failure.
///
/// # Safety
/// Child after fork only.
unsafe fn confine(iso: &PreparedIsolation) -> libc::c_int {
    let Some(keep) = iso.keep_caps else { return 0 };
    // SAFETY: prctl and capset on plain data.
    unsafe {
        for cap in 0..=MAX_CAP {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return -1;
            }
        }
        let header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let lo = keep as u32;
        let hi = (keep >> 32) as u32;
        // The inheritable set is empty, as Docker's since 20.10.14
        // (CVE-2022-24769): a file with inheritable file capabilities gets
        // nothing from it across execve.
        let data = [
            CapData {
                effective: lo,
                permitted: lo,
                inheritable: 0,
            },
            CapData {
                effective: hi,
                permitted: hi,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0 {
            return -1;
        }
        0
    }
}

/// The child's own mount namespace, pivoted into the container root.
///
/// # Safety
/// Child after fork only.
unsafe fn enter_root(p: &Prepared) -> Result<(), Step> {
    // SAFETY: system calls on NUL-terminated data prepared before the fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) < 0 {
            return Err(Step::Namespace);
        }
        let root_c = c"/";
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
            "failed to enter the working directory: Not a directory (os error 20)"
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
        // pivot_root needs the root to be a mount point: bind it onto
        // itself, in a mount namespace of this thread alone.
        let out = std::thread::spawn(move || {
            // SAFETY: unshare and mount on NUL-terminated strings; this
            // thread's mount namespace becomes its own.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0);
                let none = std::ptr::null();
                assert_eq!(
                    libc::mount(
                        none,
                        c"/".as_ptr(),
                        none,
                        libc::MS_REC | libc::MS_PRIVATE,
                        none.cast()
                    ),
                    0
                );
            }
            let r = root.to_str().unwrap();
            sys::mount(Some(r), r, None, libc::MS_BIND, None).unwrap();
            let p = prepare(&s, r).unwrap();
            run(&p).unwrap()
        })
        .join()
        .unwrap();
        // The host's /tmp is not visible: the root has none.
        assert_eq!(
            out.0,
            "inside\n1000\n/work/dir\n/home/app\nls: /tmp: No such file or directory\n"
        );
        assert_eq!(libc::WEXITSTATUS(out.1), 1);
        assert!(d.path().join("work/dir").is_dir());
    }
}
