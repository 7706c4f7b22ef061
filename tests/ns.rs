//! Namespace mode (`vmc run --mode ns`): the same image as a plain Linux
//! container on the host, with Docker's confinement.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{is_root, ok, store_with_busybox, vmc};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_namespace_container_is_confined_like_dockers() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let script = "echo pid=$$; hostname; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
                  ls /dev | tr '\\n' ' '; echo; cat /proc/net/dev | grep -c ':'; \
                  echo x > /proc/sys/kernel/domainname 2>/dev/null || echo proc-sys-ro; \
                  touch /sys/x 2>/dev/null || echo sys-ro; echo data > /written; exit 3";
    let o = vmc(
        h,
        &[
            "run",
            "--mode",
            "ns",
            "--network",
            "none",
            "--hostname",
            "box",
            "busybox",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "pid=1",
        "the workload is PID 1 of its own pid namespace"
    );
    assert_eq!(lines[1], "box");
    // Docker's default capability set, nothing more, in the bounding,
    // effective, permitted and inheritable sets, and no_new_privs.
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    // Empty, as Docker's since 20.10.14 (CVE-2022-24769).
    assert!(out.contains("CapInh:\t0000000000000000"), "{out}");
    assert!(out.contains("CapPrm:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
    assert!(
        out.contains(
            "fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero "
        ),
        "a minimal /dev: {out}"
    );
    assert!(
        out.contains("\n1\n"),
        "a network namespace with loopback only: {out}"
    );
    assert!(out.contains("proc-sys-ro\nsys-ro\n"), "{out}");
    // An attached run without --rm stays listed by `ps -a`.
    let ps = ok(&vmc(h, &["ps", "-a"]));
    assert!(ps.contains("Exited (3)"), "{ps}");
    // The image's layers were unpacked into the cache, once: the next run
    // uses the same files (same inode), not a fresh copy.
    let busybox_ino = || -> u64 {
        use std::os::unix::fs::MetadataExt;
        let layers = h.join("cache/layers");
        let found: Vec<u64> = std::fs::read_dir(&layers)
            .unwrap()
            .map(|e| e.unwrap().path().join("bin/busybox"))
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        assert_eq!(found.len(), 1, "bin/busybox in {layers:?}: {found:?}");
        found[0]
    };
    let ino = busybox_ino();

    // The image is untouched; the container's writes stayed in its upper dir.
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "busybox",
            "sh",
            "-c",
            "cat /written 2>&1; true",
        ],
    );
    assert!(stdout(&o).contains("No such file"), "{}", stdout(&o));
    assert_eq!(busybox_ino(), ino, "the layer was unpacked again");
    // Nothing stays mounted on the host.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(h.to_str().unwrap()), "{mounts}");
}

#[test]
fn users_workdirs_stdin_and_start_failures_behave_as_in_vm_mode() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "-u",
            "1000:1000",
            "-w",
            "/tmp/new",
            "-e",
            "A=b",
            "busybox",
            "sh",
            "-c",
            "id -u; id -g; pwd; echo $A",
        ],
    );
    assert_eq!(
        stdout(&o),
        "1000\n1000\n/tmp/new\nb\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .args(["run", "--rm", "--mode", "ns", "busybox", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"piped through\n").unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "piped through\n");

    let o = vmc(
        h,
        &["run", "--rm", "--mode", "ns", "busybox", "nosuchcommand"],
    );
    assert_eq!(o.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("executable file not found in $PATH"));
    // A file that exists but cannot be executed: 126, as in Docker.
    let o = vmc(
        h,
        &["run", "--rm", "--mode", "ns", "busybox", "/etc/passwd"],
    );
    assert_eq!(o.status.code(), Some(126), "{o:?}");
    // Signals sent to vmc reach the workload (PID 1 of the container): each
    // of the six the README names, trapped, printed and exited with its own code.
    for (i, (name, sig)) in [
        ("TERM", libc::SIGTERM),
        ("INT", libc::SIGINT),
        ("HUP", libc::SIGHUP),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
    ]
    .into_iter()
    .enumerate()
    {
        let code = 7 + i as i32;
        let script = format!(
            "trap 'echo got {name}; exit {code}' {name}; echo ready; while true; do sleep 0.1; done"
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
            .env("VMC_HOME", h)
            .args([
                "run", "--rm", "--mode", "ns", "busybox", "sh", "-c", &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line, "ready\n", "{name}");
        // SAFETY: kill on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert_eq!(rest, format!("got {name}\n"), "{name}");
        assert_eq!(status.code(), Some(code), "{name}");
    }
    // --rm leaves no state behind.
    assert_eq!(std::fs::read_dir(h.join("containers")).unwrap().count(), 0);
}

#[test]
fn builds_run_their_steps_in_namespaces_with_mode_ns() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("in.txt"), "copied\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY in.txt /app/\nRUN echo \"pid $$\"; cat /app/in.txt; echo made > /app/made; rm /etc/group\n\
         RUN test ! -e /etc/group && echo group-gone\nCMD [\"cat\", \"/app/made\"]\n",
    )
    .unwrap();
    let c = ctx.path().to_str().unwrap();
    let o = vmc(h, &["build", "--mode", "ns", "-t", "nsbuilt", c]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("pid 1\ncopied\n"), "{out}");
    assert!(out.contains("group-gone"), "{out}");
    let o = vmc(h, &["run", "--rm", "--mode", "ns", "nsbuilt"]);
    assert_eq!(stdout(&o), "made\n");
    let o = vmc(h, &["run", "--rm", "--mode", "ns", "nsbuilt", "ls", "/etc"]);
    // The deletion is in the image; the container has Docker's own
    // hostname, hosts and resolv.conf on top.
    assert_eq!(stdout(&o), "hostname\nhosts\npasswd\nresolv.conf\n");

    std::fs::write(ctx.path().join("Dockerfile"), "FROM busybox\nRUN exit 4\n").unwrap();
    let o = vmc(h, &["build", "--mode", "ns", "-t", "broken", c]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Dockerfile:2: RUN exit 4"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(h.to_str().unwrap()), "{mounts}");
    assert_eq!(
        std::fs::read_dir(h.join("cache/build-tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn cgroup_limits_and_env_files_apply() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    // --pids-limit: forks beyond it fail; without it they do not.
    let forks = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 1 & done; wait; echo all-started";
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--pids-limit",
            "8",
            "busybox",
            "sh",
            "-c",
            forks,
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("can't fork"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vmc(
        h,
        &["run", "--rm", "--mode", "ns", "busybox", "sh", "-c", forks],
    );
    assert_eq!(stdout(&o), "all-started\n");
    // --memory, --cpus, --pids-limit: the container's process sits in cgroups
    // with those limits while it runs, and they are gone after.
    let id = vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--memory",
            "32M",
            "--cpus",
            "1",
            "--pids-limit",
            "8",
            "busybox",
            "sleep",
            "100",
        ],
    );
    let id = stdout(&id).trim().to_string();
    // The limits are in the container's cgroup files while it runs, it is
    // in the cgroups, and they are removed with it: on cgroup v2 one
    // directory below ours; on v1 one per controller's hierarchy.
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let own = |ctrl: &str| -> PathBuf {
        let path = cgroups
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.splitn(3, ':').collect();
                let here = if v2 {
                    f[1].is_empty()
                } else {
                    f[1].split(',').any(|c| c == ctrl)
                };
                here.then(|| f[2].to_string())
            })
            .unwrap();
        let root = if v2 {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            Path::new("/sys/fs/cgroup").join(ctrl)
        };
        root.join(path.trim_start_matches('/'))
    };
    let name = format!("vmc-{}", &id[..12]);
    let read = |ctrl: &str, file: &str| -> String {
        let p = own(ctrl).join(&name).join(file);
        common::eventually(&format!("{}", p.display()), || {
            std::fs::read_to_string(&p)
                .ok()
                .map(|v| v.trim().to_string())
        })
    };
    if v2 {
        assert_eq!(read("memory", "memory.max"), (32u64 << 20).to_string());
        assert_eq!(read("cpu", "cpu.max"), "100000 100000");
    } else {
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "100000");
    }
    assert_eq!(read("pids", "pids.max"), "8");
    // The container's process joins before it execs `sleep`.
    for ctrl in ["memory", "cpu", "pids"] {
        common::eventually(&format!("the container in the {ctrl} cgroup"), || {
            let procs = read(ctrl, "cgroup.procs");
            procs
                .lines()
                .any(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c == "sleep\n")
                })
                .then_some(())
        });
    }
    let o = vmc(h, &["rm", "-f", &id]);
    assert!(o.status.success());
    for ctrl in ["memory", "cpu", "pids"] {
        assert!(
            !own(ctrl).join(&name).exists(),
            "rm -f removed the {ctrl} cgroup before returning"
        );
    }
    // --env-file, overridden by -e.
    let f = h.join("env");
    std::fs::write(&f, "# comment\nA=from-file\nB=2\n\n").unwrap();
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--env-file",
            f.to_str().unwrap(),
            "-e",
            "B=3",
            "busybox",
            "sh",
            "-c",
            "echo $A $B",
        ],
    );
    assert_eq!(stdout(&o), "from-file 3\n");
    std::fs::write(&f, "NOT VALID=x\n").unwrap();
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--env-file",
            f.to_str().unwrap(),
            "busybox",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains(":1: 'NOT VALID=x' is not KEY=VALUE"));
}

/// Namespace mode without root: vmc run by `nobody` (uid 65534) with its
/// own store puts the container in a user namespace where it is root, runs,
/// detaches, execs and cleans up; limits are a clear error (no cgroup to
/// use). The test itself runs as root to become nobody.
#[test]
fn namespace_mode_without_root_uses_a_user_namespace() {
    if !is_root() {
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // nobody cannot reach root's build directory: its own copy of vmc and
    // of the busybox root as a tarball.
    let bin = d.join("vmc");
    std::fs::copy(env!("CARGO_BIN_EXE_vmc"), &bin).unwrap();
    let tar = common::busybox_tar(&d.join("busybox.tar"));
    // A read-only directory with a file in it (as Fedora's 0555 /usr/bin):
    // without root, its mode can only be applied once its entries are in.
    let ro = d.join("extra/ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("inside"), "in\n").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // And a setuid file: its set-id bits are dropped when unpacked rootless.
    let suid = d.join("extra/suid");
    std::fs::write(&suid, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let st = Command::new("tar")
        .arg("-rf")
        .arg(&tar)
        .arg("-C")
        .arg(d.join("extra"))
        .arg("ro")
        .arg("suid")
        .status()
        .unwrap();
    assert!(st.success());
    let ctx = d.join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN rm /etc/group && echo yes > /etc/made\n",
    )
    .unwrap();
    let st = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(d)
        .status()
        .unwrap();
    assert!(st.success());
    // vmc as the unprivileged user `nobody`, with a store of its own.
    let nobody_cmd = |args: &[&str]| -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(&bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", d)
        .env("VMC_HOME", d.join("store"))
        .stdin(Stdio::null());
        cmd
    };
    let as_nobody = |args: &[&str]| -> Output { nobody_cmd(args).output().unwrap() };
    ok(&as_nobody(&["import", tar.to_str().unwrap(), "busybox"]));
    let out = ok(&as_nobody(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "stat -c %a /ro; cat /ro/inside; stat -c %a /suid",
    ]));
    assert_eq!(out, "555\nin\n755\n");
    // No device nodes at all in a user namespace (issue 16, 1).
    let out = ok(&as_nobody(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "mknod /tmp/k c 1 3 2>/dev/null && echo made || echo refused",
    ]));
    assert_eq!(out, "refused\n", "a device node made rootless");
    // A build whose RUN steps run in the user namespace too, a deletion
    // included (a whiteout in the step's layer).
    let out = ok(&as_nobody(&[
        "build",
        "--mode",
        "ns",
        "--network",
        "none",
        "-q",
        "-t",
        "rootless",
        d.join("ctx").to_str().unwrap(),
    ]));
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let out = ok(&as_nobody(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "--network",
        "none",
        "rootless",
        "sh",
        "-c",
        "cat /etc/made; test -e /etc/group || echo no-group",
    ]));
    assert_eq!(out, "yes\nno-group\n", "{out}");
    let out = ok(&as_nobody(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "--network",
        "none",
        "--hostname",
        "nobodys",
        "busybox",
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map; hostname; echo data >/written && cat /written; \
         stat -c %U /etc; echo $$",
    ]));
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        [
            "0",
            &format!("0 {NOBODY} 1"),
            "nobodys",
            "data",
            "root",
            "1"
        ],
        "{out}"
    );

    // Detached with a published port, exec'd into (joining its user
    // namespace first), removed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let publish = format!("127.0.0.1:{port}:8080");
    ok(&as_nobody(&[
        "run", "-d", "--mode", "ns", "--name", "r", "-p", &publish, "busybox", "httpd", "-f", "-p",
        "8080", "-h", "/etc",
    ]));
    let out = ok(&as_nobody(&[
        "exec",
        "r",
        "sh",
        "-c",
        "id -u; cat /proc/1/cmdline",
    ]));
    assert_eq!(out, "0\nhttpd\0-f\0-p\08080\0-h\0/etc\0", "{out:?}");
    let mut page = String::new();
    common::eventually("the rootless httpd to answer on its published port", || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        use std::io::{Read, Write};
        s.write_all(b"GET /group HTTP/1.0\r\n\r\n").ok()?;
        page.clear();
        s.read_to_string(&mut page).ok()?;
        page.contains("200 OK").then_some(())
    });
    assert!(page.contains("root:x:0:"), "{page}");
    assert!(ok(&as_nobody(&["ps", "-q"])).trim().len() == 12);
    ok(&as_nobody(&["rm", "-f", "r"]));
    assert_eq!(ok(&as_nobody(&["ps", "-aq"])), "");

    // The network: pasta in the container's namespace needs /dev/net/tun,
    // which Debian's udev makes read-write for everyone (this project's
    // machines have it 0600): with a 0666 node, an interface with the
    // host's address; with a 0600 one, a clear error naming the fix. (Each
    // node is bound over /dev/net/tun for that run only.)
    use std::os::unix::fs::PermissionsExt;
    let passt_as_nobody = |mode: u32| -> Output {
        let dev = tempfile::tempdir().unwrap();
        let mut cmd = nobody_cmd(&[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--network",
            "passt",
            "busybox",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "scope",
            "global",
        ]);
        common::device_over(&mut cmd, dev.path(), c"/dev/net/tun", (10, 200), mode);
        cmd.output().unwrap()
    };
    let o = passt_as_nobody(0o666);
    let host = vmc::runtime::net::host_ipv4().unwrap();
    assert!(
        stdout(&o).contains(&format!(" {}/{} ", host.address, host.prefix)),
        "rootless --network passt with a usable /dev/net/tun: {o:?}"
    );
    let o = passt_as_nobody(0o600);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/dev/net/tun") && err.contains("chmod"),
        "rootless --network passt without /dev/net/tun access: {err}"
    );

    // Limits need a cgroup: a clear error, nothing started.
    for (flag, value) in [("--memory", "64m"), ("--cpus", "1"), ("--pids-limit", "64")] {
        let o = as_nobody(&[
            "run", "--rm", "--mode", "ns", flag, value, "busybox", "true",
        ]);
        assert_eq!(o.status.code(), Some(125), "{flag}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{flag} in namespace mode need root")),
            "{err}"
        );
    }

    // A kernel that refuses the user namespace (here: inside a chroot,
    // where unshare(CLONE_NEWUSER) gets EPERM): `run -d` fails at once with
    // the reason, and the container is recorded as exited.
    let jail = d.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(r#"mount --make-rprivate / && mount --rbind / "$1" && shift && exec chroot "$@""#)
        .arg("sh")
        .arg(&jail)
        .arg(&jail)
        .args([
            "setpriv",
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "env",
            "-i",
        ])
        .arg(format!("VMC_HOME={}", d.join("store").display()))
        .arg(&bin)
        .args([
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--name",
            "jailed",
        ])
        .args(["busybox", "sleep", "600"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("user namespaces"), "{err}");
    let ps = ok(&as_nobody(&["ps", "-a"]));
    assert!(ps.contains("Exited (125)") && ps.contains("jailed"), "{ps}");
    ok(&as_nobody(&["rm", "jailed"]));
}

/// Without passt (neither vmc's own build nor one on PATH): `--network
/// passt` is a one-line error naming the package, and the default falls
/// back to loopback only, as Docker without its bridge.
#[test]
fn a_missing_passt_is_named_and_the_default_is_no_network() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let empty = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> Output {
        common::vmc_command(h)
            .env("VMC_ASSETS", empty.path())
            .env("PATH", empty.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "--network",
        "passt",
        "busybox",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("passt is not installed (apt-get install passt)"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let o = run(&[
        "run",
        "--rm",
        "--mode",
        "ns",
        "busybox",
        "sh",
        "-c",
        "ip -o link | wc -l",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).trim(), "1", "loopback only: {o:?}");
}

/// `vmc stop` sends the image's STOPSIGNAL, and SIGKILL once `-t` runs out
/// for a workload that ignores it; `exec -w -u` set the directory and user.
#[test]
fn stop_uses_the_stopsignal_then_sigkill_and_exec_takes_w_and_u() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nSTOPSIGNAL SIGUSR1\n\
         CMD [\"sh\", \"-c\", \"trap 'echo got-usr1; exit 3' USR1; echo up; while :; do sleep 0.1; done\"]\n",
    )
    .unwrap();
    ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "--network",
            "none",
            "-q",
            "-t",
            "usr1",
            ctx.path().to_str().unwrap(),
        ],
    ));
    let up = |name: &str| {
        common::eventually(&format!("{name} to log 'up'"), || {
            ok(&vmc(h, &["logs", name])).contains("up").then_some(())
        })
    };
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--name",
            "a",
            "-e",
            "N=v",
            "--hostname",
            "hn",
            "usr1",
        ],
    ));
    up("a");
    // exec gets the container's environment and joins its uts and net
    // namespaces.
    let out = ok(&vmc(
        h,
        &[
            "exec",
            "a",
            "sh",
            "-c",
            "echo $N; hostname; readlink /proc/self/ns/net; readlink /proc/1/ns/net",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[..2], ["v", "hn"], "{out}");
    assert!(lines[2].starts_with("net:["), "{out}");
    assert_eq!(lines[2], lines[3], "exec in the container's net namespace");
    let out = ok(&vmc(
        h,
        &[
            "exec",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "a",
            "sh",
            "-c",
            "pwd; id -u; id -g",
        ],
    ));
    assert_eq!(out, "/tmp\n1000\n1000\n");
    ok(&vmc(h, &["stop", "a"]));
    assert_eq!(ok(&vmc(h, &["wait", "a"])).trim(), "3");
    assert!(ok(&vmc(h, &["logs", "a"])).contains("got-usr1"));

    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--name",
            "b",
            "busybox",
            "sh",
            "-c",
            "trap '' TERM; echo up; while :; do echo tick; sleep 0.1; done",
        ],
    ));
    up("b");
    let t0 = std::time::Instant::now();
    ok(&vmc(h, &["stop", "-t", "1", "b"]));
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(1),
        "stop waited the -t grace period"
    );
    assert_eq!(ok(&vmc(h, &["wait", "b"])).trim(), "137", "then SIGKILL");
    // And no longer than -t: the workload counted its own 0.1 s sleeps
    // (a loaded host makes fewer, not more); the default grace period,
    // 10 s, would give about 100.
    let ticks = ok(&vmc(h, &["logs", "b"])).matches("tick").count();
    assert!(
        ticks < 50,
        "stop -t 1 let the workload run for {ticks} ticks of 0.1 s"
    );
    ok(&vmc(h, &["rm", "a", "b"]));
}

/// `--init`: a tiny init is PID 1 (the agent's static binary, read-only at
/// Docker's /sbin/docker-init), the command its child: orphans are reaped,
/// the stop signal reaches a command without handlers (143, where without
/// the init the PID-1 command ignores it and is killed: 137), exit codes
/// and a missing command's 127 pass through.
#[test]
fn init_is_pid_1_reaps_orphans_and_passes_signals() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let run = |args: &[&str]| {
        let mut v = vec![
            "run",
            "--rm",
            "--mode",
            "ns",
            "--network",
            "none",
            "--init",
            "busybox",
        ];
        v.extend(args);
        vmc(h, &v)
    };
    let o = run(&["sh", "-c", "ps -o pid,comm | sed 1d"]);
    let procs: Vec<String> = stdout(&o)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(procs[..2], ["1 docker-init", "2 sh"], "{procs:?}");
    // An orphan (its parent sh exits at once) ends and is reaped by PID 1.
    let o = run(&[
        "sh",
        "-c",
        "sh -c 'sleep 0.2 &'; sleep 1; ps -o stat,comm | grep -c '^Z' || true",
    ]);
    assert_eq!(stdout(&o).trim(), "0", "zombies left: {o:?}");
    let o = run(&["sh", "-c", "echo x > /sbin/docker-init"]);
    assert!(!o.status.success(), "the init is writable");
    assert_eq!(run(&["sh", "-c", "exit 3"]).status.code(), Some(3));
    let o = run(&["nosuch"]);
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    for (init, code) in [(true, "143"), (false, "137")] {
        let name = format!("sleeper-{init}");
        let mut args = vec![
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--name",
            &name,
        ];
        if init {
            args.push("--init");
        }
        args.extend(["busybox", "sleep", "1000"]);
        ok(&vmc(h, &args));
        ok(&vmc(h, &["stop", "-t", "2", &name]));
        assert_eq!(
            ok(&vmc(h, &["inspect", "-f", "{{.State.ExitCode}}", &name])).trim(),
            code,
            "--init {init}"
        );
    }
}
