//! Volumes, bind mounts, tmpfs mounts and read-only roots through the
//! binary (`-v`, `--mount`, `--tmpfs`, `--read-only`, `vmc volume`),
//! in namespace mode; a microVM refuses them by name until it has a shared
//! filesystem.

mod common;

use std::fs;
use std::path::Path;

use common::{is_root, kvm_available, ok, store_with_busybox, vmc, write};

fn run(h: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["run", "--rm", "--mode", "ns"];
    all.extend_from_slice(args);
    vmc(h, &all)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn volumes(h: &Path) -> Vec<String> {
    ok(&vmc(h, &["volume", "ls", "-q"]))
        .lines()
        .map(String::from)
        .collect()
}

/// A host directory bound read-write: the container's writes are on the
/// host at once and outlive the container. Bound read-only: writes fail,
/// and the container cannot remount it writable. A file can be bound too.
#[test]
fn bind_mounts_share_host_files_and_read_only_holds() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let host = tempfile::tempdir().unwrap();
    write(host.path(), "in.txt", "from the host\n");
    let spec = format!("{}:/data", host.path().display());
    let out = ok(&run(
        h,
        &[
            "-v",
            &spec,
            "busybox",
            "sh",
            "-c",
            "cat /data/in.txt; echo from the container > /data/out.txt",
        ],
    ));
    assert_eq!(out, "from the host\n");
    assert_eq!(
        fs::read_to_string(host.path().join("out.txt")).unwrap(),
        "from the container\n"
    );

    let ro = format!("{}:/data:ro", host.path().display());
    let o = run(
        h,
        &[
            "-v",
            &ro,
            "busybox",
            "sh",
            "-c",
            "echo x > /data/new; mount -o remount,rw /data; echo y > /data/new2",
        ],
    );
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!host.path().join("new").exists() && !host.path().join("new2").exists());

    let file = format!(
        "type=bind,source={},target=/etc/motd,readonly",
        host.path().join("in.txt").display()
    );
    assert_eq!(
        ok(&run(h, &["--mount", &file, "busybox", "cat", "/etc/motd"])),
        "from the host\n"
    );
    // --mount does not make a missing source (Docker's rule); -v does.
    let missing = host.path().join("no/such");
    let o = run(
        h,
        &[
            "--mount",
            &format!("type=bind,src={},dst=/x", missing.display()),
            "busybox",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("bind source path does not exist"),
        "{}",
        stderr(&o)
    );
    ok(&run(
        h,
        &[
            "-v",
            &format!("{}:/x", missing.display()),
            "busybox",
            "true",
        ],
    ));
    assert!(missing.is_dir());
    // A directory onto a file of the image is named, not a bare errno.
    let onto_file = format!("{}:/etc/passwd", host.path().display());
    let o = run(h, &["-v", &onto_file, "busybox", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains(&format!(
            "mounting {} at /etc/passwd",
            host.path().display()
        )),
        "{}",
        stderr(&o)
    );
}

/// A named volume is made at first use, filled from the image's content at
/// its mount point, kept across containers, listed and inspected, and
/// removed only once no container has it.
#[test]
fn named_volumes_are_filled_from_the_image_and_outlive_containers() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let out = ok(&run(
        h,
        &[
            "-v",
            "conf:/etc",
            "busybox",
            "sh",
            "-c",
            "cat /etc/passwd | head -1; echo kept > /etc/mine",
        ],
    ));
    assert!(out.starts_with("root:"), "{out}");
    assert_eq!(volumes(h), ["conf"]);
    let data = h.join("volumes/conf/_data");
    assert_eq!(fs::read_to_string(data.join("mine")).unwrap(), "kept\n");
    // The second container sees the first one's write, not a fresh copy.
    assert_eq!(
        ok(&run(h, &["-v", "conf:/v", "busybox", "cat", "/v/mine"])),
        "kept\n"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&vmc(h, &["volume", "inspect", "conf"]))).unwrap();
    assert_eq!(inspect[0]["Name"], "conf");
    assert_eq!(inspect[0]["Mountpoint"], data.display().to_string());

    // In use by a (stopped) container: refused, then removed with it gone.
    ok(&vmc(
        h,
        &[
            "run", "--mode", "ns", "--name", "user", "-v", "conf:/v", "busybox", "true",
        ],
    ));
    let o = vmc(h, &["volume", "rm", "conf"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("volume conf is in use by container"),
        "{}",
        stderr(&o)
    );
    let c: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "user"]))).unwrap();
    assert_eq!(c[0]["Mounts"][0]["Type"], "volume");
    assert_eq!(c[0]["Mounts"][0]["Name"], "conf");
    assert_eq!(c[0]["Mounts"][0]["Destination"], "/v");
    ok(&vmc(h, &["rm", "user"]));
    assert_eq!(ok(&vmc(h, &["volume", "rm", "conf"])), "conf\n");
    assert!(volumes(h).is_empty());
    assert!(!data.exists());

    // `volume create` names one, and an existing one is kept as it is.
    assert_eq!(ok(&vmc(h, &["volume", "create", "made"])), "made\n");
    write(&h.join("volumes/made/_data"), "f", "x");
    assert_eq!(ok(&vmc(h, &["volume", "create", "made"])), "made\n");
    assert!(h.join("volumes/made/_data/f").exists());
    let o = vmc(h, &["volume", "create", "../up"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("is not a valid volume name"),
        "{}",
        stderr(&o)
    );
}

/// Anonymous volumes (`-v /dir`, an image's VOLUME) go with `rm -v` and
/// with a `--rm` container; the image's content is copied in first.
#[test]
fn anonymous_volumes_and_image_volumes_go_with_their_container() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN mkdir -p /srv/db && echo seeded > /srv/db/init\nVOLUME /srv/db\n",
    );
    ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "-t",
            "withvol",
            ctx.path().to_str().unwrap(),
        ],
    ));
    ok(&vmc(
        h,
        &[
            "run",
            "--mode",
            "ns",
            "--name",
            "db",
            "-v",
            "/scratch",
            "withvol",
            "sh",
            "-c",
            "cat /srv/db/init; echo more >> /srv/db/init; touch /scratch/x",
        ],
    ));
    let c: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "db"]))).unwrap();
    let mounts = c[0]["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    let db = mounts
        .iter()
        .find(|m| m["Destination"] == "/srv/db")
        .expect("the image's VOLUME is a mount");
    let source = Path::new(db["Source"].as_str().unwrap());
    assert_eq!(
        fs::read_to_string(source.join("init")).unwrap(),
        "seeded\nmore\n"
    );
    assert_eq!(volumes(h).len(), 2);
    // Plain rm keeps them (Docker's rule); rm -v removes them.
    ok(&vmc(h, &["rm", "db"]));
    assert_eq!(volumes(h).len(), 2);
    ok(&vmc(h, &["volume", "prune", "-f"]));
    assert!(volumes(h).is_empty());

    ok(&vmc(
        h,
        &["run", "--mode", "ns", "--name", "db2", "withvol", "true"],
    ));
    assert_eq!(volumes(h).len(), 1);
    ok(&vmc(h, &["rm", "-v", "db2"]));
    assert!(volumes(h).is_empty());

    // A --rm container's anonymous volumes go with it; named ones stay.
    ok(&run(h, &["-v", "keep:/k", "withvol", "true"]));
    assert_eq!(volumes(h), ["keep"]);
}

/// --tmpfs (Docker's noexec, nosuid, nodev; size and mode given),
/// --mount type=tmpfs, and --read-only with a writable tmpfs.
#[test]
fn tmpfs_mounts_and_read_only_roots() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let out = ok(&run(
        h,
        &[
            "--tmpfs",
            "/run/t:size=1m,mode=1777",
            "--mount",
            "type=tmpfs,target=/cache,tmpfs-size=2m",
            "busybox",
            "sh",
            "-c",
            "grep ' /run/t ' /proc/mounts; grep ' /cache ' /proc/mounts; stat -c %a /run/t; \
             printf '#!/bin/sh\\necho ran\\n' > /run/t/s; chmod +x /run/t/s; /run/t/s || echo refused",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("tmpfs /run/t tmpfs rw,nosuid,nodev,noexec"),
        "{out}"
    );
    assert!(lines[0].contains("size=1024k"), "{out}");
    assert!(
        lines[1].starts_with("tmpfs /cache tmpfs rw,nosuid,nodev,noexec"),
        "{out}"
    );
    assert!(lines[1].contains("size=2048k"), "{out}");
    assert_eq!(
        lines[2..],
        ["1777", "refused"],
        "a script ran from a noexec tmpfs"
    );

    let o = run(
        h,
        &[
            "--read-only",
            "--tmpfs",
            "/tmp",
            "busybox",
            "sh",
            "-c",
            "touch /tmp/ok && echo tmp-ok; touch /etc/nope",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "tmp-ok\n");
    assert!(
        stderr(&o).contains("/etc/nope: Read-only file system"),
        "{}",
        stderr(&o)
    );
    assert_ne!(o.status.code(), Some(0));

    for (args, says) in [
        (vec!["--tmpfs", "/t:size=lots"], "--tmpfs '/t:size=lots'"),
        (vec!["-v", "/a:/b:shared"], "propagation is not supported"),
        (vec!["-v", "rel/dir:/b"], "is not a valid volume name"),
        (vec!["--mount", "type=nfs,dst=/x"], "type 'nfs'"),
        (
            vec!["-v", "/a:/x", "--tmpfs", "/x"],
            "duplicate mount point: /x",
        ),
    ] {
        let mut all = args.clone();
        all.extend(["busybox", "true"]);
        let o = run(h, &all);
        assert_eq!(o.status.code(), Some(125), "{args:?}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// A microVM has no shared filesystem yet: the options are refused by
/// name, never dropped.
#[test]
fn a_microvm_refuses_volumes_by_name() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let o = vmc(
        home.path(),
        &["run", "--rm", "-v", "/tmp:/data", "busybox", "true"],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("need namespace mode for now (--mode ns)"),
        "{}",
        stderr(&o)
    );
}
