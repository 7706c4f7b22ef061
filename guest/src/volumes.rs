//! The container's volumes and tmpfs mounts, made in the root once it is
//! assembled: the host's shares arrive through virtio-fs (tag `vmc`,
//! mounted once at [`SHARES`]), each entry `/N` bound at its target. Mount
//! points are made and opened inside the root (symlinks resolve within it)
//! and mounted through `/proc/self/fd`, as namespace mode does. Read-only
//! shares are refused by the host's file server whatever the guest does;
//! the read-only flag here only makes the guest say so at once.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use vmc_proto::{GuestMount, GuestMountKind};
use vmc_spawn::sys::{cstr, mount};

/// Where the virtio-fs share is mounted in the guest.
pub const SHARES: &str = "/run/vmc/shares";

/// Makes `mounts` (parents first) in the root at `root`, binds the /etc
/// files (`etc`) again over a volume mounted at /etc (as Docker's come
/// after the mounts), then, with `read_only`, remounts the root read-only.
pub fn mount_all(
    root: &str,
    mounts: &[GuestMount],
    etc: &[(String, String)],
    read_only: bool,
) -> io::Result<()> {
    if mounts
        .iter()
        .any(|m| matches!(m.kind, GuestMountKind::Share { .. }))
    {
        mount_shares()?;
    }
    let root_fd = vmc_spawn::sys::open_dir_path(root)?;
    for m in mounts {
        let what = |e: io::Error| io::Error::new(e.kind(), format!("mounting {}: {e}", m.target));
        let file = matches!(m.kind, GuestMountKind::Share { file: true, .. });
        make_mount_point(&root_fd, &m.target, file).map_err(what)?;
        let target = vmc_spawn::open_path_in_root(&root_fd, &m.target).map_err(what)?;
        let at = format!("/proc/self/fd/{}", target.as_raw_fd());
        let ro = if m.readonly { libc::MS_RDONLY } else { 0 };
        match &m.kind {
            GuestMountKind::Share { index, .. } => {
                let source = format!("{SHARES}/{index}");
                mount(Some(&source), &at, None, libc::MS_BIND, None).map_err(what)?;
                // Through a descriptor of the new mount, not the old one.
                let target = vmc_spawn::open_path_in_root(&root_fd, &m.target).map_err(what)?;
                let at = format!("/proc/self/fd/{}", target.as_raw_fd());
                mount(
                    None,
                    &at,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | ro,
                    None,
                )
                .map_err(what)?;
            }
            GuestMountKind::Tmpfs { flags, data } => {
                let data = (!data.is_empty()).then_some(data.as_str());
                mount(
                    Some("tmpfs"),
                    &at,
                    Some("tmpfs"),
                    *flags as libc::c_ulong | ro,
                    data,
                )
                .map_err(what)?;
            }
        }
    }
    if mounts.iter().any(|m| m.target == "/etc") {
        crate::rootfs::bind_etc(root, etc)?;
    }
    if read_only {
        mount(
            None,
            root,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )
        .map_err(|e| io::Error::new(e.kind(), format!("making the root read-only: {e}")))?;
    }
    Ok(())
}

/// Mounts the virtio-fs share at [`SHARES`], once.
pub fn mount_shares() -> io::Result<()> {
    if is_mounted(SHARES) {
        return Ok(());
    }
    fs::create_dir_all(SHARES)?;
    mount(
        Some("vmc"),
        SHARES,
        Some("virtiofs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(|e| io::Error::new(e.kind(), format!("mounting the shares (virtiofs): {e}")))
}

/// Binds share entry `index` (a live host directory) at `root` as the
/// container's root: suid and device files work in it as in any root;
/// the host's file server decides what the guest may do to the files.
pub fn bind_root(index: u32, root: &str) -> io::Result<()> {
    mount_shares()?;
    fs::create_dir_all(root)?;
    mount(
        Some(&format!("{SHARES}/{index}")),
        root,
        None,
        libc::MS_BIND,
        None,
    )
    .map_err(|e| io::Error::new(e.kind(), format!("binding the shared root: {e}")))
}

/// Makes `path` in the root (its directories, and the last part as a
/// directory or, for a file bind, an empty file), each step inside it.
fn make_mount_point(root: &OwnedFd, path: &str, file: bool) -> io::Result<()> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut at = String::from("/");
    for (i, part) in parts.iter().enumerate() {
        let dir = vmc_spawn::open_path_in_root(root, &at)?;
        let name = cstr(part)?;
        let last = i + 1 == parts.len();
        // SAFETY: mkdirat/openat on a directory descriptor we hold and a
        // NUL-terminated name.
        let r = unsafe {
            if last && file {
                let fd = libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd.min(0)
            } else {
                libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) && e.raw_os_error() != Some(libc::ELOOP) {
                return Err(e);
            }
        }
        at.push_str(part);
        at.push('/');
    }
    Ok(())
}

/// Whether something is mounted at `path` (its device differs from its
/// parent's).
fn is_mounted(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (fs::metadata(path), fs::metadata(format!("{path}/.."))) else {
        return false;
    };
    a.dev() != b.dev()
}
