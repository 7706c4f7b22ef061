//! containerd (Debian's 1.6, its runc shim) running containers through
//! `vmc-runtime`, in a microVM each and in namespace mode: the test starts its own containerd on a
//! socket and state directories of its own, imports a `vmc save` archive
//! with `ctr image import`, and runs `ctr run --runc-binary vmc-runtime
//! --rm` (output, exit code), a detached task with `ctr task exec` (exit
//! code), `ctr task ps`, `ctr task kill` (137 when killed), and removal.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{eventually, is_root, ok, store_with_busybox, vmc};

struct Containerd {
    dir: tempfile::TempDir,
    /// ctr's namespace: the shim keeps the runtime's state by namespace
    /// under /run/containerd/runc, which every containerd shares.
    namespace: String,
    daemon: Child,
    runtime: PathBuf,
}

impl Containerd {
    fn start(namespace: &str) -> Option<Containerd> {
        if Command::new("containerd")
            .arg("--version")
            .output()
            .is_err()
        {
            vmc_spawn::testing::skip("containerd is not installed (make deps installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{r}\"\nstate = \"{s}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{a}\"\n[ttrpc]\n  address = \"{a}.ttrpc\"\n",
            r = d.join("root").display(),
            s = d.join("state").display(),
            a = d.join("c.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        // Through the shim to the runtime: the agent disk's cache and the
        // tests' shared warm-start snapshots.
        let daemon = Command::new("containerd")
            .env("VMC_HOME", d.join("vmc-home"))
            .env("VMC_SNAPSHOTS", common::snapshots())
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let runtime = d.join("vmc-runtime");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmc"), &runtime).unwrap();
        let c = Containerd {
            dir,
            namespace: namespace.to_string(),
            daemon,
            runtime,
        };
        eventually("containerd to answer", || {
            c.ctr(&["version"]).status.success().then_some(())
        });
        Some(c)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.path().join("c.sock"))
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr run` through vmc-runtime in `mode`, with `args` (options,
    /// image, id, command).
    fn run(&self, mode: &str, args: &[&str]) -> Output {
        let rt = self.runtime.to_str().unwrap();
        let mode = format!("io.vmc.mode={mode}");
        let mut v = vec![
            "run",
            "--runc-binary",
            rt,
            "--snapshotter",
            "native",
            "--annotation",
            &mode,
        ];
        v.extend(args);
        self.ctr(&v)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn containerd_runs_tasks_through_vmc_runtime() {
    if !is_root() {
        return;
    }
    let Some(c) = Containerd::start("vmc-test-ns") else {
        return;
    };
    runs_tasks(&c, "ns");
}

#[test]
fn containerd_runs_tasks_in_microvms() {
    if !(is_root() && common::kvm_available()) {
        return;
    }
    let Some(c) = Containerd::start("vmc-test-vm") else {
        return;
    };
    runs_tasks(&c, "vm");
}

fn runs_tasks(c: &Containerd, mode: &str) {
    let home = store_with_busybox();
    let archive = c.path().join("busybox.tar");
    ok(&vmc(
        home.path(),
        &["save", "-o", archive.to_str().unwrap(), "busybox"],
    ));
    ok(&c.ctr(&["image", "import", archive.to_str().unwrap()]));
    // ctr keeps the archive's name as it is.
    let image = "busybox:latest";
    assert!(ok(&c.ctr(&["image", "ls", "-q"])).contains(image));

    let o = c.run(mode, &["--rm", image, "c1", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    assert_eq!(o.status.code(), Some(3), "{o:?}");

    ok(&c.run(mode, &["-d", image, "c2", "sleep", "1000"]));
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "c2",
        "sh",
        "-c",
        "echo in; exit 4",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in\n");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let tasks = ok(&c.ctr(&["task", "ls"]));
    let pid = tasks
        .lines()
        .find(|l| l.starts_with("c2 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("{tasks}"))
        .to_string();
    assert!(tasks.contains("RUNNING"), "{tasks}");
    assert!(ok(&c.ctr(&["task", "ps", "c2"])).contains(&pid));
    ok(&c.ctr(&["task", "kill", "--signal", "KILL", "c2"]));
    eventually("the task to stop", || {
        ok(&c.ctr(&["task", "ls"]))
            .contains("STOPPED")
            .then_some(())
    });
    let o = c.ctr(&["task", "rm", "c2"]);
    assert!(o.status.success(), "{o:?}");
    // The shim's exit status of the killed process.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exit code 137"),
        "{o:?}"
    );
    ok(&c.ctr(&["container", "rm", "c2"]));
    assert!(!ok(&c.ctr(&["container", "ls", "-q"])).contains("c2"));
}
