//! The microVM runtime: disks from the container's root filesystem, a VM with
//! the guest agent as PID 1 (cold boot or warm start from a snapshot), and
//! the waits for its agent, bounded by the guest's progress. The sessions
//! that run a process attached to vmc's stdio are in [`super::attach`].

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmc_proto::{GuestMsg, HostMsg, RootSpec, AGENT_PORT};

use super::agent::{AgentConn, AgentError};
pub use super::guest::{
    ended, or_cancelled, process_watch, unplugged, verdict, vm_config, ANSWER_CPU, BOOT_CPU,
    GUEST_CID, GUEST_MAC, RESET_TIMEOUT, SCRATCH_SIZE,
};
use super::jail::{self, Vm};
use super::{snapshot, ContainerConfig, RuntimeError};
use crate::assets;
use crate::disk;
use crate::vmm::progress::Watchdog;
use crate::vmm::{self, Backend, VmExit, VmmError};

/// What the guest's interface is given.
#[derive(Debug, Clone, Copy)]
struct Addressing {
    ipv4: super::net::HostIpv4,
    /// The address to take (a network namespace's interface's).
    mac: Option<[u8; 6]>,
    mtu: u16,
}

/// How a microVM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Boot the kernel.
    Cold,
    /// Restore the warm-start snapshot (made on first need).
    Warm,
}

/// Whether `scratch` is a scratch disk a run left (of the size made).
fn scratch_kept(scratch: &Path) -> bool {
    std::fs::metadata(scratch).is_ok_and(|m| m.is_file() && m.len() == SCRATCH_SIZE)
}

/// A booted (or booting) microVM.
pub struct MicroVm {
    /// Restored from a parked snapshot: its process waits at its entry
    /// (`HostMsg::StartParked` lets it run).
    parked: bool,
    vm: Vm,
    vsock: PathBuf,
    /// Sizes in sectors of the image and scratch disks, for the agent.
    disk_sectors: (u64, u64),
    restored: bool,
    /// When the vCPUs started (ms since process start), for `vmc bench`.
    running_ms: f64,
    /// The VM's passt (with `--network passt`), or the relay of the network
    /// namespace's interface it took over (`netns`).
    _passt: Option<super::net::Passt>,
    _mirror: Option<super::mirror::Mirror>,
    /// The guest interface's addressing (with a network).
    addressing: Option<Addressing>,
    /// The snapshot it was restored from.
    snapshot: Option<snapshot::Restored>,
    /// The file server of its volumes (killed with the VM).
    _fs_server: Option<super::fsserver::Running>,
    /// What the agent mounts in the root, and `--read-only`.
    mounts: Vec<vmc_proto::GuestMount>,
    read_only: bool,
    /// The share that is the root ([`super::Rootfs::Shared`]).
    root_share: Option<u32>,
}

impl MicroVm {
    /// Builds the disks in `dir` and boots the VM cold.
    pub fn boot(cfg: &ContainerConfig, dir: &Path) -> Result<MicroVm, RuntimeError> {
        Self::start(cfg, dir, Start::Cold)
    }

    /// Builds the disks in `dir` and starts the VM, cold or from the
    /// warm-start snapshot (`--debug` always boots cold, to show the boot).
    pub fn start(cfg: &ContainerConfig, dir: &Path, how: Start) -> Result<MicroVm, RuntimeError> {
        let vm_cfg = cfg.vm()?;
        if let super::Rootfs::Dir(d) | super::Rootfs::Shared(d) = &cfg.rootfs {
            if !d.is_dir() {
                return Err(RuntimeError::NoRootfs(d.display().to_string()));
            }
        }
        // The jailed VMM process starts now: its exec and cgroup join
        // overlap the disks and snapshot lookups below.
        let mut pending = if crate::host::knobs().jail {
            Some(jail::Pending::start(
                vm_cfg.resources.cpus,
                vm_cfg.resources.memory,
            )?)
        } else {
            None
        };
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
        super::timings::mark("prepare");
        crate::phase!("start: building disks");
        let image = match &cfg.rootfs {
            super::Rootfs::Dir(d) => {
                let image = dir.join("image.erofs");
                disk::build_erofs(d, &image)?;
                image
            }
            super::Rootfs::Disk(p) => p.clone(),
            // No image disk: an empty one in its slot (the device layout
            // is the snapshots').
            super::Rootfs::Shared(_) => {
                let image = dir.join("image.empty");
                std::fs::File::create(&image).map_err(|source| RuntimeError::State {
                    path: image.display().to_string(),
                    source,
                })?;
                image
            }
            super::Rootfs::Layers(_) => {
                return Err(RuntimeError::Namespace(
                    "unpacked layers are for namespace mode; a microVM takes the image's disk"
                        .into(),
                ))
            }
        };
        let scratch = dir.join("scratch.ext4");
        if vm_cfg.upper_in_memory || matches!(cfg.rootfs, super::Rootfs::Shared(_)) {
            // The writable layer is in guest memory (or the shared root
            // takes the writes): an empty disk in the
            // slot (as in a ready snapshot, so its size does not change).
            std::fs::File::create(&scratch).map_err(|source| RuntimeError::State {
                path: scratch.display().to_string(),
                source,
            })?;
        } else if super::state::was_started(dir) && scratch_kept(&scratch) {
            // A container started again (`vmc start`, a restart policy)
            // keeps its writable layer: the scratch disk of its last run.
            disk::check_scratch(&scratch)?;
        } else {
            disk::build_scratch(&scratch, SCRATCH_SIZE)?;
        }
        crate::phase!("disks built");
        let home = super::vmc_home();
        let agent = disk::agent_disk(&assets::guest_binary()?, &home.join("cache"))?;
        super::timings::mark("disks");
        let vsock = dir.join("vsock.sock");
        let disk_sectors = (
            super::guest::sectors(&image),
            super::guest::sectors(&scratch),
        );
        let (cpus, memory) = (vm_cfg.resources.cpus, vm_cfg.resources.memory);
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
        let taken = cfg.netns.as_deref().map(super::mirror::take).transpose()?;
        let (ours, net, addressing) = match (taken.flatten(), host) {
            (Some((ours, m)), _) => {
                let a = Addressing {
                    ipv4: m.taken.ipv4,
                    mac: Some(m.taken.mac),
                    mtu: m.taken.mtu,
                };
                (ours, (None, Some(m)), Some(a))
            }
            (None, Some(h)) if cfg.netns.is_none() => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(state_err)?;
                let p = super::net::Passt::start(
                    theirs,
                    &h,
                    super::net::maps_host_loopback(&cfg.extra_hosts),
                )?;
                let a = Addressing {
                    ipv4: h,
                    mac: None,
                    mtu: crate::devices::virtio::net::MTU,
                };
                (ours, (Some(p), None), Some(a))
            }
            (None, _) => (unplugged().map_err(state_err)?, (None, None), None),
        };
        // Volumes: made (and an empty one filled from the image), then
        // served by a file server of their own behind the virtio-fs device.
        let (mut shares, mounts) = guest_mounts(&cfg.mounts);
        // A shared root is the last share.
        let root_share = match &cfg.rootfs {
            super::Rootfs::Shared(d) => {
                shares.push(super::fsserver::Share {
                    source: d.clone(),
                    readonly: false,
                });
                Some(shares.len() as u32 - 1)
            }
            _ => None,
        };
        for m in super::volume::prepare(&cfg.mounts)? {
            if let (Some(data), Some(id)) = (m.host_path(), &cfg.image_id) {
                fill_from_image(id, &m.target, &data, dir)?;
            }
        }
        let fs_server = if shares.is_empty() {
            None
        } else {
            Some(
                super::fsserver::start(&shares, &dir.join("fs-root")).map_err(|e| {
                    RuntimeError::Volume(super::volume::VolumeError::Io("(server)".into(), e))
                })?,
            )
        };
        let (fs_server, fs_end) = match fs_server {
            Some((running, fd)) => (Some(running), Some(fd)),
            None => (None, None),
        };
        // Each attempt (a snapshot that fails to restore is followed by
        // another) gets its own descriptor of our end of the network.
        let config = |console| -> Result<vmm::VmConfig, RuntimeError> {
            Ok(vm_config(
                &vm_cfg.kernel,
                &agent,
                &image,
                &scratch,
                &vsock,
                cpus,
                memory,
                console,
                ours.try_clone().map_err(state_err)?,
                fs_end
                    .as_ref()
                    .map(|f| f.try_clone())
                    .transpose()
                    .map_err(state_err)?,
            ))
        };
        // The VM, booted (no snapshot) or restored from `snapshot`.
        let made = |vm: Vm, snapshot: Option<snapshot::Restored>| {
            if let Some(c) = vm.confinement() {
                // What `vmc inspect` shows of the VMM's confinement.
                if let Ok(text) = serde_json::to_string(c) {
                    let _ = std::fs::write(dir.join("vmm.json"), text);
                }
            }
            MicroVm {
                vm,
                vsock: vsock.clone(),
                disk_sectors,
                restored: snapshot.is_some(),
                parked: false,
                running_ms: super::elapsed_ms(),
                _passt: net.0,
                _mirror: net.1,
                addressing,
                snapshot,
                _fs_server: fs_server,
                mounts,
                read_only: cfg.read_only,
                root_share,
            }
        };
        if how == Start::Cold || vm_cfg.debug {
            let console: Option<Box<dyn Write + Send>> = if vm_cfg.debug {
                Some(Box::new(std::io::stderr()))
            } else {
                None
            };
            let vm = jail::start(config(console)?, None, pending.take())?;
            super::timings::mark("vmm boot");
            return Ok(made(vm, None));
        }
        let spec = snapshot::SnapshotSpec {
            kernel: &vm_cfg.kernel,
            agent_disk: &agent,
            cpus,
            memory,
            backend: Backend::host(),
        };
        // A --rm run of an image: its ready snapshot (root mounted), when
        // there is one and they are asked for; a failure there falls back
        // to the base snapshot.
        // --start=parked asks for its own kind of ready snapshot by name.
        let ready_asked = crate::host::knobs().ready_snapshots || vm_cfg.parked;
        if let (true, true, super::Rootfs::Disk(image)) =
            (ready_asked, vm_cfg.upper_in_memory, &cfg.rootfs)
        {
            let warm = if vm_cfg.parked {
                park_spec(&cfg.process)
            } else {
                warm_spec(&cfg.process)
            };
            let ready = snapshot::ReadySpec {
                base: spec,
                image_disk: image,
                warm: Some(&warm),
                park: vm_cfg.parked,
            };
            let found = snapshot::ready(&vm_cfg.snapshots, &ready);
            super::timings::mark("ready snapshot");
            match found {
                Ok(Some((d, k))) => {
                    let restored = snapshot::Restored::of(&d, &k);
                    match jail::start(config(None)?, Some((&d, &k)), pending.take()) {
                        Ok(vm) => {
                            super::timings::mark("vmm restore");
                            let mut m = made(vm, Some(restored));
                            m.parked = vm_cfg.parked;
                            return Ok(m);
                        }
                        Err(e) => {
                            // Moved aside: a later run makes a new one.
                            let _ = snapshot::quarantine(&restored);
                            eprintln!(
                                "vmc: warning: the ready snapshot {} is unusable ({e}); moved it aside and using the warm-start snapshot",
                                d.display()
                            )
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!(
                    "vmc: warning: no ready snapshot of this image ({}); using the warm-start snapshot",
                    crate::host::error_line(&e)
                ),
            }
        }
        let (snap, key) = snapshot::ensure(&vm_cfg.snapshots, &spec, false)?;
        super::timings::mark("snapshot");
        crate::phase!("snapshot ready; restoring");
        let restored = snapshot::Restored::of(&snap, &key);
        let (vm, restored) = match jail::start(config(None)?, Some((&snap, &key)), pending.take()) {
            Ok(vm) => (vm, restored),
            Err(VmmError::Snapshot(e)) => {
                eprintln!(
                    "vmc: warning: the warm-start snapshot {} is unusable ({e}); rebuilding it",
                    snap.display()
                );
                let (snap, key) = snapshot::ensure(&vm_cfg.snapshots, &spec, true)?;
                let restored = snapshot::Restored::of(&snap, &key);
                (
                    jail::start(config(None)?, Some((&snap, &key)), None)?,
                    restored,
                )
            }
            Err(e) => return Err(e.into()),
        };
        crate::phase!("restored; vCPUs running");
        super::timings::mark("vmm restore");
        Ok(made(vm, Some(restored)))
    }

    /// Starts the VM as [`Self::start`] does, waits for its agent (a restored
    /// guest also gets its clock and entropy refreshed) and has it mount the
    /// container root that `root` describes. A guest restored from a snapshot
    /// that stops making progress before that (see `vmm::progress`) never
    /// stalls the run: the snapshot is moved aside with the hung guest's state
    /// (the next warm start makes a new one), one line says so, and the run
    /// starts again from a cold boot. `cancelled` ends the wait (a signal for
    /// the workload arrived before it ran).
    pub fn start_ready(
        cfg: &ContainerConfig,
        dir: &Path,
        how: Start,
        root: &dyn Fn(&MicroVm) -> RootSpec,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(MicroVm, AgentConn), RuntimeError> {
        let mvm = MicroVm::start(cfg, dir, how)?;
        let err = match mvm.greet(root, cancelled) {
            Ok(conn) => return Ok((mvm, conn)),
            Err(e) => e,
        };
        let snap = mvm.snapshot.clone();
        match (err, snap) {
            (AgentError::Hung(why), Some(snap)) => {
                let moved = match snapshot::quarantine(&snap) {
                    Ok(Some(to)) => {
                        mvm.save_hung_state(&to.join("hung"), &snap.key);
                        format!(
                            "moved it to {} (the next run makes a new one)",
                            to.display()
                        )
                    }
                    Ok(None) => "another run has moved it already".into(),
                    Err(e) => format!("could not move it aside ({e})"),
                };
                mvm.stop();
                // A ready snapshot's run starts again from the warm-start
                // snapshot, a warm-start snapshot's from a cold boot.
                let (kind, retry, with) = if snap.is_ready() {
                    ("ready", how, "from the warm-start snapshot")
                } else {
                    ("warm-start", Start::Cold, "with a cold boot")
                };
                eprintln!(
                    "vmc: warning: the guest restored from the {kind} snapshot {} did not answer ({why}); {moved}; retrying {with}",
                    snap.dir.display(),
                );
                let mvm = MicroVm::start(cfg, dir, retry)?;
                match mvm.greet(root, cancelled) {
                    Ok(conn) => Ok((mvm, conn)),
                    Err(e) => Err(ended(e, mvm.stop())),
                }
            }
            (e, _) => Err(ended(e, mvm.stop())),
        }
    }

    /// Saves the state of a guest that stopped answering into `dir` (a
    /// snapshot: `vmc system inspect-snapshot` shows where it waits).
    fn save_hung_state(&self, dir: &Path, key: &str) {
        let saved = std::fs::create_dir(dir)
            .map_err(vmm::snapshot::SnapshotError::from)
            .and_then(|_| self.vm.save_as_is(dir, key));
        if let Err(e) = saved {
            log::debug!("saving the hung guest's state in {}: {e}", dir.display());
        }
    }

    /// Connects to the agent, refreshes a restored guest's clock and
    /// entropy, and mounts the container root.
    fn greet(
        &self,
        root: &dyn Fn(&MicroVm) -> RootSpec,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<AgentConn, AgentError> {
        let mut watch = or_cancelled(cancelled, self.watch(BOOT_CPU));
        let mut conn = AgentConn::connect_then(&self.vsock, AGENT_PORT, &mut watch, true, &[])?;
        crate::phase!("agent connected");
        super::timings::mark("agent connect");
        let expect = |answer: GuestMsg, want: GuestMsg| match answer {
            a if a == want => Ok(()),
            GuestMsg::Error(e) => Err(AgentError::remote(e)),
            other => Err(AgentError::unexpected(&other)),
        };
        // Both requests go at once (the agent takes them in order and stops
        // at the first that fails): one round trip to the guest, not two.
        // Not with the Hello: sent there, they made the run 30-50 ms slower
        // to its mount here (measured with --timings, n=10).
        if self.restored {
            conn.send(&MicroVm::refresh_msg())?;
        }
        conn.send(&HostMsg::Mount(root(self)))?;
        if self.restored {
            let mut watch = or_cancelled(cancelled, self.watch(ANSWER_CPU));
            expect(conn.recv_watched(&mut watch)?, GuestMsg::Refreshed)?;
            crate::phase!("guest refreshed");
            super::timings::mark("refresh");
        }
        let mut watch = or_cancelled(cancelled, self.watch(ANSWER_CPU));
        expect(conn.recv_watched(&mut watch)?, GuestMsg::Mounted)?;
        crate::phase!("root mounted");
        super::timings::mark("mount");
        Ok(conn)
    }

    /// A [`agent::Watch`](super::agent::Watch) over this VM: it fails once the
    /// VM stopped, or once its guest is hung (halted with nothing to do for
    /// `vmm::progress::QUIET_LIMIT`, or `cpu` of vCPU time spent).
    pub fn watch(&self, cpu: Duration) -> impl FnMut() -> Result<(), AgentError> + '_ {
        let mut dog = Watchdog::new(cpu);
        move || verdict(self.vm.judge(&mut dog))
    }

    /// Sends `msg` to the agent and waits for its answer while the guest
    /// makes progress.
    pub fn request(&self, conn: &mut AgentConn, msg: &HostMsg) -> Result<GuestMsg, AgentError> {
        conn.request(msg, &mut self.watch(ANSWER_CPU))
    }

    /// Whether the VM was restored from a parked snapshot: its process waits
    /// for `HostMsg::StartParked`.
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Whether the VM was restored from a snapshot (its clock and entropy
    /// need a [`HostMsg::Refresh`] before use).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The refresh message for a restored guest: host time and 64 fresh bytes.
    pub fn refresh_msg() -> HostMsg {
        super::guest::refresh_msg()
    }

    /// Opens another connection to the (running) guest agent.
    pub fn connect(&self) -> Result<AgentConn, AgentError> {
        AgentConn::connect(&self.vsock, AGENT_PORT, &mut self.watch(ANSWER_CPU))
    }

    /// Opens another connection, sending `first` with its Hello (see
    /// [`AgentConn::connect_then`]).
    pub fn connect_sending(&self, first: HostMsg) -> Result<AgentConn, AgentError> {
        AgentConn::connect_then(
            &self.vsock,
            AGENT_PORT,
            &mut self.watch(ANSWER_CPU),
            false,
            &[first],
        )
    }

    /// The root filesystem layout inside the guest (with `etc`: Docker's
    /// resolv.conf, hosts and hostname over the image's), and its network.
    pub fn root_spec(
        &self,
        hostname: &str,
        etc: Vec<(String, String)>,
        upper_in_memory: bool,
    ) -> RootSpec {
        RootSpec {
            image_dev: super::guest::IMAGE_DEV.into(),
            image_fstype: "erofs".into(),
            scratch_dev: super::guest::SCRATCH_DEV.into(),
            hostname: hostname.into(),
            image_sectors: self.disk_sectors.0,
            scratch_sectors: self.disk_sectors.1,
            network: self.addressing.map(|a| vmc_proto::NetSpec {
                ifname: super::guest::NET_IF.into(),
                address: a.ipv4.address.octets(),
                prefix: a.ipv4.prefix,
                gateway: a.ipv4.gateway.octets(),
                mtu: a.mtu,
                mac: a.mac,
            }),
            link: None,
            etc,
            upper_in_memory,
            mounts: self.mounts.clone(),
            read_only: self.read_only,
            root_share: self.root_share,
        }
    }

    /// The guest's IPv4 address, if it has a network.
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.addressing.map(|a| a.ipv4.address)
    }

    /// For `vmc bench`: writes this process's peak RSS and the guest's
    /// resident memory to the file named by `VMC_MEM_REPORT`, if set.
    pub fn write_mem_report(&self) {
        if let Some(p) = &crate::host::knobs().mem_report {
            let (rss, dirty) = self.vm.guest_memory_kib();
            let doc = serde_json::json!({
                "vm_hwm_kib": self.vm.vmm_peak_rss_kib(),
                "vmm_pid": self.vm.confinement().map(|c| c.pid),
                "guest_rss_kib": rss,
                "guest_dirty_kib": dirty,
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

    /// The VMM's confinement (None: it runs in this process, `VMC_JAIL=0`).
    pub fn confinement(&self) -> Option<&jail::Confinement> {
        self.vm.confinement()
    }
}

/// An image just arrived in the store (`build`, `pull`, `import`, `load`):
/// the ready snapshot a default `vmc run --rm IMAGE` restores (the default
/// VM size, the image's own command) is made in the background once this
/// command ends, so that even the image's first run restores it. Nothing
/// is done without KVM, with ready snapshots off, or without the kernel
/// and the agent (a run reports those).
pub fn ready_for_new_image(img: &crate::image::StoredImage) {
    if !crate::host::knobs().ready_snapshots || vmm::open_kvm().is_err() {
        return;
    }
    let explicit = std::env::var_os("VMC_KERNEL").map(PathBuf::from);
    let Ok(kernel) = assets::kernel(explicit.as_deref()) else {
        return;
    };
    let cache = super::vmc_home().join("cache");
    let Ok(agent) = assets::guest_binary()
        .map_err(|e| e.to_string())
        .and_then(|g| disk::agent_disk(&g, &cache).map_err(|e| e.to_string()))
    else {
        return;
    };
    let process = super::spec::process(
        img.config.config().as_ref(),
        &super::spec::RunOverrides::default(),
    );
    snapshot::pend(snapshot::ReadyJob {
        snapshots: super::snapshots_dir(),
        kernel,
        agent_disk: agent,
        cpus: super::DEFAULT_VM_CPUS,
        memory: super::DEFAULT_VM_MEMORY,
        image_disk: PathBuf::new(),
        image: Some(img.id()),
        warm: process.ok().map(|p| warm_spec(&p)),
        park: false,
        key: String::new(),
    });
}

/// The process a parked snapshot holds for a run's: the same, but for
/// HOSTNAME (a new container's name each run; the parked process goes
/// without it) and how this run attaches (stdin, the end of the VM).
fn park_spec(process: &vmc_proto::ProcessSpec) -> vmc_proto::ProcessSpec {
    vmc_proto::ProcessSpec {
        env: process
            .env
            .iter()
            .filter(|e| !e.starts_with("HOSTNAME="))
            .cloned()
            .collect(),
        stdin: false,
        reboot_on_exit: false,
        tty: None,
        resolved: None,
        ..process.clone()
    }
}

/// What a ready snapshot's agent needs to find `process`'s executable,
/// and nothing more: the snapshot's memory is every later run's, so the
/// run's arguments and environment (secrets, often) stay out of it.
fn warm_spec(process: &vmc_proto::ProcessSpec) -> vmc_proto::ProcessSpec {
    vmc_proto::ProcessSpec {
        args: process.args.iter().take(1).cloned().collect(),
        env: process
            .env
            .iter()
            .filter(|e| e.starts_with("PATH="))
            .cloned()
            .collect(),
        cwd: process.cwd.clone(),
        user: process.user.clone(),
        ..Default::default()
    }
}

/// The file server's shares and the agent's mounts for `mounts`: each bind
/// or volume is share `N` (the order of `mounts`), a tmpfs is the agent's
/// own.
fn guest_mounts(
    mounts: &[super::volume::Mount],
) -> (Vec<super::fsserver::Share>, Vec<vmc_proto::GuestMount>) {
    use vmc_proto::{GuestMount, GuestMountKind};
    let mut shares = Vec::new();
    let mut guest = Vec::new();
    for m in mounts {
        let kind = match (&m.source, m.host_path()) {
            (super::volume::MountSource::Tmpfs { flags, data }, _) => GuestMountKind::Tmpfs {
                flags: *flags,
                data: data.clone(),
            },
            (_, Some(source)) => {
                let file = !source.is_dir();
                shares.push(super::fsserver::Share {
                    source,
                    readonly: m.readonly,
                });
                GuestMountKind::Share {
                    index: shares.len() as u32 - 1,
                    file,
                }
            }
            (_, None) => continue,
        };
        guest.push(GuestMount {
            target: m.target.clone(),
            readonly: m.readonly,
            kind,
        });
    }
    (shares, guest)
}

/// Fills the empty volume directory `data` from `target` of image `id`'s
/// root: its layers (unpacked as namespace mode unpacks them) stacked in an
/// overlay mounted, read-only, in a mount namespace of a thread of its own,
/// which goes with the thread.
fn fill_from_image(id: &str, target: &str, data: &Path, dir: &Path) -> Result<(), RuntimeError> {
    let home = super::vmc_home();
    let store = crate::image::Store::open(&home)
        .map_err(|e| RuntimeError::Namespace(format!("the image store: {e}")))?;
    let img = store
        .resolve(id)
        .map_err(|e| RuntimeError::Namespace(format!("the image of a volume: {e}")))?;
    let layers = crate::image::disk::layer_dirs(&store, &img, &home.join("cache"))
        .map_err(|e| RuntimeError::Namespace(format!("unpacking the image's layers: {e}")))?;
    let at = dir.join("fill-root");
    let what = format!("filling {} from the image's {target}", data.display());
    let (target, data) = (target.to_string(), data.to_path_buf());
    let io = |what: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let filled = std::thread::spawn(move || -> std::io::Result<()> {
        // This thread's own mounts (CLONE_FS), gone with it.
        vmc_spawn::sys::unshare_mounts(libc::CLONE_FS).map_err(io("a mount namespace"))?;
        let root = match layers.as_slice() {
            [] => return Ok(()),
            [one] => one.clone(),
            many => {
                std::fs::create_dir_all(&at)?;
                let lower: Vec<String> =
                    many.iter().rev().map(|p| p.display().to_string()).collect();
                vmc_spawn::sys::mount(
                    Some("overlay"),
                    &at.display().to_string(),
                    Some("overlay"),
                    libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
                    Some(&format!("lowerdir={}", lower.join(":"))),
                )
                .map_err(io("mounting the image's layers"))?;
                at.clone()
            }
        };
        super::volume::populate(&root, &target, &data)
    });
    filled
        .join()
        .map_err(|_| RuntimeError::Namespace("filling a volume: the thread failed".into()))?
        .map_err(|e| RuntimeError::Volume(super::volume::VolumeError::Io(what, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ready snapshot keeps only what finds the executable: no argument
    /// beyond argv[0], no variable but PATH (a run's secrets would be in
    /// every later run's memory).
    #[test]
    fn the_warm_spec_carries_nothing_of_the_run_but_its_executable() {
        let run = vmc_proto::ProcessSpec {
            args: vec!["app".into(), "--token=s3cret".into()],
            env: vec![
                "PATH=/opt/bin:/bin".into(),
                "API_KEY=s3cret".into(),
                "HOSTNAME=x".into(),
            ],
            cwd: "/srv".into(),
            user: "app".into(),
            stdin: true,
            reboot_on_exit: true,
            tty: None,
            resolved: None,
            init: true,
        };
        let w = warm_spec(&run);
        assert_eq!(w.args, ["app"]);
        assert_eq!(w.env, ["PATH=/opt/bin:/bin"]);
        assert_eq!((w.cwd.as_str(), w.user.as_str()), ("/srv", "app"));
        assert!(!format!("{w:?}").contains("s3cret"));
    }
}
