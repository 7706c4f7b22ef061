//! A container's process attached to this process's stdio and signals, in
//! a microVM: `vmc run` (the VM's whole life) and `vmc exec` (one more
//! process in a running container's VM, through its agent).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmc_guest::{GuestMsg, HostMsg, IO_CHUNK};

use super::agent::{AgentConn, AgentError};
use super::microvm::{
    ended, or_cancelled, process_watch, MicroVm, Start, ANSWER_CPU, RESET_TIMEOUT,
};
use super::{ContainerConfig, RuntimeError};
use crate::vmm::VmExit;

/// Signals vmc forwards to the workload.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The forwarded signals, plus SIGWINCH with a terminal (it becomes a
/// `Resize`), blocked in the calling thread.
fn block_forwarded(tty: bool) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the old mask is not needed.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        if tty {
            libc::sigaddset(&mut set, libc::SIGWINCH);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// The connection the signal and stdin threads write to, once the process
/// runs (None before, and after it ended).
type Writer = Arc<Mutex<Option<AgentConn>>>;

/// A thread that takes the blocked signals in `set` for the workload: each
/// goes to it as a `Signal` (SIGWINCH as a `Resize`). Before the process
/// runs, `early` is called with the signal instead (SIGWINCH is dropped).
fn forward_signals(set: libc::sigset_t, writer: Writer, early: impl Fn(i32) + Send + 'static) {
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: set and sig are valid for the call.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        match (w.as_mut(), sig) {
            (Some(conn), libc::SIGWINCH) => {
                if let Some(size) = super::tty::host_size() {
                    let _ = conn.send(&HostMsg::Resize(size));
                }
            }
            (Some(conn), _) => {
                let _ = conn.send(&HostMsg::Signal(sig));
            }
            (None, libc::SIGWINCH) => {}
            (None, _) => early(sig),
        }
    });
}

/// Runs the container attached to this process's stdio and returns the exit
/// code vmc should exit with. SIGINT/SIGTERM/... reach the workload.
pub fn run_attached(
    cfg: &ContainerConfig,
    dir: &Path,
    forward_stdin: bool,
    how: Start,
) -> Result<i32, RuntimeError> {
    // Block the forwarded signals before any thread starts, so that only the
    // forwarding thread (sigwait) ever receives them.
    let tty = cfg.process.tty.is_some();
    let set = block_forwarded(tty);

    let writer: Writer = Arc::new(Mutex::new(None));
    // A signal before the process runs ends the run (128 + its number).
    let interrupted = Arc::new(AtomicI32::new(0));
    {
        let interrupted = interrupted.clone();
        forward_signals(set, writer.clone(), move |sig| {
            interrupted.store(sig, Ordering::SeqCst);
        });
    }
    let cancelled = || interrupted.load(Ordering::SeqCst) != 0;
    let root = |m: &MicroVm| {
        let etc = super::net::etc_files(cfg, m.address().map(|a| a.to_string()).as_deref());
        m.root_spec(&cfg.hostname, etc)
    };
    let (mvm, mut conn) = match MicroVm::start_ready(cfg, dir, how, &root, &cancelled) {
        Ok(ready) => ready,
        Err(RuntimeError::Agent(AgentError::Interrupted)) => {
            return Ok(128 + interrupted.load(Ordering::SeqCst))
        }
        Err(e) => return Err(e),
    };
    let mut spec = cfg.process.clone();
    spec.stdin = forward_stdin;
    spec.reboot_on_exit = true;
    let started = conn.request(
        &HostMsg::Start(spec),
        &mut or_cancelled(&cancelled, mvm.watch(ANSWER_CPU)),
    );
    match started {
        Ok(GuestMsg::Started { .. }) => {
            crate::phase!("process started");
            super::state::mark_started(dir);
        }
        Ok(GuestMsg::StartFailed { kind, message }) => {
            eprintln!("vmc: {message}");
            mvm.stop();
            return Ok(kind.exit_code());
        }
        Ok(GuestMsg::Error(e)) => {
            mvm.stop();
            return Err(AgentError::Remote(e).into());
        }
        Ok(other) => {
            mvm.stop();
            return Err(AgentError::Unexpected(format!("{other:?}")).into());
        }
        Err(AgentError::Interrupted) => {
            mvm.stop();
            return Ok(128 + interrupted.load(Ordering::SeqCst));
        }
        Err(e) => return Err(ended(e, mvm.stop())),
    }
    *writer.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(conn.try_clone().map_err(AgentError::Io)?);
    let _raw = (tty && forward_stdin).then(super::tty::RawMode::enter);
    if forward_stdin {
        let writer = writer.clone();
        std::thread::spawn(move || pump_stdin(writer, tty));
    }

    let code = pump_output(&mut conn);
    crate::phase!("process exited");
    mvm.write_mem_report();
    conn.close();
    writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    let exit = mvm.finish(RESET_TIMEOUT);
    crate::phase!("VM ended: {exit:?}");
    match code {
        Some(code) => Ok(code),
        None => Err(RuntimeError::VmCrashed(match exit {
            VmExit::Crashed(why) => why,
            _ => "the guest agent closed the connection before the process exited".into(),
        })),
    }
}

/// `vmc exec` in VM mode: runs another process in the running container's
/// VM through its agent (reached over the VMM's vsock socket `vsock`), with
/// this process's stdio and signals; returns its exit code.
pub fn exec_attached(
    vsock: &Path,
    vmm_pid: u32,
    mut spec: vmc_guest::ProcessSpec,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    let tty = spec.tty.is_some();
    let set = block_forwarded(tty);
    // The VM runs in another process (the container's supervisor): its
    // threads tell whether the guest works on the answer.
    let mut watch = process_watch(vmm_pid);
    let mut conn = AgentConn::connect(vsock, vmc_guest::AGENT_PORT, &mut watch)?;
    spec.stdin = forward_stdin;
    spec.reboot_on_exit = false;
    match conn.request(&HostMsg::Start(spec), &mut watch)? {
        GuestMsg::Started { .. } => {}
        GuestMsg::StartFailed { kind, message } => {
            eprintln!("vmc: {message}");
            return Ok(kind.exit_code());
        }
        GuestMsg::Error(e) => return Err(AgentError::Remote(e).into()),
        other => return Err(AgentError::Unexpected(format!("{other:?}")).into()),
    }
    let writer: Writer = Arc::new(Mutex::new(Some(conn.try_clone().map_err(AgentError::Io)?)));
    forward_signals(set, writer.clone(), |_| {});
    let _raw = (tty && forward_stdin).then(super::tty::RawMode::enter);
    if forward_stdin {
        let writer = writer.clone();
        std::thread::spawn(move || pump_stdin(writer, tty));
    }
    let code = pump_output(&mut conn);
    conn.close();
    writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    code.ok_or_else(|| {
        RuntimeError::VmCrashed("the container stopped while the process ran".into())
    })
}

/// Copies vmc's stdin to the workload until end of file, which a terminal
/// (`tty`) gets as its end-of-file character.
fn pump_stdin(writer: Writer, tty: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        let msgs = match stdin.read(&mut buf) {
            Ok(0) | Err(_) if tty => vec![
                HostMsg::Stdin(vec![super::tty::EOF_BYTE]),
                HostMsg::StdinEof,
            ],
            Ok(0) | Err(_) => vec![HostMsg::StdinEof],
            Ok(n) => vec![HostMsg::Stdin(buf[..n].to_vec())],
        };
        let eof = msgs.last() == Some(&HostMsg::StdinEof);
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = w
            .as_mut()
            .is_some_and(|conn| msgs.iter().all(|m| conn.send(m).is_ok()));
        if !sent || eof {
            return;
        }
    }
}

/// Writes the workload's output to vmc's stdout/stderr until it exits;
/// returns its exit code, or None if the connection ended first.
fn pump_output(conn: &mut AgentConn) -> Option<i32> {
    // The std handles are locked per write, never across the loop: VMM
    // threads log to stderr, and a held lock would stall them.
    loop {
        match conn.recv() {
            Ok(GuestMsg::Stdout(d)) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&d).and_then(|_| out.flush());
            }
            Ok(GuestMsg::Stderr(d)) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&d).and_then(|_| err.flush());
            }
            Ok(GuestMsg::Exited(status)) => return Some(status.shell_code()),
            Ok(GuestMsg::Error(e)) => {
                eprintln!("vmc: guest agent: {e}");
                return None;
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}
