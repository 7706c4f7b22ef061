//! The sandboxes a benchmark compares, each driven the way its users drive
//! it, as a subprocess: vmc in namespace mode (`ns`) and in microVM mode
//! (`vm`), `crun` with the same root filesystem (the namespace baseline
//! from Debian), and peers a user adds with `--peer NAME=COMMAND`.
//!
//! vmc and crun support every scenario; a peer only runs workloads to exit
//! (its command gets the workload as arguments), so it appears in the
//! start, cpu, syscall and disk rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use oci_spec::runtime::{Process, Root, Spec};

use crate::image::Store;
use crate::runtime::ns::OverlayRoot;

/// Why a sandbox or one measurement failed: the report names it in a note
/// and leaves the runtime out of the rest of the scenario.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("invalid --peer '{0}': expected NAME=COMMAND, e.g. fc='fc-run --rootfs \"$VMC_BENCH_ROOTFS\" --'")]
    PeerSpec(String),
    #[error(
        "invalid --peer name '{0}': use letters, digits, - and _, and not ns, vm, crun or qemu"
    )]
    PeerName(String),
    #[error(transparent)]
    Store(#[from] crate::image::StoreError),
    #[error("unpacking the layers of {image}: {source}")]
    Unpack {
        image: String,
        source: crate::image::ImageError,
    },
    #[error(transparent)]
    Ns(#[from] crate::runtime::ns::NsError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("writing the crun bundle: {0}")]
    Bundle(#[from] oci_spec::OciSpecError),
    #[error("{0} runs workloads to exit only")]
    ExitOnly(String),
    #[error("{runtime} did not start a sandbox: {message}")]
    NotStarted { runtime: String, message: String },
    #[error("no state for sandbox {0}")]
    NoState(String),
    #[error("sandbox {0} has no process")]
    NoProcess(String),
    #[error("{status}: {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{0}")]
    Missing(&'static str),
    #[error("{0}")]
    Qemu(String),
    #[error("{started} of {wanted} started: {first}")]
    Partial {
        started: usize,
        wanted: usize,
        first: Box<MeasureError>,
    },
    #[error("{what} {got} of {want} bytes")]
    Short {
        what: &'static str,
        got: String,
        want: u64,
    },
    #[error("outbound: {source} ({status})")]
    Outbound {
        source: std::io::Error,
        status: String,
    },
}

impl MeasureError {
    /// An I/O error while doing `what`.
    pub fn io(what: &'static str) -> impl Fn(std::io::Error) -> MeasureError + Copy {
        move |source| MeasureError::Io { what, source }
    }
}

/// How a runtime is driven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Ns,
    Vm,
    Crun,
    /// `sh -c 'COMMAND "$@"' peer ARGV…`, with `VMC_BENCH_ROOTFS` and
    /// `VMC_BENCH_IMAGE` in its environment.
    Peer(String),
    /// QEMU's microvm with vmc's kernel and the image's disk
    /// ([`super::qemu`]): start (restore) and boot only.
    Qemu,
}

/// One column of the report.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub name: String,
    pub kind: Kind,
}

impl Runtime {
    /// Whether the runtime keeps sandboxes alive between commands
    /// (exec, memory, density).
    pub fn long_lived(&self) -> bool {
        !matches!(self.kind, Kind::Peer(_) | Kind::Qemu)
    }

    /// Whether the runtime publishes ports and gives outbound networking.
    pub fn networked(&self) -> bool {
        matches!(self.kind, Kind::Ns | Kind::Vm)
    }
}

/// Parses `--peer NAME=COMMAND`.
pub fn parse_peer(s: &str) -> Result<Runtime, MeasureError> {
    let (name, cmd) = s
        .split_once('=')
        .filter(|(n, c)| !n.is_empty() && !c.trim().is_empty())
        .ok_or_else(|| MeasureError::PeerSpec(s.to_string()))?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || ["ns", "vm", "crun", "qemu"].contains(&name)
    {
        return Err(MeasureError::PeerName(name.to_string()));
    }
    Ok(Runtime {
        name: name.to_string(),
        kind: Kind::Peer(cmd.to_string()),
    })
}

/// A sandbox kept running for a scenario.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub name: String,
    pub kind: Kind,
}

/// What the runtimes share: the vmc binary, the image, and for crun and
/// peers the image's root filesystem (an overlay of the unpacked layers
/// with a writable upper directory of the benchmark's own).
pub struct Env {
    pub exe: PathBuf,
    pub image: String,
    pub kernel: Option<PathBuf>,
    pub tmp: PathBuf,
    rootfs: Option<OverlayRoot>,
    rootfs_dir: PathBuf,
    prefix: String,
    counter: AtomicUsize,
    /// Sandboxes started (or starting) and not yet removed.
    live: Mutex<Vec<Sandbox>>,
    /// Start commands running now.
    starting: AtomicUsize,
    /// The QEMU peer, when there is one.
    pub qemu: Option<Mutex<super::qemu::Qemu>>,
}

/// Options for a long-lived vmc sandbox.
#[derive(Debug, Default, Clone)]
pub struct StartOpts {
    /// `--network` (None: vmc's default, passt).
    pub network_none: bool,
    /// `-p HOST:CONTAINER` pairs.
    pub ports: Vec<(u16, u16)>,
    /// A host directory mounted at [`VOLUME_AT`] (`-v`, crun's bind mount).
    pub volume: Option<PathBuf>,
}

/// Where the `volume` scenario's host directory is mounted.
pub const VOLUME_AT: &str = "/vmc-vol";

impl Env {
    pub fn new(exe: PathBuf, image: String, kernel: Option<PathBuf>, tmp: PathBuf) -> Env {
        let prefix = format!("vmc-bench-{}", &crate::runtime::new_id()[..8]);
        Env {
            exe,
            image,
            kernel,
            rootfs_dir: tmp.join("rootfs"),
            tmp,
            rootfs: None,
            prefix,
            counter: AtomicUsize::new(0),
            live: Mutex::new(Vec::new()),
            starting: AtomicUsize::new(0),
            qemu: None,
        }
    }

    /// Mounts the image's root filesystem for crun and peers (needs root).
    pub fn mount_rootfs(&mut self) -> Result<&Path, MeasureError> {
        if self.rootfs.is_none() {
            let store = Store::open(&crate::runtime::vmc_home())?;
            let img = store.resolve(&self.image)?;
            let cache = crate::runtime::vmc_home().join("cache");
            let lowers =
                crate::image::disk::layer_dirs(&store, &img, &cache).map_err(|source| {
                    MeasureError::Unpack {
                        image: self.image.clone(),
                        source,
                    }
                })?;
            let root = OverlayRoot::mount(
                &lowers,
                &self.tmp.join("upper"),
                &self.tmp.join("work"),
                &self.rootfs_dir,
                &self.tmp,
            )?;
            self.rootfs = Some(root);
        }
        Ok(&self.rootfs_dir)
    }

    /// A fresh sandbox name.
    pub fn name(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn vmc(&self) -> Command {
        let mut c = Command::new(&self.exe);
        if let Some(k) = &self.kernel {
            c.env("VMC_KERNEL", k);
        }
        c.stdin(Stdio::null());
        c
    }

    fn crun(&self) -> Command {
        let mut c = Command::new("crun");
        // Like vmc's namespace mode without limits: no cgroup of its own
        // (crun refuses cgroup v1 hybrid hosts otherwise).
        c.arg("--root")
            .arg(self.tmp.join("crun-state"))
            .arg("--cgroup-manager=disabled");
        c.stdin(Stdio::null());
        c
    }

    /// An OCI bundle for crun running `argv` on the shared root.
    fn bundle(
        &self,
        name: &str,
        argv: &[String],
        volume: Option<&Path>,
    ) -> Result<PathBuf, MeasureError> {
        let dir = self.tmp.join("bundles").join(name);
        std::fs::create_dir_all(&dir).map_err(MeasureError::io("making the crun bundle"))?;
        let mut spec = Spec::default();
        let mut process = Process::default();
        process.set_args(Some(argv.to_vec()));
        spec.set_process(Some(process));
        let mut root = Root::default();
        root.set_path(self.rootfs_dir.clone())
            .set_readonly(Some(false));
        spec.set_root(Some(root));
        spec.set_hostname(Some("vmc-bench".into()));
        if let Some(v) = volume {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination(VOLUME_AT)
                    .typ("bind")
                    .source(v)
                    .options(vec!["rbind".to_string(), "rw".to_string()])
                    .build()?,
            );
            spec.set_mounts(Some(mounts));
        }
        spec.save(dir.join("config.json"))?;
        Ok(dir)
    }

    /// A process running `argv` in a new sandbox of `rt` to its exit,
    /// stdout piped. `cold`: vm boots without the snapshot.
    pub fn run(&self, rt: &Runtime, argv: &[String], cold: bool) -> Result<Command, MeasureError> {
        Ok(match &rt.kind {
            Kind::Ns | Kind::Vm => {
                let mut c = self.vmc();
                c.args(["run", "--rm", "--network", "none", "--mode"]);
                c.arg(if rt.kind == Kind::Ns { "ns" } else { "vm" });
                if cold {
                    c.arg("--cold");
                }
                c.arg(&self.image).args(argv);
                c
            }
            Kind::Crun => {
                let name = self.name();
                let bundle = self.bundle(&name, argv, None)?;
                let mut c = self.crun();
                c.args(["run", "--bundle"]).arg(bundle).arg(name);
                c
            }
            Kind::Qemu => return Err(MeasureError::ExitOnly(rt.name.clone())),
            Kind::Peer(cmd) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{cmd} \"$@\""))
                    .arg(&rt.name)
                    .args(argv)
                    .env("VMC_BENCH_ROOTFS", &self.rootfs_dir)
                    .env("VMC_BENCH_IMAGE", &self.image)
                    .stdin(Stdio::null());
                c
            }
        })
    }

    /// The QEMU peer runs `line` in its shell, restored from its saved state
    /// (made at the first call), or boots cold (`cold`, to its shell's first
    /// output); ms to the answer `expect` and to QEMU's exit.
    pub fn qemu_start(
        &self,
        cold: bool,
        line: &str,
        expect: &str,
    ) -> Result<(f64, f64), MeasureError> {
        let mut q = self
            .qemu
            .as_ref()
            .ok_or(MeasureError::Missing("no QEMU peer"))?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cold {
            return q.boot();
        }
        if !q.saved() {
            q.save()?;
        }
        q.run(line, expect)
    }

    /// Starts a sandbox running `argv` in the background; returns once
    /// the runtime reports it started.
    pub fn start(
        &self,
        rt: &Runtime,
        argv: &[String],
        opts: &StartOpts,
    ) -> Result<Sandbox, MeasureError> {
        let name = self.name();
        let sb = Sandbox {
            name: name.clone(),
            kind: rt.kind.clone(),
        };
        // Known (for an interrupt) before it exists; counted while starting.
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sb.clone());
        self.starting.fetch_add(1, Ordering::SeqCst);
        let r = self.start_as(rt, &name, argv, opts);
        self.starting.fetch_sub(1, Ordering::SeqCst);
        if r.is_err() {
            // A start that failed or timed out may have left its container
            // (and a supervisor still at work) behind: removed, not leaked.
            self.remove(&sb);
        }
        r.map(|_| sb)
    }

    fn forget(&self, name: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x.name != name);
    }

    fn start_as(
        &self,
        rt: &Runtime,
        name: &str,
        argv: &[String],
        opts: &StartOpts,
    ) -> Result<(), MeasureError> {
        let mut c = match &rt.kind {
            Kind::Ns | Kind::Vm => {
                let mut c = self.vmc();
                c.args(["run", "-d", "--name", name, "--mode"]);
                c.arg(if rt.kind == Kind::Ns { "ns" } else { "vm" });
                if opts.network_none {
                    c.args(["--network", "none"]);
                } else {
                    // The `net` scenario's server is on the host's loopback,
                    // which a sandbox reaches only when asked for.
                    c.args(["--add-host", "host.vmc.internal:host-gateway"]);
                }
                for (h, g) in &opts.ports {
                    c.arg("-p").arg(format!("127.0.0.1:{h}:{g}"));
                }
                if let Some(v) = &opts.volume {
                    c.arg("-v").arg(format!("{}:{VOLUME_AT}", v.display()));
                }
                c.arg(&self.image).args(argv);
                c
            }
            Kind::Crun => {
                let bundle = self.bundle(name, argv, opts.volume.as_deref())?;
                let mut c = self.crun();
                c.args(["run", "-d", "--bundle"]).arg(bundle).arg(name);
                c
            }
            Kind::Peer(_) | Kind::Qemu => return Err(MeasureError::ExitOnly(rt.name.clone())),
        };
        // A file, not a pipe, for errors: a detached crun container keeps
        // the stdio it was started with open.
        let errs = self.tmp.join(format!("{name}.err"));
        let file =
            std::fs::File::create(&errs).map_err(MeasureError::io("a sandbox's error file"))?;
        let status = c
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .map_err(MeasureError::io("starting a sandbox"))?;
        let msg = std::fs::read_to_string(&errs).unwrap_or_default();
        let _ = std::fs::remove_file(&errs);
        if !status.success() {
            return Err(MeasureError::NotStarted {
                runtime: rt.name.clone(),
                message: msg.trim().to_string(),
            });
        }
        Ok(())
    }

    /// A process running `argv` inside `sb`.
    pub fn exec(&self, sb: &Sandbox, argv: &[String]) -> Command {
        let mut c = match sb.kind {
            Kind::Crun => {
                let mut c = self.crun();
                c.arg("exec");
                c
            }
            _ => {
                let mut c = self.vmc();
                c.arg("exec");
                c
            }
        };
        c.arg(&sb.name).args(argv);
        c
    }

    /// Removes `sb` (killing what runs in it).
    pub fn remove(&self, sb: &Sandbox) {
        let mut c = match sb.kind {
            Kind::Crun => {
                let mut c = self.crun();
                c.args(["delete", "-f"]);
                c
            }
            _ => {
                let mut c = self.vmc();
                c.args(["rm", "-f"]);
                c
            }
        };
        let _ = c
            .arg(&sb.name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.tmp.join("bundles").join(&sb.name));
        self.forget(&sb.name);
    }

    /// Removes every sandbox still running or starting (on an interrupt,
    /// once nothing new starts): the ones starting are waited for.
    pub fn remove_live(&self) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while self.starting.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        std::thread::scope(|sc| {
            for sb in &live {
                sc.spawn(move || self.remove(sb));
            }
        });
    }

    /// The host process that owns `sb`: vmc's supervisor (the VMM in VM
    /// mode) or the container's init under crun.
    pub fn owner_pid(&self, sb: &Sandbox) -> Result<i32, MeasureError> {
        let out = match sb.kind {
            Kind::Crun => self.crun().arg("state").arg(&sb.name).output(),
            _ => self.vmc().arg("inspect").arg(&sb.name).output(),
        }
        .map_err(MeasureError::io("asking for a sandbox's state"))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|_| MeasureError::NoState(sb.name.clone()))?;
        let pid = match sb.kind {
            Kind::Crun => v["pid"].as_i64(),
            _ => v[0]["State"]["Pid"].as_i64(),
        };
        pid.map(|p| p as i32)
            .filter(|p| *p > 0)
            .ok_or_else(|| MeasureError::NoProcess(sb.name.clone()))
    }
}

/// Moves the bench process to a private mount namespace: the image root
/// it mounts for crun and peers is seen by them (its children) and goes
/// away with the process, however it ends. Call before starting threads.
pub fn private_mounts() -> Result<(), MeasureError> {
    // SAFETY: unshare with CLONE_NEWNS only changes this thread's (and its
    // future children's) mount namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(MeasureError::io("a private mount namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    vmc_spawn::sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(MeasureError::io("making mounts private"))
}

/// crun 1.8 refuses hosts whose cgroup v2 hierarchy, mounted beside v1 in
/// hybrid mode, holds a controller (hugetlb on this project's machines),
/// even with cgroups disabled. Where that is the case, and inside the
/// bench's private mount namespace ([`private_mounts`]), an empty tmpfs
/// covers `/sys/fs/cgroup/unified` so crun sees a v1 host. Returns a note
/// when it did so.
pub fn hide_hybrid_cgroup2() -> Result<Option<String>, MeasureError> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let controllers =
        std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
    if controllers.trim().is_empty() {
        return Ok(None);
    }
    vmc_spawn::sys::mount(
        Some("tmpfs"),
        "/sys/fs/cgroup/unified",
        Some("tmpfs"),
        0,
        Some("size=4k"),
    )
    .map_err(MeasureError::io("covering /sys/fs/cgroup/unified"))?;
    Ok(Some(format!(
        "crun: this host's cgroup v2 hierarchy holds controllers ({}) beside v1, which crun refuses; the bench hides it from crun, which runs without cgroups (--cgroup-manager=disabled, as vmc's ns mode without limits)",
        controllers.trim()
    )))
}

/// `pid` and every process descended from it.
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut parent = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // The field after the command (which may hold spaces) ends with ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if let Some(pp) = ppid {
                parent.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Proportional set size of `pid` in KiB (shared pages split among the
/// processes mapping them).
pub fn pss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kib(&s, "Pss:")
}

/// The PSS of `pid`'s largest mapping of at least 32 MiB, in KiB: a VMM's
/// guest memory.
pub fn guest_pss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut best: Option<(u64, u64)> = None;
    let mut size = 0;
    for line in s.lines() {
        if line.starts_with("Size:") {
            size = field_kib(line, "Size:").unwrap_or(0);
        } else if line.starts_with("Pss:") {
            let pss = field_kib(line, "Pss:").unwrap_or(0);
            if size >= 32 << 10 && best.is_none_or(|(s, _)| size > s) {
                best = Some((size, pss));
            }
        }
    }
    best.map(|(_, pss)| pss)
}

fn field_kib(s: &str, key: &str) -> Option<u64> {
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        let p = parse_peer("fc=fc-run --rootfs \"$VMC_BENCH_ROOTFS\" --").unwrap();
        assert_eq!(p.name, "fc");
        assert_eq!(
            p.kind,
            Kind::Peer("fc-run --rootfs \"$VMC_BENCH_ROOTFS\" --".into())
        );
        for bad in ["fc", "=x", "fc=", "vm=x", "a b=x"] {
            assert!(
                matches!(
                    parse_peer(bad),
                    Err(MeasureError::PeerSpec(_) | MeasureError::PeerName(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn process_tree_finds_children() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let tree = process_tree(std::process::id() as i32);
        assert!(tree.contains(&(child.id() as i32)), "{tree:?}");
        assert!(pss_kib(std::process::id() as i32).unwrap() > 0);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
