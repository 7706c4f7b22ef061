//! The container root's own mounts, made by the agent in a VM for a
//! container and for each build step: /proc, /sys and /dev, and Docker's
//! /etc/resolv.conf, hosts and hostname bound over the root's (or, for a
//! root whose writable layer is in memory, placed in that layer).

use std::fs;
use std::io;

use vmc_spawn::sys::mount;

/// Whether the host's /etc file name `name` is a plain name in /etc (the
/// host never sends another; one is skipped, never written).
fn plain_name(name: &str) -> bool {
    !name.contains('/') && !name.starts_with('.')
}

/// The /etc files of `files` that may be set in the root at `root`, as
/// (name, content, path, whether the root has one): none when the root's
/// /etc is a symlink out of it (resolved here against the agent's root:
/// the files would land on the VM), and not those the root has as a
/// symlink (e.g. to systemd's resolver), which are left alone.
fn etc_targets<'a>(
    root: &str,
    files: &'a [(String, String)],
) -> io::Result<Vec<(&'a str, &'a str, String, bool)>> {
    let mut out = Vec::new();
    if files.is_empty() {
        return Ok(out);
    }
    fs::create_dir_all(format!("{root}/etc"))?;
    let etc = fs::canonicalize(format!("{root}/etc"))?;
    if !etc.starts_with(fs::canonicalize(root)?) {
        return Ok(out);
    }
    for (name, text) in files.iter().filter(|(n, _)| plain_name(n)) {
        let target = format!("{root}/etc/{name}");
        let exists = match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => continue,
            Ok(_) => true,
            Err(_) => false,
        };
        out.push((name.as_str(), text.as_str(), target, exists));
    }
    Ok(out)
}

/// Docker's /etc/resolv.conf, /etc/hosts and /etc/hostname for the
/// container: written under /run and bind-mounted over those of the root
/// at `root`. One the image lacks gets an empty placeholder in the upper
/// layer to mount over; their paths (relative to the root) are returned,
/// so that a build step's layer can leave them out.
pub fn bind_etc(root: &str, files: &[(String, String)]) -> io::Result<Vec<String>> {
    let mut placeholders = Vec::new();
    let dir = "/run/vmc-etc";
    for (name, text, target, exists) in etc_targets(root, files)? {
        fs::create_dir_all(dir)?;
        let src = format!("{dir}/{name}");
        fs::write(&src, text)?;
        if !exists {
            fs::write(&target, b"")?;
            placeholders.push(format!("etc/{name}"));
        }
        mount(Some(&src), &target, None, libc::MS_BIND, None)?;
    }
    Ok(placeholders)
}

/// The same files written into the mounted root at `root` (a VM restored
/// from a ready snapshot: they are in its writable layer already, empty,
/// so this is no copy-up).
pub fn write_etc(root: &str, files: &[(String, String)]) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    // The usual case, in few system calls (each a walk through the overlay,
    // which costs the guest kernel dearly under software virtualisation):
    // the root's own /etc directory, and each file in it as seeded, opened
    // without following a symlink. Anything else takes the general path.
    let dir = std::ffi::CString::new(format!("{root}/etc")).map_err(io::Error::other)?;
    // SAFETY: a valid C string; the descriptor returned is owned below.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return write_etc_resolved(root, files);
    }
    // SAFETY: open returned this descriptor; nothing else owns it.
    let etc = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut rest = Vec::new();
    for (name, text) in files.iter().filter(|(n, _)| plain_name(n)) {
        let c = std::ffi::CString::new(name.as_str()).map_err(io::Error::other)?;
        // SAFETY: a valid directory descriptor and C string.
        let f = unsafe {
            libc::openat(
                std::os::fd::AsRawFd::as_raw_fd(&etc),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if f >= 0 {
            // SAFETY: openat returned this descriptor; the File owns it.
            let mut file = unsafe { fs::File::from_raw_fd(f) };
            file.write_all(text.as_bytes())?;
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            // A symlink (e.g. to systemd's resolver): left alone.
            Some(libc::ELOOP) => {}
            _ => rest.push((name.clone(), text.clone())),
        }
    }
    write_etc_resolved(root, &rest)
}

/// [`write_etc`] for any root: `/etc` resolved (staying inside the root),
/// files created where missing.
fn write_etc_resolved(root: &str, files: &[(String, String)]) -> io::Result<()> {
    for (_, text, target, _) in etc_targets(root, files)? {
        fs::write(&target, text)?;
    }
    Ok(())
}

/// The same files for a root whose writable layer goes with the VM
/// (`--rm`), placed in its still empty upper directory `upper` before the
/// overlay over the image root `lower` is mounted: no bind mount, no
/// placeholder to keep out of a layer, no copy-up (each costs the guest
/// kernel far more). As for binds, an image whose /etc is not a directory,
/// or whose file there is a symlink, keeps its own.
pub fn seed_etc(lower: &str, upper: &str, files: &[(String, String)]) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if files.is_empty() {
        return Ok(());
    }
    let etc = format!("{upper}/etc");
    match fs::symlink_metadata(format!("{lower}/etc")) {
        Ok(m) if m.is_dir() => {
            fs::create_dir(&etc)?;
            fs::set_permissions(&etc, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            std::os::unix::fs::lchown(&etc, Some(m.uid()), Some(m.gid()))?;
        }
        Ok(_) => return Ok(()),
        Err(_) => fs::create_dir(&etc)?,
    }
    for (name, text) in files.iter().filter(|(n, _)| plain_name(n)) {
        let image_has = fs::symlink_metadata(format!("{lower}/etc/{name}"));
        if image_has.is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        let path = format!("{etc}/{name}");
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
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
