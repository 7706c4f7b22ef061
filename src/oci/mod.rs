//! `vmc-runtime`: vmc as an OCI runtime, with runc's command line, so that
//! podman (through conmon) and containerd (through its runc shim) run their
//! containers with vmc. The same binary as `vmc`, called by another name
//! (a link named `vmc-runtime`): `main` dispatches on argv\[0\].
//!
//! A container is a directory under `--root` (default /run/vmc-runtime)
//! named by its id, holding its [`state::Record`]. Its process follows
//! runc's model (see [`ns`]): `create` leaves it waiting before its execve,
//! `start` lets it go, the caller waits for its pid.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

pub mod bundle;
pub mod ns;
pub mod state;
pub mod vm;

use state::{Record, Status};

/// The name vmc answers to as an OCI runtime.
pub const RUNTIME_NAME: &str = "vmc-runtime";

/// runc's global options (before or after the verb).
#[derive(Parser, Debug)]
#[command(
    name = "vmc-runtime",
    version,
    about = "vmc as an OCI runtime (runc's command line)"
)]
pub struct RuntimeCli {
    /// Where container state is kept.
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Errors are also written here (what conmon and containerd read).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// `text` or `json` (one object per line).
    #[arg(long = "log-format", global = true, default_value = "text")]
    pub log_format: String,
    /// Accepted (vmc manages its cgroups itself).
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Accepted.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted (runc's `--rootless true|false|auto`).
    #[arg(long, global = true)]
    pub rootless: Option<String>,
    /// Accepted (checkpointing is not supported).
    #[arg(long, global = true)]
    pub criu: Option<String>,
    /// The mode of a bundle without the io.vmc.mode annotation (a runtime
    /// config's choice: podman's `--runtime-flag mode=ns`, or the
    /// environment of containerd's shim); default vm.
    #[arg(long, global = true, env = "VMC_RUNTIME_MODE", value_enum)]
    pub mode: Option<crate::runtime::Mode>,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Create a container from a bundle; its process waits for `start`.
    Create {
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        /// Accepted.
        #[arg(long = "no-pivot")]
        no_pivot: bool,
        /// Accepted.
        #[arg(long = "no-new-keyring")]
        no_new_keyring: bool,
        id: String,
    },
    /// Run a created container's process.
    Start { id: String },
    /// The container's state as the runtime spec's JSON.
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's process.
    Kill {
        /// Every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Remove a stopped (or created) container; `--force` kills it first.
    Delete {
        #[arg(long, short = 'f')]
        force: bool,
        id: String,
    },
    /// The container's processes (host pids).
    Ps {
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Freeze every process of the container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// What this runtime supports, as JSON.
    Features,
    /// Run a process in a running container.
    Exec {
        /// The process as the runtime spec's JSON (else the arguments).
        #[arg(long, short = 'p')]
        process: Option<PathBuf>,
        /// Return at once; the caller waits for the process (its pid in
        /// --pid-file).
        #[arg(long, short = 'd')]
        detach: bool,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long, short = 't')]
        tty: bool,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long, short = 'e')]
        env: Vec<String>,
        /// UID[:GID].
        #[arg(long, short = 'u')]
        user: Option<String>,
        #[arg(long = "additional-gids", short = 'g')]
        additional_gids: Vec<u32>,
        /// Capabilities added to the container's.
        #[arg(long = "cap", short = 'c')]
        caps: Vec<String>,
        #[arg(long = "no-new-privs")]
        no_new_privs: bool,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        /// Accepted (SELinux is not supported).
        #[arg(long = "process-label")]
        process_label: Option<String>,
        /// Accepted (AppArmor is not supported).
        #[arg(long)]
        apparmor: Option<String>,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// What `create` passes to the mode's engine.
#[derive(Debug, Default)]
pub struct CreateOpts {
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub preserve_fds: u32,
}

/// Whether this process was started as the runtime (by its name).
pub fn called_as_runtime(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == RUNTIME_NAME)
}

/// The runtime's main: parses runc's command line, runs the verb, reports
/// an error on stderr and in `--log`; returns the exit code.
pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    let cli = match RuntimeCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let msg = e.to_string();
            eprintln!(
                "{RUNTIME_NAME}: {}",
                msg.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return 1;
        }
    };
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            let line = format!("{e:#}");
            eprintln!("{RUNTIME_NAME}: {line}");
            if let Some(log) = &cli.log {
                log_error(log, &cli.log_format, &line);
            }
            1
        }
    }
}

/// Appends an error to the log as runc writes it (conmon and containerd
/// show the last one when a command fails).
fn log_error(path: &Path, format: &str, msg: &str) {
    let text = if format == "json" {
        serde_json::json!({"level": "error", "msg": msg, "time": state::now_rfc3339()}).to_string()
    } else {
        format!(
            "time=\"{}\" level=error msg=\"{}\"",
            state::now_rfc3339(),
            msg.replace('"', "\\\"")
        )
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{text}");
    }
}

/// The state root: `--root`, else /run/vmc-runtime (root) or
/// $XDG_RUNTIME_DIR/vmc-runtime.
fn state_root(cli: &RuntimeCli) -> PathBuf {
    if let Some(r) = &cli.root {
        return r.clone();
    }
    if !crate::host::rootless() {
        return PathBuf::from("/run/vmc-runtime");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join(RUNTIME_NAME),
        None => {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir().join(format!("{RUNTIME_NAME}-{uid}"))
        }
    }
}

/// The directory of container `id` (which must be a valid id).
fn container_dir(root: &Path, id: &str) -> Result<PathBuf> {
    if !state::valid_id(id) {
        bail!("invalid container id {id:?}: letters, digits and _ + - . only");
    }
    Ok(root.join(id))
}

/// The record of an existing container.
fn existing(root: &Path, id: &str) -> Result<(PathBuf, Record)> {
    let dir = container_dir(root, id)?;
    match Record::load(&dir) {
        Ok(r) => Ok((dir, r)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("container {id} does not exist")
        }
        Err(e) => Err(e).with_context(|| format!("container {id}'s state")),
    }
}

fn run(cli: &RuntimeCli) -> Result<i32> {
    let root = state_root(cli);
    if let Verb::Exec { id, .. } = &cli.verb {
        let (dir, r) = existing(&root, id)?;
        if r.status(&dir) != Status::Running {
            bail!(
                "cannot exec in a container that is {}",
                r.status(&dir).as_str()
            );
        }
        let plan = exec_plan(&cli.verb, &r)?;
        if plan.terminal && plan.console_socket.is_none() {
            bail!("a terminal (--tty) needs --console-socket");
        }
        return match r.mode {
            crate::runtime::Mode::Ns => ns::exec(&r, &plan),
            crate::runtime::Mode::Vm => vm::exec(&dir, &r, &plan),
        };
    }
    run_verb(cli, &root).map(|()| 0)
}

/// The process `exec` asks for: `--process` (the runtime spec's process
/// JSON) or the arguments over the container's own process (its
/// environment, capabilities, user, filter), with the flags' changes.
fn exec_plan(verb: &Verb, r: &Record) -> Result<ns::ExecPlan> {
    let Verb::Exec {
        process,
        detach,
        pid_file,
        console_socket,
        tty,
        cwd,
        env,
        user,
        additional_gids,
        caps,
        no_new_privs,
        preserve_fds,
        command,
        ..
    } = verb
    else {
        unreachable!("exec_plan of another verb")
    };
    let spec = bundle::read_spec(&r.bundle)?;
    let b = bundle::from_spec(&r.bundle, &spec)?;
    let mut plan = ns::ExecPlan {
        process: b.process.clone(),
        groups: b.groups.clone(),
        terminal: *tty,
        caps: b.caps,
        no_new_privs: b.no_new_privs || *no_new_privs,
        seccomp: b.seccomp.clone(),
        detach: *detach,
        pid_file: pid_file.clone(),
        console_socket: console_socket.clone(),
        preserve_fds: *preserve_fds,
    };
    match process {
        Some(path) => {
            let text = bundle::read_bounded(path)?;
            let p: oci_spec::runtime::Process = serde_json::from_str(&text)
                .with_context(|| format!("--process {}", path.display()))?;
            let mut with = spec.clone();
            with.set_process(Some(p));
            let from = bundle::from_spec(&r.bundle, &with)?;
            plan.process = from.process;
            plan.groups = from.groups;
            plan.terminal = from.terminal;
            plan.caps = from.caps;
            plan.no_new_privs = from.no_new_privs;
        }
        None => {
            if command.is_empty() {
                bail!("exec needs a command or --process");
            }
            plan.process.args = command.clone();
        }
    }
    crate::runtime::spec::merge_env(&mut plan.process.env, env);
    if let Some(c) = cwd {
        plan.process.cwd = c.clone();
    }
    if let Some(u) = user {
        plan.process.user = u.clone();
        plan.groups = additional_gids.clone();
    } else if !additional_gids.is_empty() {
        plan.groups = additional_gids.clone();
    }
    for c in caps {
        plan.caps |= crate::runtime::caps::bits(c)?;
    }
    Ok(plan)
}

fn run_verb(cli: &RuntimeCli, root: &Path) -> Result<()> {
    let root = root.to_path_buf();
    match &cli.verb {
        Verb::Exec { .. } => unreachable!("exec is run above"),
        Verb::Create {
            bundle,
            pid_file,
            console_socket,
            preserve_fds,
            id,
            ..
        } => {
            let opts = CreateOpts {
                pid_file: pid_file.clone(),
                console_socket: console_socket.clone(),
                preserve_fds: *preserve_fds,
            };
            create(&root, id, bundle, &opts, cli.mode)
        }
        Verb::Start { id } => {
            let (dir, r) = existing(&root, id)?;
            match r.status(&dir) {
                Status::Created => ns::start(&dir),
                Status::Stopped => bail!("cannot start a container that has stopped"),
                s => bail!("cannot start an already {} container", s.as_str()),
            }
        }
        Verb::State { id } => {
            let (dir, r) = existing(&root, id)?;
            println!("{}", serde_json::to_string_pretty(&r.state_json(&dir))?);
            Ok(())
        }
        Verb::Kill { all, id, signal } => {
            let (dir, r) = existing(&root, id)?;
            let sig = match signal {
                None => libc::SIGTERM,
                Some(s) => crate::runtime::state::signal_number(s)
                    .with_context(|| format!("unknown signal {s:?}"))?,
            };
            kill(&dir, &r, sig, *all)
        }
        Verb::Delete { force, id } => delete(&root, id, *force),
        Verb::Ps { format, id, .. } => {
            let (_, r) = existing(&root, id)?;
            let pids = pids_of(&r);
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("PID");
                for p in pids {
                    println!("{p}");
                }
            }
            Ok(())
        }
        Verb::Pause { id } => freeze(&root, id, true),
        Verb::Resume { id } => freeze(&root, id, false),
        Verb::Features => {
            println!("{}", serde_json::to_string_pretty(&features())?);
            Ok(())
        }
    }
}

fn create(
    root: &Path,
    id: &str,
    bundle: &Path,
    opts: &CreateOpts,
    mode: Option<crate::runtime::Mode>,
) -> Result<()> {
    let dir = container_dir(root, id)?;
    let b = bundle::load(bundle)?;
    if b.terminal && opts.console_socket.is_none() {
        bail!("process.terminal needs --console-socket (where the terminal's master is sent)");
    }
    let mode = mode_of(&b.annotations, b.mode, mode);
    // Made private, as runc makes its own: the records name bundles and pids.
    if !root.exists() {
        crate::host::private_dir(root).with_context(|| format!("{}", root.display()))?;
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("container with id {id} already exists")
        }
        Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
    }
    let made = match mode {
        crate::runtime::Mode::Ns => ns::create(&dir, id, &b, opts),
        crate::runtime::Mode::Vm => vm::create(&dir, id, &b, opts),
    };
    let record = match made.and_then(|r| r.save(&dir).map(|()| r).context("saving the state")) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    if let Some(p) = &opts.pid_file {
        PidFile::open(p)?
            .write(record.pid as u32)
            .context("--pid-file")?;
    }
    Ok(())
}

/// The annotations Kubernetes' runtimes put on a pod's sandbox (pause)
/// container: containerd's CRI and CRI-O's.
const SANDBOX_MARKS: [&str; 2] = [
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];

/// A bundle's mode: its `io.vmc.mode`, else the runtime's `--mode`, else a
/// microVM, except for a pod's sandbox container, which only holds the
/// pod's namespaces: namespace mode, so that the pod's network namespace
/// stays free for a workload's VM to take over.
fn mode_of(
    annotations: &std::collections::BTreeMap<String, String>,
    annotated: Option<crate::runtime::Mode>,
    flag: Option<crate::runtime::Mode>,
) -> crate::runtime::Mode {
    let sandbox = SANDBOX_MARKS
        .iter()
        .any(|k| annotations.get(*k).is_some_and(|v| v == "sandbox"));
    match (annotated, sandbox) {
        (Some(m), _) => m,
        (None, true) => crate::runtime::Mode::Ns,
        (None, false) => flag.unwrap_or_default(),
    }
}

/// A `--pid-file` whose directory was opened up front: written (to a
/// temporary name, renamed over) from wherever this process is by then.
pub(crate) struct PidFile {
    dir: std::fs::File,
    name: std::ffi::CString,
    tmp: std::ffi::CString,
}

impl PidFile {
    pub(crate) fn open(path: &Path) -> Result<PidFile> {
        let path = std::path::absolute(path)?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            bail!("--pid-file {}: not a file path", path.display());
        };
        let dir = std::fs::File::open(parent)
            .with_context(|| format!("--pid-file: {}", parent.display()))?;
        let name = name.to_string_lossy();
        Ok(PidFile {
            dir,
            name: std::ffi::CString::new(name.as_bytes())?,
            tmp: std::ffi::CString::new(format!(".{name}.tmp{}", std::process::id()))?,
        })
    }

    pub(crate) fn write(&self, pid: u32) -> std::io::Result<()> {
        let d = self.dir.as_raw_fd();
        // SAFETY: openat, write, renameat on a directory descriptor we hold
        // and NUL-terminated names.
        unsafe {
            let fd = libc::openat(
                d,
                self.tmp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o644,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut f = std::fs::File::from_raw_fd(fd);
            f.write_all(pid.to_string().as_bytes())?;
            drop(f);
            if libc::renameat(d, self.tmp.as_ptr(), d, self.name.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn kill(dir: &Path, r: &Record, sig: i32, all: bool) -> Result<()> {
    let status = r.status(dir);
    if status == Status::Stopped && !all {
        bail!("container {} is not running", r.id);
    }
    let targets = if all { pids_of(r) } else { vec![r.pid] };
    for pid in targets {
        // SAFETY: kill takes plain integers.
        if unsafe { libc::kill(pid, sig) } < 0 && !all {
            bail!("signalling {pid}: {}", std::io::Error::last_os_error());
        }
    }
    // A created container killed for good takes its holder with it; a
    // microVM's, its VMM.
    if status == Status::Created && sig == libc::SIGKILL {
        ns::end_holder(r);
    }
    if r.mode == crate::runtime::Mode::Vm && sig == libc::SIGKILL {
        vm::kill_vmm(dir);
    }
    Ok(())
}

/// The container's processes: its cgroup's, else its own process.
fn pids_of(r: &Record) -> Vec<i32> {
    let mut pids: Vec<i32> = r
        .cgroups
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    if pids.is_empty() && r.alive() {
        pids.push(r.pid);
    }
    pids
}

fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let (dir, r) = match existing(root, id) {
        Ok(v) => v,
        // runc: deleting what is not there with --force is no error.
        Err(_) if force && container_dir(root, id).is_ok_and(|d| !d.exists()) => return Ok(()),
        Err(e) => return Err(e),
    };
    match r.status(&dir) {
        Status::Stopped | Status::Created => {}
        s if force => {
            if s == Status::Paused {
                let _ = set_frozen(&dir, &r, false);
            }
        }
        s => bail!(
            "cannot delete container {id} that is not stopped: {} (use --force)",
            s.as_str()
        ),
    }
    if r.alive() {
        for pid in pids_of(&r) {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Gone within moments of SIGKILL; a process stuck in the kernel
        // (D state) is waited for at most this long.
        let mut waited = 0;
        while r.alive() && waited < 10_000 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 10;
        }
        if r.alive() {
            bail!(
                "container {id}'s process {} did not end after SIGKILL",
                r.pid
            );
        }
    }
    ns::end_holder(&r);
    vm::kill_vmm(&dir);
    ns::clean_up(&r);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

fn set_frozen(dir: &Path, r: &Record, frozen: bool) -> Result<()> {
    if r.mode == crate::runtime::Mode::Vm {
        return vm::set_paused(dir, frozen);
    }
    let f = crate::runtime::cgroup::freezer_of(&r.cgroups)
        .context("the container has no freezer cgroup")?;
    crate::runtime::cgroup::set_frozen(&f, frozen)?;
    Ok(())
}

fn freeze(root: &Path, id: &str, frozen: bool) -> Result<()> {
    let (dir, r) = existing(root, id)?;
    match (r.status(&dir), frozen) {
        (Status::Running, true) | (Status::Paused, false) => set_frozen(&dir, &r, frozen),
        (s, true) => bail!("cannot pause a container that is {}", s.as_str()),
        (s, false) => bail!("cannot resume a container that is {}", s.as_str()),
    }
}

/// `features`: the runtime spec's features document for what vmc does.
fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec::runtime::VERSION,
        "hooks": [],
        "mountOptions": [
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
            "dirsync", "noatime", "atime", "nodiratime", "diratime", "relatime", "norelatime",
            "strictatime", "nostrictatime", "bind", "rbind", "private", "rprivate"
        ],
        "linux": {
            "namespaces": ["mount", "pid", "network", "uts", "ipc", "cgroup"],
            "capabilities": crate::runtime::caps::names(),
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.vmc.mode": "vm (a microVM per container) or ns (Linux namespaces)"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Mode;

    /// The annotation wins, then the runtime's flag, then vm; a pod's
    /// sandbox container without the annotation is namespace mode.
    #[test]
    fn the_mode_comes_from_the_annotation_the_flag_or_the_pod_role() {
        let none = std::collections::BTreeMap::new();
        assert_eq!(mode_of(&none, None, None), Mode::Vm);
        assert_eq!(mode_of(&none, None, Some(Mode::Ns)), Mode::Ns);
        assert_eq!(mode_of(&none, Some(Mode::Vm), Some(Mode::Ns)), Mode::Vm);
        for key in SANDBOX_MARKS {
            let mut a = std::collections::BTreeMap::new();
            a.insert(key.to_string(), "sandbox".to_string());
            assert_eq!(mode_of(&a, None, None), Mode::Ns);
            assert_eq!(mode_of(&a, None, Some(Mode::Vm)), Mode::Ns);
            assert_eq!(mode_of(&a, Some(Mode::Vm), None), Mode::Vm);
            a.insert(key.to_string(), "container".to_string());
            assert_eq!(mode_of(&a, None, None), Mode::Vm);
        }
    }
}
