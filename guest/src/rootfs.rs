//! The container root's own mounts, made by the agent in a VM for a
//! container and for each build step: /proc, /sys and /dev, and Docker's
//! /etc/resolv.conf, hosts and hostname bound over the root's (or, for a
//! root whose writable layer is in memory, written into it).

use std::fs;
use std::io;

use vmc_spawn::sys::mount;

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
    for (name, text) in files {
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
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

/// The same files written into the root itself, for a root whose writable
/// layer goes with the VM (`--rm`): no bind mount and no placeholder to
/// keep out of a layer, which costs the guest kernel far less.
pub fn write_etc(root: &str, files: &[(String, String)]) -> io::Result<()> {
    for (_, text, target, _) in etc_targets(root, files)? {
        fs::write(&target, text)?;
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
