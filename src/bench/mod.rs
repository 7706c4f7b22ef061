//! `vmc bench`: measurements, never assertions.
//!
//! * `vmm`: the tiny PVH guest ([`tiny_guest`]) booted in-process, start to
//!   reset: the VMM's own cost (Firecracker runs such a guest in ~10 ms here).
//! * `warm` and `boot`: `vmc run --rm ... -- echo ready` as a subprocess,
//!   restoring the warm-start snapshot or booting cold (`--cold`): wall time
//!   from process start to the VM running, to the workload's first output and
//!   to exit, and memory: the VMM's overhead (peak RSS minus guest memory the
//!   guest touched) and, when restored, the guest memory the VM dirtied (its
//!   private copies of the snapshot's shared pages).

pub mod tiny_guest;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::BenchArgs;
use crate::vmm::{self, Backend, VmConfig, VmExit};

/// Errors running benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown scenario '{0}' (available: vmm, warm, boot)")]
    Scenario(String),
    #[error("no root filesystem for the benchmark: pass --rootfs DIR or run `make rootfs`")]
    NoRootfs,
    #[error("{0}")]
    Run(String),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Assets(#[from] crate::assets::AssetError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Summary of one metric.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub metric: String,
    pub unit: String,
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p90: f64,
}

impl Stats {
    pub fn of(metric: &str, unit: &str, samples: &[f64]) -> Stats {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            if s.is_empty() {
                return f64::NAN;
            }
            let idx = ((s.len() - 1) as f64 * q).round() as usize;
            s[idx]
        };
        let median = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        Stats {
            metric: metric.into(),
            unit: unit.into(),
            n: s.len(),
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            p90: pick(0.9),
        }
    }
}

/// Runs the requested scenarios and prints a table (and JSON if asked).
pub fn run(args: BenchArgs) -> Result<Vec<Stats>, BenchError> {
    let scenarios = if args.scenarios.is_empty() {
        vec!["vmm".to_string(), "warm".to_string()]
    } else {
        args.scenarios.clone()
    };
    let kernel = crate::assets::kernel(args.kernel.as_deref())?;
    let mut all = Vec::new();
    for s in &scenarios {
        let stats = match s.as_str() {
            "vmm" => bench_vmm(args.runs.max(1) * 2)?,
            "warm" => bench_run(&args, &kernel, false)?,
            "boot" => bench_run(&args, &kernel, true)?,
            other => return Err(BenchError::Scenario(other.into())),
        };
        all.extend(stats);
    }
    println!(
        "backend: {} | host kernel: {} | vmc {}",
        Backend::detect(),
        host_kernel(),
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "{:<44} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "metric", "n", "median", "min", "max", "p90"
    );
    for s in &all {
        println!(
            "{:<44} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            format!("{} ({})", s.metric, s.unit),
            s.n,
            s.median,
            s.min,
            s.max,
            s.p90
        );
    }
    if let Some(p) = &args.json {
        let doc = serde_json::json!({
            "backend": Backend::detect().to_string(),
            "host_kernel": host_kernel(),
            "vmc_version": env!("CARGO_PKG_VERSION"),
            "results": all,
        });
        std::fs::write(p, serde_json::to_vec_pretty(&doc).unwrap_or_default())?;
    }
    Ok(all)
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Boots the tiny guest `runs` times (plus one warm-up) in this process.
pub fn bench_vmm(runs: usize) -> Result<Vec<Stats>, BenchError> {
    let dir = tempdir()?;
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_guest::elf(b"ready\n", false))?;
    let mut samples = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        let vm = vmm::start(VmConfig {
            vcpus: 1,
            mem_size: 128 << 20,
            kernel: kernel.clone(),
            initrd: None,
            cmdline: Vec::new(),
            disks: Vec::new(),
            vsock: None,
            rng: false,
            net: None,
            console: Some(Box::new(std::io::sink())),
            backend: Backend::detect(),
        })?;
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
    Ok(vec![Stats::of(
        "vmm: tiny PVH guest, start to reset",
        "ms",
        &samples,
    )])
}

fn bench_run(args: &BenchArgs, kernel: &Path, cold: bool) -> Result<Vec<Stats>, BenchError> {
    let rootfs = match &args.rootfs {
        Some(r) => r.clone(),
        None => Some(default_rootfs())
            .filter(|p| p.is_dir())
            .ok_or(BenchError::NoRootfs)?,
    };
    let exe = std::env::current_exe()?;
    let dir = tempdir()?;
    let name = if cold { "boot" } else { "warm" };
    let (mut running, mut first, mut exit) = (Vec::new(), Vec::new(), Vec::new());
    let (mut overhead, mut dirty) = (Vec::new(), Vec::new());
    // Run 0 warms up (and creates the snapshot if it is missing).
    for i in 0..=args.runs {
        let report = dir.join(format!("mem-{i}.json"));
        eprint!("\rbench {name}: run {i}/{} (0 is warm-up)  ", args.runs);
        let t0 = Instant::now();
        let mut cmd = Command::new(&exe);
        cmd.args(["run", "--rm"]);
        if cold {
            cmd.arg("--cold");
        }
        let mut child = cmd
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--kernel")
            .arg(kernel)
            .args(["--", "echo", "ready"])
            .env("VMC_MEM_REPORT", &report)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Run("no stdout".into()))?;
        let mut b = [0u8; 64];
        let n = out.read(&mut b)?;
        let t_first = t0.elapsed();
        let status = child.wait()?;
        let t_exit = t0.elapsed();
        if n == 0 || !status.success() {
            return Err(BenchError::Run(format!(
                "vmc run failed ({status}) in run {i}"
            )));
        }
        if i == 0 {
            continue;
        }
        first.push(ms(t_first));
        exit.push(ms(t_exit));
        if let Ok(doc) = std::fs::read(&report) {
            let v: serde_json::Value = serde_json::from_slice(&doc).unwrap_or_default();
            let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            overhead.push((num("vm_hwm_kib") - num("guest_rss_kib")) / 1024.0);
            dirty.push(num("guest_dirty_kib") / 1024.0);
            running.push(num("running_ms"));
        }
    }
    eprintln!();
    let _ = std::io::stderr().flush();
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = vec![
        Stats::of(
            &format!("{name}: vmc start to vCPUs running"),
            "ms",
            &running,
        ),
        Stats::of(
            &format!("{name}: process start to first output"),
            "ms",
            &first,
        ),
        Stats::of(&format!("{name}: process start to exit"), "ms", &exit),
        Stats::of(
            &format!("{name}: VMM overhead (peak RSS - guest RSS)"),
            "MiB",
            &overhead,
        ),
    ];
    if !cold {
        rows.push(Stats::of(
            "warm: guest memory the VM dirtied",
            "MiB",
            &dirty,
        ));
    }
    Ok(rows)
}

/// Where `make rootfs` puts the busybox root filesystem.
pub fn default_rootfs() -> PathBuf {
    let cache = std::env::var_os("VMC_CACHE")
        .map(PathBuf::from)
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
    fn stats_are_order_statistics() {
        let s = Stats::of("x", "ms", &[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.n, s.median, s.min, s.max), (5, 3.0, 1.0, 5.0));
        assert_eq!(s.p90, 5.0);
        let e = Stats::of("x", "ms", &[1.0, 2.0]);
        assert_eq!(e.median, 1.5);
        assert!(Stats::of("x", "ms", &[]).median.is_nan());
    }

    #[test]
    fn tiny_guest_is_a_pvh_elf() {
        let img = tiny_guest::elf(b"hi", true);
        assert_eq!(&img[..4], b"\x7fELF");
        let mem = crate::devices::virtio::testing::memory();
        let dir = std::env::temp_dir().join(format!("vmc-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.elf");
        std::fs::write(&p, &img).unwrap();
        let k = crate::vmm::boot::load_kernel(&mem, &p).unwrap();
        assert_eq!(k.entry, tiny_guest::LOAD_ADDR);
        assert_eq!(k.mode, crate::vmm::boot::EntryMode::Pvh);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
