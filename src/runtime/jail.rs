//! Every VMM vmc starts (runs, detached runs, build sandboxes, snapshot
//! makers) runs as a process of its own in a jail: `vmm::process` clones it
//! into new namespaces and it confines itself before its guest runs
//! (`vmm::jail`, `vmm::seccomp`). What the host adds here: the uid and gid
//! it runs as (one per VM from `VMC_JAIL_UIDS`, default
//! [`DEFAULT_UIDS`]; rootless, the invoking user), its per-VM jail
//! directory, its cgroups (memory: the guest's plus [`MEMORY_OVERHEAD`];
//! pids; cpu: its vCPUs plus one core for its device thread) and the
//! record `vmc inspect` and `vmc info` show.
//!
//! `VMC_JAIL=0` keeps the VMM in vmc's own process, unconfined (for
//! comparison and debugging).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cgroup::Cgroup;
use crate::vmm::process::{Command, Launch, VmmProcess};
use crate::vmm::progress::{Activity, Verdict, Watchdog};
use crate::vmm::snapshot::SnapshotError;
use crate::vmm::{self, jail::JailSpec, seccomp, RunningVm, Stopper, VmConfig, VmExit, VmmError};

/// The uids (and gids) of jailed VMMs when vmc runs as root: BASE:COUNT.
/// Far above the ranges distributions hand out (/etc/subuid starts at
/// 100000), so that no host user or container shares them.
pub const DEFAULT_UIDS: (u32, u32) = (1_500_000_000, 65_536);
/// What a VMM may use beyond its guest's memory (its own heap, threads,
/// device buffers, page cache of its disks) before its cgroup reclaims or
/// kills it.
pub const MEMORY_OVERHEAD: u64 = 128 << 20;
/// Descriptors a VMM may hold (vsock connections are capped at 1024).
pub const NOFILE: u64 = 2048;

/// What `vmc inspect` and `vmc info` show of a running VMM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confinement {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub jail: PathBuf,
    pub namespaces: Vec<String>,
    pub seccomp: String,
    pub cgroups: Vec<PathBuf>,
    pub no_new_privs: bool,
    pub capabilities: String,
}

impl Confinement {
    /// The record a container's VM left in its directory `dir`, if its
    /// VMM still runs.
    pub fn of_container(dir: &Path) -> Option<Confinement> {
        let c: Confinement =
            serde_json::from_str(&std::fs::read_to_string(dir.join("vmm.json")).ok()?).ok()?;
        std::path::Path::new(&format!("/proc/{}", c.pid))
            .exists()
            .then_some(c)
    }

    /// SIGKILL to the VMM process (still the one recorded: named `vmm`),
    /// then waits until it is gone (reaped by whoever is its parent now),
    /// while its teardown makes progress.
    pub fn kill_and_wait(&self) {
        let proc_dir = format!("/proc/{}", self.pid);
        let named_vmm =
            || std::fs::read_to_string(format!("{proc_dir}/comm")).is_ok_and(|c| c.trim() == "vmm");
        if !named_vmm() {
            return;
        }
        // SAFETY: kill with a pid just checked to be a VMM's.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        super::state::wait_gone(self.pid, || Path::new(&proc_dir).exists());
    }
}

/// How this host confines VMMs (`vmc info`).
pub fn describe() -> String {
    if !crate::host::knobs().jail {
        return "off (VMC_JAIL=0): the VMM runs in vmc's process, unconfined".into();
    }
    let who = if crate::host::rootless() {
        "as the invoking user in a user namespace, no capabilities".to_string()
    } else {
        let (b, c) = uid_range();
        format!(
            "as uids {b}..{} (one per VM), no capabilities",
            u64::from(b) + u64::from(c) - 1
        )
    };
    let seccomp = match seccomp_mode() {
        seccomp::Mode::Log => "seccomp per thread, log only (VMC_SECCOMP=log)",
        seccomp::Mode::Kill => "seccomp per thread (kill)",
    };
    let cgroups = if crate::host::rootless() {
        "no cgroups (rootless: none of its own to divide)"
    } else {
        "cgroups (memory, cpu, pids)"
    };
    format!("jailed: own mount/pid/ipc/uts/net namespaces, empty read-only root, {who}, no_new_privs, {seccomp}, {cgroups}")
}

/// A VM and the VMM that runs it.
#[allow(clippy::large_enum_variant)] // one per VM; the jailed one is the common case
pub enum Vm {
    /// In a jailed process of its own (the default).
    Jailed(JailedVm),
    /// In this process (`VMC_JAIL=0`).
    Here(Box<RunningVm>),
}

/// A jailed VMM process and what the host holds for it. Field order is
/// drop order: the process ends before its cgroups and slot go.
pub struct JailedVm {
    process: VmmProcess,
    cgroup: Option<Cgroup>,
    /// Holds the uid slot (an flock) while the VMM lives.
    _slot: Option<File>,
    _jail: JailDir,
    record: Confinement,
}

/// A jail directory, removed after its VMM (rootless: one per VM; root's
/// are the slots' own, kept for the next VM of the slot).
struct JailDir(PathBuf, bool);

impl Drop for JailDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

impl JailedVm {
    /// Ends with the VM: the process reaped, then its cgroups, slot and
    /// jail let go.
    fn end(self, how: impl FnOnce(VmmProcess) -> VmExit) -> VmExit {
        let JailedVm {
            process,
            cgroup,
            _slot,
            _jail,
            ..
        } = self;
        let e = how(process);
        drop((cgroup, _slot, _jail));
        e
    }
}

/// What a call outside a VMM thread's filter does (`VMC_SECCOMP`).
fn seccomp_mode() -> seccomp::Mode {
    if crate::host::knobs().seccomp_log {
        seccomp::Mode::Log
    } else {
        seccomp::Mode::Kill
    }
}

fn uid_range() -> (u32, u32) {
    crate::host::knobs()
        .jail_uids
        .as_deref()
        .and_then(|s| {
            let (b, c) = s.split_once(':')?;
            Some((b.parse().ok()?, c.parse().ok()?))
        })
        .filter(|&(b, c): &(u32, u32)| b > 0 && c > 0 && b.checked_add(c).is_some())
        .unwrap_or(DEFAULT_UIDS)
}

/// Where root's VMMs keep their slots and jails (host-wide: every
/// VMC_HOME's VMMs share the uid range).
const RUN_DIR: &str = "/run/vmc/vmm";

/// Takes a free slot of the uid range: an flock on `RUN_DIR/N.lock`, held
/// while the VMM lives (released by the kernel if vmc dies).
fn take_slot(count: u32) -> Result<(u32, File), VmmError> {
    use std::os::fd::AsRawFd;
    let dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(dir)
        .map_err(|e| VmmError::Setup(format!("creating {RUN_DIR}: {e}")))?;
    // The lowest free slot: as many slots (and jail directories) exist as
    // VMs ever ran at once.
    for slot in 0..count.min(4096) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{slot}.lock")))
            .map_err(|e| VmmError::Setup(format!("a VMM uid slot in {RUN_DIR}: {e}")))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((slot, f));
        }
    }
    Err(VmmError::Setup(format!(
        "every VMM uid of VMC_JAIL_UIDS is in use ({count}); widen the range"
    )))
}

static VMM_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Runs VMM processes from `vmc` (the binary whose `__vmm` serves them)
/// instead of this process's own executable: for programs that use the
/// runtime as a library (the integration tests), whose executable is not
/// vmc. The first call wins.
pub fn use_vmm_binary(vmc: &Path) {
    let _ = VMM_BINARY.set(vmc.to_path_buf());
}

/// The vmc binary helper processes run from (`__vmm`, `__fs-server`).
pub fn vmc_binary() -> PathBuf {
    VMM_BINARY
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A jailed VMM process started ahead of its VM (its exec and its cgroup
/// join overlap the host's own preparations), waiting for its launch.
pub struct Pending {
    process: VmmProcess,
    cgroup: Option<Cgroup>,
    slot: Option<File>,
    jail: JailDir,
    spec: JailSpec,
    record: Confinement,
}

impl Pending {
    /// Starts the jailed VMM process for a VM of `vcpus` and `memory`
    /// bytes: its uid slot, jail directory and cgroups first.
    pub fn start(vcpus: u8, memory: u64) -> Result<Pending, VmmError> {
        // The host's own checks first, with their one-line fixes.
        vmm::open_kvm()?;
        vmm::check_memory(memory)?;
        let rootless = crate::host::rootless();
        let (ids, slot, jail, remove_jail) = if rootless {
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let jail = super::vmc_home()
                .join("run")
                .join(format!("vmm-{}-{n}", std::process::id()));
            (None, None, jail, true)
        } else {
            let (base, count) = uid_range();
            let (slot, lock) = take_slot(count)?;
            let id = base + slot;
            (
                Some((id, id)),
                Some((slot, lock)),
                Path::new(RUN_DIR).join(slot.to_string()),
                false,
            )
        };
        std::fs::create_dir_all(&jail)
            .map_err(|e| VmmError::Setup(format!("the VMM's jail {}: {e}", jail.display())))?;
        let cgroup = match &slot {
            Some((n, _)) => Cgroup::for_vmm(
                &format!("vmm-{n}"),
                &super::NsLimits {
                    memory: Some(memory + MEMORY_OVERHEAD),
                    cpus: Some(vcpus.saturating_add(1)),
                    pids: Some(u64::from(vcpus) + 16),
                },
            )
            .map_err(|e| VmmError::Setup(format!("the VMM's cgroups: {e}")))?,
            None => None,
        };
        let spec = JailSpec {
            root: jail.clone(),
            ids,
            nofile: NOFILE,
            nproc: ids.map(|_| u64::from(vcpus) + 16),
        };
        let mut argv = vec!["vmc".to_string(), "__vmm".to_string()];
        for f in cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default() {
            argv.push(f.to_string_lossy().into_owned());
        }
        let cmd = Command {
            // The uid slot's lock lives as long as the VMM, even past vmc.
            hold: slot
                .as_ref()
                .map(|(_, f)| std::os::fd::AsRawFd::as_raw_fd(f)),
            exe: vmc_binary(),
            argv,
            user_namespace: rootless,
        };
        let process = VmmProcess::start(&cmd)?;
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = ids.unwrap_or_else(|| unsafe { (libc::getuid(), libc::getgid()) });
        let mut namespaces: Vec<String> = ["mount", "pid", "ipc", "uts", "network"]
            .map(String::from)
            .to_vec();
        if rootless {
            namespaces.push("user".into());
        }
        let record = Confinement {
            pid: process.pid(),
            uid,
            gid,
            jail: jail.clone(),
            namespaces,
            seccomp: match seccomp_mode() {
                seccomp::Mode::Log => {
                    "per-thread filters (vcpu, events, main), log only (VMC_SECCOMP=log)".into()
                }
                seccomp::Mode::Kill => {
                    "per-thread filters (vcpu, events, main); a violation kills the VMM".into()
                }
            },
            cgroups: cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default(),
            no_new_privs: true,
            capabilities: "none".into(),
        };
        Ok(Pending {
            process,
            cgroup,
            slot: slot.map(|(_, f)| f),
            jail: JailDir(jail, remove_jail),
            spec,
            record,
        })
    }

    /// Builds and runs `cfg`'s VM (restored from `restore` when given) in
    /// the waiting process.
    pub fn launch(self, cfg: VmConfig, restore: Option<(&Path, &str)>) -> Result<Vm, VmmError> {
        let mode = seccomp_mode();
        let restore = restore.map(|(d, k)| (d.to_path_buf(), k.to_string()));
        let Pending {
            mut process,
            cgroup,
            slot,
            jail,
            spec,
            record,
        } = self;
        let (launch, fds) = Launch::of(cfg, restore, Some(spec), Some(mode))?;
        process.launch(launch, fds)?;
        Ok(Vm::Jailed(JailedVm {
            process,
            cgroup,
            _slot: slot,
            _jail: jail,
            record,
        }))
    }
}

/// Starts `cfg`'s VM (restored from `restore` when given) in a jailed VMM
/// process (`pending`, or one started now), or here with `VMC_JAIL=0`.
pub fn start(
    cfg: VmConfig,
    restore: Option<(&Path, &str)>,
    pending: Option<Pending>,
) -> Result<Vm, VmmError> {
    if !crate::host::knobs().jail {
        return match restore {
            Some((dir, key)) => vmm::restore(cfg, dir, key).map(|v| Vm::Here(Box::new(v))),
            None => vmm::start(cfg).map(|v| Vm::Here(Box::new(v))),
        };
    }
    let pending = match pending {
        Some(p) => p,
        None => Pending::start(cfg.vcpus, cfg.mem_size)?,
    };
    pending.launch(cfg, restore)
}

impl Vm {
    /// The jailed VMM's confinement (None: unconfined, `VMC_JAIL=0`).
    pub fn confinement(&self) -> Option<&Confinement> {
        match self {
            Vm::Jailed(j) => Some(&j.record),
            Vm::Here(_) => None,
        }
    }

    pub fn activity(&self) -> Activity {
        match self {
            Vm::Jailed(j) => j.process.activity(),
            Vm::Here(v) => v.activity(),
        }
    }

    pub fn judge(&self, dog: &mut Watchdog) -> Verdict {
        match self {
            Vm::Jailed(j) => j.process.judge(dog),
            Vm::Here(v) => v.judge(dog),
        }
    }

    pub fn stop(&self) {
        match self {
            Vm::Jailed(j) => j.process.stop(),
            Vm::Here(v) => v.stop(),
        }
    }

    pub fn stopper(&self) -> Stopper {
        match self {
            Vm::Jailed(j) => j.process.stopper(),
            Vm::Here(v) => v.stopper(),
        }
    }

    pub fn is_running(&self) -> bool {
        match self {
            Vm::Jailed(j) => j.process.is_running(),
            Vm::Here(v) => v.is_running(),
        }
    }

    /// Waits for the VM to end.
    pub fn wait(self) -> VmExit {
        match self {
            Vm::Jailed(j) => j.end(VmmProcess::wait),
            Vm::Here(v) => v.wait(),
        }
    }

    /// Waits up to `timeout` for the VM to end by itself, then stops it.
    pub fn wait_or_stop(self, timeout: Duration) -> VmExit {
        match self {
            Vm::Jailed(j) => j.end(|p| p.wait_or_stop(timeout)),
            Vm::Here(v) => v.wait_or_stop(timeout),
        }
    }

    /// Snapshots the quiescent guest into `dir`.
    pub fn snapshot(&self, dir: &Path, key: &str) -> Result<(), SnapshotError> {
        match self {
            Vm::Jailed(j) => j.process.snapshot(dir, key),
            Vm::Here(v) => v.snapshot(dir, key),
        }
    }

    /// Pauses the guest as it is and saves it into `dir`.
    pub fn save_as_is(&self, dir: &Path, key: &str) -> Result<(), SnapshotError> {
        match self {
            Vm::Jailed(j) => j.process.save_as_is(dir, key),
            Vm::Here(v) => v.pause().and_then(|vcpus| v.save(dir, key, vcpus)),
        }
    }

    /// Resident KiB of guest RAM, and the part only this VM holds.
    pub fn guest_memory_kib(&self) -> (u64, u64) {
        match self {
            Vm::Jailed(j) => j.process.guest_memory_kib(),
            Vm::Here(v) => (v.guest_rss_kib(), v.guest_private_dirty_kib()),
        }
    }

    /// Peak resident memory of the VMM (KiB): the VMM process's, or this
    /// process's when the VMM runs here.
    pub fn vmm_peak_rss_kib(&self) -> u64 {
        match self {
            Vm::Jailed(j) => j.process.peak_rss_kib(),
            Vm::Here(_) => vmm::memory::peak_rss_kib(),
        }
    }
}
