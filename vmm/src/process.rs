//! The VMM in a process of its own, confined before its guest runs.
//!
//! The host side ([`VmmProcess::spawn`]) clones a child into new mount, PID,
//! IPC, UTS and network namespaces (and a user namespace when rootless),
//! which execs the VMM entry point (vmc's `__vmm`, calling [`serve`]). The
//! child receives its [`Launch`] on a control socket, with the network
//! backend's descriptor; builds the VM (every file and device opened now,
//! while it still sees the host); enters its jail ([`crate::jail`]);
//! installs the per-thread seccomp filters ([`crate::seccomp`]); and only
//! then lets the vCPUs run. Afterwards it opens nothing: a snapshot is
//! written into files the host opened and passed with the request.
//!
//! The control socket is a SOCK_SEQPACKET pair (one postcard message per
//! packet, descriptors as SCM_RIGHTS); the child ends when its VM ends (its
//! last message is `Exited`) or when the host's end closes. A seccomp
//! violation is reported on a pipe of its own as `NR THREAD` before the
//! process dies of SIGSYS.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::exit::VmExit;
use crate::jail::JailSpec;
use crate::snapshot::{self, SnapshotError};
use crate::{progress, seccomp, DeviceConfig, DiskConfig, VmConfig, VmmError};

/// The control socket's descriptor in the child.
pub const CTL_FD: RawFd = 3;
/// The violation report pipe's descriptor in the child.
pub const REPORT_FD: RawFd = 4;
/// Where the child keeps [`Command::hold`].
pub const HOLD_FD: RawFd = 5;
/// The largest control message (a Launch is a few KiB).
const MAX_MSG: usize = 256 << 10;

/// A device as the child builds it (descriptors travel beside the message).
#[derive(Debug, Serialize, Deserialize)]
pub enum DeviceSpec {
    Block(DiskConfig),
    Vsock {
        cid: u64,
        uds: PathBuf,
    },
    Rng,
    /// The backend is the next passed descriptor.
    Net {
        mac: [u8; 6],
    },
    /// With `backend`, the file server's socket is the next passed
    /// descriptor.
    Fs {
        backend: bool,
    },
}

/// Everything the child needs to build and confine its VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    pub vcpus: u8,
    pub mem_size: u64,
    pub kernel: PathBuf,
    pub cmdline: Vec<String>,
    pub devices: Vec<DeviceSpec>,
    /// The kernel console on the child's stderr.
    pub console: bool,
    pub guest_profile: Option<PathBuf>,
    /// Restore this snapshot directory (with its key) instead of booting.
    pub restore: Option<(PathBuf, String)>,
    pub jail: Option<JailSpec>,
    pub seccomp: Option<seccomp::Mode>,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToVmm {
    Launch(Box<Launch>),
    Stop,
    /// Snapshot into the two passed files (state.bin, memory.img): once the
    /// guest is quiescent, or (`as_is`) paused as it is.
    Snapshot {
        key: String,
        as_is: bool,
    },
    /// The VMM's own threads' `stat` and `schedstat` (passed, in order;
    /// `true` where a thread has a schedstat): the jail has no /proc.
    Threads {
        vcpus: Vec<bool>,
        others: Vec<bool>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum FromVmm {
    /// The vCPUs run; guest RAM is mapped at these host addresses.
    Launched {
        guest_starts: Vec<u64>,
    },
    Failed {
        snapshot: bool,
        message: String,
    },
    Done(Result<(), String>),
    Exited(VmExit),
}

fn send<T: Serialize>(sock: RawFd, msg: &T, fds: &[RawFd]) -> std::io::Result<()> {
    let data = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr, then pointed at iov and (when fds are sent) a
    // control buffer sized by CMSG_SPACE for them; all outlive sendmsg.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        let space = libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        if !fds.is_empty() {
            hdr.msg_control = cbuf.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        if libc::sendmsg(sock, &hdr, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The most descriptors one control message carries (two per VMM thread).
const MAX_FDS: usize = 160;

/// Receives one message and up to MAX_FDS descriptors; None at the end of the
/// stream. A message that does not decode is an error (never a panic).
fn recv<T: for<'a> Deserialize<'a>>(sock: RawFd) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut data = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE for MAX_FDS descriptors.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr pointed at live buffers; the received
    // descriptors are taken into OwnedFds at once.
    let (n, fds, truncated) = unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cbuf.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        let n = loop {
            let n = libc::recvmsg(sock, &mut hdr, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
        (
            n,
            fds,
            hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
        )
    };
    if n == 0 {
        return Ok(None);
    }
    if truncated {
        return Err(std::io::Error::other("a control message was truncated"));
    }
    let msg = postcard::from_bytes(&data[..n])
        .map_err(|e| std::io::Error::other(format!("a control message does not decode: {e}")))?;
    Ok(Some((msg, fds)))
}

/// The longest text the host takes from a VMM process (an error, a crash's
/// reason): a compromised VMM's words reach the user's terminal.
const MAX_TEXT: usize = 1024;

/// `text` from a VMM process (or a guest) as the host shows it: at most
/// [`MAX_TEXT`] bytes, control characters (terminal escapes) replaced.
pub fn sanitize(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if out.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// A message from a VMM process with its texts made safe to show.
fn sanitized(m: FromVmm) -> FromVmm {
    let exit = |e: VmExit| match e {
        VmExit::Crashed(t) => VmExit::Crashed(sanitize(&t)),
        VmExit::Seccomp(t) => VmExit::Seccomp(sanitize(&t)),
        other => other,
    };
    match m {
        FromVmm::Failed { snapshot, message } => FromVmm::Failed {
            snapshot,
            message: sanitize(&message),
        },
        FromVmm::Done(Err(e)) => FromVmm::Done(Err(sanitize(&e))),
        FromVmm::Exited(e) => FromVmm::Exited(exit(e)),
        other => other,
    }
}

/// The fuzz target's entry (`vmm_control`): what the host makes of one
/// control message from a (compromised) VMM process.
pub fn fuzz_from_vmm(data: &[u8]) {
    if data.len() <= MAX_MSG {
        if let Ok(m) = postcard::from_bytes::<FromVmm>(data) {
            let m = sanitized(m);
            let text = format!("{m:?}");
            assert!(!text.contains('\u{1b}'));
        }
    }
}

/// Asks the VMM process behind `ctl` to stop its VM.
pub(crate) fn send_stop(ctl: &OwnedFd) {
    let _ = send(ctl.as_raw_fd(), &ToVmm::Stop, &[]);
}

/// Waits until `fd` is readable or `timeout` passes (true: readable or
/// closed).
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    n > 0
}

impl Launch {
    /// The launch of `cfg`'s VM (restored from `restore` when given), with
    /// the descriptors that travel with it.
    pub fn of(
        cfg: VmConfig,
        restore: Option<(PathBuf, String)>,
        jail: Option<JailSpec>,
        seccomp: Option<seccomp::Mode>,
    ) -> Result<(Launch, Vec<OwnedFd>), VmmError> {
        if cfg.initrd.is_some() {
            return Err(VmmError::Setup(
                "an initrd is not passed to a VMM process".into(),
            ));
        }
        let mut fds = Vec::new();
        let devices = cfg
            .devices
            .into_iter()
            .map(|d| match d {
                DeviceConfig::Block(b) => DeviceSpec::Block(b),
                DeviceConfig::Vsock { cid, uds } => DeviceSpec::Vsock { cid, uds },
                DeviceConfig::Rng => DeviceSpec::Rng,
                DeviceConfig::Net { mac, backend } => {
                    fds.push(OwnedFd::from(backend));
                    DeviceSpec::Net { mac }
                }
                DeviceConfig::Fs { backend } => {
                    let some = backend.is_some();
                    fds.extend(backend);
                    DeviceSpec::Fs { backend: some }
                }
            })
            .collect();
        Ok((
            Launch {
                vcpus: cfg.vcpus,
                mem_size: cfg.mem_size,
                kernel: cfg.kernel,
                cmdline: cfg.cmdline,
                devices,
                console: cfg.console.is_some(),
                guest_profile: cfg.guest_profile,
                restore,
                jail,
                seccomp,
            },
            fds,
        ))
    }
}

/// How the child process is started.
pub struct Command {
    /// The executable and its arguments (argv[0] first); it calls [`serve`].
    pub argv: Vec<String>,
    pub exe: PathBuf,
    /// Rootless: a user namespace mapping the invoking user to its root.
    pub user_namespace: bool,
    /// A descriptor the child keeps open for its whole life (at
    /// [`HOLD_FD`]): a lock it holds as long as the host does.
    pub hold: Option<RawFd>,
}

/// The host's handle on a VMM process.
pub struct VmmProcess {
    pid: libc::pid_t,
    ctl: Arc<OwnedFd>,
    report: Mutex<File>,
    /// Serialises requests (one answer per request).
    talk: Mutex<()>,
    exit: Mutex<Option<VmExit>>,
    reaped: Mutex<bool>,
    threads: progress::Threads,
    guest_starts: Vec<u64>,
}

fn cstring(s: impl AsRef<std::ffi::OsStr>) -> Result<std::ffi::CString, VmmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(s.as_ref().as_bytes())
        .map_err(|_| VmmError::Setup("a NUL byte in the VMM's command".into()))
}

impl VmmProcess {
    /// Starts the child: it execs the VMM entry point, joins the cgroups
    /// whose `cgroup.procs` files follow the entry point's arguments (on a
    /// thread of its own, while it waits for its launch: a first cgroup
    /// migration costs a RCU grace period on cgroup v1) and waits for
    /// [`Self::launch`].
    pub fn start(cmd: &Command) -> Result<VmmProcess, VmmError> {
        let io = |e: std::io::Error| VmmError::Setup(format!("starting the VMM process: {e}"));
        let (ours, theirs) = crate::jail::seqpacket_pair().map_err(io)?;
        let (report_r, report_w) = {
            let mut p = [0; 2];
            // SAFETY: p has room for two descriptors.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            // SAFETY: both were just created.
            unsafe { (File::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
        };
        // Everything the child uses between clone and exec is made now: it
        // may only make async-signal-safe calls there.
        let exe = cstring(&cmd.exe)?;
        let argv: Vec<_> = cmd.argv.iter().map(cstring).collect::<Result<_, _>>()?;
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let env: Vec<_> = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                cstring(kv)
            })
            .collect::<Result<_, _>>()?;
        let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        env_p.push(std::ptr::null());
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let uid_map = format!("0 {uid} 1");
        let gid_map = format!("0 {gid} 1");
        let mut flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET;
        if cmd.user_namespace {
            flags |= libc::CLONE_NEWUSER;
        }
        let (ctl_raw, report_raw) = (theirs.as_raw_fd(), report_w.as_raw_fd());
        // SAFETY: clone without CLONE_VM behaves as fork; the child below
        // makes only async-signal-safe calls on memory prepared above, then
        // execs or exits.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags as libc::c_ulong | libc::SIGCHLD as libc::c_ulong,
                0,
                0,
                0,
                0,
            )
        };
        if pid < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: in the child: raw syscalls only.
            unsafe {
                child_exec(ChildExec {
                    ctl: ctl_raw,
                    report: report_raw,
                    exe: exe.as_ptr(),
                    argv: argv_p.as_ptr(),
                    env: env_p.as_ptr(),
                    maps: cmd
                        .user_namespace
                        .then_some((uid_map.as_bytes(), gid_map.as_bytes())),
                    hold: cmd.hold,
                })
            }
        }
        let pid = pid as libc::pid_t;
        drop(theirs);
        drop(report_w);
        Ok(VmmProcess {
            pid,
            ctl: Arc::new(ours),
            report: Mutex::new(report_r),
            talk: Mutex::new(()),
            exit: Mutex::new(None),
            reaped: Mutex::new(false),
            threads: progress::Threads::new(pid as u32, Vec::new(), Vec::new()),
            guest_starts: Vec::new(),
        })
    }

    /// Sends the child its `launch` (with `fds`) and waits until its vCPUs
    /// run, or it fails.
    pub fn launch(&mut self, launch: Launch, fds: Vec<OwnedFd>) -> Result<(), VmmError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if let Err(e) = send(self.ctl.as_raw_fd(), &ToVmm::Launch(Box::new(launch)), &raw) {
            return Err(self.failed(format!("sending the VM's launch: {e}")));
        }
        drop(fds);
        match self.next() {
            Some(FromVmm::Launched { guest_starts }) => {
                self.guest_starts = guest_starts;
                self.watch_threads();
                Ok(())
            }
            Some(FromVmm::Failed { snapshot, message }) => {
                self.reap();
                Err(if snapshot {
                    VmmError::Snapshot(SnapshotError::Invalid(message))
                } else {
                    VmmError::Setup(message)
                })
            }
            _ => Err(self.failed("the VMM process ended before its VM ran".into())),
        }
    }

    /// Opens the VMM's threads' `stat` and `schedstat` once: this side
    /// samples them from then on, and the VMM gets its own handles on them
    /// (for its own waits on the guest: its jail has no /proc).
    fn watch_threads(&mut self) {
        let named = progress::Threads::of_process(self.pid as u32);
        let open = |tids: &[i32]| -> Vec<progress::ThreadFiles> {
            tids.iter()
                .filter_map(|&t| progress::ThreadFiles::open(self.pid as u32, t).ok())
                .collect()
        };
        let (vcpus, others) = (open(named.ids().0), open(named.ids().1));
        let clones = |files: &[progress::ThreadFiles]| -> Vec<progress::ThreadFiles> {
            files.iter().filter_map(|f| f.try_clone().ok()).collect()
        };
        self.threads = progress::Threads::from_files(clones(&vcpus), clones(&others));
        let mut fds = Vec::new();
        let mut pass = |files: Vec<progress::ThreadFiles>| -> Vec<bool> {
            files
                .into_iter()
                .map(|f| {
                    let has = f.schedstat.is_some();
                    fds.push(OwnedFd::from(f.stat));
                    fds.extend(f.schedstat.map(OwnedFd::from));
                    has
                })
                .collect()
        };
        let (vcpus, others) = (pass(vcpus), pass(others));
        if fds.len() <= MAX_FDS {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let _ = send(
                self.ctl.as_raw_fd(),
                &ToVmm::Threads { vcpus, others },
                &raw,
            );
        }
    }

    /// Reaps a child that failed to launch (`reap` kills it first).
    fn failed(&self, what: String) -> VmmError {
        match self.reap() {
            VmExit::Seccomp(m) => VmmError::Seccomp(m),
            VmExit::Crashed(m) => VmmError::Setup(format!("{what}: {m}")),
            _ => VmmError::Setup(what),
        }
    }

    /// The next message from the child (None: it closed its end); an
    /// `Exited` is kept.
    fn next(&self) -> Option<FromVmm> {
        match recv::<FromVmm>(self.ctl.as_raw_fd()).map(|r| r.map(|(m, f)| (sanitized(m), f))) {
            Ok(Some((FromVmm::Exited(e), _))) => {
                *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Some(FromVmm::Exited(e))
            }
            Ok(Some((m, _))) => Some(m),
            Ok(None) => None,
            Err(e) => {
                log::debug!("VMM process {}: {e}", self.pid);
                self.kill();
                None
            }
        }
    }

    /// The VMM process's pid (in vmc's PID namespace).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn kill(&self) {
        if !*self.reaped.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Reaps the child and says how the VM ended.
    fn reap(&self) -> VmExit {
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        let mut status = 0;
        if !*reaped {
            // Its VM is over (or it went silent): a VMM that lingers (one
            // that closed its socket but runs on, or blocks writing its
            // report) must not hold the host here.
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            loop {
                // SAFETY: status is a valid out-pointer; pid is our child.
                let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
                if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            *reaped = true;
        }
        if let Some(e) = self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return e;
        }
        let mut report = String::new();
        let _ = (&mut *self.report.lock().unwrap_or_else(|e| e.into_inner()))
            .take(4096)
            .read_to_string(&mut report);
        let e = match seccomp::parse_report(&report) {
            Some((nr, thread)) => VmExit::Seccomp(format!(
                "the VMM was stopped by its seccomp filter: syscall {nr} ({}) in thread {}",
                syscall_name(nr),
                sanitize(&thread)
            )),
            None if libc::WIFSIGNALED(status) => VmExit::Crashed(format!(
                "the VMM process was killed by signal {}",
                libc::WTERMSIG(status)
            )),
            None => VmExit::Crashed(format!(
                "the VMM process exited ({}) without saying why",
                libc::WEXITSTATUS(status)
            )),
        };
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
        e
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        if *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) {
            return false;
        }
        // SAFETY: a zeroed siginfo filled by waitid; WNOWAIT leaves the
        // child to be reaped by `reap`.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() == 0
        }
    }

    /// What the VM's threads have done so far.
    pub fn activity(&self) -> progress::Activity {
        self.threads.sample()
    }

    /// The verdict of `dog` on the VM now: ended, working or hung.
    pub fn judge(&self, dog: &mut progress::Watchdog) -> progress::Verdict {
        dog.judge(self.is_running(), || self.activity())
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        send_stop(&self.ctl);
    }

    /// A handle that stops the VM from another thread.
    pub fn stopper(&self) -> crate::Stopper {
        crate::Stopper::process(self.ctl.clone())
    }

    /// Waits up to `timeout` for the VM to end by itself, then stops it.
    pub fn wait_or_stop(self, timeout: Duration) -> VmExit {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stop();
                break;
            }
            if readable(self.ctl.as_raw_fd(), left.min(Duration::from_millis(50))) {
                match self.next() {
                    Some(FromVmm::Exited(_)) | None => break,
                    Some(_) => {}
                }
            }
        }
        self.wait()
    }

    /// Waits for the VM to end.
    pub fn wait(self) -> VmExit {
        while self
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            match self.next() {
                Some(FromVmm::Exited(_)) | None => break,
                Some(_) => {}
            }
        }
        self.reap()
    }

    /// Sends `req` (with `fds`) and returns the answer.
    fn request(&self, req: &ToVmm, fds: &[RawFd]) -> Result<FromVmm, String> {
        let _talk = self.talk.lock().unwrap_or_else(|e| e.into_inner());
        send(self.ctl.as_raw_fd(), req, fds).map_err(|e| format!("the VMM process: {e}"))?;
        match self.next() {
            Some(FromVmm::Exited(_)) | None => Err("the VM stopped".into()),
            Some(m) => Ok(m),
        }
    }

    /// Snapshots the quiescent guest (see `RunningVm::snapshot`) into
    /// `state.bin` and `memory.img` of `dir`, which this process creates.
    pub fn snapshot(&self, dir: &std::path::Path, key: &str) -> Result<(), SnapshotError> {
        self.snapshot_as(dir, key, false)
    }

    /// Pauses the guest as it is and saves it into `dir` (see
    /// `RunningVm::save`); the VM stays paused.
    pub fn save_as_is(&self, dir: &std::path::Path, key: &str) -> Result<(), SnapshotError> {
        self.snapshot_as(dir, key, true)
    }

    fn snapshot_as(
        &self,
        dir: &std::path::Path,
        key: &str,
        as_is: bool,
    ) -> Result<(), SnapshotError> {
        let files = snapshot::Files::create(dir)?;
        let req = ToVmm::Snapshot {
            key: key.into(),
            as_is,
        };
        match self.request(&req, &[files.state.as_raw_fd(), files.memory.as_raw_fd()]) {
            Ok(FromVmm::Done(Ok(()))) => Ok(()),
            Ok(FromVmm::Done(Err(e))) | Err(e) => Err(SnapshotError::Pause(e)),
            Ok(other) => Err(SnapshotError::Pause(format!("unexpected answer {other:?}"))),
        }
    }

    /// Resident KiB of guest RAM, and the part of it only this VM holds
    /// (pages it wrote).
    pub fn guest_memory_kib(&self) -> (u64, u64) {
        let smaps = format!("/proc/{}/smaps", self.pid);
        let kib = |field| crate::memory::smaps_kib_of(&smaps, &self.guest_starts, field);
        (kib("Rss"), kib("Private_Dirty"))
    }

    /// The VMM process's peak resident memory (KiB).
    pub fn peak_rss_kib(&self) -> u64 {
        crate::memory::peak_rss_kib_of(&format!("/proc/{}/status", self.pid))
    }
}

/// A VMM process let go without a wait is killed and reaped (its VM is
/// discarded: nothing it holds needs an orderly end).
impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.reap();
    }
}

/// A syscall's name on this architecture.
fn syscall_name(nr: i64) -> String {
    syscalls::Sysno::new(nr as usize)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "unknown".into())
}

struct ChildExec<'a> {
    ctl: RawFd,
    report: RawFd,
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    maps: Option<(&'a [u8], &'a [u8])>,
    hold: Option<RawFd>,
}

/// The clone child up to exec: its user namespace's maps (rootless), the
/// control socket and report pipe at fds 3 and 4, stdin and stdout on
/// /dev/null, every other descriptor closed.
///
/// # Safety
/// Only in the child of a fork-like clone; makes raw syscalls alone.
unsafe fn child_exec(c: ChildExec<'_>) -> ! {
    // SAFETY: raw syscalls on valid pointers prepared by the parent.
    unsafe {
        if let Some((uid_map, gid_map)) = c.maps {
            let write_file = |path: &std::ffi::CStr, data: &[u8]| {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                let ok = fd >= 0
                    && libc::write(fd, data.as_ptr().cast(), data.len()) == data.len() as isize;
                libc::close(fd);
                ok
            };
            if !write_file(c"/proc/self/setgroups", b"deny")
                || !write_file(c"/proc/self/uid_map", uid_map)
                || !write_file(c"/proc/self/gid_map", gid_map)
            {
                libc::_exit(126);
            }
        }
        // Both moved above the targets first (one may sit on the other's
        // target), then into place without close-on-exec.
        let ctl = libc::fcntl(c.ctl, libc::F_DUPFD, 10);
        let report = libc::fcntl(c.report, libc::F_DUPFD, 10);
        if ctl < 0 || report < 0 || libc::dup2(ctl, CTL_FD) < 0 || libc::dup2(report, REPORT_FD) < 0
        {
            libc::_exit(126);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
        }
        let first_closed = if c.hold.is_some() {
            HOLD_FD + 1
        } else {
            REPORT_FD + 1
        };
        libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0);
        libc::execve(c.exe, c.argv, c.env);
        libc::_exit(127);
    }
}

/// The VMM process's side: called by the entry point the host execs, with
/// the control socket on [`CTL_FD`] and the report pipe on [`REPORT_FD`].
/// Returns the process's exit code.
pub fn serve() -> i32 {
    // SAFETY: the parent placed these descriptors here for this process.
    let ctl = unsafe { OwnedFd::from_raw_fd(CTL_FD) };
    // SAFETY: PR_SET_NAME with a NUL-terminated name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"vmm".as_ptr(), 0, 0, 0) };
    let fail = |snapshot: bool, message: String| {
        let _ = send(ctl.as_raw_fd(), &FromVmm::Failed { snapshot, message }, &[]);
        1
    };
    // The cgroups to join (their cgroup.procs files follow the entry
    // point's name), joined while the launch is awaited and the VM built.
    let procs: Vec<String> = std::env::args().skip(2).collect();
    let joining = std::thread::Builder::new()
        .name("vmm-cgroups".into())
        .spawn(move || -> Result<(), String> {
            for p in procs {
                std::fs::write(&p, "0").map_err(|e| format!("joining the cgroup {p}: {e}"))?;
            }
            Ok(())
        });
    let joining = match joining {
        Ok(j) => std::sync::Mutex::new(Some(j)),
        Err(e) => return fail(false, format!("joining the VMM's cgroups: {e}")),
    };
    let (launch, mut fds) = match recv::<ToVmm>(ctl.as_raw_fd()) {
        Ok(Some((ToVmm::Launch(l), fds))) => (l, fds),
        Ok(_) => return fail(false, "no launch message".into()),
        Err(e) => return fail(false, e.to_string()),
    };
    let mut net = fds.drain(..);
    let mut cfg = VmConfig::new(&launch.kernel, launch.vcpus, launch.mem_size);
    cfg.cmdline = launch.cmdline;
    for d in launch.devices {
        cfg.devices.push(match d {
            DeviceSpec::Block(b) => DeviceConfig::Block(b),
            DeviceSpec::Vsock { cid, uds } => DeviceConfig::Vsock { cid, uds },
            DeviceSpec::Rng => DeviceConfig::Rng,
            DeviceSpec::Net { mac } => match net.next() {
                Some(fd) => DeviceConfig::Net {
                    mac,
                    backend: std::os::unix::net::UnixStream::from(fd),
                },
                None => return fail(false, "no descriptor for the network device".into()),
            },
            DeviceSpec::Fs { backend: false } => DeviceConfig::Fs { backend: None },
            DeviceSpec::Fs { backend: true } => match net.next() {
                Some(fd) => DeviceConfig::Fs { backend: Some(fd) },
                None => return fail(false, "no descriptor for the virtio-fs device".into()),
            },
        });
    }
    if launch.console {
        cfg.console = Some(Box::new(std::io::stderr()));
    }
    cfg.guest_profile = launch.guest_profile;
    let filters = match launch.seccomp.map(seccomp::Filters::new).transpose() {
        Ok(f) => f,
        Err(e) => return fail(false, e),
    };
    let joined = move || -> Result<(), String> {
        match joining.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(j) => j.join().map_err(|_| "the cgroup join failed".to_string())?,
            None => Ok(()),
        }
    };
    cfg.confinement = Some(Arc::new(crate::Confinement {
        jail: launch.jail,
        filters,
        report_fd: REPORT_FD,
        before: Box::new(joined),
    }));
    let vm = match &launch.restore {
        Some((dir, key)) => crate::restore(cfg, dir, key),
        None => crate::start(cfg),
    };
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(VmmError::Snapshot(e)) => return fail(true, e.to_string()),
        Err(e) => return fail(false, e.to_string()),
    };
    seccomp::probe(seccomp::ThreadKind::Main);
    let launched = FromVmm::Launched {
        guest_starts: vm.guest_starts(),
    };
    if send(ctl.as_raw_fd(), &launched, &[]).is_err() {
        vm.stop();
        vm.wait();
        return 1;
    }
    let exit_fd = vm.exit_fd();
    loop {
        let mut p = [
            libc::pollfd {
                fd: ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: exit_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if p[1].revents != 0 {
            break;
        }
        if p[0].revents == 0 {
            continue;
        }
        let (req, fds) = match recv::<ToVmm>(ctl.as_raw_fd()) {
            Ok(Some(r)) => r,
            // The host is gone (or talks nonsense): the VM ends with it.
            _ => {
                vm.stop();
                break;
            }
        };
        let answer = match req {
            ToVmm::Stop => {
                vm.stop();
                continue;
            }
            ToVmm::Snapshot { key, as_is } => {
                let mut fds = fds.into_iter().map(File::from);
                let (Some(state), Some(memory)) = (fds.next(), fds.next()) else {
                    let _ = send(ctl.as_raw_fd(), &FromVmm::Done(Err("no files".into())), &[]);
                    continue;
                };
                let files = snapshot::Files { state, memory };
                let r = if as_is {
                    vm.pause().and_then(|v| vm.save_into(files, &key, v))
                } else {
                    vm.snapshot_into(files, &key)
                };
                FromVmm::Done(r.map_err(|e| e.to_string()))
            }
            ToVmm::Threads { vcpus, others } => {
                let mut fds = fds.into_iter().map(File::from);
                let mut take = |has: Vec<bool>| -> Vec<progress::ThreadFiles> {
                    has.into_iter()
                        .filter_map(|has| {
                            Some(progress::ThreadFiles {
                                stat: fds.next()?,
                                schedstat: if has { fds.next() } else { None },
                            })
                        })
                        .collect()
                };
                let (v, o) = (take(vcpus), take(others));
                vm.set_threads(progress::Threads::from_files(v, o));
                continue;
            }
            ToVmm::Launch(_) => FromVmm::Done(Err("already launched".into())),
        };
        if send(ctl.as_raw_fd(), &answer, &[]).is_err() {
            vm.stop();
            break;
        }
    }
    let exit = vm.wait();
    let _ = send(ctl.as_raw_fd(), &FromVmm::Exited(exit), &[]);
    // Not through `ctl`'s drop: the exit ends it.
    let _ = ctl.into_raw_fd();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmms_texts_are_bounded_and_lose_their_escapes() {
        assert_eq!(sanitize("\u{1b}[31mred\u{7}\n"), "?[31mred??");
        let long = sanitize(&"é".repeat(2000));
        assert!(long.len() <= MAX_TEXT + 3 && long.ends_with("..."));
        let m = sanitized(FromVmm::Exited(VmExit::Crashed(
            "\u{1b}]0;owned\u{7}".into(),
        )));
        assert!(matches!(m, FromVmm::Exited(VmExit::Crashed(t)) if t == "?]0;owned?"));
    }

    /// The fuzz seeds (fuzz/corpus/vmm_control) are today's messages.
    #[test]
    fn the_control_seeds_decode_as_the_protocol_stands() {
        // The run-time value: a test binary reused from a clone elsewhere
        // (a shared target directory) still reads this checkout's seeds.
        let root = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        let dir = std::path::Path::new(&root).join("../fuzz/corpus/vmm_control");
        let mut n = 0;
        for f in std::fs::read_dir(dir).unwrap().flatten() {
            let data = std::fs::read(f.path()).unwrap();
            postcard::from_bytes::<FromVmm>(&data)
                .unwrap_or_else(|e| panic!("{}: {e}", f.path().display()));
            fuzz_from_vmm(&data);
            n += 1;
        }
        assert!(n >= 5);
        let launched = postcard::to_stdvec(&FromVmm::Launched {
            guest_starts: vec![1 << 35],
        })
        .unwrap();
        assert!(matches!(
            postcard::from_bytes::<FromVmm>(&launched).unwrap(),
            FromVmm::Launched { guest_starts } if guest_starts == [1 << 35]
        ));
    }
}
