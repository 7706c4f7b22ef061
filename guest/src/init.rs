//! What PID 1 does before it can serve the host: the pseudo filesystems, sane
//! stdio descriptors, the loopback interface; and, on request, the container
//! root (read-only image disk + writable scratch disk under overlayfs).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use vmc_guest::RootSpec;

use vmc_guest::sys::{check, mount};

/// Where the container root is assembled; processes are moved into it.
pub const ROOT: &str = "/run/vmc/root";
const IMAGE: &str = "/run/vmc/image";
const SCRATCH: &str = "/run/vmc/scratch";

/// Mounts /proc, /sys, /dev (+pts, shm), /run and /tmp for the agent itself.
pub fn early_init() -> io::Result<()> {
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        fs::create_dir_all(d)?;
    }
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), nodev, None)?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), nodev, None)?;
    // The kernel mounts devtmpfs on /dev itself (CONFIG_DEVTMPFS_MOUNT).
    if !std::path::Path::new("/dev/null").exists() {
        mount(
            Some("devtmpfs"),
            "/dev",
            Some("devtmpfs"),
            libc::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    ensure_stdio();
    fs::create_dir_all("/dev/pts")?;
    fs::create_dir_all("/dev/shm")?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount(
        Some("shm"),
        "/dev/shm",
        Some("tmpfs"),
        nodev,
        Some("mode=1777"),
    )?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    // /dev/ptmx must point into this devpts instance.
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    if let Err(e) = loopback_up() {
        eprintln!("vmc-guest: cannot bring up lo: {e}");
    }
    Ok(())
}

/// The kernel opens /dev/console for init; without a console it opens nothing
/// (Rust's runtime then points fds 0-2 at /dev/null). Make sure they are open
/// so that no socket ever becomes fd 0-2.
fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let path = if fd == 0 { "/dev/null" } else { "/dev/console" };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .or_else(|_| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        if let Ok(f) = file {
            // SAFETY: dup2 onto a closed low descriptor; f stays valid during the call.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2); checked below.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: s is a fresh descriptor owned here.
    let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we pass.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Waits until the kernel sees block device `dev` (e.g. `/dev/vdb`) with
/// `sectors` sectors: after a snapshot restore the new size arrives through a
/// config interrupt that the driver handles asynchronously.
fn wait_for_size(dev: &str, sectors: u64) -> io::Result<()> {
    let name = dev.trim_start_matches("/dev/");
    let path = format!("/sys/block/{name}/size");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now: u64 = fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
        if now == sectors || sectors == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{dev} has {now} sectors, expected {sectors}"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Sets the wall clock and reseeds the kernel's random number generator with
/// host entropy: after a snapshot restore the guest's clock is the snapshot's
/// and every restored VM would otherwise share one random state.
pub fn refresh(realtime_ns: u64, entropy: &[u8]) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    if entropy.is_empty() {
        return Ok(());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    let f = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: info is a rand_pool_info of the size its header states.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    match check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) }) {
        // Not initialised yet: the entropy just credited initialises it.
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Assembles the container root at [`ROOT`] and sets the hostname.
pub fn mount_root(spec: &RootSpec) -> io::Result<()> {
    for d in [IMAGE, SCRATCH, ROOT] {
        fs::create_dir_all(d)?;
    }
    wait_for_size(&spec.image_dev, spec.image_sectors)?;
    wait_for_size(&spec.scratch_dev, spec.scratch_sectors)?;
    mount(
        Some(&spec.image_dev),
        IMAGE,
        Some(&spec.image_fstype),
        libc::MS_RDONLY,
        None,
    )?;
    // noblock_validity: no tree of metadata ranges to build at mount time
    // (guest kernel work is expensive under software virtualisation).
    mount(
        Some(&spec.scratch_dev),
        SCRATCH,
        Some("ext4"),
        libc::MS_NOATIME,
        Some("noblock_validity"),
    )?;
    if let Some(net) = &spec.network {
        crate::netcfg::configure(net)
            .map_err(|e| io::Error::new(e.kind(), format!("network {}: {e}", net.ifname)))?;
    }
    crate::layers::mount_stack(IMAGE, SCRATCH, ROOT, &spec.etc)?;
    set_hostname(&spec.hostname)
}

/// Docker's /etc/resolv.conf, /etc/hosts and /etc/hostname for the
/// container: written under /run and bind-mounted over those of the root
/// at `root`. One the image lacks gets an empty placeholder in the upper
/// layer to mount over; their paths (relative to the root) are returned,
/// so that a build step's layer can leave them out.
pub fn bind_etc(root: &str, files: &[(String, String)]) -> io::Result<Vec<String>> {
    let mut placeholders = Vec::new();
    if files.is_empty() {
        return Ok(placeholders);
    }
    let dir = "/run/vmc-etc";
    fs::create_dir_all(dir)?;
    fs::create_dir_all(format!("{root}/etc"))?;
    for (name, text) in files {
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let src = format!("{dir}/{name}");
        fs::write(&src, text)?;
        let target = format!("{root}/etc/{name}");
        // A symlink there (e.g. to systemd's resolver) is left alone.
        match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => continue,
            Ok(_) => {}
            Err(_) => {
                fs::write(&target, b"")?;
                placeholders.push(format!("etc/{name}"));
            }
        }
        mount(Some(&src), &target, None, libc::MS_BIND, None)?;
    }
    Ok(placeholders)
}

/// Mounts /proc, /sys and /dev inside the container root.
pub fn mount_pseudo(root: &str) -> io::Result<()> {
    for d in ["proc", "sys", "dev"] {
        fs::create_dir_all(format!("{root}/{d}"))?;
    }
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("proc"),
        &format!("{root}/proc"),
        Some("proc"),
        nodev,
        None,
    )?;
    mount(
        Some("sysfs"),
        &format!("{root}/sys"),
        Some("sysfs"),
        nodev | libc::MS_RDONLY,
        None,
    )?;
    mount(
        Some("/dev"),
        &format!("{root}/dev"),
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    // SAFETY: name points to name.len() valid bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// Flushes every filesystem, then resets the machine (the kernel's `reboot=k`
/// turns this into an i8042 reset, which the VMM treats as a clean exit).
pub fn reboot() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
    }
    // SAFETY: as above; reboot only returns on failure.
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
    }
    eprintln!(
        "vmc-guest: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

/// Used by sessions: sync all filesystems.
pub fn sync() {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
}
