//! `vmc build` end to end: every Dockerfile instruction, multi-stage builds,
//! RUN steps in a real microVM, the layer cache, and failures that name the
//! line and leave the store as it was.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{kvm_available, ok, snapshots, store_with_busybox, vmc, write};

const MULTI_STAGE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM $BASE AS builder
ARG GREETING=hello
ENV OUT=/out DEBUG_LEVEL=1
WORKDIR $OUT
COPY src/*.txt ./
COPY --chown=1000:1000 src/owned.txt /owned/
ADD bundle.tar.gz /opt/
RUN echo "$GREETING from the build VM" > made.txt && cat a.txt
RUN ["sh", "-c", "echo exec-form > exec.txt"]
RUN <<EOF
mkdir -p /out/sub
echo heredoc > /out/sub/here.txt
rm /etc/group
EOF
SHELL ["/bin/sh", "-e", "-c"]
RUN test ! -e /etc/group && echo "group gone"
RUN cat /proc/sys/kernel/random/uuid > /dev/shm/build-vm
RUN test -s /dev/shm/build-vm && echo "same VM: $(cat /dev/shm/build-vm)"
RUN echo "owner $(stat -c '%u:%g' /owned/owned.txt)"

FROM busybox
LABEL org.example.purpose="vmc build test" stage=final
COPY --from=builder /out /app
COPY --from=builder /opt/inner /opt/inner
COPY --from=builder /owned /owned
WORKDIR /app
EXPOSE 8080 9000/udp
VOLUME ["/data"]
STOPSIGNAL SIGINT
USER 1000:1000
ENTRYPOINT ["sh", "-c", "cat /app/made.txt /app/exec.txt /app/sub/here.txt /opt/inner/in.txt; id -u; echo \"cmd: $0\""]
CMD ["default-arg"]
"#;

fn context(dir: &Path) {
    write(dir, "Dockerfile", MULTI_STAGE);
    write(dir, "src/a.txt", "file a\n");
    write(dir, "src/b.txt", "file b\n");
    write(dir, "src/skip.md", "not copied\n");
    write(dir, "src/owned.txt", "owned\n");
    write(dir, "src/secret.txt", "must not be copied\n");
    write(dir, ".dockerignore", "src/secret.txt\n");
    // A gzip tarball that ADD unpacks.
    let inner = dir.join("inner");
    write(&inner, "inner/in.txt", "from the tarball\n");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&inner)
        .arg("-czf")
        .arg(dir.join("bundle.tar.gz"))
        .arg("inner")
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_dir_all(&inner).unwrap();
}

#[test]
fn a_multi_stage_build_with_every_instruction_runs_and_rebuilds_from_cache() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    context(ctx.path());
    let c = ctx.path().to_str().unwrap();

    let out = ok(&vmc(h, &["build", "-t", "app:1", "-t", "app:latest", c]));
    assert!(out.contains("Step 1/"), "{out}");
    assert!(out.contains("file a\n"), "RUN output is streamed: {out}");
    assert!(out.contains("group gone"), "{out}");
    // One VM serves the stage's RUN steps: a file one step left in the
    // VM's /dev/shm (a tmpfs of the guest, not of the image: a VM restored
    // from the snapshot has none) is there for the next.
    assert!(out.contains("same VM: "), "{out}");
    assert!(out.contains("owner 1000:1000"), "--chown: {out}");
    assert!(out.contains("Successfully tagged app:1"), "{out}");
    let id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("Successfully built "))
            .expect("image id")
            .to_string()
    };
    let first = id(&out);

    // The image config carries every config instruction.
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "app:1"]))).unwrap();
    let cfg = &v[0]["Config"];
    assert_eq!(cfg["WorkingDir"], "/app");
    assert_eq!(cfg["User"], "1000:1000");
    assert_eq!(cfg["StopSignal"], "SIGINT");
    assert_eq!(cfg["Cmd"], serde_json::json!(["default-arg"]));
    assert_eq!(cfg["Labels"]["stage"], "final");
    assert_eq!(cfg["Labels"]["org.example.purpose"], "vmc build test");
    assert!(cfg["ExposedPorts"].get("8080/tcp").is_some(), "{cfg}");
    assert!(cfg["ExposedPorts"].get("9000/udp").is_some(), "{cfg}");
    assert!(cfg["Volumes"].get("/data").is_some(), "{cfg}");
    // The final stage's env is the base's, not the builder's.
    assert!(!cfg["Env"].to_string().contains("DEBUG_LEVEL"), "{cfg}");

    // Running it: files from both stages, the user, entrypoint + cmd.
    let run = ok(&vmc(h, &["run", "--rm", "app:1"]));
    assert_eq!(
        run,
        "hello from the build VM\nexec-form\nheredoc\nfrom the tarball\n1000\ncmd: default-arg\n"
    );
    let files = ok(&vmc(
        h,
        &[
            "run",
            "--rm",
            "-u",
            "0",
            "--entrypoint",
            "",
            "app:1",
            "sh",
            "-c",
            "ls /app; stat -c '%u:%g' /owned/owned.txt; test -e /etc/group && echo base-group-kept",
        ],
    ));
    assert_eq!(
        files, "a.txt\nb.txt\nexec.txt\nmade.txt\nowned.txt\nsub\n0:0\nbase-group-kept\n",
        "globs and .dockerignore; COPY without --chown gives root, as in Docker"
    );

    // An unchanged rebuild: every step from the cache, the same image.
    let again = ok(&vmc(h, &["build", "-t", "app:1", c]));
    assert!(!again.contains("Running in"), "{again}");
    assert_eq!(id(&again), first);

    // A changed source file invalidates its COPY and everything after.
    write(ctx.path(), "src/a.txt", "file a, edited\n");
    let changed = ok(&vmc(h, &["build", "-t", "app:2", c]));
    assert!(changed.contains("file a, edited"), "{changed}");
    assert_ne!(id(&changed), first);

    // --build-arg reaches RUN.
    let arg = ok(&vmc(
        h,
        &["build", "--build-arg", "GREETING=bonjour", "-t", "app:3", c],
    ));
    assert!(arg.contains("Running in"), "{arg}");
    let run = ok(&vmc(h, &["run", "--rm", "app:3"]));
    assert!(run.starts_with("bonjour from the build VM\n"), "{run}");
}

#[test]
fn a_failing_run_stops_the_build_with_its_code_and_names_the_line() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN echo before\nRUN echo failing >&2; exit 3\nRUN echo never\n",
    );
    let before = ok(&vmc(h, &["images", "-q"]));
    let o = vmc(h, &["build", "-t", "broken", ctx.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("failing"), "{out}");
    assert!(!out.contains("never"), "{out}");
    assert!(
        err.contains(
            "Dockerfile:3: RUN echo failing >&2; exit 3: the command returned a non-zero code: 3"
        ),
        "{err}"
    );
    assert_eq!(ok(&vmc(h, &["images", "-q"])), before, "nothing named");
    assert!(!vmc(h, &["inspect", "broken"]).status.success());
}

#[test]
fn bad_dockerfiles_and_contexts_are_one_line_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    let cases: &[(&str, &str)] = &[
        ("FROM busybox\nRUN true\nFROBNICATE x\n", "Dockerfile:3:"),
        ("RUN true\n", "Dockerfile:1:"),
        ("FROM nosuchimage\nRUN true\n", "no such image: nosuchimage"),
        (
            "FROM scratch\nCOPY missing.txt /\n",
            "Dockerfile:2: COPY missing.txt /: 'missing.txt' not found",
        ),
        (
            "FROM scratch\nCOPY ../../etc/passwd /\n",
            "outside the build context",
        ),
        ("FROM scratch\nCOPY --from=nowhere /x /\n", "Dockerfile:2:"),
        // Bad ARGs: no name, an empty name, an unterminated quote.
        ("FROM scratch\nARG\n", "Dockerfile:2: ARG"),
        (
            "ARG =1\nFROM scratch\n",
            "Dockerfile:1: ARG =1: empty variable name",
        ),
        (
            "FROM scratch\nARG X=\"open\n",
            "Dockerfile:2: ARG X=\"open: unexpected end of statement",
        ),
    ];
    for (dockerfile, expect) in cases {
        write(ctx.path(), "Dockerfile", dockerfile);
        let o = vmc(h, &["build", "-t", "x", c]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{dockerfile}");
        assert!(err.contains(expect), "{dockerfile}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let o = vmc(h, &["build", "-t", "x", "/nonexistent/context"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such directory"));
    // A bad tag for a context that builds (as the good tag after shows):
    // refused for the tag, nothing stored.
    write(ctx.path(), "Dockerfile", "FROM scratch\nCOPY ok.txt /\n");
    write(ctx.path(), "ok.txt", "ok\n");
    let o = vmc(h, &["build", "-t", "Bad Name", c]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("-t Bad Name: invalid image reference"),
        "the tag is what is refused: {err}"
    );
    assert!(ok(&vmc(h, &["images", "-q"])).trim().is_empty());
    ok(&vmc(h, &["build", "-t", "good-name", c]));
    assert_eq!(ok(&vmc(h, &["images", "-q"])).lines().count(), 1);
}

#[test]
fn a_build_killed_mid_run_leaves_the_store_consistent() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN echo started && sleep 600\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .env("VMC_SNAPSHOTS", snapshots())
        .args(["build", "-t", "killed", ctx.path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed only once the RUN step is running: its output is the proof.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let started = lines.by_ref().map_while(Result::ok).any(|l| {
        seen.push(l.clone());
        l.contains("started")
    });
    assert!(started, "the RUN step never started: {seen:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!vmc(h, &["inspect", "killed"]).status.success());
    // The store still works: the next build succeeds and cleans the leftovers.
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN echo fine > /f\n",
    );
    ok(&vmc(
        h,
        &["build", "-t", "after", ctx.path().to_str().unwrap()],
    ));
    assert_eq!(
        ok(&vmc(h, &["run", "--rm", "after", "cat", "/f"])),
        "fine\n"
    );
    let tmp = h.join("cache/build-tmp");
    assert_eq!(fs::read_dir(tmp).unwrap().count(), 0, "no build leftovers");
}

#[test]
fn deletions_in_cached_layers_hold_for_the_steps_that_follow() {
    if !kvm_available() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    let base =
        "FROM busybox\nRUN rm /etc/group && mkdir -p /d && touch /d/keep /d/drop\nRUN rm /d/drop\n";
    write(ctx.path(), "Dockerfile", base);
    // No network: nothing is mounted over /etc (see tests/network.rs).
    ok(&vmc(h, &["build", "--network", "none", "-t", "one", c]));
    // Both RUNs now come from the cache: their layers (with whiteouts) are
    // fed to the new build VM before the new step runs.
    write(
        ctx.path(),
        "Dockerfile",
        &format!("{base}RUN ls /etc /d | tr '\\n' ' '; echo; echo routes=$(ip route | wc -l)\n"),
    );
    let out = ok(&vmc(h, &["build", "--network", "none", "-t", "two", c]));
    assert!(out.contains("/d: keep  /etc: passwd \n"), "{out}");
    // --network none: the build VM has no route anywhere.
    assert!(out.contains("routes=0\n"), "{out}");
    assert_eq!(out.matches("Using cache").count(), 2, "{out}");
}

/// `FROM scratch` with `-f` naming a Dockerfile outside the usual place:
/// a static busybox copied in, an exec-form RUN (there is no /bin/sh), the
/// image run. In namespace mode, and in a microVM where KVM is available.
#[test]
fn a_scratch_image_builds_from_a_named_dockerfile() {
    if !common::is_root() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    fs::copy(
        common::rootfs().join("bin/busybox"),
        ctx.path().join("busybox"),
    )
    .unwrap();
    write(ctx.path(), "hello.txt", "hello\n");
    write(
        ctx.path(),
        "build/Custom.dockerfile",
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY hello.txt /\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox echo built >> /hello.txt\"]\n\
         ENTRYPOINT [\"/bin/busybox\"]\nCMD [\"cat\", \"/hello.txt\"]\n",
    );
    let file = ctx.path().join("build/Custom.dockerfile");
    let mut modes = vec!["ns"];
    if kvm_available() {
        modes.push("vm");
    }
    for mode in modes {
        let tag = format!("scratchy-{mode}");
        let out = ok(&vmc(
            h,
            &[
                "build",
                "--mode",
                mode,
                "--network",
                "none",
                // The layer cache does not depend on the mode.
                "--no-cache",
                "-f",
                file.to_str().unwrap(),
                "-t",
                &tag,
                ctx.path().to_str().unwrap(),
            ],
        ));
        assert!(out.contains("Step 4/6 : RUN"), "{out}");
        assert!(!out.contains("Using cache"), "{out}");
        let ran = ok(&vmc(h, &["run", "--rm", "--mode", "ns", &tag]));
        assert_eq!(ran, "hello\nbuilt\n", "built in {mode}");
    }
    // No Dockerfile in the context and no -f: named as missing.
    let o = vmc(h, &["build", "-t", "x", ctx.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Dockerfile"),
        "{o:?}"
    );
}

/// Two builds and an import in separate vmc processes at once on one
/// store: all three land, and the store stays an OCI layout that skopeo
/// reads (index and blobs consistent).
#[test]
fn concurrent_builds_and_an_import_leave_a_consistent_store() {
    if !common::is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let tar = common::busybox_tar(&h.join("again.tar"));
    let ctxs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, c) in ctxs.iter().enumerate() {
        write(
            c.path(),
            "Dockerfile",
            &format!("FROM busybox\nRUN echo {i} > /which && for n in 1 2 3 4 5 6 7 8; do echo $n > /f$n; done\nCMD [\"cat\", \"/which\"]\n"),
        );
    }
    let spawn = |args: Vec<String>| {
        common::vmc_command(h)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut children: Vec<_> = ctxs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            spawn(
                [
                    "build",
                    "--mode",
                    "ns",
                    "--network",
                    "none",
                    "-t",
                    &format!("par{i}"),
                    c.path().to_str().unwrap(),
                ]
                .map(String::from)
                .to_vec(),
            )
        })
        .collect();
    children.push(spawn(
        ["import", tar.to_str().unwrap(), "imported:again"]
            .map(String::from)
            .to_vec(),
    ));
    for c in children {
        let o = c.wait_with_output().unwrap();
        ok(&o);
    }
    for i in 0..2 {
        let tag = format!("par{i}");
        assert_eq!(
            ok(&vmc(h, &["run", "--rm", "--mode", "ns", &tag])),
            format!("{i}\n")
        );
    }
    let images = ok(&vmc(h, &["images"]));
    for name in ["par0", "par1", "imported", "busybox"] {
        assert!(images.contains(name), "{images}");
    }
    for tag in ["par0:latest", "par1:latest", "imported:again"] {
        let o = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{tag}", h.display()))
            .output()
            .expect("skopeo is installed by make setup");
        assert!(o.status.success(), "{tag}: {o:?}");
    }
}
