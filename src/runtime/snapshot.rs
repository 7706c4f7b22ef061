//! Warm start: a snapshot of a booted guest whose agent waits for its first
//! command, made once per (kernel, agent, vCPUs, memory, backend, vmc version)
//! and restored for every later container.
//!
//! Layout: `$VMC_HOME/snapshots/<key>/{state.bin,memory.img}` (or under
//! `$VMC_SNAPSHOTS`). Creation happens
//! under `<key>.lock` (concurrent first runs wait for one builder) in a
//! temporary directory renamed into place when complete, so a crash leaves
//! nothing half-written. The snapshot's guest has empty placeholder disks in
//! the image and scratch slots; a restored VM gets the container's real disks
//! and learns their sizes through a config interrupt before the agent mounts
//! them.
//!
//! Ready snapshots (`ready/<key>/`): for `--rm` runs of an image, the base
//! snapshot restored with that image's disk and its root mounted (the
//! writable layer in guest memory, Docker's /etc files as empty files in
//! it), saved once the agent is idle. A run restored from one skips the
//! mounts: the agent only writes the container's /etc files and hostname
//! (and configures its network). Made after an image's second such run (the
//! first marks it seen, so that images run once cost nothing) by a
//! background process (`vmc __make-ready`) that the run starts as it ends,
//! so no run waits for one; keyed by the base snapshot's inputs and the
//! disk's identity, at most [`MAX_READY`] kept (least recently used go
//! first) and [`MAX_SEEN`] marks (seen, failed, pending); `vmc system
//! prune` removes them all. `VMC_READY_SNAPSHOTS=0` turns them off.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vmc_proto::{GuestMsg, HostMsg, RootSpec, AGENT_PORT, PROTOCOL_VERSION};

use super::agent::{AgentConn, AgentError};
use super::guest::{ended, refresh_msg, unplugged, verdict, vm_config, ANSWER_CPU, BOOT_CPU};
use super::RuntimeError;
use crate::vmm::progress::Watchdog;
use crate::vmm::{self, snapshot::FORMAT_VERSION, Backend};

/// What a snapshot depends on.
#[derive(Clone, Copy)]
pub struct SnapshotSpec<'a> {
    pub kernel: &'a Path,
    pub agent_disk: &'a Path,
    pub cpus: u8,
    pub memory: u64,
    pub backend: Backend,
}

fn file_identity(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!(
            "{} {} {} {}.{}",
            p.display(),
            m.len(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => format!("{} missing", p.display()),
    }
}

impl SnapshotSpec<'_> {
    /// The cache key: a hash of everything the snapshot depends on. The
    /// kernel is identified by path, size, inode and mtime (hashing 19 MB on
    /// every run would cost more than the restore); the agent disk's file
    /// name carries its content hash.
    pub fn key(&self) -> String {
        key_of(&self.describe())
    }

    /// What the key hashes, one input a line; kept in the snapshot (as
    /// [`SPEC_FILE`]) so that `vmc system prune` can tell stale ones.
    pub fn describe(&self) -> String {
        format!(
            "vmc {} build {}\nsnapshot format {FORMAT_VERSION}\nprotocol {PROTOCOL_VERSION}\nkernel {}\nagent {}\ncpus {}\nmemory {}\nbackend {:?}\ncmdline {}\nextra {}\n",
            env!("CARGO_PKG_VERSION"),
            env!("VMC_BUILD_ID"),
            file_identity(self.kernel),
            self.agent_disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            self.cpus,
            self.memory,
            self.backend,
            crate::vmm::base_cmdline(false, self.backend).join(" "),
            // VMC_KERNEL_ARGS apply at boot: a snapshot booted without them
            // is not one with them.
            crate::host::knobs().kernel_args.as_deref().unwrap_or(""),
        )
    }
}

/// The inputs a snapshot was made from (see [`SnapshotSpec::describe`]).
pub const SPEC_FILE: &str = "spec.txt";

/// Where ready snapshots live under the snapshots' root.
pub const READY_DIR: &str = "ready";

/// The most ready snapshots kept (each holds the guest memory it touched:
/// tens of MiB).
pub const MAX_READY: usize = 8;

/// The most images marked as run once (`<key>.seen`, empty files) kept.
pub const MAX_SEEN: usize = 64;

/// What a ready snapshot depends on: its base snapshot's inputs and the
/// image's disk (by identity: the cached disk of an image is made once).
pub struct ReadySpec<'a> {
    pub base: SnapshotSpec<'a>,
    pub image_disk: &'a Path,
    /// The process whose executable the snapshot's page cache should hold
    /// (the run that makes it; not part of the key).
    pub warm: Option<&'a vmc_proto::ProcessSpec>,
    /// A parked snapshot (`vmc run --start=parked`): `warm` is started and
    /// stopped at its entry in it, and is part of the key.
    pub park: bool,
}

impl ReadySpec<'_> {
    fn describe(&self) -> String {
        let parked = match (self.park, self.warm) {
            // The process as it runs in every copy (arguments and
            // environment included), by digest.
            (true, Some(p)) => format!(
                "parked {}\n",
                key_of(&serde_json::to_string(p).unwrap_or_default())
            ),
            _ => String::new(),
        };
        format!(
            "{}image {}
ready 1
{parked}",
            self.base.describe(),
            file_identity(self.image_disk)
        )
    }

    pub fn key(&self) -> String {
        key_of(&self.describe())
    }
}

/// A snapshot's key: the first 10 bytes of the SHA-256 of what it depends
/// on, in hex.
fn key_of(description: &str) -> String {
    Sha256::digest(description.as_bytes())
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The lock file `path`, taken: waits while another process holds it (a
/// snapshot's builder).
fn lock(path: &Path) -> std::io::Result<File> {
    let f = File::create(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Removes the lock files of `locks` whose snapshot is gone, unless a
/// builder holds them.
fn remove_unheld_locks(locks: Vec<PathBuf>) {
    for l in locks {
        if l.with_extension("").is_dir() {
            continue;
        }
        if let Some(held) = try_lock(&l) {
            let _ = std::fs::remove_file(&l);
            drop(held);
        }
    }
}

/// The ready snapshot for `spec` under `root` (see the module's doc), or
/// None: at an image's first run, which marks it seen, and while it is not
/// made yet. From the second run on, a missing one is made in the
/// background once this run is over ([`start_pending`]), unless another
/// process is making it or making it failed less than [`RETRY_FAILED`] ago.
pub fn ready(root: &Path, spec: &ReadySpec) -> Result<Option<(PathBuf, String)>, RuntimeError> {
    let key = spec.key();
    let rroot = root.join(READY_DIR);
    let dir = rroot.join(&key);
    let state_err = |e: std::io::Error| RuntimeError::State {
        path: rroot.display().to_string(),
        source: e,
    };
    let found = |dir: PathBuf, key: String| {
        dir.join("state.bin").is_file().then(|| {
            touch(&dir);
            (dir, key)
        })
    };
    if let Some(made) = found(dir.clone(), key.clone()) {
        return Ok(Some(made));
    }
    std::fs::create_dir_all(&rroot).map_err(state_err)?;
    let seen = rroot.join(format!("{key}.seen"));
    // A parked snapshot is asked for by name: made after the first run.
    if !seen.exists() && !spec.park {
        File::create(&seen).map_err(state_err)?;
        trim_ready(&rroot);
        return Ok(None);
    }
    let lock_path = rroot.join(format!("{key}.lock"));
    if builder_active(&rroot, &key) {
        // Being made (after a build or pull, or by an earlier run): waited
        // for, as first runs wait for the warm-start snapshot's builder.
        drop(lock(&lock_path).map_err(state_err)?);
        return Ok(found(dir, key));
    }
    let failed = rroot.join(format!("{key}.failed"));
    let failed_lately = failed
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < RETRY_FAILED);
    if !failed_lately {
        let job = ReadyJob {
            snapshots: root.to_path_buf(),
            kernel: spec.base.kernel.to_path_buf(),
            agent_disk: spec.base.agent_disk.to_path_buf(),
            cpus: spec.base.cpus,
            memory: spec.base.memory,
            image_disk: spec.image_disk.to_path_buf(),
            image: None,
            warm: spec.warm.cloned(),
            park: spec.park,
            key,
        };
        pend(job);
    }
    Ok(None)
}

/// A run's ready snapshot is touched: the least recently used go first.
fn touch(dir: &Path) {
    if let Ok(f) = File::options().append(true).open(dir.join(SPEC_FILE)) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// How long a ready snapshot whose making failed is not tried again.
pub const RETRY_FAILED: std::time::Duration = std::time::Duration::from_secs(3600);

/// What making a ready snapshot in the background needs: a [`ReadySpec`]
/// owned, with where the snapshots live and the key the run computed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadyJob {
    pub snapshots: PathBuf,
    pub kernel: PathBuf,
    pub agent_disk: PathBuf,
    pub cpus: u8,
    pub memory: u64,
    /// Empty when `image` is given.
    pub image_disk: PathBuf,
    /// An image of the store (by id) whose root disk the maker finds or
    /// builds; the key is then computed by the maker.
    #[serde(default)]
    pub image: Option<String>,
    pub warm: Option<vmc_proto::ProcessSpec>,
    /// `warm` is to be parked (see [`ReadySpec::park`]).
    #[serde(default)]
    pub park: bool,
    pub key: String,
}

impl ReadyJob {
    /// What the snapshot depends on, on this host.
    fn spec(&self) -> ReadySpec<'_> {
        ReadySpec {
            base: SnapshotSpec {
                kernel: &self.kernel,
                agent_disk: &self.agent_disk,
                cpus: self.cpus,
                memory: self.memory,
                backend: Backend::host(),
            },
            image_disk: &self.image_disk,
            warm: self.warm.as_ref(),
            park: self.park,
        }
    }
}

/// Has `job` made in the background once this command ends (see
/// [`start_pending`]).
pub fn pend(job: ReadyJob) {
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
}

/// The ready snapshot this process should have made once its run is over.
static PENDING: std::sync::Mutex<Option<ReadyJob>> = std::sync::Mutex::new(None);

fn take_pending() -> Option<ReadyJob> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Starts the making of the ready snapshot [`ready`] found missing, if
/// any: `vmc __make-ready JOB` in a session of its own, with no stdio,
/// not waited for. Called as a command ends, so that the run it belongs to
/// never waits for it.
pub fn start_pending() {
    let Some(job) = take_pending() else {
        return;
    };
    let rroot = job.snapshots.join(READY_DIR);
    let name = match &job.image {
        Some(id) => format!("image-{}", id.trim_start_matches("sha256:")),
        None => job.key.clone(),
    };
    let file = rroot.join(format!("{name}.job"));
    if let Err(e) = std::fs::create_dir_all(&rroot) {
        log::info!("not making a ready snapshot: {}: {e}", rroot.display());
        return;
    }
    let started = serde_json::to_vec(&job)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::image::store::write_atomic(&file, &b))
        .and_then(|_| {
            let mut c = std::process::Command::new(std::env::current_exe()?);
            c.arg("__make-ready").arg(&file);
            crate::host::detach(&mut c);
            c.spawn().map(drop)
        });
    if let Err(e) = started {
        log::info!("not making the ready snapshot {name}: {e}");
        let _ = std::fs::remove_file(&file);
    }
}

/// Whether a `vmc __make-ready` process runs on this host.
pub fn makers_running() -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(b"__make-ready".as_slice()))
    })
}

/// Waits while ready snapshots under `root` are being made in the
/// background: a maker's lock held, or a job not yet taken while a maker
/// runs. Bounded by the makers (whose own waits on their guests are bounded
/// by the guests' progress): a job left by a maker that died is not waited
/// for. For the bench, whose measured runs must not share the CPU with one.
pub fn wait_for_makers(root: &Path) {
    let rroot = root.join(READY_DIR);
    let busy = || {
        let Ok(d) = std::fs::read_dir(&rroot) else {
            return false;
        };
        let (mut held, mut jobs) = (false, false);
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            held |= name.ends_with(".lock") && try_lock(&e.path()).is_none();
            jobs |= name.ends_with(".job");
        }
        held || (jobs && makers_running())
    };
    while busy() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `vmc __make-ready JOB`: makes the ready snapshot `JOB` (a [`ReadyJob`]
/// file, removed once read) describes, under its lock. A failure is
/// recorded as `<key>.failed` (its one-line reason) so that runs do not try
/// again for [`RETRY_FAILED`].
pub fn make_pending(job_file: &Path) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::State {
        path: job_file.display().to_string(),
        source: e,
    };
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(File::open(job_file).map_err(io)?, 1 << 20),
        &mut text,
    )
    .map_err(io)?;
    let mut job: ReadyJob = serde_json::from_slice(&text)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    let rroot = job.snapshots.join(READY_DIR);
    if let Some(id) = job.image.clone() {
        // An image that just arrived: its disk, then its key.
        let home = super::vmc_home();
        let image_err = |message: String| RuntimeError::Image {
            image: id.clone(),
            message,
        };
        let store = crate::image::Store::open(&home).map_err(|e| image_err(e.to_string()))?;
        let img = store.resolve(&id).map_err(|e| image_err(e.to_string()))?;
        job.image_disk = crate::image::disk::root_disk(&store, &img, &home.join("cache"))
            .map_err(|e| image_err(e.to_string()))?;
        job.key = job.spec().key();
    }
    let _lock = lock(&rroot.join(format!("{}.lock", job.key))).map_err(io)?;
    let _ = std::fs::remove_file(job_file);
    let spec = job.spec();
    let key = spec.key();
    if key != job.key || rroot.join(&key).join("state.bin").is_file() {
        // Its inputs changed since (a new kernel), or another made it.
        return Ok(());
    }
    let made = (|| {
        let (base_dir, base_key) = ensure(&job.snapshots, &spec.base, false)?;
        let tmp = make_twice(&rroot, &key, |tmp| {
            create_ready(tmp, &spec, &key, &base_dir, &base_key)
        })?;
        std::fs::rename(&tmp, rroot.join(&key)).map_err(|e| RuntimeError::State {
            path: rroot.display().to_string(),
            source: e,
        })
    })();
    let failed = rroot.join(format!("{key}.failed"));
    match &made {
        Ok(()) => {
            let _ = std::fs::remove_file(&failed);
        }
        Err(e) => {
            let _ = std::fs::write(&failed, format!("{}\n", crate::host::error_line(e)));
        }
    }
    trim_ready(&rroot);
    made
}

/// Removes the least recently used ready snapshots beyond [`MAX_READY`].
fn trim_ready(rroot: &Path) {
    let Ok(entries) = std::fs::read_dir(rroot) else {
        return;
    };
    let mtime = |p: &Path| p.metadata().ok()?.modified().ok();
    let (mut snaps, mut seen, mut locks) = (Vec::new(), Vec::new(), Vec::new());
    for e in entries.flatten() {
        let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            if let Some(t) = mtime(&p.join(SPEC_FILE)) {
                snaps.push((t, p));
            }
        } else if [".seen", ".failed", ".job"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            if let Some(t) = mtime(&p) {
                seen.push((t, p));
            }
        } else if name.ends_with(".lock") {
            locks.push(p);
        }
    }
    for (list, keep) in [(&mut snaps, MAX_READY), (&mut seen, MAX_SEEN)] {
        list.sort();
        let extra = list.len().saturating_sub(keep);
        for (_, p) in list.drain(..extra) {
            // Running VMs keep their mappings of the memory file.
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
    remove_unheld_locks(locks);
}

/// Docker's /etc files, empty: seeded in a ready snapshot's writable layer
/// so that a run only writes their contents (see `net::etc_files`).
const ETC_FILES: [&str; 3] = ["resolv.conf", "hosts", "hostname"];

/// What has the agent ready `p` in a ready snapshot: its executable read
/// (`Warm`), or the process started and stopped at its entry (`Park`).
fn warm_or_park(park: bool, p: &vmc_proto::ProcessSpec) -> HostMsg {
    if park {
        HostMsg::Park(p.clone())
    } else {
        HostMsg::Warm(p.clone())
    }
}

/// Restores the base snapshot with the image's disk into a VM whose agent
/// mounts the root (writable layer in memory), snapshots it into `tmp` once
/// the agent is idle, and checks that the snapshot restores.
fn create_ready(
    tmp: &Path,
    spec: &ReadySpec,
    key: &str,
    base_dir: &Path,
    base_key: &str,
) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::State {
        path: tmp.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(tmp).map_err(io)?;
    std::fs::write(tmp.join(SPEC_FILE), spec.describe()).map_err(io)?;
    // A --rm run's scratch disk is empty: its layer is in memory.
    let scratch = tmp.join("placeholder-scratch");
    File::create(&scratch).map_err(io)?;
    let vsock = tmp.join("v.sock");
    log::info!(
        "creating the ready snapshot {key} of {}",
        spec.image_disk.display()
    );
    let b = &spec.base;
    let cfg = |vsock: &Path| -> Result<vmm::VmConfig, RuntimeError> {
        Ok(vm_config(
            b.kernel,
            b.agent_disk,
            spec.image_disk,
            &scratch,
            vsock,
            b.cpus,
            b.memory,
            None,
            unplugged().map_err(|e| RuntimeError::Network(e.to_string()))?,
            None,
        ))
    };
    let vm = super::jail::start(cfg(&vsock)?, Some((base_dir, base_key)), None)?;
    let mut dog = Watchdog::new(ANSWER_CPU);
    let mut watch = || verdict(vm.judge(&mut dog));
    let root = RootSpec {
        image_dev: super::guest::IMAGE_DEV.into(),
        image_fstype: "erofs".into(),
        scratch_dev: super::guest::SCRATCH_DEV.into(),
        hostname: String::new(),
        image_sectors: super::guest::sectors(spec.image_disk),
        scratch_sectors: 0,
        network: None,
        // Up, with no address: a run with a network only adds its own, and
        // one without has an interface that reaches nothing (its backend is
        // unplugged and the guest has no IPv6 to give it a link-local one).
        link: Some(vmc_proto::LinkSpec {
            ifname: super::guest::NET_IF.into(),
            mtu: crate::devices::virtio::net::MTU,
        }),
        etc: ETC_FILES
            .iter()
            .map(|n| (n.to_string(), String::new()))
            .collect(),
        upper_in_memory: true,
        // A ready snapshot holds no volume: a run's are mounted after.
        mounts: Vec::new(),
        read_only: false,
        root_share: None,
    };
    let answers = AgentConn::connect(&vsock, AGENT_PORT, &mut watch).and_then(|mut c| {
        let refreshed = c.request(&refresh_msg(), &mut watch)?;
        let mut mounted = c.request(&HostMsg::Mount(root), &mut watch)?;
        if let (GuestMsg::Mounted, Some(p)) = (&mounted, spec.warm) {
            mounted = match (
                spec.park,
                c.request(&warm_or_park(spec.park, p), &mut watch)?,
            ) {
                (false, GuestMsg::Warmed) | (true, GuestMsg::Parked { .. }) => GuestMsg::Mounted,
                (_, GuestMsg::StartFailed { message, .. }) => GuestMsg::Error(message),
                (_, other) => other,
            };
        }
        c.close();
        Ok((refreshed, mounted))
    });
    let answers = match answers {
        Ok((GuestMsg::Refreshed, GuestMsg::Mounted)) => Ok(()),
        Ok((GuestMsg::Error(e), _) | (_, GuestMsg::Error(e))) => Err(AgentError::remote(e)),
        Ok((a, b)) => Err(AgentError::unexpected(&(a, b))),
        Err(e) => Err(e),
    };
    save_and_verify(vm, answers, tmp, key, &vsock, cfg, &[&scratch])
}

/// Saves the VM `vm`, whose agent answered as `answered` (and is idle),
/// as the snapshot `key` in `tmp`, and checks that it restores into a
/// guest that answers (`cfg` makes the trial VM's config); removes the
/// sockets and `leftovers` either way.
fn save_and_verify(
    vm: super::jail::Vm,
    answered: Result<(), AgentError>,
    tmp: &Path,
    key: &str,
    vsock: &Path,
    cfg: impl Fn(&Path) -> Result<vmm::VmConfig, RuntimeError>,
    leftovers: &[&Path],
) -> Result<(), RuntimeError> {
    if let Err(e) = answered {
        vm.stop();
        return Err(ended(e, vm.wait()));
    }
    let snap = vm.snapshot(tmp, key);
    vm.stop();
    vm.wait();
    snap.map_err(|e| RuntimeError::Vmm(e.into()))?;
    let _ = std::fs::remove_file(vsock);
    // Published only if it restores: one trial restore must answer.
    let trial = tmp.join("trial.sock");
    let result = cfg(&trial).and_then(|c| verify(tmp, key, c));
    for f in leftovers.iter().copied().chain([trial.as_path()]) {
        let _ = std::fs::remove_file(f);
    }
    result
}

/// Whether two descriptions differ only in the VM's size (which each run
/// picks: a snapshot for another size is not stale).
fn same_but_size(a: &str, b: &str) -> bool {
    let inputs = |d: &str| -> Vec<String> {
        d.lines()
            .filter(|l| !l.starts_with("cpus ") && !l.starts_with("memory "))
            .map(str::to_string)
            .collect()
    };
    inputs(a) == inputs(b)
}

/// The snapshot for `spec` under `root`, creating it if missing (or if `rebuild`).
pub fn ensure(
    root: &Path,
    spec: &SnapshotSpec,
    rebuild: bool,
) -> Result<(PathBuf, String), RuntimeError> {
    let key = spec.key();
    let root = root.to_path_buf();
    let dir = root.join(&key);
    if !rebuild && dir.join("state.bin").is_file() {
        return Ok((dir, key));
    }
    let state_err = |e: std::io::Error| RuntimeError::State {
        path: root.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(&root).map_err(state_err)?;
    // Concurrent first runs wait for one builder.
    let _lock = lock(&root.join(format!("{key}.lock"))).map_err(state_err)?;
    if dir.join("state.bin").is_file() {
        if !rebuild {
            return Ok((dir, key));
        }
        // Running VMs keep their mappings of the old memory file.
        let trash = root.join(format!(".trash-{}", super::new_id()));
        std::fs::rename(&dir, &trash).map_err(state_err)?;
        let _ = std::fs::remove_dir_all(&trash);
    }
    // Leftovers of builders that died.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".{key}.tmp."))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = make_twice(&root, &key, |tmp| create(tmp, spec, &key))?;
    std::fs::rename(&tmp, &dir).map_err(state_err)?;
    if let Ok(d) = File::open(&root) {
        let _ = d.sync_all();
    }
    Ok((dir, key))
}

/// Makes a snapshot with `create` in a new temporary directory under
/// `root` and returns that directory. A snapshot whose trial restore does
/// not answer is kept aside (`.quarantine-<key>-<id>`, for diagnosis) and
/// made again once from a new boot; any other failure leaves nothing.
fn make_twice(
    root: &Path,
    key: &str,
    mut create: impl FnMut(&Path) -> Result<(), RuntimeError>,
) -> Result<PathBuf, RuntimeError> {
    let mut attempt = 1;
    loop {
        let tmp = root.join(format!(".{key}.tmp.{}", &super::new_id()[..12]));
        match create(&tmp) {
            Ok(()) => return Ok(tmp),
            Err(RuntimeError::SnapshotUnusable(why)) if attempt == 1 => {
                let aside = root.join(format!(".quarantine-{key}-{}", &super::new_id()[..8]));
                let kept = std::fs::rename(&tmp, &aside).is_ok();
                eprintln!(
                    "vmc: warning: the new warm-start snapshot did not answer after a trial restore ({why}){}; making it again",
                    if kept { format!("; kept as {}", aside.display()) } else { String::new() }
                );
                let _ = std::fs::remove_dir_all(&tmp);
                attempt += 1;
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
    }
}

/// Boots a template VM into `tmp`, waits for its agent, snapshots it once it
/// is idle, and checks that the snapshot restores into a guest that answers.
fn create(tmp: &Path, spec: &SnapshotSpec, key: &str) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::State {
        path: tmp.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(tmp).map_err(io)?;
    std::fs::write(tmp.join(SPEC_FILE), spec.describe()).map_err(io)?;
    let image = tmp.join("placeholder-image");
    let scratch = tmp.join("placeholder-scratch");
    File::create(&image).map_err(io)?;
    File::create(&scratch).map_err(io)?;
    let vsock = tmp.join("v.sock");
    log::info!("creating the warm-start snapshot {key} (a full boot, once)");
    let cfg = |vsock: &Path| -> Result<vmm::VmConfig, RuntimeError> {
        Ok(vm_config(
            spec.kernel,
            spec.agent_disk,
            &image,
            &scratch,
            vsock,
            spec.cpus,
            spec.memory,
            None,
            unplugged().map_err(|e| RuntimeError::Network(e.to_string()))?,
            None,
        ))
    };
    let vm = super::jail::start(cfg(&vsock)?, None, None)?;
    let mut dog = Watchdog::new(BOOT_CPU);
    let conn = AgentConn::connect(&vsock, AGENT_PORT, &mut || verdict(vm.judge(&mut dog)));
    let answered = conn.map(|c| c.close());
    save_and_verify(vm, answered, tmp, key, &vsock, cfg, &[&image, &scratch])
}

/// Restores the snapshot in `dir` and asks its agent for a refresh.
fn verify(dir: &Path, key: &str, cfg: vmm::VmConfig) -> Result<(), RuntimeError> {
    let vsock = cfg.vsock_uds().map(Path::to_path_buf).unwrap_or_default();
    let vm = super::jail::start(cfg, Some((dir, key)), None)?;
    let mut dog = Watchdog::new(ANSWER_CPU);
    let mut watch = || verdict(vm.judge(&mut dog));
    let answer = AgentConn::connect(&vsock, AGENT_PORT, &mut watch)
        .and_then(|mut c| c.request(&refresh_msg(), &mut watch));
    vm.stop();
    let exit = vm.wait();
    match answer {
        Ok(GuestMsg::Refreshed) => Ok(()),
        Ok(other) => Err(AgentError::unexpected(&other).into()),
        Err(e) => Err(RuntimeError::SnapshotUnusable(ended(e, exit).to_string())),
    }
}

/// Which snapshot a VM was restored from: its directory and the inode of
/// its state file (a snapshot made again later has another).
#[derive(Debug, Clone)]
pub struct Restored {
    pub dir: PathBuf,
    pub key: String,
    ino: u64,
}

impl Restored {
    /// Whether it is a ready snapshot (under [`READY_DIR`]).
    pub fn is_ready(&self) -> bool {
        self.dir
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == READY_DIR)
    }

    /// The snapshot `key` in `dir` as it is now.
    pub fn of(dir: &Path, key: &str) -> Restored {
        Restored {
            dir: dir.to_path_buf(),
            key: key.to_string(),
            ino: std::fs::metadata(dir.join("state.bin"))
                .map(|m| m.ino())
                .unwrap_or(0),
        }
    }
}

/// Moves a snapshot whose guest did not answer aside (as
/// `.quarantine-<key>-<id>` beside it, kept for diagnosis with `vmc system
/// inspect-snapshot`; `vmc system prune` removes it), so that no later run
/// restores it; returns where it went, or None if another process moved or
/// remade it meanwhile. Under the key's lock, so it never moves a snapshot
/// made since.
pub fn quarantine(snap: &Restored) -> std::io::Result<Option<PathBuf>> {
    let name = snap
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _lock = lock(&snap.dir.with_file_name(format!("{name}.lock")))?;
    if Restored::of(&snap.dir, &snap.key).ino != snap.ino || snap.ino == 0 {
        return Ok(None);
    }
    let to = snap
        .dir
        .with_file_name(format!(".quarantine-{name}-{}", &super::new_id()[..8]));
    std::fs::rename(&snap.dir, &to)?;
    Ok(Some(to))
}

/// Removes the stale snapshots under `root` (every one with `current`
/// None): those made from another kernel, agent, vmc version or backend
/// than `current`'s (any size), or older than [`SPEC_FILE`]; and leftovers
/// of builders that died. They are caches, rebuilt on demand. Returns
/// (entries removed, bytes freed).
pub fn prune(root: &Path, current: Option<&SnapshotSpec>) -> std::io::Result<(usize, u64)> {
    let mut count = 0;
    let mut bytes = 0;
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok((0, 0));
    };
    let now = current.map(|c| c.describe());
    let mut locks = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            // A builder's work in progress (`.KEY.tmp.*`) stays while it
            // holds its lock; a dead builder's goes.
            if let Some((key, _)) = name.strip_prefix('.').and_then(|n| n.split_once(".tmp.")) {
                if builder_active(root, key) {
                    continue;
                }
            }
            let made_from = std::fs::read_to_string(p.join(SPEC_FILE)).ok();
            let hidden = name.starts_with('.');
            let fresh = match (&now, &made_from) {
                (Some(n), Some(m)) => !hidden && same_but_size(n, m),
                _ => false,
            };
            if fresh {
                continue;
            }
            bytes += dir_usage(&p);
            std::fs::remove_dir_all(&p)?;
            count += 1;
        } else if p.extension().is_some_and(|x| x == "lock") {
            locks.push(p);
        }
    }
    remove_unheld_locks(locks);
    Ok((count, bytes))
}

/// The lock file `path` taken without waiting, or None if another process
/// holds it (or it cannot be opened).
fn try_lock(path: &Path) -> Option<File> {
    let f = File::open(path).ok()?;
    // SAFETY: flock on a descriptor we own.
    (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(f)
}

/// Whether a process is creating the snapshot `key` now (holds its lock).
fn builder_active(root: &Path, key: &str) -> bool {
    let lock = root.join(format!("{key}.lock"));
    lock.is_file() && try_lock(&lock).is_none()
}

/// Bytes actually allocated under `dir` (snapshots' memory files are sparse).
fn dir_usage(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(m) = e.metadata() {
                total += if m.is_dir() {
                    dir_usage(&e.path())
                } else {
                    m.blocks() * 512
                };
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ready snapshot's key follows its base's inputs and the image's
    /// disk; the first request only marks the image seen; beyond
    /// MAX_READY the least recently used go.
    #[test]
    fn ready_snapshots_are_keyed_marked_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (k, a) = (dir.path().join("vmlinux"), dir.path().join("agent.erofs"));
        let (d1, d2) = (dir.path().join("one.erofs"), dir.path().join("two.erofs"));
        for f in [&k, &a, &d1, &d2] {
            std::fs::write(f, b"x").unwrap();
        }
        let base = SnapshotSpec {
            kernel: &k,
            agent_disk: &a,
            cpus: 1,
            memory: 256 << 20,
            backend: Backend::Vmx,
        };
        let one = ReadySpec {
            base,
            image_disk: &d1,
            warm: None,
            park: false,
        };
        let two = ReadySpec {
            base,
            image_disk: &d2,
            warm: None,
            park: false,
        };
        assert_ne!(one.key(), two.key());
        assert_ne!(one.key(), base.key());
        let bigger = ReadySpec {
            base: SnapshotSpec { cpus: 2, ..base },
            image_disk: &d1,
            warm: None,
            park: false,
        };
        assert_ne!(one.key(), bigger.key());
        // What a ready snapshot warms is not in its key; what a parked one
        // holds is, whole.
        let sh = |args: &[&str]| vmc_proto::ProcessSpec {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        let (p1, p2) = (sh(&["sh", "-c", "a"]), sh(&["sh", "-c", "b"]));
        let warmed = ReadySpec {
            warm: Some(&p1),
            ..one
        };
        assert_eq!(warmed.key(), one.key());
        let parked = |p| ReadySpec {
            warm: Some(p),
            park: true,
            ..one
        };
        assert_ne!(parked(&p1).key(), one.key());
        assert_ne!(parked(&p1).key(), parked(&p2).key());
        let same = p1.clone();
        assert_eq!(parked(&p1).key(), parked(&same).key());

        let root = dir.path().join("snaps");
        let rroot = root.join(READY_DIR);
        take_pending();
        assert!(ready(&root, &one).unwrap().is_none());
        assert!(rroot.join(format!("{}.seen", one.key())).is_file());
        assert!(take_pending().is_none(), "the first run only marks");
        // The second leaves the making to the end of the command.
        assert!(ready(&root, &one).unwrap().is_none());
        let job = take_pending().expect("a job for the second run");
        assert_eq!(
            (job.key.as_str(), &job.image_disk),
            (one.key().as_str(), &d1)
        );
        assert_eq!(
            (job.cpus, job.memory, &job.snapshots),
            (1, 256 << 20, &root)
        );
        assert!(!job.park);
        // A parked snapshot is asked for by name: its first run has it made.
        let p1_parked = parked(&p1);
        assert!(ready(&root, &p1_parked).unwrap().is_none());
        let job = take_pending().expect("a job for the first parked run");
        assert!(job.park);
        assert_eq!(job.warm.as_ref(), Some(&p1));
        assert_eq!(job.key, p1_parked.key());
        // Not again while making it failed lately, nor while another
        // process makes it.
        let failed = rroot.join(format!("{}.failed", one.key()));
        std::fs::write(&failed, "boom\n").unwrap();
        assert!(ready(&root, &one).unwrap().is_none());
        assert!(take_pending().is_none(), "failed lately");
        std::fs::remove_file(&failed).unwrap();
        // One being made is waited for: found when its maker is done.
        let held = lock(&rroot.join(format!("{}.lock", one.key()))).unwrap();
        let maker = {
            let made = rroot.join(one.key());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                std::fs::create_dir_all(&made).unwrap();
                std::fs::write(made.join("state.bin"), "").unwrap();
                drop(held);
            })
        };
        let t0 = std::time::Instant::now();
        let found = ready(&root, &one).unwrap();
        assert!(t0.elapsed() >= std::time::Duration::from_millis(250));
        assert_eq!(found, Some((rroot.join(one.key()), one.key())));
        assert!(take_pending().is_none(), "made by the other");
        maker.join().unwrap();
        std::fs::remove_dir_all(rroot.join(one.key())).unwrap();

        for i in 0..MAX_READY + 2 {
            let d = rroot.join(format!("snap{i:02}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(SPEC_FILE), "x").unwrap();
            let f = File::options()
                .append(true)
                .open(d.join(SPEC_FILE))
                .unwrap();
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            f.set_modified(t).unwrap();
        }
        trim_ready(&rroot);
        let mut left: Vec<String> = std::fs::read_dir(&rroot)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snap"))
            .collect();
        left.sort();
        assert_eq!(left.len(), MAX_READY);
        assert_eq!(left[0], "snap02", "the two least recently used went");

        // Seen marks are bounded too, and locks of gone snapshots go.
        for i in 0..MAX_SEEN + 3 {
            let f = rroot.join(format!("k{i:03}.seen"));
            std::fs::write(&f, "").unwrap();
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::options()
                .append(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::write(rroot.join("gone.lock"), "").unwrap();
        std::fs::write(rroot.join("snap05.lock"), "").unwrap();
        trim_ready(&rroot);
        let names: Vec<String> = std::fs::read_dir(&rroot)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".seen")).count(),
            MAX_SEEN
        );
        assert!(
            !names.contains(&"k000.seen".to_string()),
            "the oldest marks went"
        );
        assert!(!names.contains(&"gone.lock".to_string()));
        assert!(
            names.contains(&"snap05.lock".to_string()),
            "its snapshot is there"
        );
    }

    #[test]
    fn keys_change_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let a = dir.path().join("agent.erofs");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&a, b"agent").unwrap();
        let spec = |cpus, memory| SnapshotSpec {
            kernel: &k,
            agent_disk: &a,
            cpus,
            memory,
            backend: Backend::Vmx,
        };
        let base = spec(1, 256 << 20).key();
        assert_eq!(base, spec(1, 256 << 20).key(), "stable");
        assert_eq!(base.len(), 20);
        assert_ne!(base, spec(2, 256 << 20).key());
        assert_ne!(base, spec(1, 512 << 20).key());
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&k, b"kernel, rebuilt").unwrap();
        assert_ne!(base, spec(1, 256 << 20).key(), "a new kernel file");
        let a2 = dir.path().join("agent-2.erofs");
        std::fs::write(&a2, b"agent").unwrap();
        let other = SnapshotSpec {
            kernel: &k,
            agent_disk: &a2,
            cpus: 1,
            memory: 256 << 20,
            backend: Backend::Vmx,
        };
        assert_ne!(spec(1, 256 << 20).key(), other.key(), "another agent");
        // Another backend: each one of them another key.
        let on = |backend| {
            SnapshotSpec {
                kernel: &k,
                agent_disk: &a,
                cpus: 1,
                memory: 256 << 20,
                backend,
            }
            .key()
        };
        let keys: std::collections::HashSet<String> = [
            Backend::Vmx,
            Backend::Svm,
            Backend::PvmNative,
            Backend::Pvm,
            Backend::Unknown,
        ]
        .into_iter()
        .map(on)
        .collect();
        assert_eq!(keys.len(), 5, "one key per backend");
        assert!(keys.contains(&spec(1, 256 << 20).key()));
        // And the vmc build: its id is one of the hashed inputs.
        assert!(spec(1, 256 << 20).describe().starts_with(&format!(
            "vmc {} build {}\n",
            env!("CARGO_PKG_VERSION"),
            env!("VMC_BUILD_ID")
        )));
    }

    /// The README: a snapshot whose trial restore does not answer is kept
    /// aside and made again once; a second such failure is the error.
    #[test]
    fn an_unusable_snapshot_is_kept_aside_and_made_again_once() {
        let root = tempfile::tempdir().unwrap();
        let entries = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let mut calls = 0;
        let made = make_twice(root.path(), "k", |tmp| {
            calls += 1;
            std::fs::create_dir_all(tmp).unwrap();
            std::fs::write(tmp.join("attempt"), calls.to_string()).unwrap();
            if calls == 1 {
                Err(RuntimeError::SnapshotUnusable("no answer".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(std::fs::read_to_string(made.join("attempt")).unwrap(), "2");
        let names = entries();
        let aside: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(".quarantine-k-"))
            .collect();
        assert_eq!(aside.len(), 1, "{names:?}");
        assert_eq!(
            std::fs::read_to_string(root.path().join(aside[0]).join("attempt")).unwrap(),
            "1",
            "the first attempt is what was kept"
        );
        // Unusable twice: the second is the error, and only the first kept.
        std::fs::remove_dir_all(&made).unwrap();
        let e = make_twice(root.path(), "j", |tmp| {
            std::fs::create_dir_all(tmp).unwrap();
            Err(RuntimeError::SnapshotUnusable("still no answer".into()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("still no answer"), "{e}");
        let names = entries();
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with(".quarantine-j-"))
                .count(),
            1,
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn prune_removes_snapshots_and_leftovers() {
        let home = tempfile::tempdir().unwrap();
        let root = home.path().join("snapshots");
        std::fs::create_dir_all(root.join("abc")).unwrap();
        std::fs::write(root.join("abc/memory.img"), vec![1u8; 8192]).unwrap();
        std::fs::create_dir_all(root.join(".abc.tmp.123")).unwrap();
        std::fs::write(root.join("abc.lock"), b"").unwrap();
        let (n, bytes) = prune(&root, None).unwrap();
        assert_eq!(n, 2);
        assert!(bytes >= 8192);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(prune(&root, None).unwrap(), (0, 0));
    }

    #[test]
    fn prune_leaves_a_snapshot_being_made() {
        let home = tempfile::tempdir().unwrap();
        let root = home.path().join("snapshots");
        std::fs::create_dir_all(root.join(".k1.tmp.abc")).unwrap();
        std::fs::create_dir_all(root.join(".k2.tmp.def")).unwrap();
        for k in ["k1", "k2"] {
            std::fs::write(root.join(format!("{k}.lock")), b"").unwrap();
        }
        // k1's builder is at work (holds the lock); k2's died.
        let held = try_lock(&root.join("k1.lock")).unwrap();
        let (n, _) = prune(&root, None).unwrap();
        assert_eq!(n, 1);
        assert!(root.join(".k1.tmp.abc").is_dir() && root.join("k1.lock").is_file());
        assert!(!root.join(".k2.tmp.def").exists() && !root.join("k2.lock").exists());
        drop(held);
        assert_eq!(prune(&root, None).unwrap().0, 1);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn prune_keeps_snapshots_of_the_current_inputs_in_any_size() {
        let home = tempfile::tempdir().unwrap();
        let (k, a) = (
            home.path().join("vmlinux"),
            home.path().join("agent-1.erofs"),
        );
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&a, b"agent").unwrap();
        let spec = |cpus, agent| SnapshotSpec {
            kernel: &k,
            agent_disk: agent,
            cpus,
            memory: 256 << 20,
            backend: Backend::Vmx,
        };
        let root = home.path().join("snapshots");
        let a2 = home.path().join("agent-2.erofs");
        let made = |s: &SnapshotSpec| {
            let d = root.join(s.key());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(SPEC_FILE), s.describe()).unwrap();
            std::fs::write(root.join(format!("{}.lock", s.key())), b"").unwrap();
            s.key()
        };
        let one = made(&spec(1, &a));
        let two = made(&spec(2, &a));
        let old_agent = made(&spec(1, &a2));
        std::fs::create_dir_all(root.join("from-an-older-vmc")).unwrap();
        // A quarantined snapshot of the current inputs (the README: `vmc
        // system prune` removes it), with the hung guest's state beside it.
        let quarantined = root.join(format!(".quarantine-{one}-x"));
        std::fs::create_dir_all(quarantined.join("hung")).unwrap();
        std::fs::write(quarantined.join(SPEC_FILE), spec(1, &a).describe()).unwrap();
        std::fs::write(quarantined.join("hung/state.bin"), b"state").unwrap();
        let (n, _) = prune(&root, Some(&spec(1, &a))).unwrap();
        assert_eq!(
            n, 3,
            "the other agent's, the one without a spec and the quarantined one"
        );
        assert!(!quarantined.exists());
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            one.clone(),
            format!("{one}.lock"),
            two.clone(),
            format!("{two}.lock"),
        ];
        want.sort();
        assert_eq!(left, want, "{old_agent} and its lock are gone");
    }
}
