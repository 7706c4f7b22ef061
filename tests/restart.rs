//! Restart policies, `vmc start` of exited containers and `vmc restart`,
//! through the binary: the supervisor runs the workload again with its
//! writable layer kept, counts the restarts, stops for good when the user
//! stops the container, and an attached run hands its container over to a
//! detached supervisor.

mod common;

use std::path::Path;

use common::{eventually, is_root, kvm_available, ok, store_with_busybox, vmc};

fn inspect(h: &Path, name: &str, template: &str) -> String {
    ok(&vmc(h, &["inspect", "-f", template, name]))
        .trim()
        .to_string()
}

fn runs(h: &Path, name: &str) -> usize {
    ok(&vmc(h, &["logs", name]))
        .lines()
        .filter(|l| l.starts_with("run "))
        .count()
}

/// Each run appends a line to a file in the container's own root and
/// prints how many lines it holds: the count shows both the runs and that
/// the writable layer was kept.
const COUNTING: &str = "date >> /runs; echo run $(wc -l < /runs)";

#[test]
fn restart_policies_start_and_restart_in_namespace_mode() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();

    // Refused, by name.
    let o = vmc(
        h,
        &["run", "--rm", "--restart", "always", "busybox", "true"],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("conflicting options: --restart and --rm"),
        "{o:?}"
    );
    let o = vmc(h, &["run", "--restart", "sometimes", "busybox", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid restart policy 'sometimes'"),
        "{o:?}"
    );

    // on-failure:2: the first run and two restarts, each on the same
    // writable layer; then it stays exited with the last code.
    let script = format!("{COUNTING}; exit 3");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--name",
            "fail",
            "--restart",
            "on-failure:2",
            "busybox",
            "sh",
            "-c",
            &script,
        ],
    ));
    eventually("three runs and the end", || {
        (inspect(h, "fail", "{{.State.Status}}") == "exited").then_some(())
    });
    let logs = ok(&vmc(h, &["logs", "fail"]));
    assert_eq!(logs, "run 1\nrun 2\nrun 3\n");
    assert_eq!(
        inspect(
            h,
            "fail",
            "{{.RestartCount}} {{.State.ExitCode}} {{json .HostConfig.RestartPolicy}}"
        ),
        "2 3 {\"MaximumRetryCount\":2,\"Name\":\"on-failure\"}"
    );
    // A clean exit is not restarted by on-failure.
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--name",
            "clean",
            "--restart",
            "on-failure",
            "busybox",
            "sh",
            "-c",
            COUNTING,
        ],
    ));
    eventually("the clean exit", || {
        (inspect(h, "clean", "{{.State.Status}}") == "exited").then_some(())
    });
    assert_eq!(runs(h, "clean"), 1);

    // vmc start of an exited container runs it again (its layer kept),
    // its restart count back at 0.
    ok(&vmc(h, &["start", "fail"]));
    eventually("the started runs", || {
        (inspect(h, "fail", "{{.State.Status}}") == "exited" && runs(h, "fail") == 6).then_some(())
    });
    assert!(ok(&vmc(h, &["logs", "fail"])).ends_with("run 6\n"));
    assert_eq!(inspect(h, "fail", "{{.RestartCount}}"), "2");

    // always: restarted after clean exits, shown as Restarting by ps
    // (listed without -a) between runs, until vmc stop, after which it
    // runs no more.
    let script = format!("{COUNTING}; exit 7");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--name",
            "always",
            "--restart",
            "always",
            "busybox",
            "sh",
            "-c",
            &script,
        ],
    ));
    eventually("ps showing a restart", || {
        ok(&vmc(
            h,
            &["ps", "--filter", "name=always", "--format", "{{.Status}}"],
        ))
        .starts_with("Restarting (7) ")
        .then_some(())
    });
    assert_eq!(
        inspect(h, "always", "{{.State.Restarting}} {{.State.Running}}"),
        "true true"
    );
    ok(&vmc(h, &["stop", "always"]));
    assert_eq!(inspect(h, "always", "{{.State.Status}}"), "exited");
    let n = runs(h, "always");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(runs(h, "always"), n, "a stopped container ran again");

    // vmc restart: a running container stopped and started again, on the
    // same layer; vmc kill stops it for good too.
    let script = format!("{COUNTING}; exec sleep 1000");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--name",
            "svc",
            "--restart",
            "always",
            "busybox",
            "sh",
            "-c",
            &script,
        ],
    ));
    ok(&vmc(h, &["restart", "-t", "1", "svc"]));
    assert_eq!(inspect(h, "svc", "{{.State.Status}}"), "running");
    eventually("the second run", || (runs(h, "svc") == 2).then_some(()));
    ok(&vmc(h, &["kill", "svc"]));
    eventually("the kill", || {
        (inspect(h, "svc", "{{.State.Status}}") == "exited").then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(runs(h, "svc"), 2, "a killed container ran again");

    // An attached run returns its code; its restart policy then runs the
    // container on under a detached supervisor.
    let o = vmc(
        h,
        &[
            "run",
            "--mode",
            "ns",
            "--name",
            "fg",
            "--restart",
            "on-failure:1",
            "busybox",
            "sh",
            "-c",
            &format!("{COUNTING}; exit 4"),
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    eventually("the restart after the attached run", || {
        (inspect(h, "fg", "{{.State.Status}} {{.RestartCount}}") == "exited 1").then_some(())
    });
    assert!(ok(&vmc(h, &["logs", "fg"])).ends_with("run 2\n"));
}

/// The same in a microVM, where the writable layer is a scratch disk that
/// a restart keeps (one policy and one start: each VM run is slow here).
#[test]
fn a_microvm_restarts_on_its_own_writable_layer() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let script = format!("{COUNTING}; exit 5");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--name",
            "vm",
            "--restart",
            "on-failure:1",
            "busybox",
            "sh",
            "-c",
            &script,
        ],
    ));
    // Waits as long as the supervisor lives (vmc wait: through the restart).
    let o = vmc(h, &["wait", "vm"]);
    assert_eq!(ok(&o).trim(), "5");
    eventually("the end of the restarts", || {
        (inspect(h, "vm", "{{.State.Status}}") == "exited").then_some(())
    });
    assert_eq!(ok(&vmc(h, &["logs", "vm"])), "run 1\nrun 2\n");
    assert_eq!(inspect(h, "vm", "{{.RestartCount}}"), "1");
    ok(&vmc(h, &["start", "vm"]));
    eventually("the runs of the start", || {
        (inspect(h, "vm", "{{.State.Status}}") == "exited" && runs(h, "vm") == 4).then_some(())
    });
    assert!(ok(&vmc(h, &["logs", "vm"])).ends_with("run 3\nrun 4\n"));
}
