//! Namespace mode (`vmc run --mode ns`): the same image as a plain Linux
//! container on the host, with Docker's confinement.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{is_root, store_with_busybox, vmc};

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
    let script = "echo pid=$$; hostname; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
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
    // Docker's default capability set, nothing more, and no_new_privs.
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
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
    // Signals sent to vmc reach the workload (PID 1 of the container).
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .args([
            "run",
            "--rm",
            "--mode",
            "ns",
            "busybox",
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "got TERM\n");
    assert_eq!(status.code(), Some(7));
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
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = |ctrl: &str| -> PathBuf {
        let path = cgroups
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.splitn(3, ':').collect();
                f[1].split(',').any(|c| c == ctrl).then(|| f[2].to_string())
            })
            .unwrap();
        Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(path.trim_start_matches('/'))
    };
    let name = format!("vmc-{}", &id[..12]);
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("cgroup v2 host: the v1 file checks do not apply here");
        let _ = vmc(h, &["rm", "-f", &id]);
    } else {
        let read = |ctrl: &str, file: &str| {
            let dir = own(ctrl).join(&name);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                if let Ok(v) = std::fs::read_to_string(dir.join(file)) {
                    return v.trim().to_string();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} missing",
                    dir.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "100000");
        assert_eq!(read("pids", "pids.max"), "8");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !read("memory", "cgroup.procs").is_empty(),
            "the container joined"
        );
        let o = vmc(h, &["rm", "-f", &id]);
        assert!(o.status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while own("memory").join(&name).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the cgroup was not removed"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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
