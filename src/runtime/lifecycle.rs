//! A container's life over its [`Engine`](super::engine::Engine): created
//! (state directory, `config.json`, `state.json`), run here attached to this
//! process's stdio, or started detached under a supervisor process that logs
//! its output, and ended (exit recorded, removed with `--rm`). Front ends (the
//! CLI's `run` and `__supervise`) call these and only print.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;

use super::engine::{self, StartGate};
use super::state::{self, Container, State, StateError, Status};
use super::{ContainerConfig, Mode, RuntimeError};

/// The exit code of a container that vmc itself failed to run (Docker's).
pub const EXIT_VMC_ERROR: i32 = 125;

/// How long `run -d` waits for the supervisor to start the workload. The
/// supervisor gives up by itself (the agent's connect timeout, bounded by the
/// guest's progress) and records why; this is only a safety net against one
/// that hangs, long enough for many VMs starting at once on a slow backend
/// (32 on this project's 2-core kvm_pvm machines took over 10 minutes).
const START_DEADLINE: Duration = Duration::from_secs(1800);

/// Errors of the lifecycle itself (the engine's are [`RuntimeError`]).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("creating the container: {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("starting the container's supervisor: {0}")]
    Spawn(std::io::Error),
    #[error("the supervisor of container {id} ended before starting it ({status}); remove it with vmc rm {id}")]
    SupervisorDied { id: String, status: String },
    #[error("container {0} did not start in time (see vmc logs {0})")]
    StartTimeout(String),
    #[error("the container's config is missing or unreadable")]
    Config,
    #[error("the supervisor's log pipes: {0}")]
    Pipes(std::io::Error),
    #[error("the control socket {path}: {source}")]
    ControlSocket {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("container {0} is not waiting to be started (vmc start is for containers made by vmc create)")]
    NotStartable(String),
    #[error("container {id}: its supervisor did not take the start ({source})")]
    Control { id: String, source: std::io::Error },
    #[error("container {id}: {message}")]
    Refused { id: String, message: String },
}

/// The supervisor's control socket in a container's state directory: how
/// other vmc processes talk to it (`vmc start` today). It is reached only
/// through the 0700 state directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The longest request line the control socket reads.
const CONTROL_LINE_MAX: u64 = 64;

/// What a new container is called and how it is shown and stopped.
pub struct Meta {
    pub name: String,
    /// The image (or `--rootfs` directory) as the user named it.
    pub image: String,
    pub stop_signal: String,
    /// `--rm`: removed when it ends.
    pub auto_remove: bool,
    /// `--label`s.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Creates the container of `cfg` in `dir` (a new directory): its config
/// (mode 0600: the environment may hold secrets), the image it uses (for
/// `vmc rmi`), and its state, `created`. Nothing is left on failure.
pub fn create(dir: &Path, cfg: &ContainerConfig, meta: Meta) -> Result<Container, LifecycleError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| LifecycleError::Create { path, source }
    };
    let made = || -> Result<Container, LifecycleError> {
        super::private_dir(dir).map_err(io(dir))?;
        let config = dir.join("config.json");
        let json = serde_json::to_vec_pretty(cfg).expect("a config serialises");
        super::private_file(&config, false)
            .and_then(|mut f| f.write_all(&json))
            .map_err(io(&config))?;
        if let Some(img) = &cfg.image_id {
            let p = dir.join("image-id");
            std::fs::write(&p, img).map_err(io(&p))?;
        }
        let c = Container {
            dir: dir.to_path_buf(),
            state: State {
                id: cfg.id.clone(),
                name: meta.name,
                image: meta.image,
                command: cfg.process.args.clone(),
                mode: cfg.mode(),
                created: state::now_secs(),
                status: Status::Created,
                pid: None,
                pid_start: None,
                started: None,
                finished: None,
                exit_code: None,
                stop_signal: meta.stop_signal,
                auto_remove: meta.auto_remove,
                labels: meta.labels,
                restart_count: 0,
                restart_delay_ms: None,
            },
        };
        // Checked again under the lock, as the name is taken: two runs
        // given one name cannot both have it.
        let _lock = state::names_lock()?;
        state::check_name_free(&c.state.name)?;
        c.save()?;
        Ok(c)
    };
    made().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(dir);
    })
}

/// The lifecycle's [`StartGate`]: for a container made by `vmc create`,
/// first waits on the control socket for `vmc start`; then records that
/// the container runs.
struct Begin<'a> {
    c: &'a mut Container,
    control: Option<UnixListener>,
    /// The health check, started with the workload.
    check: Option<crate::image::extras::Healthcheck>,
    monitor: Option<super::health::Monitor>,
}

impl<'a> Begin<'a> {
    fn new(c: &'a mut Container, control: Option<UnixListener>, cfg: &ContainerConfig) -> Self {
        Begin {
            c,
            control,
            check: cfg.healthcheck.clone(),
            monitor: None,
        }
    }
}

impl StartGate for Begin<'_> {
    fn open(&mut self) -> Result<(), RuntimeError> {
        if let Some(l) = self.control.take() {
            await_start(&l);
            let _ = std::fs::remove_file(self.c.dir.join(CONTROL_SOCKET));
        }
        super::pause::forget(&self.c.dir);
        super::health::reset(&self.c.dir);
        self.c.mark_running()?;
        self.monitor = super::health::start(&self.c.state.id, &self.c.dir, self.check.as_ref());
        Ok(())
    }
}

/// Answers requests on the control socket until one is `start`.
fn await_start(l: &UnixListener) {
    for conn in l.incoming() {
        let Ok(mut conn) = conn else { continue };
        // A client that sends nothing does not hold the container up.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let read =
            BufReader::new(std::io::Read::take(&conn, CONTROL_LINE_MAX)).read_line(&mut line);
        let start = read.is_ok() && line.trim_end() == "start";
        let reply: &[u8] = if start {
            b"ok\n"
        } else {
            b"error: unknown request (this supervisor answers start)\n"
        };
        let _ = conn.write_all(reply);
        if start {
            return;
        }
    }
}

/// Runs a created container in this process, attached to its stdio (stdin
/// only with `forward_stdin`): this process is its supervisor. Returns the
/// workload's exit code; records the end; removes the container with `--rm`
/// or when vmc itself failed (nothing of a failed run is left behind).
pub fn run_here(
    c: &mut Container,
    cfg: &ContainerConfig,
    forward_stdin: bool,
) -> Result<i32, LifecycleError> {
    c.mark_supervised()?;
    let dir = c.dir.clone();
    let mut gate = Begin::new(&mut *c, None, cfg);
    let result = engine::for_mode(cfg.mode()).run_attached(cfg, &dir, forward_stdin, &mut gate);
    drop(gate);
    if let Ok(code) = result {
        // With a restart policy the container lives on, detached, as
        // Docker's does after its attached client returned.
        if restart_due(c, cfg, code) && hand_over(c, code).is_ok() {
            return Ok(code);
        }
    }
    let _ = c.mark_exited(*result.as_ref().unwrap_or(&EXIT_VMC_ERROR));
    if c.state.auto_remove || result.is_err() {
        let _ = state::remove_dir(&c.dir);
        // A --rm container's anonymous volumes go with it (Docker's rule).
        super::volume::remove_anonymous(&cfg.mounts);
    }
    Ok(result?)
}

/// Whether the restart policy runs the container again after the workload
/// ended with `code` (never after an error of vmc's own).
fn restart_due(c: &Container, cfg: &ContainerConfig, code: i32) -> bool {
    cfg.restart
        .should_restart(code, c.state.restart_count, state::stopped_by_user(&c.dir))
}

/// The backoff before the next restart of `c`, whose workload just ended.
fn next_delay(c: &Container) -> Duration {
    let ran = state::now_secs().saturating_sub(c.state.started.unwrap_or(0));
    super::restart::backoff(
        c.state.restart_delay_ms.map(Duration::from_millis),
        Duration::from_secs(ran),
    )
}

/// The command that supervises the container in `dir` (`vmc __supervise`).
pub fn supervisor_command(dir: &Path) -> std::process::Command {
    // This very binary, by /proc: its path may not lead to it any more (a
    // namespace container's supervisor runs from a read-only bind of it in
    // a mount namespace of its own, where readlink gives no usable path).
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("__supervise").arg(dir);
    cmd
}

/// An attached run's container that its restart policy runs again: a
/// detached supervisor takes it over (`__supervise --restart`). Returns once
/// that supervisor has recorded itself, so that the container is never
/// without a live supervisor on record.
fn hand_over(c: &mut Container, code: i32) -> Result<(), LifecycleError> {
    let delay = next_delay(c);
    c.mark_restarting(code, delay)?;
    let mut cmd = supervisor_command(&c.dir);
    cmd.arg("--restart");
    crate::host::detach(&mut cmd);
    let mut child = cmd.spawn().map_err(LifecycleError::Spawn)?;
    let me = c.state.pid;
    loop {
        if Container::load(&c.dir).is_none_or(|now| now.state.pid != me) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            // It ended before recording itself: the run ends here.
            c.refresh();
            return Err(LifecycleError::SupervisorDied {
                id: c.state.id.chars().take(12).collect(),
                status: st.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits out a restart's backoff of `delay` with the forwarded signals
/// blocked (they are taken here, not left pending for the next run);
/// false if the user stopped the container meanwhile.
fn backoff_wait(dir: &Path, delay: Duration) -> bool {
    let set = super::ns::block_forwarded();
    let end = Instant::now() + delay;
    loop {
        if state::stopped_by_user(dir) {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let step = left.min(Duration::from_millis(50));
        let ts = libc::timespec {
            tv_sec: step.as_secs() as libc::time_t,
            tv_nsec: step.subsec_nanos() as libc::c_long,
        };
        // SAFETY: set and ts are valid for the call; the signal's details
        // are not wanted.
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    }
}

/// How a detached start went.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// The workload runs.
    Running,
    /// It ran, ended and was removed already (`--rm`).
    Removed,
    /// It could not start: the reason its supervisor logged, and the code.
    Failed { why: String, code: i32 },
}

/// Where a detached container's supervisor stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// `run -d`: it starts the workload.
    Started,
    /// `vmc create`: it makes the container and waits for `vmc start`.
    Created,
    /// A restart policy's next run of a `restarting` container: waits the
    /// backoff, then starts the workload (or ends, if the user stopped the
    /// container meanwhile).
    Restart,
}

/// Starts a created container detached: `supervisor` (the command that
/// runs [`supervise`] on its directory) is spawned in a session of its own
/// with no stdio. With [`Until::Started`] this returns once the workload
/// started (as Docker's `run -d` does, so that `exec` and published ports
/// work right after it), or failed to; with [`Until::Created`] once the
/// supervisor listens for `vmc start`. A supervisor that cannot be spawned
/// leaves nothing behind.
pub fn start_detached(
    c: &Container,
    supervisor: std::process::Command,
    until: Until,
) -> Result<Started, LifecycleError> {
    spawn_supervisor(c, supervisor, until, true)
}

/// [`start_detached`]; `new`: the container was made for this start (and
/// goes if its supervisor cannot be spawned).
fn spawn_supervisor(
    c: &Container,
    mut supervisor: std::process::Command,
    until: Until,
    new: bool,
) -> Result<Started, LifecycleError> {
    crate::host::detach(&mut supervisor);
    let mut child = match supervisor.spawn() {
        Ok(child) => child,
        Err(e) => {
            if new {
                let _ = std::fs::remove_dir_all(&c.dir);
            }
            return Err(LifecycleError::Spawn(e));
        }
    };
    let mut gone = || child.try_wait().ok().flatten().map(|st| st.to_string());
    wait_for(&c.dir, &c.state.id, until, &mut gone)
}

/// `vmc start`: starts a container made by `vmc create` (see
/// [`start_created`]), or runs an exited one again under a new supervisor,
/// its writable layer kept; a running (or restarting) one is left as it is,
/// as in Docker. Concurrent starts of one container start it once.
pub fn start(c: &mut Container) -> Result<Started, LifecycleError> {
    let lock = lock_dir(&c.dir)?;
    let started = match c.refresh() {
        Status::Created => {
            drop(lock);
            return start_created(c);
        }
        Status::Running | Status::Restarting => Ok(Started::Running),
        Status::Exited => {
            c.reset_for_start()?;
            spawn_supervisor(c, supervisor_command(&c.dir), Until::Started, false)
        }
    };
    drop(lock);
    started
}

/// An exclusive lock on a container's state directory, until dropped
/// (`vmc start`, and `vmc cp` with a stopped microVM container).
pub fn lock_dir(dir: &Path) -> Result<std::fs::File, LifecycleError> {
    let io = |source| {
        LifecycleError::State(StateError::Io {
            path: dir.display().to_string(),
            source,
        })
    };
    let f = std::fs::File::open(dir).map_err(io)?;
    // SAFETY: flock on a descriptor we hold.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Starts a container made by `vmc create`: asks its supervisor over the
/// control socket, then waits until the workload runs (or failed to start).
pub fn start_created(c: &mut Container) -> Result<Started, LifecycleError> {
    let id = c.state.id.clone();
    let short = id[..12.min(id.len())].to_string();
    let sock = c.dir.join(CONTROL_SOCKET);
    if c.refresh() != Status::Created || !sock.exists() {
        if c.state.status == Status::Running {
            // Docker: starting a running container is not an error.
            return Ok(Started::Running);
        }
        return Err(LifecycleError::NotStartable(short));
    }
    let control = |source| LifecycleError::Control {
        id: short.clone(),
        source,
    };
    let mut conn = crate::uds::connect(&sock).map_err(control)?;
    conn.write_all(b"start\n").map_err(control)?;
    let mut reply = String::new();
    // The supervisor answers once the container is made (a VM restored or
    // booted): as long as that takes, bounded by the supervisor's life (its
    // end closes the socket).
    BufReader::new(std::io::Read::take(&conn, 4096))
        .read_line(&mut reply)
        .map_err(control)?;
    match reply.trim_end() {
        "ok" => {}
        "" => return Err(control(std::io::Error::other("it ended before answering"))),
        other => {
            return Err(LifecycleError::Refused {
                id: short,
                message: other.trim_start_matches("error: ").to_string(),
            })
        }
    }
    let supervisor = c.clone();
    let mut gone = || (!supervisor.supervisor_alive()).then(|| "its process is gone".to_string());
    wait_for(&c.dir, &id, Until::Started, &mut gone)
}

/// Waits until the supervisor of the container in `dir` reached `until`,
/// or it ended; `gone` says how the supervisor ended, once it has.
fn wait_for(
    dir: &Path,
    id: &str,
    until: Until,
    gone: &mut dyn FnMut() -> Option<String>,
) -> Result<Started, LifecycleError> {
    let short = &id[..12.min(id.len())];
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let Some(mut c) = Container::load(dir) else {
            return Ok(Started::Removed);
        };
        let reached = match until {
            Until::Started | Until::Restart => c.started(),
            Until::Created => dir.join(CONTROL_SOCKET).exists() && c.state.pid.is_some(),
        };
        if reached {
            return Ok(Started::Running);
        }
        if c.state.status != Status::Created && c.refresh() == Status::Exited {
            let why = state::read_log(&c.log_path())
                .into_iter()
                .filter(|l| l.stream == "stderr")
                .map(|l| l.log.trim_end().to_string())
                .next_back()
                .unwrap_or_else(|| "the container's supervisor ended".into());
            return Ok(Started::Failed {
                why: why.trim_start_matches("vmc: ").to_string(),
                code: c.state.exit_code.unwrap_or(EXIT_VMC_ERROR),
            });
        }
        if c.state.status == Status::Created {
            if let Some(status) = gone() {
                // It may have recorded its end just before: look again.
                let fresh = Container::load(dir);
                if fresh.is_none_or(|f| f.state.status != Status::Created || f.started()) {
                    continue;
                }
                // Gone before it could record anything (killed, crashed).
                return Err(LifecycleError::SupervisorDied {
                    id: short.to_string(),
                    status,
                });
            }
        }
        if Instant::now() > deadline {
            return Err(LifecycleError::StartTimeout(short.to_string()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The FIFO a detached `-i` container's stdin comes from.
pub const STDIN_FIFO: &str = "stdin";

/// Makes (once) and opens the container's stdin FIFO, read-write.
fn open_stdin_fifo(dir: &Path) -> std::io::Result<std::fs::File> {
    let p = dir.join(STDIN_FIFO);
    let c = vmc_spawn::sys::cstr(&p)?;
    // SAFETY: mkfifo with a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    // Not a FIFO someone put there in its place: a FIFO, and ours.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = f.metadata()?;
    // SAFETY: geteuid has no preconditions.
    if !m.file_type().is_fifo() || m.uid() != unsafe { libc::geteuid() } {
        return Err(std::io::Error::other(format!(
            "{} is not the container's stdin FIFO",
            p.display()
        )));
    }
    Ok(f)
}

/// The supervisor of a detached container (`vmc __supervise DIR`): runs it
/// with its output going to its log, and records how it ended. With
/// `until` [`Until::Created`] it makes the container and then waits on its
/// control socket for `vmc start`. An error of vmc's own is logged as the
/// container's last line of stderr (which `run -d` reports) and recorded as
/// exit code 125.
pub fn supervise(dir: &Path, until: Until) -> Result<(), LifecycleError> {
    let mut c = Container::load(dir).ok_or(StateError::NotFound(dir.display().to_string()))?;
    let cfg = c.config().ok_or(LifecycleError::Config)?;
    if until == Until::Restart {
        c.mark_supervising_restart()?;
        let delay = Duration::from_millis(c.state.restart_delay_ms.unwrap_or(0));
        if !backoff_wait(dir, delay) {
            // Stopped in its backoff: the last run's exit stands.
            let code = c.state.exit_code.unwrap_or(0);
            c.mark_exited(code)?;
            return Ok(());
        }
    }
    let log = c.log_path();
    let pipe = || -> std::io::Result<(std::fs::File, std::fs::File)> {
        let (r, w) = vmc_spawn::sys::pipe()?;
        Ok((r.into(), w.into()))
    };
    let (out_r, out_w) = pipe().map_err(LifecycleError::Pipes)?;
    let (err_r, err_w) = pipe().map_err(LifecycleError::Pipes)?;
    let null = std::fs::File::open("/dev/null").map_err(LifecycleError::Pipes)?;
    // `-i`: the workload's stdin is the FIFO `vmc attach` writes to, held
    // open for writing here too, so that it never reads an end of file
    // when an attached client goes.
    let stdin = if cfg.stdin_open {
        open_stdin_fifo(dir).map_err(LifecycleError::Pipes)?
    } else {
        null.try_clone().map_err(LifecycleError::Pipes)?
    };
    // SAFETY: dup2 onto our own standard descriptors.
    unsafe {
        libc::dup2(stdin.as_raw_fd(), 0);
        libc::dup2(out_w.as_raw_fd(), 1);
        libc::dup2(err_w.as_raw_fd(), 2);
    }
    drop(stdin);
    drop((out_w, err_w));
    // The signals the container gets forwarded are blocked before any thread
    // exists, so that only the runtime's forwarding ever receives them.
    super::ns::block_forwarded();
    if cfg.mode() == Mode::Ns {
        // Without root, the user namespace can only be entered while this
        // process has a single thread. A failure is recorded as the
        // container's exit, for `run -d` to report at once.
        if let Err(e) = super::ns::user_namespace() {
            state::log_stream(format!("vmc: {e}\n").as_bytes(), &log, "stderr");
            c.mark_exited(EXIT_VMC_ERROR)?;
            return Err(RuntimeError::from(e).into());
        }
    }
    let control = match until {
        Until::Started | Until::Restart => None,
        Until::Created => {
            let p = dir.join(CONTROL_SOCKET);
            let _ = std::fs::remove_file(&p);
            match crate::uds::bind(&p) {
                Ok(l) => Some(l),
                Err(source) => {
                    let e = LifecycleError::ControlSocket {
                        path: p.display().to_string(),
                        source,
                    };
                    state::log_stream(format!("vmc: {e}\n").as_bytes(), &log, "stderr");
                    c.mark_exited(EXIT_VMC_ERROR)?;
                    return Err(e);
                }
            }
        }
    };
    if until != Until::Restart {
        c.mark_supervised()?;
    }
    let (l1, l2) = (log.clone(), log.clone());
    let t1 = std::thread::spawn(move || state::log_stream(out_r, &l1, "stdout"));
    let t2 = std::thread::spawn(move || state::log_stream(err_r, &l2, "stderr"));
    let mut gate = Begin::new(&mut c, control, &cfg);
    let result = engine::for_mode(cfg.mode()).run_attached(&cfg, dir, cfg.stdin_open, &mut gate);
    drop(gate);
    let code = match &result {
        Ok(code) => *code,
        Err(e) => {
            eprintln!("vmc: {}", crate::host::error_line(e));
            EXIT_VMC_ERROR
        }
    };
    // SAFETY: as above; the loggers then see end of file.
    unsafe {
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(null.as_raw_fd(), 2);
    }
    let _ = (t1.join(), t2.join());
    let _ = std::fs::remove_file(dir.join(CONTROL_SOCKET));
    if result.is_ok() && restart_due(&c, &cfg, code) {
        let delay = next_delay(&c);
        c.mark_restarting(code, delay)?;
        // The next run in a fresh image of this process: the same pid
        // (the supervisor on record), none of this run's threads.
        let mut next = supervisor_command(dir);
        next.arg("--restart");
        let e = std::os::unix::process::CommandExt::exec(&mut next);
        state::log_stream(
            format!("vmc: restarting the container: {e}\n").as_bytes(),
            &log,
            "stderr",
        );
    }
    c.mark_exited(code)?;
    if c.state.auto_remove {
        let _ = state::remove_dir(dir);
        super::volume::remove_anonymous(&cfg.mounts);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::{EngineConfig, NsEngineConfig, ProcessSpec, Rootfs};
    use super::*;

    fn config() -> ContainerConfig {
        ContainerConfig {
            netns: None,
            id: "0123456789abcdef0123".into(),
            rootfs: Rootfs::Dir("/nonexistent".into()),
            image_id: Some("sha256:feed".into()),
            process: ProcessSpec {
                args: vec!["echo".into(), "hi".into()],
                env: vec!["SECRET=1".into()],
                ..Default::default()
            },
            hostname: "h".into(),
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
            engine: EngineConfig::Ns(NsEngineConfig::default()),
        }
    }

    fn meta() -> Meta {
        Meta {
            name: "happy_turing".into(),
            image: "busybox".into(),
            stop_signal: "SIGTERM".into(),
            auto_remove: false,
            labels: Default::default(),
        }
    }

    /// A created container has its config (0600: the environment may hold
    /// secrets), the image it uses and its state, `created`, in its mode.
    #[test]
    fn create_writes_a_private_config_and_a_created_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let c = create(&dir, &config(), meta()).unwrap();
        assert_eq!(c.state.status, Status::Created);
        assert_eq!(c.state.mode, Mode::Ns);
        assert_eq!(c.state.command, ["echo", "hi"]);
        let mode = std::fs::metadata(dir.join("config.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = Container::load(&dir).unwrap();
        assert_eq!(loaded.state.name, "happy_turing");
        assert_eq!(loaded.config().unwrap().process.env, ["SECRET=1"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("image-id")).unwrap(),
            "sha256:feed"
        );
    }

    /// A container that cannot be created leaves nothing behind, and one
    /// whose supervisor cannot be spawned is removed.
    #[test]
    fn failures_leave_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        let e = create(&tmp.path().join("file/c"), &config(), meta()).unwrap_err();
        assert!(matches!(e, LifecycleError::Create { .. }), "{e}");

        let dir = tmp.path().join("c");
        let c = create(&dir, &config(), meta()).unwrap();
        let e = start_detached(
            &c,
            std::process::Command::new("/nonexistent/vmc"),
            Until::Started,
        )
        .unwrap_err();
        assert!(matches!(e, LifecycleError::Spawn(_)), "{e}");
        assert!(!dir.exists());
    }

    /// A supervisor that ends without recording anything is reported by
    /// name, with how it ended, and the container is left for `vmc rm`.
    #[test]
    fn a_supervisor_that_dies_at_once_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let c = create(&dir, &config(), meta()).unwrap();
        let e =
            start_detached(&c, std::process::Command::new("false"), Until::Started).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the supervisor of container 0123456789ab ended before starting it (exit status: 1); remove it with vmc rm 0123456789ab"
        );
        assert_eq!(Container::load(&dir).unwrap().state.status, Status::Created);
    }

    /// `vmc start` over the control socket: a request other than `start`
    /// is refused by name and does not start the container; `start` opens
    /// the gate, and `start_created` returns once the workload runs. A
    /// container not waiting for a start is refused.
    #[test]
    fn the_control_socket_starts_a_created_container() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let mut c = create(&dir, &config(), meta()).unwrap();
        assert!(matches!(
            start_created(&mut c.clone()),
            Err(LifecycleError::NotStartable(_))
        ));
        c.mark_supervised().unwrap();
        let listener = crate::uds::bind(&dir.join(CONTROL_SOCKET)).unwrap();
        let supervisor = {
            let mut c = c.clone();
            std::thread::spawn(move || {
                let mut gate = Begin::new(&mut c, Some(listener), &config());
                gate.open().unwrap();
                state::mark_started(&c.dir);
            })
        };
        let mut other = crate::uds::connect(&dir.join(CONTROL_SOCKET)).unwrap();
        other.write_all(b"stop\n").unwrap();
        let mut reply = String::new();
        BufReader::new(&other).read_line(&mut reply).unwrap();
        assert_eq!(
            reply,
            "error: unknown request (this supervisor answers start)\n"
        );
        assert_eq!(Container::load(&dir).unwrap().state.status, Status::Created);

        assert_eq!(start_created(&mut c).unwrap(), Started::Running);
        supervisor.join().unwrap();
        let after = Container::load(&dir).unwrap();
        assert_eq!(after.state.status, Status::Running);
        assert!(!dir.join(CONTROL_SOCKET).exists());
        // Running already: Docker's start is then a no-op.
        assert_eq!(start_created(&mut c).unwrap(), Started::Running);
    }
}
