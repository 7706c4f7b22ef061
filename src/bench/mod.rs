//! `vmc bench`: container vs microVM, side by side. Measurements, never
//! assertions.
//!
//! Every scenario runs the same image and workload in each runtime
//! ([`runtimes`]: vmc's `ns` and `vm` modes, crun when installed, QEMU's
//! microvm when installed ([`qemu`], start and boot only), peers from
//! `--peer`), interleaved run by run (ns vm crun ns vm crun …) so that drift
//! of the machine hits all alike; warm-up runs are left out. The result is a
//! [`report::Report`]: JSON, markdown and SVG, comparable with an older one.
//!
//! Workloads are timed from the host: a run or exec from process start to
//! its first output and exit; work inside a sandbox between two marker lines
//! the workload prints around it (`echo S; WORK; echo E`), so the cost of
//! exec itself stays out of the cpu, syscall and disk rows. Memory is the
//! proportional set size (PSS) of every host process a sandbox owns, which
//! for a VM includes the guest memory it touched.

mod qemu;
pub mod report;
pub mod runtimes;
mod scenarios;
pub mod tiny_guest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vmm::{self, Backend, VmConfig, VmExit};
use clap::Args;
pub use report::{Report, Row, Summary};
use runtimes::{Kind, Runtime};

/// `vmc bench`'s options (the CLI takes them as they are).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios: start, boot, exec, memory, density, cpu, syscall, disk,
    /// volume, port, net, vmm (default: all; --quick leaves out boot);
    /// podman (by name only: podman's own runtimes against vmc-runtime).
    #[arg(value_name = "SCENARIO")]
    pub scenarios: Vec<String>,
    /// Measured runs per scenario, after one warm-up run (default: 5, 1 with --quick).
    #[arg(long, default_value_t = 0)]
    pub runs: usize,
    /// Small workloads and one run each: the whole benchmark in under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Image every runtime runs (default: busybox, imported from `make rootfs` if missing).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Leave crun out even when it is installed.
    #[arg(long)]
    pub no_crun: bool,
    /// Leave the QEMU microvm peer out even when QEMU is installed.
    #[arg(long)]
    pub no_qemu: bool,
    /// Another runtime as a column: COMMAND runs a workload given as its
    /// arguments, with the image's root filesystem in $VMC_BENCH_ROOTFS.
    #[arg(long, value_name = "NAME=COMMAND")]
    pub peer: Vec<String>,
    /// Guest kernel.
    #[arg(long, value_name = "PATH", env = "VMC_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Write the report as JSON to FILE (input for --compare).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the report as markdown to FILE.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write a bar chart of the report as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Show how each median changed since an earlier JSON report.
    #[arg(long, value_name = "OLD.json")]
    pub compare: Option<PathBuf>,
    /// Report from a saved JSON report instead of measuring.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
}

/// Every scenario, in report order.
pub const SCENARIOS: [&str; 12] = [
    "start", "boot", "exec", "memory", "density", "cpu", "syscall", "disk", "volume", "port",
    "net", "vmm",
];

/// Scenarios run only when named (they need other engines installed).
pub const BY_NAME: [&str; 1] = ["podman"];

/// Errors running benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown scenario '{0}' (available: start, boot, exec, memory, density, cpu, syscall, disk, volume, port, net, vmm; by name only: podman)")]
    Scenario(String),
    #[error("image '{0}' is not in the store: pass --image with one from `vmc images`, or run `make rootfs` for the default busybox")]
    NoImage(String),
    #[error("{0}")]
    Report(String),
    #[error("{0}")]
    Run(String),
    #[error(transparent)]
    Measure(#[from] runtimes::MeasureError),
    #[error(transparent)]
    Store(#[from] crate::image::StoreError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Assets(#[from] crate::assets::AssetError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Sizes of the workloads: `--quick` keeps the whole run under two minutes
/// on this project's software-virtualised machines.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub cpu_iterations: u64,
    pub syscall_bytes: u64,
    pub disk_kib: u64,
    /// The `volume` scenario's tree: this many small files.
    pub volume_files: usize,
    pub transfer_kib: u64,
    pub pings: usize,
    pub density: Vec<usize>,
    pub boot_runs: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                cpu_iterations: 200_000,
                syscall_bytes: 1000,
                disk_kib: 256,
                volume_files: 100,
                transfer_kib: 64,
                pings: 5,
                density: vec![2],
                boot_runs: 1,
            }
        } else {
            Sizes {
                cpu_iterations: 2_000_000,
                syscall_bytes: 10_000,
                disk_kib: 4096,
                volume_files: 1000,
                transfer_kib: 1024,
                pings: 50,
                density: vec![1, 8, 32],
                boot_runs: 3,
            }
        }
    }
}

/// Runs the benchmark (or loads `--from`), writes the requested files and
/// prints the markdown table, and the changes when `--compare` is given.
pub fn run(args: BenchArgs) -> Result<Report, BenchError> {
    let old = args.compare.as_deref().map(load).transpose()?;
    let report = match &args.from {
        Some(p) => load(p)?,
        None => measure(&args)?,
    };
    if let Some(p) = &args.json {
        let doc = serde_json::to_vec_pretty(&report)
            .map_err(|e| BenchError::Report(format!("encoding the report: {e}")))?;
        write_atomic(p, &doc)?;
    }
    let mut md = report.markdown();
    if let Some(old) = &old {
        if old.quick != report.quick {
            md.push_str("\nNote: one report used --quick sizes and the other did not; times of sized workloads do not compare.\n");
        }
        md.push('\n');
        md.push_str(&report.compare(old));
    }
    if let Some(p) = &args.markdown {
        write_atomic(p, md.as_bytes())?;
    }
    if let Some(p) = &args.svg {
        write_atomic(p, report.svg().as_bytes())?;
    }
    print!("{md}");
    Ok(report)
}

fn load(p: &Path) -> Result<Report, BenchError> {
    let data = std::fs::read(p).map_err(|e| {
        BenchError::Report(format!(
            "cannot read the benchmark report {}: {e}",
            p.display()
        ))
    })?;
    serde_json::from_slice(&data).map_err(|e| {
        BenchError::Report(format!(
            "{} is not a vmc bench JSON report ({e}): write one with `vmc bench --json FILE`",
            p.display()
        ))
    })
}

fn write_atomic(p: &Path, data: &[u8]) -> Result<(), BenchError> {
    crate::image::store::write_atomic(p, data)
        .map_err(|e| BenchError::Report(format!("writing {}: {e}", p.display())))
}

fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    let quick = args.quick;
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS
            .iter()
            .filter(|s| !(quick && **s == "boot"))
            .map(|s| s.to_string())
            .collect()
    } else {
        args.scenarios.clone()
    };
    if let Some(bad) = scenarios
        .iter()
        .find(|s| !SCENARIOS.contains(&s.as_str()) && !BY_NAME.contains(&s.as_str()))
    {
        return Err(BenchError::Scenario(bad.clone()));
    }
    let mut peers: Vec<Runtime> = Vec::new();
    for p in &args.peer {
        peers.push(runtimes::parse_peer(p)?);
    }
    let kernel = crate::assets::kernel(args.kernel.as_deref())?;
    let image = args.image.clone().unwrap_or_else(|| "busybox".into());
    ensure_image(&image, args.image.is_none())?;

    let mut notes = Vec::new();
    let mut rts = vec![
        Runtime {
            name: "ns".into(),
            kind: Kind::Ns,
        },
        Runtime {
            name: "vm".into(),
            kind: Kind::Vm,
        },
    ];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let want_crun = if args.no_crun {
        notes.push("crun: left out (--no-crun)".into());
        false
    } else if !crate::runtime::on_path("crun") {
        notes.push("crun: not installed (apt-get install crun adds the namespace baseline)".into());
        false
    } else if !root {
        notes.push(
            "crun: needs root here (it runs on the image's root filesystem, mounted by vmc)".into(),
        );
        false
    } else {
        true
    };
    let tmp = tempdir()?;
    let mut env = runtimes::Env::new(
        std::env::current_exe()?,
        image.clone(),
        args.kernel.clone(),
        tmp.clone(),
    );
    if want_crun || !peers.is_empty() {
        // The image root for crun and peers: mounted in a mount namespace of
        // the bench's own, so it never outlives the bench.
        let mounted = runtimes::private_mounts().and_then(|_| env.mount_rootfs().map(|_| ()));
        match mounted {
            Ok(()) if want_crun => match runtimes::hide_hybrid_cgroup2() {
                Ok(note) => {
                    notes.extend(note);
                    rts.push(Runtime {
                        name: "crun".into(),
                        kind: Kind::Crun,
                    });
                }
                Err(e) => notes.push(format!("crun: left out: {e}")),
            },
            Ok(()) => {}
            Err(e) => {
                notes.push(format!(
                    "crun and peers: left out, the image's root could not be mounted: {e}"
                ));
                peers.clear();
            }
        }
    }
    if let Some(q) = qemu_peer(args, &image, &kernel, &tmp, &mut notes) {
        env.qemu = Some(std::sync::Mutex::new(q));
        rts.push(Runtime {
            name: "qemu".into(),
            kind: Kind::Qemu,
        });
    }
    rts.extend(peers);
    let runs = if args.runs == 0 {
        if quick {
            1
        } else {
            5
        }
    } else {
        args.runs
    };
    let env = std::sync::Arc::new(env);
    interrupts_remove_sandboxes(env.clone(), tmp.clone());
    // --quick: warm-up runs for start only (two: see the start scenario).
    let warmup = usize::from(!quick);
    let mut sizes = Sizes::new(quick);
    if args.runs != 0 {
        // Cold boots are capped at 3 by default (~45 s each here); a
        // --runs given applies to them too.
        sizes.boot_runs = args.runs;
    }
    let mut b = scenarios::Bench::new(env, rts.clone(), sizes, runs, warmup);
    let result = (|| -> Result<(), BenchError> {
        for s in &scenarios {
            b.scenario(s)?;
        }
        Ok(())
    })();
    let mut out = b.finish();
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        // The interrupt thread removes the rest and exits the process.
        loop {
            std::thread::park();
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    notes.append(&mut out.notes);
    // Columns: the runtimes, then any other a scenario measured (podman's
    // engine with each of its runtimes).
    let mut columns: Vec<String> = rts.iter().map(|r| r.name.clone()).collect();
    for row in &out.rows {
        for name in row.results.keys() {
            if !columns.contains(name) {
                columns.push(name.clone());
            }
        }
    }
    Ok(Report {
        vmc_version: env!("CARGO_PKG_VERSION").into(),
        date: crate::image::store::rfc3339_now(),
        machine: machine(&kernel),
        image,
        quick,
        runs,
        warmup,
        runtimes: columns,
        workloads: out.workloads,
        durations_s: out.durations,
        rows: out.rows,
        notes,
    })
}

/// Set once an interrupt arrived: the benchmark starts nothing more and
/// leaves the exit to the thread that removes its sandboxes.
pub(crate) static INTERRUPTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Ctrl-C, SIGTERM or SIGHUP remove the sandboxes the benchmark started
/// before it exits: the signals are blocked in this (still single-threaded)
/// process, which every later thread inherits, and one thread waits for
/// them. Children start with an empty signal mask (std resets it).
fn interrupts_remove_sandboxes(env: std::sync::Arc<runtimes::Env>, tmp: PathBuf) {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, and
    // the set is initialised before it is used.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` and `sig` are valid for the call.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("\nbench: interrupted, removing its sandboxes");
            env.remove_live();
            let _ = std::fs::remove_dir_all(&tmp);
            std::process::exit(128 + sig);
        }
    });
}

/// The default image: `busybox`, imported from `make rootfs`'s tree when
/// the store lacks it.
fn ensure_image(image: &str, default: bool) -> Result<(), BenchError> {
    let store = crate::image::Store::open(&crate::runtime::vmc_home())?;
    if store.resolve(image).is_ok() {
        return Ok(());
    }
    let tree = default_rootfs();
    if !default || !tree.is_dir() {
        return Err(BenchError::NoImage(image.into()));
    }
    eprintln!("bench: importing {} as {image}", tree.display());
    let tar = tempdir()?.join("rootfs.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    let out = st.success().then(|| {
        std::process::Command::new(std::env::current_exe().ok()?)
            .arg("import")
            .arg(&tar)
            .arg(image)
            .output()
            .ok()
    });
    let _ = std::fs::remove_dir_all(tar.parent().unwrap_or(Path::new("/nonexistent")));
    match out.flatten() {
        Some(o) if o.status.success() => Ok(()),
        _ => Err(BenchError::NoImage(image.into())),
    }
}

/// The QEMU microvm peer for `image`, unless left out (a note says why).
fn qemu_peer(
    args: &BenchArgs,
    image: &str,
    kernel: &Path,
    tmp: &Path,
    notes: &mut Vec<String>,
) -> Option<qemu::Qemu> {
    if args.no_qemu {
        notes.push("qemu: left out (--no-qemu)".into());
        return None;
    }
    let Some(bin) = qemu::binary() else {
        notes.push("qemu: not installed (apt-get install qemu-system-x86 adds the VM peer)".into());
        return None;
    };
    let home = crate::runtime::vmc_home();
    let disk = (|| -> Result<PathBuf, String> {
        let store = crate::image::Store::open(&home).map_err(|e| e.to_string())?;
        let img = store.resolve(image).map_err(|e| e.to_string())?;
        crate::image::disk::root_disk(&store, &img, &home.join("cache")).map_err(|e| e.to_string())
    })();
    let disk = match disk {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!("qemu: left out, no root disk for {image}: {e}"));
            return None;
        }
    };
    let dir = tmp.join("qemu");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        notes.push(format!("qemu: left out: {}: {e}", dir.display()));
        return None;
    }
    Some(qemu::Qemu::new(bin, kernel.to_path_buf(), disk, dir))
}

/// The machine the numbers come from.
fn machine(kernel: &Path) -> report::Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    report::Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (mem_kib / 1048576.0 * 10.0).round() / 10.0,
        host_kernel: host_kernel(),
        guest_kernel: guest_kernel(kernel),
        backend: Backend::host().to_string(),
    }
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The version in the guest kernel's `Linux version X ...` banner.
fn guest_kernel(kernel: &Path) -> String {
    let data = std::fs::read(kernel).unwrap_or_default();
    let pat = b"Linux version ";
    data.windows(pat.len())
        .position(|w| w == pat)
        .and_then(|i| {
            let rest = &data[i + pat.len()..];
            let end = rest.iter().position(|b| *b == b' ' || *b == 0)?;
            std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Boots the tiny guest `runs` times (plus one warm-up) in this process:
/// start to reset, in ms.
pub fn bench_vmm(runs: usize) -> Result<Vec<f64>, BenchError> {
    let dir = tempdir()?;
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_guest::elf(b"ready\n", false))?;
    let mut samples = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        let vm = vmm::start(
            VmConfig::new(&kernel, 1, 128 << 20).with_console(Box::new(std::io::sink())),
        )?;
        let exit = vm.wait();
        let dt = t0.elapsed();
        if exit != VmExit::Reset {
            return Err(BenchError::Run(format!("tiny guest ended with {exit:?}")));
        }
        if i > 0 {
            samples.push(ms(dt));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(samples)
}

/// Where `make rootfs` puts the busybox root filesystem.
pub fn default_rootfs() -> PathBuf {
    let cache = crate::host::knobs()
        .cache
        .clone()
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vmc")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/vmc")
        });
    cache.join("busybox-rootfs")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tempdir() -> std::io::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "vmc-bench-{}",
        crate::runtime::new_id()[..12].to_owned()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_guest_is_a_pvh_elf() {
        let img = tiny_guest::elf(b"hi", true);
        assert_eq!(&img[..4], b"\x7fELF");
        let mem = crate::vmm::memory::create(64 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("vmc-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.elf");
        std::fs::write(&p, &img).unwrap();
        let k = crate::vmm::boot::load_kernel(&mem, &p).unwrap();
        assert_eq!(k.entry, tiny_guest::LOAD_ADDR);
        assert_eq!(k.mode, crate::vmm::boot::EntryMode::Pvh);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_kernel_version_comes_from_the_banner() {
        let dir = std::env::temp_dir().join(format!("vmc-banner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vmlinux");
        std::fs::write(&p, b"\x7fELF junk\0Linux version 6.1.99-vmc (x@y) #1\0").unwrap();
        assert_eq!(guest_kernel(&p), "6.1.99-vmc");
        std::fs::write(&p, b"nothing").unwrap();
        assert_eq!(guest_kernel(&p), "unknown");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
