//! vmc as an OCI runtime (`vmc-runtime`, runc's command line), checked
//! against the runtime spec's lifecycle as its text states it: `create`
//! leaves the process existing and waiting (status `created`, its pid in
//! `state` and `--pid-file`, the user's program not yet run); `start` runs
//! it (`running`); the caller, a child subreaper as conmon and containerd's
//! shim are, waits for that pid and gets the program's exit status; then
//! `stopped`, and `delete` removes the state. Errors: start twice, delete
//! of a running container without --force, unknown ids, bad ids, bundles
//! asking for what vmc does not do. Namespace mode (annotation
//! io.vmc.mode=ns); stdio and --preserve-fds pass through.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::is_root;

/// A bundle: busybox's root in `rootfs`, and a config.json in runc's
/// default shape (as `runc spec` writes it, with podman's binds).
struct Bundle {
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    runtime: PathBuf,
}

fn config(args: &[&str], extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "oci-box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/etc/motd", "type": "bind", "source": "motd",
             "options": ["bind", "rprivate", "ro"]}
        ],
        "annotations": {"io.vmc.mode": "ns", "org.example.note": "kept"},
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/acpi"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

impl Bundle {
    fn new(args: &[&str]) -> Bundle {
        Self::with(config(args, serde_json::json!({})))
    }

    fn with(cfg: serde_json::Value) -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-xf")
            .arg(common::busybox_tar(&dir.path().join("busybox.tar")))
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(dir.path().join("motd"), "from the host\n").unwrap();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        // The runtime is vmc called by another name.
        let runtime = dir.path().join("vmc-runtime");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmc"), &runtime).unwrap();
        Bundle {
            dir,
            state: tempfile::tempdir().unwrap(),
            runtime,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.runtime);
        c.arg("--root").arg(self.state.path()).args(args);
        // A microVM's agent disk is cached in the bundle's directory; the
        // warm-start snapshots are the tests' shared ones.
        c.env("VMC_HOME", self.path().join("home"))
            .env("VMC_SNAPSHOTS", common::snapshots());
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        common::ok(&self.run(args))
    }

    fn fails(&self, args: &[&str], says: &str) {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    fn state(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// `create` with stdout and stderr into `out` (as conmon gives its
    /// pipes) and the pid file in the bundle.
    fn create(&self, id: &str, out: &Path) -> i32 {
        let f = std::fs::File::create(out).unwrap();
        let pid_file = self.path().join(format!("{id}.pid"));
        let o = self
            .cmd(&["create", "--bundle"])
            .arg(self.path())
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "create: {}",
            std::fs::read_to_string(out).unwrap()
        );
        std::fs::read_to_string(pid_file).unwrap().parse().unwrap()
    }

    /// `create ID` with a console socket (as conmon listens on one): the
    /// container's pid and the terminal's master the runtime sent there.
    fn create_with_console(&self, id: &str) -> (i32, std::os::fd::OwnedFd) {
        let sock = self.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let receiver = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            vmc_spawn::sys::recv_fd(&s).unwrap()
        });
        let pid_file = self.path().join(format!("{id}.pid"));
        let o = self
            .cmd(&["create", "--console-socket"])
            .arg(&sock)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--bundle")
            .arg(self.path())
            .arg(id)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let master = receiver.join().unwrap();
        let pid = std::fs::read_to_string(pid_file).unwrap().parse().unwrap();
        (pid, master)
    }
}

/// This test process adopts orphans, as conmon and the shim do, so that
/// it can wait for the container's process.
fn become_subreaper() {
    // SAFETY: prctl with plain integers.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
}

/// Waits for `pid` (a child of this process by adoption); its raw status.
fn wait_for(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    status
}

#[test]
fn lifecycle_follows_the_runtime_spec() {
    if !is_root() {
        return;
    }
    become_subreaper();
    let script = "touch /ran; echo out; echo err >&2; hostname; cat /etc/motd; \
                  grep -c . /proc/self/mounts >/dev/null && id -G; \
                  grep -E 'CapBnd|CapEff' /proc/self/status; ulimit -n; echo $$; \
                  { echo x > /etc/motd; } 2>/dev/null || echo motd is read-only; exit 3";
    let b = Bundle::new(&["sh", "-c", script]);
    let out = b.path().join("out");
    let pid = b.create("c1", &out);
    // created: the process exists, the program has not run.
    let s = b.state("c1");
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["id"], "c1");
    assert_eq!(s["pid"], pid);
    assert_eq!(
        s["ociVersion"].as_str().map(|v| v.starts_with("1.")),
        Some(true)
    );
    assert_eq!(Path::new(s["bundle"].as_str().unwrap()), b.path());
    assert_eq!(s["annotations"]["org.example.note"], "kept");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(!b.path().join("rootfs/ran").exists(), "ran before start");
    b.fails(
        &["create", "--bundle", b.path().to_str().unwrap(), "c1"],
        "already exists",
    );
    // start: the program runs; the caller gets its exit status.
    b.ok(&["start", "c1"]);
    let status = wait_for(pid);
    assert!(libc::WIFEXITED(status), "{status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 3);
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        "out\nerr\noci-box\nfrom the host\n0 10\nCapEff:\t0000000000000421\nCapBnd:\t0000000000000421\n512\n1\nmotd is read-only\n"
    );
    assert!(b.path().join("rootfs/ran").exists());
    assert_eq!(b.state("c1")["status"], "stopped");
    b.fails(
        &["start", "c1"],
        "cannot start a container that has stopped",
    );
    b.ok(&["delete", "c1"]);
    b.fails(&["state", "c1"], "does not exist");
    assert!(!b.state.path().join("c1").exists());
    // The bundle's root holds what the container wrote, and nothing else
    // of vmc's.
    assert!(!b.path().join("rootfs/start.sock").exists());
}

#[test]
fn running_containers_are_signalled_paused_and_deleted_by_force() {
    if !is_root() {
        return;
    }
    become_subreaper();
    let b = Bundle::new(&["sleep", "1000"]);
    let out = b.path().join("out");
    let pid = b.create("s1", &out);
    b.ok(&["start", "s1"]);
    assert_eq!(b.state("s1")["status"], "running");
    b.fails(
        &["start", "s1"],
        "cannot start an already running container",
    );
    b.fails(&["delete", "s1"], "is not stopped: running");
    let ps: Vec<i32> = serde_json::from_str(&b.ok(&["ps", "--format", "json", "s1"])).unwrap();
    assert_eq!(ps, [pid]);
    b.ok(&["pause", "s1"]);
    assert_eq!(b.state("s1")["status"], "paused");
    b.ok(&["resume", "s1"]);
    assert_eq!(b.state("s1")["status"], "running");
    // PID 1 without a handler: TERM does nothing, KILL ends it.
    b.ok(&["kill", "s1", "TERM"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(b.state("s1")["status"], "running");
    b.ok(&["kill", "s1", "KILL"]);
    let status = wait_for(pid);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    assert_eq!(b.state("s1")["status"], "stopped");
    b.fails(&["kill", "s1", "KILL"], "is not running");
    b.ok(&["delete", "s1"]);

    // delete --force of a running one; delete of a created one.
    let pid = b.create("s2", &out);
    b.ok(&["start", "s2"]);
    b.ok(&["delete", "--force", "s2"]);
    wait_for(pid);
    let pid = b.create("s3", &out);
    b.ok(&["delete", "s3"]);
    wait_for(pid);
    assert!(std::fs::read_dir(b.state.path()).unwrap().next().is_none());
    b.ok(&["delete", "--force", "s3"]);
}

#[test]
fn preserved_descriptors_reach_the_process_and_no_others() {
    if !is_root() {
        return;
    }
    become_subreaper();
    // The shell's descriptors (ls not exec'd in its place: exit follows).
    let script = "echo through-3 >&3; ls /proc/$$/fd; exit 0";
    let b = Bundle::new(&["sh", "-c", script]);
    let out = b.path().join("out");
    let (r, w) = vmc_spawn::sys::pipe().unwrap();
    let extra = std::fs::File::open("/dev/null").unwrap();
    let pid_file = b.path().join("p.pid");
    let f = std::fs::File::create(&out).unwrap();
    let mut c = b.cmd(&["create", "--preserve-fds", "1", "--pid-file"]);
    c.arg(&pid_file).arg("--bundle").arg(b.path()).arg("p1");
    c.stdout(f.try_clone().unwrap()).stderr(f);
    let (w_fd, extra_fd) = (
        std::os::fd::AsRawFd::as_raw_fd(&w),
        std::os::fd::AsRawFd::as_raw_fd(&extra),
    );
    // SAFETY: dup2 in the child before exec: fd 3 is the pipe, fd 4 a
    // descriptor not passed on.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(w_fd, 3) < 0 || libc::dup2(extra_fd, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{}",
        std::fs::read_to_string(&out).unwrap()
    );
    drop(w);
    let pid: i32 = std::fs::read_to_string(pid_file).unwrap().parse().unwrap();
    b.ok(&["start", "p1"]);
    let mut through = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut through).unwrap();
    assert_eq!(through, "through-3\n");
    wait_for(pid);
    let fds: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // The shell's: stdio and 3.
    assert_eq!(fds, ["0", "1", "2", "3"]);
    b.ok(&["delete", "p1"]);
}

#[test]
fn bad_ids_unknown_containers_and_unsupported_bundles_are_refused() {
    if !is_root() {
        return;
    }
    let b = Bundle::new(&["true"]);
    let bundle = b.path().to_str().unwrap();
    b.fails(&["state", "nosuch"], "container nosuch does not exist");
    b.fails(
        &["create", "--bundle", bundle, "../escape"],
        "invalid container id",
    );
    b.fails(&["start", "a/b"], "invalid container id");
    for (extra, says) in [
        (
            serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}),
            "hooks are not supported",
        ),
        (
            serde_json::json!({"root": {"path": "nowhere"}}),
            "root.path",
        ),
        (
            serde_json::json!({"mounts": [{"destination": "/x", "type": "nfs", "source": "h:/x"}]}),
            "type \"nfs\" is not supported",
        ),
        (
            serde_json::json!({"annotations": {"io.vmc.mode": "fast"}}),
            "the modes are vm and ns",
        ),
    ] {
        let bad = Bundle::with(config(&["true"], extra));
        bad.fails(
            &["create", "--bundle", bad.path().to_str().unwrap(), "x"],
            says,
        );
        // Nothing left behind.
        assert!(std::fs::read_dir(bad.state.path())
            .map(|mut d| d.next().is_none())
            .unwrap_or(true));
    }
    // Without the annotation: the runtime's --mode (or VMC_RUNTIME_MODE),
    // else vm (the microVM tests below give no annotation).
    let mut cfg = config(&["true"], serde_json::json!({}));
    cfg["annotations"] = serde_json::json!({});
    let plain = Bundle::with(cfg);
    let p = plain.path().to_str().unwrap();
    let out = std::fs::File::create(plain.path().join("out")).unwrap();
    let st = plain
        .cmd(&["--mode", "ns", "create", "--bundle", p, "m1"])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(plain.state("m1")["status"], "created");
    assert!(!plain.state.path().join("m1/vsock.sock").exists());
    plain.ok(&["delete", "m1"]);
    // A --root that does not exist yet is made private (0700), as runc's.
    let fresh = plain.state.path().join("fresh");
    let out = std::fs::File::create(plain.path().join("out2")).unwrap();
    let st = Command::new(&plain.runtime)
        .arg("--root")
        .arg(&fresh)
        .args(["--mode", "ns", "create", "--bundle", p, "m2"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    let o = Command::new(&plain.runtime)
        .arg("--root")
        .arg(&fresh)
        .args(["delete", "m2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let f: serde_json::Value = serde_json::from_str(&b.ok(&["features"])).unwrap();
    assert!(f["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("pid")));
    let v = b.ok(&["--version"]);
    assert!(v.starts_with("vmc-runtime "), "{v}");
}

/// `exec` joins a running container: attached, it returns the process's
/// exit code; `--detach --pid-file --process FILE` leaves the process to
/// the caller, who waits for it.
#[test]
fn exec_runs_in_the_container_attached_or_detached() {
    if !is_root() {
        return;
    }
    become_subreaper();
    let b = Bundle::new(&["sleep", "1000"]);
    let out = b.path().join("out");
    let pid = b.create("e1", &out);
    b.fails(
        &["exec", "e1", "true"],
        "cannot exec in a container that is created",
    );
    b.ok(&["start", "e1"]);
    let o = b.run(&[
        "exec",
        "e1",
        "sh",
        "-c",
        "hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "oci-box\nsleep 1000 \n");
    let process = serde_json::json!({
        "args": ["sh", "-c", "echo detached $(id -u) > /done"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin"]
    });
    let pf = b.path().join("process.json");
    std::fs::write(&pf, process.to_string()).unwrap();
    let epid = b.path().join("exec.pid");
    let mut c = b.cmd(&["exec", "--detach", "--pid-file"]);
    c.arg(&epid).arg("--process").arg(&pf).arg("e1");
    let f = std::fs::File::create(b.path().join("exec-out")).unwrap();
    let o = c.stdout(f.try_clone().unwrap()).stderr(f).status().unwrap();
    assert!(o.success());
    let exec_pid: i32 = std::fs::read_to_string(epid).unwrap().parse().unwrap();
    let status = wait_for(exec_pid);
    assert_eq!(libc::WEXITSTATUS(status), 0);
    assert_eq!(
        std::fs::read_to_string(b.path().join("rootfs/done")).unwrap(),
        "detached 0\n"
    );
    b.ok(&["kill", "e1", "KILL"]);
    wait_for(pid);
    b.fails(
        &["exec", "e1", "true"],
        "cannot exec in a container that is stopped",
    );
    b.ok(&["delete", "e1"]);
}

/// A bundle with `process.terminal`: the terminal's master goes to the
/// caller's console socket at `create` (SCM_RIGHTS, as runc sends it), and
/// the process runs on its slave.
#[test]
fn a_terminal_goes_to_the_console_socket() {
    if !is_root() {
        return;
    }
    become_subreaper();
    let mut cfg = config(&["sh", "-c", "tty; echo $TERM"], serde_json::json!({}));
    cfg["process"]["terminal"] = serde_json::json!(true);
    let b = Bundle::with(cfg);
    let (pid, master) = b.create_with_console("t1");
    b.ok(&["start", "t1"]);
    let status = wait_for(pid);
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let mut text = Vec::new();
    let mut f = std::fs::File::from(master);
    // Until the slave's last holder is gone (EIO).
    let _ = std::io::Read::read_to_end(&mut f, &mut text);
    assert_eq!(String::from_utf8_lossy(&text), "/dev/pts/0\r\nxterm\r\n");
    b.ok(&["delete", "t1"]);
    let o = b.run(&["create", "--bundle", b.path().to_str().unwrap(), "t2"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --console-socket"));
}

/// A bundle for a microVM (the default mode: no annotation).
fn vm_bundle(args: &[&str]) -> Bundle {
    let mut cfg = config(args, serde_json::json!({}));
    cfg["annotations"] = serde_json::json!({"org.example.note": "kept"});
    Bundle::with(cfg)
}

/// The same lifecycle in a microVM: the pid `create` reports is vmc's
/// holder of the VM, waiting with the guest ready; the bundle's live root
/// is the guest's root (what the container writes is in it on the host at
/// once), the spec's bind is there read-only; `start` runs the program,
/// the caller gets its exit status from that pid; `exec` attached and
/// detached runs through the agent; SIGKILL ends the VM.
#[test]
fn a_microvm_container_follows_the_lifecycle_and_runs_execs() {
    if !(is_root() && common::kvm_available()) {
        return;
    }
    become_subreaper();
    let script = "echo started > /ran; hostname; cat /etc/motd; echo err >&2; \
                  { echo x > /etc/motd; } 2>/dev/null || echo motd is read-only; \
                  echo pid $$; grep -o rootfstype=erofs /proc/cmdline; echo ready; exec sleep 1000";
    let b = vm_bundle(&["sh", "-c", script]);
    let out = b.path().join("out");
    let pid = b.create("v1", &out);
    let s = b.state("v1");
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["pid"], pid);
    assert_eq!(s["annotations"]["org.example.note"], "kept");
    // No annotation: a microVM, its agent's socket in the state.
    assert!(b.state.path().join("v1/vsock.sock").exists());
    assert!(!b.path().join("rootfs/ran").exists(), "ran before start");
    b.fails(
        &["exec", "v1", "true"],
        "cannot exec in a container that is created",
    );
    b.ok(&["start", "v1"]);
    assert_eq!(b.state("v1")["status"], "running");
    common::eventually("the workload's output", || {
        std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.contains("ready\n"))
    });
    let text = std::fs::read_to_string(&out).unwrap();
    for line in [
        "oci-box",
        "from the host",
        "err",
        "motd is read-only",
        "pid 1",
        // The guest kernel's command line, not the host's.
        "rootfstype=erofs",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in {text}");
    }
    // Written in the guest, on the host's directory at once.
    assert_eq!(
        std::fs::read_to_string(b.path().join("rootfs/ran")).unwrap(),
        "started\n"
    );
    let o = b.run(&["exec", "v1", "sh", "-c", "cat /ran; hostname; exit 5"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "started\noci-box\n");
    let process = serde_json::json!({
        "args": ["sh", "-c", "echo detached $(id -u) > /done"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin"]
    });
    let pf = b.path().join("process.json");
    std::fs::write(&pf, process.to_string()).unwrap();
    let epid = b.path().join("exec.pid");
    let mut c = b.cmd(&["exec", "--detach", "--pid-file"]);
    c.arg(&epid).arg("--process").arg(&pf).arg("v1");
    let f = std::fs::File::create(b.path().join("exec-out")).unwrap();
    assert!(c
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap()
        .success());
    let exec_pid: i32 = std::fs::read_to_string(epid).unwrap().parse().unwrap();
    let status = wait_for(exec_pid);
    assert!(libc::WIFEXITED(status), "{status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "{}",
        std::fs::read_to_string(b.path().join("exec-out")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(b.path().join("rootfs/done")).unwrap(),
        "detached 0\n"
    );
    // pause stops the VMM as a whole; exec waits for resume.
    b.ok(&["pause", "v1"]);
    assert_eq!(b.state("v1")["status"], "paused");
    b.fails(
        &["exec", "v1", "true"],
        "cannot exec in a container that is paused",
    );
    b.ok(&["resume", "v1"]);
    assert_eq!(b.state("v1")["status"], "running");
    let o = b.run(&["exec", "v1", "cat", "/done"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "detached 0\n", "{o:?}");
    b.fails(
        &["delete", "v1"],
        "that is not stopped: running (use --force)",
    );
    let vmm = std::fs::read_to_string(b.state.path().join("v1/vmm.json")).ok();
    b.ok(&["kill", "v1", "KILL"]);
    let status = wait_for(pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "{status:#x}"
    );
    assert_eq!(b.state("v1")["status"], "stopped");
    // The jailed VMM (a child of the holder, now this subreaper's) ends.
    if let Some(v) = vmm {
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        wait_for(v["pid"].as_i64().unwrap() as i32);
    }
    b.ok(&["delete", "v1"]);
    assert!(!b.state.path().join("v1").exists());
    // The workload's exit status is the pid's. Its bundle joins a network
    // namespace (made here) with loopback alone: the guest gets no address.
    let netns = format!("vmc-oci-{}", std::process::id());
    common::ok(
        &Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .unwrap(),
    );
    let mut cfg = config(
        &["sh", "-c", "ip -4 addr show eth0 | grep -c inet; exit 3"],
        serde_json::json!({}),
    );
    cfg["annotations"] = serde_json::json!({});
    cfg["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": format!("/run/netns/{netns}")}
    ]);
    let b = Bundle::with(cfg);
    let out = b.path().join("out");
    let pid = b.create("v2", &out);
    b.ok(&["start", "v2"]);
    let status = wait_for(pid);
    let _ = Command::new("ip")
        .args(["netns", "delete", &netns])
        .status();
    assert!(libc::WIFEXITED(status), "{status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 3);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "0\n");
    b.ok(&["delete", "v2"]);
}

/// A microVM's terminal: the master of a host terminal goes to the console
/// socket at `create`, the guest's terminal is relayed to its slave.
#[test]
fn a_microvm_terminal_goes_to_the_console_socket() {
    if !(is_root() && common::kvm_available()) {
        return;
    }
    become_subreaper();
    let mut cfg = config(
        &["sh", "-c", "tty; echo $TERM; stty size"],
        serde_json::json!({}),
    );
    cfg["process"]["terminal"] = serde_json::json!(true);
    cfg["annotations"] = serde_json::json!({});
    let b = Bundle::with(cfg);
    let (pid, master) = b.create_with_console("t1");
    // The caller sizes the terminal before start, as conmon does.
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&master);
    // SAFETY: TIOCSWINSZ with a valid winsize on the master we hold.
    let r = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
    b.ok(&["start", "t1"]);
    let status = wait_for(pid);
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let mut text = Vec::new();
    let mut f = std::fs::File::from(master);
    let _ = std::io::Read::read_to_end(&mut f, &mut text);
    assert_eq!(
        String::from_utf8_lossy(&text),
        "/dev/pts/0\r\nxterm\r\n33 101\r\n"
    );
    b.ok(&["delete", "t1"]);
}
