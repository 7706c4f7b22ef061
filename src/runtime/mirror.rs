//! A network namespace's interface handed to a microVM, as Kata Containers
//! does for the pods an orchestrator networks (its "tcfilter" model): the
//! namespace's interface (a veth of podman's or a CNI plugin's bridge)
//! keeps its address, and a TAP device made beside it takes every frame
//! it receives, and the reverse, through tc `mirred` redirects on both
//! ingresses. The guest's interface takes the namespace interface's MAC
//! address, IPv4 address, prefix, gateway and MTU, so that what the
//! bridge, its port forwards and its DNS see is unchanged. The TAP's frames
//! are relayed to the VMM's virtio-net device over a socket pair in the
//! qemu socket protocol the device speaks (a 32-bit big-endian length, then
//! the frame), as passt's are.
//!
//! The interface is read and the redirects set with iproute2's `ip` and
//! `tc` (what Kata does through netlink, in two commands a person can
//! also run to look); the TAP is this process's (not persistent): it goes
//! when the VM's holder ends.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use super::net::{HostIpv4, NetError};
use crate::devices::virtio::net::MAX_FRAME;

/// The TAP device's name in the namespace.
pub const TAP: &str = "vmc-tap0";

/// What the guest's interface copies from the namespace's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub ipv4: HostIpv4,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// The relay of a taken interface: its threads end when the VMM's end of
/// the socket closes (or the holder ends).
pub struct Mirror {
    pub taken: Taken,
}

fn err(what: impl std::fmt::Display) -> NetError {
    super::net::NetError::Mirror(what.to_string())
}

/// Takes the interface of the network namespace at `netns` for a VM:
/// returns the device's end of the socket and what the guest copies, or
/// `None` for a namespace without an IPv4 default route (loopback alone:
/// the guest gets no network either).
pub fn take(netns: &Path) -> Result<Option<(UnixStream, Mirror)>, NetError> {
    let netns = netns.to_path_buf();
    // The namespace is entered by a thread of its own (a network namespace
    // is per thread; its children, `ip` and `tc`, start in it); the TAP's
    // descriptor keeps working from any thread.
    let taken = std::thread::spawn(move || -> Result<Option<(OwnedFd, Taken)>, NetError> {
        let f = std::fs::File::open(&netns)
            .map_err(|e| err(format!("network namespace {}: {e}", netns.display())))?;
        // SAFETY: setns on a namespace descriptor we hold, for this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(err(format!(
                "joining network namespace {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            )));
        }
        let Some((ifname, taken)) = interface()? else {
            return Ok(None);
        };
        let tap = open_tap(TAP)?;
        run(&[
            "ip",
            "link",
            "set",
            TAP,
            "mtu",
            &taken.mtu.to_string(),
            "up",
        ])?;
        for (from, to) in [(ifname.as_str(), TAP), (TAP, ifname.as_str())] {
            run(&["tc", "qdisc", "replace", "dev", from, "ingress"])?;
            run(&[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ])?;
        }
        Ok(Some((tap, taken)))
    })
    .join()
    .map_err(|_| err("the namespace's thread panicked"))??;
    let Some((tap, taken)) = taken else {
        return Ok(None);
    };
    let (ours, theirs) = UnixStream::pair().map_err(|e| err(format!("socketpair: {e}")))?;
    let tap = std::fs::File::from(tap);
    let (tap_r, sock_w) = (
        tap.try_clone().map_err(|e| err(e.to_string()))?,
        theirs.try_clone().map_err(|e| err(e.to_string()))?,
    );
    std::thread::spawn(move || to_device(tap_r, sock_w));
    std::thread::spawn(move || to_tap(theirs, tap));
    Ok(Some((ours, Mirror { taken })))
}

/// Frames from the TAP to the device, each after its length.
fn to_device(mut tap: std::fs::File, mut sock: UnixStream) {
    let mut buf = vec![0u8; MAX_FRAME + 4];
    loop {
        let n = match tap.read(&mut buf[4..]) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
        if sock.write_all(&buf[..4 + n]).is_err() {
            return;
        }
    }
}

/// Frames from the device to the TAP; a length beyond the largest frame
/// ends the relay (the device never sends one).
fn to_tap(mut sock: UnixStream, mut tap: std::fs::File) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let mut len = [0u8; 4];
        if sock.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME || sock.read_exact(&mut buf[..n]).is_err() {
            return;
        }
        // A frame the TAP refuses (down, too large) is dropped, as a NIC's.
        let _ = tap.write(&buf[..n]);
    }
}

/// iproute2's `name`: on `PATH`, else where Debian puts it (a shim's
/// `PATH` may lack the sbin directories).
fn tool(name: &str) -> std::path::PathBuf {
    super::find_on_path(name)
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| name.into())
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let o = Command::new(tool(args[0]))
        .args(&args[1..])
        .output()
        .map_err(|e| err(format!("{}: {e} (iproute2 is needed)", args[0])))?;
    if !o.status.success() {
        return Err(err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

fn json(args: &[&str]) -> Result<serde_json::Value, NetError> {
    let o = Command::new(tool(args[0]))
        .args(&args[1..])
        .output()
        .map_err(|e| err(format!("{}: {e} (iproute2 is needed)", args[0])))?;
    serde_json::from_slice(&o.stdout).map_err(|e| err(format!("{}: {e}", args.join(" "))))
}

/// The namespace's interface with the default route, and its setup (none
/// without a default route).
fn interface() -> Result<Option<(String, Taken)>, NetError> {
    let routes = json(&["ip", "-j", "-4", "route", "show", "default"])?;
    let Some(route) = routes.as_array().and_then(|r| r.first()) else {
        return Ok(None);
    };
    let ifname = route["dev"].as_str().unwrap_or_default().to_string();
    let gateway = route["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| err("the default route has no gateway"))?;
    let addrs = json(&["ip", "-j", "addr", "show", "dev", &ifname])?;
    parse_interface(&addrs, &ifname, gateway).map(Some)
}

/// `ip -j addr show dev IF`'s answer for `ifname` (its MAC address is
/// there only when no family is asked for).
fn parse_interface(
    addrs: &serde_json::Value,
    ifname: &str,
    gateway: std::net::Ipv4Addr,
) -> Result<(String, Taken), NetError> {
    let link = addrs
        .as_array()
        .and_then(|a| a.iter().find(|l| l["ifname"] == ifname))
        .ok_or_else(|| err(format!("no interface {ifname}")))?;
    let info = link["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["family"] == "inet"))
        .ok_or_else(|| err(format!("{ifname} has no IPv4 address")))?;
    let address = info["local"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| err(format!("{ifname}: no address")))?;
    let prefix = info["prefixlen"]
        .as_u64()
        .filter(|&p| p <= 32)
        .ok_or_else(|| err(format!("{ifname}: no prefix length")))? as u8;
    let mtu = link["mtu"]
        .as_u64()
        .filter(|&m| (68..=u64::from(crate::devices::virtio::net::MTU)).contains(&m))
        .ok_or_else(|| err(format!("{ifname}: no usable MTU")))? as u16;
    let mac = parse_mac(link["address"].as_str().unwrap_or_default())
        .ok_or_else(|| err(format!("{ifname}: no MAC address")))?;
    Ok((
        ifname.to_string(),
        Taken {
            ipv4: HostIpv4 {
                address,
                prefix,
                gateway,
            },
            mac,
            mtu,
        },
    ))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A TAP device named `name`, without packet information (each read and
/// write is one Ethernet frame).
fn open_tap(name: &str) -> Result<OwnedFd, NetError> {
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "/dev/net/tun: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: open returned a descriptor we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(err(format!(
            "a TAP device: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ip -j addr show dev eth0` prints in a podman network
    /// namespace becomes the guest's setup; anything missing is an error.
    #[test]
    fn the_namespace_interface_is_read_from_ip_json() {
        let gw = "10.88.0.1".parse().unwrap();
        let addrs = serde_json::json!([{
            "ifindex": 2, "ifname": "eth0", "mtu": 1500, "address": "0a:58:0a:58:00:05",
            "addr_info": [{"family": "inet", "local": "10.88.0.5", "prefixlen": 16}]
        }]);
        let (name, t) = parse_interface(&addrs, "eth0", gw).unwrap();
        assert_eq!(name, "eth0");
        assert_eq!(t.ipv4.address.to_string(), "10.88.0.5");
        assert_eq!(t.ipv4.prefix, 16);
        assert_eq!(t.ipv4.gateway, gw);
        assert_eq!(t.mtu, 1500);
        assert_eq!(t.mac, [0x0a, 0x58, 0x0a, 0x58, 0, 5]);
        let mut bad = addrs.clone();
        bad[0]["addr_info"] = serde_json::json!([]);
        assert!(parse_interface(&bad, "eth0", gw).is_err());
        let mut bad = addrs.clone();
        bad[0]["mtu"] = serde_json::json!(70000);
        assert!(parse_interface(&bad, "eth0", gw).is_err());
        assert!(parse_interface(&addrs, "eth1", gw).is_err());
        assert_eq!(parse_mac("0a:58:0a:58:00"), None);
        assert_eq!(parse_mac("0a:58:0a:58:00:05:07"), None);
        assert_eq!(parse_mac("zz:58:0a:58:00:05"), None);
    }
}
