//! Container networking without TAP devices or host firewall rules.
//!
//! `--network passt` (the default where passt is installed): namespace
//! mode attaches `pasta` (passt's namespace mode) to the container's network
//! namespace. pasta makes a tap interface in it with the host's address,
//! routes and MTU, and carries the container's TCP, UDP and ICMP through
//! ordinary sockets of its own on the host; the gateway address leads to the
//! host's loopback. `--network none` leaves the namespace with loopback only.
//! Either way the container gets its own /etc/resolv.conf, /etc/hosts and
//! /etc/hostname, bind-mounted over the image's, as Docker does.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vmm::progress::{Threads, Verdict, Watchdog};

/// An `--add-host` entry: NAME on an address, or on the gateway
/// (`host-gateway`), which then leads to the host's loopback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtraHost {
    pub name: String,
    /// `None`: the gateway address (`host-gateway`).
    pub ip: Option<std::net::IpAddr>,
}

impl ExtraHost {
    /// Parses Docker's `NAME:IP` (or `NAME=IP`), IP an address or
    /// `host-gateway`.
    pub fn parse(s: &str) -> Result<ExtraHost, NetError> {
        let bad = || NetError::BadExtraHost(s.to_string());
        let (name, addr) = s
            .split_once('=')
            .or_else(|| s.split_once(':'))
            .ok_or_else(bad)?;
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !name_ok {
            return Err(bad());
        }
        let ip = match addr {
            "host-gateway" => None,
            a => Some(
                a.trim_matches(|c| c == '[' || c == ']')
                    .parse()
                    .map_err(|_| bad())?,
            ),
        };
        Ok(ExtraHost {
            name: name.to_string(),
            ip,
        })
    }
}

/// What goes wrong choosing or setting up a container's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--add-host '{0}': use NAME:IP or NAME:host-gateway")]
    BadExtraHost(String),
    #[error(
        "--network passt: passt is not installed (apt-get install passt), or use --network none"
    )]
    NoPasst,
    #[error("--network {0}: unknown network mode (use passt or none)")]
    UnknownMode(String),
    #[error("starting {tool}: {source} (apt-get install passt)")]
    Start {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("the container's network namespace is gone before pasta configured it ({0})")]
    NamespaceGone(std::io::Error),
    #[error("pasta exited ({status}): {stderr}")]
    PastaExited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("pasta is running but did not configure the container's network ({0})")]
    PastaStuck(String),
    #[error("the network namespace's interface for the VM: {0}")]
    Mirror(String),
}

/// Whether the sandbox may reach the host's loopback services through the
/// gateway address: only when asked for (`--add-host NAME:host-gateway`).
/// By default passt and pasta get `--no-map-gw`, as Docker's default bridge
/// leaves a host's 127.0.0.1-only services out of reach.
pub fn maps_host_loopback(extra: &[ExtraHost]) -> bool {
    extra.iter().any(|h| h.ip.is_none())
}

/// How a container reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Loopback only.
    #[default]
    None,
    /// User-mode networking through passt (VM) or pasta (namespaces).
    Passt,
}

impl Network {
    /// `--network MODE`; without it, passt where it is installed.
    pub fn choose(requested: Option<&str>) -> Result<Network, NetError> {
        match requested {
            // As Docker's default bridge: there when it can work (passt
            // needs a host route to copy), loopback only otherwise.
            None => Ok(if program(PASTA).is_some() && host_ipv4().is_some() {
                Network::Passt
            } else {
                Network::None
            }),
            Some("none") => Ok(Network::None),
            Some("passt" | "pasta") => {
                if program(PASTA).is_some() {
                    Ok(Network::Passt)
                } else {
                    Err(NetError::NoPasst)
                }
            }
            Some(other) => Err(NetError::UnknownMode(other.to_string())),
        }
    }
}

const PASTA: &str = "pasta";

/// Whether this user can open /dev/net/tun read-write, which pasta needs
/// to give a container an interface (rootless namespace mode: root always
/// can). Without it, rootless containers default to `--network none`.
pub fn tun_usable() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
}
const PASST: &str = "passt";

/// Where `name` (passt, or pasta: the same program) runs from: the assets
/// directory, where `make setup` builds a newer passt when the system's is
/// Debian 12's (scripts/passt.sh: that one resets quiet connections after
/// 24 s), else `$PATH`.
pub fn program(name: &str) -> Option<std::path::PathBuf> {
    program_in(&crate::assets::assets_dir(), name)
}

/// [`program`] with the assets directory given.
fn program_in(assets: &Path, name: &str) -> Option<std::path::PathBuf> {
    let own = assets.join(name);
    if own.is_file() && safe_to_run(&own) {
        return Some(own);
    }
    super::find_on_path(name)
}

/// As root, a program from the assets directory (which follows `HOME` and
/// `VMC_ASSETS`, so under `sudo -E` a user's) runs only if root owns it and
/// nobody else can write it.
fn safe_to_run(p: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || crate::host::rootless() {
        return true;
    }
    std::fs::metadata(p).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// `Command` for `name`, found by [`program`].
fn command(name: &str) -> Command {
    Command::new(program(name).unwrap_or_else(|| name.into()))
}

/// In a child before exec: SIGKILL when vmc's spawning thread ends.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with plain integers; async-signal-safe.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// A pasta process serving one container's network namespace; it is
/// killed on drop (and dies with vmc: PR_SET_PDEATHSIG).
pub struct Pasta {
    child: Child,
    netns: PathBuf,
}

impl Pasta {
    /// Connects the network namespace of process `pid` and returns once
    /// its interface is configured (a default route exists). `dir` is the
    /// container's state directory; this process must be in a private mount
    /// namespace (the namespace's bind mount stays there).
    /// `host_loopback`: the gateway address leads to the host's loopback
    /// ([`maps_host_loopback`]).
    pub fn attach(pid: u32, dir: &Path, host_loopback: bool) -> Result<Pasta, NetError> {
        // pasta opens the namespace by path after dropping privileges it
        // would need for /proc/PID/ns/net, so it gets a bind mount of it.
        let netns = dir.join("netns");
        let setup = |what: String| move |source| NetError::Setup { what, source };
        std::fs::write(&netns, b"").map_err(setup(netns.display().to_string()))?;
        let src = vmc_spawn::sys::cstr(format!("/proc/{pid}/ns/net"))
            .map_err(setup("the namespace's path".into()))?;
        let dst = vmc_spawn::sys::cstr(&netns).map_err(setup(netns.display().to_string()))?;
        // SAFETY: mount with valid NUL-terminated paths.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(setup("binding the container's network namespace".into())(
                std::io::Error::last_os_error(),
            ));
        }
        let mut cmd = command(PASTA);
        cmd.args([
            "--foreground",
            "--quiet",
            "--config-net",
            // As root it would switch to nobody, who cannot open the namespace.
            "--runas",
            "0",
            // Published ports are vmc's (-p); pasta forwards none by itself.
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
        ])
        .arg(&netns)
        .args((!host_loopback).then_some("--no-map-gw"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // SAFETY: die_with_parent only makes an async-signal-safe call.
        unsafe { cmd.pre_exec(die_with_parent) };
        let child = cmd.spawn().map_err(|source| NetError::Start {
            tool: "pasta",
            source,
        })?;
        let mut pasta = Pasta { child, netns };
        pasta.wait_configured(pid)?;
        Ok(pasta)
    }

    /// Waits until the container's namespace has a default route (pasta
    /// configured it), for as long as pasta makes progress: a pasta that
    /// exits is reported with its error, one that sits idle without
    /// configuring anything fails after `progress::QUIET_LIMIT`, however
    /// slow a loaded host makes it.
    fn wait_configured(&mut self, pid: u32) -> Result<(), NetError> {
        let routes = format!("/proc/{pid}/net/route");
        let me = self.child.id();
        let pasta = Threads::new(me, vec![me as i32], Vec::new());
        let mut dog = Watchdog::new(Duration::from_secs(60));
        let mut last_look = Instant::now();
        loop {
            match std::fs::read_to_string(&routes) {
                Ok(table) if has_default_route(&table) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(NetError::NamespaceGone(e)),
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let err: Vec<&str> = err.lines().filter(|l| !l.contains("syslog")).collect();
                return Err(NetError::PastaExited {
                    status: st,
                    stderr: err.join("; "),
                });
            }
            if last_look.elapsed() >= crate::runtime::agent::POLL {
                last_look = Instant::now();
                if let Verdict::Hung(why) = dog.observe(last_look, pasta.sample()) {
                    return Err(NetError::PastaStuck(why));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether a /proc/net/route table has a default route (destination
/// 00000000 on some interface).
fn has_default_route(table: &str) -> bool {
    table
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
}

impl Drop for Pasta {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(p) = vmc_spawn::sys::cstr(&self.netns) {
            // SAFETY: umount2 on a path we mounted.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_file(&self.netns);
    }
}

/// The container's /etc/resolv.conf, as Docker writes it: `dns` if given,
/// else the host's nameservers except loopback ones (unreachable from the
/// container), else public resolvers; the host's search and options lines.
pub fn resolv_conf(host: &str, dns: &[String]) -> String {
    let mut servers: Vec<String> = dns.to_vec();
    let mut rest = Vec::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next() {
                    let loopback = ip
                        .parse::<std::net::IpAddr>()
                        .map(|a| a.is_loopback())
                        .unwrap_or(true);
                    if dns.is_empty() && !loopback {
                        servers.push(ip.to_string());
                    }
                }
            }
            Some("search" | "domain" | "options") => rest.push(line.trim().to_string()),
            _ => {}
        }
    }
    if servers.is_empty() {
        servers = vec!["8.8.8.8".into(), "8.8.4.4".into()];
    }
    let mut out: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    for l in rest {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// The container's /etc/hosts: localhost, and its hostname on `addr`
/// (loopback without a network).
pub fn hosts(hostname: &str, addr: Option<&str>, extra: &[ExtraHost]) -> String {
    let mut out = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{hostname}\n",
        addr.unwrap_or("127.0.1.1")
    );
    for h in extra {
        let ip = h.ip.or_else(|| host_gateway().map(std::net::IpAddr::V4));
        if let Some(ip) = ip {
            out.push_str(&format!("{ip}\t{}\n", h.name));
        }
    }
    out
}

/// The host's IPv4 address on its default-route interface (what pasta
/// gives the container), if there is one.
pub fn host_address() -> Option<String> {
    host_ipv4().map(|h| h.address.to_string())
}

/// The host's IPv4 setup that passt and pasta copy to the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIpv4 {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

/// The address and prefix of the default-route interface, and the gateway.
pub fn host_ipv4() -> Option<HostIpv4> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = routes
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(1) == Some("00000000"))?
        .split_whitespace()
        .next()?
        .to_string();
    let gateway = host_gateway()?;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that we walk read-only and free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr points to a sockaddr of at least its family's size.
        if name != iface || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET: both are sockaddr_in.
        let (addr, mask) = unsafe {
            (
                *(ifa.ifa_addr as *const libc::sockaddr_in),
                *(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        found = Some(HostIpv4 {
            address: std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            prefix: u32::from_be(mask.sin_addr.s_addr).count_ones() as u8,
            gateway,
        });
        break;
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// A passt process serving one microVM's virtio-net device over a socket
/// pair (`--fd`: no socket file); killed on drop. passt drops to nobody,
/// which clears PR_SET_PDEATHSIG, but it exits by itself once the VMM's end
/// of the socket closes, so a VMM killed with SIGKILL leaves none behind.
pub struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt on `sock` (the other end goes to the device), giving the
    /// guest `host`'s address, prefix and gateway (what the agent sets).
    /// `host_loopback` as for [`Pasta::attach`].
    pub fn start(
        sock: std::os::unix::net::UnixStream,
        host: &HostIpv4,
        host_loopback: bool,
    ) -> Result<Passt, NetError> {
        use std::os::fd::AsRawFd;
        let fd = sock.as_raw_fd();
        let mut cmd = command(PASST);
        cmd.arg("--foreground");
        cmd.arg("--quiet");
        // VMC_PASST_PCAP=FILE: passt records the guest's frames to FILE (for
        // debugging the guest's network with tcpdump or wireshark).
        if let Some(pcap) = &crate::host::knobs().passt_pcap {
            cmd.arg("--pcap").arg(pcap);
        }
        cmd.args(["--fd", "3", "-t", "none", "-u", "none"])
            .args(["--address", &host.address.to_string()])
            .args(["--netmask", &host.prefix.to_string()])
            .args(["--gateway", &host.gateway.to_string()])
            .args((!host_loopback).then_some("--no-map-gw"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 and prctl are async-signal-safe; fd stays open in the
        // parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 leaves the new descriptor open across exec; if it is
                // already 3, clear close-on-exec instead.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                die_with_parent()
            });
        }
        let child = cmd.spawn().map_err(|source| NetError::Start {
            tool: "passt",
            source,
        })?;
        drop(sock);
        Ok(Passt { child })
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's IPv4 default gateway (the container reaches the host's
/// loopback through it with passt).
pub fn host_gateway() -> Option<std::net::Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let gw = routes
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(1) == Some("00000000"))?
        .split_whitespace()
        .nth(2)?;
    let gw = u32::from_str_radix(gw, 16).ok()?;
    Some(std::net::Ipv4Addr::from(gw.swap_bytes()))
}

/// Docker's /etc files for a container: resolv.conf, hosts (its hostname on
/// `addr`), hostname, as (name, content).
pub fn etc_files(cfg: &super::ContainerConfig, addr: Option<&str>) -> Vec<(String, String)> {
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    vec![
        ("resolv.conf".into(), resolv_conf(&host_resolv, &cfg.dns)),
        ("hosts".into(), hosts(&cfg.hostname, addr, &cfg.extra_hosts)),
        ("hostname".into(), format!("{}\n", cfg.hostname)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_host_entries_parse_as_dockers_and_go_in_hosts() {
        let g = ExtraHost::parse("host.docker.internal:host-gateway").unwrap();
        assert_eq!(g.ip, None);
        let a = ExtraHost::parse("db:10.1.2.3").unwrap();
        assert_eq!(a.ip, Some("10.1.2.3".parse().unwrap()));
        let b = ExtraHost::parse("v6=[::1]").unwrap();
        assert_eq!(b.ip, Some("::1".parse().unwrap()));
        for bad in ["nocolon", ":1.2.3.4", "a b:1.2.3.4", "x:not-an-ip", "x:"] {
            assert!(ExtraHost::parse(bad).is_err(), "{bad}");
        }
        // Only a host-gateway entry opens the host's loopback.
        assert!(!maps_host_loopback(&[]));
        assert!(!maps_host_loopback(std::slice::from_ref(&a)));
        assert!(maps_host_loopback(&[a.clone(), g]));
        let text = hosts("box", Some("10.0.0.5"), std::slice::from_ref(&a));
        assert!(text.ends_with("10.0.0.5\tbox\n10.1.2.3\tdb\n"), "{text}");
    }

    #[test]
    fn resolv_conf_drops_loopback_servers_and_keeps_search() {
        let host =
            "nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch example.org\noptions edns0\n";
        assert_eq!(
            resolv_conf(host, &[]),
            "nameserver 10.0.0.2\nsearch example.org\noptions edns0\n"
        );
        assert_eq!(
            resolv_conf("nameserver 127.0.0.1\n", &[]),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        assert_eq!(
            resolv_conf(host, &["192.0.2.1".into()]),
            "nameserver 192.0.2.1\nsearch example.org\noptions edns0\n"
        );
    }

    /// As root, passt and pasta run from the assets directory only when root
    /// owns the copy and only root can write it; otherwise from `$PATH`.
    #[test]
    fn as_root_only_a_root_owned_copy_nobody_else_can_write_runs() {
        use std::os::unix::fs::{chown, PermissionsExt};
        if !crate::testing::root() {
            return;
        }
        let assets = tempfile::tempdir().unwrap();
        let own = assets.path().join(PASTA);
        std::fs::write(&own, b"#!/bin/sh\n").unwrap();
        let mode = |m: u32| std::fs::set_permissions(&own, std::fs::Permissions::from_mode(m));
        let from_path = super::super::find_on_path(PASTA);
        assert_ne!(from_path.as_deref(), Some(own.as_path()));
        mode(0o755).unwrap();
        assert!(safe_to_run(&own));
        assert_eq!(program_in(assets.path(), PASTA), Some(own.clone()));
        for m in [0o775, 0o757, 0o777] {
            mode(m).unwrap();
            assert!(!safe_to_run(&own), "mode {m:o}");
            assert_eq!(program_in(assets.path(), PASTA), from_path, "mode {m:o}");
        }
        mode(0o755).unwrap();
        for (uid, gid) in [(65534, 0), (0, 65534)] {
            chown(&own, Some(uid), Some(gid)).unwrap();
            // Another user's file, or root's with a group of another's
            // (0755: the group cannot write), decide by the owner alone.
            assert_eq!(safe_to_run(&own), uid == 0, "owned by {uid}:{gid}");
        }
        chown(&own, Some(65534), Some(0)).unwrap();
        assert_eq!(program_in(assets.path(), PASTA), from_path);
        // Missing, or a directory: from $PATH.
        chown(&own, Some(0), Some(0)).unwrap();
        assert_eq!(
            program_in(assets.path(), PASST),
            super::super::find_on_path(PASST)
        );
        std::fs::remove_file(&own).unwrap();
        std::fs::create_dir(&own).unwrap();
        assert_eq!(program_in(assets.path(), PASTA), from_path);
    }

    #[test]
    fn network_modes_parse() {
        assert_eq!(Network::choose(Some("none")).unwrap(), Network::None);
        assert_eq!(
            Network::choose(Some("bridge")).unwrap_err().to_string(),
            "--network bridge: unknown network mode (use passt or none)"
        );
        assert_eq!(
            ExtraHost::parse("no-colon").unwrap_err().to_string(),
            "--add-host 'no-colon': use NAME:IP or NAME:host-gateway"
        );
    }
}
