//! A running container looked at and held, in both modes, through the
//! binary: `vmc top` lists its processes (a VM's from its guest), `vmc
//! stats` its use; `vmc pause`/`unpause`: a paused container's processes
//! make no progress, `ps` and `inspect` say so, exec is refused by name,
//! and it runs on once unpaused; stop and kill end a paused container. The
//! workload is PID 1 of the container's PID namespace, which execs join.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, is_root, kvm_available, ok, store_with_busybox, vmc};

fn lines(h: &Path, name: &str) -> usize {
    ok(&vmc(h, &["logs", name])).lines().count()
}

fn pause_and_unpause(mode: &str) {
    let home = store_with_busybox();
    let h = home.path();
    let script = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "p", "busybox", "sh", "-c", script,
        ],
    ));
    eventually("output", || (lines(h, "p") >= 2).then_some(()));
    assert_eq!(ok(&vmc(h, &["pause", "p"])), "p\n");
    let ps = ok(&vmc(h, &["ps", "--format", "{{.Status}} {{.State}}"]));
    assert!(ps.contains("(Paused) paused"), "{ps}");
    assert_eq!(
        ok(&vmc(
            h,
            &["inspect", "-f", "{{.State.Status}} {{.State.Paused}}", "p"]
        ))
        .trim(),
        "paused true"
    );
    assert_eq!(
        ok(&vmc(h, &["ps", "-q", "--filter", "status=paused"]))
            .lines()
            .count(),
        1
    );
    // No progress while paused (several of its loop's periods).
    let n = lines(h, "p");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lines(h, "p"), n, "a paused container wrote output");
    for (args, says) in [
        (&["exec", "p", "true"][..], "is paused: unpause it first"),
        (&["pause", "p"], "is already paused"),
    ] {
        let o = vmc(h, args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(ok(&vmc(h, &["unpause", "p"])), "p\n");
    eventually("output after unpause", || (lines(h, "p") > n).then_some(()));
    // The guest (or namespace) works on: an exec runs in it.
    assert_eq!(ok(&vmc(h, &["exec", "p", "echo", "alive"])), "alive\n");
    let o = vmc(h, &["unpause", "p"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not paused"));
    // A paused container is killed as it is.
    ok(&vmc(h, &["pause", "p"]));
    ok(&vmc(h, &["kill", "p"]));
    assert_eq!(
        ok(&vmc(
            h,
            &[
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.ExitCode}}",
                "p"
            ]
        ))
        .trim(),
        "exited 137"
    );
    let o = vmc(h, &["pause", "p"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not running"));
}

#[test]
fn top_stats_and_pause_in_namespace_mode() {
    if is_root() {
        pause_and_unpause("ns");
    }
}

/// A microVM's VMM is stopped and continued: its seccomp filter lets the
/// kernel resume an interrupted sleep (restart_syscall), or the VMM would
/// be killed at the unpause.
#[test]
fn top_stats_and_pause_in_vm_mode() {
    if kvm_available() {
        pause_and_unpause("vm");
    }
}

/// `vmc create -i` + `vmc start -a -i`, then `vmc attach`: the input goes
/// to the workload's stdin, its output comes back, ctrl-p ctrl-q detaches
/// (the container runs on), and an attached client ends with the
/// container's exit code.
fn attach_and_detach(mode: &str) {
    use std::io::{BufRead, Write};
    let home = store_with_busybox();
    let h = home.path();
    let script = "while read l; do echo got $l; done";
    ok(&vmc(
        h,
        &[
            "create", "-i", "--mode", mode, "--name", "a", "busybox", "sh", "-c", script,
        ],
    ));
    let spawn = |args: &[&str]| {
        common::vmc_command(h)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let said = |child: &mut std::process::Child, input: &str, want: &str| {
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.as_mut().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, want);
    };
    let mut first = spawn(&["start", "-a", "-i", "a"]);
    said(&mut first, "one\n", "got one\n");
    // ctrl-p ctrl-q: detached, exit 0; the container runs on.
    first.stdin.as_mut().unwrap().write_all(&[16, 17]).unwrap();
    let st = first.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        ok(&vmc(h, &["inspect", "-f", "{{.State.Status}}", "a"])).trim(),
        "running"
    );
    let mut second = spawn(&["attach", "a"]);
    said(&mut second, "two\n", "got two\n");
    ok(&vmc(h, &["stop", "-t", "1", "a"]));
    let code = second.wait().unwrap().code();
    let recorded: i32 = ok(&vmc(h, &["inspect", "-f", "{{.State.ExitCode}}", "a"]))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(code, Some(recorded));
    let o = vmc(h, &["attach", "a"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("you cannot attach to a stopped container"),
        "{o:?}"
    );
}

#[test]
fn attach_in_namespace_mode() {
    if is_root() {
        attach_and_detach("ns");
    }
}

#[test]
fn attach_in_vm_mode() {
    if kvm_available() {
        attach_and_detach("vm");
    }
}

/// The workload is PID 1 of the container's PID namespace, as in Docker:
/// an exec joins that namespace and sees it as PID 1, and `stop` of a
/// command without a SIGTERM handler ends it with SIGKILL after the
/// timeout (137): a PID 1 ignores signals it does not handle. With
/// `--init`, Docker's tiny init is PID 1 instead.
fn workload_is_pid_1(mode: &str) {
    let home = store_with_busybox();
    let h = home.path();
    let run = ["run", "--rm", "--mode", mode, "busybox", "sh", "-c"];
    let o = ok(&vmc(
        h,
        &[&run[..], &["read c < /proc/1/comm; echo $$ $c"]].concat(),
    ));
    assert_eq!(o, "1 sh\n");
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "s", "busybox", "sleep", "1000",
        ],
    ));
    let script = "tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o pid,comm | grep -c sleep";
    let seen = ok(&vmc(h, &["exec", "s", "sh", "-c", script]));
    assert_eq!(seen, "sleep 1000 \n1\n");
    ok(&vmc(h, &["stop", "-t", "1", "s"]));
    assert_eq!(
        ok(&vmc(h, &["inspect", "-f", "{{.State.ExitCode}}", "s"])).trim(),
        "137"
    );
    // --init: docker-init is PID 1, the command its child; it reaps an
    // orphan (its parent sh exits at once) and passes the stop signal on.
    let run = [
        "run", "--rm", "--init", "--mode", mode, "busybox", "sh", "-c",
    ];
    let o = ok(&vmc(h, &[&run[..], &["ps -o pid,comm | sed 1d"]].concat()));
    let procs: Vec<String> = o
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(procs[..2], ["1 docker-init", "2 sh"], "{procs:?}");
    let script = "sh -c 'sleep 0.2 &'; sleep 1; ps -o stat,comm | grep -c '^Z' || true";
    assert_eq!(ok(&vmc(h, &[&run[..], &[script]].concat())), "0\n");
    ok(&vmc(
        h,
        &[
            "run", "-d", "--init", "--mode", mode, "--name", "i", "busybox", "sleep", "1000",
        ],
    ));
    ok(&vmc(h, &["stop", "-t", "5", "i"]));
    assert_eq!(
        ok(&vmc(h, &["inspect", "-f", "{{.State.ExitCode}}", "i"])).trim(),
        "143"
    );
}

#[test]
fn workload_is_pid_1_in_namespace_mode() {
    if is_root() {
        workload_is_pid_1("ns");
    }
}

#[test]
fn workload_is_pid_1_in_vm_mode() {
    if kvm_available() {
        workload_is_pid_1("vm");
    }
}
