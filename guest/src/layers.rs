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

use vmc_spawn::sys::{check, cstr, mount};

struct Stack {
    image: String,
    scratch: String,
    root: String,
    /// Committed layers on the scratch disk, oldest first.
    lowers: Vec<String>,
    /// /etc files bound over the root's (see `rootfs::bind_etc`), again after
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

/// Layers committed by an earlier VM on the same scratch disk, oldest first.
fn committed_lowers(scratch: &str) -> Vec<String> {
    let mut lowers = Vec::new();
    let mut n = 1;
    while Path::new(&format!("{scratch}/lower-{n}")).is_dir() {
        lowers.push(format!("{scratch}/lower-{n}"));
        n += 1;
    }
    lowers
}

/// Mounts the overlay, the pseudo filesystems and the `etc` files at
/// `root` the first time.
pub fn mount_stack(
    image: &str,
    scratch: &str,
    root: &str,
    etc: &[(String, String)],
    upper_in_memory: bool,
    lap: &mut dyn FnMut(&'static str),
) -> io::Result<()> {
    fs::create_dir_all(format!("{scratch}/upper"))?;
    fs::create_dir_all(format!("{scratch}/work"))?;
    lap("upper dirs");
    if upper_in_memory {
        // A fresh upper over the image alone: the files go in it before
        // the overlay is mounted, with no copy-up through it.
        crate::rootfs::seed_etc(image, &format!("{scratch}/upper"), etc)?;
        lap("etc files");
    }
    let lowers = committed_lowers(scratch);
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
    lap("overlay");
    crate::rootfs::mount_pseudo(root)?;
    lap("proc sys dev");
    if !upper_in_memory {
        s.placeholders = crate::rootfs::bind_etc(root, etc)?;
        lap("etc files");
    }
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
    // No sync: the upper becomes a lower on the same mounted filesystem
    // (its page cache is the truth), and the scratch disk is thrown away
    // with the build VM. A sync here cost a journal commit and a disk
    // flush per step.
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
    crate::rootfs::mount_pseudo(&s.root)?;
    // A placeholder made before is in a lower now: none is new.
    s.placeholders = crate::rootfs::bind_etc(&s.root, &s.etc)?;
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
    unpack_layer(reader, Path::new(&root))?;
    rotate()
}

/// Unpacks a layer tar into `root`, turning its whiteouts into deletions.
fn unpack_layer<R: Read>(reader: R, root: &Path) -> io::Result<()> {
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
        let whiteout = name.starts_with(".wh.");
        // A deletion must not leave the root through the image's symlinks
        // (the agent resolves them against its own root).
        if whiteout && !inside(root, &dir) {
            continue;
        }
        if name == ".wh..wh..opq" {
            // Deleting through the overlay hides the lower entries.
            if let Ok(children) = fs::read_dir(root.join(&dir)) {
                for c in children.flatten() {
                    if !written.contains(&dir.join(c.file_name())) {
                        remove_any(&c.path())?;
                    }
                }
            }
        } else if let Some(gone) = name.strip_prefix(".wh.") {
            // "" and "." would name the directory itself.
            if !matches!(gone, "" | "." | "..") {
                remove_any(&root.join(&dir).join(gone))?;
            }
        } else {
            entry.unpack_in(root)?;
            written.insert(rel);
        }
    }
    Ok(())
}

/// Whether `dir` (relative to `root`) exists and resolves inside `root`.
fn inside(root: &Path, dir: &Path) -> bool {
    match (root.canonicalize(), root.join(dir).canonicalize()) {
        (Ok(r), Ok(d)) => d.starts_with(r),
        _ => false,
    }
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
    // Read through the page cache: nothing needs to be on the disk first.
    vmc_spawn::upper::write_layer_except(Path::new(&upper), out, &placeholders, false)?;
    rotate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A layer tar of files (`Some(text)`) and directories (`None`). Names
    /// are written raw, so that hostile ones (`..`) can be made.
    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, text) in entries {
            let mut h = tar::Header::new_ustar();
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match text {
                Some(t) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(t.len() as u64);
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                }
            }
            h.set_cksum();
            b.append(&h, text.unwrap_or("").as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Every path under `dir`, sorted, directories marked with a `/`.
    fn tree(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let rel = e.path().strip_prefix(base).unwrap().display().to_string();
                if e.file_type().unwrap().is_dir() {
                    out.push(format!("{rel}/"));
                    walk(base, &e.path(), out);
                } else {
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "old").unwrap();
    }

    #[test]
    fn overlay_lists_the_newest_layer_first_and_the_image_last() {
        let mut s = Stack {
            image: "/img".into(),
            scratch: "/s".into(),
            root: "/r".into(),
            lowers: vec![],
            etc: vec![],
            placeholders: vec![],
        };
        assert_eq!(
            overlay_data(&s),
            "lowerdir=/img,upperdir=/s/upper,workdir=/s/work"
        );
        s.lowers = vec!["/s/lower-1".into(), "/s/lower-2".into()];
        assert_eq!(
            overlay_data(&s),
            "lowerdir=/s/lower-2:/s/lower-1:/img,upperdir=/s/upper,workdir=/s/work"
        );
    }

    #[test]
    fn committed_lowers_are_counted_from_one_without_gaps() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().to_str().unwrap();
        assert!(committed_lowers(s).is_empty());
        for n in [1, 2, 4] {
            fs::create_dir(d.path().join(format!("lower-{n}"))).unwrap();
        }
        // A file is not a layer.
        fs::write(d.path().join("lower-3"), "").unwrap();
        assert_eq!(
            committed_lowers(s),
            [format!("{s}/lower-1"), format!("{s}/lower-2")]
        );
    }

    #[test]
    fn whiteouts_delete_files_and_directories() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        touch(&root.join("etc/gone"));
        touch(&root.join("var/cache/x/y"));
        touch(&root.join("etc/kept"));
        let tar = layer(&[
            ("etc/.wh.gone", Some("")),
            ("var/.wh.cache", Some("")),
            // Deleting what is not there is no error.
            ("etc/.wh.never", Some("")),
            ("/srv/", None),
            ("/srv/new", Some("new")),
        ]);
        unpack_layer(&tar[..], root).unwrap();
        assert_eq!(tree(root), ["etc/", "etc/kept", "srv/", "srv/new", "var/"]);
        assert_eq!(fs::read_to_string(root.join("srv/new")).unwrap(), "new");
    }

    #[test]
    fn opaque_marker_hides_only_what_was_there_before_the_layer() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        touch(&root.join("app/old"));
        touch(&root.join("app/lib/old"));
        touch(&root.join("other/stays"));
        let tar = layer(&[
            ("app/", None),
            ("app/new", Some("1")),
            ("app/.wh..wh..opq", Some("")),
            ("app/later", Some("2")),
        ]);
        unpack_layer(&tar[..], root).unwrap();
        assert_eq!(
            tree(root),
            ["app/", "app/later", "app/new", "other/", "other/stays"]
        );
    }

    #[test]
    fn parent_dir_entries_are_skipped() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        touch(&d.path().join("victim"));
        let tar = layer(&[
            ("../escaped", Some("x")),
            ("a/../../escaped2", Some("x")),
            ("../.wh.victim", Some("")),
            ("ok", Some("y")),
        ]);
        unpack_layer(&tar[..], &root).unwrap();
        assert_eq!(tree(d.path()), ["root/", "root/ok", "victim"]);
    }

    #[test]
    fn whiteouts_of_no_name_delete_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        touch(&root.join("etc/passwd"));
        touch(&root.join("bin/sh"));
        // ".wh." names nothing and ".wh.." names the directory itself.
        let tar = layer(&[(".wh.", Some("")), ("etc/.wh..", Some(""))]);
        unpack_layer(&tar[..], root).unwrap();
        assert_eq!(tree(root), ["bin/", "bin/sh", "etc/", "etc/passwd"]);
    }

    #[test]
    fn whiteouts_do_not_follow_image_symlinks_out_of_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        touch(&outside.join("victim"));
        touch(&outside.join("sibling"));
        fs::create_dir(&root).unwrap();
        // The image's links, resolved by the agent, point out of the root.
        symlink(&outside, root.join("abs")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        let tar = layer(&[
            ("abs/.wh.victim", Some("")),
            ("rel/.wh.victim", Some("")),
            ("abs/.wh..wh..opq", Some("")),
            ("rel/.wh..wh..opq", Some("")),
        ]);
        unpack_layer(&tar[..], &root).unwrap();
        assert_eq!(tree(&outside), ["sibling", "victim"]);
        // A link that stays inside the root is followed, as unpacking does.
        touch(&root.join("usr/lib/x"));
        symlink("usr/lib", root.join("lib")).unwrap();
        unpack_layer(&layer(&[("lib/.wh.x", Some(""))])[..], &root).unwrap();
        assert!(!root.join("usr/lib/x").exists());
    }

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn commit_and_apply_each_make_a_layer_of_the_overlay() {
        if !vmc_spawn::testing::root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = d.path().to_str().unwrap().to_string();
        crate::testns::in_namespaces(libc::CLONE_NEWNS, move || {
            // Overlay's upper and work dirs on tmpfs, as on a scratch disk.
            mount(Some("tmpfs"), &base, Some("tmpfs"), 0, None).unwrap();
            let (image, scratch, root) = (
                format!("{base}/image"),
                format!("{base}/scratch"),
                format!("{base}/root"),
            );
            for d in ["proc", "sys", "dev"] {
                fs::create_dir_all(format!("{image}/{d}")).unwrap();
            }
            fs::write(format!("{image}/a"), "a").unwrap();
            fs::write(format!("{image}/b"), "b").unwrap();
            fs::create_dir_all(&root).unwrap();
            mount_stack(&image, &scratch, &root, &[], false, &mut |_| {}).unwrap();
            let root = Path::new(&root);
            // What the root shows, but the mounted pseudo filesystems.
            let files = || {
                let mut v: Vec<String> = fs::read_dir(root)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| !["proc", "sys", "dev"].contains(&n.as_str()))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(files(), ["a", "b"]);
            // A build step: one file made, one deleted.
            fs::write(root.join("c"), "c").unwrap();
            fs::remove_file(root.join("b")).unwrap();
            let mut out = Vec::new();
            commit(&mut out).unwrap();
            assert_eq!(names(&out), [".wh.b", "c"]);
            // The step's changes became lower-1; the new upper is empty.
            assert_eq!(files(), ["a", "c"]);
            assert_eq!(tree(Path::new(&format!("{scratch}/lower-1"))).len(), 2);
            assert!(tree(Path::new(&format!("{scratch}/upper"))).is_empty());
            // A host-made layer deleting from the image and adding a file.
            apply(&layer(&[(".wh.a", Some("")), ("d", Some("d"))])[..]).unwrap();
            assert_eq!(files(), ["c", "d"]);
            assert!(Path::new(&format!("{scratch}/lower-2/d")).is_file());
            assert!(tree(Path::new(&format!("{scratch}/upper"))).is_empty());
            // The next commit has only what came after.
            fs::write(root.join("e"), "e").unwrap();
            let mut out = Vec::new();
            commit(&mut out).unwrap();
            assert_eq!(names(&out), ["e"]);
            assert_eq!(committed_lowers(&scratch).len(), 3);
        });
    }
}
