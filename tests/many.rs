//! Ten containers at once in each mode, each serving HTTP on its own
//! published port; after `rm -f` nothing of them is left: no process, no
//! mount, no state directory, no listening port.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, kvm_available, network_helpers, ok, store_with_busybox, vmc};

const COUNT: usize = 10;

fn http_get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn many(mode: &str) {
    let home = store_with_busybox();
    let h: &Path = home.path();
    let ports: Vec<u16> = (0..COUNT).map(|_| free_port()).collect();
    for (i, port) in ports.iter().enumerate() {
        let name = format!("c{i}");
        let publish = format!("127.0.0.1:{port}:8080");
        let n = format!("N={i}");
        ok(&vmc(
            h,
            &[
                "run", "-d", "--mode", mode, "--name", &name, "-p", &publish, "-e", &n,
                "busybox", "sh", "-c",
                "mkdir -p /www && echo \"container $N\" > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        ));
    }
    let running = ok(&vmc(h, &["ps", "-q"]));
    assert_eq!(running.lines().count(), COUNT, "{running}");
    // Each port reaches its own container.
    let deadline = Instant::now() + Duration::from_secs(300);
    for (i, port) in ports.iter().enumerate() {
        loop {
            match http_get(*port) {
                Some(a) if a.contains("200 OK") => {
                    assert!(a.ends_with(&format!("container {i}\n")), "{a}");
                    break;
                }
                _ => {
                    assert!(Instant::now() < deadline, "container {i} never answered");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    // Each container has its network helper (passt for a VM, pasta for a
    // namespace container, both by default).
    let helpers = network_helpers(h);
    assert!(helpers >= COUNT, "{helpers} passt/pasta processes");

    let mut args = vec!["rm".to_string(), "-f".to_string()];
    args.extend((0..COUNT).map(|i| format!("c{i}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&vmc(h, &args));
    assert_eq!(ok(&vmc(h, &["ps", "-aq"])), "");
    assert_eq!(
        std::fs::read_dir(h.join("containers")).unwrap().count(),
        0,
        "no state directory left"
    );
    let home_s = h.to_str().unwrap();
    let left = processes_mentioning(home_s);
    assert!(left.is_empty(), "processes left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(home_s), "mounts left: {mounts}");
    // None of the network helpers outlives the rm -f (they end when their
    // VMM or namespace does, a moment later).
    common::eventually("the passt and pasta processes to end", || {
        (network_helpers(h) == 0).then_some(())
    });
    // rm -f returned once each supervisor was gone: no port is open.
    for port in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "port {port} still open after rm -f"
        );
    }
}

#[test]
fn ten_namespace_containers_at_once() {
    if !common::is_root() {
        return;
    }
    many("ns");
}

#[test]
fn ten_microvms_at_once() {
    if !kvm_available() {
        return;
    }
    many("vm");
}
