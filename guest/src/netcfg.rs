//! The guest's network interface, configured by the agent from what the
//! host tells it (the addresses passt serves): address, prefix, MTU, up,
//! default route. ioctls rather than netlink: four calls, no crate.

use std::io;
use std::net::Ipv4Addr;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmc_proto::{LinkSpec, NetSpec};
use vmc_spawn::sys::check;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        r.ifr_name[i] = b as libc::c_char;
    }
    r
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The netmask of a prefix length; lengths above 32 are 32.
fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

/// An AF_INET datagram socket: the handle the interface ioctls take.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no pointer arguments.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just opened and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn step(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Sets the MTU and brings the link up; both are no-ops in the kernel when
/// already so (a ready snapshot's interface is up: see [`link_up`]).
fn mtu_and_up(fd: &OwnedFd, ifname: &str, mtu: u16) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: (all ioctls below) a valid socket and an ifreq that lives
    // across the call, of the type each request reads or writes.
    unsafe {
        let mut r = ifreq(ifname);
        r.ifr_ifru.ifru_mtu = i32::from(mtu);
        check(libc::ioctl(fd, libc::SIOCSIFMTU, &r)).map_err(step("setting the MTU"))?;
        let mut r = ifreq(ifname);
        check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut r)).map_err(step("reading the flags"))?;
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if r.ifr_ifru.ifru_flags & up != up {
            r.ifr_ifru.ifru_flags |= up;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &r)).map_err(step("bringing it up"))?;
        }
    }
    Ok(())
}

/// Brings `spec.ifname` up with its MTU and no address. A ready snapshot's
/// interface is left so: bringing a virtio-net link up fills its receive
/// ring, most of the guest-kernel work of configuring it.
pub fn link_up(spec: &LinkSpec) -> io::Result<()> {
    mtu_and_up(&ioctl_socket()?, &spec.ifname, spec.mtu)
}

/// Brings `spec.ifname` up with the address, prefix, MTU and default route.
pub fn configure(spec: &NetSpec) -> io::Result<()> {
    let fd = ioctl_socket()?;
    let addr = Ipv4Addr::from(spec.address);
    let mask = netmask(spec.prefix);
    // SAFETY: (all ioctls below) a valid socket and an ifreq/rtentry that
    // lives across the call, of the type each request reads or writes.
    unsafe {
        let raw = fd.as_raw_fd();
        if let Some(mac) = spec.mac {
            let mut r = ifreq(&spec.ifname);
            r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                *d = s as libc::c_char;
            }
            check(libc::ioctl(raw, libc::SIOCSIFHWADDR, &r))
                .map_err(step("setting the MAC address"))?;
        }
        // The MTU first: a missing interface is named by the first step.
        mtu_and_up(&fd, &spec.ifname, spec.mtu)?;
        let mut r = ifreq(&spec.ifname);
        r.ifr_ifru.ifru_addr = sockaddr(addr);
        check(libc::ioctl(raw, libc::SIOCSIFADDR, &r)).map_err(step("setting the address"))?;
        let mut r = ifreq(&spec.ifname);
        r.ifr_ifru.ifru_netmask = sockaddr(mask);
        check(libc::ioctl(raw, libc::SIOCSIFNETMASK, &r)).map_err(step("setting the netmask"))?;
        let mut rt: libc::rtentry = std::mem::zeroed();
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(Ipv4Addr::from(spec.gateway));
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        check(libc::ioctl(raw, libc::SIOCADDRT, &rt)).map_err(step("adding the default route"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_lengths_become_netmasks() {
        let m = |p| netmask(p).to_string();
        assert_eq!(m(0), "0.0.0.0");
        assert_eq!(m(1), "128.0.0.0");
        assert_eq!(m(24), "255.255.255.0");
        assert_eq!(m(26), "255.255.255.192");
        assert_eq!(m(32), "255.255.255.255");
        // A prefix above 32 (only a broken host sends one) is a host route.
        assert_eq!(m(33), "255.255.255.255");
        assert_eq!(m(255), "255.255.255.255");
    }

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: the port (0), then the address bytes as written.
        let data: Vec<u8> = sa.sa_data[..6].iter().map(|&b| b as u8).collect();
        assert_eq!(data, [0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn interface_names_are_truncated_and_nul_terminated() {
        let name = |r: &libc::ifreq| -> Vec<u8> { r.ifr_name.iter().map(|&b| b as u8).collect() };
        let mut want = [0u8; libc::IFNAMSIZ];
        want[..4].copy_from_slice(b"eth0");
        assert_eq!(name(&ifreq("eth0")), want);
        let long = name(&ifreq("a-very-long-interface-name"));
        assert_eq!(&long[..libc::IFNAMSIZ - 1], b"a-very-long-int");
        assert_eq!(long[libc::IFNAMSIZ - 1], 0);
    }

    fn get(fd: &OwnedFd, name: &str, req: libc::c_ulong) -> libc::ifreq {
        let mut r = ifreq(name);
        // SAFETY: a valid socket and an ifreq the request fills in.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut r) };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        r
    }

    fn addr_of(sa: libc::sockaddr) -> Ipv4Addr {
        Ipv4Addr::new(
            sa.sa_data[2] as u8,
            sa.sa_data[3] as u8,
            sa.sa_data[4] as u8,
            sa.sa_data[5] as u8,
        )
    }

    #[test]
    fn configure_sets_address_mask_mtu_flags_and_default_route() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let (addr, mask, mtu, flags, route) =
            crate::testns::in_namespaces(libc::CLONE_NEWNET, || {
                let _tun = tun("vmct0");
                configure(&test_spec("vmct0")).unwrap();
                // SAFETY: plain socket(2), checked.
                let s = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }).unwrap();
                // SAFETY: a fresh descriptor that we own.
                let s = unsafe { OwnedFd::from_raw_fd(s) };
                // SAFETY: (all reads below) the union member each request filled in.
                unsafe {
                    (
                        addr_of(get(&s, "vmct0", libc::SIOCGIFADDR).ifr_ifru.ifru_addr),
                        addr_of(get(&s, "vmct0", libc::SIOCGIFNETMASK).ifr_ifru.ifru_netmask),
                        get(&s, "vmct0", libc::SIOCGIFMTU).ifr_ifru.ifru_mtu,
                        get(&s, "vmct0", libc::SIOCGIFFLAGS).ifr_ifru.ifru_flags,
                        // This thread's network namespace, not the process's.
                        std::fs::read_to_string("/proc/thread-self/net/route").unwrap(),
                    )
                }
            });
        assert_eq!(addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mtu, 1400);
        assert_ne!(flags & libc::IFF_UP as libc::c_short, 0);
        // The default route (destination and mask 0) through the gateway,
        // with RTF_UP | RTF_GATEWAY; /proc prints raw network-order words.
        let gw = format!("{:08X}", u32::from_ne_bytes([10, 0, 2, 2]));
        let default: Vec<&str> = route
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f[1] == "00000000" && f[7] == "00000000")
            .unwrap();
        assert_eq!(default[..4], ["vmct0", "00000000", gw.as_str(), "0003"]);
    }

    /// 10.0.2.15/24 via 10.0.2.2, MTU 1400, on `ifname`.
    fn test_spec(ifname: &str) -> NetSpec {
        NetSpec {
            ifname: ifname.into(),
            address: [10, 0, 2, 15],
            prefix: 24,
            gateway: [10, 0, 2, 2],
            mtu: 1400,
            mac: None,
        }
    }

    /// A tun device in this thread's network namespace stands in for
    /// virtio-net (made with one ioctl); returns its descriptor.
    fn tun(name: &str) -> OwnedFd {
        // SAFETY: open on a NUL-terminated path.
        let tun = check(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) }).unwrap();
        // SAFETY: open returned a fresh descriptor that we own.
        let tun = unsafe { OwnedFd::from_raw_fd(tun) };
        let mut r = ifreq(name);
        r.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq passed.
        check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &r) }).unwrap();
        tun
    }

    #[test]
    fn link_up_leaves_an_interface_up_without_an_address_then_configure_completes_it() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let (mtu, flags, no_addr, addr) = crate::testns::in_namespaces(libc::CLONE_NEWNET, || {
            let _tun = tun("vmct1");
            link_up(&LinkSpec {
                ifname: "vmct1".into(),
                mtu: 1400,
            })
            .unwrap();
            let s = ioctl_socket().unwrap();
            let mut r = ifreq("vmct1");
            // SAFETY: a valid socket and an ifreq the request fills in.
            let no_addr = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFADDR, &mut r) } < 0;
            // SAFETY: (reads below) the union member each request filled in.
            let (mtu, flags) = unsafe {
                (
                    get(&s, "vmct1", libc::SIOCGIFMTU).ifr_ifru.ifru_mtu,
                    get(&s, "vmct1", libc::SIOCGIFFLAGS).ifr_ifru.ifru_flags,
                )
            };
            configure(&test_spec("vmct1")).unwrap();
            // SAFETY: the union member SIOCGIFADDR filled in.
            let addr = addr_of(unsafe { get(&s, "vmct1", libc::SIOCGIFADDR).ifr_ifru.ifru_addr });
            (mtu, flags, no_addr, addr)
        });
        assert_eq!(mtu, 1400);
        assert_ne!(flags & libc::IFF_UP as libc::c_short, 0);
        assert!(no_addr, "link_up must not give the interface an address");
        assert_eq!(addr, Ipv4Addr::new(10, 0, 2, 15));
    }

    #[test]
    fn configure_names_the_step_that_failed() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let e = crate::testns::in_namespaces(libc::CLONE_NEWNET, || {
            configure(&NetSpec {
                ifname: "nosuch0".into(),
                address: [10, 0, 2, 15],
                prefix: 24,
                gateway: [10, 0, 2, 2],
                mtu: 1500,
                mac: None,
            })
            .unwrap_err()
        });
        assert_eq!(
            e.to_string(),
            "setting the MTU: No such device (os error 19)"
        );
    }
}
