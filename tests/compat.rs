//! What a Docker user reaches for in the first week, through the binary:
//! Dockerfile features and fixes of real projects' Dockerfiles, and the
//! everyday CLI. Builds run their steps in namespace mode here (the same
//! builder as a microVM build; `tests/build.rs` runs RUN steps in VMs).

mod common;

use std::fs;
use std::path::Path;

use common::{is_root, ok, store_with_busybox, vmc, write};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The image config's field as `vmc inspect` shows it.
fn config_field(h: &Path, image: &str, field: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", image]))).unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    v["Config"][field].clone()
}

/// Docker's rules where vmc used to differ: a stage's `ARG NAME` takes the
/// global default; WORKDIR is normalised; `ENV PATH=/x:$PATH` on a base
/// without PATH gets Docker's default PATH first; an unused `--build-arg`
/// warns; a WORKDIR that cannot be entered is named.
#[test]
fn build_follows_dockers_rules_for_args_workdir_and_path() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "ARG V=global\nARG W=w\nFROM busybox\nARG V\nARG W=own\nWORKDIR /app\n\
         WORKDIR ../x/./y\nENV PATH=/opt/bin:${PATH}\n\
         RUN echo \"V=$V W=$W pwd=$(pwd)\" > /out.txt && echo \"$PATH\" >> /out.txt && ls > /dev/null\n",
    );
    let o = vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "-t",
            "rules",
            "--build-arg",
            "UNUSED=1",
            "--build-arg",
            "HTTP_PROXY=http://proxy.invalid",
            c,
        ],
    );
    let out = ok(&o);
    assert!(
        out.contains("[Warning] One or more build-args [UNUSED] were not consumed\n"),
        "{out}"
    );
    let ran = ok(&vmc(
        h,
        &["run", "--rm", "--mode", "ns", "rules", "cat", "/out.txt"],
    ));
    assert_eq!(
        ran,
        "V=global W=own pwd=/x/y\n/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(config_field(h, "rules", "WorkingDir"), "/x/y");

    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nWORKDIR /etc/passwd\nRUN pwd\n",
    );
    let o = vmc(h, &["build", "--mode", "ns", "-t", "badwd", c]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(
            "the working directory /etc/passwd cannot be entered: Not a directory (os error 20)"
        ),
        "{err}"
    );
    assert!(err.contains("Dockerfile:3: RUN pwd"), "{err}");
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "-w",
            "/etc/passwd",
            "busybox",
            "pwd",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert_eq!(
        stderr(&o),
        "vmc: the working directory /etc/passwd cannot be entered: Not a directory (os error 20)\n"
    );
}

/// Heredocs as BuildKit takes them: one alone at the start is the script;
/// any other (after the command, several, `<<-`, quoted) is the shell's;
/// one never closed is named.
#[test]
fn run_heredocs_anywhere_reach_the_shell() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nARG NAME=world\n\
         RUN <<EOF\necho script > /one\nEOF\n\
         RUN cat <<EOF > /two\nhello $NAME\nEOF\n\
         RUN <<A cat > /three && <<-'B' cat >> /three\nfirst\nA\n\tsecond $NAME\n\tB\n\
         CMD cat /one /two /three\n",
    );
    ok(&vmc(h, &["build", "--mode", "ns", "-t", "heredocs", c]));
    let ran = ok(&vmc(h, &["run", "--rm", "--mode", "ns", "heredocs"]));
    assert_eq!(ran, "script\nhello world\nfirst\nsecond $NAME\n");

    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN cat <<EOF > /x\nWelcome\nEOF \n",
    );
    let o = vmc(h, &["build", "--mode", "ns", c]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("vmc: build failed: Dockerfile:2: RUN cat <<EOF > /x: the heredoc <<EOF is never closed"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// COPY's heredocs and `--chmod`, ADD of `.tar.xz` and `.tar.bz2` (unpacked,
/// as Docker does), and a COPY flag vmc lacks refused by name.
#[test]
fn copy_heredocs_chmod_and_compressed_adds() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    write(ctx.path(), "tree/t/in.txt", "from a tarball\n");
    write(ctx.path(), "run.sh", "echo run\n");
    for (flag, name) in [("-cJf", "x.tar.xz"), ("-cjf", "b.tar.bz2")] {
        let st = std::process::Command::new("tar")
            .args(["-C", ctx.path().join("tree").to_str().unwrap(), flag])
            .arg(ctx.path().join(name))
            .arg("t")
            .status()
            .unwrap();
        assert!(st.success());
    }
    fs::remove_dir_all(ctx.path().join("tree")).unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nARG WHO=docker\n\
         COPY <<EOF /etc/greeting\nhello $WHO\nEOF\n\
         COPY <<'A' <<B /notes/\nkept $WHO\nA\nmade by $WHO\nB\n\
         COPY --chmod=0750 run.sh /run.sh\n\
         COPY --link --chmod=600 <<EOF /secret\ns\nEOF\n\
         ADD x.tar.xz /xz/\nADD b.tar.bz2 /bz/\n\
         CMD cat /etc/greeting /notes/A /notes/B /xz/t/in.txt /bz/t/in.txt && \
         stat -c '%a %n' /run.sh /secret /etc/greeting\n",
    );
    ok(&vmc(h, &["build", "--mode", "ns", "-t", "copies", c]));
    let ran = ok(&vmc(h, &["run", "--rm", "--mode", "ns", "copies"]));
    assert_eq!(
        ran,
        "hello docker\nkept $WHO\nmade by docker\nfrom a tarball\nfrom a tarball\n\
         750 /run.sh\n600 /secret\n644 /etc/greeting\n"
    );

    for (line, expect) in [
        (
            "COPY --parents run.sh /",
            "Dockerfile:2: COPY --parents: not supported by vmc build (it takes --from, --chown, --chmod and --link)",
        ),
        (
            "COPY --chmod=u+x run.sh /",
            "Dockerfile:2: COPY --chmod=u+x run.sh /: --chmod=u+x: not an octal mode (e.g. 0755 or 644)",
        ),
    ] {
        write(ctx.path(), "Dockerfile", &format!("FROM busybox\n{line}\n"));
        let o = vmc(h, &["build", "--mode", "ns", c]);
        assert_eq!(o.status.code(), Some(1), "{line}");
        assert_eq!(stderr(&o), format!("vmc: build failed: {expect}\n"));
    }
}

/// `--target` builds a stage and only the stages it needs (as BuildKit,
/// stages nothing needs are skipped without it too); `--label`,
/// `--iidfile`, `-f -`, a context of `-`, and `--progress`.
#[test]
fn build_target_labels_iidfile_and_stdin() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox AS base\nRUN echo base > /b\n\
         FROM busybox AS broken\nRUN echo broken-ran; exit 3\n\
         FROM base AS test\nRUN echo test-ran > /t\n\
         FROM busybox\nCOPY --from=base /b /b\nCMD cat /b\n",
    );
    let iid = ctx.path().join("iid");
    let out = ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "-t",
            "final",
            "--label",
            "team=vmc",
            "--label",
            "empty=",
            "--iidfile",
            iid.to_str().unwrap(),
            "--progress",
            "plain",
            c,
        ],
    ));
    assert!(
        !out.contains("broken-ran") && !out.contains("test-ran"),
        "{out}"
    );
    assert!(
        out.contains("Step 5/5 : CMD cat /b"),
        "only needed steps count: {out}"
    );
    let id = fs::read_to_string(&iid).unwrap();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "final"]))).unwrap();
    assert_eq!(v[0]["Id"], id.as_str(), "{v}");
    assert_eq!(v[0]["Config"]["Labels"]["team"], "vmc");
    assert_eq!(v[0]["Config"]["Labels"]["empty"], "");
    assert_eq!(
        ok(&vmc(h, &["run", "--rm", "--mode", "ns", "final"])),
        "base\n"
    );

    let out = ok(&vmc(
        h,
        &["build", "--mode", "ns", "--target", "TEST", "-t", "t", c],
    ));
    assert!(
        out.contains("test-ran") || out.contains("Using cache"),
        "{out}"
    );
    assert!(!out.contains("broken-ran"), "{out}");
    let ran = ok(&vmc(
        h,
        &["run", "--rm", "--mode", "ns", "t", "cat", "/b", "/t"],
    ));
    assert_eq!(ran, "base\ntest-ran\n");
    let o = vmc(h, &["build", "--mode", "ns", "--target", "nope", c]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vmc: build failed: --target nope: no stage of that name in the Dockerfile (it has: base, broken, test)\n"
    );

    // The Dockerfile on stdin: with a context (-f -), and as the context (-).
    let stdin_build = |args: &[&str], dockerfile: &str| {
        let mut child = common::vmc_command(h)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), dockerfile.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    write(ctx.path(), "f.txt", "from the context\n");
    let o = stdin_build(
        &["build", "--mode", "ns", "-q", "-f", "-", "-t", "s1", c],
        "FROM busybox\nCOPY f.txt /\nCMD cat /f.txt\n",
    );
    let id = ok(&o);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    assert_eq!(
        ok(&vmc(h, &["run", "--rm", "--mode", "ns", "s1"])),
        "from the context\n"
    );
    let o = stdin_build(
        &["build", "--mode", "ns", "--progress=quiet", "-t", "s2", "-"],
        "FROM busybox\nRUN echo no context > /n\nCMD cat /n\n",
    );
    assert_eq!(ok(&o).lines().count(), 1, "quiet prints the id alone");
    assert_eq!(
        ok(&vmc(h, &["run", "--rm", "--mode", "ns", "s2"])),
        "no context\n"
    );
    let o = stdin_build(
        &["build", "--mode", "ns", "-"],
        "FROM busybox\nCOPY f.txt /\n",
    );
    assert!(
        stderr(&o).contains("'f.txt' not found in the build context"),
        "{}",
        stderr(&o)
    );
}

/// `ps --filter/--format/-l/--no-trunc` with Docker's fields and a PORTS
/// column, `run --label`, `inspect --format` and `--type` with Docker's
/// field names (State, Config, HostConfig, NetworkSettings), and `-t`
/// setting TERM.
#[test]
fn ps_and_inspect_take_dockers_filters_and_templates() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let id = ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", "ns", "--name", "web", "--label", "team=vmc", "-l", "tier",
            "-p", &publish, "busybox", "sleep", "300",
        ],
    ));
    let id = id.trim();
    ok(&vmc(
        h,
        &["run", "--mode", "ns", "--name", "ok", "busybox", "true"],
    ));
    let o = vmc(
        h,
        &[
            "run", "--mode", "ns", "--name", "three", "busybox", "sh", "-c", "exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3));

    let ps = |args: &[&str]| ok(&vmc(h, &[&["ps"][..], args].concat()));
    assert_eq!(
        ps(&["--filter", "label=team=vmc", "-q"]),
        format!("{}\n", &id[..12])
    );
    assert_eq!(
        ps(&[
            "--filter",
            "label=tier",
            "--format",
            "{{.Names}} {{.Labels}}"
        ]),
        "web team=vmc,tier=\n"
    );
    assert_eq!(
        ps(&["-a", "--filter", "exited=3", "--format", "{{.Names}}"]),
        "three\n"
    );
    assert_eq!(
        ps(&[
            "-a",
            "-f",
            "status=exited",
            "-f",
            "name=o",
            "--format",
            "{{.Names}}"
        ]),
        "ok\n",
        "two keys: both must match"
    );
    assert_eq!(
        ps(&[
            "-a",
            "-f",
            "name=ok",
            "-f",
            "name=three",
            "--format",
            "{{.Names}}"
        ]),
        "three\nok\n",
        "one key twice: either, newest first"
    );
    assert_eq!(
        ps(&["-a", "-f", "ancestor=busybox", "-q"]).lines().count(),
        3
    );
    assert_eq!(
        ps(&["-l", "--format", "{{.Names}} {{.State}}"]),
        "three exited\n"
    );
    assert_eq!(ps(&["-n", "2", "-q"]).lines().count(), 2);
    assert_eq!(ps(&["--no-trunc", "-q"]), format!("{id}\n"));
    let ports = format!("127.0.0.1:{port}->80/tcp");
    assert_eq!(ps(&["--format", "{{.Ports}}"]), format!("{ports}\n"));
    let table = ps(&["-a", "--format", "table {{.Names}}\\t{{.State}}"]);
    assert_eq!(
        table,
        "NAMES   STATE\nthree   exited\nok      exited\nweb     running\n"
    );
    let default = ps(&[]);
    let header = default.lines().next().unwrap();
    assert!(header.starts_with("CONTAINER ID   IMAGE"), "{header}");
    assert!(
        header.contains("STATUS") && header.contains("PORTS"),
        "{header}"
    );
    assert!(default.contains(&ports), "{default}");
    let o = vmc(h, &["ps", "--filter", "bogus=1"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("invalid filter 'bogus'"),
        "{}",
        stderr(&o)
    );

    let inspect = |args: &[&str]| ok(&vmc(h, &[&["inspect"][..], args].concat()));
    let pid: u32 = inspect(&["-f", "{{.State.Pid}}", "web"])
        .trim()
        .parse()
        .unwrap();
    assert!(pid > 1);
    assert_eq!(
        inspect(&["--format", "{{.State.Status}} {{.Name}}", "web"]),
        "running web\n"
    );
    assert_eq!(
        inspect(&["-f", "{{json .Config.Labels}}", "web"]),
        "{\"team\":\"vmc\",\"tier\":\"\"}\n"
    );
    assert_eq!(
        inspect(&["-f", "{{json .NetworkSettings.Ports}}", "web"]),
        format!("{{\"80/tcp\":[{{\"HostIp\":\"127.0.0.1\",\"HostPort\":\"{port}\"}}]}}\n")
    );
    assert_eq!(
        inspect(&[
            "-f",
            "{{.HostConfig.AutoRemove}} {{index .Config.Labels \"team\"}}",
            "web"
        ]),
        "false vmc\n"
    );
    let image_id = inspect(&["--type", "image", "-f", "{{.Id}}", "busybox"]);
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let o = vmc(h, &["inspect", "--type", "container", "busybox"]);
    assert!(
        stderr(&o).contains("no such container: busybox"),
        "{}",
        stderr(&o)
    );
    let o = vmc(h, &["inspect", "-f", "{{range .X}}{{end}}", "web"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("'range' is not supported"),
        "{}",
        stderr(&o)
    );

    // -t: TERM=xterm unless set.
    let term = |extra: &[&str]| {
        ok(&vmc(
            h,
            &[
                &["run", "--rm", "--mode", "ns", "-t"][..],
                extra,
                &["busybox", "sh", "-c", "echo $TERM"],
            ]
            .concat(),
        ))
    };
    assert_eq!(term(&[]), "xterm\r\n");
    assert_eq!(term(&["-e", "TERM=vt100"]), "vt100\r\n");
    // An exec without -t has no terminal, in a container run with one.
    ok(&vmc(
        h,
        &[
            "run", "-d", "-t", "--mode", "ns", "--name", "tty", "busybox", "sleep", "100",
        ],
    ));
    let o = ok(&vmc(h, &["exec", "tty", "sh", "-c", "tty || true"]));
    assert_eq!(o, "not a tty\n");
    let o = ok(&vmc(h, &["exec", "-t", "tty", "tty"]));
    assert!(o.starts_with("/dev/pts/"), "{o}");
    ok(&vmc(h, &["rm", "-f", "web", "ok", "three", "tty"]));
}

/// `version` (with `--format`), `system df`, Docker's management-command
/// spellings (`container ls`, `image ls`, `image rm`, `image inspect`),
/// and `save`/`load` through stdout and stdin.
#[test]
fn version_df_aliases_and_save_load_through_stdio() {
    let home = store_with_busybox();
    let h = home.path();
    let v = ok(&vmc(h, &["version"]));
    assert!(v.starts_with("Client: vmc\n Version:    "), "{v}");
    assert!(v.contains(" OS/Arch:    linux/amd64\n"), "{v}");
    assert_eq!(
        ok(&vmc(h, &["version", "--format", "{{.Client.Version}}"])),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
    let df = ok(&vmc(h, &["system", "df"]));
    let lines: Vec<&str> = df.lines().collect();
    assert!(
        lines[0].starts_with("TYPE") && lines[0].ends_with("RECLAIMABLE"),
        "{df}"
    );
    assert!(
        lines[1].starts_with("Images") && lines[1].split_whitespace().nth(1) == Some("1"),
        "{df}"
    );
    assert!(lines.iter().any(|l| l.starts_with("Build Cache")), "{df}");

    assert_eq!(
        ok(&vmc(h, &["image", "ls", "-q"])),
        ok(&vmc(h, &["images", "-q"]))
    );
    assert_eq!(ok(&vmc(h, &["container", "ls", "-aq"])), "");
    let id = ok(&vmc(h, &["image", "inspect", "-f", "{{.Id}}", "busybox"]));
    assert!(id.starts_with("sha256:"), "{id}");
    let o = vmc(h, &["container", "inspect", "busybox"]);
    assert!(
        stderr(&o).contains("no such container: busybox"),
        "{}",
        stderr(&o)
    );

    // save to stdout, load from stdin, into another store.
    let saved = vmc(h, &["save", "busybox"]);
    assert!(saved.status.success(), "{}", stderr(&saved));
    let o = vmc(
        h,
        &["save", "-o", h.join("b.tar").to_str().unwrap(), "busybox"],
    );
    assert!(o.status.success());
    assert_eq!(
        saved.stdout,
        fs::read(h.join("b.tar")).unwrap(),
        "the same bytes"
    );
    let other = tempfile::tempdir().unwrap();
    let mut child = common::vmc_command(other.path())
        .args(["load"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &saved.stdout).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(ok(&o), "Loaded image: busybox:latest\n");
    assert_eq!(
        ok(&vmc(
            other.path(),
            &["image", "inspect", "-f", "{{.Id}}", "busybox"]
        )),
        id
    );
    assert!(!ok(&vmc(h, &["image", "rm", "busybox"])).is_empty());
    assert_eq!(ok(&vmc(h, &["images", "-q"])), "");
}

/// Sends `data`, half-closes, reads the echo (None: not answering yet).
fn echo_at(addr: std::net::SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .ok()?;
    s.write_all(data).ok()?;
    s.shutdown(std::net::Shutdown::Write).ok()?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).ok()?;
    (!back.is_empty()).then_some(back)
}

/// `-p CONTAINER` and `-p IP::CONTAINER` (a port the system chooses), `-P`
/// (every EXPOSEd TCP port), `[::1]` binds and ranges; `vmc port` and the
/// PORTS column show the chosen ports. In namespace mode (`tests/ports.rs`
/// runs `-p` through a VM).
#[test]
fn chosen_host_ports_publish_all_and_ipv6() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nEXPOSE 7000 7001/udp\nCMD nc -ll -p 7000 -e cat\n",
    );
    ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "-t",
            "echo",
            ctx.path().to_str().unwrap(),
        ],
    ));
    let v6 = common::free_port();
    let v6_map = format!("[::1]:{v6}:7000");
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--name",
            "p",
            "-P",
            "-p",
            "127.0.0.1::7000",
            "-p",
            &v6_map,
            "echo",
        ],
    ));
    let listed = ok(&vmc(h, &["port", "p"]));
    let lines: Vec<&str> = listed.lines().collect();
    // -P: the image's EXPOSEd 7000/tcp and 7001/udp, and the two -p.
    assert_eq!(lines.len(), 4, "{listed}");
    assert!(
        lines.iter().any(|l| l.starts_with("7001/udp -> 0.0.0.0:")),
        "{listed}"
    );
    let port_of =
        |line: &str| -> std::net::SocketAddr { line.rsplit(' ').next().unwrap().parse().unwrap() };
    let loopback = port_of(lines[0]);
    assert!(lines[0].starts_with("7000/tcp -> 127.0.0.1:"), "{listed}");
    assert_ne!(loopback.port(), 0);
    assert_eq!(lines[1], format!("7000/tcp -> [::1]:{v6}"));
    let published_all = lines
        .iter()
        .find(|l| l.starts_with("7000/tcp -> 0.0.0.0:"))
        .unwrap_or_else(|| panic!("-P: {listed}"));
    let all = port_of(published_all);
    assert_ne!(all.port(), loopback.port());
    let targets = [
        loopback,
        format!("[::1]:{v6}").parse().unwrap(),
        format!("127.0.0.1:{}", all.port()).parse().unwrap(),
    ];
    for addr in targets {
        let back = common::eventually(&format!("an echo through {addr}"), || {
            echo_at(addr, b"ping")
        });
        assert_eq!(back, b"ping", "{addr}");
    }
    let ps = ok(&vmc(h, &["ps", "--format", "{{.Ports}}"]));
    assert!(ps.contains(&format!("{loopback}->7000/tcp")), "{ps}");
    ok(&vmc(h, &["rm", "-f", "p"]));
    // A range: as many host ports as container ports, or an error.
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "-p",
            "8000-8001:80",
            "busybox",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("the host range and the container range are of different lengths"),
        "{}",
        stderr(&o)
    );
}

/// `vmc rename`: the new name is the container's for every verb and stays
/// after its supervisor records the exit; the old one is free again; a
/// taken or malformed name is refused.
#[test]
fn rename_gives_a_container_a_new_name_for_good() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    for n in ["first", "other"] {
        ok(&vmc(
            h,
            &[
                "run", "-d", "--mode", "ns", "--name", n, "busybox", "sleep", "1000",
            ],
        ));
    }
    ok(&vmc(h, &["rename", "first", "second"]));
    assert_eq!(ok(&vmc(h, &["exec", "second", "echo", "hi"])), "hi\n");
    assert!(!vmc(h, &["exec", "first", "true"]).status.success());
    let o = vmc(h, &["rename", "second", "other"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("already in use"), "{}", stderr(&o));
    let o = vmc(h, &["rename", "second", "bad/name"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("use letters"), "{}", stderr(&o));
    ok(&vmc(h, &["stop", "-t", "1", "second"]));
    assert_eq!(
        ok(&vmc(
            h,
            &[
                "ps",
                "-a",
                "--filter",
                "name=second",
                "--format",
                "{{.Names}} {{.State}}"
            ]
        )),
        "second exited\n"
    );
    ok(&vmc(
        h,
        &[
            "run", "--rm", "--mode", "ns", "--name", "first", "busybox", "true",
        ],
    ));
    ok(&vmc(h, &["rm", "-f", "second", "other"]));
}
