//! What `vmc top` and `vmc stats` see of the guest: its processes and its
//! use of memory, network and disks, read from the guest kernel's /proc.
//! The container's processes are every process but this agent (PID 1) and
//! the kernel's own threads.

use std::collections::HashMap;
use std::fs;

use vmc_proto::{GuestStats, ProcessInfo, MAX_CMDLINE, MAX_PROCESSES};

/// `PF_KTHREAD` in the flags of /proc/PID/stat (field 9).
const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of /proc/PID/stat after the command name (which may hold
/// spaces and parentheses): field 3 (state) first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn pids() -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Whether `pid`, with its stat `fields`, is the container's.
fn is_container(pid: u32, fields: &[String]) -> bool {
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    pid != 1 && flags & PF_KTHREAD == 0
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The guest's boot time in ms since the epoch (now less the uptime).
fn boot_ms() -> u64 {
    let up: f64 = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_sub((up * 1000.0) as u64)
}

/// User names by uid from the container root's /etc/passwd.
fn users(root: &str) -> HashMap<u32, String> {
    // Read by the agent, which is root of the guest: a symlink in the
    // container's /etc leads only within the guest, and the text is
    // bounded.
    let text = fs::read(format!("{root}/etc/passwd"))
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(1 << 20)]).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

fn uid_of(pid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn cmdline(pid: u32, comm: &str) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd: String = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.is_empty() {
        cmd = format!("[{comm}]");
    }
    if cmd.len() > MAX_CMDLINE {
        let mut end = MAX_CMDLINE;
        while !cmd.is_char_boundary(end) {
            end -= 1;
        }
        cmd.truncate(end);
    }
    cmd
}

/// The terminal of a `tty_nr` (pts only: the guest has no other).
fn tty_name(nr: u64) -> String {
    let major = (nr >> 8) & 0xfff;
    let minor = (nr & 0xff) | ((nr >> 12) & 0xfff00);
    if (136..=143).contains(&major) {
        format!("pts/{}", (major - 136) * 256 + minor)
    } else {
        String::new()
    }
}

/// The container's processes (`root`: the container's root, for names).
pub fn processes(root: &str) -> Vec<ProcessInfo> {
    let hz = ticks_per_sec();
    let boot = boot_ms();
    let names = users(root);
    let mut out = Vec::new();
    for pid in pids() {
        let Some(f) = stat_fields(pid) else { continue };
        if !is_container(pid, &f) {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // After the name: state(0) ppid(1) ... tty_nr(4) ... utime(11)
        // stime(12) ... starttime(19).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let uid = uid_of(pid);
        out.push(ProcessInfo {
            pid,
            ppid: num(1) as u32,
            uid,
            user: names.get(&uid).cloned().unwrap_or_default(),
            cpu_ms: (num(11) + num(12)) * 1000 / hz,
            started_ms: boot + num(19) * 1000 / hz,
            tty: tty_name(num(4)),
            cmd: cmdline(pid, comm.trim()),
        });
        if out.len() == MAX_PROCESSES {
            break;
        }
    }
    out
}

/// The guest's use: memory from /proc/meminfo, network from /proc/net/dev
/// (all but loopback), disks from /proc/diskstats (whole virtio disks).
pub fn stats() -> GuestStats {
    let mut s = GuestStats::default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    s.mem_total = kib("MemTotal:");
    s.mem_used = s.mem_total.saturating_sub(kib("MemAvailable:"));
    for l in fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
    {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        s.net_rx += f.first().copied().unwrap_or(0);
        s.net_tx += f.get(8).copied().unwrap_or(0);
    }
    for l in fs::read_to_string("/proc/diskstats")
        .unwrap_or_default()
        .lines()
    {
        let f: Vec<&str> = l.split_whitespace().collect();
        // major minor name reads merged sectors_read ms writes merged
        // sectors_written ...
        let whole_virtio = f
            .get(2)
            .is_some_and(|n| n.starts_with("vd") && n[2..].chars().all(|c| c.is_ascii_lowercase()));
        if !whole_virtio {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.blk_read += num(5) * 512;
        s.blk_write += num(9) * 512;
    }
    s.pids = pids()
        .into_iter()
        .filter(|&p| stat_fields(p).is_some_and(|f| is_container(p, &f)))
        .count() as u32;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pts terminals are named as ps names them; others are none.
    #[test]
    fn terminals_are_named_as_ps_names_them() {
        assert_eq!(tty_name((136 << 8) | 3), "pts/3");
        assert_eq!(tty_name((137 << 8) | 1), "pts/257");
        assert_eq!(tty_name(0), "");
        assert_eq!(tty_name((4 << 8) | 1), "");
    }

    /// This test process is listed (it is not PID 1 nor a kernel thread),
    /// with its command line; the kernel's threads are not.
    #[test]
    fn processes_list_user_processes_only() {
        let me = std::process::id();
        let list = processes("/");
        let mine = list.iter().find(|p| p.pid == me).expect("this process");
        assert!(!mine.cmd.is_empty() && mine.cmd.len() <= MAX_CMDLINE);
        assert!(list.iter().all(|p| p.pid != 2), "kthreadd is listed");
        assert!(list.len() <= MAX_PROCESSES);
        let s = stats();
        assert!(s.mem_total > 0 && s.mem_used <= s.mem_total);
        assert!(s.pids >= 1);
    }
}
