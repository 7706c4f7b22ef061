//! Opt-in stress tests (`make stress`, or `cargo test --test stress --
//! --ignored`): what a loaded host does to warm starts. They take an hour or
//! more on a 2-core machine, so `make test` lists them as ignored.
//!
//! * `snapshots_made_under_load_all_restore`: warm-start snapshots made one
//!   after another while two threads spin and four other VMs idle; each must
//!   pass its trial restore the first time and restore again into a guest
//!   that mounts a root and runs a process. `VMC_STRESS_SNAPSHOTS` (default
//!   50) sets how many.
//! * `warm_runs_never_hang`: `vmc run --rm` from one snapshot, sequentially
//!   (`VMC_STRESS_RUNS`, default 200) and then at once (`VMC_STRESS_PARALLEL`,
//!   default 20), under the same load; none may hang, be retried, or leave
//!   a process or a mount behind.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{kernel, rootfs, TestVm};
use vmc::runtime::microvm::{MicroVm, Start};
use vmc::runtime::{ContainerConfig, ProcessSpec, Resources};
use vmc_proto::{GuestMsg, HostMsg};

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two spinning threads and four idle VMs, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    spinners: Vec<std::thread::JoinHandle<()>>,
    _vms: Vec<TestVm>,
}

impl Load {
    fn start() -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let spinners = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let vms = (0..4).map(|_| TestVm::boot(1, 256)).collect();
        Load {
            stop,
            spinners,
            _vms: vms,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.spinners.drain(..) {
            let _ = h.join();
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// Entries of `root` whose name starts with `.quarantine-`.
fn quarantined(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".quarantine-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "stress test (an hour or more): make stress"]
fn snapshots_made_under_load_all_restore() {
    let n = count("VMC_STRESS_SNAPSHOTS", 50);
    let _load = Load::start();
    let mut bad = Vec::new();
    for i in 0..n {
        let root = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = ContainerConfig {
            netns: None,
            id: vmc::runtime::new_id(),
            rootfs: vmc::runtime::Rootfs::Dir(rootfs()),
            image_id: None,
            process: ProcessSpec::default(),
            hostname: "stress".into(),
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
            engine: vmc::runtime::EngineConfig::Vm(vmc::runtime::VmEngineConfig {
                upper_in_memory: false,
                parked: false,
                resources: Resources {
                    cpus: 1,
                    memory: 256 << 20,
                },
                kernel: kernel(),
                debug: false,
                cold: false,
                snapshots: root.path().to_path_buf(),
            }),
        };
        let t0 = Instant::now();
        // Makes the snapshot (boot, idle, save, trial restore), then
        // restores it for this run.
        let spec_root = |m: &MicroVm| m.root_spec("stress", Vec::new(), false);
        let (vm, conn) = MicroVm::start_ready(&cfg, dir.path(), Start::Warm, &spec_root, &|| false)
            .expect("a warm start");
        conn.close();
        let restored = vm.restored();
        let spec = ProcessSpec {
            args: vec!["sh".into(), "-c".into(), "sleep 0.05; echo ok".into()],
            cwd: "/".into(),
            ..Default::default()
        };
        let mut c = vm.connect().unwrap();
        assert!(matches!(
            vm.request(&mut c, &HostMsg::Start(spec)).unwrap(),
            GuestMsg::Started { .. }
        ));
        let mut out = Vec::new();
        loop {
            match c.recv().unwrap() {
                GuestMsg::Stdout(d) => out.extend(d),
                GuestMsg::Exited(_) => break,
                _ => {}
            }
        }
        vm.stop();
        let q = quarantined(root.path());
        eprintln!(
            "snapshot {}/{n}: {:.0} s, load {}, restored {restored}, output {:?}, set aside {q:?}",
            i + 1,
            t0.elapsed().as_secs_f64(),
            load_average(),
            String::from_utf8_lossy(&out).trim()
        );
        if !q.is_empty() || !restored || out != b"ok\n" {
            bad.push(i + 1);
            // Keep what there is to look at.
            let keep = std::env::temp_dir().join(format!("vmc-stress-bad-{}", i + 1));
            let _ = std::fs::rename(root.path(), &keep);
        }
    }
    assert!(bad.is_empty(), "bad snapshots: {bad:?} of {n}");
}

/// Processes started with `marker` (a test's store) in their environment,
/// and mounts that name it.
fn leftovers(marker: &str) -> (usize, usize) {
    let want = format!("VMC_HOME={marker}");
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .count();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(marker))
        .count();
    (procs, mounts)
}

#[test]
#[ignore = "stress test (an hour or more): make stress"]
fn warm_runs_never_hang() {
    let sequential = count("VMC_STRESS_RUNS", 200);
    let parallel = count("VMC_STRESS_PARALLEL", 20);
    let home = tempfile::tempdir().unwrap();
    let marker = home.path().to_string_lossy().into_owned();
    let root = rootfs();
    let run = || {
        let t0 = Instant::now();
        let o = common::vmc_command(home.path())
            .args(["run", "--rm", "--rootfs"])
            .arg(&root)
            .args(["--", "echo", "ok"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (o, t0.elapsed().as_secs_f64())
    };
    // The snapshot first (made once), then the load.
    let (first, _) = run();
    assert_eq!(String::from_utf8_lossy(&first.stdout), "ok\n", "{first:?}");
    let _load = Load::start();
    let mut times = Vec::new();
    let check = |o: &std::process::Output| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "a run failed: {err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{err}");
        assert!(!err.contains("did not answer"), "a hang was retried: {err}");
    };
    for i in 0..sequential {
        let (o, t) = run();
        check(&o);
        times.push(t);
        if (i + 1) % 20 == 0 {
            eprintln!("{} sequential runs, load {}", i + 1, load_average());
        }
    }
    let t0 = Instant::now();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..parallel).map(|_| s.spawn(run)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (o, _) in &outs {
        check(o);
    }
    let all_at_once = t0.elapsed().as_secs_f64();
    times.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "{sequential} sequential warm runs: median {:.1} s, max {:.1} s; {parallel} at once: {all_at_once:.0} s in all; 0 hangs",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert_eq!(
        leftovers(&marker),
        (0, 0),
        "no process or mount left behind"
    );
    assert!(
        std::fs::read_dir(home.path().join("containers"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "every --rm container removed"
    );
}
