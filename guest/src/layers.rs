//! The container root as a stack of layers, for builds.
//!
//! The root is an overlay of the image disk, committed layers (earlier build
//! steps) and one writable upper directory, all on the scratch disk but the
//! image. A build step's changes are exactly the upper directory: `commit`
//! streams it as an OCI layer tar (overlayfs whiteouts become `.wh.` entries)
//! and then `rotate`s, making it a read-only lower and starting an empty
//! upper. `apply` writes a layer the host made (COPY, ADD) into the root and
//! rotates too, so every layer stays separate.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use vmc_guest::sys::{check, cstr, mount};

struct Stack {
    image: String,
    scratch: String,
    root: String,
    /// Committed layers on the scratch disk, oldest first.
    lowers: Vec<String>,
    /// /etc files bound over the root's (see `init::bind_etc`), again after
    /// every rotation.
    etc: Vec<(String, String)>,
    /// Placeholders for them created in the current upper: not part of the
    /// step's layer.
    placeholders: Vec<String>,
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

/// Mounts the overlay, the pseudo filesystems and the `etc` files at
/// `root` the first time.
pub fn mount_stack(
    image: &str,
    scratch: &str,
    root: &str,
    etc: &[(String, String)],
) -> io::Result<()> {
    fs::create_dir_all(format!("{scratch}/upper"))?;
    fs::create_dir_all(format!("{scratch}/work"))?;
    let mut lowers = Vec::new();
    // Layers committed by an earlier VM on the same scratch disk.
    let mut n = 1;
    while Path::new(&format!("{scratch}/lower-{n}")).is_dir() {
        lowers.push(format!("{scratch}/lower-{n}"));
        n += 1;
    }
    let mut s = Stack {
        image: image.into(),
        scratch: scratch.into(),
        root: root.into(),
        lowers,
        etc: etc.to_vec(),
        placeholders: Vec::new(),
    };
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        0,
        Some(&overlay_data(&s)),
    )?;
    crate::init::mount_pseudo(root)?;
    s.placeholders = crate::init::bind_etc(root, etc)?;
    *STACK.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    Ok(())
}

fn umount_all(root: &str) -> io::Result<()> {
    // MNT_DETACH takes the /etc bind mounts with the root.
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
    crate::init::mount_pseudo(&s.root)?;
    // A placeholder made before is in a lower now: none is new.
    s.placeholders = crate::init::bind_etc(&s.root, &s.etc)?;
    Ok(())
}

/// Unpacks a layer tar (from the host) into the root, then rotates.
pub fn apply<R: Read>(reader: R) -> io::Result<()> {
    let (root, etc) = STACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| (s.root.clone(), s.etc.clone()))
        .ok_or_else(|| io::Error::other("the container root is not assembled"))?;
    // The layer may replace or delete a file bound over (COPY of its own
    // resolv.conf): a mount point cannot be, so the binds go first; rotate
    // puts them back.
    for (name, _) in &etc {
        if let Ok(p) = cstr(format!("{root}/etc/{name}")) {
            // SAFETY: p is NUL-terminated; failure (not mounted) is fine.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
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
    let (upper, placeholders) = STACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| (format!("{}/upper", s.scratch), s.placeholders.clone()))
        .ok_or_else(|| io::Error::other("the container root is not assembled"))?;
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    vmc_guest::upper::write_layer_except(Path::new(&upper), out, &placeholders, false)?;
    rotate()
}
