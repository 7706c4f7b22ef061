//! What PID 1 does before it can serve the host: the pseudo filesystems, sane
//! stdio descriptors, the loopback interface; and, on request, the container
//! root (read-only image disk + writable scratch disk under overlayfs).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use vmc_proto::RootSpec;

use vmc_spawn::sys::{check, mount};

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
    wait_for_size_in(
        "/sys/block",
        dev,
        sectors,
        std::time::Duration::from_secs(30),
    )
}

/// [`wait_for_size`] with the sysfs block directory and the patience given.
fn wait_for_size_in(
    sys_block: &str,
    dev: &str,
    sectors: u64,
    patience: std::time::Duration,
) -> io::Result<()> {
    let name = dev.trim_start_matches("/dev/");
    let path = format!("{sys_block}/{name}/size");
    let deadline = std::time::Instant::now() + patience;
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
    let info = rand_pool_info(entropy);
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

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// crediting every byte of `entropy` in full (8 bits each).
fn rand_pool_info(entropy: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    info
}

/// Whether the mounted root's writable layer is in memory (nothing of it
/// needs syncing).
pub static UPPER_IN_MEMORY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Assembles the container root at [`ROOT`] and sets the hostname.
pub fn mount_root(spec: &RootSpec, lap: &mut dyn FnMut(&'static str)) -> io::Result<()> {
    if let Some(index) = spec.root_share {
        return mount_shared_root(index, spec, lap);
    }
    for d in [IMAGE, SCRATCH, ROOT] {
        fs::create_dir_all(d)?;
    }
    wait_for_size(&spec.image_dev, spec.image_sectors)?;
    if !spec.upper_in_memory {
        wait_for_size(&spec.scratch_dev, spec.scratch_sectors)?;
    }
    lap("disk sizes");
    mount(
        Some(&spec.image_dev),
        IMAGE,
        Some(&spec.image_fstype),
        libc::MS_RDONLY,
        None,
    )?;
    lap("image mount");
    if spec.upper_in_memory {
        // Half the guest's memory at most (tmpfs's default): no disk
        // filesystem to mount, nothing to sync at the end.
        mount(
            Some("tmpfs"),
            SCRATCH,
            Some("tmpfs"),
            libc::MS_NOATIME,
            Some("mode=0755"),
        )?;
    } else {
        // noblock_validity: no tree of metadata ranges to build at mount
        // time (guest kernel work is expensive under software
        // virtualisation).
        mount(
            Some(&spec.scratch_dev),
            SCRATCH,
            Some("ext4"),
            libc::MS_NOATIME,
            Some("noblock_validity"),
        )?;
    }
    UPPER_IN_MEMORY.store(spec.upper_in_memory, std::sync::atomic::Ordering::SeqCst);
    lap("scratch mount");
    if let Some(net) = &spec.network {
        crate::netcfg::configure(net)
            .map_err(|e| io::Error::new(e.kind(), format!("network {}: {e}", net.ifname)))?;
        lap("network");
    }
    if let Some(link) = &spec.link {
        crate::netcfg::link_up(link)
            .map_err(|e| io::Error::new(e.kind(), format!("network {}: {e}", link.ifname)))?;
        lap("link up");
    }
    crate::layers::mount_stack(IMAGE, SCRATCH, ROOT, &spec.etc, spec.upper_in_memory, lap)?;
    set_hostname(&spec.hostname)?;
    lap("hostname");
    if !spec.mounts.is_empty() || spec.read_only {
        crate::volumes::mount_all(ROOT, &spec.mounts, &spec.etc, spec.read_only)?;
        lap("volumes");
    }
    Ok(())
}

/// The root as a host directory shared as it is (`vmc-runtime`'s bundle
/// root): bound at [`ROOT`], with the pseudo filesystems, /etc files,
/// hostname, network and mounts as an image's root has them.
fn mount_shared_root(
    index: u32,
    spec: &RootSpec,
    lap: &mut dyn FnMut(&'static str),
) -> io::Result<()> {
    crate::volumes::bind_root(index, ROOT)?;
    lap("shared root");
    if let Some(net) = &spec.network {
        crate::netcfg::configure(net)
            .map_err(|e| io::Error::new(e.kind(), format!("network {}: {e}", net.ifname)))?;
        lap("network");
    }
    crate::rootfs::mount_pseudo(ROOT)?;
    lap("proc sys dev");
    if !spec.etc.is_empty() {
        crate::rootfs::bind_etc(ROOT, &spec.etc)?;
    }
    set_hostname(&spec.hostname)?;
    lap("hostname");
    if !spec.mounts.is_empty() || spec.read_only {
        crate::volumes::mount_all(ROOT, &spec.mounts, &spec.etc, spec.read_only)?;
        lap("volumes");
    }
    Ok(())
}

/// A VM restored from a ready snapshot (its root mounted, its writable
/// layer in memory) becomes this container's: its /etc files, hostname
/// and network.
pub fn personalize(spec: &RootSpec, lap: &mut dyn FnMut(&'static str)) -> io::Result<()> {
    crate::rootfs::write_etc(ROOT, &spec.etc)?;
    lap("etc files");
    set_hostname(&spec.hostname)?;
    if let Some(net) = &spec.network {
        crate::netcfg::configure(net)
            .map_err(|e| io::Error::new(e.kind(), format!("network {}: {e}", net.ifname)))?;
        lap("network");
    }
    if !spec.mounts.is_empty() || spec.read_only {
        crate::volumes::mount_all(ROOT, &spec.mounts, &spec.etc, spec.read_only)?;
        lap("volumes");
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::{bind_etc, mount_pseudo};
    use std::os::unix::fs::{symlink, FileTypeExt};
    use std::path::Path;
    use std::time::Duration;

    use crate::testns::in_namespaces;

    #[test]
    fn disk_size_is_awaited_in_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().to_str().unwrap().to_string();
        fs::create_dir(d.path().join("vdb")).unwrap();
        let size = d.path().join("vdb/size");
        fs::write(&size, "2048\n").unwrap();
        wait_for_size_in(&sys, "/dev/vdb", 2048, Duration::ZERO).unwrap();
        // 0: whatever size it has.
        wait_for_size_in(&sys, "/dev/vdb", 0, Duration::ZERO).unwrap();
        let e = wait_for_size_in(&sys, "/dev/vdb", 4096, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "/dev/vdb has 2048 sectors, expected 4096");
        let e = wait_for_size_in(&sys, "/dev/vdc", 0, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // The size changes while it waits (a config interrupt after restore).
        let waiter = std::thread::spawn(move || {
            wait_for_size_in(&sys, "vdb", 4096, Duration::from_secs(600))
        });
        fs::write(&size, "4096\n").unwrap();
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn entropy_is_credited_in_full() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut want = 64i32.to_ne_bytes().to_vec();
        want.extend(8i32.to_ne_bytes());
        want.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(info, want);
        assert_eq!(rand_pool_info(&[]), [0; 8]);
    }

    fn hostname() -> String {
        // SAFETY: utsname is plain data filled by uname.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: u is a valid out pointer.
        assert_eq!(unsafe { libc::uname(&mut u) }, 0);
        // SAFETY: uname NUL-terminates nodename.
        unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn hostname_is_set_unless_empty() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let (set, kept, too_long) = in_namespaces(libc::CLONE_NEWUTS, || {
            set_hostname("box-1").unwrap();
            let set = hostname();
            set_hostname("").unwrap();
            let too_long = set_hostname(&"x".repeat(65)).unwrap_err();
            (set, hostname(), too_long.raw_os_error())
        });
        assert_eq!(set, "box-1");
        assert_eq!(kept, "box-1");
        assert_eq!(too_long, Some(libc::EINVAL));
    }

    #[test]
    fn loopback_comes_up() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let flags = || {
            // SAFETY: plain socket(2), checked.
            let s = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }).unwrap();
            // SAFETY: a fresh descriptor that we own.
            let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
            // SAFETY: ifreq is plain data.
            let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
            r.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
            // SAFETY: SIOCGIFFLAGS fills the ifreq passed; flags is its member.
            unsafe {
                check(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r)).unwrap();
                r.ifr_ifru.ifru_flags
            }
        };
        let up = libc::IFF_UP as libc::c_short;
        let (before, after) = in_namespaces(libc::CLONE_NEWNET, move || {
            let before = flags();
            loopback_up().unwrap();
            (before, flags())
        });
        // A new network namespace has lo down.
        assert_eq!(before & up, 0);
        assert_eq!(after & up, up);
    }

    fn etc_files() -> Vec<(String, String)> {
        [
            ("resolv.conf", "nameserver 10.0.2.3\n"),
            ("hosts", "127.0.0.1 localhost\n"),
            ("hostname", "box\n"),
            // Names the host would never send: not bound.
            ("../escape", "x"),
            (".hidden", "x"),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
    }

    #[test]
    fn etc_files_are_bound_over_the_roots() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), "image's\n").unwrap();
        // The image's resolv.conf is a link (systemd-resolved): left alone.
        symlink("../run/resolved.conf", root.join("etc/resolv.conf")).unwrap();
        let r = root.clone();
        let (placeholders, hosts, hostname, escaped) =
            in_namespaces(libc::CLONE_NEWNS, move || {
                // /run/vmc-etc is the agent's: this namespace gets a /run of its own.
                sys_mount_tmpfs("/run");
                let p = bind_etc(r.to_str().unwrap(), &etc_files()).unwrap();
                (
                    p,
                    fs::read_to_string(r.join("etc/hosts")).unwrap(),
                    fs::read_to_string(r.join("etc/hostname")).unwrap(),
                    Path::new("/run/escape").exists() || r.join("escape").exists(),
                )
            });
        assert_eq!(placeholders, ["etc/hostname"]);
        assert_eq!(hosts, "127.0.0.1 localhost\n");
        assert_eq!(hostname, "box\n");
        assert!(!escaped);
        // Outside that namespace: the image's files, and the placeholder.
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "image's\n"
        );
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "");
        assert!(fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!root.join("run").exists());
    }

    /// A ready snapshot's root: its seeded files are rewritten in place, a
    /// missing one is created, one the image has as a symlink is left
    /// alone, and a root whose /etc is a symlink out of it gets nothing.
    #[test]
    fn etc_files_are_written_into_a_mounted_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), "").unwrap();
        symlink("../run/resolved.conf", root.join("etc/resolv.conf")).unwrap();
        let r = root.to_str().unwrap();
        crate::rootfs::write_etc(r, &etc_files()).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert!(fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!root.join("run").exists() && !root.join("escape").exists());
        // Shorter content replaces longer: nothing of the old is left.
        fs::write(root.join("etc/hosts"), "x".repeat(100)).unwrap();
        crate::rootfs::write_etc(r, &etc_files()).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );

        let (outside, root2) = (d.path().join("outside"), d.path().join("root2"));
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(&root2).unwrap();
        symlink(&outside, root2.join("etc")).unwrap();
        crate::rootfs::write_etc(root2.to_str().unwrap(), &etc_files()).unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn etc_files_are_placed_in_a_fresh_upper_layer() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let (lower, upper) = (d.path().join("lower"), d.path().join("upper"));
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(lower.join("etc/hosts"), "image's\n").unwrap();
        // The image's resolv.conf is a link (systemd-resolved): left alone.
        symlink("../run/resolved.conf", lower.join("etc/resolv.conf")).unwrap();
        let (l, u) = (lower.to_str().unwrap(), upper.to_str().unwrap());
        crate::rootfs::seed_etc(l, u, &etc_files()).unwrap();
        assert_eq!(
            fs::read_to_string(upper.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            fs::read_to_string(upper.join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert!(!upper.join("etc/resolv.conf").exists());
        // The upper /etc is the image's (mode), the files Docker's (0644).
        let m = fs::metadata(upper.join("etc")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750);
        assert_eq!(
            fs::metadata(upper.join("etc/hosts")).unwrap().mode() & 0o777,
            0o644
        );
        // Names the host would never send land nowhere; the image is untouched.
        assert!(!upper.join("escape").exists() && !upper.join("etc/.hidden").exists());
        assert_eq!(
            fs::read_to_string(lower.join("etc/hosts")).unwrap(),
            "image's\n"
        );

        // An image whose /etc is a symlink (or no directory) keeps it.
        let (lower2, upper2) = (d.path().join("lower2"), d.path().join("upper2"));
        fs::create_dir_all(&lower2).unwrap();
        fs::create_dir_all(&upper2).unwrap();
        symlink("/somewhere", lower2.join("etc")).unwrap();
        let (l, u) = (lower2.to_str().unwrap(), upper2.to_str().unwrap());
        crate::rootfs::seed_etc(l, u, &etc_files()).unwrap();
        assert_eq!(fs::read_dir(&upper2).unwrap().count(), 0);
    }

    #[test]
    fn etc_linked_out_of_the_root_gets_no_binds() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let vm_etc = d.path().join("vm-etc");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&vm_etc).unwrap();
        fs::write(vm_etc.join("hosts"), "vm's\n").unwrap();
        symlink(&vm_etc, root.join("etc")).unwrap();
        let r = root.clone();
        let (placeholders, hosts) = in_namespaces(libc::CLONE_NEWNS, move || {
            sys_mount_tmpfs("/run");
            let p = bind_etc(r.to_str().unwrap(), &etc_files()).unwrap();
            (p, fs::read_to_string(r.join("etc/hosts")).unwrap())
        });
        assert!(placeholders.is_empty());
        assert_eq!(hosts, "vm's\n");
        assert_eq!(fs::read_dir(&vm_etc).unwrap().count(), 1);
    }

    fn sys_mount_tmpfs(at: &str) {
        mount(Some("tmpfs"), at, Some("tmpfs"), 0, None).unwrap();
    }

    #[test]
    fn pseudo_filesystems_are_mounted_in_the_root() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let r = d.path().to_str().unwrap().to_string();
        let (proc_self, sys_ro, null_is_char) = in_namespaces(libc::CLONE_NEWNS, move || {
            mount_pseudo(&r).unwrap();
            // SAFETY: statvfs is plain data filled by statvfs(3).
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            let sys = vmc_spawn::sys::cstr(format!("{r}/sys")).unwrap();
            // SAFETY: sys is NUL-terminated; st a valid out pointer.
            assert_eq!(unsafe { libc::statvfs(sys.as_ptr(), &mut st) }, 0);
            (
                Path::new(&format!("{r}/proc/self/status")).exists(),
                st.f_flag & libc::ST_RDONLY != 0,
                fs::metadata(format!("{r}/dev/null"))
                    .unwrap()
                    .file_type()
                    .is_char_device(),
            )
        });
        assert!(proc_self);
        assert!(sys_ro);
        assert!(null_is_char);
        // Nothing is mounted outside the thread's namespace.
        assert!(!d.path().join("proc/self").exists());
    }
}
