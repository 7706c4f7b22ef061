//! `vmc cp` through the binary: both directions, directories, `-` tar
//! streams, running and stopped namespace containers, a running and a
//! stopped microVM,
//! and a container whose symlinks point at host paths (they resolve inside
//! its root, or are copied as links: never followed onto the host).

mod common;

use std::fs;
use std::path::Path;

use common::{is_root, kvm_available, ok, store_with_busybox, vmc, write};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn cp(h: &Path, src: &str, dst: &str) -> std::process::Output {
    vmc(h, &["cp", src, dst])
}

/// A running namespace container: files and directories both ways, Docker's
/// naming rules, `-` on both sides, and owners (the caller's out, root's in).
#[test]
fn cp_to_and_from_a_running_namespace_container() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", "ns", "--name", "box", "busybox", "sleep", "1000",
        ],
    ));
    let host = tempfile::tempdir().unwrap();
    let hp = host.path();
    write(hp, "in/a.txt", "alpha\n");
    write(hp, "in/sub/b.txt", "beta\n");
    std::os::unix::fs::symlink("a.txt", hp.join("in/link")).unwrap();

    // A directory into an existing directory: under its own name.
    ok(&cp(h, &hp.join("in").display().to_string(), "box:/tmp"));
    // Into a path that does not exist: under that name.
    ok(&cp(
        h,
        &hp.join("in").display().to_string(),
        "box:/tmp/renamed",
    ));
    ok(&cp(
        h,
        &hp.join("in/a.txt").display().to_string(),
        "box:/etc/a-copy",
    ));
    let listing = ok(&vmc(
        h,
        &[
            "exec", "box", "sh", "-c",
            "cat /tmp/in/sub/b.txt /tmp/renamed/a.txt /etc/a-copy; readlink /tmp/in/link; stat -c %u /tmp/in/a.txt",
        ],
    ));
    assert_eq!(listing, "beta\nalpha\nalpha\na.txt\n0\n");

    // Out: a file into a directory, a directory under a new name.
    let out = hp.join("out");
    fs::create_dir(&out).unwrap();
    ok(&cp(h, "box:/etc/passwd", &out.display().to_string()));
    assert!(fs::read_to_string(out.join("passwd"))
        .unwrap()
        .starts_with("root:"));
    ok(&cp(
        h,
        "box:/tmp/in",
        &out.join("copy").display().to_string(),
    ));
    assert_eq!(
        fs::read_to_string(out.join("copy/sub/b.txt")).unwrap(),
        "beta\n"
    );
    assert!(fs::symlink_metadata(out.join("copy/link"))
        .unwrap()
        .file_type()
        .is_symlink());

    // `-`: a tar on stdout, and a tar from stdin into a directory.
    let o = cp(h, "box:/tmp/in/a.txt", "-");
    let mut ar = tar::Archive::new(&o.stdout[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["a.txt"]);
    let mut b = tar::Builder::new(Vec::new());
    let mut hd = tar::Header::new_gnu();
    hd.set_size(3);
    hd.set_mode(0o644);
    b.append_data(&mut hd, "from-stdin", &b"tar"[..]).unwrap();
    let data = b.into_inner().unwrap();
    let mut child = common::vmc_command(h)
        .args(["cp", "-", "box:/tmp"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&data).unwrap();
    ok(&child.wait_with_output().unwrap());
    assert_eq!(
        ok(&vmc(h, &["exec", "box", "cat", "/tmp/from-stdin"])),
        "tar"
    );

    // Errors are named: a missing source, a missing destination parent.
    let o = cp(h, "box:/no/such", &out.display().to_string());
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("/no/such"), "{}", stderr(&o));
    let o = cp(
        h,
        &hp.join("in/a.txt").display().to_string(),
        "box:/no/dir/x",
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("/no/dir/"), "{}", stderr(&o));
    ok(&vmc(h, &["rm", "-f", "box"]));
}

/// A stopped container's root (its image and its writes) is copied from
/// and into as it is on disk.
#[test]
fn cp_to_and_from_a_stopped_namespace_container() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    ok(&vmc(
        h,
        &[
            "run",
            "--mode",
            "ns",
            "--name",
            "done",
            "busybox",
            "sh",
            "-c",
            "echo made > /made",
        ],
    ));
    let host = tempfile::tempdir().unwrap();
    let hp = host.path();
    ok(&cp(h, "done:/made", &hp.display().to_string()));
    assert_eq!(fs::read_to_string(hp.join("made")).unwrap(), "made\n");
    write(hp, "later.txt", "later\n");
    ok(&cp(
        h,
        &hp.join("later.txt").display().to_string(),
        "done:/",
    ));
    ok(&cp(
        h,
        "done:/later.txt",
        &hp.join("back.txt").display().to_string(),
    ));
    assert_eq!(fs::read_to_string(hp.join("back.txt")).unwrap(), "later\n");
    assert!(
        !h.join("containers").read_dir().unwrap().any(|e| e
            .unwrap()
            .path()
            .join("cp-root")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())),
        "the copy's mount is gone with it"
    );
}

/// A container whose paths are symlinks to host paths: copying through
/// them resolves inside the container's root (or copies the link), so the
/// host's files are neither read nor written.
#[test]
fn cp_never_follows_a_containers_symlink_onto_the_host() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let host = tempfile::tempdir().unwrap();
    let hp = host.path();
    let secret = hp.join("secret");
    write(&secret, "key", "host secret\n");
    let target = hp.join("target");
    fs::create_dir(&target).unwrap();
    let script = format!(
        "ln -s {} /secret && ln -s {} /target && mkdir /d && ln -s / /d/root && sleep 1000",
        secret.display(),
        target.display()
    );
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", "ns", "--name", "evil", "busybox", "sh", "-c", &script,
        ],
    ));
    common::eventually("the links", || {
        vmc(h, &["exec", "evil", "test", "-L", "/d/root"])
            .status
            .success()
            .then_some(())
    });
    let out = hp.join("out");
    fs::create_dir(&out).unwrap();
    // Following the link resolves inside the container: no such path there.
    let o = vmc(
        h,
        &["cp", "-L", "evil:/secret/key", &out.display().to_string()],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(!out.join("key").exists());
    let o = cp(h, "evil:/secret/key", &out.display().to_string());
    assert_ne!(o.status.code(), Some(0));
    assert!(!out.join("key").exists());
    // A directory holding a link to / is copied with the link as a link.
    ok(&cp(h, "evil:/d", &out.display().to_string()));
    assert_eq!(fs::read_link(out.join("d/root")).unwrap(), Path::new("/"));
    // Into the container through its link: inside its root, not the host's.
    write(hp, "payload", "x\n");
    let _ = cp(
        h,
        &hp.join("payload").display().to_string(),
        "evil:/target/",
    );
    assert_eq!(
        fs::read_dir(&target).unwrap().count(),
        0,
        "written on the host"
    );
    ok(&vmc(h, &["rm", "-f", "evil"]));
}

/// A running microVM: a file in and out through its agent.
#[test]
fn cp_to_and_from_a_running_microvm() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    ok(&vmc(
        h,
        &["run", "-d", "--name", "vm", "busybox", "sleep", "1000"],
    ));
    let host = tempfile::tempdir().unwrap();
    let hp = host.path();
    write(hp, "dir/f.txt", "into the vm\n");
    ok(&cp(h, &hp.join("dir").display().to_string(), "vm:/tmp/"));
    ok(&cp(
        h,
        "vm:/tmp/dir",
        &hp.join("back").display().to_string(),
    ));
    assert_eq!(
        fs::read_to_string(hp.join("back/f.txt")).unwrap(),
        "into the vm\n"
    );
    ok(&cp(h, "vm:/etc/passwd", &hp.display().to_string()));
    assert!(fs::read_to_string(hp.join("passwd"))
        .unwrap()
        .starts_with("root:"));
    // Stopped: a VM is started on its disks for the copy; what it wrote
    // comes out, what is copied in is there at its next start.
    ok(&vmc(h, &["stop", "-t", "1", "vm"]));
    ok(&cp(
        h,
        "vm:/tmp/dir/f.txt",
        &hp.join("stopped.txt").display().to_string(),
    ));
    assert_eq!(
        fs::read_to_string(hp.join("stopped.txt")).unwrap(),
        "into the vm\n"
    );
    write(hp, "late.txt", "copied while stopped\n");
    ok(&cp(
        h,
        &hp.join("late.txt").display().to_string(),
        "vm:/tmp/",
    ));
    assert_eq!(
        ok(&vmc(h, &["inspect", "-f", "{{.State.Status}}", "vm"])).trim(),
        "exited"
    );
    ok(&vmc(h, &["start", "vm"]));
    assert_eq!(
        ok(&vmc(
            h,
            &["exec", "vm", "cat", "/tmp/late.txt", "/tmp/dir/f.txt"]
        )),
        "copied while stopped\ninto the vm\n"
    );
    ok(&vmc(h, &["rm", "-f", "vm"]));
    let o = vmc(h, &["cp", "vm:/etc/passwd", "-"]);
    assert_ne!(o.status.code(), Some(0));
}
