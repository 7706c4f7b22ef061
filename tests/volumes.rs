//! Volumes, bind mounts, tmpfs mounts and read-only roots through the
//! binary (`-v`, `--mount`, `--tmpfs`, `--read-only`, `vmc volume`), in
//! namespace mode and (one run of all of them) in a microVM through
//! virtio-fs; and the microVM's file server spoken to directly, as a
//! hostile guest would.

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

/// In a microVM the same options work through virtio-fs: a host directory
/// read and written (the write on the host at once), a read-only one
/// refused by the host's file server, a named volume filled from the
/// image, a tmpfs, and a read-only root; one VM run for all of them (guest
/// kernel work is slow under software virtualisation).
#[test]
fn a_microvm_mounts_volumes_through_virtio_fs() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let host = tempfile::tempdir().unwrap();
    let (rw, ro) = (host.path().join("rw"), host.path().join("ro"));
    write(&rw, "in.txt", "from the host\n");
    write(&ro, "keep", "kept\n");
    let (rw_s, ro_s) = (
        format!("{}:/data", rw.display()),
        format!("{}:/ro:ro", ro.display()),
    );
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "-v",
            &rw_s,
            "-v",
            &ro_s,
            "-v",
            "vmetc:/etc",
            "--tmpfs",
            "/t",
            "--read-only",
            "busybox",
            "sh",
            "-c",
            "cat /data/in.txt; echo from the vm > /data/out.txt; cat /ro/keep; \
             echo x > /ro/new || echo ro-refused; head -1 /etc/passwd; \
             echo t > /t/f && echo tmpfs-ok; touch /nope || echo root-ro",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out,
        "from the host\nkept\nro-refused\nroot:x:0:0:root:/root:/bin/sh\ntmpfs-ok\nroot-ro\n",
        "{}",
        stderr(&o)
    );
    assert_eq!(
        fs::read_to_string(rw.join("out.txt")).unwrap(),
        "from the vm\n"
    );
    assert!(!ro.join("new").exists());
    assert!(
        h.join("volumes/vmetc/_data/passwd").exists(),
        "filled from the image"
    );
    assert_eq!(volumes(h), ["vmetc"]);
}

/// The microVM side's file server, spoken to as the VMM's virtio-fs device
/// speaks to it (raw FUSE messages on its socket), as a hostile guest
/// would: `..` from the root stays at the root (the server is pivoted into
/// a root holding only the shares), names with a `/` are refused, a
/// read-only share refuses writes on the host side, and files are made
/// with the requesting uid.
mod fs_server {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;

    const ROOT_ID: u64 = 1;

    struct Session {
        sock: OwnedFd,
        unique: u64,
        child: std::process::Child,
    }

    impl Session {
        fn start(h: &Path, scratch: &Path, shares: &serde_json::Value) -> Session {
            let (ours, theirs) = vmc::runtime::fsserver::socket_pair().unwrap();
            vmc::runtime::jail::use_vmm_binary(Path::new(env!("CARGO_BIN_EXE_vmc")));
            let shares: Vec<vmc::runtime::fsserver::Share> =
                serde_json::from_value(shares.clone()).unwrap();
            let child = vmc::runtime::fsserver::command(&theirs, scratch, &shares)
                .unwrap()
                .env("VMC_HOME", h)
                .spawn()
                .unwrap();
            drop(theirs);
            let mut s = Session {
                sock: ours,
                unique: 0,
                child,
            };
            // FUSE_INIT, 7.31, no flags.
            let mut init = Vec::new();
            for v in [7u32, 31, 0, 0] {
                init.extend_from_slice(&v.to_le_bytes());
            }
            let (err, _) = s.call(26, 0, 0, &init);
            assert_eq!(err, 0, "INIT");
            s
        }

        /// Sends a request; returns the reply's error (negative errno) and body.
        fn call(&mut self, opcode: u32, nodeid: u64, uid: u32, body: &[u8]) -> (i32, Vec<u8>) {
            self.unique += 1;
            let mut r = Vec::new();
            r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
            r.extend_from_slice(&opcode.to_le_bytes());
            r.extend_from_slice(&self.unique.to_le_bytes());
            r.extend_from_slice(&nodeid.to_le_bytes());
            r.extend_from_slice(&uid.to_le_bytes());
            r.extend_from_slice(&uid.to_le_bytes()); // gid
            r.extend_from_slice(&1u32.to_le_bytes()); // pid
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(body);
            // SAFETY: send from a buffer of its length.
            let n = unsafe { libc::send(self.sock.as_raw_fd(), r.as_ptr().cast(), r.len(), 0) };
            assert_eq!(n as usize, r.len());
            let mut buf = vec![0u8; 1 << 21];
            // SAFETY: recv into a buffer of its length.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 16, "a reply");
            buf.truncate(n as usize);
            assert_eq!(
                u64::from_le_bytes(buf[8..16].try_into().unwrap()),
                self.unique
            );
            let err = i32::from_le_bytes(buf[4..8].try_into().unwrap());
            (err, buf[16..].to_vec())
        }

        /// LOOKUP `name` in `parent`: (errno, node id, inode number).
        fn lookup(&mut self, parent: u64, name: &[u8]) -> (i32, u64, u64) {
            let mut b = name.to_vec();
            b.push(0);
            let (err, out) = self.call(1, parent, 0, &b);
            if err != 0 {
                return (err, 0, 0);
            }
            let node = u64::from_le_bytes(out[0..8].try_into().unwrap());
            let ino = u64::from_le_bytes(out[40..48].try_into().unwrap());
            (0, node, ino)
        }

        fn root_ino(&mut self) -> u64 {
            let (err, out) = self.call(3, ROOT_ID, 0, &[0u8; 16]);
            assert_eq!(err, 0, "GETATTR");
            u64::from_le_bytes(out[16..24].try_into().unwrap())
        }

        /// MKDIR `name` in `parent` as `uid`.
        fn mkdir(&mut self, parent: u64, name: &str, uid: u32) -> i32 {
            let mut b = Vec::new();
            b.extend_from_slice(&0o755u32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            self.call(9, parent, uid, &b).0
        }
    }

    #[test]
    fn a_hostile_guest_reaches_only_the_shares_and_read_only_holds() {
        if !is_root() {
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let (rw, ro) = (host.path().join("rw"), host.path().join("ro"));
        fs::create_dir_all(&rw).unwrap();
        fs::create_dir_all(&ro).unwrap();
        write(&ro, "keep", "x");
        let scratch = home.path().join("fs-root");
        let shares = serde_json::json!([
            {"source": rw, "readonly": false},
            {"source": ro, "readonly": true},
        ]);
        let mut s = Session::start(home.path(), &scratch, &shares);
        // Confined: six capabilities, no_new_privs, a seccomp filter.
        let status = fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
        for want in ["CapBnd:\t00000000000000db", "NoNewPrivs:\t1", "Seccomp:\t2"] {
            assert!(status.contains(want), "{want}: {status}");
        }
        let root = s.root_ino();
        // `..` of the root, and of a share, is the server's root.
        let (err, _, ino) = s.lookup(ROOT_ID, b"..");
        assert_eq!((err, ino), (0, root), "`..` of the root left it");
        let (err, share0, _) = s.lookup(ROOT_ID, b"0");
        assert_eq!(err, 0);
        let (_, up, ino) = s.lookup(share0, b"..");
        assert_eq!(ino, root);
        let (_, _, ino) = s.lookup(up, b"..");
        assert_eq!(ino, root);
        // Names with a slash are refused; the host's files are not there.
        assert_eq!(s.lookup(ROOT_ID, b"../../etc").0, -libc::EINVAL);
        assert_eq!(s.lookup(ROOT_ID, b"etc").0, -libc::ENOENT);
        assert_eq!(s.lookup(ROOT_ID, b"proc").0, -libc::ENOENT);
        // Made with the guest's uid, on the host at once; the host's
        // permissions hold for it (rw is root's 0700 directory until
        // opened up).
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&rw, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(s.mkdir(share0, "denied", 4321), -libc::EACCES);
        fs::set_permissions(&rw, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(s.mkdir(share0, "made", 4321), 0);
        assert_eq!(fs::metadata(rw.join("made")).unwrap().uid(), 4321);
        // The read-only share refuses on the host side.
        let (_, share1, _) = s.lookup(ROOT_ID, b"1");
        assert_eq!(s.mkdir(share1, "nope", 0), -libc::EROFS);
        assert!(!ro.join("nope").exists());
        assert!(ro.join("keep").exists());
    }
}
