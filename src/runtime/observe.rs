//! What `vmc top` and `vmc stats` see of a running container.
//!
//! Namespace mode reads the host: the container's processes are those in
//! its PID namespace, its use comes from its cgroups (v1 or v2) and its
//! network namespace's counters. A microVM is seen from both sides: the
//! host's view of its VMM process (CPU time, resident memory) and the
//! guest's own, asked of its agent (processes, memory in use, network and
//! disk bytes), as the guest kernel is what the container lives in.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vmc_proto::{GuestMsg, GuestStats, HostMsg, ProcessInfo};

use super::agent::AgentConn;
use super::state::{Container, Status};
use super::Mode;
// A text the guest (or a container) sent, made safe to print: bounded, and
// control characters (a terminal's escape sequences) become `?`.
use crate::vmm::process::sanitize as printable;

/// What stops a look at a container.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is paused: its guest cannot answer; unpause it first")]
    Paused(String),
    #[error("container {0}: its process is not known yet, try again")]
    NotReady(String),
    #[error("container {id}: the guest agent: {source}")]
    Agent {
        id: String,
        source: super::agent::AgentError,
    },
    #[error("container {id}: the guest agent answered {answer}")]
    Unexpected { id: String, answer: String },
    #[error("ps: {0}")]
    Ps(String),
}

fn name(c: &Container) -> String {
    c.state.name.clone()
}

/// One look at a container's use.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// CPU time used so far, ns (a VM: its VMM process's).
    pub cpu_ns: u64,
    pub mem_used: u64,
    /// The memory it may use: its limit, a VM's RAM, else the host's.
    pub mem_limit: u64,
    pub net_rx: u64,
    pub net_tx: u64,
    pub blk_read: u64,
    pub blk_write: u64,
    pub pids: u64,
    /// A VM's VMM process's resident memory on the host.
    pub vmm_rss: Option<u64>,
    pub at: Option<Instant>,
}

impl Sample {
    /// CPU use between `before` and this sample, in % of one CPU.
    pub fn cpu_percent(&self, before: &Sample) -> f64 {
        match (self.at, before.at) {
            (Some(a), Some(b)) if a > b => {
                let wall = (a - b).as_nanos() as f64;
                self.cpu_ns.saturating_sub(before.cpu_ns) as f64 / wall * 100.0
            }
            _ => 0.0,
        }
    }
}

fn running(c: &mut Container) -> Result<(), ObserveError> {
    if c.refresh() != Status::Running {
        return Err(ObserveError::NotRunning(name(c)));
    }
    Ok(())
}

/// The pid of a namespace container's first process.
fn init_pid(c: &Container) -> Result<i32, ObserveError> {
    std::fs::read_to_string(c.dir.join("init.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| ObserveError::NotReady(name(c)))
}

/// The processes in the PID namespace of `init` (itself included).
fn ns_pids(init: i32) -> Vec<i32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else {
        return Vec::new();
    };
    let mut v: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|p: &i32| {
                    std::fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|l| l == ns)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// A connection to a running VM's agent, asked `msg`.
fn ask_guest(c: &Container, msg: &HostMsg) -> Result<GuestMsg, ObserveError> {
    if super::pause::is_paused(c) {
        return Err(ObserveError::Paused(name(c)));
    }
    let agent = |source| ObserveError::Agent {
        id: name(c),
        source,
    };
    let pid = c.state.pid.ok_or_else(|| ObserveError::NotReady(name(c)))? as u32;
    let mut watch = super::guest::process_watch(pid);
    let mut conn = AgentConn::connect(&c.dir.join("vsock.sock"), vmc_proto::AGENT_PORT, &mut watch)
        .map_err(agent)?;
    let answer = conn.request(msg, &mut watch).map_err(agent)?;
    conn.close();
    Ok(answer)
}

/// The host's /proc/meminfo MemTotal, bytes.
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `KEY value` lines (memory.stat, cpu.stat).
fn keyed(p: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The cgroup directory among `dirs` that has `file`.
fn with_file<'a>(dirs: &'a [PathBuf], file: &str) -> Option<&'a PathBuf> {
    dirs.iter().find(|d| d.join(file).exists())
}

/// Bytes received and sent by the network namespace of `pid` (not
/// loopback), from its /proc/PID/net/dev.
fn net_of(pid: i32) -> (u64, u64) {
    let mut rx_tx = (0, 0);
    for l in std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap_or_default()
        .lines()
        .skip(2)
    {
        let Some((dev, rest)) = l.split_once(':') else {
            continue;
        };
        if dev.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        rx_tx.0 += f.first().copied().unwrap_or(0);
        rx_tx.1 += f.get(8).copied().unwrap_or(0);
    }
    rx_tx
}

/// CPU time (ns) and resident memory (bytes) of process `pid` from /proc.
fn process_use(pid: i32) -> (u64, u64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 1..].to_string();
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            Some((f.get(11)? + f.get(12)?) * 1_000_000_000 / hz)
        })
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024;
    (cpu, rss)
}

/// A look at `c`'s use now.
pub fn sample(c: &mut Container) -> Result<Sample, ObserveError> {
    running(c)?;
    match c.state.mode {
        Mode::Ns => ns_sample(c),
        Mode::Vm => vm_sample(c),
    }
}

fn ns_sample(c: &Container) -> Result<Sample, ObserveError> {
    let init = init_pid(c)?;
    let dirs = super::cgroup::listed(&c.dir.join("cgroups"));
    let mut s = Sample {
        at: Some(Instant::now()),
        ..Default::default()
    };
    (s.net_rx, s.net_tx) = net_of(init);
    let host = host_memory();
    if let Some(d) = with_file(&dirs, "memory.current") {
        // v2: one directory for everything.
        let inactive = keyed(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
        s.mem_used = read_u64(&d.join("memory.current"))
            .unwrap_or(0)
            .saturating_sub(inactive);
        s.mem_limit = read_u64(&d.join("memory.max")).unwrap_or(host);
        s.cpu_ns = keyed(&d.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000;
        s.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
        for l in std::fs::read_to_string(d.join("io.stat"))
            .unwrap_or_default()
            .lines()
        {
            for kv in l.split_whitespace().skip(1) {
                match kv.split_once('=') {
                    Some(("rbytes", v)) => s.blk_read += v.parse().unwrap_or(0),
                    Some(("wbytes", v)) => s.blk_write += v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    } else {
        if let Some(d) = with_file(&dirs, "memory.usage_in_bytes") {
            let inactive = keyed(&d.join("memory.stat"), "total_inactive_file").unwrap_or(0);
            s.mem_used = read_u64(&d.join("memory.usage_in_bytes"))
                .unwrap_or(0)
                .saturating_sub(inactive);
            s.mem_limit = read_u64(&d.join("memory.limit_in_bytes")).unwrap_or(host);
        }
        if let Some(d) = with_file(&dirs, "cpuacct.usage") {
            s.cpu_ns = read_u64(&d.join("cpuacct.usage")).unwrap_or(0);
        }
        if let Some(d) = with_file(&dirs, "pids.current") {
            s.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
        }
        if let Some(d) = with_file(&dirs, "blkio.throttle.io_service_bytes") {
            for l in std::fs::read_to_string(d.join("blkio.throttle.io_service_bytes"))
                .unwrap_or_default()
                .lines()
            {
                let f: Vec<&str> = l.split_whitespace().collect();
                if let [_, op, v] = f[..] {
                    match op {
                        "Read" => s.blk_read += v.parse().unwrap_or(0),
                        "Write" => s.blk_write += v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
    if dirs.is_empty() {
        // No cgroups (rootless): the processes of its PID namespace.
        for p in ns_pids(init) {
            let (cpu, rss) = process_use(p);
            s.cpu_ns += cpu;
            s.mem_used += rss;
            s.pids += 1;
        }
    }
    if s.mem_limit == 0 || s.mem_limit > host {
        s.mem_limit = host;
    }
    Ok(s)
}

fn vm_sample(c: &Container) -> Result<Sample, ObserveError> {
    let g: GuestStats = match ask_guest(c, &HostMsg::Stats)? {
        GuestMsg::Stats(g) => g,
        other => {
            return Err(ObserveError::Unexpected {
                id: name(c),
                answer: format!("{other:?}"),
            })
        }
    };
    // The host's view: the VMM process (jailed; else the supervisor, which
    // then runs the VM in its own threads).
    let vmm = super::jail::Confinement::of_container(&c.dir)
        .map(|v| v.pid as i32)
        .or(c.state.pid);
    let (cpu_ns, rss) = vmm.map(process_use).unwrap_or((0, 0));
    Ok(Sample {
        cpu_ns,
        mem_used: g.mem_used,
        mem_limit: g.mem_total,
        net_rx: g.net_rx,
        net_tx: g.net_tx,
        blk_read: g.blk_read,
        blk_write: g.blk_write,
        pids: u64::from(g.pids),
        vmm_rss: Some(rss),
        at: Some(Instant::now()),
    })
}

/// `vmc top`: a table (header first) of the container's processes. In
/// namespace mode the host's `ps` with `ps_args` (default `-ef`) filtered
/// to the container's PID namespace, as Docker does; in a VM the guest's
/// processes in `ps -ef`'s columns (other ps options are refused there).
pub fn top(c: &mut Container, ps_args: &[String]) -> Result<Vec<Vec<String>>, ObserveError> {
    running(c)?;
    match c.state.mode {
        Mode::Ns => ns_top(c, ps_args),
        Mode::Vm => {
            if !ps_args.is_empty() && ps_args != ["-ef"] {
                return Err(ObserveError::Ps(format!(
                    "options {} are for namespace mode: a microVM's processes are in its guest, listed as ps -ef lists them",
                    ps_args.join(" ")
                )));
            }
            let procs: Vec<ProcessInfo> = match ask_guest(c, &HostMsg::Processes)? {
                GuestMsg::Processes(p) => p,
                other => {
                    return Err(ObserveError::Unexpected {
                        id: name(c),
                        answer: format!("{other:?}"),
                    })
                }
            };
            Ok(ps_ef(&procs, now_ms()))
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ps -ef`'s columns for a guest's processes (`now`: ms since the epoch).
pub fn ps_ef(procs: &[ProcessInfo], now: u64) -> Vec<Vec<String>> {
    let mut rows = vec![["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        .map(String::from)
        .to_vec()];
    for p in procs {
        let up = now.saturating_sub(p.started_ms).max(1);
        let secs = p.cpu_ms / 1000;
        let started = p.started_ms as i64 / 1000;
        let stime = if now / 1000 - (started as u64).min(now / 1000) < 86_400 {
            clock(started)
        } else {
            crate::image::store::rfc3339(started)[5..10].to_string()
        };
        rows.push(vec![
            if p.user.is_empty() {
                p.uid.to_string()
            } else {
                printable(&p.user)
            },
            p.pid.to_string(),
            p.ppid.to_string(),
            (p.cpu_ms * 100 / up).min(999).to_string(),
            stime,
            if p.tty.is_empty() {
                "?".into()
            } else {
                printable(&p.tty)
            },
            format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60),
            printable(&p.cmd),
        ]);
    }
    rows
}

/// HH:MM of `secs` since the epoch (UTC, as the guest keeps it).
fn clock(secs: i64) -> String {
    let t = crate::image::store::rfc3339(secs);
    t.get(11..16).unwrap_or("?").to_string()
}

fn ns_top(c: &Container, ps_args: &[String]) -> Result<Vec<Vec<String>>, ObserveError> {
    let init = init_pid(c)?;
    let pids = ns_pids(init);
    let args: Vec<String> = if ps_args.is_empty() {
        vec!["-ef".into()]
    } else {
        ps_args.to_vec()
    };
    let out = std::process::Command::new("ps")
        .args(&args)
        .output()
        .map_err(|e| ObserveError::Ps(format!("running ps: {e} (install procps)")))?;
    if !out.status.success() {
        return Err(ObserveError::Ps(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let Some(pid_col) = header.iter().position(|h| h == "PID") else {
        return Err(ObserveError::Ps(format!(
            "ps {} shows no PID column, which top needs to pick the container's processes",
            args.join(" ")
        )));
    };
    let n = header.len();
    let mut rows = vec![header];
    for l in lines {
        // The last column (the command) may hold spaces.
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(pid) = f.get(pid_col).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !pids.contains(&pid) || f.len() < n {
            continue;
        }
        // Command lines are the container's own: printed safely too.
        let mut row: Vec<String> = f[..n - 1].iter().map(|s| printable(s)).collect();
        row.push(printable(&f[n - 1..].join(" ")));
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's processes in ps -ef's columns: names or uids, cpu time as
    /// HH:MM:SS, `?` without a terminal, C as a percentage of its life.
    #[test]
    fn guest_processes_read_as_ps_ef() {
        let now = 1_700_000_000_000;
        let p = |pid, user: &str, tty: &str| ProcessInfo {
            pid,
            ppid: 1,
            uid: 1000,
            user: user.into(),
            cpu_ms: 3_723_000,
            started_ms: now - 7_446_000,
            tty: tty.into(),
            cmd: "sh -c sleep 1".into(),
        };
        let rows = ps_ef(&[p(5, "app", ""), p(6, "", "pts/0")], now);
        assert_eq!(rows[0].join(" "), "UID PID PPID C STIME TTY TIME CMD");
        assert_eq!(rows[1][0], "app");
        assert_eq!(rows[2][0], "1000");
        assert_eq!(rows[1][3], "50");
        assert_eq!(rows[1][5], "?");
        assert_eq!(rows[2][5], "pts/0");
        assert_eq!(rows[1][6], "01:02:03");
        assert_eq!(rows[1][7], "sh -c sleep 1");
        assert_eq!(rows[1][4].len(), 5, "HH:MM");
        // A hostile guest's escape sequences do not reach the terminal.
        let mut evil = p(7, "\u{1b}[2Jroot", "");
        evil.cmd = "sh\u{1b}]0;pwned\u{7}".into();
        let rows = ps_ef(&[evil], now);
        assert_eq!(rows[1][0], "?[2Jroot");
        assert_eq!(rows[1][7], "sh?]0;pwned?");
    }

    /// CPU % is CPU time over wall time between two samples.
    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time() {
        let t = Instant::now();
        let a = Sample {
            cpu_ns: 1_000_000_000,
            at: Some(t),
            ..Default::default()
        };
        let b = Sample {
            cpu_ns: 1_500_000_000,
            at: Some(t + std::time::Duration::from_secs(1)),
            ..Default::default()
        };
        assert!((b.cpu_percent(&a) - 50.0).abs() < 0.01);
        assert_eq!(a.cpu_percent(&b), 0.0);
    }
}
