//! Namespace mode: the same container (image, process spec) run as a plain
//! Linux container on the host, the way crun would, instead of in a microVM.
//!
//! vmc moves itself into a private mount namespace and mounts the
//! container's root there: overlayfs over the image's layers (each unpacked
//! once into the store's cache) with a per-container upper directory. The
//! workload is started by the same code the guest agent uses in the VM
//! (`vmc_spawn`), with new pid, mount, uts, ipc, net and cgroup
//! namespaces; in its namespace it mounts /proc, a read-only /sys and a
//! minimal /dev, masks what Docker masks, pivots into the root, keeps Docker's
//! default capabilities only, sets no_new_privs and execs. All mounts vanish
//! with the processes: nothing is left mounted on the host.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use vmc_proto::ExitStatus;
use vmc_spawn::{self as spawn, Isolation, RootOp, DOCKER_DEFAULT_CAPS};

use super::net::{Network, Pasta};
use super::timings;
use super::{ContainerConfig, RuntimeError};
use crate::host::rootless;

mod attend;
mod reexec;

use attend::attend;
pub use attend::block_forwarded;
pub use reexec::{
    on_read_only_mount, own_binary_read_only, run_from_read_only_binary, user_namespace,
    REEXECUTED, REEXEC_ENV,
};

/// Errors specific to namespace mode.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("namespace mode without root needs user namespaces, which this kernel refuses ({0}): enable them (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) or run vmc as root")]
    NoUserns(std::io::Error),
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error(transparent)]
    Seccomp(#[from] super::seccomp::SeccompError),
}

impl From<NsError> for RuntimeError {
    fn from(e: NsError) -> Self {
        RuntimeError::Namespace(e.to_string())
    }
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NsError {
    let what = what.into();
    move |source| NsError::Sys { what, source }
}

fn check(r: libc::c_int, what: &str) -> Result<(), NsError> {
    if r < 0 {
        Err(sys(what)(std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// The mounts and links that make a root look like a Docker container's
/// root from inside (run in the workload's own pid and mount namespaces).
/// Paths are inside the root and resolve inside it.
pub fn root_ops() -> Vec<RootOp> {
    let at = |p: &str| p.to_string();
    let mount = |source: &str,
                 target: String,
                 fstype: &str,
                 flags: libc::c_ulong,
                 data: &str,
                 optional: bool| {
        RootOp::Mount {
            source: source.into(),
            // Only the read-only binds below name a source in the root;
            // they are marked there.
            source_in_root: false,
            target,
            fstype: fstype.into(),
            flags,
            data: data.into(),
            optional,
        }
    };
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut ops = vec![
        RootOp::Mkdir(at("/proc"), 0o555),
        mount("proc", at("/proc"), "proc", nodev, "", false),
        RootOp::Mkdir(at("/sys"), 0o555),
        mount(
            "sysfs",
            at("/sys"),
            "sysfs",
            nodev | libc::MS_RDONLY,
            "",
            false,
        ),
        RootOp::Mkdir(at("/dev"), 0o755),
        // nodev too: the nodes below are bind mounts of the host's, which
        // keep their own mounts' flags; one made here cannot be opened.
        mount(
            "tmpfs",
            at("/dev"),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
            "mode=755,size=65536k",
            false,
        ),
    ];
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        ops.push(RootOp::Touch(at(&format!("/dev/{n}"))));
        ops.push(mount(
            &format!("/dev/{n}"),
            at(&format!("/dev/{n}")),
            "",
            libc::MS_BIND,
            "",
            false,
        ));
    }
    ops.extend([
        RootOp::Mkdir(at("/dev/pts"), 0o755),
        mount(
            "devpts",
            at("/dev/pts"),
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
            false,
        ),
        RootOp::Symlink {
            target: "pts/ptmx".into(),
            link: at("/dev/ptmx"),
        },
        RootOp::Mkdir(at("/dev/shm"), 0o1777),
        mount(
            "shm",
            at("/dev/shm"),
            "tmpfs",
            nodev,
            "mode=1777,size=65536k",
            false,
        ),
        RootOp::Mkdir(at("/dev/mqueue"), 0o755),
        mount("mqueue", at("/dev/mqueue"), "mqueue", nodev, "", true),
        RootOp::Symlink {
            target: "/proc/self/fd".into(),
            link: at("/dev/fd"),
        },
    ]);
    for (i, n) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        ops.push(RootOp::Symlink {
            target: format!("/proc/self/fd/{i}"),
            link: at(&format!("/dev/{n}")),
        });
    }
    // Docker's masked paths: files hidden behind /dev/null, directories
    // behind an empty read-only tmpfs.
    for f in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/latency_stats",
    ] {
        ops.push(mount("/dev/null", at(f), "", libc::MS_BIND, "", true));
    }
    for d in [
        "/proc/acpi",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ] {
        ops.push(mount(
            "tmpfs",
            at(d),
            "tmpfs",
            libc::MS_RDONLY,
            "size=0",
            true,
        ));
    }
    // ... and its read-only ones.
    for d in [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ] {
        ops.push(RootOp::Mount {
            source: at(d),
            source_in_root: true,
            target: at(d),
            fstype: String::new(),
            flags: libc::MS_BIND | libc::MS_REC,
            data: String::new(),
            optional: true,
        });
        ops.push(mount(
            "",
            at(d),
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            "",
            true,
        ));
    }
    ops
}

/// The steps that mount a container's volumes, binds and tmpfs mounts
/// (`mounts`, parents first). Mount points are made in the root (inside it) as Docker
/// makes them. A bind is not recursive (what is mounted below its source
/// is not seen), and always `nosuid,nodev`; read-only is the host kernel's
/// per-mount flag, which the container cannot lift (it has no
/// CAP_SYS_ADMIN).
pub fn mount_ops(mounts: &[super::volume::Mount]) -> Vec<RootOp> {
    use super::volume::MountSource;
    let mut ops = Vec::new();
    let mkdir_all = |ops: &mut Vec<RootOp>, path: &str| {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            ops.push(RootOp::Mkdir(at.clone(), 0o755));
        }
    };
    let mount = |source: String, target: &str, fstype: &str, flags: libc::c_ulong, data: String| {
        RootOp::Mount {
            source,
            source_in_root: false,
            target: target.to_string(),
            fstype: fstype.into(),
            flags,
            data,
            optional: false,
        }
    };
    for m in mounts {
        match &m.source {
            MountSource::Tmpfs { flags, data } => {
                mkdir_all(&mut ops, &m.target);
                let ro = if m.readonly { libc::MS_RDONLY } else { 0 };
                ops.push(mount(
                    "tmpfs".into(),
                    &m.target,
                    "tmpfs",
                    *flags | ro,
                    data.clone(),
                ));
            }
            _ => {
                let Some(source) = m.host_path() else {
                    continue;
                };
                if source.is_dir() {
                    mkdir_all(&mut ops, &m.target);
                } else {
                    let parent = m.target.rsplit_once('/').map_or("", |(p, _)| p);
                    mkdir_all(&mut ops, parent);
                    ops.push(RootOp::Touch(m.target.clone()));
                }
                let s = source.display().to_string();
                ops.push(mount(
                    s.clone(),
                    &m.target,
                    "",
                    libc::MS_BIND,
                    String::new(),
                ));
                // The flags the source's own mount has are kept (in a
                // user namespace the kernel refuses to drop them).
                let ro = if m.readonly { libc::MS_RDONLY } else { 0 };
                ops.push(mount(
                    String::new(),
                    &m.target,
                    "",
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | ro
                        | locked_flags(&source),
                    String::new(),
                ));
            }
        }
    }
    ops
}

/// `--read-only`: the root remounted read-only, its own flag (nodev) kept;
/// the last step, once every mount point is made.
pub fn read_only_root() -> RootOp {
    RootOp::Mount {
        source: String::new(),
        source_in_root: false,
        target: "/".into(),
        fstype: String::new(),
        flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NODEV,
        data: String::new(),
        optional: false,
    }
}

/// The mount flags of the filesystem `path` is on that a bind of it must
/// keep: read-only, noexec and the atime ones.
pub fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = vmc_spawn::sys::cstr(path) else {
        return 0;
    };
    // SAFETY: statvfs into a zeroed struct with a NUL-terminated path.
    let f = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_flag
    };
    [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st, _)| f & st != 0)
    .fold(0, |acc, (_, ms)| acc | ms)
}

/// Moves this process into a private mount namespace of its own: the
/// container's mounts are seen by no one else and go away with the last
/// process in it. Idempotent in effect (a second call nests another one).
/// Without root, inside a user namespace first ([`enter_user_namespace`]).
pub fn private_mounts() -> Result<(), NsError> {
    user_namespace()?;
    vmc_spawn::sys::unshare_mounts(0).map_err(sys("a private mount namespace"))
}

/// An overlayfs root mounted at `root`, unmounted (lazily) on drop.
pub struct OverlayRoot {
    root: PathBuf,
}

impl OverlayRoot {
    /// Mounts `lowers` (bottom first; an empty list is an empty root) with
    /// `upper` and `work` at `root`, creating the directories. `scratch` is
    /// where an empty lower can be made.
    pub fn mount(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        root: &Path,
        scratch: &Path,
    ) -> Result<OverlayRoot, NsError> {
        let mk =
            |p: &Path| std::fs::create_dir_all(p).map_err(sys(format!("creating {}", p.display())));
        for p in [upper, work, root] {
            mk(p)?;
        }
        let mut lowers: Vec<PathBuf> = lowers.iter().rev().cloned().collect();
        if lowers.is_empty() {
            let empty = scratch.join("empty");
            mk(&empty)?;
            lowers.push(empty);
        }
        let lowerdir = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut data = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        if rootless() {
            // In a user namespace overlayfs keeps its metadata (opaque
            // directories) in user.* xattrs: trusted.* are the host's.
            data.push_str(",userxattr");
        }
        // nodev: a device node the container makes in its root (it keeps
        // CAP_MKNOD, as in Docker) cannot be opened through this mount.
        vmc_spawn::sys::mount(
            Some("overlay"),
            &root.display().to_string(),
            Some("overlay"),
            libc::MS_NODEV,
            Some(&data),
        )
        .map_err(sys("mounting the container root (overlayfs)"))?;
        Ok(OverlayRoot {
            root: root.to_path_buf(),
        })
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        if let Ok(c) = vmc_spawn::sys::cstr(&self.root) {
            // SAFETY: umount2 on a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Docker's confinement for a container whose root is mounted at `root`:
/// its namespaces, the capability set `caps` (`None`: Docker's default) and
/// the system-call filter `seccomp` asks for (for that set).
pub fn isolation(
    hostname: &str,
    caps: Option<u64>,
    seccomp: &super::seccomp::Seccomp,
) -> Result<Isolation, NsError> {
    let caps = caps.unwrap_or(DOCKER_DEFAULT_CAPS);
    Ok(Isolation {
        clone_flags: libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWCGROUP,
        ops: root_ops(),
        hostname: Some(hostname.to_string()),
        loopback_up: true,
        keep_caps: Some(caps),
        no_new_privs: true,
        in_root: false,
        non_dumpable: !rootless(),
        outlives_parent: false,
        seccomp: seccomp.programs(caps)?,
    })
}

/// Creates the cgroups of container (or build step) `id`, its device
/// allow-list and `limits`, and makes joining them the first steps of
/// `iso`: the workload is in them before it execs. They are removed (on
/// drop) once it is gone.
pub fn join_cgroups(
    iso: &mut Isolation,
    id: &str,
    limits: &super::NsLimits,
) -> Result<Option<super::cgroup::Cgroup>, NsError> {
    let cgroup = super::cgroup::Cgroup::create(id, limits)?;
    if let Some(cg) = &cgroup {
        let joins = cg.procs_files().into_iter().map(|p| RootOp::Write {
            path: p.display().to_string(),
            data: "0".into(),
        });
        iso.ops.splice(0..0, joins);
    }
    Ok(cgroup)
}

/// Where `--init` puts the init in the container (Docker's place).
pub const INIT_PATH: &str = "/sbin/docker-init";

/// Runs `cfg` attached (stdio inherited) with its root made of `lowers`
/// (bottom first, read-only) and a writable upper in `dir`; returns the exit
/// code as Docker reports it.
pub fn run_attached(
    cfg: &ContainerConfig,
    lowers: &[PathBuf],
    dir: &Path,
    listeners: Vec<(super::ports::Listener, super::ports::PortMap)>,
    forward_stdin: bool,
    gate: &mut dyn crate::runtime::StartGate,
) -> Result<i32, RuntimeError> {
    timings::mark("prepare");
    private_mounts()?;
    let root = dir.join("rootfs");
    // Unmounted when the run ends, however it ends, so that the state
    // directory can be removed without reaching into the mounted root.
    let _mounted = OverlayRoot::mount(lowers, &dir.join("upper"), &dir.join("work"), &root, dir)?;
    timings::mark("mount");
    let root_s = root.display().to_string();
    let ns_cfg = cfg.ns()?;
    let mut iso = isolation(&cfg.hostname, ns_cfg.caps, &ns_cfg.seccomp)?;
    let cgroup = join_cgroups(&mut iso, &cfg.id, &ns_cfg.limits)?;
    if let Some(cg) = &cgroup {
        let list: Vec<String> = cg.dirs().iter().map(|d| d.display().to_string()).collect();
        let _ = std::fs::write(dir.join("cgroups"), list.join("\n"));
    }
    // Volumes first made, and an empty one filled from the image's
    // content at its mount point; then every mount, before the /etc files
    // (a volume at /etc does not hide them, as in Docker), and last the
    // root made read-only (after the mount points were made in it).
    for m in super::volume::prepare(&cfg.mounts)? {
        if let Some(data) = m.host_path() {
            super::volume::populate(&root, &m.target, &data).map_err(sys(format!(
                "filling volume {} from the image's {}",
                data.display(),
                m.target
            )))?;
        }
    }
    iso.ops.extend(mount_ops(&cfg.mounts));
    // --init: the agent's static binary, bound read-only where Docker puts
    // its docker-init, runs first and starts the command as its child.
    if cfg.init {
        let init = crate::assets::guest_binary()
            .map_err(|e| RuntimeError::Namespace(format!("--init: {e}")))?;
        iso.ops.extend(mount_ops(&[super::volume::Mount {
            source: super::volume::MountSource::Bind { source: init },
            target: INIT_PATH.into(),
            readonly: true,
        }]));
    }
    for (name, file) in network_files(cfg, dir)? {
        let target = format!("/etc/{name}");
        iso.ops.push(RootOp::Touch(target.clone()));
        iso.ops.push(RootOp::Mount {
            source: file.display().to_string(),
            source_in_root: false,
            target,
            fstype: String::new(),
            flags: libc::MS_BIND,
            data: String::new(),
            optional: true,
        });
    }
    if cfg.read_only {
        iso.ops.push(read_only_root());
    }
    let prepared =
        match spawn::prepare_isolated(&cfg.process, &root_s, &root_s, &iso).and_then(|mut p| {
            if cfg.init {
                p.exec_through(INIT_PATH)?;
            }
            Ok(p)
        }) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("vmc: {}", e.message);
                return Ok(e.kind.exit_code());
            }
        };

    // Signals for the container are forwarded from vmc; blocked before the
    // child exists so that none is lost (the child resets its mask).
    let set = block_forwarded();
    // The network is connected while the child waits before its exec, so
    // the workload starts with it; pasta goes when this returns. Then the
    // container is created, and the start gate opens (or fails the run).
    let mut pasta = None;
    let mut gate_failed = None;
    let mut connect = |pid: u32| -> Result<(), Box<dyn std::error::Error>> {
        if cfg.network == Network::Passt {
            pasta = Some(Pasta::attach(
                pid,
                dir,
                super::net::maps_host_loopback(&cfg.extra_hosts),
            )?);
        }
        gate.open().map_err(|e| {
            let text = e.to_string();
            gate_failed = Some(e);
            text.into()
        })
    };
    timings::mark("resolve");
    let started = start(&prepared, cfg.process.tty, Some(&mut connect));
    if let Some(e) = gate_failed {
        return Err(e);
    }
    let (pid, terminal) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmc: {}", e.message);
            return Ok(e.kind.exit_code());
        }
    };
    // The ports close when this returns, before the exit is recorded.
    let _serving = super::ports::serve(listeners, super::ports::Target::Ns(pid));
    // Where `vmc exec` finds the container's namespaces.
    let _ = std::fs::write(dir.join("init.pid"), pid.to_string());
    super::state::mark_started(dir);
    timings::mark("start");
    let code = attend(pid, &set, terminal, forward_stdin);
    timings::mark("exit");
    code
}

/// Starts the prepared process with vmc's stdio, or on a pseudo-terminal of
/// `tty`'s size (returning its master).
fn start(
    prepared: &spawn::Prepared,
    tty: Option<vmc_proto::WinSize>,
    gate: Option<spawn::Gate>,
) -> Result<(libc::pid_t, Option<OwnedFd>), spawn::SpawnError> {
    spawn::spawn_with(prepared, tty, [0, 1, 2], gate).map(|(pid, m)| (pid as libc::pid_t, m))
}

/// Writes the container's /etc/resolv.conf, /etc/hosts and /etc/hostname
/// into its state directory; returns (name in /etc, file) pairs to bind.
fn network_files(cfg: &ContainerConfig, dir: &Path) -> Result<Vec<(String, PathBuf)>, NsError> {
    let addr = match cfg.network {
        Network::Passt => super::net::host_address(),
        Network::None => None,
    };
    let mut out = Vec::new();
    for (name, text) in super::net::etc_files(cfg, addr.as_deref()) {
        let path = dir.join(&name);
        std::fs::write(&path, text).map_err(sys(path.display().to_string()))?;
        out.push((name, path));
    }
    Ok(out)
}

/// `vmc exec` in namespace mode: joins the cgroups listed in `cgroups` and
/// the namespaces of the container whose PID 1 is `pid` (this process must still be single-threaded: a mount
/// namespace can only be joined then) and runs `spec` there, confined like
/// the container, with this process's stdio; returns its exit code.
pub fn exec_attached(
    pid: i32,
    caps: Option<u64>,
    seccomp: &super::seccomp::Seccomp,
    cgroups: &Path,
    spec: &vmc_proto::ProcessSpec,
    forward_stdin: bool,
) -> Result<i32, RuntimeError> {
    // The container's cgroups (limits, device rules) first, while the
    // host's /sys/fs/cgroup is still in view.
    super::cgroup::join_listed(cgroups).map_err(NsError::from)?;
    // Without root the container's namespaces belong to its user namespace,
    // which is joined first (and gives the capabilities to join the rest).
    let user = rootless().then_some("user");
    for ns in user
        .into_iter()
        .chain(["ipc", "uts", "net", "cgroup", "pid", "mnt"])
    {
        let p = format!("/proc/{pid}/ns/{ns}");
        let f = std::fs::File::open(&p).map_err(sys(p.clone()))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        // SAFETY: setns on an open namespace file.
        let r = unsafe { libc::setns(fd, 0) };
        check(r, &format!("joining {p}"))?;
    }
    // The container's own capability set (`--cap-add`/`--cap-drop`) and
    // filter, as Docker's exec.
    let caps = caps.unwrap_or(DOCKER_DEFAULT_CAPS);
    let iso = Isolation {
        keep_caps: Some(caps),
        no_new_privs: true,
        in_root: true,
        non_dumpable: !rootless(),
        seccomp: seccomp.programs(caps).map_err(NsError::from)?,
        ..Default::default()
    };
    let prepared = match spawn::prepare_isolated(spec, "/", "/", &iso) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmc: {}", e.message);
            return Ok(e.kind.exit_code());
        }
    };
    let set = block_forwarded();
    let (child, terminal) = match start(&prepared, spec.tty, None) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmc: {}", e.message);
            return Ok(e.kind.exit_code());
        }
    };
    attend(child, &set, terminal, forward_stdin)
}

/// The confinement decisions, checked as data: `isolation` is the plan the
/// spawner carries out, so what it asks for is what a container gets.
#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(ops: &[RootOp]) -> Vec<(&str, &str, &str, libc::c_ulong)> {
        ops.iter()
            .filter_map(|op| match op {
                RootOp::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    ..
                } => Some((source.as_str(), target.as_str(), fstype.as_str(), *flags)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_plan_is_dockers_confinement() {
        let iso = isolation("box", None, &Default::default()).unwrap();
        for ns in [
            libc::CLONE_NEWPID,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ] {
            assert_ne!(iso.clone_flags & ns, 0, "namespace {ns:#x}");
        }
        // The user namespace is entered by vmc itself when rootless.
        assert_eq!(iso.clone_flags & libc::CLONE_NEWUSER, 0);
        assert!(iso.no_new_privs && iso.loopback_up);
        assert_eq!(iso.hostname.as_deref(), Some("box"));
        // Docker's 14 default capabilities, by number.
        let caps: Vec<u32> = (0..64)
            .filter(|b| iso.keep_caps.unwrap() & (1 << b) != 0)
            .collect();
        assert_eq!(caps, [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31]);
    }

    #[test]
    fn every_step_names_a_path_inside_the_root() {
        // The spawner resolves these inside the root; none may climb out
        // lexically either, and none writes a host path.
        for op in root_ops() {
            let paths: Vec<&String> = match &op {
                RootOp::Mkdir(p, _) | RootOp::Touch(p) => vec![p],
                RootOp::Mount {
                    target,
                    source,
                    source_in_root,
                    ..
                } if *source_in_root => vec![target, source],
                RootOp::Mount { target, .. } => vec![target],
                RootOp::Symlink { link, .. } => vec![link],
                RootOp::Write { .. } => panic!("a host write in the root's plan: {op:?}"),
            };
            for p in paths {
                assert!(p.starts_with('/') && p.len() > 1, "{op:?}");
                assert!(!p.split('/').any(|c| c == ".."), "{op:?}");
            }
        }
    }

    #[test]
    fn proc_and_sys_are_masked_and_read_only_as_dockers() {
        let ops = root_ops();
        let m = mounts(&ops);
        let has = |src: &str, target: &str, fstype: &str, flags: libc::c_ulong| {
            m.iter()
                .any(|&(s, t, f, fl)| s == src && t == target && f == fstype && fl & flags == flags)
        };
        assert!(has("sysfs", "/sys", "sysfs", libc::MS_RDONLY));
        for f in ["/proc/kcore", "/proc/keys", "/proc/timer_list"] {
            assert!(has("/dev/null", f, "", libc::MS_BIND), "{f}");
        }
        for d in ["/proc/acpi", "/proc/scsi", "/sys/firmware"] {
            assert!(has("tmpfs", d, "tmpfs", libc::MS_RDONLY), "{d}");
        }
        for d in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
            let t = d;
            // Bound onto itself, then remounted read-only (the order matters).
            let bind = m
                .iter()
                .position(|&(s, tt, _, fl)| s == t && tt == t && fl & libc::MS_REMOUNT == 0)
                .unwrap_or_else(|| panic!("{d} not bound"));
            let ro = m
                .iter()
                .position(|&(_, tt, _, fl)| {
                    tt == t
                        && fl & (libc::MS_REMOUNT | libc::MS_RDONLY)
                            == libc::MS_REMOUNT | libc::MS_RDONLY
                })
                .unwrap_or_else(|| panic!("{d} not read-only"));
            assert!(bind < ro, "{d}");
        }
        // A minimal /dev: these nodes bound from the host's, nothing else.
        let nodes: Vec<&str> = m
            .iter()
            .filter(|&&(s, t, _, _)| s.starts_with("/dev/") && t == s)
            .map(|&(s, _, _, _)| s)
            .collect();
        assert_eq!(
            nodes,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
        assert!(has("devpts", "/dev/pts", "devpts", libc::MS_NOEXEC));
        assert!(has(
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
        ));
    }
}
