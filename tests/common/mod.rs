//! Shared fixtures for the end-to-end tests: prerequisites (KVM, the installed
//! guest kernel and agent), a busybox root filesystem, and `TestVm`, one
//! booted guest that serves many checks through the agent protocol.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vmc::runtime::agent::AgentConn;
use vmc::runtime::microvm::{MicroVm, Start};
use vmc::runtime::{ContainerConfig, ProcessSpec, Resources};
use vmc_proto::{ExitStatus, GuestMsg, HostMsg, StartFailure};

/// Whether KVM tests can run. Without /dev/kvm they skip, loudly
/// (`vmc::testing::skip`), except under CI=true, where that is a failure.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        vmc::testing::skip("/dev/kvm cannot be opened on this machine");
    }
    // A VM this test binary starts through the runtime runs in a VMM
    // process: vmc's `__vmm`, not this binary's.
    vmc::runtime::jail::use_vmm_binary(Path::new(env!("CARGO_BIN_EXE_vmc")));
    ok
}

/// Whether namespace-mode tests can run (they need root). Otherwise they
/// skip, loudly, except under CI=true, where that is a failure.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        vmc::testing::skip("not root (namespace mode needs root)");
    }
    root
}

/// Writes `content` to `name` under `dir`, making its directories.
pub fn write(dir: &Path, name: &str, content: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// The installed guest kernel (`make setup` puts it there).
pub fn kernel() -> PathBuf {
    vmc::assets::kernel(None).expect("the guest kernel is installed: run `make setup`")
}

/// The project's root directory: cargo's run-time value first, as a test
/// binary may be reused (a shared target directory) from a clone elsewhere.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// A busybox root filesystem (built once per machine, shared, never modified
/// by the tests: every VM writes to its own scratch disk).
pub fn rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let out = vmc::bench::default_rootfs();
            let st = std::process::Command::new(repo().join("scripts/busybox-rootfs.sh"))
                .arg(&out)
                .status()
                .expect("run scripts/busybox-rootfs.sh");
            assert!(st.success(), "building the busybox rootfs failed");
            out
        })
        .clone()
}

/// Warm-start snapshots shared by every test on this machine: the first test
/// that needs one pays a full boot, the others restore it.
pub fn snapshots() -> PathBuf {
    let d = vmc::bench::default_rootfs()
        .parent()
        .map(|p| p.join("test-snapshots"))
        .expect("cache dir");
    std::fs::create_dir_all(&d).expect("snapshot dir");
    d
}

/// A listing of a directory tree (path, size, mode) to show it is unchanged.
pub fn tree_fingerprint(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            use std::os::unix::fs::MetadataExt;
            out.push(format!(
                "{} {} {:o} {}",
                e.path().strip_prefix(base).unwrap().display(),
                m.len(),
                m.mode(),
                m.mtime()
            ));
            if m.is_dir() {
                walk(base, &e.path(), out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v
}

/// What a process in the test VM did.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Result<ExitStatus, (StartFailure, String)>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn code(&self) -> i32 {
        match &self.status {
            Ok(s) => s.shell_code(),
            Err((k, _)) => k.exit_code(),
        }
    }
}

/// One booted guest with its container root mounted.
pub struct TestVm {
    pub vm: MicroVm,
    pub dir: tempfile::TempDir,
    pub hostname: String,
}

impl TestVm {
    pub fn boot(cpus: u8, memory_mib: u64) -> TestVm {
        Self::boot_rootfs(&rootfs(), cpus, memory_mib)
    }

    /// A VM (restored from the shared warm-start snapshot) running `rootfs`.
    pub fn boot_rootfs(rootfs: &Path, cpus: u8, memory_mib: u64) -> TestVm {
        let dir = tempfile::tempdir().expect("tempdir");
        let hostname = "testvm".to_string();
        let cfg = ContainerConfig {
            netns: None,
            id: vmc::runtime::new_id(),
            rootfs: vmc::runtime::Rootfs::Dir(rootfs.to_path_buf()),
            image_id: None,
            process: ProcessSpec::default(),
            hostname: hostname.clone(),
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
            engine: vmc::runtime::EngineConfig::Vm(vmc::runtime::VmEngineConfig {
                upper_in_memory: false,
                parked: false,
                resources: Resources {
                    cpus,
                    memory: memory_mib << 20,
                },
                kernel: kernel(),
                debug: false,
                cold: false,
                snapshots: snapshots(),
            }),
        };
        let root = |m: &MicroVm| m.root_spec(&hostname, Vec::new(), false);
        let (vm, conn) = MicroVm::start_ready(&cfg, dir.path(), Start::Warm, &root, &|| false)
            .expect("start the test VM");
        conn.close();
        TestVm { vm, dir, hostname }
    }

    fn conn(&self) -> AgentConn {
        self.vm.connect().expect("agent connection")
    }

    /// Runs `spec` to completion, feeding `stdin` if given.
    pub fn run(&self, mut spec: ProcessSpec, stdin: Option<&[u8]>) -> Output {
        let mut conn = self.conn();
        spec.stdin = stdin.is_some();
        conn.send(&HostMsg::Start(spec)).unwrap();
        let mut out = Output {
            stdout: Vec::new(),
            stderr: Vec::new(),
            status: Err((StartFailure::Setup, "no answer".into())),
        };
        match conn.recv().unwrap() {
            GuestMsg::Started { .. } => {}
            GuestMsg::StartFailed { kind, message } => {
                out.status = Err((kind, message));
                return out;
            }
            other => panic!("unexpected answer to Start: {other:?}"),
        }
        let writer = stdin.map(|data| {
            let mut w = conn.try_clone().unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                for chunk in data.chunks(vmc_proto::IO_CHUNK) {
                    w.send(&HostMsg::Stdin(chunk.to_vec())).unwrap();
                }
                w.send(&HostMsg::StdinEof).unwrap();
            })
        });
        // Waited for while the VM runs (a workload may sleep); a VM that
        // stops ends the wait instead of blocking the test.
        let mut watch =
            vmc::runtime::attach::while_running(self.vm.watch(vmc::runtime::microvm::ANSWER_CPU));
        loop {
            match conn.recv_watched(&mut watch).expect("frame from the agent") {
                GuestMsg::Stdout(d) => out.stdout.extend(d),
                GuestMsg::Stderr(d) => out.stderr.extend(d),
                GuestMsg::Exited(s) => {
                    out.status = Ok(s);
                    break;
                }
                other => panic!("unexpected frame: {other:?}"),
            }
        }
        if let Some(w) = writer {
            w.join().unwrap();
        }
        out
    }

    /// Runs a shell command as root in /.
    pub fn sh(&self, script: &str) -> Output {
        self.run(
            ProcessSpec {
                args: vec!["sh".into(), "-c".into(), script.into()],
                cwd: "/".into(),
                ..Default::default()
            },
            None,
        )
    }
}

/// The vmc binary with `home` as its store and the shared warm-start
/// snapshots, to add arguments and stdio to; images are never pulled
/// unless a test says so (`--pull`). Ready snapshots are off (each
/// test's store would start their making in the background, see
/// scripts/test.sh); a test of them sets `VMC_READY_SNAPSHOTS=1`.
pub fn vmc_command(home: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vmc"));
    // VMC_PULL=never: a test that runs an image its store lacks never
    // reaches for Docker Hub (tests/pull.rs asks for pulls itself).
    c.env("VMC_HOME", home)
        .env("VMC_SNAPSHOTS", snapshots())
        .env("VMC_READY_SNAPSHOTS", "0")
        .env("VMC_PULL", "never");
    c
}

/// Runs the vmc binary with `home` as its store (stdin: /dev/null) and the
/// shared warm-start snapshots.
pub fn vmc(home: &Path, args: &[&str]) -> std::process::Output {
    vmc_command(home)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// The stdout of a command that must have succeeded.
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Not from the kernel's ephemeral range (bind to port 0): there, any
    // process's outgoing connection may take the port as its source port
    // between this check and vmc's bind, and two calls may get the same
    // port (`many` failed once with "already in use"). Ports below that
    // range are handed out only by such explicit picks: each process walks
    // them from a random start, so no two picks of one process repeat and
    // two processes rarely meet.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    if NEXT.load(Ordering::SeqCst) == u32::MAX {
        let mut b = [0u8; 4];
        // SAFETY: getrandom fills the 4-byte buffer it is given.
        unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let _ = NEXT.compare_exchange(
            u32::MAX,
            u32::from_ne_bytes(b) % span,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    for _ in 0..span {
        let port = 10_000 + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port between 10000 and {low}")
}

/// The live passt and pasta processes working for the store at `home`
/// (they inherit vmc's environment, `VMC_HOME` included; zombies of
/// pasta's short-lived helpers are not counted). Per store, so tests
/// running at the same time do not count each other's.
pub fn network_helpers(home: &Path) -> usize {
    let want = format!("VMC_HOME={}", home.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // "PID (comm) STATE ...": the state follows the last ')'.
            let live = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
            live && std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with("passt") || c.trim().starts_with("pasta"))
                && std::fs::read(e.path().join("environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .count()
}

/// A test's `VMC_HOME`. Dropped (also when the test panics), it removes
/// every container still in it, so that no detached supervisor, VM or
/// namespace container outlives a failed test.
pub struct TestHome {
    dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new() -> TestHome {
        TestHome {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        let ids = vmc(self.path(), &["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = vmc(self.path(), &args);
        }
    }
}

/// A fresh store holding the busybox rootfs as the image `busybox`.
/// The busybox root of [`rootfs`] as a plain tarball at `dest` (for
/// `vmc import`); returns `dest`.
pub fn busybox_tar(dest: &Path) -> PathBuf {
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(rootfs())
        .arg("-cf")
        .arg(dest)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    dest.to_path_buf()
}

pub fn store_with_busybox() -> TestHome {
    let home = TestHome::new();
    let tar = busybox_tar(&home.path().join("busybox.tar"));
    ok(&vmc(
        home.path(),
        &["import", tar.to_str().unwrap(), "busybox"],
    ));
    home
}

/// How long a test waits for something that should happen soon (a file to
/// appear, a process to go): a bound for a busy host, not a timing claim;
/// a real hang is caught sooner by the harness's per-binary timeout only if
/// this is shorter.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after
/// [`PATIENCE`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {PATIENCE:?} for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Makes `cmd` see a device node of its own at `target` (e.g. /dev/kvm):
/// a node `major:minor` with permissions `mode`, made in `dir` and bound
/// over `target` in a mount namespace of the child's own, so that a test
/// does not depend on (or change) the host's permissions on the device.
pub fn device_over(
    cmd: &mut std::process::Command,
    dir: &Path,
    target: &'static std::ffi::CStr,
    (major, minor): (u32, u32),
    mode: u32,
) {
    let name = target.to_str().unwrap().replace('/', "_");
    let node = std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    let rc = unsafe {
        libc::mknod(
            node.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    // mknod applies the umask.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::chmod(node.as_ptr(), mode) }, 0);
    // SAFETY: between fork and exec only async-signal-safe calls (unshare,
    // mount) on pointers that live as long as `cmd`.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    node.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}
