//! The container root's own mounts, made by the agent in a VM for a
//! container and for each build step: /proc, /sys and /dev, and Docker's
//! /etc/resolv.conf, hosts and hostname bound over the root's.

use std::fs;
use std::io;

use vmc_spawn::sys::mount;

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
    // An image whose /etc is a symlink out of the root (resolved here
    // against the agent's root) gets none: the binds would land on the VM.
    let etc = fs::canonicalize(format!("{root}/etc"))?;
    if !etc.starts_with(fs::canonicalize(root)?) {
        return Ok(placeholders);
    }
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
