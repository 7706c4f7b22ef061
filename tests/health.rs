//! HEALTHCHECK and ONBUILD through the binary: recorded in the image's
//! config under Docker's names, run by the supervisor (`ps` shows the
//! health, `inspect` its log), overridden by `--health-*` and
//! `--no-healthcheck`; ONBUILD triggers run in a child's build and are not
//! passed on.

mod common;

use std::path::Path;

use common::{eventually, is_root, kvm_available, ok, store_with_busybox, vmc, write};

fn build(h: &Path, dir: &Path, tag: &str) -> std::process::Output {
    vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "--network",
            "none",
            "-t",
            tag,
            dir.to_str().unwrap(),
        ],
    )
}

fn status(h: &Path, name: &str) -> String {
    ok(&vmc(
        h,
        &[
            "ps",
            "-a",
            "--filter",
            &format!("name={name}"),
            "--format",
            "{{.Status}}",
        ],
    ))
    .trim()
    .to_string()
}

#[test]
fn healthchecks_and_onbuild_triggers_in_namespace_mode() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\n\
         HEALTHCHECK --interval=1s --timeout=5s --retries=2 CMD test -f /tmp/ok\n\
         ONBUILD RUN echo triggered > /trig\n\
         ONBUILD ENV FROM_TRIGGER=yes\n\
         CMD [\"sh\", \"-c\", \"touch /tmp/ok; exec sleep 1000\"]\n",
    );
    ok(&build(h, ctx.path(), "hc"));
    assert_eq!(
        ok(&vmc(
            h,
            &["inspect", "-f", "{{json .Config.Healthcheck}} {{json .Config.OnBuild}}", "hc"]
        ))
        .trim(),
        "{\"Interval\":1000000000,\"Retries\":2,\"Test\":[\"CMD-SHELL\",\"test -f /tmp/ok\"],\"Timeout\":5000000000} \
         [\"RUN echo triggered > /trig\",\"ENV FROM_TRIGGER=yes\"]"
    );

    // starting -> healthy; then, the file gone, unhealthy after 2 failures.
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
            "web",
            "hc",
        ],
    ));
    assert!(
        status(h, "web").ends_with("(health: starting)") || status(h, "web").ends_with("(healthy)")
    );
    eventually("healthy", || {
        status(h, "web").ends_with("(healthy)").then_some(())
    });
    assert_eq!(
        ok(&vmc(h, &["ps", "-q", "--filter", "health=healthy"]))
            .lines()
            .count(),
        1
    );
    ok(&vmc(h, &["exec", "web", "rm", "/tmp/ok"]));
    eventually("unhealthy", || {
        status(h, "web").ends_with("(unhealthy)").then_some(())
    });
    let health: serde_json::Value = serde_json::from_str(&ok(&vmc(
        h,
        &["inspect", "-f", "{{json .State.Health}}", "web"],
    )))
    .unwrap();
    assert_eq!(health["Status"], "unhealthy");
    assert!(health["FailingStreak"].as_u64().unwrap() >= 2, "{health}");
    let log = health["Log"].as_array().unwrap();
    assert!(!log.is_empty() && log.len() <= 5, "{health}");
    assert_eq!(log.last().unwrap()["ExitCode"], 1);

    // The flags: --health-cmd over the image's, --no-healthcheck none.
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
            "flagged",
            "--health-cmd",
            "exit 3",
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "hc",
        ],
    ));
    eventually("unhealthy by the flag's command", || {
        status(h, "flagged").ends_with("(unhealthy)").then_some(())
    });
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
            "none",
            "--no-healthcheck",
            "hc",
        ],
    ));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        status(h, "none").starts_with("Up ") && !status(h, "none").contains('('),
        "{}",
        status(h, "none")
    );
    for (args, says) in [
        (
            &["run", "--no-healthcheck", "--health-cmd", "true", "hc"][..],
            "--no-healthcheck conflicts with --health-* options",
        ),
        (
            &["run", "--health-interval", "soon", "hc"],
            "--health-interval soon: not a duration",
        ),
        (
            &["run", "--health-retries", "2", "busybox", "true"],
            "give --health-cmd",
        ),
    ] {
        let o = vmc(h, args);
        assert_eq!(o.status.code(), Some(125), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{args:?}: {o:?}"
        );
    }

    // A child build runs the triggers first; they are not passed on, the
    // health check is.
    let child = tempfile::tempdir().unwrap();
    write(
        child.path(),
        "Dockerfile",
        "FROM hc\nRUN cat /trig && echo $FROM_TRIGGER\n",
    );
    let o = ok(&build(h, child.path(), "child"));
    assert!(o.contains("# Executing 2 build trigger(s)"), "{o}");
    assert!(o.contains("triggered\nyes\n"), "{o}");
    assert_eq!(
        ok(&vmc(
            h,
            &[
                "inspect",
                "-f",
                "{{json .Config.OnBuild}} {{.Config.Healthcheck.Retries}}",
                "child"
            ]
        ))
        .trim(),
        "null 2"
    );

    // What Docker refuses in a Dockerfile, named.
    for (df, says) in [
        (
            "FROM busybox\nONBUILD ONBUILD RUN true\n",
            "ONBUILD ONBUILD is not allowed",
        ),
        (
            "FROM busybox\nONBUILD FROM busybox\n",
            "FROM isn't allowed as an ONBUILD trigger",
        ),
        (
            "FROM busybox\nHEALTHCHECK --interval=soon CMD true\n",
            "HEALTHCHECK --interval=soon: not a duration",
        ),
        (
            "FROM busybox\nHEALTHCHECK --every=1s CMD true\n",
            "HEALTHCHECK --every: unknown option",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "Dockerfile", df);
        let o = build(h, d.path(), "bad");
        assert!(!o.status.success(), "{df}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{df}: {o:?}"
        );
    }
    // HEALTHCHECK NONE drops an inherited check.
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "Dockerfile", "FROM hc\nHEALTHCHECK NONE\n");
    ok(&build(h, d.path(), "nocheck"));
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
            "nc",
            "nocheck",
        ],
    ));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(!status(h, "nc").contains("health"), "{}", status(h, "nc"));
}

/// In a microVM the check runs as an exec through the agent.
#[test]
fn a_healthcheck_runs_in_a_microvm() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--name",
            "vm",
            "--health-cmd",
            "test -f /etc/hostname",
            "--health-interval",
            "1s",
            "busybox",
            "sleep",
            "1000",
        ],
    ));
    eventually("healthy", || {
        status(h, "vm").ends_with("(healthy)").then_some(())
    });
    let log = ok(&vmc(
        h,
        &["inspect", "-f", "{{json .State.Health.Log}}", "vm"],
    ));
    assert!(log.contains("\"ExitCode\":0"), "{log}");
}
