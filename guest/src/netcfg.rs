//! The guest's network interface, configured by the agent from what the
//! host tells it (the addresses passt serves): address, prefix, MTU, up,
//! default route. ioctls rather than netlink: four calls, no crate.

use std::io;
use std::net::Ipv4Addr;

use vmc_guest::sys::check;
use vmc_guest::NetSpec;

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

/// Brings `spec.ifname` up with the address, prefix, MTU and default route.
pub fn configure(spec: &NetSpec) -> io::Result<()> {
    let ctx =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    // SAFETY: socket has no pointer arguments.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just opened and is owned here.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let addr = Ipv4Addr::from(spec.address);
    let mask = Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(spec.prefix.min(32)))
            .unwrap_or(0),
    );
    // SAFETY: (all ioctls below) a valid socket and an ifreq/rtentry that
    // lives across the call, of the type each request reads or writes.
    unsafe {
        let mut r = ifreq(&spec.ifname);
        r.ifr_ifru.ifru_mtu = i32::from(spec.mtu);
        check(libc::ioctl(fd, libc::SIOCSIFMTU, &r)).map_err(ctx("setting the MTU"))?;
        let mut r = ifreq(&spec.ifname);
        r.ifr_ifru.ifru_addr = sockaddr(addr);
        check(libc::ioctl(fd, libc::SIOCSIFADDR, &r)).map_err(ctx("setting the address"))?;
        let mut r = ifreq(&spec.ifname);
        r.ifr_ifru.ifru_netmask = sockaddr(mask);
        check(libc::ioctl(fd, libc::SIOCSIFNETMASK, &r)).map_err(ctx("setting the netmask"))?;
        let mut r = ifreq(&spec.ifname);
        check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut r)).map_err(ctx("reading the flags"))?;
        r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &r)).map_err(ctx("bringing it up"))?;
        let mut rt: libc::rtentry = std::mem::zeroed();
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(Ipv4Addr::from(spec.gateway));
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        check(libc::ioctl(fd, libc::SIOCADDRT, &rt)).map_err(ctx("adding the default route"))?;
    }
    Ok(())
}
