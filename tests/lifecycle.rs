//! The container lifecycle in both modes: run -d, ps, logs, stop, kill, rm,
//! wait, inspect; supervisors killed with SIGKILL; bad input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, ok, store_with_busybox, vmc};

/// Polls `vmc logs NAME` until it contains `what`; panics after `timeout`.
fn wait_for_log(h: &Path, name: &str, what: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let out = ok(&vmc(h, &["logs", name]));
        if out.contains(what) {
            return out;
        }
        assert!(
            Instant::now() < end,
            "{name} never logged {what:?} in {timeout:?}: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn supervisor_pid(h: &Path, name: &str) -> i32 {
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", name]))).unwrap();
    v[0]["State"]["Pid"].as_i64().unwrap() as i32
}

fn lifecycle(mode: &str) {
    let home = store_with_busybox();
    let h = home.path();
    let boot = Duration::from_secs(180);
    let script = "trap 'echo stopping; exit 3' TERM; echo started; echo to-stderr >&2; \
                  i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done";
    let id = ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "app", "busybox", "sh", "-c", script,
        ],
    ));
    assert_eq!(id.trim().len(), 64, "{id}");
    let out = wait_for_log(h, "app", "tick 2", boot);
    assert!(out.starts_with("started\n"), "{out}");
    // stderr stays stderr in the logs.
    let o = vmc(h, &["logs", "app"]);
    assert_eq!(String::from_utf8_lossy(&o.stderr), "to-stderr\n");
    let ps = ok(&vmc(h, &["ps"]));
    assert!(
        ps.contains(&id[..12]) && ps.contains("Up ") && ps.contains(" app"),
        "{ps}"
    );
    assert_eq!(ok(&vmc(h, &["ps", "-q"])).trim(), &id[..12]);
    // --tail and -t.
    let tail = ok(&vmc(h, &["logs", "--tail", "1", "-t", &id[..6]]));
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.starts_with("20") && tail.contains("Z tick "), "{tail}");

    // exec: into the same container (its files, its env), exit codes, stdin.
    let o = vmc(
        h,
        &[
            "exec",
            "-e",
            "X=y",
            "app",
            "sh",
            "-c",
            "echo $X; cat /proc/1/cmdline | tr '\\0' ' '; echo; exit 4",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.starts_with("y\n"), "{out}");
    if mode == "ns" {
        // The container's own pid namespace: its PID 1 is the workload.
        assert!(out.contains("sh -c trap"), "{out}");
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .args(["exec", "app", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"through exec\n").unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through exec\n");
    let o = vmc(h, &["exec", "app", "nosuchcommand"]);
    assert_eq!(o.status.code(), Some(127));

    // A duplicate name and rm of a running container are refused.
    let o = vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "app", "busybox", "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in use"));
    let o = vmc(h, &["rm", "app"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is running"));

    // logs -f follows until the container stops; stop delivers SIGTERM.
    // The follower is stopped on only once it has printed what was logged
    // before it started (so it is following).
    let mut follower = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .args(["logs", "-f", "app"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut followed = String::new();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(follower.stdout.take().unwrap()));
    for l in lines.by_ref() {
        let l = l.unwrap();
        followed.push_str(&l);
        followed.push('\n');
        if l == "tick 2" {
            break;
        }
    }
    assert!(followed.starts_with("started\n"), "{followed}");
    assert_eq!(ok(&vmc(h, &["stop", "app"])).trim(), "app");
    for l in lines {
        followed.push_str(&l.unwrap());
        followed.push('\n');
    }
    assert!(follower.wait().unwrap().success());
    assert!(
        followed.ends_with("stopping\n"),
        "logs -f ends with the stop: {followed}"
    );
    assert_eq!(ok(&vmc(h, &["wait", "app"])).trim(), "3");
    let ps = ok(&vmc(h, &["ps", "-a"]));
    assert!(ps.contains("Exited (3)"), "{ps}");
    assert!(ok(&vmc(h, &["ps"])).lines().count() == 1, "only the header");
    // Logs survive the exit until rm.
    assert!(ok(&vmc(h, &["logs", "app"])).contains("stopping"));
    let o = vmc(h, &["exec", "app", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not running"));
    ok(&vmc(h, &["rm", "app"]));
    assert!(!vmc(h, &["logs", "app"]).status.success());

    // A supervisor killed with SIGKILL: ps tells the truth, rm cleans up.
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            mode,
            "--network",
            "passt",
            "--name",
            "victim",
            "busybox",
            "sleep",
            "1000.25",
        ],
    ));
    let pid = supervisor_pid(h, "victim");
    // Its network helper (passt for a VM, pasta in namespace mode) runs.
    common::eventually("the victim's passt or pasta", || {
        (common::network_helpers(h) == 1).then_some(())
    });
    // SAFETY: kill on the supervisor we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    common::eventually("the killed supervisor to be gone", || {
        // SAFETY: kill with signal 0 only checks the pid.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    let ps = ok(&vmc(h, &["ps", "-a"]));
    assert!(ps.contains("Exited (137)") && ps.contains("victim"), "{ps}");
    // Nothing of the container is left: its processes (in a VM they went
    // with the VMM) and its network helper.
    common::eventually("the victim's processes to end", || {
        let out = Command::new("pgrep")
            .args(["-f", "^sleep 1000[.]25$"])
            .output()
            .unwrap();
        (out.stdout.is_empty() && common::network_helpers(h) == 0).then_some(())
    });
    ok(&vmc(h, &["rm", "victim"]));

    // kill -s and rm -f of a running container.
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            mode,
            "--name",
            "k",
            "busybox",
            "sh",
            "-c",
            "trap 'echo usr1; exit 5' USR1; echo up; while true; do sleep 0.2; done",
        ],
    ));
    wait_for_log(h, "k", "up", boot);
    ok(&vmc(h, &["kill", "-s", "USR1", "k"]));
    assert_eq!(ok(&vmc(h, &["wait", "k"])).trim(), "5");
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "f", "busybox", "sleep", "1000",
        ],
    ));
    ok(&vmc(h, &["rm", "-f", "f", "k"]));
    assert_eq!(
        std::fs::read_dir(h.join("containers")).unwrap().count(),
        0,
        "no state left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(h.to_str().unwrap()), "{mounts}");

    // run -d returns once the workload runs; one that cannot start fails
    // the run with Docker's code and message, and is left exited.
    let o = vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "bad", "busybox", "nope",
        ],
    );
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"nope\": executable file not found in $PATH"),
        "{err}"
    );
    assert!(ok(&vmc(h, &["ps", "-a"])).contains("Exited (127)"));
    ok(&vmc(h, &["rm", "bad"]));

    // create makes the container (its VM or namespaces) and starts
    // nothing; start runs its command, and returns once it runs.
    let id = ok(&vmc(
        h,
        &[
            "create",
            "--mode",
            mode,
            "--name",
            "later",
            "busybox",
            "sh",
            "-c",
            "echo begun; sleep 1000",
        ],
    ));
    assert_eq!(id.trim().len(), 64, "{id}");
    let ps = ok(&vmc(h, &["ps", "-a"]));
    let line = ps.lines().find(|l| l.contains("later")).unwrap();
    assert!(line.contains("Created"), "{ps}");
    assert!(!ok(&vmc(h, &["ps"])).contains("later"));
    assert_eq!(ok(&vmc(h, &["start", "later"])).trim(), "later");
    assert!(ok(&vmc(h, &["ps"])).contains("later"));
    wait_for_log(h, "later", "begun", boot);
    // Starting a running container changes nothing (as Docker's).
    assert_eq!(ok(&vmc(h, &["start", "later"])).trim(), "later");
    ok(&vmc(h, &["rm", "-f", "later"]));
    // A created container that is removed unstarted takes its supervisor
    // (and its VM) with it.
    ok(&vmc(
        h,
        &[
            "create", "--mode", mode, "--name", "never", "busybox", "true",
        ],
    ));
    let pid = supervisor_pid(h, "never");
    assert!(vmc::runtime::state::process_start(pid).is_some());
    ok(&vmc(h, &["rm", "never"]));
    assert!(vmc::runtime::state::process_start(pid).is_none());
    for (args, says) in [
        (
            &["create", "-d", "busybox", "true"][..],
            "vmc create takes no -d",
        ),
        (&["start", "nosuch"], "no such container: nosuch"),
    ] {
        let o = vmc(h, args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // Missing containers are clear errors.
    for args in [
        &["stop", "nosuch"][..],
        &["rm", "nosuch"],
        &["logs", "nosuch"],
        &["kill", "nosuch"],
    ] {
        let o = vmc(h, args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no such container: nosuch"),
            "{args:?}"
        );
    }
}

#[test]
fn lifecycle_in_namespace_mode() {
    if !common::is_root() {
        return;
    }
    lifecycle("ns");
}

#[test]
fn lifecycle_in_vm_mode() {
    if !kvm_available() {
        return;
    }
    lifecycle("vm");
}
