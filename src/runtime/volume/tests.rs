use super::*;

fn volume(name: &str, anonymous: bool, nocopy: bool) -> MountSource {
    MountSource::Volume {
        name: name.into(),
        anonymous,
        nocopy,
    }
}

/// `-v` reads as Docker reads it: a host path, a volume name, or an
/// anonymous volume, with options after the last colon.
#[test]
fn dash_v_takes_dockers_three_forms() {
    let m = parse_volume_flag("/srv/data:/data:ro").unwrap();
    assert_eq!(
        m.source,
        MountSource::Bind {
            source: "/srv/data".into()
        }
    );
    assert_eq!((m.target.as_str(), m.readonly), ("/data", true));

    let m = parse_volume_flag("cache:/var/cache/./app/").unwrap();
    assert_eq!(m.source, volume("cache", false, false));
    assert_eq!((m.target.as_str(), m.readonly), ("/var/cache/app", false));

    let m = parse_volume_flag("/scratch").unwrap();
    assert!(
        matches!(&m.source, MountSource::Volume { name, anonymous: true, .. } if name.len() == 64)
    );
    let m = parse_volume_flag("/scratch:ro,nocopy").unwrap();
    assert!(m.readonly);
    assert!(matches!(m.source, MountSource::Volume { nocopy: true, .. }));
    assert!(parse_volume_flag("/a:/b:Z").is_ok());
}

/// What Docker refuses, vmc refuses, naming the problem.
#[test]
fn dash_v_refuses_what_docker_refuses() {
    let e = |s: &str| parse_volume_flag(s).unwrap_err().to_string();
    assert!(
        e("./rel:/data").contains("not a valid volume name"),
        "{}",
        e("./rel:/data")
    );
    assert!(e("data:rel").contains("absolute"));
    assert!(e("/a:/").contains("cannot be '/'"));
    assert!(e("/a:/b:rw:x").contains("too many colons"));
    assert!(e("/a:/b:bogus").contains("unknown option 'bogus'"));
    assert!(e("/a:/b:shared").contains("not supported"));
    assert!(e("/a:/b:nocopy").contains("nocopy is for volumes"));
    assert!(e("x:/b").contains("not a valid volume name"));
}

/// `--mount` takes Docker's keys and aliases; a bind's source must exist.
#[test]
fn dash_mount_takes_dockers_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().display().to_string();
    let m = parse_mount_flag(&format!("type=bind,src={src},dst=/in,readonly")).unwrap();
    assert_eq!(
        m.source,
        MountSource::Bind {
            source: src.clone().into()
        }
    );
    assert!(m.readonly);
    let m = parse_mount_flag("source=named,target=/v,volume-nocopy=true").unwrap();
    assert_eq!(m.source, volume("named", false, true));
    let m = parse_mount_flag("type=volume,destination=/anon,ro=false").unwrap();
    assert!(matches!(
        m.source,
        MountSource::Volume {
            anonymous: true,
            ..
        }
    ));
    let m = parse_mount_flag("type=tmpfs,target=/t,tmpfs-size=64m,tmpfs-mode=1770").unwrap();
    assert_eq!(
        m.source,
        MountSource::Tmpfs {
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: "size=64m,mode=1770".into()
        }
    );

    let e = |s: &str| parse_mount_flag(s).unwrap_err().to_string();
    assert!(e("type=bind,source=/no/such/dir,target=/x")
        .contains("bind source path does not exist: /no/such/dir"));
    assert!(e("type=bind,target=/x").contains("needs a source"));
    assert!(e("type=volume,source=v").contains("a target is required"));
    assert!(e("type=nfs,target=/x").contains("type 'nfs'"));
    assert!(e("type=tmpfs,source=x,target=/x").contains("takes no source"));
    assert!(e("type=tmpfs,target=/x,tmpfs-size=lots").contains("tmpfs-size=lots"));
    assert!(e("type=volume,target=/x,tmpfs-mode=700").contains("for type=tmpfs"));
    assert!(e("target=/x,colour=red").contains("unknown key 'colour'"));
    assert!(e("target=/x,readonly=maybe").contains("give true or false"));
}

/// `--tmpfs`: Docker's defaults (noexec, nosuid, nodev), its options.
#[test]
fn dash_tmpfs_defaults_and_options() {
    let m = parse_tmpfs_flag("/run").unwrap();
    let all = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    assert_eq!(
        m.source,
        MountSource::Tmpfs {
            flags: all,
            data: String::new()
        }
    );
    let m = parse_tmpfs_flag("/run:exec,size=1m,mode=700,uid=1000,ro").unwrap();
    assert_eq!(
        m.source,
        MountSource::Tmpfs {
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: "size=1m,mode=700,uid=1000".into()
        }
    );
    assert!(m.readonly);
    assert!(parse_tmpfs_flag("/run:size=1x").is_err());
    assert!(parse_tmpfs_flag("/run:mode=999").is_err());
    assert!(parse_tmpfs_flag("/run:huge").is_err());
    assert!(parse_tmpfs_flag("run").is_err());
}

/// The image's VOLUMEs become anonymous volumes unless a given mount is
/// there; two given mounts at one place are refused; parents come first.
#[test]
fn the_plan_adds_image_volumes_and_orders_parents_first() {
    let given = vec![
        parse_volume_flag("/h/a:/data/sub").unwrap(),
        parse_volume_flag("named:/data").unwrap(),
    ];
    let plan = plan(
        given,
        &["/data".into(), "/var/lib/db/".into(), "rel".into()],
    )
    .unwrap();
    let targets: Vec<&str> = plan.iter().map(|m| m.target.as_str()).collect();
    assert_eq!(targets, ["/data", "/data/sub", "/var/lib/db"]);
    assert!(matches!(
        plan[2].source,
        MountSource::Volume {
            anonymous: true,
            ..
        }
    ));
    let dup = vec![
        parse_volume_flag("/h/a:/x").unwrap(),
        parse_tmpfs_flag("/x/").unwrap(),
    ];
    assert_eq!(plan_err(dup), "duplicate mount point: /x");
}

fn plan_err(given: Vec<Mount>) -> String {
    plan(given, &[]).unwrap_err().to_string()
}

#[test]
fn volume_names_follow_dockers_rule() {
    for ok in ["ab", "my-vol_1.2", "0data"] {
        assert!(valid_name(ok), "{ok}");
    }
    for bad in ["a", "-x", ".x", "a/b", "a:b", "..", "a b", ""] {
        assert!(!valid_name(bad), "{bad}");
    }
}

/// Filling a volume copies the image's tree with modes, owners, links and
/// times, and follows no symlink out of the root: a link at the mount
/// point or inside the tree is resolved in the root or copied as a link.
#[test]
fn populate_copies_the_tree_and_stays_in_the_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(root.join("app/sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host").unwrap();
    std::fs::write(root.join("app/sub/f"), "data").unwrap();
    std::fs::set_permissions(root.join("app/sub/f"), PermissionsExt::from_mode(0o640)).unwrap();
    std::fs::set_permissions(root.join("app/sub"), PermissionsExt::from_mode(0o710)).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("app/out")).unwrap();
    // An absolute link at the mount point resolves inside the root.
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();

    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    populate(&root, "/app", &data).unwrap();
    assert_eq!(std::fs::read_to_string(data.join("sub/f")).unwrap(), "data");
    let meta = |p: &str| std::fs::symlink_metadata(data.join(p)).unwrap();
    assert_eq!(meta("sub/f").mode() & 0o7777, 0o640);
    assert_eq!(meta("sub").mode() & 0o7777, 0o710);
    assert_eq!(
        meta("sub/f").mtime(),
        std::fs::metadata(root.join("app/sub/f")).unwrap().mtime()
    );
    assert!(meta("out").file_type().is_symlink());
    assert_eq!(std::fs::read_link(data.join("out")).unwrap(), outside);

    let data2 = tmp.path().join("data2");
    std::fs::create_dir(&data2).unwrap();
    populate(&root, "/escape", &data2).unwrap();
    assert_eq!(
        std::fs::read_dir(&data2).unwrap().count(),
        0,
        "followed a link out of the root"
    );
    // No directory in the image: nothing to copy.
    populate(&root, "/none", &data2).unwrap();
}
