//! The network scenarios: traffic through published ports (a service
//! sandbox running echo, sink and source servers) and over connections the
//! sandbox opens to the host, with the TCP helpers they use.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{argv, Bench, Metric, NET_RTT, NET_UP, PORT_DOWN, PORT_RTT, PORT_UP, STEP_TIMEOUT};
use crate::bench::runtimes::{MeasureError, Runtime, Sandbox, StartOpts};

impl Bench {
    pub(super) fn start_service(&self, rt: &Runtime) -> Result<(Sandbox, [u16; 3]), MeasureError> {
        let ports = [free_port()?, free_port()?, free_port()?];
        let chunks = self.sizes.transfer_kib / 64;
        let script = format!(
            "nc -ll -p 7001 -e cat & nc -ll -p 7002 -e wc -c & \
             nc -ll -p 7003 -e sh -c 'dd if=/dev/zero bs=64k count={chunks} 2>/dev/null' & wait"
        );
        let opts = StartOpts {
            network_none: false,
            ports: vec![(ports[0], 7001), (ports[1], 7002), (ports[2], 7003)],
            volume: None,
        };
        let sb = self.env.start(rt, &argv(&["sh", "-c", &script]), &opts)?;
        // Ready when the echo server answers.
        let end = Instant::now() + STEP_TIMEOUT;
        loop {
            let ok = connect(ports[0], Duration::from_secs(60)).and_then(|mut s| {
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            });
            if ok.is_ok() {
                return Ok((sb, ports));
            }
            if Instant::now() > end {
                self.env.remove(&sb);
                return Err(MeasureError::Missing("its echo server never answered"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(super) fn port_run(&self, rt: &Runtime) -> Result<Vec<(Metric, f64)>, MeasureError> {
        let (_, ports) = &self.service[&rt.name];
        let mut out = Vec::new();
        let io = MeasureError::io("published port");
        // Round trips on one connection.
        let mut s = connect(ports[0], STEP_TIMEOUT).map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        for (_, rtt) in ping_pong(&mut s, self.sizes.pings).map_err(io)? {
            out.push((PORT_RTT, rtt));
        }
        drop(s);
        let bytes = (self.sizes.transfer_kib * 1024) as usize;
        let mb = bytes as f64 / 1e6;
        // Upload: the sink answers with the byte count.
        let t0 = Instant::now();
        let mut s = connect(ports[1], STEP_TIMEOUT).map_err(io)?;
        s.write_all(&vec![0u8; bytes]).map_err(io)?;
        s.shutdown(Shutdown::Write).map_err(io)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(io)?;
        let secs = t0.elapsed().as_secs_f64();
        if reply.trim() != bytes.to_string() {
            return Err(MeasureError::Short {
                what: "the sink counted",
                got: reply.trim().to_string(),
                want: bytes as u64,
            });
        }
        out.push((PORT_UP, mb / secs));
        // Download.
        let t0 = Instant::now();
        let mut s = connect(ports[2], STEP_TIMEOUT).map_err(io)?;
        let got = std::io::copy(&mut s, &mut std::io::sink()).map_err(io)?;
        let secs = t0.elapsed().as_secs_f64();
        if got != bytes as u64 {
            return Err(MeasureError::Short {
                what: "the source sent",
                got: got.to_string(),
                want: bytes as u64,
            });
        }
        out.push((PORT_DOWN, mb / secs));
        Ok(out)
    }

    pub(super) fn net_run(
        &self,
        rt: &Runtime,
        gw: std::net::Ipv4Addr,
    ) -> Result<Vec<(Metric, f64)>, MeasureError> {
        let (sb, _) = &self.service[&rt.name];
        let io = MeasureError::io("outbound");
        let bytes = self.sizes.transfer_kib * 1024;
        let mut out = Vec::new();
        // Throughput: the sandbox sends, the host counts.
        let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let port = l.local_addr().map_err(io)?.port();
        let script = format!(
            "dd if=/dev/zero bs=64k count={} 2>/dev/null | nc {gw} {port}",
            bytes / 65536
        );
        let mut child = self
            .env
            .exec(sb, &argv(&["sh", "-c", &script]))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io)?;
        let r = accept_timeout(&l, STEP_TIMEOUT).and_then(|(mut s, t0)| {
            s.set_read_timeout(Some(STEP_TIMEOUT))?;
            let mut got = 0u64;
            let mut buf = vec![0u8; 65536];
            while got < bytes {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok((got, t0.elapsed().as_secs_f64()))
        });
        let status = wait_timeout(&mut child, STEP_TIMEOUT);
        let (got, secs) = r.map_err(|source| MeasureError::Outbound {
            source,
            status: status_text(status, &mut child),
        })?;
        if got != bytes {
            return Err(MeasureError::Short {
                what: "the host received",
                got: got.to_string(),
                want: bytes,
            });
        }
        out.push((NET_UP, bytes as f64 / 1e6 / secs));
        // Round trips on a connection the sandbox opened.
        let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let port = l.local_addr().map_err(io)?.port();
        let mut child = self
            .env
            .exec(
                sb,
                &argv(&["nc", &gw.to_string(), &port.to_string(), "-e", "cat"]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io)?;
        let r = accept_timeout(&l, STEP_TIMEOUT).and_then(|(mut s, _)| {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(STEP_TIMEOUT))?;
            ping_pong(&mut s, self.sizes.pings)
        });
        let status = wait_timeout(&mut child, STEP_TIMEOUT);
        let pings = r.map_err(|source| MeasureError::Outbound {
            source,
            status: status_text(status, &mut child),
        })?;
        for (_, rtt) in pings {
            out.push((NET_RTT, rtt));
        }
        Ok(out)
    }
}

/// A connection to a published port on 127.0.0.1 whose reads give up
/// after `timeout`.
fn connect(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn free_port() -> Result<u16, MeasureError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(MeasureError::io("finding a free port"))
}

/// Sends one byte and reads its echo `n` times; each round trip in ms.
fn ping_pong(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    for i in 0..n {
        let t0 = Instant::now();
        s.write_all(b"p")?;
        s.read_exact(&mut b)?;
        out.push((i, t0.elapsed().as_secs_f64() * 1000.0));
    }
    Ok(out)
}

fn accept_timeout(l: &TcpListener, t: Duration) -> std::io::Result<(TcpStream, Instant)> {
    l.set_nonblocking(true)?;
    let end = Instant::now() + t;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok((s, Instant::now()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > end {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the sandbox never connected",
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + t;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn status_text(s: Option<std::process::ExitStatus>, child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    match s {
        Some(s) => format!("the client ended with {s}: {}", err.trim()),
        None => "the client did not end".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_round_trips_over_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b).unwrap();
            }
        });
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let p = ping_pong(&mut s, 5).unwrap();
        assert_eq!(p.len(), 5);
        assert!(p.iter().all(|(_, ms)| *ms >= 0.0));
        drop(s);
        echo.join().unwrap();
    }
}
