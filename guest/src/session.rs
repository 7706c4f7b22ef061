//! One host connection: handshake, optional root mount, one process, its stdio
//! and exit status.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmc_proto::{
    read_frame, write_frame, ExitStatus, FrameDecoder, GuestMsg, HostMsg, ProcessSpec, WinSize,
    IO_CHUNK, PROTOCOL_VERSION,
};

use crate::laps::Laps;
use crate::vsock::VsockStream;
use crate::{init, reaper};
use vmc_spawn::{self as spawn, sys};

/// Whether the container root is mounted (once per VM).
static MOUNTED: Mutex<bool> = Mutex::new(false);

/// The process a `Park` started and stopped at its entry, with its spec,
/// until a `StartParked` (after the snapshot's restore) lets it run.
static PARKED: Mutex<Option<(ProcessSpec, Running)>> = Mutex::new(None);

/// The container's PID namespace, of which its workload (the process
/// started to end the VM when it exits, or parked for that) is PID 1, as in
/// Docker; `exec`s start in it. Unset before the workload starts.
static WORKLOAD_PID_NS: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Where a process for `spec` starts: the container's workload in a PID
/// namespace of its own, anything else in the workload's when there is one
/// (a build's steps, which end no VM, have none).
fn pid_namespace(workload: bool) -> io::Result<spawn::PidNamespace> {
    if workload {
        return Ok(spawn::PidNamespace::New);
    }
    match &*WORKLOAD_PID_NS.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(ns) => Ok(spawn::PidNamespace::Join(ns.try_clone()?)),
        None => Ok(spawn::PidNamespace::Inherit),
    }
}

/// Records the PID namespace of a workload just started (`pid`, PID 1 in it).
fn record_workload(pid: u32) -> io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/pid"))?;
    *WORKLOAD_PID_NS.lock().unwrap_or_else(|e| e.into_inner()) = Some(ns.into());
    Ok(())
}

/// The most of an executable a `Warm` reads.
const WARM_LIMIT: u64 = 4 << 20;

/// Stop reading host frames while this much stdin is waiting for the process.
const STDIN_HIGH_WATER: usize = 1 << 20;

fn send(conn: &VsockStream, msg: &GuestMsg) -> io::Result<()> {
    write_frame(&mut &*conn, msg)
}

/// Serves one connection (accepted at `accepted`) until its process has
/// exited and been reported.
pub fn serve(conn: VsockStream, accepted: std::time::Instant) {
    match handshake_and_start(&conn, Laps::from(accepted)) {
        Ok(Some((spec, proc_))) => {
            let reboot = spec.reboot_on_exit;
            let status = proc_.pump(&conn);
            if reboot {
                if !init::UPPER_IN_MEMORY.load(std::sync::atomic::Ordering::SeqCst) {
                    init::sync();
                }
                if let Some(status) = status {
                    let _ = send(&conn, &GuestMsg::Exited(status));
                }
                conn.shutdown_write();
                wait_for_close(&conn);
                init::reboot();
            } else if let Some(status) = status {
                let _ = send(&conn, &GuestMsg::Exited(status));
            }
        }
        Ok(None) => {}
        Err(e) => {
            let _ = send(&conn, &GuestMsg::Error(e));
        }
    }
}

/// Gives the host a moment to read the last frame and close; a reboot right
/// after the write could drop it before the VMM processes the queue.
fn wait_for_close(conn: &VsockStream) {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = [0u8; 256];
    while std::time::Instant::now() < deadline {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r > 0 && matches!(sys::read(conn.as_raw_fd(), &mut buf), Ok(0) | Err(_)) {
            return;
        }
    }
}

fn handshake_and_start(
    conn: &VsockStream,
    mut laps: Laps,
) -> Result<Option<(ProcessSpec, Running)>, String> {
    let mut r = conn;
    laps.lap("thread");
    match read_frame::<_, HostMsg>(&mut r) {
        Ok(HostMsg::Hello { version }) if version == PROTOCOL_VERSION => {}
        Ok(HostMsg::Hello { version }) => {
            return Err(format!(
                "protocol version {version} is not supported by this guest agent (speaks {PROTOCOL_VERSION})"
            ))
        }
        Ok(other) => return Err(format!("expected Hello, got {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    send(
        conn,
        &GuestMsg::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .map_err(|e| e.to_string())?;
    laps.lap("hello");
    let mut first = true;
    loop {
        let frame = read_frame::<_, HostMsg>(&mut r);
        // A host that wants the agent's phases asks first.
        if std::mem::take(&mut first) && !matches!(frame, Ok(HostMsg::Timings)) {
            laps.off();
        }
        let report = |laps: &mut Laps| match laps.report() {
            Some(m) => send(conn, &m).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        match frame {
            Ok(HostMsg::Timings) => send(conn, &laps.take()).map_err(|e| e.to_string())?,
            Ok(HostMsg::Refresh {
                realtime_ns,
                entropy,
            }) => {
                init::refresh(realtime_ns, &entropy)
                    .map_err(|e| format!("refreshing the guest: {e}"))?;
                send(conn, &GuestMsg::Refreshed).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Mount(root)) => {
                laps.restart();
                let mut mounted = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
                if !*mounted {
                    init::mount_root(&root, &mut |name| laps.lap(name))
                        .map_err(|e| format!("assembling the root: {e}"))?;
                    *mounted = true;
                } else if init::UPPER_IN_MEMORY.load(std::sync::atomic::Ordering::SeqCst) {
                    // Restored from a ready snapshot: the root is there.
                    init::personalize(&root, &mut |name| laps.lap(name))
                        .map_err(|e| format!("setting up the root: {e}"))?;
                }
                report(&mut laps)?;
                send(conn, &GuestMsg::Mounted).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::ApplyLayer) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("ApplyLayer before Mount".into());
                }
                let reader = FrameReader {
                    conn,
                    buf: Vec::new(),
                    pos: 0,
                    done: false,
                };
                crate::layers::apply(reader).map_err(|e| format!("applying a layer: {e}"))?;
                send(conn, &GuestMsg::Applied).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Commit) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("Commit before Mount".into());
                }
                let mut w = FrameWriter {
                    conn,
                    buf: Vec::with_capacity(IO_CHUNK),
                };
                crate::layers::commit(&mut w).map_err(|e| format!("committing a layer: {e}"))?;
                send(conn, &GuestMsg::Committed).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::CopyOut {
                path,
                follow,
                top,
                owner,
            }) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("CopyOut before Mount".into());
                }
                let mut w = FrameWriter {
                    conn,
                    buf: Vec::with_capacity(IO_CHUNK),
                };
                crate::copy::copy_out(init::ROOT, &path, follow, &top, owner, &mut w)
                    .and_then(|()| w.flush())
                    .map_err(|e| format!("{path}: {e}"))?;
                send(conn, &GuestMsg::Committed).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::CopyIn { path }) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("CopyIn before Mount".into());
                }
                let reader = FrameReader {
                    conn,
                    buf: Vec::new(),
                    pos: 0,
                    done: false,
                };
                crate::copy::copy_in(init::ROOT, &path, reader)
                    .map_err(|e| format!("{path}: {e}"))?;
                // On the disk before the answer: a stopped container's copy
                // runs in a VM that is stopped right after it.
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                send(conn, &GuestMsg::Applied).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Processes) => {
                let list = crate::procs::processes(init::ROOT);
                send(conn, &GuestMsg::Processes(list)).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Stats) => {
                send(conn, &GuestMsg::Stats(crate::procs::stats())).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Warm(spec)) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("Warm before Mount".into());
                }
                // Best effort: what is not found is not warmed. A few MiB
                // at most (a cold buffered read costs seconds per MiB
                // under software virtualisation).
                if let Ok(p) = spawn::prepare(&spec, init::ROOT) {
                    let _ = spawn::warm(&p, WARM_LIMIT);
                }
                send(conn, &GuestMsg::Warmed).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::Park(spec)) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("Park before Mount".into());
                }
                let answer = match Running::park(&spec) {
                    Ok(p) => {
                        let pid = p.pid;
                        *PARKED.lock().unwrap_or_else(|e| e.into_inner()) = Some((spec, p));
                        GuestMsg::Parked { pid }
                    }
                    Err(e) => GuestMsg::StartFailed {
                        kind: e.kind,
                        message: e.message,
                    },
                };
                send(conn, &answer).map_err(|e| e.to_string())?;
            }
            Ok(HostMsg::StartParked {
                stdin,
                reboot_on_exit,
            }) => {
                laps.restart();
                let parked = PARKED.lock().unwrap_or_else(|e| e.into_inner()).take();
                let Some((mut spec, mut p)) = parked else {
                    let _ = send(
                        conn,
                        &GuestMsg::StartFailed {
                            kind: vmc_proto::StartFailure::Setup,
                            message: "no parked process in this guest".into(),
                        },
                    );
                    return Ok(None);
                };
                if !stdin {
                    // End of file at once, as /dev/null would give.
                    p.stdin = None;
                }
                spec.stdin = stdin;
                spec.reboot_on_exit = reboot_on_exit;
                // SAFETY: kill takes plain integers; pid is our stopped child.
                unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGCONT) };
                laps.lap("resume");
                report(&mut laps)?;
                send(conn, &GuestMsg::Started { pid: p.pid }).map_err(|e| e.to_string())?;
                return Ok(Some((spec, p)));
            }
            Ok(HostMsg::Connect { port }) => {
                let tcp = std::net::TcpStream::connect(("127.0.0.1", port))
                    .map_err(|e| format!("connecting to port {port} in the guest: {e}"))?;
                send(conn, &GuestMsg::Connected).map_err(|e| e.to_string())?;
                relay(conn, tcp);
                return Ok(None);
            }
            Ok(HostMsg::ConnectUdp { port }) => {
                let udp = std::net::UdpSocket::bind(("127.0.0.1", 0))
                    .and_then(|u| u.connect(("127.0.0.1", port)).map(|()| u))
                    .map_err(|e| format!("udp port {port} in the guest: {e}"))?;
                send(conn, &GuestMsg::Connected).map_err(|e| e.to_string())?;
                relay_udp(conn, udp);
                return Ok(None);
            }
            Ok(HostMsg::Start(spec)) => {
                if !*MOUNTED.lock().unwrap_or_else(|e| e.into_inner()) {
                    return Err("Start before Mount: the container root is not assembled".into());
                }
                laps.restart();
                let started = Running::start(&spec, &mut laps);
                report(&mut laps)?;
                return match started {
                    Ok(p) => {
                        send(conn, &GuestMsg::Started { pid: p.pid }).map_err(|e| e.to_string())?;
                        Ok(Some((spec, p)))
                    }
                    Err(e) => {
                        let _ = send(
                            conn,
                            &GuestMsg::StartFailed {
                                kind: e.kind,
                                message: e.message,
                            },
                        );
                        Ok(None)
                    }
                };
            }
            Ok(other) => return Err(format!("unexpected frame before Start: {other:?}")),
            Err(vmc_proto::FrameError::Closed) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `--init`: this agent's own binary runs the process as `docker-init`
/// (see tinyinit.rs), exec'd from outside the container root.
fn with_init(prepared: &mut spawn::Prepared, spec: &ProcessSpec) -> Result<(), spawn::SpawnError> {
    if !spec.init {
        return Ok(());
    }
    let me = std::fs::File::open("/proc/self/exe").map_err(|e| spawn::SpawnError {
        kind: vmc_proto::StartFailure::Setup,
        message: format!("--init: the agent's binary: {e}"),
    })?;
    prepared.exec_init("docker-init", me.into())
}

fn ns_error(e: io::Error) -> spawn::SpawnError {
    spawn::SpawnError {
        kind: vmc_proto::StartFailure::Setup,
        message: format!("the container's PID namespace: {e}"),
    }
}

/// The wait status of `pid`'s first stop (or exit). SIGCHLD is not sent
/// for stops (the agent's handler has SA_NOCLDSTOP), so the reaper only
/// sees it when another child wakes it, and then passes it on through the
/// session's `exit` pipe (see reaper.rs): both are watched.
fn wait_for_stop(pid: libc::pid_t, exit: &OwnedFd) -> io::Result<i32> {
    // About a minute: an exec that long is a guest the host gives up on first.
    for _ in 0..60_000 {
        let mut p = pfd(exit.as_raw_fd(), libc::POLLIN);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 1) } > 0 {
            return reaper::read_status(exit);
        }
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) } {
            0 => {}
            p if p == pid => return Ok(status),
            _ => {
                let e = io::Error::last_os_error();
                // Taken by the reaper in the meantime: it is in the pipe.
                if e.raw_os_error() == Some(libc::ECHILD) {
                    return reaper::read_status(exit);
                }
                return Err(e);
            }
        }
    }
    Err(io::Error::from(io::ErrorKind::TimedOut))
}

/// Reads the bytes of `Stdin` frames until `StdinEof`.
struct FrameReader<'a> {
    conn: &'a VsockStream,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for FrameReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let mut r = self.conn;
            match read_frame::<_, HostMsg>(&mut r) {
                Ok(HostMsg::Stdin(d)) => {
                    self.buf = d;
                    self.pos = 0;
                }
                Ok(HostMsg::StdinEof) => self.done = true,
                Ok(other) => {
                    return Err(io::Error::other(format!(
                        "unexpected frame in a layer: {other:?}"
                    )))
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Sends what is written as `Stdout` frames.
struct FrameWriter<'a> {
    conn: &'a VsockStream,
    buf: Vec<u8>,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(IO_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == IO_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(IO_CHUNK));
            send(self.conn, &GuestMsg::Stdout(chunk))?;
        }
        Ok(())
    }
}

/// A started process and the agent's ends of its pipes.
struct Running {
    pid: u32,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// `-t`: the pseudo-terminal's master, for resizes.
    terminal: Option<OwnedFd>,
    exit: OwnedFd,
    /// The exit status was collected; pipes are drained, not waited on.
    exited: bool,
}

impl Running {
    fn start(spec: &ProcessSpec, laps: &mut Laps) -> Result<Running, spawn::SpawnError> {
        let mut prepared = spawn::prepare(spec, init::ROOT)?;
        with_init(&mut prepared, spec)?;
        let workload = spec.reboot_on_exit;
        prepared.set_pid_namespace(pid_namespace(workload).map_err(ns_error)?);
        laps.lap(if spec.resolved.is_some() {
            "resolved ahead"
        } else {
            "resolve"
        });
        let running = match spec.tty {
            Some(size) => Self::start_pty(&prepared, size),
            None => Self::start_piped(&prepared, spec.stdin),
        }?;
        if workload {
            record_workload(running.pid).map_err(ns_error)?;
        }
        laps.lap("fork+exec");
        Ok(running)
    }

    /// Starts `spec` as [`Running::start`] would (stdin on a pipe), but
    /// stopped at the entry of its executable: after its execve, before its
    /// first instruction (traced until then, then detached with SIGSTOP, so
    /// that a SIGCONT lets it run). A snapshot taken now holds the process
    /// exec'd, for `StartParked` in every guest restored from it.
    fn park(spec: &ProcessSpec) -> Result<Running, spawn::SpawnError> {
        let setup = |message: String| spawn::SpawnError {
            kind: vmc_proto::StartFailure::Setup,
            message,
        };
        if spec.tty.is_some() {
            return Err(setup("a parked process has no terminal".into()));
        }
        let mut prepared = spawn::prepare(spec, init::ROOT)?;
        // Its pages in the page cache too, as `Warm` leaves them: exec maps
        // them, it does not read them.
        let _ = spawn::warm(&prepared, WARM_LIMIT);
        with_init(&mut prepared, spec)?;
        prepared.stop_at_entry();
        // Parked only for a container's workload.
        prepared.set_pid_namespace(spawn::PidNamespace::New);
        let running = Self::start_piped(&prepared, true)?;
        let pid = running.pid as libc::pid_t;
        record_workload(running.pid).map_err(ns_error)?;
        let kill = || {
            // SAFETY: kill takes plain integers; pid is our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        };
        let status = wait_for_stop(pid, &running.exit)
            .map_err(|e| setup(format!("waiting for the parked process: {e}")))?;
        if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP) {
            kill();
            return Err(setup(format!(
                "the parked process did not stop at its entry (wait status {status:#x})"
            )));
        }
        // This thread spawned it, so it is the tracer.
        // SAFETY: ptrace on our own traced, stopped child.
        if unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, libc::SIGSTOP) } < 0 {
            let e = io::Error::last_os_error();
            kill();
            return Err(setup(format!("detaching the parked process: {e}")));
        }
        // Stopped for good before the snapshot is taken.
        for _ in 0..10_000 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            if state == Some("T") {
                return Ok(running);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        kill();
        Err(setup("the parked process did not stop".into()))
    }

    /// Starts `prepared` with stdin (a pipe when `stdin`, else /dev/null),
    /// stdout and stderr on pipes.
    fn start_piped(prepared: &spawn::Prepared, stdin: bool) -> Result<Running, spawn::SpawnError> {
        let io_err = |e: io::Error| spawn::SpawnError {
            kind: vmc_proto::StartFailure::Setup,
            message: format!("stdio pipes: {e}"),
        };
        let (in_r, in_w) = if stdin {
            let (r, w) = sys::pipe().map_err(io_err)?;
            (r, Some(w))
        } else {
            let null = std::fs::File::open("/dev/null").map_err(io_err)?;
            (OwnedFd::from(null), None)
        };
        let (out_r, out_w) = sys::pipe().map_err(io_err)?;
        let (err_r, err_w) = sys::pipe().map_err(io_err)?;
        let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let mut failure = None;
        let res = reaper::spawn_registered(|| match spawn::spawn(prepared, stdio) {
            Ok(pid) => Ok(((), pid)),
            Err(e) => {
                failure = Some(e);
                Err(io::Error::other("spawn failed"))
            }
        });
        let (_, pid, exit) = match res {
            Ok(v) => v,
            Err(e) => {
                return Err(failure.unwrap_or(spawn::SpawnError {
                    kind: vmc_proto::StartFailure::Setup,
                    message: e.to_string(),
                }))
            }
        };
        for fd in [&out_r, &err_r] {
            let _ = sys::set_nonblocking(fd, true);
        }
        if let Some(w) = &in_w {
            let _ = sys::set_nonblocking(w, true);
        }
        Ok(Running {
            pid,
            stdin: in_w,
            stdout: Some(out_r),
            stderr: Some(err_r),
            terminal: None,
            exit,
            exited: false,
        })
    }

    /// `-t`: the process runs on a new pseudo-terminal; its master is both
    /// the process's input (a duplicate, so that closing stdin leaves the
    /// output open) and its only output.
    fn start_pty(prepared: &spawn::Prepared, size: WinSize) -> Result<Running, spawn::SpawnError> {
        let mut failure = None;
        let mut master = None;
        let res = reaper::spawn_registered(|| match spawn::spawn_pty(prepared, size) {
            Ok((pid, m)) => {
                master = Some(m);
                Ok(((), pid))
            }
            Err(e) => {
                failure = Some(e);
                Err(io::Error::other("spawn failed"))
            }
        });
        let setup = |message: String| spawn::SpawnError {
            kind: vmc_proto::StartFailure::Setup,
            message,
        };
        let (_, pid, exit) = res.map_err(|e| failure.take().unwrap_or(setup(e.to_string())))?;
        let master = master.ok_or_else(|| setup("no terminal".into()))?;
        let input = master
            .try_clone()
            .map_err(|e| setup(format!("terminal: {e}")))?;
        let _ = sys::set_nonblocking(&master, true);
        Ok(Running {
            pid,
            stdin: Some(input),
            stdout: Some(
                master
                    .try_clone()
                    .map_err(|e| setup(format!("terminal: {e}")))?,
            ),
            stderr: None,
            terminal: Some(master),
            exit,
            exited: false,
        })
    }

    /// Moves data until the process exits; returns its status (None if the
    /// reaper's pipe failed, which should not happen).
    fn pump(mut self, conn: &VsockStream) -> Option<ExitStatus> {
        let mut decoder = FrameDecoder::default();
        let mut stdin_buf: VecDeque<u8> = VecDeque::new();
        let mut stdin_eof = false;
        let mut host_open = true;
        let mut buf = vec![0u8; IO_CHUNK];
        loop {
            let mut fds = Vec::with_capacity(5);
            let want_host = host_open && stdin_buf.len() < STDIN_HIGH_WATER;
            fds.push(pfd(
                conn.as_raw_fd(),
                if want_host { libc::POLLIN } else { 0 },
            ));
            fds.push(pfd(self.exit.as_raw_fd(), libc::POLLIN));
            fds.push(pfd(raw(&self.stdout), libc::POLLIN));
            fds.push(pfd(raw(&self.stderr), libc::POLLIN));
            let stdin_events = if stdin_buf.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            fds.push(pfd(raw(&self.stdin), stdin_events));
            // SAFETY: fds is a valid array of pollfd; negative fds are ignored by poll.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                match sys::read(conn.as_raw_fd(), &mut buf) {
                    Ok(0) | Err(_) => host_open = false,
                    Ok(n) => decoder.feed(&buf[..n]),
                }
                loop {
                    match decoder.next_frame::<HostMsg>() {
                        Ok(Some(HostMsg::Stdin(d))) if !stdin_eof => stdin_buf.extend(d),
                        Ok(Some(HostMsg::StdinEof)) => stdin_eof = true,
                        Ok(Some(HostMsg::Resize(size))) => {
                            if let Some(t) = &self.terminal {
                                let _ = sys::set_winsize(t, size);
                            }
                        }
                        Ok(Some(HostMsg::Signal(sig))) => {
                            // SAFETY: kill takes plain integers.
                            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => {
                            host_open = false;
                            break;
                        }
                    }
                }
            }
            if fds[4].revents != 0 {
                self.write_stdin(&mut stdin_buf);
            }
            if stdin_eof && stdin_buf.is_empty() {
                self.stdin = None;
            }
            for (idx, is_err) in [(2usize, false), (3, true)] {
                if fds[idx].revents != 0 {
                    self.forward(conn, is_err, &mut buf);
                }
            }
            if fds[1].revents != 0 {
                let status = reaper::read_status(&self.exit).ok().map(reaper::decode);
                self.exited = true;
                // Whatever the process wrote before it exited is in the pipes now.
                while self.stdout.is_some() || self.stderr.is_some() {
                    self.forward(conn, false, &mut buf);
                    self.forward(conn, true, &mut buf);
                }
                return status;
            }
        }
    }

    fn write_stdin(&mut self, pending: &mut VecDeque<u8>) {
        let Some(fd) = &self.stdin else {
            pending.clear();
            return;
        };
        while !pending.is_empty() {
            let (a, _) = pending.as_slices();
            match sys::write(fd.as_raw_fd(), a) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The process closed its stdin; drop what is left.
                    pending.clear();
                    self.stdin = None;
                    return;
                }
            }
        }
    }

    /// Reads what is available on stdout or stderr and sends it; closes the
    /// pipe on end of file.
    fn forward(&mut self, conn: &VsockStream, is_err: bool, buf: &mut [u8]) {
        let slot = if is_err {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let Some(fd) = slot else { return };
        match sys::read(fd.as_raw_fd(), buf) {
            Ok(0) => *slot = None,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let msg = if is_err {
                    GuestMsg::Stderr(data)
                } else {
                    GuestMsg::Stdout(data)
                };
                // A vanished host does not stop the process; its output is dropped.
                let _ = send(conn, &msg);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained for now; after exit this means nobody else writes
                // (or a leftover child holds the pipe: stop waiting for it).
                if self.exited {
                    *slot = None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => *slot = None,
        }
    }
}

fn raw(fd: &Option<OwnedFd>) -> RawFd {
    fd.as_ref().map_or(-1, |f| f.as_raw_fd())
}

fn pfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Copies bytes between the host's connection and a TCP stream in the guest
/// until both directions are closed; each end-of-file becomes a half-close.
fn relay(conn: &VsockStream, tcp: std::net::TcpStream) {
    let Ok(tcp_read) = tcp.try_clone() else {
        return;
    };
    let vsock_fd = conn.as_raw_fd();
    let to_host = std::thread::spawn(move || {
        let mut tcp_read = tcp_read;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io::Read::read(&mut tcp_read, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sys::write_all(vsock_fd, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        // SAFETY: shutdown on the connection's descriptor, which outlives this thread (joined below).
        unsafe { libc::shutdown(vsock_fd, libc::SHUT_WR) };
    });
    let mut tcp_write = tcp;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sys::read(vsock_fd, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if io::Write::write_all(&mut tcp_write, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = tcp_write.shutdown(std::net::Shutdown::Write);
    let _ = to_host.join();
}

/// Carries datagrams between the connection (each a little-endian `u16`
/// length and its bytes) and `udp`, until the host closes the connection.
fn relay_udp(conn: &VsockStream, udp: std::net::UdpSocket) {
    let Ok(udp_read) = udp.try_clone() else {
        return;
    };
    let vsock_fd = conn.as_raw_fd();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closing = closed.clone();
    let to_host = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_535];
        loop {
            let got = udp_read.recv(&mut buf);
            if closing.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            match got {
                Ok(n) => {
                    let mut frame = (n as u16).to_le_bytes().to_vec();
                    frame.extend_from_slice(&buf[..n]);
                    if sys::write_all(vsock_fd, &frame).is_err() {
                        break;
                    }
                }
                // Nothing listens on the port (yet): wait for more.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(_) => break,
            }
        }
    });
    let mut buf = vec![0u8; 65_535];
    let read_exact = |buf: &mut [u8]| -> bool {
        let mut got = 0;
        while got < buf.len() {
            match sys::read(vsock_fd, &mut buf[got..]) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got += n,
            }
        }
        true
    };
    loop {
        let mut len = [0u8; 2];
        if !read_exact(&mut len) {
            break;
        }
        let n = u16::from_le_bytes(len) as usize;
        if !read_exact(&mut buf[..n]) {
            break;
        }
        let _ = udp.send(&buf[..n]);
    }
    // Wakes the reader (its recv returns), which sees the flag and ends;
    // then the connection ends.
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: shutdown on sockets this function holds.
    unsafe {
        libc::shutdown(udp.as_raw_fd(), libc::SHUT_RDWR);
    }
    let _ = to_host.join();
    // SAFETY: as above.
    unsafe { libc::shutdown(vsock_fd, libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    use vmc_proto::FrameError;

    /// The agent's end of a connection, and the host's.
    fn pair() -> (VsockStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (VsockStream(OwnedFd::from(a)), b)
    }

    /// Every frame the agent sends until it closes the connection.
    fn frames(host: &mut UnixStream) -> Vec<GuestMsg> {
        let mut out = Vec::new();
        loop {
            match read_frame::<_, GuestMsg>(host) {
                Ok(m) => out.push(m),
                Err(FrameError::Closed) => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Serves `sent` (the host then half-closes) and returns the replies.
    fn serve_frames(sent: &[HostMsg]) -> Vec<GuestMsg> {
        let (conn, mut host) = pair();
        let agent = std::thread::spawn(move || serve(conn, std::time::Instant::now()));
        for m in sent {
            write_frame(&mut host, m).unwrap();
        }
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let got = frames(&mut host);
        agent.join().unwrap();
        got
    }

    const HELLO: HostMsg = HostMsg::Hello {
        version: PROTOCOL_VERSION,
    };
    const GUEST_HELLO: GuestMsg = GuestMsg::Hello {
        version: PROTOCOL_VERSION,
    };

    #[test]
    fn handshake_refuses_other_versions_and_other_first_frames() {
        assert_eq!(
            serve_frames(&[HostMsg::Hello { version: 5 }]),
            [GuestMsg::Error(format!(
                "protocol version 5 is not supported by this guest agent (speaks {PROTOCOL_VERSION})"
            ))]
        );
        assert_eq!(
            serve_frames(&[HostMsg::StdinEof]),
            [GuestMsg::Error("expected Hello, got StdinEof".into())]
        );
        // The host hanging up after the handshake is no error.
        assert_eq!(serve_frames(&[HELLO]), [GUEST_HELLO]);
    }

    /// Asked first, the agent reports accepting the connection at once;
    /// not asked, it sends no phases.
    #[test]
    fn phases_are_sent_only_to_a_host_that_asks_first() {
        let got = serve_frames(&[HELLO, HostMsg::Timings, HostMsg::Start(Default::default())]);
        match &got[..] {
            [GuestMsg::Hello { .. }, GuestMsg::Phases(p), GuestMsg::Error(_)] => assert_eq!(
                p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                ["thread", "hello"]
            ),
            other => panic!("{other:?}"),
        }
        let got = serve_frames(&[HELLO, HostMsg::Start(Default::default())]);
        assert!(
            matches!(&got[..], [GuestMsg::Hello { .. }, GuestMsg::Error(_)]),
            "{got:?}"
        );
    }

    #[test]
    fn nothing_runs_before_the_root_is_mounted() {
        // No test mounts a root: MOUNTED stays false in this process.
        let start = HostMsg::Start(ProcessSpec {
            args: vec!["sh".into()],
            ..Default::default()
        });
        for (msg, err) in [
            (
                start,
                "Start before Mount: the container root is not assembled",
            ),
            (HostMsg::ApplyLayer, "ApplyLayer before Mount"),
            (HostMsg::Commit, "Commit before Mount"),
            (
                HostMsg::Signal(9),
                "unexpected frame before Start: Signal(9)",
            ),
        ] {
            assert_eq!(
                serve_frames(&[HELLO, msg]),
                [GUEST_HELLO, GuestMsg::Error(err.into())]
            );
        }
    }

    #[test]
    fn connect_relays_both_ways_with_half_closes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            // The host's half-close arrived; answering still works.
            s.write_all(b"pong").unwrap();
            got
        });
        let (conn, mut host) = pair();
        let agent = std::thread::spawn(move || serve(conn, std::time::Instant::now()));
        write_frame(&mut host, &HELLO).unwrap();
        write_frame(&mut host, &HostMsg::Connect { port }).unwrap();
        assert_eq!(read_frame::<_, GuestMsg>(&mut host).unwrap(), GUEST_HELLO);
        assert_eq!(
            read_frame::<_, GuestMsg>(&mut host).unwrap(),
            GuestMsg::Connected
        );
        // Raw bytes from here on.
        host.write_all(b"ping").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(server.join().unwrap(), b"ping");
        agent.join().unwrap();
    }

    #[test]
    fn connect_to_a_closed_port_is_an_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert_eq!(
            serve_frames(&[HELLO, HostMsg::Connect { port }]),
            [
                GUEST_HELLO,
                GuestMsg::Error(format!(
                    "connecting to port {port} in the guest: Connection refused (os error 111)"
                ))
            ]
        );
    }

    #[test]
    fn layer_reader_takes_stdin_frames_until_eof() {
        let (conn, mut host) = pair();
        for m in [
            HostMsg::Stdin(b"ab".to_vec()),
            HostMsg::Stdin(vec![]),
            HostMsg::Stdin(b"cde".to_vec()),
            HostMsg::StdinEof,
            // After the end: left for whoever reads the connection next.
            HostMsg::Stdin(b"next".to_vec()),
        ] {
            write_frame(&mut host, &m).unwrap();
        }
        let mut r = FrameReader {
            conn: &conn,
            buf: Vec::new(),
            pos: 0,
            done: false,
        };
        let mut small = [0u8; 2];
        assert_eq!(r.read(&mut small).unwrap(), 2);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!([&small[..], &rest].concat(), b"abcde");
        assert_eq!(r.read(&mut small).unwrap(), 0);
        assert_eq!(
            read_frame::<_, HostMsg>(&mut &conn).unwrap(),
            HostMsg::Stdin(b"next".to_vec())
        );

        write_frame(&mut host, &HostMsg::Signal(9)).unwrap();
        let mut r = FrameReader {
            conn: &conn,
            buf: Vec::new(),
            pos: 0,
            done: false,
        };
        let e = r.read(&mut small).unwrap_err();
        assert_eq!(e.to_string(), "unexpected frame in a layer: Signal(9)");
    }

    #[test]
    fn layer_writer_sends_full_chunks_then_the_rest_on_flush() {
        let (conn, mut host) = pair();
        let reader = std::thread::spawn(move || frames(&mut host));
        let data: Vec<u8> = (0..2 * IO_CHUNK + 1000).map(|i| i as u8).collect();
        {
            let mut w = FrameWriter {
                conn: &conn,
                buf: Vec::new(),
            };
            w.write_all(&data).unwrap();
            w.flush().unwrap();
            // Nothing buffered: nothing sent.
            w.flush().unwrap();
        }
        drop(conn);
        let got = reader.join().unwrap();
        let sizes: Vec<usize> = got
            .iter()
            .map(|m| match m {
                GuestMsg::Stdout(d) => d.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [IO_CHUNK, IO_CHUNK, 1000]);
        let joined: Vec<u8> = got
            .into_iter()
            .flat_map(|m| match m {
                GuestMsg::Stdout(d) => d,
                _ => vec![],
            })
            .collect();
        assert_eq!(joined, data);
    }

    fn nonblocking_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(&r, true).unwrap();
        sys::set_nonblocking(&w, true).unwrap();
        (r, w)
    }

    #[test]
    fn pump_moves_stdin_and_output_and_reports_the_exit() {
        let (in_r, in_w) = sys::pipe().unwrap();
        sys::set_nonblocking(&in_w, true).unwrap();
        let (out_r, out_w) = nonblocking_pipe();
        let (err_r, err_w) = nonblocking_pipe();
        let (exit_r, exit_w) = sys::pipe().unwrap();
        let running = Running {
            // No such process; no Signal frame is sent here.
            pid: i32::MAX as u32,
            stdin: Some(in_w),
            stdout: Some(out_r),
            stderr: Some(err_r),
            terminal: None,
            exit: exit_r,
            exited: false,
        };
        let (conn, mut host) = pair();
        let agent = std::thread::spawn(move || running.pump(&conn));
        for m in [
            HostMsg::Stdin(b"hello ".to_vec()),
            HostMsg::Stdin(b"world".to_vec()),
            HostMsg::StdinEof,
            // After the end of stdin: dropped.
            HostMsg::Stdin(b"late".to_vec()),
        ] {
            write_frame(&mut host, &m).unwrap();
        }
        // The process's stdin ends after exactly what came before StdinEof.
        let input = io::read_to_string(std::fs::File::from(in_r)).unwrap();
        assert_eq!(input, "hello world");
        sys::write_all(out_w.as_raw_fd(), b"out").unwrap();
        sys::write_all(err_w.as_raw_fd(), b"err").unwrap();
        drop((out_w, err_w));
        sys::write_all(exit_w.as_raw_fd(), &(3i32 << 8).to_ne_bytes()).unwrap();
        assert_eq!(agent.join().unwrap(), Some(ExitStatus::Code(3)));
        assert_eq!(
            frames(&mut host),
            [
                GuestMsg::Stdout(b"out".to_vec()),
                GuestMsg::Stderr(b"err".to_vec())
            ]
        );
    }

    fn pause_forever() -> ! {
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }

    #[test]
    fn pump_resizes_the_terminal_and_signals_the_process() {
        let _g = crate::testns::children();
        // SAFETY: posix_openpt takes flags; the result is checked.
        let master =
            sys::check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) }).unwrap();
        // SAFETY: a fresh descriptor that we own.
        let master = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(master) };
        let probe = master.try_clone().unwrap();
        let (_, pid, exit) =
            reaper::spawn_registered(|| Ok(((), crate::testns::fork_child(pause_forever))))
                .unwrap();
        let running = Running {
            pid,
            stdin: None,
            stdout: None,
            stderr: None,
            terminal: Some(master),
            exit,
            exited: false,
        };
        let (conn, mut host) = pair();
        let agent = std::thread::spawn(move || running.pump(&conn));
        write_frame(
            &mut host,
            &HostMsg::Resize(WinSize {
                rows: 40,
                cols: 120,
            }),
        )
        .unwrap();
        write_frame(&mut host, &HostMsg::Signal(libc::SIGTERM)).unwrap();
        // The reaper's part: the status reaches the session's pipe.
        crate::testns::wait_exited(pid);
        reaper::reap_all();
        assert_eq!(
            agent.join().unwrap(),
            Some(ExitStatus::Signal(libc::SIGTERM))
        );
        // SAFETY: winsize is plain data filled by TIOCGWINSZ.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: probe is an open terminal; ws a valid out pointer.
        sys::check(unsafe { libc::ioctl(probe.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) }).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (40, 120));
    }
}
