//! The container root as a stack of layers, for builds.
//!
//! The root is an overlay of the image disk, committed layers (earlier build
//! steps) and one writable upper directory, all on the scratch disk but the
//! image. A build step's changes are exactly the upper directory: `commit`
//! streams it as an OCI layer tar (overlayfs whiteouts become `.wh.` entries)
//! and then `rotate`s, making it a read-only lower and starting an empty
//! upper. `apply` writes a layer the host made (COPY, ADD) into the root and
//! rotates too, so every layer stays separate.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use vmc_guest::sys::{check, cstr, mount};

struct Stack {
    image: String,
    scratch: String,
    root: String,
    /// Committed layers on the scratch disk, oldest first.
    lowers: Vec<String>,
}

static STACK: Mutex<Option<Stack>> = Mutex::new(None);

fn overlay_data(s: &Stack) -> String {
    let mut lower: Vec<&str> = s.lowers.iter().rev().map(String::as_str).collect();
    lower.push(&s.image);
    format!(
        "lowerdir={},upperdir={}/upper,workdir={}/work",
        lower.join(":"),
        s.scratch,
        s.scratch
    )
}

/// Mounts the overlay and the pseudo filesystems at `root` the first time.
pub fn mount_stack(image: &str, scratch: &str, root: &str) -> io::Result<()> {
    fs::create_dir_all(format!("{scratch}/upper"))?;
    fs::create_dir_all(format!("{scratch}/work"))?;
    let mut lowers = Vec::new();
    // Layers committed by an earlier VM on the same scratch disk.
    let mut n = 1;
    while Path::new(&format!("{scratch}/lower-{n}")).is_dir() {
        lowers.push(format!("{scratch}/lower-{n}"));
        n += 1;
    }
    let s = Stack {
        image: image.into(),
        scratch: scratch.into(),
        root: root.into(),
        lowers,
    };
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        0,
        Some(&overlay_data(&s)),
    )?;
    crate::init::mount_pseudo(root)?;
    *STACK.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    Ok(())
}

fn umount_all(root: &str) -> io::Result<()> {
    for sub in ["dev", "sys", "proc", ""] {
        let p = cstr(format!("{root}/{sub}").trim_end_matches('/'))?;
        // SAFETY: p is NUL-terminated.
        check(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) })?;
    }
    Ok(())
}

/// Makes the upper directory the newest lower and starts an empty upper.
pub fn rotate() -> io::Result<()> {
    let mut guard = STACK.lock().unwrap_or_else(|e| e.into_inner());
    let s = guard
        .as_mut()
        .ok_or_else(|| io::Error::other("the container root is not assembled"))?;
    // SAFETY: sync takes no arguments; the upper must be on disk before it becomes a lower.
    unsafe { libc::sync() };
    umount_all(&s.root)?;
    let lower = format!("{}/lower-{}", s.scratch, s.lowers.len() + 1);
    fs::rename(format!("{}/upper", s.scratch), &lower)?;
    fs::create_dir(format!("{}/upper", s.scratch))?;
    let _ = fs::remove_dir_all(format!("{}/work", s.scratch));
    fs::create_dir(format!("{}/work", s.scratch))?;
    s.lowers.push(lower);
    mount(
        Some("overlay"),
        &s.root,
        Some("overlay"),
        0,
        Some(&overlay_data(s)),
    )?;
    crate::init::mount_pseudo(&s.root)
}

/// Unpacks a layer tar (from the host) into the root, then rotates.
pub fn apply<R: Read>(reader: R) -> io::Result<()> {
    let root = STACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| s.root.clone())
        .ok_or_else(|| io::Error::other("the container root is not assembled"))?;
    let mut a = tar::Archive::new(reader);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(true);
    a.set_overwrite(true);
    // What this layer itself wrote: an opaque marker hides only what was
    // there before it, never its own siblings.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in a.entries()? {
        let mut entry = entry?;
        let rel: PathBuf = entry
            .path()?
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        if entry
            .path()?
            .components()
            .any(|c| c == Component::ParentDir)
        {
            continue;
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == ".wh..wh..opq" {
            // Deleting through the overlay hides the lower entries.
            if let Ok(children) = fs::read_dir(Path::new(&root).join(&dir)) {
                for c in children.flatten() {
                    if !written.contains(&dir.join(c.file_name())) {
                        remove_any(&c.path())?;
                    }
                }
            }
        } else if let Some(gone) = name.strip_prefix(".wh.") {
            remove_any(&Path::new(&root).join(&dir).join(gone))?;
        } else {
            entry.unpack_in(&root)?;
            written.insert(rel);
        }
    }
    rotate()
}

fn remove_any(p: &Path) -> io::Result<()> {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(_) => Ok(()),
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Streams the upper directory as an OCI layer tar into `out`, then rotates.
pub fn commit<W: Write>(out: W) -> io::Result<()> {
    let upper = STACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| format!("{}/upper", s.scratch))
        .ok_or_else(|| io::Error::other("the container root is not assembled"))?;
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut links = HashMap::new();
    append_dir(&mut b, Path::new(&upper), Path::new(""), &mut links)?;
    b.into_inner()?.flush()?;
    rotate()
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
    links: &mut HashMap<(u64, u64), PathBuf>,
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
            if xattr(&path, "trusted.overlay.opaque").as_deref() == Some(b"y") {
                let mut h = header_for(&meta, tar::EntryType::Regular);
                h.set_mode(0o644);
                b.append_data(&mut h, relp.join(".wh..wh..opq"), io::empty())?;
            }
            append_dir(b, &path, &relp, links)?;
        } else if ft.is_symlink() {
            let mut h = header_for(&meta, tar::EntryType::Symlink);
            b.append_link(&mut h, &relp, fs::read_link(&path)?)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    let mut h = header_for(&meta, tar::EntryType::Link);
                    b.append_link(&mut h, &relp, first)?;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), relp.clone());
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
