//! Published ports (`-p`) in both modes: a byte-exact echo through a
//! half-close, concurrent connections (at most 8 at a time: see
//! [`IN_FLIGHT`]), a port in use.

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

/// busybox httpd listens with a backlog of 9: a burst of more connection
/// attempts than that overflows its SYN and accept queues, and the kernel
/// resets some of them (seen in the container's /proc/net/netstat as
/// ListenOverflows and SyncookiesFailed), with or without vmc in between
/// (Docker's proxy connects the same way). So the web requests keep at most
/// [`IN_FLIGHT`] connections open at a time.
const IN_FLIGHT: usize = 8;

fn published(mode: &str, size: usize, requests: usize) {
    let home = store_with_busybox();
    let h = home.path();
    let port = free_port();
    let web = free_port();
    let map = format!("127.0.0.1:{port}:7000");
    let web_map = format!("127.0.0.1:{web}:7001");
    // An echo server (busybox nc: it re-listens after each connection, so
    // it is used one connection at a time) and a web server (busybox httpd,
    // concurrent up to its backlog).
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
    // `requests` connections, IN_FLIGHT at a time, each answered in full.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..IN_FLIGHT.min(requests))
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= requests {
                    return;
                }
                let req = format!("GET /index.html?{i} HTTP/1.0\r\n\r\n");
                let answer = echo(web, req.as_bytes()).unwrap();
                let answer = String::from_utf8_lossy(&answer).into_owned();
                assert!(
                    answer.starts_with("HTTP/1.") && answer.ends_with("\r\n\r\nserved\n"),
                    "request {i}: {answer:?}"
                );
            })
        })
        .collect();
    let mut failed = 0;
    for t in threads {
        if t.join().is_err() {
            failed += 1;
        }
    }
    if failed > 0 {
        let netstat = vmc(h, &["exec", "echo", "cat", "/proc/net/netstat"]);
        let logs = vmc(h, &["logs", "echo"]);
        panic!(
            "{failed} of {IN_FLIGHT} request threads failed; the container's TCP counters: {}; its log: {}{}",
            String::from_utf8_lossy(&netstat.stdout),
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
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
    // (rm -f returns once the supervisor is gone.)
    TcpListener::bind(("127.0.0.1", port)).expect("the host port is free after rm -f");
    // Bad -p values are refused before anything runs.
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            mode,
            "-p",
            "53:53/sctp",
            "busybox",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "vmc: -p 53:53/sctp: only tcp and udp ports can be published \
         (the form is [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp])\n"
    );
    assert_eq!(ok(&vmc(h, &["ps", "-aq"])), "", "no container was made");
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

/// A static UDP echo server (busybox has none): each datagram comes back
/// prefixed with `echo:`. Built once per test binary with the host's C
/// compiler (Rust's linker, so always there).
fn udp_echo_binary() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let src = dir.join("udpecho.c");
        std::fs::write(
            &src,
            r#"#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    static char b[70000];
    for (;;) {
        struct sockaddr_in f;
        socklen_t l = sizeof f;
        int n = recvfrom(s, b + 5, 65000, 0, (struct sockaddr *)&f, &l);
        if (n < 0) continue;
        memcpy(b, "echo:", 5);
        sendto(s, b, n + 5, 0, (struct sockaddr *)&f, l);
    }
}
"#,
        )
        .unwrap();
        let bin = dir.join("udpecho");
        let st = std::process::Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "cc -static udpecho.c");
        bin
    })
    .clone()
}

/// `-p HOST:CTR/udp` in `mode`: datagrams from two clients reach the
/// server in the container and each client gets its own replies, from the
/// published address; `ps` and `port` say udp.
fn udp_published(mode: &str) {
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(udp_echo_binary(), ctx.path().join("udpecho")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY udpecho /bin/udpecho\nEXPOSE 7007/udp\nCMD [\"/bin/udpecho\", \"7007\"]\n",
    )
    .unwrap();
    ok(&vmc(
        h,
        &["build", "-q", "-t", "udp", ctx.path().to_str().unwrap()],
    ));
    let port = free_port();
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            mode,
            "--name",
            "udp",
            "-p",
            &format!("127.0.0.1:{port}:7007/udp"),
            "udp",
        ],
    ));
    let published: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ask = |client: &std::net::UdpSocket, what: &str| -> Option<String> {
        client.send_to(what.as_bytes(), published).ok()?;
        let mut b = [0u8; 256];
        let (n, from) = client.recv_from(&mut b).ok()?;
        assert_eq!(from, published);
        Some(String::from_utf8_lossy(&b[..n]).into_owned())
    };
    let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Until the server inside answers (a datagram sent before it listens
    // is lost, as UDP's are).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(r) = ask(&a, "a1") {
            assert_eq!(r, "echo:a1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no UDP reply through port {port}"
        );
    }
    let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(ask(&b, "b1").as_deref(), Some("echo:b1"));
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(ask(&a, "a2").as_deref(), Some("echo:a2"));
    assert_eq!(
        ok(&vmc(h, &["port", "udp"])).trim(),
        format!("7007/udp -> 127.0.0.1:{port}")
    );
    let ps = ok(&vmc(h, &["ps", "--format", "{{.Ports}}"]));
    assert_eq!(ps.trim(), format!("127.0.0.1:{port}->7007/udp"));
    ok(&vmc(h, &["rm", "-f", "udp"]));
    std::net::UdpSocket::bind(published).expect("the host port is free after rm -f");
    // -P publishes the image's EXPOSEd UDP port.
    ok(&vmc(
        h,
        &["run", "-d", "--mode", mode, "--name", "all", "-P", "udp"],
    ));
    assert!(ok(&vmc(h, &["port", "all"])).starts_with("7007/udp -> 0.0.0.0:"));
}

#[test]
fn udp_ports_in_namespace_mode() {
    if common::is_root() {
        udp_published("ns");
    }
}

#[test]
fn udp_ports_in_vm_mode() {
    if kvm_available() {
        udp_published("vm");
    }
}
