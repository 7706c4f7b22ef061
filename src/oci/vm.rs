//! A bundle's container in a microVM, with runc's process model as its
//! caller sees it: the container's pid is a process of vmc's (the
//! holder) that runs the VM and exits with the workload's status, as
//! Kata's shim stands for its VM. `create` forks the holder, which starts
//! the VM (restored from the warm-start snapshot, or booted), has the agent
//! mount the bundle's live root from the host over virtio-fs (no image disk
//! is made of it) and reports its own pid once the guest waits for the
//! process. `start` reaches it over `start.sock`, as in namespace mode;
//! the holder answers once the agent started the process, then relays its
//! stdio (the caller's descriptors, or a terminal whose master went to the
//! console socket) and its signals until it ends.
//!
//! In the guest the workload has every capability of the guest kernel, as
//! `vmc run` gives it: the bundle's capabilities, seccomp filter and
//! `noNewPrivileges` are not applied inside the VM (the guest kernel is the
//! boundary; Kata's default is the same).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::bundle::Bundle;
use super::state::{self, Record};
use super::CreateOpts;
use crate::runtime::{self, ContainerConfig, RuntimeError, StartGate};

/// The annotation that sizes the VM in CPUs (memory comes from
/// `linux.resources.memory.limit`, CPUs also from a whole-CPU quota).
pub const CPUS_ANNOTATION: &str = "io.vmc.cpus";

/// Creates the container `id` of bundle `b` in `dir` (made, empty, by the
/// caller): returns once its guest waits for the process, with the record.
pub fn create(dir: &Path, id: &str, b: &Bundle, opts: &CreateOpts) -> Result<Record> {
    if opts.preserve_fds > 0 {
        bail!(
            "--preserve-fds: a microVM's process cannot take host descriptors (annotate {}=ns)",
            super::bundle::MODE_ANNOTATION
        );
    }
    // Checked before anything starts: the whole config the VM runs.
    let cfg = config(id, b)?;
    crate::vmm::open_kvm().context("microVM mode")?;
    let (holder, ok) = super::ns::fork_holder(dir, |listener, report| {
        hold(dir, &cfg, b, opts, listener, report)
    })?;
    let pid_start: u64 = ok.trim().parse().unwrap_or(0);
    Ok(Record {
        id: id.to_string(),
        bundle: b.dir.clone(),
        rootfs: b.root.clone(),
        mode: runtime::Mode::Vm,
        pid: holder,
        pid_start,
        holder,
        created: state::now_rfc3339(),
        annotations: b.annotations.clone(),
        cgroups: Vec::new(),
    })
}

/// What the microVM engine runs for bundle `b`.
fn config(id: &str, b: &Bundle) -> Result<ContainerConfig> {
    let cpus = match b.annotations.get(CPUS_ANNOTATION) {
        Some(v) => v.parse::<u8>().ok().filter(|&n| n > 0).with_context(|| {
            format!("annotation {CPUS_ANNOTATION}={v}: a whole number of CPUs from 1 to 255")
        })?,
        None => b.limits.cpus.unwrap_or(runtime::DEFAULT_VM_CPUS),
    };
    let memory = b.limits.memory.unwrap_or(runtime::DEFAULT_VM_MEMORY);
    crate::vmm::check_memory(memory).context("linux.resources.memory.limit sizes the VM")?;
    let (network, netns) = network(b);
    let mut process = b.process.clone();
    if b.terminal {
        // The size is read from the holder's terminal at the start.
        process.tty = Some(vmc_proto::WinSize::default());
    }
    Ok(ContainerConfig {
        id: id.to_string(),
        rootfs: runtime::Rootfs::Shared(b.root.clone()),
        image_id: None,
        process,
        hostname: b.hostname.clone().unwrap_or_default(),
        ports: Vec::new(),
        network,
        netns,
        dns: Vec::new(),
        extra_hosts: Vec::new(),
        mounts: b.vm_mounts.clone(),
        read_only: b.root_readonly,
        restart: Default::default(),
        stdin_open: false,
        healthcheck: None,
        init: false,
        engine: runtime::EngineConfig::Vm(runtime::VmEngineConfig {
            resources: runtime::Resources { cpus, memory },
            kernel: crate::assets::kernel(None)?,
            debug: false,
            cold: false,
            snapshots: runtime::snapshots_dir(),
            upper_in_memory: false,
            parked: false,
        }),
    })
}

/// The guest's network from the bundle's namespaces: one joined by path
/// (podman's and a CNI plugin's) is taken over by the VM ([`runtime::mirror`]);
/// a new one is a guest with loopback alone; none is the host's network,
/// which a VM reaches through passt (as `vmc run` does).
fn network(b: &Bundle) -> (runtime::net::Network, Option<std::path::PathBuf>) {
    if let Some((_, path)) = b.join.iter().find(|(flag, _)| *flag == libc::CLONE_NEWNET) {
        return (runtime::net::Network::None, Some(path.clone()));
    }
    if b.clone_flags & libc::CLONE_NEWNET != 0 {
        (runtime::net::Network::None, None)
    } else {
        (runtime::net::Network::Passt, None)
    }
}

/// The holder's gate: reports the holder's pid to `create` once the guest
/// is ready, waits for `start`, and answers it once the process started.
struct Gate<'a> {
    dir: &'a Path,
    terminal: bool,
    report: Option<std::fs::File>,
    listener: &'a UnixListener,
    start: Option<UnixStream>,
}

impl StartGate for Gate<'_> {
    fn open(&mut self) -> Result<(), RuntimeError> {
        let io = |source| RuntimeError::State {
            path: "start.sock".into(),
            source,
        };
        let me = std::process::id() as i32;
        let start = runtime::state::process_start(me).unwrap_or(0);
        let mut r = self
            .report
            .take()
            .ok_or_else(|| io(std::io::Error::other("reported twice")))?;
        r.write_all(format!("ok {start}\n").as_bytes())
            .map_err(io)?;
        drop(r);
        loop {
            let (mut s, _) = self.listener.accept().map_err(io)?;
            let mut verb = String::new();
            BufReader::new(&mut s)
                .take(64)
                .read_line(&mut verb)
                .map_err(io)?;
            if verb.trim() == "start" {
                self.start = Some(s);
                let _ = std::fs::remove_file(self.dir.join(state::CREATED));
                return Ok(());
            }
        }
    }

    fn started(&mut self, result: Result<(), &str>) {
        // The caller may have set the terminal up since create (conmon
        // does): raw again before the guest's output is relayed.
        if self.terminal {
            make_raw(0);
        }
        if let Some(mut s) = self.start.take() {
            let line = match result {
                Ok(()) => "ok\n".to_string(),
                Err(why) => format!("err {why}\n"),
            };
            let _ = s.write_all(line.as_bytes());
        }
    }
}

/// The holder: runs in the process `create` forked; returns its exit code
/// (the workload's, as a shell reports it).
fn hold(
    dir: &Path,
    cfg: &ContainerConfig,
    b: &Bundle,
    opts: &CreateOpts,
    listener: UnixListener,
    report: OwnedFd,
) -> i32 {
    let mut gate = Gate {
        dir,
        terminal: b.terminal,
        report: Some(std::fs::File::from(report)),
        listener: &listener,
        start: None,
    };
    let result = hold_inner(dir, cfg, b, opts, &mut gate);
    let _ = std::fs::remove_file(dir.join(state::CREATED));
    match result {
        Ok(code) => code,
        Err(e) => {
            let line = format!("{e:#}");
            match gate.report.take() {
                // Before the report, the error is create's.
                Some(mut r) => {
                    let _ = r.write_all(format!("err {line}\n").as_bytes());
                }
                None => {
                    gate.started(Err(&line));
                    eprintln!("vmc-runtime: {line}");
                }
            }
            runtime::lifecycle::EXIT_VMC_ERROR
        }
    }
}

fn hold_inner(
    dir: &Path,
    cfg: &ContainerConfig,
    b: &Bundle,
    opts: &CreateOpts,
    gate: &mut Gate,
) -> Result<i32> {
    // Signals to the caller's process group are not the container's.
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    if let Some(adj) = b.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .context("process.oomScoreAdj")?;
    }
    if b.terminal {
        let path = opts
            .console_socket
            .as_deref()
            .context("no console socket")?;
        take_terminal(path)?;
    }
    let code = runtime::attach::run_attached(cfg, dir, true, runtime::microvm::Start::Warm, gate)?;
    Ok(code)
}

/// The host terminal `fd` raw, output included: the guest's terminal did
/// the processing already (its "\n" is "\r\n" by now).
fn make_raw(fd: libc::c_int) {
    // SAFETY: termios is plain data filled by tcgetattr on `fd`.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            t.c_oflag &= !(libc::OPOST | libc::ONLCR);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// A new pseudo-terminal: its master to the caller's console socket, its
/// slave this holder's controlling terminal and stdio, which the guest's
/// terminal is relayed to (raw, so that the guest's line discipline is the
/// only one; a resize of the master reaches the holder as SIGWINCH).
fn take_terminal(console: &Path) -> Result<()> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills two descriptors; the other arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        bail!("a terminal: {}", std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two open descriptors we now own.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    make_raw(slave.as_raw_fd());
    super::ns::send_console(console, &master)?;
    drop(master);
    // SAFETY: the holder leads its own session (setsid above); TIOCSCTTY
    // and dup2 on a descriptor we hold.
    unsafe {
        if libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) < 0 {
            bail!("the terminal: {}", std::io::Error::last_os_error());
        }
        for fd in 0..3 {
            libc::dup2(slave.as_raw_fd(), fd);
        }
    }
    Ok(())
}

/// The VMM's pid: the jailed VMM process of the container's VM, else the
/// holder (a VMM in the holder's own process, `VMC_JAIL=0`).
fn vmm_pid(dir: &Path, r: &Record) -> u32 {
    crate::runtime::jail::Confinement::of_container(dir)
        .map(|c| c.pid)
        .unwrap_or(r.pid as u32)
}

/// Ends the container's VMM at once (after its holder got SIGKILL: the
/// VMM would stop by itself at its control socket's end, but later). Not
/// waited for: with its holder gone, it is the caller's (a subreaper's) to
/// reap.
pub fn kill_vmm(dir: &Path) {
    if let Some(v) = crate::runtime::jail::Confinement::of_container(dir) {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", v.pid)).unwrap_or_default();
        if comm.trim() == "vmm" {
            // SAFETY: kill with a pid just checked to be a VMM's.
            unsafe { libc::kill(v.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// `exec` in a microVM: the process through the guest's agent, this
/// process relaying its stdio (or a terminal whose master goes to the
/// console socket) and signals. Detached, a child of this process relays
/// and exits with the process's status; its pid is the one reported (the
/// caller, a subreaper, adopts it when this process ends).
pub fn exec(dir: &Path, r: &Record, plan: &super::ns::ExecPlan) -> Result<i32> {
    if plan.preserve_fds > 0 {
        bail!("--preserve-fds: a microVM's process cannot take host descriptors");
    }
    let pid_file = plan
        .pid_file
        .as_deref()
        .map(super::PidFile::open)
        .transpose()?;
    let vsock = dir.join("vsock.sock");
    let vmm = vmm_pid(dir, r);
    let mut spec = plan.process.clone();
    // A terminal comes with a console socket (checked by the caller).
    let run = |spec: vmc_proto::ProcessSpec| -> Result<i32> {
        if let (true, Some(path)) = (plan.terminal, &plan.console_socket) {
            take_terminal(path)?;
        }
        Ok(runtime::attach::exec_attached(&vsock, vmm, spec, true)?)
    };
    if plan.terminal {
        spec.tty = Some(vmc_proto::WinSize::default());
    }
    if !plan.detach {
        if plan.terminal {
            // SAFETY: setsid has no preconditions (the terminal becomes
            // this process's controlling one).
            unsafe { libc::setsid() };
        }
        return run(spec);
    }
    // SAFETY: vmc-runtime is single-threaded here, so the child may go on
    // as Rust code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: setsid has no preconditions.
        unsafe { libc::setsid() };
        let code = match run(spec) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmc-runtime: {e:#}");
                runtime::lifecycle::EXIT_VMC_ERROR
            }
        };
        // SAFETY: leaving the forked child without the parent's exit
        // handlers.
        unsafe { libc::_exit(code) };
    }
    if let Some(p) = &pid_file {
        p.write(child as u32).context("--pid-file")?;
    }
    Ok(0)
}

/// `pause`/`resume` of a microVM: its VMM stopped with SIGSTOP (every vCPU
/// out of the guest, the device threads too) or let go with SIGCONT, as
/// `vmc pause` does.
pub fn set_paused(dir: &Path, paused: bool) -> Result<()> {
    let pid = crate::runtime::jail::Confinement::of_container(dir)
        .map(|c| c.pid)
        .filter(|&p| crate::runtime::pause::is_vmm(p))
        .context("the container's VMM is not a process of its own (VMC_JAIL=0): pausing it would stop its holder too")?;
    if paused {
        if !crate::runtime::pause::stop_vmm(pid) {
            bail!("the VMM's threads did not stop");
        }
    } else {
        // SAFETY: kill with a pid just checked to be a VMM's.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    }
    Ok(())
}

/// Whether the microVM in `dir` is paused (its VMM stopped as a whole).
pub fn paused(dir: &Path) -> bool {
    crate::runtime::jail::Confinement::of_container(dir)
        .is_some_and(|c| crate::runtime::pause::vmm_stopped(c.pid))
}
