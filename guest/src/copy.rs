//! `vmc cp` in the guest: a path of the container root out as a tar (by
//! descriptors, `vmc_spawn::walk`), and a tar from the host into it.
//! What crosses to the host is unpacked there by vmc's hardened unpacker;
//! here the guest is the container's own machine.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// `path` of the root at `root` as a tar on `out`.
pub fn copy_out(
    root: &str,
    path: &str,
    follow: bool,
    top: &str,
    owner: Option<(u32, u32)>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let root = vmc_spawn::sys::open_dir_path(root)?;
    vmc_spawn::walk::write_tar(&root, path, follow, top, owner, out)
}

/// Unpacks the tar `r` into `path` of the root (a directory), or, when
/// `path` is not a directory, into its parent with the top entry renamed
/// to `path`'s last name (Docker's rule for `cp SRC CONTAINER:DEST`).
pub fn copy_in(root: &str, path: &str, r: impl Read) -> io::Result<()> {
    let root_fd = vmc_spawn::sys::open_dir_path(root)?;
    let clean = vmc_spawn::clean_path(path);
    let (dir, rename) = match vmc_spawn::open_dir_in_root(&root_fd, &clean) {
        Ok(d) => (d, None),
        Err(_) => {
            let (parent, name) = clean.rsplit_once('/').unwrap_or(("", &clean));
            let d = vmc_spawn::open_dir_in_root(&root_fd, parent).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the directory {parent}/ is not there: {e}"),
                )
            })?;
            (d, Some(name.to_string()))
        }
    };
    let base = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    let mut archive = tar::Archive::new(r);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut e = entry?;
        let p = e.path()?.into_owned();
        let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => parts.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(io::Error::other(format!(
                        "{}: not a relative path",
                        p.display()
                    )))
                }
            }
        }
        if parts.is_empty() {
            continue;
        }
        if let Some(n) = &rename {
            parts[0] = std::ffi::OsStr::new(n.as_str());
        }
        let rel: PathBuf = parts.iter().collect();
        let dst = base.join(&rel);
        if let Some(parent) = dst.parent().filter(|p| *p != Path::new(&base)) {
            std::fs::create_dir_all(parent)?;
        }
        e.unpack(&dst)?;
    }
    Ok(())
}
