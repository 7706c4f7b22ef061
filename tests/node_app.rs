//! The seed's flow, end to end, in both modes: `vmc build -t my-node-app
//! examples/node-app`, `vmc run -d -p HOST:3000 my-node-app`, an HTTP answer
//! on the host port, the server's output in `vmc logs`, `vmc stop`.
//! The base image is Debian bookworm with nodejs from an mmdebstrap tarball
//! (scripts/node-base.sh, cached in ~/.cache/vmc).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{free_port, kvm_available, ok, repo, vmc, TestHome};

/// The cached Debian + nodejs root filesystem tarball (made on first use).
fn node_base_tar() -> PathBuf {
    let out = vmc::bench::default_rootfs()
        .parent()
        .expect("cache dir")
        .join("debian-node.tar");
    let st = std::process::Command::new(repo().join("scripts/node-base.sh"))
        .arg(&out)
        .status()
        .expect("run scripts/node-base.sh");
    assert!(st.success(), "building the Debian + nodejs base failed");
    out
}

/// One HTTP GET on 127.0.0.1:port; the response, or None if nobody answered.
fn http_get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
}

fn node_app(mode: &str, stop_timeout: &str) {
    let home = TestHome::new();
    let h: &Path = home.path();
    let tar = node_base_tar();
    ok(&vmc(
        h,
        &["import", tar.to_str().unwrap(), "debian-node:bookworm"],
    ));
    let ctx = repo().join("examples/node-app");
    let built = ok(&vmc(
        h,
        &["build", "-t", "my-node-app", ctx.to_str().unwrap()],
    ));
    assert!(
        built.contains("Successfully tagged my-node-app:latest"),
        "{built}"
    );

    let port = free_port();
    let publish = format!("127.0.0.1:{port}:3000");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            mode,
            "--name",
            "web",
            "-p",
            &publish,
            "my-node-app",
        ],
    ));
    let ports = ok(&vmc(h, &["port", "web"]));
    assert!(
        ports.contains(&format!("3000/tcp -> 127.0.0.1:{port}")),
        "{ports}"
    );
    // Node starts in about a second in a namespace, in minutes in a kvm_pvm
    // microVM (its ~80 MB of code are read at under 1 MB/s there).
    let deadline = Instant::now() + Duration::from_secs(600);
    let answer = loop {
        if let Some(a) = http_get(port).filter(|a| a.starts_with("HTTP/1.1 200")) {
            break a;
        }
        assert!(Instant::now() < deadline, "no answer on port {port}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(answer.contains("Hello from my-node-app on "), "{answer}");
    assert!(answer.contains("(node v18."), "{answer}");
    let logs = ok(&vmc(h, &["logs", "web"]));
    assert!(logs.starts_with("listening on 3000\n"), "{logs}");
    assert!(logs.contains("GET / (#1)"), "{logs}");

    // stop: SIGTERM, which the app handles, well within the timeout.
    ok(&vmc(h, &["stop", "-t", stop_timeout, "web"]));
    assert_eq!(ok(&vmc(h, &["wait", "web"])).trim(), "0");
    assert!(ok(&vmc(h, &["logs", "web"])).contains("SIGTERM: shutting down"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port is closed after stop"
    );
    ok(&vmc(h, &["rm", "web"]));
}

#[test]
fn node_app_in_namespace_mode() {
    if !common::is_root() {
        return;
    }
    node_app("ns", "10");
}

#[test]
fn node_app_in_vm_mode() {
    if !kvm_available() {
        return;
    }
    node_app("vm", "120");
}
