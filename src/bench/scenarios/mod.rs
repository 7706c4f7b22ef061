//! The scenarios of `vmc bench`, each measured in every runtime that can
//! run it, run by run in turn.
//!
//! The parts: `net` (the published-port and outbound network scenarios and
//! their TCP helpers) and `timing` (timing a host process: to its first
//! output and exit, or step by step by marker lines).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::report::{Row, Summary};
use super::runtimes::{self, Env, Kind, MeasureError, Runtime, Sandbox, StartOpts, VOLUME_AT};
use super::{BenchError, Sizes};

mod net;
mod podman;
mod timing;

use timing::{first_output_and_exit, markers};

/// How long any single step may take before the benchmark gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// A metric: name, unit, whether lower is better.
type Metric = (&'static str, &'static str, bool);

/// The metric of a run's phase `name` (`VMC_TIMINGS`): "phase: mount",
/// "phase: mount/overlay" (a step of the guest agent's). Names are interned:
/// a few dozen distinct ones per bench.
fn phase_metric(name: &str) -> Metric {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let full = format!("phase: {name}");
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let interned = match names.iter().find(|n| **n == full) {
        Some(n) => *n,
        None => {
            let n: &'static str = Box::leak(full.into_boxed_str());
            names.push(n);
            n
        }
    };
    (interned, "ms", true)
}

/// The phases a `vmc run`/`exec` wrote to its `VMC_TIMINGS` file (which
/// is removed), as metrics.
fn phases_in(path: &std::path::Path) -> Vec<(Metric, f64)> {
    let Ok(doc) = std::fs::read(path) else {
        return Vec::new();
    };
    let _ = std::fs::remove_file(path);
    let v: serde_json::Value = serde_json::from_slice(&doc).unwrap_or_default();
    v["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((phase_metric(p["name"].as_str()?), p["ms"].as_f64()?)))
        .collect()
}

const TO_OUTPUT: Metric = ("start to first output", "ms", true);
const TO_EXIT: Metric = ("start to exit", "ms", true);
const RUNNING: Metric = ("vm only: start to vCPUs running", "ms", true);
const DIRTIED: Metric = ("vm only: guest memory dirtied", "MiB", true);
const EXEC: Metric = ("exec round trip", "ms", true);
const PSS: Metric = ("host memory per idle sandbox (PSS)", "MiB", true);
const VMM_OVERHEAD: Metric = ("vm only: VMM overhead (PSS minus guest)", "MiB", true);
const GUEST_MEM: Metric = ("vm only: guest memory (PSS)", "MiB", true);
const CPU: Metric = ("arithmetic loop", "ms", true);
const SYSCALL: Metric = ("time per syscall", "µs", true);
const WRITE: Metric = ("write + fsync", "MB/s", false);
const READ: Metric = ("read back (page cache)", "MB/s", false);
const VOL_READ: Metric = ("1 MiB file read, volume", "ms", true);
const VOL_FIND: Metric = ("find over the tree, volume", "ms", true);
const OWN_READ: Metric = ("1 MiB file read, own root", "ms", true);
const OWN_FIND: Metric = ("find over the tree, own root", "ms", true);
const PORT_RTT: Metric = ("round trip, 1 byte", "ms", true);
const PORT_UP: Metric = ("host to sandbox", "MB/s", false);
const PORT_DOWN: Metric = ("sandbox to host", "MB/s", false);
const NET_UP: Metric = ("sandbox to host, outbound", "MB/s", false);
const NET_RTT: Metric = ("round trip, 1 byte, outbound connection", "ms", true);
const VMM: Metric = ("vm only: tiny PVH guest, start to reset", "ms", true);
const DENSITY_READY: Metric = ("all started", "s", true);
const DENSITY_PSS: Metric = ("PSS of all sandboxes", "MiB", true);

/// Samples of one scenario: per metric, in the order the workload first
/// reported it (the report's row order), runtime -> values.
type Samples = Vec<(Metric, BTreeMap<String, Vec<f64>>)>;

/// What a benchmark measured.
pub struct Outcome {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    pub workloads: BTreeMap<String, String>,
    pub durations: BTreeMap<String, f64>,
}

/// The running benchmark.
pub struct Bench {
    env: std::sync::Arc<Env>,
    rts: Vec<Runtime>,
    sizes: Sizes,
    runs: usize,
    warmup: usize,
    rows: Vec<Row>,
    notes: Vec<String>,
    workloads: BTreeMap<String, String>,
    /// Per runtime: a sandbox that sleeps (exec, cpu, syscall, disk).
    idle: BTreeMap<String, Sandbox>,
    /// Long-lived runtimes' sandboxes with the `volume` scenario's
    /// directory mounted.
    vol_idle: BTreeMap<String, Sandbox>,
    /// Per runtime: a networked sandbox with echo, sink and source
    /// servers behind published ports (port, net).
    service: BTreeMap<String, (Sandbox, [u16; 3])>,
    progress: bool,
    /// Seconds each scenario took.
    durations: BTreeMap<String, f64>,
}

impl Bench {
    pub fn new(
        env: std::sync::Arc<Env>,
        rts: Vec<Runtime>,
        sizes: Sizes,
        runs: usize,
        warmup: usize,
    ) -> Bench {
        Bench {
            env,
            rts,
            sizes,
            runs,
            warmup,
            rows: Vec::new(),
            notes: Vec::new(),
            workloads: BTreeMap::new(),
            idle: BTreeMap::new(),
            vol_idle: BTreeMap::new(),
            service: BTreeMap::new(),
            progress: std::io::stderr().is_terminal(),
            durations: BTreeMap::new(),
        }
    }

    /// Removes the sandboxes it kept and returns what it measured.
    pub fn finish(mut self) -> Outcome {
        let keep: Vec<Sandbox> = self
            .idle
            .values()
            .chain(self.vol_idle.values())
            .cloned()
            .chain(self.service.values().map(|(s, _)| s.clone()))
            .collect();
        std::thread::scope(|sc| {
            for sb in &keep {
                let env = &self.env;
                sc.spawn(move || env.remove(sb));
            }
        });
        self.idle.clear();
        self.vol_idle.clear();
        self.service.clear();
        Outcome {
            rows: std::mem::take(&mut self.rows),
            notes: std::mem::take(&mut self.notes),
            workloads: std::mem::take(&mut self.workloads),
            durations: std::mem::take(&mut self.durations),
        }
    }

    /// Measures one scenario and records how long it took.
    pub fn scenario(&mut self, name: &str) -> Result<(), BenchError> {
        let t0 = Instant::now();
        let r = self.scenario_inner(name);
        let secs = t0.elapsed().as_secs_f64();
        if self.progress {
            eprint!("\r\x1b[K");
        }
        eprintln!("bench: {name} took {secs:.1} s");
        self.durations
            .insert(name.into(), (secs * 10.0).round() / 10.0);
        r
    }

    fn scenario_inner(&mut self, name: &str) -> Result<(), BenchError> {
        let sz = self.sizes.clone();
        match name {
            "start" => {
                self.workload(name, "`echo ready` in a new sandbox (`vmc run --rm --network none`, `crun run`), to its first output and to its exit; vm restores the warm-start snapshot");
                let rts = self.rts.clone();
                // Always two warm-ups: the first may create the warm-start
                // snapshot, the second starts the making of the image's
                // ready snapshot (waited for before each vm run).
                let warmup = self.warmup.max(2);
                self.measure(name, &rts, warmup, self.runs, |b, rt| {
                    b.start_run(rt, false)
                })
            }
            "boot" => {
                self.workload(
                    name,
                    "as start, booting the kernel cold: vm (`--cold`) and qemu (to its shell's first output)",
                );
                let rts = self.only(&[Kind::Vm, Kind::Qemu]);
                self.measure(name, &rts, 0, self.runs.min(sz.boot_runs), |b, rt| {
                    b.start_run(rt, true)
                })
            }
            "exec" => {
                self.workload(
                    name,
                    "`true` in a running sandbox (`vmc exec`, `crun exec`)",
                );
                let rts = self.with_idle();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    let sb = &b.idle[&rt.name];
                    let mut cmd = b.env.exec(sb, &argv(&["true"]));
                    let timings = b
                        .env
                        .tmp
                        .join(format!("timings-exec-{}.json", b.env.name()));
                    if matches!(rt.kind, Kind::Vm | Kind::Ns) {
                        cmd.env("VMC_TIMINGS", &timings);
                    }
                    let t0 = Instant::now();
                    let (_, exit) = first_output_and_exit(&mut cmd, t0, false)?;
                    let mut out = vec![(EXEC, exit)];
                    out.extend(phases_in(&timings));
                    Ok(out)
                })
            }
            "memory" => {
                self.workload(name, "a new sandbox running `sleep`, 1 s after it started: PSS summed over every host process it owns (vmc's supervisor or VMM and their children; crun's container processes); for vm the guest memory mapping's share is reported apart");
                let rts = self.long_lived();
                self.measure(name, &rts, 0, self.runs, |b, rt| b.memory_run(rt))
            }
            "density" => {
                self.workload(name, &format!("N sandboxes running `sleep` started at once, N = {:?}: time until every start command returned, and the PSS of all of them", sz.density));
                let rts = self.long_lived();
                for n in sz.density.clone() {
                    let scen = format!("density N={n}");
                    self.measure(
                        &scen,
                        &rts,
                        0,
                        self.runs.min(if n > 8 { 1 } else { 3 }),
                        |b, rt| b.density_run(rt, n),
                    )?;
                }
                Ok(())
            }
            "cpu" => {
                let w = format!(
                    "awk 'BEGIN{{for(i=0;i<{};i++)s+=i*i}}' in a running sandbox (a new one for peers)",
                    sz.cpu_iterations
                );
                self.workload(name, &w);
                let script = format!("awk 'BEGIN{{for(i=0;i<{};i++)s+=i*i}}'", sz.cpu_iterations);
                let rts = self.with_idle_or_peers();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    let t = b.timed_work(rt, &[&script])?;
                    Ok(vec![(CPU, t[0])])
                })
            }
            "syscall" => {
                let n = sz.syscall_bytes;
                self.workload(
                    name,
                    &format!(
                        "dd if=/dev/zero of=/dev/null bs=1 count={n}: {} read/write syscalls",
                        2 * n
                    ),
                );
                let script = format!("dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null");
                let rts = self.with_idle_or_peers();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    let t = b.timed_work(rt, &[&script])?;
                    Ok(vec![(SYSCALL, t[0] * 1000.0 / (2 * n) as f64)])
                })
            }
            "disk" => {
                let kib = sz.disk_kib;
                self.workload(name, &format!("dd {kib} KiB of zeros to /vmc-bench.dat on the container's root with conv=fsync, then read it back with dd"));
                let w = format!(
                    "dd if=/dev/zero of=/vmc-bench.dat bs=64k count={} conv=fsync 2>/dev/null",
                    kib / 64
                );
                let r = "dd if=/vmc-bench.dat of=/dev/null bs=64k 2>/dev/null".to_string();
                let rts = self.with_idle_or_peers();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    let t = b.timed_work(rt, &[&w, &r])?;
                    let mb = (kib * 1024) as f64 / 1e6;
                    Ok(vec![
                        (WRITE, mb / (t[0] / 1000.0)),
                        (READ, mb / (t[1] / 1000.0)),
                    ])
                })
            }
            "volume" => {
                let files = sz.volume_files;
                self.workload(name, &format!("`cat` of a 1 MiB file and `find` over a tree of {files} files ({} directories), through a host directory mounted with `-v DIR:{VOLUME_AT}` (a microVM's through virtio-fs, crun's a bind mount) and in the sandbox's own root (a copy made there before the runs)", files.div_ceil(100)));
                let rts = self.with_volume(files);
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    let sb = &b.vol_idle[&rt.name];
                    let t = b.timed_in(
                        sb,
                        &[
                            &format!("cat {VOLUME_AT}/big > /dev/null"),
                            &format!("find {VOLUME_AT}/tree > /dev/null"),
                            "cat /vmc-own/big > /dev/null",
                            "find /vmc-own/tree > /dev/null",
                        ],
                    )?;
                    Ok(vec![
                        (VOL_READ, t[0]),
                        (VOL_FIND, t[1]),
                        (OWN_READ, t[2]),
                        (OWN_FIND, t[3]),
                    ])
                })
            }
            "port" => {
                self.workload(name, &format!("through published ports (`-p 127.0.0.1:H:C`) to busybox nc servers in the sandbox: {} one-byte echoes, {} KiB each way", sz.pings, sz.transfer_kib));
                let rts = self.with_service();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| b.port_run(rt))
            }
            "net" => {
                self.workload(name, &format!("outbound from the sandbox (passt in vm, pasta in ns) to a server of the benchmark on the host's 127.0.0.1, reached through the gateway address (`--add-host NAME:host-gateway`): {} KiB by nc, {} one-byte echoes over a connection the sandbox opened", sz.transfer_kib, sz.pings));
                let Some(gw) = crate::runtime::net::host_gateway() else {
                    self.notes.push("net: left out, the host has no default route (passt and pasta map the gateway to the host)".into());
                    return Ok(());
                };
                let rts = self.with_service();
                self.measure(name, &rts, self.warmup, self.runs, |b, rt| {
                    b.net_run(rt, gw)
                })
            }
            "vmm" => {
                self.workload(name, "a guest of a few dozen bytes that prints a line and resets, booted inside the bench process: the VMM's own cost");
                let samples = super::bench_vmm(self.runs.max(1) * 3)?;
                let mut m = BTreeMap::new();
                m.insert("vm".to_string(), Summary::of(&samples));
                self.rows.push(row(name, VMM, m));
                Ok(())
            }
            "podman" => self.podman(),
            other => Err(BenchError::Scenario(other.into())),
        }
    }

    fn workload(&mut self, name: &str, what: &str) {
        self.workloads.insert(name.into(), what.into());
    }

    fn only(&self, kinds: &[Kind]) -> Vec<Runtime> {
        self.rts
            .iter()
            .filter(|r| kinds.contains(&r.kind))
            .cloned()
            .collect()
    }

    fn long_lived(&self) -> Vec<Runtime> {
        self.rts
            .iter()
            .filter(|r| r.long_lived())
            .cloned()
            .collect()
    }

    /// Long-lived runtimes, each with its idle sandbox started.
    fn with_idle(&mut self) -> Vec<Runtime> {
        let mut out = Vec::new();
        for rt in self.long_lived() {
            if !self.idle.contains_key(&rt.name) {
                self.status(&format!("starting an idle sandbox in {}", rt.name));
                let opts = StartOpts {
                    network_none: true,
                    ..Default::default()
                };
                match self.env.start(&rt, &argv(&["sleep", "1000000"]), &opts) {
                    Ok(sb) => {
                        self.idle.insert(rt.name.clone(), sb);
                    }
                    Err(e) => {
                        self.note_once(format!("{}: no idle sandbox: {e}", rt.name));
                        continue;
                    }
                }
            }
            out.push(rt);
        }
        out
    }

    /// Long-lived runtimes, each with a sandbox that has the `volume`
    /// scenario's host directory (made once: a 1 MiB file and a tree of
    /// `files` small files) mounted, and a copy of it in its own
    /// root.
    fn with_volume(&mut self, files: usize) -> Vec<Runtime> {
        let dir = self.env.tmp.join("volume");
        if !dir.join("tree").is_dir() {
            if let Err(e) = volume_dir(&dir, files) {
                self.note_once(format!("volume: no host directory: {e}"));
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        for rt in self.long_lived() {
            if !self.vol_idle.contains_key(&rt.name) {
                self.status(&format!("starting a sandbox with a volume in {}", rt.name));
                let opts = StartOpts {
                    network_none: true,
                    volume: Some(dir.clone()),
                    ..Default::default()
                };
                let started = self
                    .env
                    .start(&rt, &argv(&["sleep", "1000000"]), &opts)
                    .and_then(|sb| {
                        let copy = format!(
                            "mkdir -p /vmc-own && cp -a {VOLUME_AT}/big {VOLUME_AT}/tree /vmc-own/"
                        );
                        let out = self
                            .env
                            .exec(&sb, &argv(&["sh", "-c", &copy]))
                            .output()
                            .map_err(MeasureError::io("copying into the sandbox's root"))?;
                        if !out.status.success() {
                            return Err(MeasureError::Failed {
                                status: out.status,
                                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                            });
                        }
                        Ok(sb)
                    });
                match started {
                    Ok(sb) => {
                        self.vol_idle.insert(rt.name.clone(), sb);
                    }
                    Err(e) => {
                        self.note_once(format!("{}: no sandbox with a volume: {e}", rt.name));
                        continue;
                    }
                }
            }
            out.push(rt);
        }
        out
    }

    fn with_idle_or_peers(&mut self) -> Vec<Runtime> {
        let mut out = self.with_idle();
        out.extend(
            self.rts
                .iter()
                .filter(|r| matches!(r.kind, Kind::Peer(_)))
                .cloned(),
        );
        // Keep the report's column order.
        out.sort_by_key(|r| self.rts.iter().position(|x| x.name == r.name));
        out
    }

    /// Networked runtimes, each with its service sandbox started and
    /// answering.
    fn with_service(&mut self) -> Vec<Runtime> {
        let mut out = Vec::new();
        for rt in self.rts.clone() {
            if !rt.networked() {
                if rt.long_lived() {
                    self.note_once(format!("{}: port and net left out: vmc bench gives it no port publishing or outbound network", rt.name));
                }
                continue;
            }
            if !self.service.contains_key(&rt.name) {
                self.status(&format!("starting the network sandbox in {}", rt.name));
                match self.start_service(&rt) {
                    Ok(s) => {
                        self.service.insert(rt.name.clone(), s);
                    }
                    Err(e) => {
                        self.note_once(format!("{}: no network sandbox: {e}", rt.name));
                        continue;
                    }
                }
            }
            out.push(rt);
        }
        out
    }

    fn note_once(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    fn status(&self, s: &str) {
        if self.progress {
            eprint!("\r\x1b[Kbench: {s}");
        } else {
            eprintln!("bench: {s}");
        }
        let _ = std::io::stderr().flush();
    }

    /// Runs `f` for each runtime in turn, `warmup` unrecorded rounds then
    /// `runs` recorded ones, and appends the scenario's rows. A runtime
    /// that fails is noted and left out of the rest of the scenario.
    fn measure(
        &mut self,
        scenario: &str,
        rts: &[Runtime],
        warmup: usize,
        runs: usize,
        mut f: impl FnMut(&Bench, &Runtime) -> Result<Vec<(Metric, f64)>, MeasureError>,
    ) -> Result<(), BenchError> {
        let mut samples: Samples = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        for i in 0..warmup + runs {
            for rt in rts {
                if super::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(BenchError::Run("interrupted".into()));
                }
                if failed.contains(&rt.name) {
                    continue;
                }
                let label = if i < warmup {
                    "warm-up".to_string()
                } else {
                    format!("run {}/{runs}", i - warmup + 1)
                };
                self.status(&format!("{scenario}: {} {label}", rt.name));
                match f(self, rt) {
                    Ok(vals) if i >= warmup => {
                        for (m, v) in vals {
                            let i = match samples.iter().position(|(x, _)| x.0 == m.0) {
                                Some(i) => i,
                                None => {
                                    samples.push((m, BTreeMap::new()));
                                    samples.len() - 1
                                }
                            };
                            samples[i].1.entry(rt.name.clone()).or_default().push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.notes.push(format!("{scenario}: {}: {e}", rt.name));
                        failed.push(rt.name.clone());
                    }
                }
            }
        }
        if self.progress {
            eprint!("\r\x1b[K");
        }
        for (m, per_rt) in samples {
            let results: BTreeMap<String, Summary> = per_rt
                .into_iter()
                .map(|(rt, v)| (rt, Summary::of(&v)))
                .filter(|(_, s)| s.n > 0)
                .collect();
            if !results.is_empty() {
                self.rows.push(row(scenario, m, results));
            }
        }
        Ok(())
    }

    /// One sandbox from start to exit; vm runs also report the VM's own
    /// figures (`VMC_MEM_REPORT`).
    fn start_run(&self, rt: &Runtime, cold: bool) -> Result<Vec<(Metric, f64)>, MeasureError> {
        if rt.kind == Kind::Qemu {
            let (first, exit) = self.env.qemu_start(cold, "echo ready", "ready")?;
            return Ok(vec![(TO_OUTPUT, first), (TO_EXIT, exit)]);
        }
        if rt.kind == Kind::Vm {
            // An earlier run may have started the making of the image's
            // ready snapshot: measured runs use it, and never share the CPU
            // with its maker.
            crate::runtime::snapshot::wait_for_makers(&crate::runtime::snapshots_dir());
        }
        let mut cmd = self.env.run(rt, &argv(&["echo", "ready"]), cold)?;
        let report = self.env.tmp.join(format!("mem-{}.json", self.env.name()));
        if rt.kind == Kind::Vm {
            cmd.env("VMC_MEM_REPORT", &report);
        }
        let timings = self
            .env
            .tmp
            .join(format!("timings-{}.json", self.env.name()));
        if matches!(rt.kind, Kind::Vm | Kind::Ns) {
            cmd.env("VMC_TIMINGS", &timings);
        }
        let t0 = Instant::now();
        let (first, exit) = first_output_and_exit(&mut cmd, t0, true)?;
        let mut out = vec![(TO_OUTPUT, first), (TO_EXIT, exit)];
        out.extend(phases_in(&timings));
        if let Ok(doc) = std::fs::read(&report) {
            let _ = std::fs::remove_file(&report);
            let v: serde_json::Value = serde_json::from_slice(&doc).unwrap_or_default();
            if let Some(r) = v["running_ms"].as_f64() {
                out.push((RUNNING, r));
            }
            if let (false, Some(d)) = (cold, v["guest_dirty_kib"].as_f64()) {
                out.push((DIRTIED, d / 1024.0));
            }
        }
        Ok(out)
    }

    fn memory_run(&self, rt: &Runtime) -> Result<Vec<(Metric, f64)>, MeasureError> {
        let opts = StartOpts {
            network_none: true,
            ..Default::default()
        };
        let sb = self.env.start(rt, &argv(&["sleep", "1000000"]), &opts)?;
        std::thread::sleep(Duration::from_secs(1));
        let r = (|| {
            let owner = self.env.owner_pid(&sb)?;
            let total = tree_pss_kib(&[owner]);
            let mut out = vec![(PSS, total as f64 / 1024.0)];
            if rt.kind == Kind::Vm {
                // The VMM: the owner's jailed child named `vmm` (the owner
                // itself with VMC_JAIL=0).
                let vmm_pid = runtimes::process_tree(owner)
                    .into_iter()
                    .find(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|c| c.trim() == "vmm")
                    })
                    .unwrap_or(owner);
                let guest = runtimes::guest_pss_kib(vmm_pid)
                    .ok_or(MeasureError::Missing("no guest memory mapping"))?;
                let vmm = runtimes::pss_kib(vmm_pid).ok_or(MeasureError::Missing("VMM exited"))?;
                out.push((VMM_OVERHEAD, vmm.saturating_sub(guest) as f64 / 1024.0));
                out.push((GUEST_MEM, guest as f64 / 1024.0));
            }
            Ok(out)
        })();
        self.env.remove(&sb);
        r
    }

    fn density_run(&self, rt: &Runtime, n: usize) -> Result<Vec<(Metric, f64)>, MeasureError> {
        let opts = StartOpts {
            network_none: true,
            ..Default::default()
        };
        let t0 = Instant::now();
        let started: Vec<Result<Sandbox, MeasureError>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|_| sc.spawn(|| self.env.start(rt, &argv(&["sleep", "1000000"]), &opts)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or(Err(MeasureError::Missing("a start thread panicked")))
                })
                .collect()
        });
        let ready = t0.elapsed().as_secs_f64();
        let (ok, failed): (Vec<_>, Vec<_>) = started.into_iter().partition(Result::is_ok);
        let ok: Vec<Sandbox> = ok.into_iter().flatten().collect();
        let r = if let Some(Err(first)) = failed.into_iter().next() {
            Err(MeasureError::Partial {
                started: ok.len(),
                wanted: n,
                first: Box::new(first),
            })
        } else {
            std::thread::sleep(Duration::from_secs(1));
            let owners: Result<Vec<i32>, MeasureError> =
                ok.iter().map(|sb| self.env.owner_pid(sb)).collect();
            owners.map(|o| {
                let total = tree_pss_kib(&o) as f64 / 1024.0;
                vec![(DENSITY_READY, ready), (DENSITY_PSS, total)]
            })
        };
        std::thread::scope(|sc| {
            for sb in &ok {
                sc.spawn(move || self.env.remove(sb));
            }
        });
        r
    }

    /// Runs `steps` (shell commands) in `rt`'s idle sandbox, or in a new
    /// sandbox for a peer, and returns each step's duration in ms, timed
    /// by marker lines the script prints around the steps.
    fn timed_work(&self, rt: &Runtime, steps: &[&str]) -> Result<Vec<f64>, MeasureError> {
        let mut script = String::from("echo S");
        for s in steps {
            script.push_str(&format!("; {s} || exit 97; echo E"));
        }
        script.push_str("; rm -f /vmc-bench.dat");
        let a = argv(&["sh", "-c", &script]);
        let mut cmd = match self.idle.get(&rt.name) {
            Some(sb) => self.env.exec(sb, &a),
            None => self.env.run(rt, &a, false)?,
        };
        markers(&mut cmd, steps.len())
    }

    /// [`Self::timed_work`] in sandbox `sb`.
    fn timed_in(&self, sb: &Sandbox, steps: &[&str]) -> Result<Vec<f64>, MeasureError> {
        let mut script = String::from("echo S");
        for s in steps {
            script.push_str(&format!("; {s} || exit 97; echo E"));
        }
        let mut cmd = self.env.exec(sb, &argv(&["sh", "-c", &script]));
        markers(&mut cmd, steps.len())
    }
}

fn row(scenario: &str, m: Metric, results: BTreeMap<String, Summary>) -> Row {
    Row {
        scenario: scenario.into(),
        metric: m.0.into(),
        unit: m.1.into(),
        lower_is_better: m.2,
        results,
    }
}

/// The `volume` scenario's host directory: `big` (1 MiB) and `tree`, of
/// `files` files, 100 to a directory.
fn volume_dir(dir: &std::path::Path, files: usize) -> std::io::Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("tree"))?;
    let big: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(tmp.join("big"), big)?;
    for d in 0..files.div_ceil(100) {
        let sub = tmp.join("tree").join(format!("d{d}"));
        std::fs::create_dir(&sub)?;
        for f in 0..100.min(files - d * 100) {
            std::fs::write(sub.join(format!("f{f}")), format!("{d}/{f}\n"))?;
        }
    }
    std::fs::rename(&tmp, dir)
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Sum of the PSS of the process trees under `roots`, each process once.
fn tree_pss_kib(roots: &[i32]) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    for r in roots {
        seen.extend(runtimes::process_tree(*r));
    }
    seen.into_iter().filter_map(runtimes::pss_kib).sum()
}
