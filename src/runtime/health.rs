//! Health checks (the image's HEALTHCHECK, or `--health-cmd` and friends),
//! run by the container's supervisor as Docker's daemon runs them: the
//! check's command is executed in the running container (`vmc exec`, so in
//! both modes exactly as a user's exec) every interval, with a timeout; the
//! status goes `starting` -> `healthy`, or `unhealthy` after `retries`
//! failures in a row (failures in the start period do not count). The
//! status, the failing streak and the last five results are kept in
//! `health.json` in the container's directory, for `ps` and `inspect`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::image::extras::Healthcheck;

/// `health.json`: Docker's `State.Health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Health {
    /// `starting`, `healthy` or `unhealthy`.
    pub status: String,
    pub failing_streak: u32,
    pub log: Vec<Probe>,
}

/// One check's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Probe {
    pub start: String,
    pub end: String,
    pub exit_code: i32,
    pub output: String,
}

const FILE: &str = "health.json";
/// The results kept, and the output kept of each (Docker's).
const KEEP: usize = 5;
const OUTPUT_MAX: usize = 4096;

/// The container's health, if it has a check (and it ran since its start).
pub fn read(dir: &Path) -> Option<Health> {
    serde_json::from_slice(&std::fs::read(dir.join(FILE)).ok()?).ok()
}

fn write(dir: &Path, h: &Health) {
    if let Ok(data) = serde_json::to_vec_pretty(h) {
        let _ = crate::image::store::write_atomic(&dir.join(FILE), &data);
    }
}

/// Forgets the health of a container's last run.
pub fn reset(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(FILE));
}

impl Health {
    /// Takes a probe's result: `in_start_period` failures do not count.
    pub fn record(&mut self, probe: Probe, retries: u32, in_start_period: bool) {
        if probe.exit_code == 0 {
            self.status = "healthy".into();
            self.failing_streak = 0;
        } else if !(in_start_period && self.status == "starting") {
            self.failing_streak += 1;
            if self.failing_streak >= retries {
                self.status = "unhealthy".into();
            }
        }
        self.log.push(probe);
        if self.log.len() > KEEP {
            self.log.remove(0);
        }
    }
}

/// A running health check; it stops when dropped.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts checking the container `id` (state directory `dir`) with `check`
/// (None, or disabled: no monitor).
pub fn start(id: &str, dir: &Path, check: Option<&Healthcheck>) -> Option<Monitor> {
    let check = check.filter(|c| !c.disabled())?.clone();
    let cmd = check.command()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (id, dir, stopping) = (id.to_string(), dir.to_path_buf(), stop.clone());
    write(
        &dir,
        &Health {
            status: "starting".into(),
            ..Default::default()
        },
    );
    let thread = std::thread::spawn(move || run(&id, &dir, &check, &cmd, &stopping));
    Some(Monitor {
        stop,
        thread: Some(thread),
    })
}

/// Sleeps `d` unless stopped first; false when stopped.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    !stop.load(Ordering::SeqCst)
}

fn run(id: &str, dir: &Path, check: &Healthcheck, cmd: &[String], stop: &AtomicBool) {
    let begun = Instant::now();
    let start_period = Duration::from_nanos(check.start_period);
    let mut health = read(dir).unwrap_or_default();
    loop {
        let in_start = begun.elapsed() < start_period;
        let wait = if in_start && health.status == "starting" {
            check.start_interval_ns()
        } else {
            check.interval_ns()
        };
        if !pause(Duration::from_nanos(wait), stop) {
            return;
        }
        let probe = probe(id, cmd, Duration::from_nanos(check.timeout_ns()), stop);
        let Some(probe) = probe else { return };
        health.record(
            probe,
            check.retries_or_default(),
            begun.elapsed() < start_period,
        );
        write(dir, &health);
    }
}

/// Runs the check once: `vmc exec ID CMD...` with its output kept and a
/// timeout. None when stopped meanwhile.
fn probe(id: &str, cmd: &[String], timeout: Duration, stop: &AtomicBool) -> Option<Probe> {
    let start = crate::runtime::state::now_precise();
    let exe = PathBuf::from("/proc/self/exe");
    let child = std::process::Command::new(exe)
        .arg("exec")
        .arg(id)
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Some(Probe {
                start: start.clone(),
                end: crate::runtime::state::now_precise(),
                exit_code: -1,
                output: format!("running the check: {e}"),
            })
        }
    };
    // The output, read as it comes (a full pipe would hold the check up).
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        std::thread::spawn(move || {
            // All of it is read (a check that writes more must not block on
            // a full pipe), the first OUTPUT_MAX bytes kept.
            let mut r = r;
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = OUTPUT_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            kept
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let code = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.code().unwrap_or(-1),
            Ok(None) if stop.load(Ordering::SeqCst) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(Probe {
                    start,
                    end: crate::runtime::state::now_precise(),
                    exit_code: -1,
                    output: format!("Health check exceeded timeout ({timeout:?})"),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break -1,
        }
    };
    let mut output = Vec::new();
    for r in readers {
        output.extend(r.join().unwrap_or_default());
    }
    output.truncate(OUTPUT_MAX);
    Some(Probe {
        start,
        end: crate::runtime::state::now_precise(),
        exit_code: code,
        output: String::from_utf8_lossy(&output).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(code: i32) -> Probe {
        Probe {
            exit_code: code,
            ..Default::default()
        }
    }

    /// Docker's rules: one success is healthy; `retries` failures in a row
    /// are unhealthy; failures in the start period do not count while the
    /// container is starting; five results are kept.
    #[test]
    fn health_follows_dockers_rules() {
        let mut h = Health {
            status: "starting".into(),
            ..Default::default()
        };
        h.record(probe(1), 2, true);
        h.record(probe(1), 2, true);
        assert_eq!((h.status.as_str(), h.failing_streak), ("starting", 0));
        h.record(probe(1), 2, false);
        assert_eq!((h.status.as_str(), h.failing_streak), ("starting", 1));
        h.record(probe(0), 2, false);
        assert_eq!((h.status.as_str(), h.failing_streak), ("healthy", 0));
        h.record(probe(1), 2, true);
        assert_eq!(
            h.failing_streak, 1,
            "the start period ends at the first success"
        );
        h.record(probe(2), 2, false);
        assert_eq!(h.status, "unhealthy");
        h.record(probe(0), 2, false);
        assert_eq!(h.status, "healthy");
        assert_eq!(h.log.len(), 5);
    }
}
