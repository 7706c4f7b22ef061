//! The microVM runtime: disks from the container's root filesystem, a VM with
//! the guest agent as PID 1, and a session that runs the container's process
//! with its stdio and exit status carried over vsock.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmc_guest::{GuestMsg, HostMsg, RootSpec, AGENT_PORT, IO_CHUNK};

use super::agent::{AgentConn, AgentError};
use super::{snapshot, ContainerConfig, RuntimeError};
use crate::assets;
use crate::disk;
use crate::vmm::{self, Backend, DiskConfig, RunningVm, VmConfig, VmExit, VmmError};

/// Guest CID of every VM (each VM has its own vsock device and host socket).
pub const GUEST_CID: u64 = 3;
/// Size of the sparse scratch disk (the container's writable layer).
pub const SCRATCH_SIZE: u64 = 2 << 30;
/// How long the guest may take to boot to its agent. Software virtualisation
/// needs tens of seconds; hardware well under one.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest may take to reset itself after its process exited.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// The VM layout shared by cold boots, snapshot creation and restores (a
/// restore needs the same devices in the same order): the agent's root disk,
/// the image disk, the scratch disk, vsock, rng, net. The network device is
/// always there (the snapshot's guest has probed it); `net` is its backend.
#[allow(clippy::too_many_arguments)]
pub fn vm_config(
    kernel: &Path,
    agent_disk: &Path,
    image: &Path,
    scratch: &Path,
    vsock: &Path,
    cpus: u8,
    memory: u64,
    console: Option<Box<dyn Write + Send>>,
    net: std::os::unix::net::UnixStream,
) -> VmConfig {
    // The agent's disk is the guest's root; extra parameters (VMC_KERNEL_ARGS)
    // are for experiments and debugging.
    let mut cmdline: Vec<String> = ["root=/dev/vda", "ro", "rootfstype=erofs", "init=/init"]
        .map(String::from)
        .to_vec();
    if let Ok(extra) = std::env::var("VMC_KERNEL_ARGS") {
        cmdline.extend(extra.split_whitespace().map(String::from));
    }
    let disk = |path: &Path, read_only, id: &str| DiskConfig {
        path: path.to_path_buf(),
        read_only,
        id: id.into(),
    };
    VmConfig {
        vcpus: cpus,
        mem_size: memory,
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline,
        disks: vec![
            disk(agent_disk, true, "vmc-agent"),
            disk(image, true, "vmc-image"),
            disk(scratch, false, "vmc-scratch"),
        ],
        vsock: Some((GUEST_CID, vsock.to_path_buf())),
        rng: true,
        net: Some((GUEST_MAC, net)),
        console,
        backend: Backend::detect(),
    }
}

/// The guest NIC's hardware address (locally administered). passt learns
/// it from the guest's frames; every VM may use the same one, each behind
/// its own passt.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x63, 0x00, 0x01];

/// A network backend that is not connected: a socket whose peer is closed
/// (the device drops what the guest sends; nothing arrives).
pub fn unplugged() -> std::io::Result<std::os::unix::net::UnixStream> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    Ok(a)
}

/// How a microVM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Boot the kernel.
    Cold,
    /// Restore the warm-start snapshot (made on first need).
    Warm,
}

/// A booted (or booting) microVM.
pub struct MicroVm {
    vm: RunningVm,
    vsock: PathBuf,
    /// Sizes in sectors of the image and scratch disks, for the agent.
    disk_sectors: (u64, u64),
    restored: bool,
    /// When the vCPUs started (ms since process start), for `vmc bench`.
    running_ms: f64,
    /// The VM's passt and the addressing it serves (with `--network passt`).
    passt: Option<(super::net::Passt, super::net::HostIpv4)>,
}

impl MicroVm {
    /// Builds the disks in `dir` and boots the VM cold.
    pub fn boot(cfg: &ContainerConfig, dir: &Path) -> Result<MicroVm, RuntimeError> {
        Self::start(cfg, dir, Start::Cold)
    }

    /// Builds the disks in `dir` and starts the VM, cold or from the
    /// warm-start snapshot (`--debug` always boots cold, to show the boot).
    pub fn start(cfg: &ContainerConfig, dir: &Path, how: Start) -> Result<MicroVm, RuntimeError> {
        if let super::Rootfs::Dir(d) = &cfg.rootfs {
            if !d.is_dir() {
                return Err(RuntimeError::NoRootfs(d.display().to_string()));
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| RuntimeError::State {
                path: dir.display().to_string(),
                source,
            })?;
        if let Some(id) = &cfg.image_id {
            // Lets `vmc rmi` see which images containers use.
            std::fs::write(dir.join("image-id"), id).map_err(|source| RuntimeError::State {
                path: dir.display().to_string(),
                source,
            })?;
        }
        crate::phase!("start: building disks");
        let image = match &cfg.rootfs {
            super::Rootfs::Dir(d) => {
                let image = dir.join("image.erofs");
                disk::build_erofs(d, &image)?;
                image
            }
            super::Rootfs::Disk(p) => p.clone(),
            super::Rootfs::Layers(_) => {
                return Err(RuntimeError::Namespace(
                    "unpacked layers are for namespace mode; a microVM takes the image's disk"
                        .into(),
                ))
            }
        };
        let scratch = dir.join("scratch.ext4");
        disk::build_scratch(&scratch, SCRATCH_SIZE)?;
        crate::phase!("disks built");
        let home = super::vmc_home();
        let agent = disk::agent_disk(&assets::guest_binary()?, &home.join("cache"))?;
        let vsock = dir.join("vsock.sock");
        let disk_sectors = (sectors(&image), SCRATCH_SIZE / 512);
        let (cpus, memory) = (cfg.resources.cpus, cfg.resources.memory);
        // The network: passt on one end of a socket pair, the device on the
        // other; without one, an unplugged device.
        let host = match cfg.network {
            super::net::Network::Passt => Some(super::net::host_ipv4().ok_or_else(|| {
                RuntimeError::Network(
                    "--network passt: the host has no IPv4 default route for passt to copy; use --network none".into(),
                )
            })?),
            super::net::Network::None => None,
        };
        let state_err = |source| RuntimeError::State {
            path: dir.display().to_string(),
            source,
        };
        let (ours, passt) = match host {
            Some(h) => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(state_err)?;
                let p = super::net::Passt::start(theirs, &h).map_err(RuntimeError::Network)?;
                (ours, Some((p, h)))
            }
            None => (unplugged().map_err(state_err)?, None),
        };
        let mut net = Some(ours);
        let mut config = |console| {
            vm_config(
                &cfg.kernel,
                &agent,
                &image,
                &scratch,
                &vsock,
                cpus,
                memory,
                console,
                net.take()
                    .map_or_else(unplugged, Ok)
                    .expect("a socket pair"),
            )
        };
        if how == Start::Cold || cfg.debug {
            let console: Option<Box<dyn Write + Send>> = if cfg.debug {
                Some(Box::new(std::io::stderr()))
            } else {
                None
            };
            let vm = vmm::start(config(console))?;
            return Ok(MicroVm {
                vm,
                vsock,
                disk_sectors,
                restored: false,
                running_ms: super::elapsed_ms(),
                passt,
            });
        }
        let spec = snapshot::SnapshotSpec {
            kernel: &cfg.kernel,
            agent_disk: &agent,
            cpus,
            memory,
            backend: Backend::detect(),
        };
        let (snap, key) = snapshot::ensure(&cfg.snapshots, &spec, false)?;
        crate::phase!("snapshot ready; restoring");
        let vm = match vmm::restore(config(None), &snap, &key) {
            Ok(vm) => vm,
            Err(VmmError::Snapshot(e)) => {
                eprintln!(
                    "vmc: warning: the warm-start snapshot {} is unusable ({e}); rebuilding it",
                    snap.display()
                );
                let (snap, key) = snapshot::ensure(&cfg.snapshots, &spec, true)?;
                vmm::restore(config(None), &snap, &key)?
            }
            Err(e) => return Err(e.into()),
        };
        crate::phase!("restored; vCPUs running");
        Ok(MicroVm {
            vm,
            vsock,
            disk_sectors,
            restored: true,
            running_ms: super::elapsed_ms(),
            passt,
        })
    }

    /// Whether the VM was restored from a snapshot (its clock and entropy
    /// need a [`HostMsg::Refresh`] before use).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The refresh message for a restored guest: host time and 64 fresh bytes.
    pub fn refresh_msg() -> HostMsg {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut entropy = vec![0u8; 64];
        let mut done = 0;
        while done < entropy.len() {
            // SAFETY: the pointer and length describe the unfilled tail of entropy.
            let n = unsafe {
                libc::getrandom(entropy[done..].as_mut_ptr().cast(), entropy.len() - done, 0)
            };
            if n > 0 {
                done += n as usize;
            }
        }
        HostMsg::Refresh {
            realtime_ns: now,
            entropy,
        }
    }

    /// Connects to the guest agent, waiting for the guest to boot.
    pub fn connect(&self, timeout: Duration) -> Result<AgentConn, AgentError> {
        AgentConn::connect(&self.vsock, AGENT_PORT, timeout, &|| self.vm.is_running())
    }

    /// The root filesystem layout inside the guest (with `etc`: Docker's
    /// resolv.conf, hosts and hostname over the image's), and its network.
    pub fn root_spec(&self, hostname: &str, etc: Vec<(String, String)>) -> RootSpec {
        RootSpec {
            image_dev: "/dev/vdb".into(),
            image_fstype: "erofs".into(),
            scratch_dev: "/dev/vdc".into(),
            hostname: hostname.into(),
            image_sectors: self.disk_sectors.0,
            scratch_sectors: self.disk_sectors.1,
            network: self.passt.as_ref().map(|(_, h)| vmc_guest::NetSpec {
                ifname: "eth0".into(),
                address: h.address.octets(),
                prefix: h.prefix,
                gateway: h.gateway.octets(),
                mtu: crate::devices::virtio::net::MTU,
            }),
            etc,
        }
    }

    /// The guest's IPv4 address, if it has a network.
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.passt.as_ref().map(|(_, h)| h.address)
    }

    /// For `vmc bench`: writes this process's peak RSS and the guest's
    /// resident memory to the file named by `VMC_MEM_REPORT`, if set.
    pub fn write_mem_report(&self) {
        if let Some(p) = std::env::var_os("VMC_MEM_REPORT") {
            let doc = serde_json::json!({
                "vm_hwm_kib": vmm::memory::peak_rss_kib(),
                "guest_rss_kib": self.vm.guest_rss_kib(),
                "guest_dirty_kib": self.vm.guest_private_dirty_kib(),
                "running_ms": self.running_ms,
            });
            let _ = std::fs::write(p, doc.to_string());
        }
    }

    /// Lets the guest finish resetting (or stops it) and returns how it ended.
    pub fn finish(self, timeout: Duration) -> VmExit {
        self.vm.wait_or_stop(timeout)
    }

    /// Stops the VM now.
    pub fn stop(self) -> VmExit {
        self.vm.stop();
        self.vm.wait()
    }

    /// A handle that stops the VM from another thread.
    pub fn stopper(&self) -> vmm::Stopper {
        self.vm.stopper()
    }
}

/// Whole 512-byte sectors of a disk image file (what the guest will see).
fn sectors(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() / 512).unwrap_or(0)
}

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

    let mvm = MicroVm::start(cfg, dir, how)?;
    let writer: Writer = Arc::new(Mutex::new(None));
    let interrupted = Arc::new(AtomicI32::new(0));
    {
        let (interrupted, stopper) = (interrupted.clone(), mvm.stopper());
        // A signal before the process runs stops the VM.
        forward_signals(set, writer.clone(), move |sig| {
            interrupted.store(sig, Ordering::SeqCst);
            stopper.stop();
        });
    }

    let mut conn = match mvm.connect(BOOT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            let sig = interrupted.load(Ordering::SeqCst);
            let exit = mvm.stop();
            if sig != 0 {
                return Ok(128 + sig);
            }
            return Err(match (e, exit) {
                (AgentError::VmStopped, VmExit::Crashed(why)) => RuntimeError::VmCrashed(why),
                (e, _) => e.into(),
            });
        }
    };
    crate::phase!("agent connected");
    if mvm.restored() {
        conn.send(&MicroVm::refresh_msg())?;
        match conn.recv()? {
            GuestMsg::Refreshed => {}
            GuestMsg::Error(e) => return Err(AgentError::Remote(e).into()),
            other => return Err(AgentError::Unexpected(format!("{other:?}")).into()),
        }
    }
    crate::phase!("guest refreshed");
    let etc = super::net::etc_files(cfg, mvm.address().map(|a| a.to_string()).as_deref());
    conn.send(&HostMsg::Mount(mvm.root_spec(&cfg.hostname, etc)))?;
    match conn.recv()? {
        GuestMsg::Mounted => crate::phase!("root mounted"),
        GuestMsg::Error(e) => return Err(AgentError::Remote(e).into()),
        other => return Err(AgentError::Unexpected(format!("{other:?}")).into()),
    }
    let mut spec = cfg.process.clone();
    spec.stdin = forward_stdin;
    spec.reboot_on_exit = true;
    conn.send(&HostMsg::Start(spec))?;
    match conn.recv()? {
        GuestMsg::Started { .. } => {
            crate::phase!("process started");
            super::state::mark_started(dir);
        }
        GuestMsg::StartFailed { kind, message } => {
            eprintln!("vmc: {message}");
            mvm.stop();
            return Ok(kind.exit_code());
        }
        GuestMsg::Error(e) => return Err(AgentError::Remote(e).into()),
        other => return Err(AgentError::Unexpected(format!("{other:?}")).into()),
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
    mut spec: vmc_guest::ProcessSpec,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    let tty = spec.tty.is_some();
    let set = block_forwarded(tty);
    let mut conn = AgentConn::connect(
        vsock,
        vmc_guest::AGENT_PORT,
        Duration::from_secs(10),
        &|| vsock.exists(),
    )?;
    spec.stdin = forward_stdin;
    spec.reboot_on_exit = false;
    conn.send(&HostMsg::Start(spec))?;
    match conn.recv()? {
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
