//! An overlayfs upper directory as an OCI layer tar: overlay whiteouts
//! (0/0 character devices) become `.wh.NAME` entries and opaque directories
//! (`trusted.overlay.opaque=y`, `user.overlay.opaque=y` in a rootless
//! overlay) get a `.wh..wh..opq` entry. Used by the guest agent for RUN
//! steps in a microVM and by namespace-mode builds on the host.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Writes the contents of `upper` as a layer tar to `out`.
pub fn write_layer<W: Write>(upper: &Path, out: W) -> io::Result<()> {
    write_layer_except(upper, out, &[], false)
}

/// As [`write_layer`], leaving out `placeholders` (paths relative to
/// `upper`) where they are still the empty files the sandbox created to
/// bind /etc/resolv.conf over: the image did not have them, and the
/// step's layer does not either. `userxattr`: the overlay was mounted with
/// that option (rootless), so its opaque marks are `user.overlay.opaque`;
/// otherwise such an xattr is the image's own data, not a mark.
pub fn write_layer_except<W: Write>(
    upper: &Path,
    out: W,
    placeholders: &[String],
    userxattr: bool,
) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut walk = Walk {
        links: HashMap::new(),
        skip: placeholders.iter().map(PathBuf::from).collect(),
        opaque: if userxattr {
            "user.overlay.opaque"
        } else {
            "trusted.overlay.opaque"
        },
    };
    append_dir(&mut b, upper, Path::new(""), &mut walk)?;
    b.into_inner()?.flush()
}

struct Walk {
    /// First path of each multiply-linked inode written.
    links: HashMap<(u64, u64), PathBuf>,
    skip: Vec<PathBuf>,
    /// The xattr overlayfs marks opaque directories with.
    opaque: &'static str,
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid strings and buffer; lgetxattr does not follow symlinks.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

fn header_for(meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_size(0);
    h
}

fn append_xattrs<W: Write>(b: &mut tar::Builder<W>, path: &Path) -> io::Result<()> {
    let mut pax = Vec::new();
    for name in ["security.capability"] {
        if let Some(v) = xattr(path, name) {
            pax.push((format!("SCHILY.xattr.{name}"), v));
        }
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    Ok(())
}

fn append_dir<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    walk: &mut Walk,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name();
        let relp = rel.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // An overlayfs whiteout: the file was deleted.
            let wh = rel.join(format!(".wh.{}", name.to_string_lossy()));
            let mut h = header_for(&meta, tar::EntryType::Regular);
            h.set_mode(0o644);
            b.append_data(&mut h, &wh, io::empty())?;
            continue;
        }
        if ft.is_dir() {
            let mut h = header_for(&meta, tar::EntryType::Directory);
            append_xattrs(b, &path)?;
            b.append_data(&mut h, &relp, io::empty())?;
            if xattr(&path, walk.opaque).as_deref() == Some(b"y") {
                let mut h = header_for(&meta, tar::EntryType::Regular);
                h.set_mode(0o644);
                b.append_data(&mut h, relp.join(".wh..wh..opq"), io::empty())?;
            }
            append_dir(b, &path, &relp, walk)?;
        } else if ft.is_symlink() {
            let mut h = header_for(&meta, tar::EntryType::Symlink);
            b.append_link(&mut h, &relp, fs::read_link(&path)?)?;
        } else if ft.is_file() {
            if meta.len() == 0 && walk.skip.contains(&relp) {
                continue;
            }
            if meta.nlink() > 1 {
                if let Some(first) = walk.links.get(&(meta.dev(), meta.ino())) {
                    let mut h = header_for(&meta, tar::EntryType::Link);
                    b.append_link(&mut h, &relp, first)?;
                    continue;
                }
                walk.links.insert((meta.dev(), meta.ino()), relp.clone());
            }
            let mut h = header_for(&meta, tar::EntryType::Regular);
            h.set_size(meta.len());
            append_xattrs(b, &path)?;
            b.append_data(&mut h, &relp, fs::File::open(&path)?)?;
        } else if ft.is_fifo() {
            let mut h = header_for(&meta, tar::EntryType::Fifo);
            b.append_data(&mut h, &relp, io::empty())?;
        }
        // Sockets and device nodes are not part of a layer.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid strings and buffer.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            r,
            0,
            "{name} on {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }

    /// Opaque directories get a `.wh..wh..opq` entry: marked with
    /// `trusted.overlay.opaque=y` by a root overlay, `user.overlay.opaque=y`
    /// by a rootless one (`userxattr`); the other kind, or another value, is
    /// no mark. Deleted files (0/0 character devices) become `.wh.NAME`.
    #[test]
    fn opaque_directories_and_whiteouts_become_oci_markers() {
        if !crate::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let up = d.path();
        for dir in ["root-opaque", "user-opaque", "not-opaque", "plain"] {
            fs::create_dir(up.join(dir)).unwrap();
            fs::write(up.join(dir).join("f"), dir).unwrap();
        }
        set_xattr(&up.join("root-opaque"), "trusted.overlay.opaque", b"y");
        set_xattr(&up.join("user-opaque"), "user.overlay.opaque", b"y");
        set_xattr(&up.join("not-opaque"), "trusted.overlay.opaque", b"n");
        let gone = CString::new(up.join("plain/gone").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; a 0/0 character device is overlayfs's whiteout.
        let r = unsafe { libc::mknod(gone.as_ptr(), libc::S_IFCHR, 0) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let layer = |userxattr: bool| {
            let mut out = Vec::new();
            write_layer_except(up, &mut out, &[], userxattr).unwrap();
            names(&out)
        };
        let common = [
            "not-opaque",
            "not-opaque/f",
            "plain",
            "plain/f",
            // In the order of the upper's names: "gone" after "f".
            "plain/.wh.gone",
        ];
        let with = |opaque: &str| {
            let mut v: Vec<String> = common.iter().map(|s| s.to_string()).collect();
            for dir in ["root-opaque", "user-opaque"] {
                v.push(dir.into());
                if dir == opaque {
                    v.push(format!("{dir}/.wh..wh..opq"));
                }
                v.push(format!("{dir}/f"));
            }
            v
        };
        assert_eq!(layer(false), with("root-opaque"), "a root overlay");
        assert_eq!(layer(true), with("user-opaque"), "a rootless overlay");
        let mut plain = Vec::new();
        write_layer(up, &mut plain).unwrap();
        assert_eq!(names(&plain), with("root-opaque"), "write_layer is root's");
    }

    #[test]
    fn placeholders_stay_out_of_the_layer_while_empty() {
        let d = std::env::temp_dir().join(format!("vmc-upper-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::write(d.join("etc/resolv.conf"), b"").unwrap();
        fs::write(d.join("etc/hosts"), b"").unwrap();
        fs::write(d.join("made"), b"by the step").unwrap();
        let skip = ["etc/resolv.conf".to_string()];
        let mut out = Vec::new();
        write_layer_except(&d, &mut out, &skip, false).unwrap();
        // An empty file that is not a placeholder is kept.
        assert_eq!(names(&out), ["etc", "etc/hosts", "made"]);
        // A placeholder the step filled is the step's change: kept.
        fs::write(d.join("etc/resolv.conf"), b"nameserver 10.0.0.1\n").unwrap();
        let mut out = Vec::new();
        write_layer_except(&d, &mut out, &skip, false).unwrap();
        assert_eq!(names(&out), ["etc", "etc/hosts", "etc/resolv.conf", "made"]);
        let mut plain = Vec::new();
        write_layer(&d, &mut plain).unwrap();
        assert_eq!(out, plain);
        fs::remove_dir_all(&d).unwrap();
    }
}
