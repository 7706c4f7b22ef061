use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// Builds tars entry by entry, including ones tar::Builder would refuse.
#[derive(Default)]
struct Tar {
    b: Vec<u8>,
}

impl Tar {
    fn header(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        size: u64,
        link: Option<&str>,
        mode: u32,
    ) {
        let mut h = tar::Header::new_gnu();
        {
            let raw = h.as_old_mut();
            let p = path.as_bytes();
            raw.name[..p.len()].copy_from_slice(p);
            if let Some(l) = link {
                raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_000_000);
        h.set_cksum();
        self.b.extend_from_slice(h.as_bytes());
    }
    fn file(mut self, path: &str, data: &[u8]) -> Self {
        self.header(
            path,
            tar::EntryType::Regular,
            data.len() as u64,
            None,
            0o640,
        );
        self.b.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.b.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn dir(mut self, path: &str) -> Self {
        self.header(path, tar::EntryType::Directory, 0, None, 0o750);
        self
    }
    fn symlink(mut self, path: &str, to: &str) -> Self {
        self.header(path, tar::EntryType::Symlink, 0, Some(to), 0o777);
        self
    }
    fn hardlink(mut self, path: &str, to: &str) -> Self {
        self.header(path, tar::EntryType::Link, 0, Some(to), 0o644);
        self
    }
    fn special(mut self, path: &str, kind: tar::EntryType) -> Self {
        self.header(path, kind, 0, None, 0o644);
        self
    }
    fn done(mut self) -> Vec<u8> {
        self.b.extend(std::iter::repeat_n(0u8, 1024));
        self.b
    }
}

fn unpack_into(dir: &Path, tar: &[u8], mode: Whiteouts) -> Result<Stats, LayerError> {
    unpack(tar, dir, mode, Limits::default())
}

/// A target inside a sandbox directory, so escapes would land in the sandbox.
fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    (d, root)
}

fn outside_untouched(sb: &tempfile::TempDir) {
    let names: Vec<_> = std::fs::read_dir(sb.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("root")],
        "nothing written outside the target"
    );
}

#[test]
fn files_dirs_links_and_metadata_are_restored() {
    let (sb, root) = sandbox();
    let t = Tar::default()
        .dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .symlink("etc/link", "hosts")
        .hardlink("etc/hard", "etc/hosts")
        .file("usr/bin/tool", b"#!/bin/sh\n")
        .special("run/fifo", tar::EntryType::Fifo)
        .done();
    let st = unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert_eq!(st.entries, 6);
    let m = std::fs::metadata(root.join("etc/hosts")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777, m.mtime()),
        (1234, 5678, 0o640, 1_000_000)
    );
    assert_eq!(m.nlink(), 2, "hard link shares the inode");
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("hosts")
    );
    assert_eq!(
        std::fs::read(root.join("etc/hard")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert!(root.join("usr/bin").is_dir(), "missing parents are created");
    assert_eq!(
        std::fs::metadata(root.join("etc")).unwrap().mode() & 0o777,
        0o750
    );
    assert_eq!(
        std::fs::metadata(root.join("etc")).unwrap().mtime(),
        1_000_000
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    outside_untouched(&sb);
}

#[test]
fn dot_dot_is_refused_and_nothing_escapes() {
    let (sb, root) = sandbox();
    let t = Tar::default().file("../evil", b"x").done();
    let e = unpack_into(&root, &t, Whiteouts::Apply).unwrap_err();
    assert!(matches!(e, LayerError::Hostile { .. }), "{e}");
    let t = Tar::default().file("a/../../evil", b"x").done();
    assert!(unpack_into(&root, &t, Whiteouts::Apply).is_err());
    let t = Tar::default().hardlink("x", "../../etc/passwd").done();
    assert!(matches!(
        unpack_into(&root, &t, Whiteouts::Apply).unwrap_err(),
        LayerError::Hostile { .. }
    ));
    outside_untouched(&sb);
}

#[test]
fn absolute_paths_land_inside_the_target() {
    let (sb, root) = sandbox();
    let t = Tar::default().file("/abs/file", b"inside").done();
    unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert_eq!(std::fs::read(root.join("abs/file")).unwrap(), b"inside");
    outside_untouched(&sb);
}

#[test]
fn symlinks_are_resolved_inside_the_target() {
    let (sb, root) = sandbox();
    let escape = sb.path().display().to_string();
    let t = Tar::default()
        .symlink("abs", &escape) // points at the sandbox from the host's view
        .file("abs/planted", b"x")
        .symlink("up", "../../..")
        .file("up/planted2", b"y")
        .symlink("slash", "/")
        .file("slash/planted3", b"z")
        .done();
    unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert!(root
        .join(escape.trim_start_matches('/'))
        .join("planted")
        .is_file());
    assert!(
        root.join("planted2").is_file(),
        ".. is clamped at the target's root"
    );
    assert!(root.join("planted3").is_file());
    outside_untouched(&sb);
}

#[test]
fn hard_links_cannot_reach_host_files() {
    let (sb, root) = sandbox();
    std::fs::write(sb.path().join("secret"), b"host").unwrap();
    let abs = sb.path().join("secret").display().to_string();
    let t = Tar::default().hardlink("stolen", &abs).done();
    // The target resolves inside the root, where it does not exist.
    assert!(unpack_into(&root, &t, Whiteouts::Apply).is_err());
    assert!(!root.join("stolen").exists());
    // A symlink to the host file, then a hard link through it, links the symlink itself.
    let t = Tar::default().symlink("s", &abs).hardlink("h", "s").done();
    unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert!(std::fs::symlink_metadata(root.join("h"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_file(sb.path().join("secret")).unwrap();
    outside_untouched(&sb);
}

#[test]
fn device_nodes_are_left_out_and_sizes_are_bounded() {
    let (sb, root) = sandbox();
    let t = Tar::default()
        .special("dev/sda", tar::EntryType::Block)
        .special("dev/mem", tar::EntryType::Char)
        .file("ok", b"fine")
        .done();
    let st = unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert_eq!(
        st.skipped,
        vec!["dev/sda".to_string(), "dev/mem".to_string()]
    );
    assert!(!root.join("dev/sda").exists() && !root.join("dev/mem").exists());
    let big = Tar::default().file("big", &vec![1u8; 10_000]).done();
    let small = Limits {
        max_file: 4096,
        ..Limits::default()
    };
    assert!(matches!(
        unpack(&big[..], &root, Whiteouts::Apply, small).unwrap_err(),
        LayerError::TooLarge(_)
    ));
    let total = Limits {
        max_total: 5000,
        ..Limits::default()
    };
    let two = Tar::default()
        .file("a1", &[1u8; 3000])
        .file("a2", &[1u8; 3000])
        .done();
    assert!(matches!(
        unpack(&two[..], &root, Whiteouts::Apply, total).unwrap_err(),
        LayerError::TooLarge(_)
    ));
    let many = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let three = Tar::default()
        .file("b1", b"")
        .file("b2", b"")
        .file("b3", b"")
        .done();
    assert!(matches!(
        unpack(&three[..], &root, Whiteouts::Apply, many).unwrap_err(),
        LayerError::TooLarge(_)
    ));
    outside_untouched(&sb);
}

#[test]
fn whiteouts_delete_from_lower_layers_when_applied() {
    let (_sb, root) = sandbox();
    let l1 = Tar::default()
        .file("a/one", b"1")
        .file("a/two", b"2")
        .file("b", b"b")
        .file("c/keep", b"k")
        .file("c/old", b"o")
        .done();
    let l2 = Tar::default()
        .file("a/.wh.one", b"")
        .file(".wh.b", b"")
        .file("c/new", b"n")
        .file("c/.wh..wh..opq", b"")
        .done();
    unpack_into(&root, &l1, Whiteouts::Apply).unwrap();
    unpack_into(&root, &l2, Whiteouts::Apply).unwrap();
    assert!(!root.join("a/one").exists() && root.join("a/two").exists());
    assert!(!root.join("b").exists());
    let mut c: Vec<_> = std::fs::read_dir(root.join("c"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    c.sort();
    assert_eq!(
        c,
        vec![std::ffi::OsString::from("new")],
        "opaque keeps only this layer's entries"
    );
    assert!(
        !root.join("a/.wh.one").exists(),
        "whiteout markers are not files"
    );
}

#[test]
fn whiteouts_become_overlayfs_whiteouts_for_layer_dirs() {
    let (_sb, root) = sandbox();
    let l = Tar::default()
        .file("a/.wh.gone", b"")
        .file("d/.wh..wh..opq", b"")
        .done();
    unpack_into(&root, &l, Whiteouts::Overlay).unwrap();
    let m = std::fs::symlink_metadata(root.join("a/gone")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(m.file_type().is_char_device() && m.rdev() == 0);
    let mut v = [0u8; 4];
    let p = CString::new(root.join("d").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and buffer.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    assert_eq!((n, v[0]), (1, b'y'));
}

#[test]
fn gzip_and_zstd_layers_are_recognised() {
    let tarball = Tar::default().file("f", b"compressed content").done();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tarball).unwrap();
    let gz = gz.finish().unwrap();
    let zs = zstd::encode_all(&tarball[..], 1).unwrap();
    for (name, data) in [("plain", tarball.clone()), ("gzip", gz), ("zstd", zs)] {
        let (_sb, root) = sandbox();
        let r = decompress(&data[..]).unwrap();
        unpack(r, &root, Whiteouts::Apply, Limits::default()).unwrap();
        assert_eq!(
            std::fs::read(root.join("f")).unwrap(),
            b"compressed content",
            "{name}"
        );
        let _ = std::fs::Permissions::from_mode(0o644);
    }
}

#[test]
fn later_entries_replace_earlier_ones_of_another_kind() {
    let (_sb, root) = sandbox();
    let t = Tar::default()
        .file("x", b"file")
        .dir("x/")
        .file("x/inner", b"i")
        .symlink("y", "x")
        .file("y", b"now a file")
        .done();
    unpack_into(&root, &t, Whiteouts::Apply).unwrap();
    assert!(root.join("x").is_dir() && root.join("x/inner").is_file());
    assert!(!std::fs::symlink_metadata(root.join("y"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(root.join("y")).unwrap(), b"now a file");
}

#[test]
fn a_read_only_directory_gets_its_mode_after_its_entries() {
    let (_sb, root) = sandbox();
    let mut t = Tar::default();
    t.header("usr/bin/", tar::EntryType::Directory, 0, None, 0o555);
    let t = t.file("usr/bin/tool", b"x").dir("usr/bin/").done();
    // The second entry for usr/bin (0750) is the one that counts.
    unpack_into(&root, &t, Whiteouts::Overlay).unwrap();
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("usr/bin"), 0o750);
    let mut t = Tar::default();
    t.header("ro/", tar::EntryType::Directory, 0, None, 0o555);
    let t = t.file("ro/f", b"x").done();
    let (_sb2, root2) = sandbox();
    unpack_into(&root2, &t, Whiteouts::Overlay).unwrap();
    let m = std::fs::metadata(root2.join("ro")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o555, 1_000_000));
    assert_eq!(std::fs::read(root2.join("ro/f")).unwrap(), b"x");
}

#[test]
fn a_directory_replaced_by_a_symlink_does_not_pass_its_mode_on() {
    // `a/` (0777), then `a` as a symlink to the root: the deferred mode
    // must not land on the root (or anything else the link reaches).
    let (sb, root) = sandbox();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut t = Tar::default();
    t.header("a/", tar::EntryType::Directory, 0, None, 0o777);
    t.header("a", tar::EntryType::Symlink, 0, Some("/"), 0o777);
    t.header("b/", tar::EntryType::Directory, 0, None, 0o711);
    t.header("c", tar::EntryType::Symlink, 0, Some("b"), 0o777);
    t.header("c/", tar::EntryType::Directory, 0, None, 0o700);
    let t = t.done();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    let outside = mode(sb.path());
    let r = unpack_into(&root, &t, Whiteouts::Overlay);
    assert_eq!(mode(&root), 0o755, "the root keeps its mode ({r:?})");
    assert_eq!(mode(sb.path()), outside, "the sandbox too");
    if r.is_ok() && root.join("b").is_dir() {
        assert_ne!(mode(&root.join("b")), 0o777);
    }
    outside_untouched(&sb);
}

#[test]
fn whiteouts_of_the_directory_itself_or_its_parent_are_refused() {
    // `.wh...` names `..`: removing it from the unpack target's directory
    // would delete the directory above the target (every cached layer).
    for name in [".wh.", ".wh..", ".wh...", "sub/.wh...", "sub/.wh.."] {
        // The whiteout entry's own type does not matter: its name decides.
        let tar = Tar::default()
            .dir("sub")
            .file("sub/f", b"x")
            .symlink(name, "x")
            .done();
        for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
            let (sb, root) = sandbox();
            let e = unpack_into(&root, &tar, mode).expect_err(name);
            assert!(
                matches!(e, LayerError::Hostile { why, .. } if why.contains("whiteout")),
                "{name}: {e}"
            );
            assert!(root.join("sub/f").exists(), "{name}: the target is intact");
            outside_untouched(&sb);
        }
        let e = verify(&tar[..], Limits::default()).expect_err(name);
        assert!(matches!(e, LayerError::Hostile { .. }), "{name}: {e}");
    }
    // A whiteout of an ordinary name passes both.
    let tar = Tar::default().file(".wh.gone", b"").done();
    assert_eq!(verify(&tar[..], Limits::default()).unwrap().entries, 1);
}

#[test]
fn verify_refuses_what_unpack_refuses_and_counts_what_it_writes() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", Tar::default().file("../escape", b"x").done()),
        (
            "link out",
            Tar::default().hardlink("l", "../../etc/passwd").done(),
        ),
        ("link to root", Tar::default().hardlink("l", "/").done()),
    ];
    for (what, tar) in cases {
        let (_sb, root) = sandbox();
        assert!(
            unpack_into(&root, &tar, Whiteouts::Apply).is_err(),
            "{what}"
        );
        let e = verify(&tar[..], Limits::default()).expect_err(what);
        assert!(matches!(e, LayerError::Hostile { .. }), "{what}: {e}");
    }
    let tar = Tar::default()
        .dir("d")
        .file("d/a", &[1u8; 3000])
        .file("d/b", &[2u8; 5000])
        .done();
    let s = verify(&tar[..], Limits::default()).unwrap();
    assert_eq!((s.entries, s.bytes), (3, 8000));
    let small = Limits {
        max_total: 7999,
        ..Limits::default()
    };
    assert!(matches!(
        verify(&tar[..], small),
        Err(LayerError::TooLarge(_))
    ));
    let few = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    assert!(matches!(
        verify(&tar[..], few),
        Err(LayerError::TooLarge(_))
    ));
}

/// Issue 16, 10: a 3 KB layer whose sparse entry expands to 1 GiB wrote
/// all of it; sizes are counted as written (apparent), against the bounds.
#[test]
fn sparse_entries_count_at_their_apparent_size() {
    let d = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(d.path().join("holes")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let tar = d.path().join("sparse.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .args(["--sparse", "-cf"])
        .arg(&tar)
        .arg("holes")
        .status()
        .unwrap();
    assert!(st.success());
    let data = std::fs::read(&tar).unwrap();
    assert!(data.len() < 64 << 10, "a small archive: {}", data.len());
    let small = Limits {
        max_file: 1 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        verify(&data[..], small),
        Err(LayerError::TooLarge(_))
    ));
    let (_sb, root) = sandbox();
    assert!(matches!(
        unpack(&data[..], &root, Whiteouts::Apply, small),
        Err(LayerError::TooLarge(_))
    ));
    // Within the bounds it unpacks whole, at its apparent size.
    let s = verify(&data[..], Limits::default()).unwrap();
    assert_eq!(s.bytes, 64 << 20);
}

/// `vmc cp`'s unpacking of a container's tar: only what was asked for (the
/// top name and below; hard links too) is written, owners are the host's
/// choice, set-id bits (directories' too), fifos, whiteouts' meaning and
/// xattrs are dropped.
#[test]
fn a_copy_takes_only_its_top_entry_with_the_owner_given() {
    let open = |p: &Path| OwnedFd::from(std::fs::File::open(p).unwrap());
    for bad in [
        Tar::default()
            .file("asked/f", b"x")
            .file(".bashrc", b"evil")
            .done(),
        Tar::default().file("asked-not/f", b"x").done(),
        Tar::default().hardlink("asked/h", "etc/shadow").done(),
    ] {
        let (sb, root) = sandbox();
        let e = unpack_copy(&bad[..], open(&root), "asked", None).unwrap_err();
        assert!(matches!(e, LayerError::Hostile { .. }), "{e}");
        assert!(!root.join(".bashrc").exists());
        outside_untouched(&sb);
    }
    let (sb, root) = sandbox();
    let mut t = Tar::default();
    t.header("asked/", tar::EntryType::Directory, 0, None, 0o6755);
    let t = t
        .file("asked/.wh.f", b"plain")
        .special("asked/fifo", tar::EntryType::Fifo)
        .done();
    unpack_copy(&t[..], open(&root), "asked", Some((4321, 4321))).unwrap();
    let d = std::fs::metadata(root.join("asked")).unwrap();
    assert_eq!((d.uid(), d.mode() & 0o7777), (4321, 0o755));
    let f = std::fs::metadata(root.join("asked/.wh.f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (4321, 4321));
    assert!(!root.join("asked/fifo").exists());
    outside_untouched(&sb);
}
