//! Running containers: what a container is ([`ContainerConfig`]), where vmc
//! keeps state, and the microVM runtime. The namespace runtime joins it later.

pub mod agent;
pub mod attach;
pub mod caps;
pub mod cgroup;
pub mod devices;

pub mod microvm;
pub mod net;
pub mod ns;
pub mod ports;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod tty;

use std::path::{Path, PathBuf};

pub use vmc_guest::ProcessSpec;

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
}

/// A container to run: its root filesystem, process and limits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerConfig {
    pub id: String,
    pub rootfs: Rootfs,
    /// The image's id (config digest), when run from an image.
    pub image_id: Option<String>,
    pub process: ProcessSpec,
    pub hostname: String,
    pub resources: Resources,
    /// Guest kernel (VM mode).
    pub kernel: PathBuf,
    /// Show the guest kernel's console on stderr.
    pub debug: bool,
    /// Where warm-start snapshots live (see [`snapshots_dir`]).
    pub snapshots: PathBuf,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<ports::PortMap>,
    /// Namespace mode's cgroup limits (the VM is limited by its size).
    #[serde(default)]
    pub limits: NsLimits,
    /// How the container reaches the network.
    #[serde(default)]
    pub network: net::Network,
    /// `--dns`: nameservers for its /etc/resolv.conf (default: the host's).
    #[serde(default)]
    pub dns: Vec<String>,
    /// `--add-host` entries for /etc/hosts; `host-gateway` ones open the
    /// host's loopback through the gateway.
    #[serde(default)]
    pub extra_hosts: Vec<net::ExtraHost>,
    /// Namespace mode: the capability set from `--cap-add`/`--cap-drop`
    /// (`None`: Docker's default set).
    #[serde(default)]
    pub caps: Option<u64>,
    /// Namespace mode: the system-call filter (`--security-opt seccomp=`).
    #[serde(default)]
    pub seccomp: seccomp::Seccomp,
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
    #[error("the new warm-start snapshot does not restore into a guest that answers ({0})")]
    SnapshotUnusable(String),
    #[error("namespace mode: {0}")]
    Namespace(String),
    #[error("{0}")]
    Network(String),
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
    if let Some(d) = std::env::var_os("VMC_HOME") {
        return PathBuf::from(d);
    }
    // Whether vmc runs as root on the host: inside rootless namespace mode's
    // user namespace the euid is 0, but the store stays the user's.
    if !ns::rootless() {
        return PathBuf::from("/var/lib/vmc");
    }
    crate::assets::assets_dir()
}

/// Creates `dir` (and its parents) with mode 0700, for vmc's own state:
/// nothing under it is another local user's business (unpacked layers keep
/// set-id bits and file capabilities; containers hold their environment).
/// An existing `dir` of this user's is tightened to 0700 when it is empty
/// or a vmc store (an older store made 0755); any other existing directory
/// (another user's, or one holding other things) is left as it is.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                r => r?,
            }
            // The mode asked for is subject to the umask; set it whole.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions.
            let mine = m.uid() == unsafe { libc::geteuid() };
            let ours = mine
                && (dir.join("oci-layout").exists() || std::fs::read_dir(dir)?.next().is_none());
            if m.is_dir() && ours && m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}

/// Opens `path` for writing, created with mode 0600 (truncating it unless
/// `append`): for files that hold a container's secrets (its environment,
/// its output, its disk, its memory).
pub fn private_file(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(path)
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

/// Where warm-start snapshots live: `$VMC_SNAPSHOTS`, else `$VMC_HOME/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    std::env::var_os("VMC_SNAPSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmc_home().join("snapshots"))
}

/// A new random container id (64 hex digits, like Docker's).
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    let mut done = 0;
    while done < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of b.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_made_0700_and_only_ours_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let t = tempfile::tempdir().unwrap();
        // New, parents included.
        let new = t.path().join("a/b/vmc");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        // An older store (0755, with its oci-layout) and an empty directory
        // are tightened; a directory holding other things is left alone.
        set(&new, 0o755);
        std::fs::write(new.join("oci-layout"), "{}").unwrap();
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700, "an existing store");
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        set(&empty, 0o755);
        private_dir(&empty).unwrap();
        assert_eq!(mode(&empty), 0o700, "an empty directory");
        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes"), "").unwrap();
        set(&other, 0o755);
        private_dir(&other).unwrap();
        assert_eq!(mode(&other), 0o755, "someone's directory with other files");
        // Another user's empty directory is not ours to change (vmc as that
        // directory's non-owner would fail there).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            set(&theirs, 0o777);
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            private_dir(&theirs).unwrap();
            assert_eq!(mode(&theirs), 0o777);
        }
        // Files for secrets are 0600 whatever the umask.
        let f = t.path().join("secret");
        private_file(&f, false).unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn ids_are_64_hex_digits_and_differ() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }
}
