//! Container state on disk, daemonless: each container is a directory
//! `$VMC_HOME/containers/<id>/` with its `config.json` (what to run),
//! `state.json` (what happened) and `container.log`. A detached container's
//! supervisor (the VMM in VM mode) records its pid with the pid's start
//! time, so a supervisor that died without a word (kill -9, a crash) is
//! recognised as dead, never trusted as running.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{vmc_home, ContainerConfig};

/// What a container is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    /// Ended, and waiting its restart policy's backoff before running again
    /// (its supervisor lives).
    Restarting,
    Exited,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub name: String,
    /// The image as the user named it (or the rootfs directory).
    pub image: String,
    pub command: Vec<String>,
    pub mode: super::Mode,
    /// Seconds since the epoch.
    pub created: u64,
    pub status: Status,
    /// The supervisor process and its start time (clock ticks since boot).
    pub pid: Option<i32>,
    pub pid_start: Option<u64>,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub exit_code: Option<i32>,
    /// Signal `vmc stop` sends first (the image's STOPSIGNAL, else SIGTERM).
    pub stop_signal: String,
    /// `--rm`: the supervisor removes the container when it exits.
    pub auto_remove: bool,
    /// `--label`s (`ps --filter label=...`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Restarts by the restart policy since the last `vmc start`.
    #[serde(default)]
    pub restart_count: u32,
    /// The backoff before the pending (or the last) restart, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_delay_ms: Option<u64>,
}

/// Errors finding containers.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no such container: {0}")]
    NotFound(String),
    #[error(
        "container name or id prefix '{0}' matches more than one container; give more of the id"
    )]
    Ambiguous(String),
    #[error("the name '{0}' is already in use by container {1}: remove it (vmc rm {0}) or choose another name")]
    NameInUse(String, String),
    #[error("container state {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is running: stop it first (vmc stop {0}) or use vmc rm -f")]
    StillRunning(String),
    #[error("container {id} is {from:?}: it cannot become {to:?}")]
    Transition {
        id: String,
        from: Status,
        to: Status,
    },
}

impl Status {
    /// The lifecycle: created -> running -> exited, or created -> exited
    /// (a workload that could not start); a restart policy's running ->
    /// restarting -> running (or -> exited, when stopped in its backoff).
    /// `exited` is left only by `vmc start` ([`Container::reset_for_start`]).
    pub fn can_become(self, to: Status) -> bool {
        matches!(
            (self, to),
            (Status::Created, Status::Running)
                | (Status::Created, Status::Exited)
                | (Status::Running, Status::Exited)
                | (Status::Running, Status::Restarting)
                | (Status::Restarting, Status::Running)
                | (Status::Restarting, Status::Exited)
        )
    }

    /// Whether a supervisor holds the container (it runs, or waits to).
    pub fn is_live(self) -> bool {
        matches!(self, Status::Running | Status::Restarting)
    }
}

fn io_at(p: &Path) -> impl Fn(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: p.display().to_string(),
        source,
    }
}

/// The directory holding every container.
pub fn containers_dir() -> PathBuf {
    vmc_home().join("containers")
}

/// A container found on disk.
#[derive(Debug, Clone)]
pub struct Container {
    pub dir: PathBuf,
    pub state: State,
}

impl Container {
    pub fn load(dir: &Path) -> Option<Container> {
        let data = fs::read(dir.join("state.json")).ok()?;
        let mut state: State = serde_json::from_slice(&data).ok()?;
        // `vmc rename` writes the name apart: the supervisor rewrites
        // state.json with the name it started with.
        if let Ok(n) = fs::read_to_string(dir.join(NAME_FILE)) {
            let n = n.trim();
            if !n.is_empty() {
                state.name = n.to_string();
            }
        }
        Some(Container {
            dir: dir.to_path_buf(),
            state,
        })
    }

    /// Writes `state.json` atomically.
    pub fn save(&self) -> Result<(), StateError> {
        let p = self.dir.join("state.json");
        let data = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        crate::image::store::write_atomic(&p, &data).map_err(io_at(&p))
    }

    pub fn config(&self) -> Option<ContainerConfig> {
        let data = fs::read(self.dir.join("config.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Whether the supervisor recorded in the state is still that process.
    pub fn supervisor_alive(&self) -> bool {
        match (self.state.pid, self.state.pid_start) {
            (Some(pid), Some(start)) => process_start(pid) == Some(start),
            _ => false,
        }
    }

    /// The status as it really is: a `running` state whose supervisor is
    /// gone is an exit nobody recorded (reported as killed, 137).
    pub fn refresh(&mut self) -> Status {
        // Always from disk: the supervisor may have recorded the exit since.
        if let Some(fresh) = Container::load(&self.dir) {
            self.state = fresh.state;
        }
        // Running, or created by a supervisor still making it (or waiting
        // for `vmc start`): a supervisor that is gone is an exit.
        let supervised = |s: &State| {
            matches!(
                s.status,
                Status::Running | Status::Restarting | Status::Created
            ) && s.pid.is_some()
        };
        if supervised(&self.state) && !self.supervisor_alive() {
            // A supervisor writes its state before it exits: read once more.
            if let Some(fresh) = Container::load(&self.dir) {
                self.state = fresh.state;
            }
        }
        if supervised(&self.state) && !self.supervisor_alive() {
            self.state.status = Status::Exited;
            self.state.exit_code.get_or_insert(137);
            self.state.finished.get_or_insert_with(now_secs);
            let _ = self.save();
        }
        self.state.status
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("container.log")
    }

    /// Whether the workload has been started by the supervisor recorded
    /// now (see [`mark_started`]).
    pub fn started(&self) -> bool {
        self.state.pid.is_some() && started_by(&self.dir) == self.state.pid
    }

    fn refused(&self, to: Status) -> StateError {
        StateError::Transition {
            id: self.state.id.chars().take(12).collect(),
            from: self.state.status,
            to,
        }
    }

    fn become_(&mut self, to: Status) -> Result<(), StateError> {
        if !self.state.status.can_become(to) {
            return Err(self.refused(to));
        }
        self.state.status = to;
        Ok(())
    }

    /// Records this process, with its start time, as the supervisor.
    fn record_supervisor(&mut self) {
        let pid = std::process::id() as i32;
        self.state.pid = Some(pid);
        self.state.pid_start = process_start(pid);
    }

    /// Records that this process supervises the created container (which
    /// it is making, or which waits for `vmc start`): `rm -f` and `kill`
    /// reach it, and its death is an exit.
    pub fn mark_supervised(&mut self) -> Result<(), StateError> {
        if self.state.status != Status::Created {
            return Err(self.refused(Status::Created));
        }
        self.record_supervisor();
        self.save()
    }

    /// Records that this process supervises the restarting container (the
    /// next run of its restart policy).
    pub fn mark_supervising_restart(&mut self) -> Result<(), StateError> {
        if self.state.status != Status::Restarting {
            return Err(self.refused(Status::Running));
        }
        self.record_supervisor();
        self.save()
    }

    /// Records that this process (the supervisor) runs the container, now.
    pub fn mark_running(&mut self) -> Result<(), StateError> {
        self.become_(Status::Running)?;
        self.record_supervisor();
        self.state.started = Some(now_secs());
        self.save()
    }

    /// Records that the container ended with `code`, now.
    pub fn mark_exited(&mut self, code: i32) -> Result<(), StateError> {
        self.become_(Status::Exited)?;
        self.state.exit_code = Some(code);
        self.state.finished = Some(now_secs());
        self.save()
    }

    /// Records that the workload ended with `code` and runs again after
    /// `delay` (its restart policy's backoff): one more restart.
    pub fn mark_restarting(
        &mut self,
        code: i32,
        delay: std::time::Duration,
    ) -> Result<(), StateError> {
        self.become_(Status::Restarting)?;
        self.state.exit_code = Some(code);
        self.state.finished = Some(now_secs());
        self.state.restart_count += 1;
        self.state.restart_delay_ms = Some(delay.as_millis() as u64);
        self.save()
    }

    /// `vmc start` of an exited container: it becomes `created` again (its
    /// writable layer kept), with a new supervisor to come; the restart
    /// count and a stop by the user are forgotten, as in Docker.
    pub fn reset_for_start(&mut self) -> Result<(), StateError> {
        if self.state.status != Status::Exited {
            return Err(self.refused(Status::Created));
        }
        self.state.status = Status::Created;
        self.state.pid = None;
        self.state.pid_start = None;
        self.state.exit_code = None;
        self.state.restart_count = 0;
        self.state.restart_delay_ms = None;
        let _ = fs::remove_file(self.dir.join(STOPPED_BY_USER));
        self.save()
    }

    /// Sends `sig` to the supervisor of a running container (or of a
    /// created one whose supervisor lives); false if there was none.
    pub fn signal(&mut self, sig: i32) -> bool {
        let status = self.refresh();
        let created_alive = status == Status::Created && self.supervisor_alive();
        if !status.is_live() && !created_alive {
            return false;
        }
        if let Some(pid) = self.state.pid {
            // SAFETY: kill with a pid verified by its start time (refresh).
            unsafe { libc::kill(pid, sig) };
        }
        true
    }

    /// Waits up to `timeout` for the container to stop running (the grace
    /// period a user gave; a restart's backoff counts as running), and then
    /// for its supervisor to be gone: the
    /// supervisor records the exit before it ends, and its published ports
    /// are free only once it has, which is what a user of `docker stop` or
    /// `docker wait` relies on.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> bool {
        let now = std::time::Instant::now;
        let end = now() + timeout;
        while now() < end {
            if !self.refresh().is_live() {
                self.wait_supervisor_gone();
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// `vmc wait`: waits up to `timeout` for the workload's next exit (a
    /// restart policy's restart counts, as in Docker); true once it ended.
    pub fn wait_next_exit(&mut self, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            match self.refresh() {
                Status::Running => {}
                Status::Restarting => return true,
                _ => return self.wait_exit(timeout),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// Waits for the supervisor process to be gone, for as long as it makes
    /// progress (`vmm::progress`): a VMM tearing down its guest's memory
    /// takes a while on a loaded host, under software virtualisation and
    /// with many at once; one that sits idle for the quiet limit is left.
    pub fn wait_supervisor_gone(&self) {
        let Some(pid) = self.state.pid else {
            return;
        };
        wait_gone(pid as u32, || self.supervisor_alive());
    }

    /// SIGKILL to a running container's supervisor, then waits for it to be
    /// gone, so that its ports and files are free when this returns.
    pub fn kill_now(&mut self) {
        // The VM's jailed VMM process goes with its supervisor (it would
        // stop at its control socket's end, but not before this returns).
        let vmm = super::jail::Confinement::of_container(&self.dir);
        if self.signal(libc::SIGKILL) {
            if let Some(v) = vmm {
                v.kill_and_wait();
            }
            self.wait_supervisor_gone();
            self.refresh();
        }
    }
}

/// Waits while `alive` says process `pid` is still there, for as long as
/// its threads make progress (`vmm::progress`): one that sits idle for the
/// quiet limit is left.
pub fn wait_gone(pid: u32, alive: impl Fn() -> bool) {
    use crate::vmm::progress::{Threads, Verdict, Watchdog};
    let threads = Threads::all_of(pid);
    let mut dog = Watchdog::new(std::time::Duration::from_secs(120));
    while alive() {
        if dog.observe(std::time::Instant::now(), threads.sample()) != Verdict::Working {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

const STARTED: &str = "started";

/// Records in a container's state directory that its workload runs, started
/// by this process (its supervisor): what `vmc run -d` and `vmc start` wait
/// for before they return, as Docker's do.
pub fn mark_started(dir: &Path) {
    let _ = fs::write(dir.join(STARTED), std::process::id().to_string());
}

/// Whether a workload of the container in `dir` has ever started (its
/// writable layer may differ from the image since).
pub fn was_started(dir: &Path) -> bool {
    dir.join(STARTED).exists()
}

/// The supervisor that started the container's workload last.
fn started_by(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join(STARTED))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The mark `vmc stop` and `vmc kill` leave: the restart policy is not to
/// run the container again (until `vmc start`).
const STOPPED_BY_USER: &str = "stopped-by-user";

/// Records that the user is stopping the container (before the signal).
pub fn mark_stopped_by_user(dir: &Path) {
    let _ = fs::write(dir.join(STOPPED_BY_USER), b"");
}

/// Whether the user stopped the container since its last start.
pub fn stopped_by_user(dir: &Path) -> bool {
    dir.join(STOPPED_BY_USER).exists()
}

/// The start time of `pid` (field 22 of /proc/PID/stat), if it exists and
/// is not a zombie (a killed supervisor nobody has reaped yet is dead).
/// A process whose main thread has exited while other threads are still
/// ending is not dead yet: it still holds its descriptors (a published
/// port's listening socket, say) until the last thread is gone, and /proc
/// shows its main thread as a zombie all the while.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    match fields.next() {
        None | Some("X") => return None,
        Some("Z") if threads(pid) <= 1 => return None,
        _ => {}
    }
    fields.nth(18)?.parse().ok()
}

/// How many threads process `pid` has (its /proc task entries).
fn threads(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Every container with a readable state, newest first.
pub fn list() -> Vec<Container> {
    let mut out: Vec<Container> = fs::read_dir(containers_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| Container::load(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    // Newest first; within one second, by when its config was written
    // (once, at creation), so that `ps -l` is the last one made.
    let made = |c: &Container| {
        fs::metadata(c.dir.join("config.json"))
            .and_then(|m| m.modified())
            .ok()
    };
    out.sort_by_cached_key(|c| std::cmp::Reverse((c.state.created, made(c))));
    out
}

/// Finds a container by exact name, exact id, or unique id prefix, as Docker does.
pub fn resolve(what: &str) -> Result<Container, StateError> {
    let all = list();
    if let Some(c) = all
        .iter()
        .find(|c| c.state.name == what || c.state.id == what)
    {
        return Ok(c.clone());
    }
    let hits: Vec<&Container> = all
        .iter()
        .filter(|c| c.state.id.starts_with(what))
        .collect();
    match hits.as_slice() {
        [one] if !what.is_empty() => Ok((*one).clone()),
        [] | [_] => Err(StateError::NotFound(what.to_string())),
        _ => Err(StateError::Ambiguous(what.to_string())),
    }
}

/// The file a renamed container's name is kept in (it wins over
/// state.json's).
const NAME_FILE: &str = "name";

/// Holds the lock under which names are checked and taken (container
/// creation and `vmc rename`), until dropped.
pub fn names_lock() -> Result<fs::File, StateError> {
    use std::os::fd::AsRawFd;
    // Beside the containers' directory, not in it (whose entries are
    // containers).
    let dir = vmc_home();
    let p = dir.join("names.lock");
    let f = crate::host::private_dir(&dir)
        .and_then(|()| {
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
        })
        .map_err(io_at(&p))?;
    // SAFETY: flock on a descriptor we hold.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_at(&p)(io::Error::last_os_error()));
    }
    Ok(f)
}

/// `vmc rename`: gives `c` the name `new` (which must be free).
pub fn rename(c: &Container, new: &str) -> Result<(), StateError> {
    let _lock = names_lock()?;
    check_name_free(new)?;
    let p = c.dir.join(NAME_FILE);
    crate::image::store::write_atomic(&p, new.as_bytes()).map_err(io_at(&p))
}

/// Fails if `name` is taken.
pub fn check_name_free(name: &str) -> Result<(), StateError> {
    match list().into_iter().find(|c| c.state.name == name) {
        Some(c) => Err(StateError::NameInUse(
            name.to_string(),
            c.state.id[..12].to_string(),
        )),
        None => Ok(()),
    }
}

/// A Docker-style generated name.
pub fn generate_name(id: &str) -> String {
    const ADJ: [&str; 8] = [
        "brave", "calm", "eager", "gentle", "jolly", "keen", "quiet", "swift",
    ];
    const NOUN: [&str; 8] = [
        "turing", "hopper", "lovelace", "knuth", "ritchie", "thompson", "liskov", "dijkstra",
    ];
    let n = u64::from_str_radix(&id[..8], 16).unwrap_or(0);
    format!(
        "{}_{}_{}",
        ADJ[(n % 8) as usize],
        NOUN[((n >> 3) % 8) as usize],
        &id[..4]
    )
}

/// One line of `container.log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: String,
    pub time: String,
    pub log: String,
}

/// Appends the lines read from `r` to the log as `stream`, each with its
/// time; a final line without a newline is kept as it is.
pub fn log_stream(r: impl io::Read, log: &Path, stream: &str) {
    let Ok(mut f) = super::private_file(log, true) else {
        return;
    };
    let mut r = io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = LogLine {
                    stream: stream.to_string(),
                    time: now_precise(),
                    log: String::from_utf8_lossy(&buf).into_owned(),
                };
                let mut data = serde_json::to_vec(&line).expect("log line serialises");
                data.push(b'\n');
                // One write per line (O_APPEND): lines of two streams never interleave.
                let _ = f.write_all(&data);
            }
        }
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "5 seconds", "3 minutes", ... as in `docker ps`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".into(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".into(),
        s if s < 86_400 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// Signal numbers from Docker's spellings: `SIGTERM`, `TERM`, `15`.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Some(match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

/// RFC 3339 with nanoseconds, as Docker's log timestamps.
pub fn now_precise() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let base = crate::image::store::rfc3339(d.as_secs() as i64);
    format!("{}.{:09}Z", base.trim_end_matches('Z'), d.subsec_nanos())
}

/// Reads the log's lines.
pub fn read_log(path: &Path) -> Vec<LogLine> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Removes a container's state directory. Without root, overlayfs leaves
/// its work directory with mode 000 (made inside the container's user
/// namespace, where the removal's process is not): its owner can still
/// open it up, and the removal is retried once.
pub fn remove_dir(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            open_up(dir);
            std::fs::remove_dir_all(dir)
        }
        r => r,
    }
}

/// Makes every directory under `dir` (symlinks not followed) rwx for its
/// owner.
fn open_up(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            open_up(&e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(dir: &Path, status: Status) -> Container {
        Container {
            dir: dir.to_path_buf(),
            state: State {
                id: "0123456789abcdef".into(),
                name: "c".into(),
                image: "busybox".into(),
                command: vec!["true".into()],
                mode: super::super::Mode::Ns,
                created: 1,
                status,
                pid: None,
                pid_start: None,
                started: None,
                finished: None,
                exit_code: None,
                stop_signal: "SIGTERM".into(),
                auto_remove: false,
                labels: Default::default(),
                restart_count: 0,
                restart_delay_ms: None,
            },
        }
    }

    /// created -> running -> exited, or created -> exited; every other
    /// move is refused with the container and both states named, and
    /// leaves state.json as it was.
    #[test]
    fn the_lifecycle_allows_only_its_transitions() {
        use Status::*;
        for (from, to, ok) in [
            (Created, Running, true),
            (Created, Exited, true),
            (Running, Exited, true),
            (Running, Running, false),
            (Running, Created, false),
            (Exited, Running, false),
            (Exited, Exited, false),
            (Exited, Created, false),
            (Created, Created, false),
            (Running, Restarting, true),
            (Restarting, Running, true),
            (Restarting, Exited, true),
            (Created, Restarting, false),
            (Exited, Restarting, false),
            (Restarting, Created, false),
        ] {
            assert_eq!(from.can_become(to), ok, "{from:?} -> {to:?}");
        }
        let d = tempfile::tempdir().unwrap();
        let mut c = container(d.path(), Created);
        c.save().unwrap();
        c.mark_running().unwrap();
        let on_disk = Container::load(d.path()).unwrap();
        assert_eq!(on_disk.state.status, Running);
        assert_eq!(on_disk.state.pid, Some(std::process::id() as i32));
        assert!(
            on_disk.supervisor_alive(),
            "this process, by its start time"
        );
        assert!(on_disk.state.started.is_some());
        let e = c.mark_running().unwrap_err().to_string();
        assert_eq!(
            e,
            "container 0123456789ab is Running: it cannot become Running"
        );
        c.mark_exited(3).unwrap();
        let on_disk = Container::load(d.path()).unwrap();
        assert_eq!(
            (on_disk.state.status, on_disk.state.exit_code),
            (Exited, Some(3))
        );
        assert!(c.mark_exited(4).is_err());
        assert!(c.mark_running().is_err());
        assert_eq!(Container::load(d.path()).unwrap().state.exit_code, Some(3));
        // A workload that never started: created -> exited.
        let d2 = tempfile::tempdir().unwrap();
        let mut c = container(d2.path(), Created);
        c.mark_exited(125).unwrap();
        assert_eq!(c.state.status, Exited);
    }

    /// A restart policy's turn: running -> restarting (the code, the count
    /// and the backoff recorded) -> running; `vmc start` takes an exited
    /// container back to created, forgetting the count and a user's stop,
    /// and refuses any other.
    #[test]
    fn restarts_are_counted_and_start_resets_an_exited_container() {
        use Status::*;
        let d = tempfile::tempdir().unwrap();
        let mut c = container(d.path(), Created);
        c.save().unwrap();
        c.mark_running().unwrap();
        c.mark_restarting(2, std::time::Duration::from_millis(400))
            .unwrap();
        let on_disk = Container::load(d.path()).unwrap().state;
        assert_eq!(
            (on_disk.status, on_disk.exit_code, on_disk.restart_count),
            (Restarting, Some(2), 1)
        );
        assert_eq!(on_disk.restart_delay_ms, Some(400));
        assert!(c.reset_for_start().is_err(), "restarting is not exited");
        c.mark_running().unwrap();
        mark_stopped_by_user(d.path());
        c.mark_exited(143).unwrap();
        assert!(stopped_by_user(d.path()));
        c.reset_for_start().unwrap();
        let on_disk = Container::load(d.path()).unwrap().state;
        assert_eq!(
            (on_disk.status, on_disk.pid, on_disk.exit_code),
            (Created, None, None)
        );
        assert_eq!(on_disk.restart_count, 0);
        assert!(!stopped_by_user(d.path()));
        assert!(c.reset_for_start().is_err(), "created is not exited");
    }

    /// A running state whose supervisor is gone is an exit nobody recorded
    /// (137); a container that is not running is not signalled.
    #[test]
    fn a_dead_supervisor_is_an_exit_and_is_not_signalled() {
        let d = tempfile::tempdir().unwrap();
        let mut c = container(d.path(), Status::Running);
        // A pid that exists but with another start time: not ours.
        c.state.pid = Some(1);
        c.state.pid_start = Some(u64::MAX);
        c.save().unwrap();
        assert!(!c.signal(0));
        assert_eq!(c.state.status, Status::Exited);
        assert_eq!(c.state.exit_code, Some(137));
        assert!(c.wait_exit(std::time::Duration::from_secs(1)));
    }

    #[test]
    fn signals_parse_like_docker() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
    }

    #[test]
    fn our_own_start_time_is_found_and_a_dead_pid_has_none() {
        let me = std::process::id() as i32;
        assert!(process_start(me).is_some());
        assert_eq!(process_start(i32::MAX), None);
    }

    #[test]
    fn durations_read_like_docker_ps() {
        assert_eq!(human_duration(5), "5 seconds");
        assert_eq!(human_duration(90), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
    }
}
