//! Outbound networking (`--network passt|none`), traffic to loopback only:
//! the container fetches a page from an HTTP server the test runs on the
//! host's 127.0.0.1 (reached through passt's mapping of the gateway to the
//! host, which every run and build here asks for with `--add-host
//! host.vmc.internal:host-gateway`; without it, see tests/security.rs), resolves a name through a DNS server the test runs on the host's
//! 127.0.0.1:53, has no route with `--network none`, gets Docker's
//! /etc/resolv.conf, /etc/hosts and /etc/hostname, and leaves no pasta
//! process behind.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;

use common::{network_helpers, ok, store_with_busybox, vmc};

/// An HTTP server on 127.0.0.1 answering every request with `body`.
fn http_server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A DNS server on 127.0.0.1:53 that answers every A query with `addr`.
fn dns_server(addr: [u8; 4]) {
    let sock = UdpSocket::bind("127.0.0.1:53").expect("port 53 on 127.0.0.1 is free");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            // The question: labels up to a zero byte, then type and class.
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += buf[end] as usize + 1;
            }
            let qend = end + 5;
            if qend > n {
                continue;
            }
            let qtype = u16::from_be_bytes([buf[end + 1], buf[end + 2]]);
            let mut resp = buf[..qend].to_vec();
            resp[2] = 0x81; // response, recursion desired
            resp[3] = 0x80; // recursion available, no error
            resp[6..8].copy_from_slice(&(u16::from(qtype == 1)).to_be_bytes()); // answers
            resp[8..12].fill(0);
            if qtype == 1 {
                // Name pointer to the question, A, IN, TTL 60, 4 bytes.
                resp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                resp.extend_from_slice(&addr);
            }
            let _ = sock.send_to(&resp, from);
        }
    });
}

/// pasta processes serving containers of the store at `home` (their
/// command line names a namespace under it).
fn pasta_processes(home: &Path) -> usize {
    let needle = format!("--netns {}", home.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(&needle)
            })
        })
        .count()
}

/// A build context whose Dockerfile's RUN step fetches `url` into /fetched
/// and copies the resolv.conf it sees to /resolv-seen (and fails without
/// the --add-host name in its /etc/hosts); CMD prints /fetched.
fn fetching_context(url: &str) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM busybox\nRUN wget -q -O /fetched {url} && cat /etc/resolv.conf >/resolv-seen \
             && grep -q 'host.vmc.internal' /etc/hosts\n\
             CMD [\"cat\", \"/fetched\"]\n"
        ),
    )
    .unwrap();
    ctx
}

/// After a build from [`fetching_context`]: its RUN step saw the host's
/// nameservers in /etc/resolv.conf, which busybox does not have, and the
/// image still has none (the placeholder mounted over stayed out of the
/// layer).
fn check_build_resolv_conf(h: &Path, image: &str) {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let seen = ok(&run(
        h,
        &["--network", "none", image, "cat", "/resolv-seen"],
    ));
    assert_eq!(seen, vmc::runtime::net::resolv_conf(&host, &[]), "{image}");
    let paths = layer_paths(h, image);
    assert!(paths.contains("resolv-seen"), "{image}: {paths}");
    assert!(!paths.contains("resolv.conf"), "{image}: {paths}");
    assert!(!paths.contains("etc/hosts"), "{image}: {paths}");
}

/// The paths in all layers of `image`, one per line, from `vmc save`.
fn layer_paths(h: &Path, image: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    ok(&vmc(h, &["save", "-o", archive.to_str().unwrap(), image]));
    let listing = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd \"$0\" && tar -xf image.tar && for b in blobs/sha256/*; do tar -tf \"$b\" 2>/dev/null; done")
        .arg(dir.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&listing.stdout).into_owned()
}

/// Opens the host's loopback to the sandbox through the gateway (and names
/// the gateway `host.vmc.internal`).
const HOST_LOOPBACK: [&str; 2] = ["--add-host", "host.vmc.internal:host-gateway"];

fn run(h: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "run",
        "--rm",
        "--mode",
        "ns",
        HOST_LOOPBACK[0],
        HOST_LOOPBACK[1],
    ];
    all.extend_from_slice(args);
    vmc(h, &all)
}

/// One test, so that the process counts are not disturbed by another
/// test's sandboxes, and one DNS server on port 53.
#[test]
fn networking_in_both_modes() {
    let gw = vmc::runtime::net::host_gateway()
        .expect("a default route (passt copies the host's)")
        .to_string();
    let home = store_with_busybox();
    let h = home.path();
    let port = http_server("hello from the host");
    dns_server([10, 11, 12, 13]);
    // Alongside the rest (each in its own store, so as not to disturb the
    // process counts).
    let mut quiet = Vec::new();
    if common::is_root() {
        quiet.push(quiet_connection("ns", gw.clone()));
    }
    if common::kvm_available() {
        quiet.push(quiet_connection("vm", gw.clone()));
    }
    if common::is_root() {
        namespace_mode(h, &gw, port);
    }
    if common::kvm_available() {
        vm_mode(h, &gw, port);
    }
    for t in quiet {
        t.join().unwrap();
    }
}

/// A connection the container opens and keeps quiet for 26 s before it
/// sends: the host's listener, which never writes, still gets the bytes.
/// (Debian 12's passt reset such connections after 24 s; scripts/passt.sh.)
fn quiet_connection(mode: &'static str, gw: String) -> std::thread::JoinHandle<()> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let home = store_with_busybox();
        let receiver = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(100))
                    }
                    Err(e) => panic!("{mode}: the container never connected: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
                .unwrap();
            let mut got = Vec::new();
            let r = s.read_to_end(&mut got);
            (r.map_err(|e| e.to_string()), got)
        });
        ok(&vmc(
            home.path(),
            &[
                "run",
                "--rm",
                "--mode",
                mode,
                HOST_LOOPBACK[0],
                HOST_LOOPBACK[1],
                "busybox",
                "sh",
                "-c",
                "(sleep 26; echo late) | nc \"$0\" \"$1\"",
                &gw,
                &port,
            ],
        ));
        let (r, got) = receiver.join().unwrap();
        assert_eq!(r, Ok(5), "{mode}: the quiet connection broke");
        assert_eq!(got, b"late\n", "{mode}");
    })
}

fn namespace_mode(h: &Path, gw: &str, port: u16) {
    // The gateway address leads to the host's loopback, by its address
    // and by the name --add-host gave it.
    let url = format!("http://{gw}:{port}/");
    let out = ok(&run(h, &["busybox", "wget", "-q", "-O", "-", &url]));
    assert_eq!(out, "hello from the host");
    let by_name = format!("http://host.vmc.internal:{port}/");
    let out = ok(&run(h, &["busybox", "wget", "-q", "-O", "-", &by_name]));
    assert_eq!(out, "hello from the host");
    let out = ok(&run(
        h,
        &["--network", "passt", "busybox", "sh", "-c", "ip route"],
    ));
    assert!(out.contains(&format!("default via {gw}")), "{out}");

    // DNS: --dns puts the gateway in resolv.conf; the query reaches the
    // test's server on the host's 127.0.0.1:53 through pasta.
    let out = ok(&run(
        h,
        &[
            "--dns",
            gw,
            "busybox",
            "sh",
            "-c",
            "cat /etc/resolv.conf; nslookup vmc-test.example",
        ],
    ));
    assert!(out.starts_with(&format!("nameserver {gw}\n")), "{out}");
    assert!(out.contains("Address: 10.11.12.13"), "{out}");

    // Docker's /etc files, over the image's (which stay untouched).
    let out = ok(&run(
        h,
        &[
            "--hostname",
            "web1",
            "busybox",
            "sh",
            "-c",
            "cat /etc/hostname; grep web1 /etc/hosts; grep -c localhost /etc/hosts",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "web1");
    assert!(lines[1].ends_with("\tweb1"), "{out}");
    assert_eq!(lines[2], "2");

    // --network none: loopback only, no route out.
    let o = run(
        h,
        &[
            "--network",
            "none",
            "busybox",
            "sh",
            "-c",
            "ip route; ip -o link | cut -d: -f2; nc -w 3 \"$0\" 80 </dev/null",
            gw,
        ],
    );
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "lo", "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{o:?}"
    );

    // Builds: RUN steps get the network; --network none takes it away.
    let ctx = fetching_context(&url);
    let ctx_s = ctx.path().to_str().unwrap();
    ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            HOST_LOOPBACK[0],
            HOST_LOOPBACK[1],
            "-q",
            "-t",
            "fetched",
            ctx_s,
        ],
    ));
    assert_eq!(ok(&run(h, &["fetched"])), "hello from the host");
    check_build_resolv_conf(h, "fetched");
    let o = vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "--no-cache",
            "--network",
            "none",
            "-t",
            "nonet",
            ctx_s,
        ],
    );
    assert!(!o.status.success(), "{o:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.contains("Network is unreachable"), "{all}");

    // Bad modes are clear errors.
    let o = run(h, &["--network", "bridge", "busybox", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown network mode"));

    // A detached container's pasta goes with it.
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", "ns", "--name", "net", "busybox", "sleep", "600",
        ],
    ));
    // Its pasta runs (with, at times, a clone pasta makes for namespace
    // work: same command line), and none is left after rm.
    assert!(pasta_processes(h) >= 1, "no pasta for the container");
    ok(&vmc(h, &["rm", "-f", "net"]));
    common::eventually("the container's pasta to end after rm -f", || {
        (pasta_processes(h) == 0).then_some(())
    });
}

fn vm_mode(h: &Path, gw: &str, port: u16) {
    let vm = |args: &[&str]| {
        let mut all = vec!["run", "--rm", HOST_LOOPBACK[0], HOST_LOOPBACK[1]];
        all.extend_from_slice(args);
        vmc(h, &all)
    };
    // One guest does it all: its address and route, a page from the host's
    // loopback through the gateway, a name through the test's DNS server,
    // Docker's /etc files.
    let url = format!("http://{gw}:{port}/");
    let script = "ip -4 -o addr show eth0 | cut -d' ' -f7; ip route | grep default; \
                  wget -q -O - \"$0\"; echo; nslookup vmc-test.example | grep '^Address: 10'; \
                  cat /etc/hostname; grep -c localhost /etc/hosts";
    // VMC_PASST_PCAP: passt records the VM's frames to a file for tcpdump.
    // passt opens it after dropping to nobody: a directory nobody may write.
    let pcap_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        pcap_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let pcap = pcap_dir.path().join("frames.pcap");
    let out = ok(&common::vmc_command(h)
        .env("VMC_PASST_PCAP", &pcap)
        .args(["run", "--rm", HOST_LOOPBACK[0], HOST_LOOPBACK[1]])
        .args([
            "--dns",
            gw,
            "--hostname",
            "vm1",
            "busybox",
            "sh",
            "-c",
            script,
            &url,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap());
    let frames = std::fs::read(&pcap).unwrap_or_default();
    assert!(
        frames.starts_with(&[0xd4, 0xc3, 0xb2, 0xa1]) && frames.len() > 24 + 1000,
        "VMC_PASST_PCAP={} holds no capture of the run's frames ({} bytes)",
        pcap.display(),
        frames.len()
    );
    let lines: Vec<&str> = out.lines().collect();
    let host = vmc::runtime::net::host_ipv4().unwrap();
    assert_eq!(
        lines[0],
        format!("{}/{}", host.address, host.prefix),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("default via {gw} dev eth0")),
        "{out}"
    );
    assert_eq!(lines[2], "hello from the host", "{out}");
    assert_eq!(lines[3], "Address: 10.11.12.13", "{out}");
    assert_eq!(lines[4], "vm1", "{out}");
    assert_eq!(lines[5], "2", "{out}");

    // --network none: the NIC is there (the snapshot's guest has it) but
    // unconfigured: no route out.
    let o = vm(&[
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "ip route; nc -w 3 \"$0\" 80 </dev/null",
        gw,
    ]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{o:?}"
    );

    // A build's RUN steps in a microVM have the network.
    let ctx = fetching_context(&url);
    ok(&vmc(
        h,
        &[
            "build",
            "-q",
            // The same Dockerfile was built in namespace mode above: without
            // --no-cache its RUN would come from the cache, no VM started.
            "--no-cache",
            HOST_LOOPBACK[0],
            HOST_LOOPBACK[1],
            "-t",
            "vmfetched",
            ctx.path().to_str().unwrap(),
        ],
    ));
    assert_eq!(
        ok(&vm(&["--mode", "ns", "vmfetched"])),
        "hello from the host"
    );
    check_build_resolv_conf(h, "vmfetched");
    // A COPY over the bound resolv.conf (the agent unbinds it while a
    // layer is applied), then a RUN step: the image keeps the copied file.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("resolv.conf"), "nameserver 10.9.9.9\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY resolv.conf /etc/resolv.conf\nRUN echo ran >/ran\n",
    )
    .unwrap();
    ok(&vmc(
        h,
        &[
            "build",
            "-q",
            "-t",
            "ownresolv",
            ctx.path().to_str().unwrap(),
        ],
    ));
    let paths = layer_paths(h, "ownresolv");
    assert!(
        paths.contains("etc/resolv.conf") && paths.contains("ran"),
        "{paths}"
    );

    // Ten more networked VMs, two at a time, that end by themselves, leave
    // no passt behind (tests/many.rs kills ten more with rm -f: twenty).
    let h = h.to_path_buf();
    // The most passt processes seen while they run.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (h, done) = (h.clone(), done.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(network_helpers(&h));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            most
        })
    };
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    ok(&vmc(&h, &["run", "--rm", "busybox", "true"]));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = watcher.join().unwrap();
    assert!(most >= 1, "no passt seen while the VMs ran");
    common::eventually("every VM's passt to end", || {
        (network_helpers(&h) == 0).then_some(())
    });
}
