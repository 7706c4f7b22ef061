//! `vmc attach` (and `vmc start -a`): this process joins a detached
//! container. Its output comes from the container's log as the supervisor
//! writes it (stdout and stderr kept apart); its stdin, when the container
//! was made with `-i`, goes into the FIFO the supervisor reads the
//! workload's stdin from; the signals vmc gets are passed to the container
//! (Docker's `--sig-proxy`, not with a terminal, where ^C is a byte the
//! container's terminal acts on); `detach_keys` (Docker's ctrl-p ctrl-q)
//! in the input detach. It ends when the container stops running, with its
//! exit code.

use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::state::{Container, LogLine, Status};

/// A container's log read as it grows, from a byte offset.
pub struct LogFollower {
    path: PathBuf,
    offset: u64,
}

impl LogFollower {
    /// From byte `from` of the log (None: its current end).
    pub fn new(path: &Path, from: Option<u64>) -> LogFollower {
        let offset = from.unwrap_or_else(|| std::fs::metadata(path).map_or(0, |m| m.len()));
        LogFollower {
            path: path.to_path_buf(),
            offset,
        }
    }

    /// The complete lines written since the last call.
    pub fn next_lines(&mut self) -> Vec<LogLine> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut r = std::io::BufReader::new(f);
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    self.offset += n as u64;
                    if let Ok(l) = serde_json::from_str(&line) {
                        out.push(l);
                    }
                }
                // A line still being written waits for the next call.
                _ => break,
            }
        }
        out
    }
}

/// Prints log lines on this process's stdout and stderr.
fn print(lines: &[LogLine]) {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    for l in lines {
        if l.stream == "stderr" {
            let _ = err.write_all(l.log.as_bytes());
        } else {
            let _ = out.write_all(l.log.as_bytes());
        }
    }
    let _ = out.flush();
}

/// How the attach ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The container stopped, with this exit code.
    Exited(i32),
    /// The detach keys were typed.
    Detached,
}

/// Docker's `--detach-keys` spelling (`ctrl-p,ctrl-q`, `ctrl-@`, single
/// characters) as bytes.
pub fn parse_detach_keys(s: &str) -> Option<Vec<u8>> {
    s.split(',')
        .map(|k| match k.strip_prefix("ctrl-") {
            Some(c) if c.len() == 1 => {
                let b = c.as_bytes()[0].to_ascii_lowercase();
                match b {
                    b'a'..=b'z' => Some(b - b'a' + 1),
                    b'@' => Some(0),
                    b'[' => Some(27),
                    b'\\' => Some(28),
                    b']' => Some(29),
                    b'^' => Some(30),
                    b'_' => Some(31),
                    _ => None,
                }
            }
            None if k.len() == 1 => Some(k.as_bytes()[0]),
            _ => None,
        })
        .collect()
}

/// Attaches to the running container `c`: see the module's text. `from`:
/// its output from that byte of the log (`vmc start -a`: where the log
/// ended before the start), else from now.
pub fn attach(
    c: &mut Container,
    stdin: bool,
    sig_proxy: bool,
    detach_keys: &[u8],
    from: Option<u64>,
) -> Result<Ended, std::io::Error> {
    let cfg = c.config();
    let tty = cfg.as_ref().is_some_and(|c| c.process.tty.is_some());
    let mut follower = LogFollower::new(&c.log_path(), from);
    let detached = Arc::new(AtomicBool::new(false));
    let stdin = stdin && cfg.as_ref().is_some_and(|c| c.stdin_open);
    if sig_proxy && !tty {
        let set = super::block_signals(&[]);
        let target = c.clone();
        std::thread::spawn(move || loop {
            let mut sig = 0;
            // SAFETY: set and sig are valid; the signals are blocked.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = target.clone().signal(sig);
            }
        });
    }
    let _raw = (stdin && tty).then(super::tty::RawMode::enter);
    if stdin {
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(c.dir.join(super::lifecycle::STDIN_FIFO))?;
        let (keys, detached) = (detach_keys.to_vec(), detached.clone());
        std::thread::spawn(move || pump(fifo, &keys, &detached));
    }
    loop {
        let running = c.refresh() == Status::Running;
        print(&follower.next_lines());
        if detached.load(Ordering::SeqCst) {
            return Ok(Ended::Detached);
        }
        if !running {
            // What the supervisor logged last, then the end.
            c.wait_supervisor_gone();
            print(&follower.next_lines());
            return Ok(Ended::Exited(c.state.exit_code.unwrap_or(0)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies this process's stdin into the container's FIFO until it ends or
/// the detach keys arrive (they are not passed on).
fn pump(mut fifo: std::fs::File, keys: &[u8], detached: &AtomicBool) {
    let mut input = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    let mut matched = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if !keys.is_empty() && b == keys[matched] {
                matched += 1;
                if matched == keys.len() {
                    let _ = fifo.write_all(&out);
                    detached.store(true, Ordering::SeqCst);
                    return;
                }
                continue;
            }
            // A partial sequence that did not complete goes through.
            out.extend_from_slice(&keys[..matched]);
            matched = 0;
            out.push(b);
        }
        if fifo.write_all(&out).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_as_dockers() {
        assert_eq!(parse_detach_keys("ctrl-p,ctrl-q"), Some(vec![16, 17]));
        assert_eq!(parse_detach_keys("ctrl-@,x"), Some(vec![0, b'x']));
        assert_eq!(parse_detach_keys("ctrl-pp"), None);
        assert_eq!(parse_detach_keys("ab"), None);
    }

    /// Lines are taken once each, a half-written one only when complete.
    #[test]
    fn the_follower_takes_new_complete_lines() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("container.log");
        let line = |s: &str| {
            format!(
                "{}\n",
                serde_json::json!({"stream": "stdout", "time": "t", "log": s})
            )
        };
        std::fs::write(&log, line("old\n")).unwrap();
        let mut f = LogFollower::new(&log, None);
        assert!(f.next_lines().is_empty());
        let mut all = line("a\n");
        let second = line("b\n");
        all.push_str(&second[..5]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(all.as_bytes())
            .unwrap();
        let got: Vec<String> = f.next_lines().into_iter().map(|l| l.log).collect();
        assert_eq!(got, ["a\n"]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(&second.as_bytes()[5..])
            .unwrap();
        let got: Vec<String> = f.next_lines().into_iter().map(|l| l.log).collect();
        assert_eq!(got, ["b\n"]);
        let mut from_start = LogFollower::new(&log, Some(0));
        assert_eq!(from_start.next_lines().len(), 3);
    }
}
