//! Published ports (`-p [IP:]HOST:CONTAINER[/tcp|/udp]`): vmc listens on the
//! host and carries every accepted connection into the container. VM mode:
//! over vsock to the guest agent, which connects to the port on the guest's
//! loopback (no TAP, no iptables). Namespace mode: a socket created inside
//! the container's network namespace connects to its loopback. Each
//! direction is copied by its own thread; an end-of-file becomes a
//! half-close on the other side.
//!
//! UDP has no connections: as Docker's userland proxy does, each client
//! address the host socket hears from gets a flow of its own (a socket
//! connected to the port inside the container, or a vsock stream to the
//! agent carrying length-prefixed datagrams), whose replies go back to that
//! client; a flow idle for [`UDP_IDLE`] is dropped, and at most
//! [`UDP_MAX_FLOWS`] live at once.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmc_proto::{GuestMsg, HostMsg, AGENT_PORT};

use super::agent::AgentConn;

/// A published port's protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One `-p` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub proto: Proto,
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} -> {}",
            self.container_port,
            self.proto,
            SocketAddr::new(self.host_ip, self.host_port)
        )
    }
}

/// How long a UDP flow lives without a datagram either way (Docker's
/// userland proxy: 90 s).
pub const UDP_IDLE: Duration = Duration::from_secs(90);
/// The most UDP flows (client addresses) one published port keeps.
pub const UDP_MAX_FLOWS: usize = 1024;
/// The largest datagram carried.
const UDP_MAX: usize = 65_535;

/// A `-p` that cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("-p {spec}: {why} (the form is [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp])")]
    Spec { spec: String, why: SpecProblem },
    #[error("-p {host_port}:{container_port}: {addr} is already in use: choose another host port")]
    InUse {
        host_port: u16,
        container_port: u16,
        addr: SocketAddr,
    },
    #[error("-p {host_port}:{container_port}: cannot listen on {addr}: {source}")]
    Listen {
        host_port: u16,
        container_port: u16,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// What is wrong with a `-p` specification.
#[derive(Debug, thiserror::Error)]
pub enum SpecProblem {
    #[error("only tcp and udp ports can be published")]
    NotTcp,
    #[error("'{0}' is not a port number (1-65535) or range (8000-8010)")]
    NotAPort(String),
    #[error("'{0}' is not an IP address (IPv6 in brackets: [::1]:8080:80)")]
    NotAnAddress(String),
    #[error("the host range and the container range are of different lengths")]
    RangeLengths,
    #[error("too many ':'")]
    TooManyColons,
}

/// `N` or `N-M` (inclusive): the ports, in order.
fn port_range(s: &str) -> Option<Vec<u16>> {
    let one = |s: &str| s.parse::<u16>().ok().filter(|p| *p > 0);
    match s.split_once('-') {
        None => one(s).map(|p| vec![p]),
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            (a <= b).then(|| (a..=b).collect())
        }
    }
}

/// Parses a `-p` as Docker does: `CONTAINER`, `HOST:CONTAINER`,
/// `IP:HOST:CONTAINER` or `IP::CONTAINER` (a host port left out, or 0, is
/// one the system chooses, free, when the run binds it), each port possibly
/// a range (`8000-8002:80-82`), the IP an IPv4 address or a bracketed IPv6
/// one (`[::1]:8080:80`), and `/tcp` or `/udp`.
pub fn parse(spec: &str) -> Result<Vec<PortMap>, PortError> {
    let bad = |why| PortError::Spec {
        spec: spec.to_string(),
        why,
    };
    let (body, proto) = spec.rsplit_once('/').unwrap_or((spec, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return Err(bad(SpecProblem::NotTcp)),
    };
    // A bracketed IPv6 address first, then ':'-separated ports.
    let (ip, rest) = match body.strip_prefix('[') {
        Some(b) => {
            let (addr, rest) = b
                .split_once("]:")
                .ok_or_else(|| bad(SpecProblem::NotAnAddress(body.to_string())))?;
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| bad(SpecProblem::NotAnAddress(addr.to_string())))?;
            (Some(ip), rest)
        }
        None => (None, body),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, container) = match (ip, parts.as_slice()) {
        (None, [c]) => (None, "", *c),
        (None, [h, c]) => (None, *h, *c),
        (Some(ip), [h, c]) => (Some(ip), *h, *c),
        (None, [ip, h, c]) => {
            let addr: IpAddr = ip
                .parse()
                .map_err(|_| bad(SpecProblem::NotAnAddress(ip.to_string())))?;
            (Some(addr), *h, *c)
        }
        _ => return Err(bad(SpecProblem::TooManyColons)),
    };
    let host_ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let containers =
        port_range(container).ok_or_else(|| bad(SpecProblem::NotAPort(container.to_string())))?;
    let hosts = match host {
        "" | "0" => vec![0; containers.len()],
        h => port_range(h).ok_or_else(|| bad(SpecProblem::NotAPort(h.to_string())))?,
    };
    if hosts.len() != containers.len() {
        return Err(bad(SpecProblem::RangeLengths));
    }
    Ok(hosts
        .into_iter()
        .zip(containers)
        .map(|(host_port, container_port)| PortMap {
            host_ip,
            host_port,
            container_port,
            proto,
        })
        .collect())
}

/// A published port's host socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(u) => u.local_addr(),
        }
    }
}

/// Binds every mapping's host address; fails with the address in use. A
/// host port of 0 is one the system chooses: the returned mapping says
/// which.
pub fn bind(maps: &[PortMap]) -> Result<Vec<(Listener, PortMap)>, PortError> {
    maps.iter()
        .map(|m| {
            let addr = SocketAddr::new(m.host_ip, m.host_port);
            match m.proto {
                Proto::Tcp => TcpListener::bind(addr).map(Listener::Tcp),
                Proto::Udp => UdpSocket::bind(addr).map(Listener::Udp),
            }
            .and_then(|l| {
                let port = l.local_addr()?.port();
                Ok((
                    l,
                    PortMap {
                        host_port: port,
                        ..*m
                    },
                ))
            })
            .map_err(|source| match source.kind() {
                io::ErrorKind::AddrInUse => PortError::InUse {
                    host_port: m.host_port,
                    container_port: m.container_port,
                    addr,
                },
                _ => PortError::Listen {
                    host_port: m.host_port,
                    container_port: m.container_port,
                    addr,
                    source,
                },
            })
        })
        .collect()
}

/// How a connection reaches the container.
#[derive(Clone)]
pub enum Target {
    /// The guest agent's vsock, through the VMM's Unix socket.
    Vm(PathBuf),
    /// The network namespace of this process (the container's PID 1).
    Ns(i32),
}

/// Listeners being served; dropping it stops them and closes their
/// sockets, so the host ports are free before the container's exit is
/// recorded (connections already accepted carry on).
pub struct Serving {
    listeners: Vec<(Arc<Listener>, std::thread::JoinHandle<()>)>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Serves the listeners until the returned guard is dropped.
pub fn serve(listeners: Vec<(Listener, PortMap)>, target: Target) -> Serving {
    use std::sync::atomic::{AtomicBool, Ordering};
    let target = Arc::new(target);
    let stopping = Arc::new(AtomicBool::new(false));
    let listeners = listeners
        .into_iter()
        .map(|(l, m)| {
            let l = Arc::new(l);
            let (l2, target, stopping) = (l.clone(), target.clone(), stopping.clone());
            let serving = std::thread::spawn(move || match &*l2 {
                Listener::Tcp(tcp) => loop {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            let target = target.clone();
                            std::thread::spawn(move || {
                                if let Err(e) = forward(conn, m.container_port, &target) {
                                    log::info!("port {}: {e}", m.container_port);
                                }
                            });
                        }
                        Err(_) if stopping.load(Ordering::SeqCst) => return,
                        // Out of descriptors and the like: not a reason to
                        // stop serving, nor to spin.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                },
                Listener::Udp(udp) => serve_udp(udp, m.container_port, &target, &stopping),
            });
            (l, serving)
        })
        .collect();
    Serving {
        listeners,
        stopping,
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (l, serving) in self.listeners.drain(..) {
            // shutdown(2) of a listening socket makes a blocked accept(2)
            // return (EINVAL); of a UDP socket, a blocked receive return
            // (the kernel wakes its readers even when it is not
            // connected). The thread ends and drops its reference.
            let fd = match &*l {
                Listener::Tcp(t) => t.as_raw_fd(),
                Listener::Udp(u) => u.as_raw_fd(),
            };
            // SAFETY: shutdown on a socket this struct keeps open.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            let _ = serving.join();
        }
    }
}

/// One UDP client's way into the container.
trait Flow: Send + Sync {
    /// Passes a datagram from the client in.
    fn send(&self, data: &[u8]) -> io::Result<()>;
    /// The next datagram from the container; None once the flow ended.
    fn recv(&self, buf: &mut [u8]) -> Option<usize>;
    /// Ends the flow (its `recv` returns None).
    fn close(&self);
}

/// A namespace container's flow: a UDP socket connected to its loopback.
struct NsFlow {
    sock: UdpSocket,
    closed: std::sync::atomic::AtomicBool,
}

impl Flow for NsFlow {
    fn send(&self, data: &[u8]) -> io::Result<()> {
        self.sock.send(data).map(|_| ())
    }

    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        use std::sync::atomic::Ordering;
        loop {
            match self.sock.recv(buf) {
                // A shut-down socket reads as empty datagrams: the flow's
                // end (a real empty datagram is passed on).
                _ if self.closed.load(Ordering::SeqCst) => return None,
                Ok(n) => return Some(n),
                // Nothing listens there (yet): the flow goes on.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(_) => return None,
            }
        }
    }

    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: shutdown on our own socket; wakes its reader.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A microVM's flow: a vsock stream to the agent after `ConnectUdp`, each
/// datagram a frame of a little-endian u16 length and the bytes.
struct VsockFlow {
    read: std::sync::Mutex<std::os::unix::net::UnixStream>,
    write: std::sync::Mutex<std::os::unix::net::UnixStream>,
}

impl Flow for VsockFlow {
    fn send(&self, data: &[u8]) -> io::Result<()> {
        let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let len = u16::try_from(data.len()).map_err(io::Error::other)?;
        let mut frame = Vec::with_capacity(2 + data.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(data);
        w.write_all(&frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        let mut r = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let mut len = [0u8; 2];
        r.read_exact(&mut len).ok()?;
        let n = u16::from_le_bytes(len) as usize;
        // The guest's lengths are checked: no more than the buffer.
        if n > buf.len() {
            return None;
        }
        r.read_exact(&mut buf[..n]).ok()?;
        Some(n)
    }

    fn close(&self) {
        let w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.shutdown(Shutdown::Both);
    }
}

/// Opens a flow to UDP `port` in the container.
fn open_flow(port: u16, target: &Target) -> io::Result<Arc<dyn Flow>> {
    match target {
        Target::Ns(pid) => {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
            let sock = std::thread::spawn(move || {
                // SAFETY: setns on an open namespace file, in this
                // short-lived thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                let s = UdpSocket::bind(("127.0.0.1", 0))?;
                s.connect(("127.0.0.1", port))?;
                Ok(s)
            })
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))??;
            Ok(Arc::new(NsFlow {
                sock,
                closed: std::sync::atomic::AtomicBool::new(false),
            }))
        }
        Target::Vm(uds) => {
            let mut watch = super::microvm::process_watch(std::process::id());
            let mut agent =
                AgentConn::connect(uds, AGENT_PORT, &mut watch).map_err(io::Error::other)?;
            match agent
                .request(&HostMsg::ConnectUdp { port }, &mut watch)
                .map_err(io::Error::other)?
            {
                GuestMsg::Connected => {}
                other => return Err(io::Error::other(format!("{other:?}"))),
            }
            let stream = agent.into_stream();
            Ok(Arc::new(VsockFlow {
                read: std::sync::Mutex::new(stream.try_clone()?),
                write: std::sync::Mutex::new(stream),
            }))
        }
    }
}

/// Serves one published UDP port until `stopping` (and its socket's
/// shutdown): a flow per client address.
fn serve_udp(
    udp: &UdpSocket,
    port: u16,
    target: &Arc<Target>,
    stopping: &std::sync::atomic::AtomicBool,
) {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    let _ = udp.set_read_timeout(Some(Duration::from_secs(1)));
    let reply = match udp.try_clone() {
        Ok(r) => Arc::new(r),
        Err(_) => return,
    };
    let mut flows: HashMap<SocketAddr, (Arc<dyn Flow>, Instant)> = HashMap::new();
    // The reply threads, joined at the end: each holds the host socket.
    let mut repliers = Vec::new();
    let mut buf = vec![0u8; UDP_MAX];
    while !stopping.load(Ordering::SeqCst) {
        let got = udp.recv_from(&mut buf);
        let now = Instant::now();
        flows.retain(|_, (flow, last)| {
            let live = now.duration_since(*last) < UDP_IDLE;
            if !live {
                flow.close();
            }
            live
        });
        repliers.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
        let (n, client) = match got {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        if !flows.contains_key(&client) {
            if flows.len() >= UDP_MAX_FLOWS {
                log::info!("udp port {port}: {UDP_MAX_FLOWS} flows live; a datagram from {client} is dropped");
                continue;
            }
            let flow = match open_flow(port, target) {
                Ok(f) => f,
                Err(e) => {
                    log::info!("udp port {port}: {e}");
                    continue;
                }
            };
            let (back, reply) = (flow.clone(), reply.clone());
            repliers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; UDP_MAX];
                while let Some(n) = back.recv(&mut buf) {
                    if reply.send_to(&buf[..n], client).is_err() {
                        break;
                    }
                }
            }));
            flows.insert(client, (flow, now));
        }
        if let Some((flow, last)) = flows.get_mut(&client) {
            *last = now;
            if flow.send(&buf[..n]).is_err() {
                flow.close();
                flows.remove(&client);
            }
        }
    }
    for (flow, _) in flows.values() {
        flow.close();
    }
    for t in repliers {
        let _ = t.join();
    }
}

fn forward(client: TcpStream, port: u16, target: &Target) -> io::Result<()> {
    match target {
        Target::Vm(uds) => {
            // This process runs the VM: its threads tell whether the guest
            // (perhaps still booting) works towards answering.
            let mut watch = super::microvm::process_watch(std::process::id());
            let mut agent =
                AgentConn::connect(uds, AGENT_PORT, &mut watch).map_err(io::Error::other)?;
            match agent
                .request(&HostMsg::Connect { port }, &mut watch)
                .map_err(io::Error::other)?
            {
                GuestMsg::Connected => {}
                other => return Err(io::Error::other(format!("{other:?}"))),
            }
            let inner = agent.into_stream();
            let inner2 = inner.try_clone()?;
            relay(
                client,
                Box::new(inner),
                Box::new(inner2),
                move |s: &std::os::unix::net::UnixStream| {
                    let _ = s.shutdown(Shutdown::Write);
                },
            );
            Ok(())
        }
        Target::Ns(pid) => {
            let inner = connect_in_netns(*pid, port)?;
            let inner2 = inner.try_clone()?;
            relay(
                client,
                Box::new(inner),
                Box::new(inner2),
                |s: &TcpStream| {
                    let _ = s.shutdown(Shutdown::Write);
                },
            );
            Ok(())
        }
    }
}

/// Connects to 127.0.0.1:`port` inside the network namespace of `pid`, from
/// a thread that enters it (setns affects only the calling thread; the
/// socket keeps the namespace it was created in).
fn connect_in_netns(pid: i32, port: u16) -> io::Result<TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace file, in this short-lived thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        TcpStream::connect(("127.0.0.1", port))
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Copies both ways between `client` and the inner stream.
fn relay<S: Read + Write + Send + 'static>(
    client: TcpStream,
    inner_read: Box<S>,
    inner_write: Box<S>,
    shutdown_inner: impl Fn(&S) + Send + 'static,
) {
    let Ok(client_read) = client.try_clone() else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut r = client_read;
        let mut w = inner_write;
        let _ = io::copy(&mut r, &mut *w);
        shutdown_inner(&w);
    });
    let mut r = inner_read;
    let mut w = client;
    let _ = io::copy(&mut *r, &mut w);
    let _ = w.shutdown(Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_guard_frees_the_host_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let m = PortMap {
            host_ip: addr.ip(),
            host_port: addr.port(),
            container_port: 1,
            proto: Proto::Tcp,
        };
        let serving = serve(
            vec![(Listener::Tcp(l), m)],
            Target::Ns(std::process::id() as i32),
        );
        // Served: accepted (the forward then fails and drops it).
        assert!(TcpStream::connect(addr).is_ok());
        drop(serving);
        assert!(TcpStream::connect(addr).is_err(), "still accepting");
        TcpListener::bind(addr).expect("the port is free again");
    }

    #[test]
    fn port_specs_parse_like_docker() {
        let one = |s: &str| {
            let v = parse(s).unwrap();
            assert_eq!(v.len(), 1, "{s}");
            v[0]
        };
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let m = one("8080:80");
        assert_eq!((m.host_ip, m.host_port, m.container_port), (any, 8080, 80));
        let m = one("127.0.0.1:3000:3000/tcp");
        assert_eq!(m.host_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((m.host_port, m.container_port), (3000, 3000));
        // A host port left out (or 0) is chosen when bound.
        assert_eq!((one("80").host_port, one("80").container_port), (0, 80));
        assert_eq!(one("0:80").host_port, 0);
        let m = one("127.0.0.1::80");
        assert_eq!((m.host_port, m.container_port), (0, 80));
        let m = one("[::1]:8080:80");
        assert_eq!(m.host_ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(one("[::]::80").host_port, 0);
        assert_eq!(one("80").proto, Proto::Tcp);
        let m = one("127.0.0.1:5353:53/udp");
        assert_eq!(
            (m.host_port, m.container_port, m.proto),
            (5353, 53, Proto::Udp)
        );
        assert_eq!(m.to_string(), "53/udp -> 127.0.0.1:5353");
        let r = parse("8000-8002:80-82").unwrap();
        let pairs: Vec<(u16, u16)> = r.iter().map(|m| (m.host_port, m.container_port)).collect();
        assert_eq!(pairs, [(8000, 80), (8001, 81), (8002, 82)]);
        assert_eq!(parse("80-81").unwrap().len(), 2);
        for bad in [
            "a:80",
            "80:70000",
            "1.2.3:80:80",
            "80:80/sctp",
            "",
            "8000-8001:80",
            "9-8:80",
            "[::1:80:80",
            "1:2:3:4",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse("a:80").unwrap_err();
        assert!(
            matches!(&e, PortError::Spec { why: SpecProblem::NotAPort(p), .. } if p == "a"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "-p a:80: 'a' is not a port number (1-65535) or range (8000-8010) (the form is [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp])"
        );
        // A port the system chooses is a real, free one.
        let bound = bind(&[one("127.0.0.1::80")]).unwrap();
        assert_ne!(bound[0].1.host_port, 0);
        assert_eq!(
            bound[0].0.local_addr().unwrap().port(),
            bound[0].1.host_port
        );
    }

    /// A published UDP port: each client's datagrams reach the port
    /// inside the (here: this process's own) network namespace from a flow
    /// of its own, and the replies come back from the published address;
    /// a second client is a second flow. Dropping the guard frees the port.
    #[test]
    fn udp_datagrams_go_in_and_replies_come_back_per_client() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: setns into a network namespace needs root");
            return;
        }
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut b) {
                let mut r = b"echo:".to_vec();
                r.extend_from_slice(&b[..n]);
                let _ = echo.send_to(&r, from);
            }
        });
        let maps = parse(&format!("127.0.0.1::{inner}/udp")).unwrap();
        let bound = bind(&maps).unwrap();
        let published = SocketAddr::new(maps[0].host_ip, bound[0].1.host_port);
        let serving = serve(bound, Target::Ns(std::process::id() as i32));
        for who in ["a", "b"] {
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            client.send_to(who.as_bytes(), published).unwrap();
            let mut b = [0u8; 64];
            let (n, from) = client.recv_from(&mut b).unwrap();
            assert_eq!(&b[..n], format!("echo:{who}").as_bytes());
            assert_eq!(from, published);
        }
        drop(serving);
        UdpSocket::bind(published).expect("the port is free again");
    }

    #[test]
    fn a_port_in_use_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let m = parse(&format!("127.0.0.1:{port}:80")).unwrap();
        let e = bind(&m).unwrap_err();
        assert!(matches!(e, PortError::InUse { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("-p {port}:80: 127.0.0.1:{port} is already in use: choose another host port")
        );
    }
}
