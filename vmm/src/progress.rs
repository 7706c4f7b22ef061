//! Is the guest getting anywhere? Waits on a guest are bounded by its
//! progress, not by wall time: a loaded host may take minutes to run what an
//! idle one runs in seconds, while a guest that halted with nothing pending
//! will never answer however long it is given.
//!
//! The evidence is the host scheduler's account of the VMM's threads
//! (`/proc/<pid>/task/<tid>/schedstat`: nanoseconds run and nanoseconds
//! spent runnable, waiting for a CPU). A vCPU thread that runs or waits to
//! run is a guest at work; one that sleeps is a halted guest (KVM blocks the
//! thread in HLT until an interrupt). The event-loop thread counts too (a
//! guest waiting for its disk is not hung), as does any thread in
//! uninterruptible sleep (host I/O, e.g. paging in a snapshot's memory).
//!
//! A [`Watchdog`] turns samples into a verdict: hung when the threads were
//! busy less than [`BUSY_SHARE`] of the time for [`QUIET_LIMIT`], or when the
//! vCPUs used up a CPU-time budget without the awaited answer (a guest
//! spinning forever).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a guest may sit idle while something waits on it.
pub const QUIET_LIMIT: Duration = Duration::from_secs(5);
/// Below this share of wall time spent running or runnable, a sampling
/// interval counts as quiet (a halted guest's threads use ~0 %; one working
/// on a loaded host still runs or waits to run ~100 % of the time).
pub const BUSY_SHARE: f64 = 0.10;

/// One sample of a VMM's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Nanoseconds the vCPU threads ran, in all.
    pub vcpu_run_ns: u64,
    /// Nanoseconds all watched threads ran or waited to run.
    pub busy_ns: u64,
    /// A watched thread is in uninterruptible sleep (host I/O) right now.
    pub in_io: bool,
    /// Every vCPU thread is gone (the VM ended).
    pub ended: bool,
    /// Every vCPU thread sleeps (a halted guest, or a paused one).
    pub vcpus_asleep: bool,
}

/// Where to sample: the threads of one VMM, by process and thread id, or
/// through their `stat` and `schedstat` files opened by someone who sees
/// them (a jailed VMM has no /proc: the host passes it these).
#[derive(Debug, Clone)]
pub struct Threads {
    pid: u32,
    vcpus: Vec<i32>,
    others: Vec<i32>,
    files: Option<std::sync::Arc<(Vec<ThreadFiles>, Vec<ThreadFiles>)>>,
}

/// A thread's `stat` and `schedstat`, open.
#[derive(Debug)]
pub struct ThreadFiles {
    pub stat: std::fs::File,
    pub schedstat: Option<std::fs::File>,
}

impl ThreadFiles {
    /// Another handle on the same files.
    pub fn try_clone(&self) -> std::io::Result<ThreadFiles> {
        Ok(ThreadFiles {
            stat: self.stat.try_clone()?,
            schedstat: self.schedstat.as_ref().map(|f| f.try_clone()).transpose()?,
        })
    }

    /// Opens thread `tid` of process `pid`'s files.
    pub fn open(pid: u32, tid: i32) -> std::io::Result<ThreadFiles> {
        let base = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
        Ok(ThreadFiles {
            stat: std::fs::File::open(base.join("stat"))?,
            schedstat: std::fs::File::open(base.join("schedstat")).ok(),
        })
    }
}

fn read_at_start(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    // A stat line is a few hundred bytes (52 numbers and a 16-byte name).
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).ok()?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

/// (run ns, runnable-wait ns, state letter) of one thread.
type Sample = (u64, u64, char);

/// (run ns, runnable-wait ns, state letter) of one thread, or None if gone.
fn sample_thread(pid: u32, tid: i32) -> Option<Sample> {
    sample_files(&ThreadFiles::open(pid, tid).ok()?)
}

fn sample_files(f: &ThreadFiles) -> Option<Sample> {
    let stat = read_at_start(&f.stat)?;
    let sched = f.schedstat.as_ref().and_then(read_at_start);
    parse_sample(&stat, sched.as_deref())
}

fn parse_sample(stat: &str, sched: Option<&str>) -> Option<Sample> {
    if stat.is_empty() {
        return None;
    }
    // The state follows the command name, which is in parentheses and may
    // itself hold spaces or parentheses: take the text after the last ')'.
    let state = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()?;
    let (run, wait) = match sched.map(|s| {
        let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        (f.next().unwrap_or(0), f.next().unwrap_or(0))
    }) {
        Some(rw) => rw,
        None => {
            // No schedstat (CONFIG_SCHED_INFO off): utime + stime in clock
            // ticks, and a runnable thread counts as a full interval.
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            (ticks * 10_000_000, 0)
        }
    };
    Some((run, wait, state))
}

/// The children of process `pid` (of all its threads).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

impl Threads {
    /// The threads `vcpus` and `others` of process `pid`.
    pub fn new(pid: u32, vcpus: Vec<i32>, others: Vec<i32>) -> Threads {
        Threads {
            pid,
            vcpus,
            others,
            files: None,
        }
    }

    /// Threads sampled through their open files.
    pub fn from_files(vcpus: Vec<ThreadFiles>, others: Vec<ThreadFiles>) -> Threads {
        Threads {
            pid: 0,
            vcpus: Vec::new(),
            others: Vec::new(),
            files: Some(std::sync::Arc::new((vcpus, others))),
        }
    }

    /// The vCPU and other thread ids.
    pub fn ids(&self) -> (&[i32], &[i32]) {
        (&self.vcpus, &self.others)
    }

    /// The VMM threads of another process, found by name (`vcpuN`,
    /// `vmm-events`): for a VM run by a detached supervisor. A process
    /// without any (the VMM runs in a jailed child, `super::process`) is
    /// looked through: its child named `vmm`'s threads.
    pub fn of_process(pid: u32) -> Threads {
        let t = Self::named_in(pid);
        if !t.vcpus.is_empty() {
            return t;
        }
        for child in children(pid) {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == "vmm" {
                let c = Self::named_in(child);
                if !c.vcpus.is_empty() {
                    return c;
                }
            }
        }
        t
    }

    fn named_in(pid: u32) -> Threads {
        let mut t = Threads::new(pid, Vec::new(), Vec::new());
        if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in entries.flatten() {
                let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                let comm = comm.trim();
                if comm.starts_with("vcpu") {
                    t.vcpus.push(tid);
                } else if comm == "vmm-events" {
                    t.others.push(tid);
                }
            }
        }
        t
    }

    /// Every thread of process `pid` (as it has them now), all counted as
    /// the ones whose end is the end: for a process that is not a VMM.
    pub fn all_of(pid: u32) -> Threads {
        let tids = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
                    .collect()
            })
            .unwrap_or_default();
        Threads::new(pid, tids, Vec::new())
    }

    /// Samples every thread now.
    pub fn sample(&self) -> Activity {
        let mut a = Activity {
            ended: true,
            vcpus_asleep: true,
            ..Activity::default()
        };
        let samples: Vec<(bool, Option<Sample>)> = match &self.files {
            Some(f) => {
                f.0.iter()
                    .map(|t| (true, sample_files(t)))
                    .chain(f.1.iter().map(|t| (false, sample_files(t))))
                    .collect()
            }
            None => self
                .vcpus
                .iter()
                .map(|&t| (true, sample_thread(self.pid, t)))
                .chain(
                    self.others
                        .iter()
                        .map(|&t| (false, sample_thread(self.pid, t))),
                )
                .collect(),
        };
        for (is_vcpu, s) in samples {
            let Some((run, wait, state)) = s else {
                continue;
            };
            if is_vcpu {
                a.ended = false;
                a.vcpu_run_ns += run;
                a.vcpus_asleep &= state == 'S';
            }
            a.busy_ns += run + wait;
            a.in_io |= state == 'D';
        }
        a
    }
}

/// Why a guest is considered hung.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Working,
    /// The VM's vCPU threads are gone.
    Ended,
    Hung(String),
}

/// Judges a guest from successive [`Activity`] samples.
#[derive(Debug, Clone)]
pub struct Watchdog {
    quiet_limit: Duration,
    cpu_limit: Duration,
    first: Option<Activity>,
    last: Option<(Instant, Activity)>,
    last_progress: Option<Instant>,
}

impl Watchdog {
    /// A watchdog that allows `cpu_limit` of vCPU time for the awaited event.
    pub fn new(cpu_limit: Duration) -> Watchdog {
        Watchdog::with_quiet_limit(cpu_limit, QUIET_LIMIT)
    }

    pub fn with_quiet_limit(cpu_limit: Duration, quiet_limit: Duration) -> Watchdog {
        Watchdog {
            quiet_limit,
            cpu_limit,
            first: None,
            last: None,
            last_progress: None,
        }
    }

    /// The verdict on a VM now: ended once it no longer runs, else what a
    /// `sample` of its threads shows.
    pub fn judge(&mut self, running: bool, sample: impl FnOnce() -> Activity) -> Verdict {
        if !running {
            return Verdict::Ended;
        }
        self.observe(Instant::now(), sample())
    }

    /// Takes one sample taken at `now`.
    pub fn observe(&mut self, now: Instant, a: Activity) -> Verdict {
        if a.ended {
            return Verdict::Ended;
        }
        let first = *self.first.get_or_insert(a);
        let progress = self.last_progress.get_or_insert(now);
        if let Some((then, prev)) = self.last {
            let wall = now.saturating_duration_since(then).as_nanos() as f64;
            let busy = a.busy_ns.saturating_sub(prev.busy_ns) as f64;
            if a.in_io || (wall > 0.0 && busy >= BUSY_SHARE * wall) {
                *progress = now;
            }
        }
        self.last = Some((now, a));
        let used = Duration::from_nanos(a.vcpu_run_ns.saturating_sub(first.vcpu_run_ns));
        if used > self.cpu_limit {
            return Verdict::Hung(format!(
                "it ran {} s of CPU without getting there",
                used.as_secs()
            ));
        }
        let quiet = now.saturating_duration_since(*progress);
        if quiet >= self.quiet_limit {
            return Verdict::Hung(format!(
                "it has been idle for {} s, waiting for nothing",
                quiet.as_secs()
            ));
        }
        Verdict::Working
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(run_ms: u64, busy_ms: u64) -> Activity {
        Activity {
            vcpu_run_ns: run_ms * 1_000_000,
            busy_ns: busy_ms * 1_000_000,
            ..Activity::default()
        }
    }

    #[test]
    fn a_halted_guest_is_hung_after_the_quiet_limit() {
        let t0 = Instant::now();
        let mut w = Watchdog::with_quiet_limit(Duration::from_secs(100), Duration::from_secs(3));
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(w.observe(ms(0), act(800, 900)), Verdict::Working);
        // A timer now and then: 1 ms of work a second is not progress.
        assert_eq!(w.observe(ms(1000), act(801, 901)), Verdict::Working);
        assert_eq!(w.observe(ms(2000), act(802, 902)), Verdict::Working);
        assert!(
            matches!(w.observe(ms(3000), act(803, 903)), Verdict::Hung(m) if m.contains("idle for 3 s"))
        );
    }

    #[test]
    fn a_guest_starved_by_a_loaded_host_is_waited_for() {
        let t0 = Instant::now();
        let mut w = Watchdog::with_quiet_limit(Duration::from_secs(100), Duration::from_secs(3));
        // It runs 5 % of the time and waits for a CPU the rest: busy, not hung.
        for s in 0..60u64 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(
                w.observe(now, act(s * 50, s * 1000)),
                Verdict::Working,
                "second {s}"
            );
        }
    }

    #[test]
    fn host_io_counts_as_progress() {
        let t0 = Instant::now();
        let mut w = Watchdog::with_quiet_limit(Duration::from_secs(100), Duration::from_secs(2));
        for s in 0..10u64 {
            let a = Activity {
                in_io: true,
                ..act(10, 10)
            };
            assert_eq!(w.observe(t0 + Duration::from_secs(s), a), Verdict::Working);
        }
    }

    #[test]
    fn a_spinning_guest_is_hung_when_its_cpu_budget_is_spent() {
        let t0 = Instant::now();
        let mut w = Watchdog::with_quiet_limit(Duration::from_secs(10), Duration::from_secs(3));
        let mut last = Verdict::Working;
        for s in 0..20u64 {
            last = w.observe(t0 + Duration::from_secs(s), act(5000 + s * 1000, s * 1000));
            if last != Verdict::Working {
                assert!(s > 10, "only after 10 s of CPU");
                break;
            }
        }
        assert!(matches!(last, Verdict::Hung(m) if m.contains("ran 11 s of CPU")));
    }

    #[test]
    fn a_vm_without_vcpu_threads_has_ended() {
        let mut w = Watchdog::new(Duration::from_secs(1));
        let a = Activity {
            ended: true,
            ..Activity::default()
        };
        assert_eq!(w.observe(Instant::now(), a), Verdict::Ended);
    }

    #[test]
    fn this_processes_threads_can_be_sampled() {
        // A thread that spins is busy; the sample sees its run time grow.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let tid = rx.recv().unwrap();
        let t = Threads::new(std::process::id(), vec![tid], Vec::new());
        assert!(Threads::all_of(std::process::id()).vcpus.contains(&tid));
        let a = t.sample();
        std::thread::sleep(Duration::from_millis(200));
        let b = t.sample();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap();
        assert!(!a.ended);
        assert!(b.busy_ns > a.busy_ns + 50_000_000, "{a:?} -> {b:?}");
        assert!(t.sample().ended, "the thread is gone");
    }
}
