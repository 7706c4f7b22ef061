//! A container's process attached to this process's stdio and signals, in
//! a microVM: `vmc run` (the VM's whole life) and `vmc exec` (one more
//! process in a running container's VM, through its agent).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmc_proto::{FrameError, GuestMsg, HostMsg, IO_CHUNK};

use super::agent::{AgentConn, AgentError, Watch};
use super::microvm::{
    ended, or_cancelled, process_watch, MicroVm, Start, ANSWER_CPU, RESET_TIMEOUT,
};
use super::{ContainerConfig, RuntimeError};

/// The forwarded signals, plus SIGWINCH with a terminal (it becomes a
/// `Resize`), blocked in the calling thread.
fn block_forwarded(tty: bool) -> libc::sigset_t {
    super::block_signals(if tty { &[libc::SIGWINCH] } else { &[] })
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
    gate: &mut dyn crate::runtime::StartGate,
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
    let upper_in_memory = cfg.vm()?.upper_in_memory;
    let root = |m: &MicroVm| {
        let etc = super::net::etc_files(cfg, m.address().map(|a| a.to_string()).as_deref());
        m.root_spec(&cfg.hostname, etc, upper_in_memory)
    };
    let (mvm, mut conn) = match MicroVm::start_ready(cfg, dir, how, &root, &cancelled) {
        Ok(ready) => ready,
        Err(RuntimeError::Agent(AgentError::Interrupted)) => {
            return Ok(128 + interrupted.load(Ordering::SeqCst))
        }
        Err(e) => return Err(e),
    };
    // Created: the guest is ready and waits for its process.
    if let Err(e) = gate.open() {
        mvm.stop();
        return Err(e);
    }
    let start = if mvm.parked() {
        HostMsg::StartParked {
            stdin: forward_stdin,
            reboot_on_exit: true,
        }
    } else {
        let mut spec = cfg.process.clone();
        spec.stdin = forward_stdin;
        spec.reboot_on_exit = true;
        // The terminal's size now (it may have changed while created).
        if let (Some(_), Some(now)) = (spec.tty, super::tty::host_size()) {
            spec.tty = Some(now);
        }
        spec.resolved = resolve_ahead(cfg, dir);
        HostMsg::Start(spec)
    };
    let started = conn.request(&start, &mut or_cancelled(&cancelled, mvm.watch(ANSWER_CPU)));
    match started {
        Ok(GuestMsg::Started { .. }) => {
            crate::phase!("process started");
            super::timings::mark("start");
            super::state::mark_started(dir);
            gate.started(Ok(()));
        }
        Ok(GuestMsg::StartFailed { kind, message }) => {
            gate.started(Err(&message));
            eprintln!("vmc: {message}");
            mvm.stop();
            return Ok(kind.exit_code());
        }
        Ok(GuestMsg::Error(e)) => {
            mvm.stop();
            return Err(AgentError::remote(e).into());
        }
        Ok(other) => {
            mvm.stop();
            return Err(AgentError::unexpected(&other).into());
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

    let code = pump_output(
        &mut conn,
        &mut while_running(mvm.watch(ANSWER_CPU)),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    crate::phase!("process exited");
    super::timings::mark("exit");
    mvm.write_mem_report();
    conn.close();
    writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    // A writable layer in memory has nothing to keep: the VM is stopped
    // without waiting for the guest to reset.
    let exit = if upper_in_memory && code.is_ok() {
        mvm.stop()
    } else {
        mvm.finish(RESET_TIMEOUT)
    };
    crate::phase!("VM ended: {exit:?}");
    super::timings::mark("vm end");
    code.map_err(|e| ended(e, exit))
}

/// The executable and identity of the container's process from its image's
/// lookup index, while its root is still the image's: a `--rm` run (its
/// writable layer is new in memory) or a first start.
fn resolve_ahead(cfg: &ContainerConfig, dir: &Path) -> Option<vmc_proto::Resolved> {
    let super::Rootfs::Disk(disk) = &cfg.rootfs else {
        return None;
    };
    if !cfg.vm().ok()?.upper_in_memory && super::state::was_started(dir) {
        return None;
    }
    crate::image::lookup::Lookup::load(&crate::image::lookup::index_path(disk))?
        .resolve(&cfg.process)
}

/// `vmc exec` in VM mode: runs another process in the running container's
/// VM through its agent (reached over the VMM's vsock socket `vsock`), with
/// this process's stdio and signals; returns its exit code.
pub fn exec_attached(
    vsock: &Path,
    vmm_pid: u32,
    mut spec: vmc_proto::ProcessSpec,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    let tty = spec.tty.is_some();
    let set = block_forwarded(tty);
    // The VM runs in another process (the container's supervisor): its
    // threads tell whether the guest works on the answer.
    let mut watch = process_watch(vmm_pid);
    super::timings::mark("prepare");
    spec.stdin = forward_stdin;
    spec.reboot_on_exit = false;
    if let (Some(_), Some(now)) = (spec.tty, super::tty::host_size()) {
        spec.tty = Some(now);
    }
    // Start goes with the Hello: one round trip to the guest.
    let mut conn = AgentConn::connect_then(
        vsock,
        vmc_proto::AGENT_PORT,
        &mut watch,
        true,
        &[HostMsg::Start(spec)],
    )?;
    super::timings::mark("agent connect");
    match conn.recv_watched(&mut watch)? {
        GuestMsg::Started { .. } => super::timings::mark("start"),
        GuestMsg::StartFailed { kind, message } => {
            eprintln!("vmc: {message}");
            return Ok(kind.exit_code());
        }
        GuestMsg::Error(e) => return Err(AgentError::remote(e).into()),
        other => return Err(AgentError::unexpected(&other).into()),
    }
    let writer: Writer = Arc::new(Mutex::new(Some(conn.try_clone().map_err(AgentError::Io)?)));
    forward_signals(set, writer.clone(), |_| {});
    let _raw = (tty && forward_stdin).then(super::tty::RawMode::enter);
    if forward_stdin {
        let writer = writer.clone();
        std::thread::spawn(move || pump_stdin(writer, tty));
    }
    let code = pump_output(
        &mut conn,
        &mut while_running(watch),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    super::timings::mark("exit");
    conn.close();
    writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    code.map_err(|e| match e {
        AgentError::ClosedEarly | AgentError::VmStopped => {
            RuntimeError::VmCrashed("the container stopped while the process ran".into())
        }
        e => e.into(),
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

/// Writes the workload's output to `out` and `err` (vmc's stdout and
/// stderr) until it exits; returns its exit code. The guest is not trusted:
/// any other frame breaks the protocol and ends the session, as does the
/// connection ending first. `watch` bounds each wait for a frame.
fn pump_output(
    conn: &mut AgentConn,
    watch: Watch,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, AgentError> {
    // vmc's std handles lock per write, never across the loop: VMM threads
    // log to stderr, and a held lock would stall them.
    loop {
        let msg = match conn.recv_watched(watch) {
            Ok(msg) => msg,
            Err(AgentError::Frame(FrameError::Closed)) => return Err(AgentError::ClosedEarly),
            Err(AgentError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(AgentError::ClosedEarly)
            }
            Err(e) => return Err(e),
        };
        match msg {
            GuestMsg::Stdout(d) => {
                let _ = out.write_all(&d).and_then(|_| out.flush());
                super::timings::mark_once("first output");
            }
            GuestMsg::Stderr(d) => {
                let _ = err.write_all(&d).and_then(|_| err.flush());
                super::timings::mark_once("first output");
            }
            GuestMsg::Exited(status) => return Ok(status.shell_code()),
            GuestMsg::Error(e) => return Err(AgentError::remote(e)),
            other => {
                return Err(AgentError::Unexpected(format!(
                    "{} while the process runs",
                    AgentError::unexpected(&other)
                        .to_string()
                        .trim_start_matches("unexpected agent frame: ")
                )))
            }
        }
    }
}

/// `watch` for the wait on a running process: only the VM's end ends it. A
/// workload may rightly sit idle or spin for as long as it likes, which a
/// watchdog cannot tell from a hung guest.
pub fn while_running(
    mut watch: impl FnMut() -> Result<(), AgentError>,
) -> impl FnMut() -> Result<(), AgentError> {
    move || match watch() {
        Err(AgentError::Hung(_)) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::super::agent::tests::{fake_agent, hung_at};
    use super::*;
    use std::os::unix::net::UnixStream;
    use vmc_proto::{read_frame, write_frame, ExitStatus, ProcessSpec, PROTOCOL_VERSION};

    /// A fake agent that starts the process, then plays `guest`; and the
    /// host's end, with the process started.
    fn started(guest: impl FnOnce(&mut UnixStream) + Send + 'static) -> AgentConn {
        let mut conn = fake_agent(move |mut s| {
            let start: HostMsg = read_frame(&mut s).unwrap();
            assert!(matches!(start, HostMsg::Start(_)), "{start:?}");
            write_frame(&mut s, &GuestMsg::Started { pid: 1 }).unwrap();
            guest(&mut s);
        });
        let answer = conn.request(&HostMsg::Start(ProcessSpec::default()), &mut hung_at(50));
        assert!(
            matches!(answer, Ok(GuestMsg::Started { pid: 1 })),
            "{answer:?}"
        );
        conn
    }

    /// Runs the session's output pump; its result and what reached stdout
    /// and stderr.
    fn pump(conn: &mut AgentConn, watch: Watch) -> (Result<i32, AgentError>, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = pump_output(conn, watch, &mut out, &mut err);
        (r, out, err)
    }

    #[test]
    fn output_is_relayed_until_the_process_exits() {
        let mut conn = started(|s| {
            write_frame(s, &GuestMsg::Stdout(b"out".to_vec())).unwrap();
            write_frame(s, &GuestMsg::Stderr(b"err".to_vec())).unwrap();
            write_frame(s, &GuestMsg::Exited(ExitStatus::Signal(9))).unwrap();
        });
        let (r, out, err) = pump(&mut conn, &mut hung_at(50));
        assert_eq!(r.unwrap(), 137);
        assert_eq!((&out[..], &err[..]), (&b"out"[..], &b"err"[..]));
    }

    #[test]
    fn a_frame_out_of_place_ends_the_session_by_name() {
        let out_of_place = [
            (GuestMsg::Started { pid: 2 }, "Started"),
            (GuestMsg::Connected, "Connected"),
            (
                GuestMsg::Hello {
                    version: PROTOCOL_VERSION,
                },
                "Hello",
            ),
            (GuestMsg::Mounted, "Mounted"),
        ];
        for (msg, name) in out_of_place {
            let mut conn = started(move |s| {
                write_frame(s, &GuestMsg::Stdout(b"before".to_vec())).unwrap();
                write_frame(s, &msg).unwrap();
                // Nothing after the violation is believed.
                let _ = write_frame(s, &GuestMsg::Stdout(b"after".to_vec()));
                let _ = write_frame(s, &GuestMsg::Exited(ExitStatus::Code(0)));
            });
            let (r, out, _) = pump(&mut conn, &mut hung_at(50));
            let e = r.expect_err(name);
            assert!(matches!(e, AgentError::Unexpected(_)), "{e}");
            assert!(e.to_string().contains(name), "{e}");
            assert_eq!(out, b"before");
        }
    }

    #[test]
    fn a_malformed_or_oversized_frame_ends_the_session() {
        // A variant GuestMsg does not have; a length no frame may have.
        let bad = [
            vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
            u32::MAX.to_le_bytes().to_vec(),
        ];
        for bytes in bad {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let mut conn = started(move |s| {
                s.write_all(&bytes).unwrap();
                let _ = write_frame(s, &GuestMsg::Exited(ExitStatus::Code(0)));
                let _ = rx.recv();
            });
            let (r, _, _) = pump(&mut conn, &mut hung_at(50));
            let e = r.expect_err("a protocol violation");
            assert!(
                matches!(
                    e,
                    AgentError::Frame(FrameError::Decode(_) | FrameError::TooLarge(_))
                ),
                "{e}"
            );
            tx.send(()).unwrap();
        }
    }

    #[test]
    fn an_error_from_the_agent_ends_the_session_with_its_message() {
        let mut conn = started(|s| {
            write_frame(s, &GuestMsg::Error("pump failed".into())).unwrap();
        });
        let (r, _, _) = pump(&mut conn, &mut hung_at(50));
        let e = r.expect_err("the agent's error");
        assert!(
            matches!(e, AgentError::Remote(ref m) if m == "pump failed"),
            "{e}"
        );
    }

    #[test]
    fn an_agent_that_closes_before_the_exit_is_an_error_not_exit_0() {
        // At a frame boundary, then in the middle of a frame.
        let partial = vmc_proto::encode(&GuestMsg::Exited(ExitStatus::Code(0)));
        let tails: [Vec<u8>; 2] = [Vec::new(), partial[..partial.len() - 1].to_vec()];
        for tail in tails {
            let mut conn = started(move |s| {
                write_frame(s, &GuestMsg::Stdout(b"partial".to_vec())).unwrap();
                s.write_all(&tail).unwrap();
            });
            let (r, out, _) = pump(&mut conn, &mut hung_at(50));
            let e = r.expect_err("closed early");
            assert!(matches!(e, AgentError::ClosedEarly), "{e}");
            assert!(e.to_string().contains("before the process exited"), "{e}");
            assert_eq!(out, b"partial");
        }
    }

    #[test]
    fn a_silent_agent_is_waited_for_while_the_vm_runs_and_given_up_when_it_stops() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut conn = started(move |_| {
            let _ = rx.recv();
        });
        // The watchdog finds the guest idle (as with a sleeping workload)
        // three times, then the VM is gone.
        let mut looks = 0;
        let mut watch = while_running(|| {
            looks += 1;
            match looks {
                1..=3 => Err(AgentError::Hung("idle".into())),
                _ => Err(AgentError::VmStopped),
            }
        });
        let (r, _, _) = pump(&mut conn, &mut watch);
        drop(watch);
        let e = r.expect_err("given up");
        assert!(matches!(e, AgentError::VmStopped), "{e}");
        assert_eq!(looks, 4, "an idle guest is no reason to end the session");
        tx.send(()).unwrap();
    }
}
