//! Running containers: what a container is ([`ContainerConfig`]), where vmc
//! keeps state, and the microVM runtime. The namespace runtime joins it later.

pub mod agent;
pub mod attach;
pub use crate::host::{new_id, private_dir, private_file};

pub mod caps;
pub mod cgroup;
pub mod copy;
pub mod devices;
pub mod engine;
pub mod follow;
pub mod fsserver;
pub mod guest;
pub mod health;
pub mod jail;
pub mod lifecycle;

pub mod microvm;
pub mod mirror;
pub mod net;
pub mod ns;
pub mod observe;
pub mod pause;
pub mod ports;
pub mod restart;
pub mod sandbox;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod timings;
pub mod tty;
pub mod volume;

use std::path::PathBuf;

pub use vmc_proto::ProcessSpec;

/// CPU and memory given to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub cpus: u8,
    pub memory: u64,
}

/// Cgroup limits of a namespace-mode container; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NsLimits {
    pub memory: Option<u64>,
    pub cpus: Option<u8>,
    pub pids: Option<u64>,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Rootfs {
    /// A directory (`--rootfs`): made into a disk for every run.
    Dir(PathBuf),
    /// An image's prebuilt, cached read-only disk (EROFS).
    Disk(PathBuf),
    /// An image's layers, each unpacked in its own directory, bottom first
    /// (namespace mode's overlayfs lowers).
    Layers(Vec<PathBuf>),
    /// A live directory used as it is, writes included (an OCI bundle's
    /// root, which its engine prepared): a microVM gets it through
    /// virtio-fs, with no disk made of it.
    Shared(PathBuf),
}

impl Rootfs {
    /// The overlayfs lowers of a root on the host (namespace mode), bottom
    /// first: a disk is only for a microVM.
    pub fn lowers(&self) -> Result<Vec<PathBuf>, RuntimeError> {
        match self {
            Rootfs::Layers(l) => Ok(l.clone()),
            Rootfs::Dir(d) => Ok(vec![d.clone()]),
            Rootfs::Shared(_) => Err(RuntimeError::Namespace(
                "a shared root is for a microVM; namespace mode binds it itself".into(),
            )),
            Rootfs::Disk(_) => Err(RuntimeError::Namespace(
                "namespace mode takes an image's layers, not its disk".into(),
            )),
        }
    }
}

/// A container to run: what every engine needs (root filesystem, process,
/// name, network) and the part only its engine reads ([`EngineConfig`]).
/// Stored as the container's `config.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerConfig {
    pub id: String,
    pub rootfs: Rootfs,
    /// The image's id (config digest), when run from an image.
    pub image_id: Option<String>,
    pub process: ProcessSpec,
    pub hostname: String,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<ports::PortMap>,
    /// How the container reaches the network.
    #[serde(default)]
    pub network: net::Network,
    /// A network namespace whose interface a microVM takes over
    /// ([`mirror`]: `vmc-runtime` given its caller's); over `network`.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `--dns`: nameservers for its /etc/resolv.conf (default: the host's).
    #[serde(default)]
    pub dns: Vec<String>,
    /// `--add-host` entries for /etc/hosts; `host-gateway` ones open the
    /// host's loopback through the gateway.
    #[serde(default)]
    pub extra_hosts: Vec<net::ExtraHost>,
    /// Volumes, bind mounts and tmpfs mounts, parents first.
    #[serde(default)]
    pub mounts: Vec<volume::Mount>,
    /// `--read-only`: the root filesystem is mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// `--restart`: what the supervisor does when the workload ends.
    #[serde(default)]
    pub restart: restart::RestartPolicy,
    /// `-i` of a detached container: its stdin stays open, fed by `vmc
    /// attach` through the FIFO `stdin` in its state directory.
    #[serde(default)]
    pub stdin_open: bool,
    /// The health check (the image's HEALTHCHECK, or `--health-*`).
    #[serde(default)]
    pub healthcheck: Option<crate::image::extras::Healthcheck>,
    /// `--init`: a tiny init runs the workload as its child (namespace
    /// mode; a microVM's agent is asked through `process.init`).
    #[serde(default)]
    pub init: bool,
    /// What the engine of the container's [`Mode`] needs.
    pub engine: EngineConfig,
}

impl ContainerConfig {
    /// The mode its engine config is for.
    pub fn mode(&self) -> Mode {
        match self.engine {
            EngineConfig::Vm(_) => Mode::Vm,
            EngineConfig::Ns(_) => Mode::Ns,
        }
    }

    /// The microVM part, for the microVM engine.
    pub fn vm(&self) -> Result<&VmEngineConfig, RuntimeError> {
        match &self.engine {
            EngineConfig::Vm(v) => Ok(v),
            EngineConfig::Ns(_) => Err(RuntimeError::WrongEngine(Mode::Ns, Mode::Vm)),
        }
    }

    /// The namespace part, for the namespace engine.
    pub fn ns(&self) -> Result<&NsEngineConfig, RuntimeError> {
        match &self.engine {
            EngineConfig::Ns(n) => Ok(n),
            EngineConfig::Vm(_) => Err(RuntimeError::WrongEngine(Mode::Vm, Mode::Ns)),
        }
    }
}

/// The engine-specific part of a [`ContainerConfig`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum EngineConfig {
    Vm(VmEngineConfig),
    Ns(NsEngineConfig),
}

/// A microVM's size, kernel and start.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmEngineConfig {
    pub resources: Resources,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Show the guest kernel's console on stderr.
    pub debug: bool,
    /// Boot the kernel instead of restoring the warm-start snapshot.
    #[serde(default)]
    pub cold: bool,
    /// Where warm-start snapshots live (see [`snapshots_dir`]).
    pub snapshots: PathBuf,
    /// The container's writable layer in guest memory instead of on its
    /// scratch disk (`--rm`: it is removed with the container anyway).
    #[serde(default)]
    pub upper_in_memory: bool,
    /// `--start=parked`: restore the image's parked snapshot of this
    /// process when there is one (and have one made when there is not).
    #[serde(default)]
    pub parked: bool,
}

/// Namespace mode's confinement beyond Docker's defaults.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NsEngineConfig {
    /// Cgroup limits (the VM is limited by its size instead).
    #[serde(default)]
    pub limits: NsLimits,
    /// The capability set from `--cap-add`/`--cap-drop` (`None`: Docker's
    /// default set).
    #[serde(default)]
    pub caps: Option<u64>,
    /// The system-call filter (`--security-opt seccomp=`).
    #[serde(default)]
    pub seccomp: seccomp::Seccomp,
}

/// Where a container runs: its own microVM (the default) or Linux
/// namespaces on the host (like crun). Spelled `vm`/`ns` on the command
/// line and in `state.json`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Vm,
    Ns,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Vm => "vm",
            Mode::Ns => "ns",
        })
    }
}

/// Errors running a container.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("rootfs {0} is not a directory")]
    NoRootfs(String),
    #[error("state directory {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Assets(#[from] crate::assets::AssetError),
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error("the VM stopped unexpectedly: {0}")]
    VmCrashed(String),
    /// The VMM process was killed by its seccomp filter (the message names
    /// the call and the thread).
    #[error("{0}")]
    VmmKilled(String),
    #[error("the new warm-start snapshot does not restore into a guest that answers ({0})")]
    SnapshotUnusable(String),
    #[error("namespace mode: {0}")]
    Namespace(String),
    #[error(transparent)]
    Volume(#[from] volume::VolumeError),
    #[error("{0}")]
    Copy(String),
    /// A running container whose process or VM is not recorded yet.
    #[error("the container's {0} is not known yet: try again")]
    NotReady(&'static str),
    #[error("{0}")]
    Network(String),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Ports(#[from] ports::PortError),
    #[error("a container made for {0} mode cannot run in {1} mode")]
    WrongEngine(Mode, Mode),
    #[error(transparent)]
    Container(#[from] state::StateError),
    #[error("image {image}: {message}")]
    Image { image: String, message: String },
}

impl RuntimeError {
    /// Whether the VMM process was killed by its seccomp filter.
    pub fn is_vmm_killed(&self) -> bool {
        matches!(
            self,
            RuntimeError::VmmKilled(_) | RuntimeError::Vmm(crate::vmm::VmmError::Seccomp(_))
        )
    }
}

/// Where "create" ends and "start" begins: an engine makes the container
/// (VM restored or booted, disks mounted; namespace child made, its network
/// connected, waiting before its execve), then opens the gate, and only then
/// runs the workload. The lifecycle's gate records the start, and for a
/// container made by `vmc create` first waits for `vmc start`.
pub trait StartGate {
    /// Blocks until the workload may start; an error ends the run before it
    /// does.
    fn open(&mut self) -> Result<(), RuntimeError>;

    /// The workload's start went through (`Ok`) or failed (its message);
    /// `vmc-runtime`'s `start` answers here. Nothing by default.
    fn started(&mut self, _result: Result<(), &str>) {}
}

/// The signals vmc forwards from its own process to a container's workload
/// (`vmc kill` also sends SIGKILL, which ends the supervisor itself).
pub const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks [`FORWARDED_SIGNALS`] and `extra` in the calling thread (before
/// any other thread exists, only the forwarding ever receives them) and
/// returns the set.
pub(crate) fn block_signals(extra: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the old mask is not needed.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in FORWARDED_SIGNALS.iter().chain(extra) {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Whether `cmd` is an executable file in a directory of `$PATH`.
pub fn on_path(cmd: &str) -> bool {
    find_on_path(cmd).is_some()
}

/// The first file named `cmd` in a directory of `$PATH`.
pub fn find_on_path(cmd: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// vmc's state directory: `$VMC_HOME`, else /var/lib/vmc for root, else
/// `$XDG_DATA_HOME/vmc` (or ~/.local/share/vmc).
pub fn vmc_home() -> PathBuf {
    if let Some(d) = &crate::host::knobs().home {
        return d.clone();
    }
    // Whether vmc runs as root on the host: inside rootless namespace mode's
    // user namespace the euid is 0, but the store stays the user's.
    if !crate::host::rootless() {
        return PathBuf::from("/var/lib/vmc");
    }
    crate::assets::assets_dir()
}

/// Milliseconds since this process started using the runtime, for phase
/// timing in debug logs (`VMC_LOG=debug`).
pub fn elapsed_ms() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
        * 1000.0
}

/// Logs a phase with its time since start.
#[macro_export]
macro_rules! phase {
    ($($arg:tt)*) => {
        log::debug!("[{:9.1} ms] {}", $crate::runtime::elapsed_ms(), format!($($arg)*))
    };
}

/// A microVM's size when `--cpus` and `--memory` are not given.
pub const DEFAULT_VM_CPUS: u8 = 1;
pub const DEFAULT_VM_MEMORY: u64 = 256 << 20;

/// Where warm-start snapshots live: `$VMC_SNAPSHOTS`, else `$VMC_HOME/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    crate::host::knobs()
        .snapshots
        .clone()
        .unwrap_or_else(|| vmc_home().join("snapshots"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A container of `engine` with its root a directory.
    pub(crate) fn config(engine: EngineConfig) -> ContainerConfig {
        ContainerConfig {
            netns: None,
            id: "c".into(),
            rootfs: Rootfs::Dir("/r".into()),
            image_id: None,
            process: ProcessSpec::default(),
            hostname: "h".into(),
            ports: Vec::new(),
            network: Default::default(),
            dns: Vec::new(),
            extra_hosts: Vec::new(),
            mounts: Vec::new(),
            read_only: false,
            restart: Default::default(),
            init: false,
            healthcheck: None,
            stdin_open: false,
            engine,
        }
    }

    /// `config.json` names the engine (`"mode"`) next to its own fields,
    /// reads back as the same engine, and an engine asked for the other
    /// mode's part refuses by name.
    #[test]
    fn the_engine_part_is_tagged_by_mode_and_checked() {
        let vm = config(EngineConfig::Vm(VmEngineConfig {
            upper_in_memory: false,
            parked: false,
            resources: Resources {
                cpus: 2,
                memory: 512 << 20,
            },
            kernel: "/k".into(),
            debug: false,
            cold: true,
            snapshots: "/s".into(),
        }));
        let json: serde_json::Value = serde_json::to_value(&vm).unwrap();
        assert_eq!(json["engine"]["mode"], "vm");
        assert_eq!(json["engine"]["resources"]["cpus"], 2);
        let back: ContainerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.mode(), Mode::Vm);
        assert!(back.vm().unwrap().cold);
        assert_eq!(
            back.ns().unwrap_err().to_string(),
            "a container made for vm mode cannot run in ns mode"
        );

        let ns = config(EngineConfig::Ns(NsEngineConfig {
            limits: NsLimits {
                pids: Some(10),
                ..Default::default()
            },
            ..Default::default()
        }));
        let json = serde_json::to_value(&ns).unwrap();
        assert_eq!(json["engine"]["mode"], "ns");
        let back: ContainerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.ns().unwrap().limits.pids, Some(10));
        assert!(matches!(
            back.vm(),
            Err(RuntimeError::WrongEngine(Mode::Ns, Mode::Vm))
        ));
    }
}
