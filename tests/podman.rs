//! podman (Debian's 4.3, with conmon) running its containers through
//! `vmc-runtime`, in a microVM each (the default) and in namespace mode
//! (annotation io.vmc.mode=ns): the image
//! comes from a `vmc save` archive (`podman load`, no registry); `run --rm`
//! with output and exit codes, `-d` + `exec` + `logs` + `stop` with the exit
//! code of the workload's trap, `-t` through the console socket, and a
//! published port answering on loopback through podman's own network.
//! podman keeps its store, state and networks in the test's directories.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{is_root, ok, store_with_busybox, vmc};

struct Podman {
    dir: tempfile::TempDir,
    runtime: PathBuf,
}

impl Podman {
    /// A podman with its own store and state, and busybox loaded from a
    /// `vmc save` archive; `None` (with the reason printed) when podman is
    /// not installed.
    fn new() -> Option<Podman> {
        if Command::new("podman").arg("--version").output().is_err() {
            vmc_spawn::testing::skip("podman is not installed (make deps installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("vmc-runtime");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmc"), &runtime).unwrap();
        let p = Podman { dir, runtime };
        let home = store_with_busybox();
        let archive = p.dir.path().join("busybox.tar");
        ok(&vmc(
            home.path(),
            &["save", "-o", archive.to_str().unwrap(), "busybox"],
        ));
        ok(&p.run(&["load", "-i", archive.to_str().unwrap()]));
        Some(p)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        let d = self.path();
        c.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .arg("--runtime")
            .arg(&self.runtime)
            .args(args)
            .stdin(Stdio::null())
            // Through conmon to the runtime: the agent disk's cache and the
            // tests' shared warm-start snapshots.
            .env("VMC_HOME", d.join("vmc-home"))
            .env("VMC_SNAPSHOTS", common::snapshots());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `podman run` in vmc's `mode` (`vm` or `ns`), with limits this host
    /// allows (its open-files limit is below podman's default) and `extra`.
    fn container(&self, mode: &str, extra: &[&str]) -> Output {
        let mode = format!("io.vmc.mode={mode}");
        let mut args = vec![
            "run",
            "--annotation",
            &mode,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ];
        args.extend(extra);
        self.run(&args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-a", "-f"]);
    }
}

#[test]
fn podman_runs_its_containers_through_vmc_runtime() {
    if !is_root() {
        return;
    }
    let Some(p) = Podman::new() else { return };
    runs_its_containers(&p, "ns");
}

#[test]
fn podman_runs_its_containers_in_microvms() {
    if !(is_root() && common::kvm_available()) {
        return;
    }
    let Some(p) = Podman::new() else { return };
    runs_its_containers(&p, "vm");
}

fn runs_its_containers(p: &Podman, mode: &str) {
    let o = p.container(
        mode,
        &["--rm", "--network", "none", "busybox", "echo", "hi"],
    );
    assert_eq!(ok(&o), "hi\n");
    let o = p.container(
        mode,
        &["--rm", "--network", "none", "busybox", "sh", "-c", "exit 7"],
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");

    // Detached: exec, logs, stop (the trap's exit code comes through).
    let script = "echo started; trap 'echo bye; exit 4' TERM; while :; do sleep 0.1; done";
    ok(&p.container(
        mode,
        &[
            "-d",
            "--name",
            "d1",
            "--network",
            "none",
            "busybox",
            "sh",
            "-c",
            script,
        ],
    ));
    common::eventually("the container's output", || {
        let o = p.run(&["logs", "d1"]);
        String::from_utf8_lossy(&o.stdout)
            .contains("started")
            .then_some(())
    });
    let o = p.run(&["exec", "d1", "sh", "-c", "echo in $(hostname); exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("in "),
        "{o:?}"
    );
    ok(&p.run(&["stop", "-t", "10", "d1"]));
    let state = ok(&p.run(&["inspect", "-f", "{{.State.ExitCode}}", "d1"]));
    assert_eq!(state.trim(), "4");
    assert_eq!(ok(&p.run(&["logs", "d1"])), "started\nbye\n");
    ok(&p.run(&["rm", "d1"]));

    // -t: the terminal reaches podman through the console socket.
    let o = p.container(mode, &["--rm", "-t", "--network", "none", "busybox", "tty"]);
    assert_eq!(ok(&o), "/dev/pts/0\r\n");
}

#[test]
fn a_published_port_answers_through_podmans_network() {
    if !is_root() {
        return;
    }
    let Some(p) = Podman::new() else { return };
    publishes_a_port(&p, "ns");
}

/// The VM takes over the interface podman's bridge gave the network
/// namespace: the port forward reaches the guest's server.
#[test]
fn a_published_port_answers_from_a_microvm_through_podmans_network() {
    if !(is_root() && common::kvm_available()) {
        return;
    }
    let Some(p) = Podman::new() else { return };
    publishes_a_port(&p, "vm");
}

fn publishes_a_port(p: &Podman, mode: &str) {
    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let www = "mkdir -p /www && echo served-by-vmc > /www/index.html && \
               exec httpd -f -p 8080 -h /www";
    ok(&p.container(
        mode,
        &[
            "-d", "--name", "web", "-p", &publish, "busybox", "sh", "-c", www,
        ],
    ));
    let body = common::eventually("the published port", || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        use std::io::{Read, Write};
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.contains("served-by-vmc").then_some(text)
    });
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    ok(&p.run(&["rm", "-f", "web"]));
}
