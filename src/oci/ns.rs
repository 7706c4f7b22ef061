//! A bundle's container in namespace mode, with runc's process model: the
//! container's process is the workload itself (PID 1 of its namespace),
//! made by `create` and waiting before its execve until `start`; nothing of
//! vmc stays its parent, so the caller (conmon, containerd's shim: child
//! subreapers) waits for it and gets its exit status.
//!
//! `create` forks a holder, which prepares the namespaces, mounts and
//! cgroups, spawns the process with a gate, reports the pid once the
//! process waits at the gate, then waits for `start` on the container's
//! `start.sock`. `start` connects; the holder opens the gate, answers once
//! the process exec'd (or why it could not), and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{bail, Context, Result};
use vmc_spawn::Isolation;

use super::bundle::Bundle;
use super::state::{self, Record};
use super::CreateOpts;

/// Creates the container `id` of bundle `b` in `dir` (made, empty, by the
/// caller): returns once its process waits for `start`, with its record
/// written.
pub fn create(dir: &Path, id: &str, b: &Bundle, opts: &CreateOpts) -> Result<Record> {
    if b.hostname.is_some() && b.clone_flags & libc::CLONE_NEWUTS == 0 {
        bail!("a hostname needs a UTS namespace of the container's own (linux.namespaces)");
    }
    let (holder, ok) = fork_holder(dir, |listener, report| {
        match hold(id, b, opts, listener, report) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    })?;
    let mut f = ok.split_whitespace();
    let pid: i32 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let pid_start: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let cgroups = f.map(std::path::PathBuf::from).collect();
    Ok(Record {
        id: id.to_string(),
        bundle: b.dir.clone(),
        rootfs: b.root.clone(),
        mode: crate::runtime::Mode::Ns,
        pid,
        pid_start,
        holder,
        created: state::now_rfc3339(),
        annotations: b.annotations.clone(),
        cgroups,
    })
}

/// Forks the holder of a container being created in `dir` (both modes):
/// `hold` runs in it with the listener of `start.sock` and the write end
/// of the report pipe, and returns its exit code. This process reads the
/// one report line and returns the holder's pid and what follows `ok `;
/// an `err WHY` line (or none: the holder ended) is `create`'s error.
pub fn fork_holder(
    dir: &Path,
    hold: impl FnOnce(UnixListener, OwnedFd) -> i32,
) -> Result<(i32, String)> {
    let listener = UnixListener::bind(dir.join("start.sock"))
        .with_context(|| format!("{}: a socket for start", dir.display()))?;
    std::fs::write(dir.join(state::CREATED), "").context("marking the container created")?;
    let (report_r, report_w) = vmc_spawn::sys::pipe().context("a pipe")?;
    // SAFETY: vmc-runtime is single-threaded here (nothing started a
    // thread before the command ran), so the child may go on as Rust code.
    let holder = unsafe { libc::fork() };
    if holder < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if holder == 0 {
        drop(report_r);
        let code = hold(listener, report_w);
        // SAFETY: leaving the forked holder without running the parent's
        // exit handlers twice.
        unsafe { libc::_exit(code) };
    }
    drop(report_w);
    drop(listener);
    // One line: the process waiting at its gate holds the pipe open too.
    let mut report = String::new();
    let _ = BufReader::new(std::fs::File::from(report_r).take(64 << 10)).read_line(&mut report);
    let Some(ok) = report.strip_prefix("ok ") else {
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(holder, std::ptr::null_mut(), 0) };
        let why = report.strip_prefix("err ").unwrap_or(&report).trim();
        if why.is_empty() {
            bail!("the container's holder ended without a word");
        }
        bail!("{why}");
    };
    Ok((holder, ok.to_string()))
}

/// The holder: runs in the process `create` forked, reports on `report`.
fn hold(
    id: &str,
    b: &Bundle,
    opts: &CreateOpts,
    listener: UnixListener,
    report: OwnedFd,
) -> Result<()> {
    let mut report = Some(std::fs::File::from(report));
    let result = hold_inner(id, b, opts, &listener, &mut report);
    // Before the report, the error is create's; after it, start's (told by
    // hold_inner on its connection).
    if let (Err(e), Some(mut r)) = (&result, report.take()) {
        let _ = r.write_all(format!("err {e:#}\n").as_bytes());
    }
    result
}

fn hold_inner(
    id: &str,
    b: &Bundle,
    opts: &CreateOpts,
    listener: &UnixListener,
    report: &mut Option<std::fs::File>,
) -> Result<()> {
    // Signals to the caller's process group are not the container's.
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    // Inherited by the container's process, as runc sets them.
    // SAFETY: umask, setrlimit and the writes below take plain values.
    unsafe { libc::umask(b.umask.unwrap_or(0o022) as libc::mode_t) };
    for &(resource, soft, hard) in &b.rlimits {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: a valid rlimit for a resource number from the spec.
        if unsafe { libc::setrlimit(resource as _, &lim) } < 0 {
            bail!(
                "process.rlimits: resource {resource}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if let Some(adj) = b.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .context("process.oomScoreAdj")?;
    }
    for (flag, path) in &b.join {
        let f =
            std::fs::File::open(path).with_context(|| format!("namespace {}", path.display()))?;
        // SAFETY: setns on a namespace descriptor we hold.
        if unsafe { libc::setns(f.as_raw_fd(), *flag) } < 0 {
            bail!(
                "joining namespace {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    // The root as a mount of its own (pivot_root needs one), in a mount
    // namespace of this holder's that the container's is copied from.
    crate::runtime::ns::private_mounts()?;
    let root = b.root.display().to_string();
    vmc_spawn::sys::mount(Some(&root), &root, None, libc::MS_BIND | libc::MS_REC, None)
        .with_context(|| format!("binding the root {root}"))?;

    let seccomp = filters(b.seccomp.as_deref(), b.caps)?;
    let mut ops = b.ops.clone();
    if b.root_readonly {
        ops.push(crate::runtime::ns::read_only_root());
    }
    // The process's parent is create's process, not this holder
    // (CLONE_PARENT): create ends at once, so the caller (a subreaper)
    // adopts the process right away, as runc's is, and waits for it. A
    // new PID namespace cannot go with CLONE_PARENT in one clone: this
    // holder enters it for its children first.
    if b.clone_flags & libc::CLONE_NEWPID != 0 {
        // SAFETY: unshare takes flags only.
        vmc_spawn::sys::check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
            .context("a PID namespace")?;
    }
    let mut iso = Isolation {
        clone_flags: (b.clone_flags & !(libc::CLONE_NEWNS | libc::CLONE_NEWPID))
            | libc::CLONE_PARENT,
        ops,
        hostname: b.hostname.clone(),
        loopback_up: b.clone_flags & libc::CLONE_NEWNET != 0,
        keep_caps: Some(b.caps),
        // A filter is installed after the user changes, which without
        // CAP_SYS_ADMIN needs no_new_privs (see README).
        no_new_privs: b.no_new_privs || !seccomp.is_empty(),
        in_root: false,
        non_dumpable: true,
        // Its parent, create's process, ends at once: the caller adopts it.
        outlives_parent: true,
        seccomp,
    };
    let cgroup = crate::runtime::ns::join_cgroups(&mut iso, id, &b.limits)?;
    let cgroups: Vec<String> = cgroup
        .as_ref()
        .map(|c| c.dirs().iter().map(|d| d.display().to_string()).collect())
        .unwrap_or_default();
    let mut prepared = vmc_spawn::prepare_isolated(&b.process, &root, &root, &iso)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    prepared.set_groups(b.groups.clone());
    prepared.pass_fds(opts.preserve_fds);
    prepared.gate_after_setup();

    let mut started: Option<UnixStream> = None;
    let mut gate = |pid: u32, master: Option<OwnedFd>| -> Result<(), Box<dyn std::error::Error>> {
        if let (Some(m), Some(path)) = (master, &opts.console_socket) {
            send_console(path, &m)?;
        }
        set_sysctls(pid, &b.sysctls)?;
        // The process has its own copies of the caller's stdio: this
        // holder lets go of them, so that a caller reading them to their
        // end waits for the container alone.
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        for fd in 0..3 {
            // SAFETY: dup2 of an open descriptor onto stdio.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
        let start =
            crate::runtime::state::process_start(pid as i32).ok_or("the process is gone")?;
        let line = format!("ok {pid} {start} {}\n", cgroups.join(" "));
        let mut r = report.take().ok_or("reported twice")?;
        r.write_all(line.as_bytes())?;
        drop(r);
        // Until `start` asks (or the holder is killed: `delete`).
        loop {
            let (mut s, _) = listener.accept()?;
            let mut verb = String::new();
            BufReader::new(&mut s).take(64).read_line(&mut verb)?;
            if verb.trim() == "start" {
                started = Some(s);
                return Ok(());
            }
        }
    };
    let spawned = if b.terminal {
        let mut gate = |pid: u32, master: OwnedFd| gate(pid, Some(master));
        vmc_spawn::spawn_pty_gated(&prepared, vmc_proto::WinSize::default(), &mut gate)
    } else {
        let mut gate = |pid: u32| gate(pid, None);
        vmc_spawn::spawn_with(&prepared, None, [0, 1, 2], Some(&mut gate)).map(|(pid, _)| pid)
    };
    // Kept: the container outlives this holder; `delete` removes them.
    std::mem::forget(cgroup);
    match spawned {
        Ok(_) => {
            let _ = std::fs::remove_file(
                listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.with_file_name(state::CREATED)))
                    .unwrap_or_default(),
            );
            if let Some(mut s) = started {
                let _ = s.write_all(b"ok\n");
            }
            Ok(())
        }
        Err(e) => {
            if let Some(mut s) = started {
                let _ = s.write_all(format!("err {}\n", e.message).as_bytes());
                bail!("{}", e.message);
            }
            bail!("{}", e.message)
        }
    }
}

/// A bundle's `linux.seccomp` (its JSON, if any) compiled for a process
/// with capabilities `caps`: the programs the spawner installs.
fn filters(json: Option<&str>, caps: u64) -> Result<Vec<vmc_spawn::SeccompProgram>> {
    match json {
        Some(json) => crate::runtime::seccomp::Seccomp::Profile(json.to_string())
            .programs(caps)
            .context("linux.seccomp"),
        None => Ok(Vec::new()),
    }
}

/// Sends a terminal's master to the caller's console socket, as runc does
/// (SCM_RIGHTS, one descriptor).
pub fn send_console(path: &Path, master: &OwnedFd) -> std::io::Result<()> {
    let s = UnixStream::connect(path)
        .map_err(|e| std::io::Error::other(format!("console socket {}: {e}", path.display())))?;
    send_fd(&s, master)
}

fn send_fd(s: &UnixStream, fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: both descriptors are open for the call.
    if unsafe { vmc_spawn::sys::send_fd_raw(s.as_raw_fd(), fd.as_raw_fd()) } < 0 {
        return Err(std::io::Error::other(format!(
            "sending the terminal to the console socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Writes `net.*` sysctls in the network namespace of `pid` (a sysctl
/// under /proc/sys/net is the writer's namespace's: the holder enters it).
fn set_sysctls(pid: u32, sysctls: &[(String, String)]) -> std::io::Result<()> {
    if sysctls.is_empty() {
        return Ok(());
    }
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // SAFETY: setns on a namespace descriptor we hold; this holder is
    // single-threaded.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (k, v) in sysctls {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&path, v).map_err(|e| std::io::Error::other(format!("sysctl {k}: {e}")))?;
    }
    Ok(())
}

/// `start`: tells the holder to let the process exec; returns once it did.
pub fn start(dir: &Path) -> Result<()> {
    let mut s =
        UnixStream::connect(dir.join("start.sock")).context("the container's holder is gone")?;
    s.write_all(b"start\n")?;
    let mut answer = String::new();
    BufReader::new(s).take(64 << 10).read_line(&mut answer)?;
    match answer.trim_end().strip_prefix("err ") {
        Some(why) => bail!("{why}"),
        None if answer.trim_end() == "ok" => Ok(()),
        None => bail!("the container's holder ended without starting it"),
    }
}

/// Ends a container's holder (a created container's, waiting for start).
pub fn end_holder(r: &Record) {
    if state::process_alive(r.holder, None) {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(r.holder, libc::SIGKILL) };
    }
}

/// Removes what a namespace container leaves on the host: its cgroups.
pub fn clean_up(r: &Record) {
    for d in r.cgroups.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// What `exec` runs in a container.
pub struct ExecPlan {
    pub process: vmc_proto::ProcessSpec,
    pub groups: Vec<u32>,
    pub terminal: bool,
    pub caps: u64,
    pub no_new_privs: bool,
    pub seccomp: Option<String>,
    pub detach: bool,
    pub pid_file: Option<std::path::PathBuf>,
    pub console_socket: Option<std::path::PathBuf>,
    pub preserve_fds: u32,
}

/// `exec`: a process in the running container `r`'s cgroups and
/// namespaces. Detached, its parent is the caller (CLONE_PARENT), which
/// waits for it; else this process waits and returns its exit code (128+N
/// for a signal N).
pub fn exec(r: &Record, plan: &ExecPlan) -> Result<i32> {
    // The caller's paths (pid file, console socket) are the host's: opened
    // before the container's mount namespace hides them.
    let pid_file = plan
        .pid_file
        .as_deref()
        .map(super::PidFile::open)
        .transpose()?;
    let console = match (&plan.console_socket, plan.terminal) {
        (Some(path), true) => Some(
            UnixStream::connect(path)
                .with_context(|| format!("console socket {}", path.display()))?,
        ),
        _ => None,
    };
    for d in &r.cgroups {
        std::fs::write(d.join("cgroup.procs"), "0")
            .with_context(|| format!("joining cgroup {}", d.display()))?;
    }
    // This process is single-threaded: it may enter a mount namespace,
    // which also takes it to the container's root.
    for ns in ["ipc", "uts", "net", "cgroup", "pid", "mnt"] {
        let p = format!("/proc/{}/ns/{ns}", r.pid);
        let f = std::fs::File::open(&p).with_context(|| p.clone())?;
        // SAFETY: setns on an open namespace file.
        if unsafe { libc::setns(f.as_raw_fd(), 0) } < 0 {
            bail!("joining {p}: {}", std::io::Error::last_os_error());
        }
    }
    let seccomp = filters(plan.seccomp.as_deref(), plan.caps)?;
    let iso = Isolation {
        clone_flags: if plan.detach { libc::CLONE_PARENT } else { 0 },
        keep_caps: Some(plan.caps),
        no_new_privs: plan.no_new_privs || !seccomp.is_empty(),
        in_root: true,
        non_dumpable: true,
        outlives_parent: plan.detach,
        seccomp,
        ..Default::default()
    };
    let mut prepared = vmc_spawn::prepare_isolated(&plan.process, "/", "/", &iso)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    prepared.set_groups(plan.groups.clone());
    prepared.pass_fds(plan.preserve_fds);
    let pid = if plan.terminal {
        prepared.gate_after_setup();
        let console = console.context("no console socket")?;
        let mut gate = |_: u32, master: OwnedFd| -> Result<(), Box<dyn std::error::Error>> {
            send_fd(&console, &master)?;
            Ok(())
        };
        vmc_spawn::spawn_pty_gated(&prepared, vmc_proto::WinSize::default(), &mut gate)
    } else {
        vmc_spawn::spawn_with(&prepared, None, [0, 1, 2], None).map(|(pid, _)| pid)
    }
    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if let Some(p) = &pid_file {
        p.write(pid).context("--pid-file")?;
    }
    if plan.detach {
        return Ok(0);
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    while unsafe { libc::waitpid(pid as i32, &mut status, 0) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            bail!("waiting for the process: {e}");
        }
    }
    Ok(if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    })
}
