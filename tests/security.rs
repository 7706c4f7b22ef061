//! Regression tests for the escapes of issue 16, each tried as a hostile
//! image, container or caller would try it: every test here failed before
//! its fix.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};

use common::{is_root, kvm_available, ok, store_with_busybox, vmc, vmc_command};

/// The output of `sh -c script` in a namespace container of `image` without
/// a network, run with the `extra` options; it must succeed.
fn ns_sh(home: &Path, extra: &[&str], image: &str, script: &str) -> String {
    let mut args = vec!["run", "--rm", "--mode", "ns", "--network", "none"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "sh", "-c", script]);
    ok(&vmc(home, &args))
}

/// Every process holding a descriptor to `path`, as "PID (COMMAND)", but
/// this test binary (and its children forked by other tests that have not
/// exec'd yet: they still hold this binary's descriptors until exec).
fn holders_of(path: &Path) -> Vec<String> {
    let me = std::process::id().to_string();
    let this_binary = std::env::current_exe().unwrap();
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        if std::fs::read_link(p.path().join("exe")).is_ok_and(|e| e == this_binary) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == path))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    found
}

/// vmc run with the directory `dir` open as descriptor 7 (not
/// close-on-exec), as `(exec 7</some/dir; vmc run ...)` in a shell leaves it.
fn with_fd7(home: &Path, dir: &std::fs::File, args: &[&str]) -> Output {
    let fd = dir.as_raw_fd();
    let mut cmd = vmc_command(home);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: dup2 only, between fork and exec; dup2 clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Issue 16, 7: a descriptor the caller left open reached the container
/// (`/proc/self/fd/7/shadow` printed the host's /etc/shadow). Now nothing
/// but stdio reaches the workload, the detached supervisor or the VMM.
#[test]
fn descriptors_inherited_by_vmc_reach_no_container_supervisor_or_vmm() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("secret"), "host secret\n").unwrap();
    let dir = std::fs::File::open(secret.path()).unwrap();
    let o = with_fd7(
        h,
        &dir,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--network",
            "none",
            "busybox",
            "sh",
            "-c",
            "cat /proc/self/fd/7/secret 2>/dev/null || echo no-fd-7",
        ],
    );
    assert_eq!(
        ok(&o),
        "no-fd-7\n",
        "descriptor 7 of vmc's caller was open in the container"
    );
    let mut modes = vec!["ns"];
    if kvm_available() {
        modes.push("vm");
    }
    for mode in modes {
        let name = format!("held-{mode}");
        ok(&with_fd7(
            h,
            &dir,
            &[
                "run",
                "-d",
                "--mode",
                mode,
                "--network",
                "none",
                "--name",
                &name,
                "busybox",
                "sleep",
                "1000",
            ],
        ));
        // The container is up (its supervisor, and in VM mode the VMM, run).
        let ps = ok(&vmc(h, &["ps"]));
        assert!(ps.contains(&name), "{mode}: {name} is not running: {ps}");
        let holders = holders_of(secret.path());
        assert!(
            holders.is_empty(),
            "{mode}: processes holding the caller's descriptor: {holders:?}"
        );
        ok(&vmc(h, &["rm", "-f", &name]));
    }
}

/// Issue 16, 4 and 12: a one-entry layer `.wh...` (a whiteout whose name
/// resolves to `..`) emptied `cache/layers/` for every image when a
/// container first used it. It is refused at import now, with one line,
/// and the store is as it was.
#[test]
fn a_whiteout_of_its_parent_directory_is_refused_at_import_and_deletes_nothing() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    // busybox's layer unpacked in the cache, as a first run leaves it.
    ok(&vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            "ns",
            "--network",
            "none",
            "busybox",
            "true",
        ],
    ));
    let store = |h: &Path| {
        let mut v = common::tree_fingerprint(&h.join("cache"));
        v.extend(common::tree_fingerprint(&h.join("blobs")));
        v
    };
    let before = store(h);
    assert!(
        before.iter().any(|l| l.starts_with("layers/")),
        "the layer cache is populated: {before:?}"
    );
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join(".wh..."), "").unwrap();
    let tar = src.path().join("hostile.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(src.path())
        .args(["-cf"])
        .arg(&tar)
        .arg(".wh...")
        .status()
        .unwrap();
    assert!(st.success());
    let o = vmc(h, &["import", tar.to_str().unwrap(), "hostile"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(".wh...") && err.contains("whiteout") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(
        store(h),
        before,
        "the store and its layer cache are as they were"
    );
    assert!(!ok(&vmc(h, &["images"])).contains("hostile"));
    assert_eq!(
        ok(&vmc(
            h,
            &[
                "run",
                "--rm",
                "--mode",
                "ns",
                "--network",
                "none",
                "busybox",
                "echo",
                "ok"
            ]
        )),
        "ok\n"
    );
}

/// Issue 16, 6: an image whose `/etc` is a symlink to a host directory made
/// vmc (root, before pivot_root) create `hosts`, `hostname` and
/// `resolv.conf` in that host directory. Every step preparing the root now
/// resolves inside it.
#[test]
fn an_image_symlink_never_leads_root_preparation_onto_the_host() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let host_dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let sh = |script: &str| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    // Two images: one whose /etc links to the host directory, one whose
    // /dev and /proc do.
    for (name, linked) in [("etc", "etc"), ("dev", "dev proc")] {
        let r = src.path().join(name);
        sh(&format!(
            "cp -a {rootfs} {r} && cd {r} && for l in {linked}; do rm -rf $l; ln -s {host} $l; done && \
             tar -C {r} -cf {r}.tar .",
            rootfs = common::rootfs().display(),
            r = r.display(),
            host = host_dir.path().display(),
        ));
        ok(&vmc(h, &["import", &format!("{}.tar", r.display()), name]));
    }
    let host_files = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(host_dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect()
    };
    for network in ["none", "passt"] {
        let run = |image: &str| {
            vmc(
                h,
                &[
                    "run",
                    "--rm",
                    "--mode",
                    "ns",
                    "--network",
                    network,
                    image,
                    "sh",
                    "-c",
                    "cat /etc/hostname 2>/dev/null; echo rc=$?",
                ],
            )
        };
        // The container runs; its /etc is a dangling link inside its root,
        // so it has no hostname file (none is bound through the link).
        assert_eq!(ok(&run("etc")), "rc=1\n", "--network {network}");
        assert!(
            host_files().is_empty(),
            "--network {network}: vmc wrote through the image's /etc link: {:?}",
            host_files()
        );
        // A /dev or /proc that is not a directory of the root is refused.
        let o = run("dev");
        assert_eq!(o.status.code(), Some(125), "{o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("failed to isolate the container"), "{err}");
        assert!(
            host_files().is_empty(),
            "--network {network}: {:?}",
            host_files()
        );
    }
}

/// Issue 16, 1: `mknod /tmp/k c 10 232; exec 3<>/tmp/k` opened the host's
/// /dev/kvm from a namespace container (and `c 4 0` the host console). A
/// container may still make nodes (CAP_MKNOD, as in Docker), but opens only
/// those of Docker's allow-list: the devices cgroup denies the rest, and
/// the root, /dev and /dev/shm are mounted nodev. `vmc exec` runs under the
/// same rules (it joins the container's cgroups).
#[test]
fn a_namespace_container_cannot_open_host_devices_it_makes() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    // For each node: made, then opened for reading and for writing.
    let probe = "for spec in 'c 10 232' 'c 4 0' 'c 7 0' 'c 10 237' 'b 7 0' 'c 1 1'; do \
                   for d in /tmp /dev /dev/shm; do \
                     rm -f $d/n; mknod $d/n $spec 2>/dev/null || { echo \"$spec $d nomknod\"; continue; }; \
                     (exec 3<$d/n) 2>/dev/null && echo \"$spec $d READ\"; \
                     (exec 3>$d/n) 2>/dev/null && echo \"$spec $d WRITE\"; \
                   done; \
                 done; \
                 head -c 4 /dev/zero | wc -c; echo hi > /dev/null && echo null-ok";
    let out = ns_sh(h, &[], "busybox", probe);
    assert!(
        !out.contains("READ") && !out.contains("WRITE"),
        "host devices opened from a container: {out}"
    );
    assert!(
        !out.contains("nomknod"),
        "mknod is allowed, as in Docker: {out}"
    );
    assert!(
        out.ends_with("4\nnull-ok\n"),
        "the container's own /dev works: {out}"
    );

    // vmc exec into a running container: the same rules, and its processes
    // count against the container's --pids-limit.
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--pids-limit",
            "10",
            "--name",
            "devs",
            "busybox",
            "sleep",
            "1000",
        ],
    ));
    let out = ok(&vmc(h, &["exec", "devs", "sh", "-c", probe]));
    assert!(
        !out.contains("READ") && !out.contains("WRITE"),
        "host devices opened through vmc exec: {out}"
    );
    // Its processes are in the container's cgroups: at their namespace's
    // root in each hierarchy vmc uses ("/.." would be outside)...
    let cg = ok(&vmc(
        h,
        &[
            "exec",
            "devs",
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo; cat /proc/1/cgroup",
        ],
    ));
    let (exec, init) = cg.split_once("\n\n").unwrap();
    for ctrl in ["pids", "devices"] {
        let line = format!(":{ctrl}:/\n");
        assert!(
            exec.contains(&line) && init.contains(&line),
            "vmc exec outside the container's {ctrl} cgroup: {cg}"
        );
    }
    // ... so they count against its limit: twenty more cannot start.
    let o = vmc(
        h,
        &[
            "exec", "devs", "sh", "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 30 >/dev/null 2>&1 & done",
        ],
    );
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("can't fork"),
        "twenty processes started through vmc exec under --pids-limit 10: {o:?}"
    );
    ok(&vmc(h, &["rm", "-f", "devs"]));
}

/// Issue 16, 3: the store was 0755 all the way down, so any local user could
/// run an image's setuid-root binary from the unpacked layer cache (and open
/// device nodes a container made in its upper directory). The state
/// directory is 0700 now (an existing store is tightened), and the files
/// holding a container's secrets are 0600.
#[test]
fn the_store_and_containers_are_their_users_alone() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return;
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // The home's parent is world-traversable, as /var/lib is.
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = top.path().join("vmc");
    // An image with a setuid-root probe: a copy of the host's id(1), which
    // runs on the host (its loader and libraries are the host's) from the
    // layer cache. (busybox drops set-id privileges for its applets.)
    let src = tempfile::tempdir().unwrap();
    let r = src.path().join("r");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp -a {} {r} && cp /usr/bin/id {r}/bin/suidprobe && chmod 4755 {r}/bin/suidprobe \
             && tar -C {r} -cf {r}.tar .",
            common::rootfs().display(),
            r = r.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    ok(&vmc(
        &h,
        &["import", &format!("{}.tar", r.display()), "suid"],
    ));
    ok(&vmc(
        &h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "-e",
            "TOKEN=s3cret",
            "--name",
            "held",
            "suid",
            "sleep",
            "1000",
        ],
    ));
    // The setuid binary, unpacked in the layer cache, and the container's
    // state: nobody reaches either.
    let probe = std::fs::read_dir(h.join("cache/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/suidprobe"))
        .find(|p| p.exists())
        .expect("the unpacked layer");
    assert_eq!(mode(&probe), 0o4755, "the image's own mode is kept");
    let dir = std::fs::read_dir(h.join("containers"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let as_nobody = |cmd: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
                cmd,
            ])
            .output()
            .unwrap()
    };
    let o = as_nobody(&format!("{} -u", probe.display()));
    assert!(
        !o.status.success() && o.stdout.is_empty(),
        "another user ran the image's setuid binary: {o:?}"
    );
    let o = as_nobody(&format!("cat {}/config.json", dir.display()));
    assert!(
        !o.status.success(),
        "another user read a container's config: {o:?}"
    );
    assert_eq!(mode(&h), 0o700, "a new store");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("config.json")), 0o600);
    assert_eq!(mode(&dir.join("container.log")), 0o600);
    ok(&vmc(&h, &["rm", "-f", "held"]));

    // A store made 0755 by an older vmc is tightened by the next command.
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(&vmc(&h, &["ps"]));
    assert_eq!(mode(&h), 0o700, "an existing store");
    // TestHome's clean-up does not apply to this home: nothing is left.
    assert_eq!(ok(&vmc(&h, &["ps", "-aq"])), "");
}

/// Whether process `pid` runs its binary through a read-only mount
/// (statvfs follows the `/proc/PID/exe` link to the file and its mount).
fn exe_on_read_only_mount(pid: u32) -> bool {
    vmc::runtime::ns::on_read_only_mount(Path::new(&format!("/proc/{pid}/exe")))
}

/// Issue 16, 2 (the CVE-2019-5736 class): a process of a namespace
/// container could reach the host's vmc binary through `/proc/PID/exe` of
/// vmc's child before it execs the workload (or of a `#!/proc/self/exe`
/// workload) and open it for writing once nothing ran it. Every vmc that
/// enters such a container now runs its binary through a read-only bind in
/// a mount namespace of its own: a write through the link fails (EROFS once
/// no process runs it; before, it succeeded), while the host's own view of
/// the binary is unchanged.
#[test]
fn vmc_enters_namespace_containers_from_a_read_only_binary() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
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
            "ro",
            "busybox",
            "sleep",
            "1000",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "ro"]))).unwrap();
    let supervisor = v[0]["State"]["Pid"].as_u64().unwrap() as u32;
    assert!(
        exe_on_read_only_mount(supervisor),
        "the detached supervisor's binary is writable through its /proc/PID/exe"
    );
    // vmc exec's own process, while its workload runs.
    let mut exec = vmc_command(h)
        .args(["exec", "ro", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    common::eventually("vmc exec runs from the read-only binary", || {
        exe_on_read_only_mount(exec.id()).then_some(())
    });
    let _ = exec.kill();
    let _ = exec.wait();
    // The binary itself, seen from the host's mount namespace, is as it was.
    assert!(!exe_on_read_only_mount(std::process::id()));
    assert!(
        !vmc::runtime::ns::on_read_only_mount(Path::new(env!("CARGO_BIN_EXE_vmc"))),
        "the bind is vmc's own, not the host's"
    );
    ok(&vmc(h, &["rm", "-f", "ro"]));
}

/// Issue 16, 11: a `Dockerfile` symlinked out of the context was read, and
/// the host file's first line was printed in the error; a FIFO named
/// Dockerfile hung the build. Both are one-line errors now, naming no
/// content.
#[test]
fn build_inputs_stay_in_the_context() {
    let home = common::TestHome::new();
    let h = home.path();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "TOP-SECRET-LINE\n").unwrap();
    let ctx = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(host.path().join("secret"), ctx.path().join("Dockerfile")).unwrap();
    let build = || {
        vmc(
            h,
            &[
                "build",
                "--mode",
                "ns",
                "-t",
                "x",
                ctx.path().to_str().unwrap(),
            ],
        )
    };
    let o = build();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed build, as docker build: {o:?}"
    );
    assert!(!err.contains("TOP-SECRET"), "a host file was read: {err}");
    assert!(err.contains("no such file in the build context"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::remove_file(ctx.path().join("Dockerfile")).unwrap();
    let c = std::ffi::CString::new(ctx.path().join("Dockerfile").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let o = build();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed build, as docker build: {o:?}"
    );
    assert!(err.contains("not a regular file"), "{err}");
}

/// Issue 16, 8: the default network reached the host's loopback services
/// through the gateway address (passt's and pasta's default mapping), in
/// containers and build steps; Docker's default does not. Now only
/// `--add-host NAME:host-gateway` opens it. Everything runs in a network
/// namespace of the test's own: a veth pair whose default route leads to
/// its other end, where nothing answers (no packet leaves the namespace),
/// and a web server on its 127.0.0.1.
#[test]
fn the_host_loopback_is_reached_only_when_asked_for() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "host-only service\n").unwrap();
    let mut modes = vec!["ns"];
    if kvm_available() {
        modes.push("vm");
    }
    let busybox = common::rootfs().join("bin/busybox");
    let mut script = format!(
        "set -e; ip link set lo up; ip link add d0 type veth peer name d1; \
         ip addr add 10.77.0.2/24 dev d0; ip link set d0 up; ip link set d1 up; \
         ip route add default via 10.77.0.1; \
         {bb} httpd -f -p 127.0.0.1:8080 -h {www} </dev/null >/dev/null 2>&1 & \
         httpd=$!; set +e; ",
        bb = busybox.display(),
        www = www.path().display(),
    );
    for mode in &modes {
        for (label, extra) in [("default", ""), ("opted-in", "--add-host gw:host-gateway")] {
            script.push_str(&format!(
                // (busybox wget -T crashes; timeout bounds it instead.)
                "echo {mode}-{label}: $(\"$0\" run --rm --mode {mode} {extra} busybox \
                 timeout 60 wget -q -O - http://10.77.0.1:8080/index.html 2>&1 | tr -d '\\n'); "
            ));
        }
    }
    // The server goes with the script: it would keep the namespace alive.
    script.push_str("kill $httpd");
    let o = std::process::Command::new("unshare")
        .args([
            "--net",
            "--",
            "sh",
            "-c",
            &script,
            env!("CARGO_BIN_EXE_vmc"),
        ])
        .env("VMC_HOME", h)
        .env("VMC_SNAPSHOTS", common::snapshots())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = ok(&o);
    for mode in &modes {
        let line = |label: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{mode}-{label}:")))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {mode}-{label} line: {out}"))
                .to_string()
        };
        assert_eq!(
            line("opted-in"),
            "host-only service",
            "{mode}: --add-host NAME:host-gateway"
        );
        assert!(
            !line("default").contains("host-only service"),
            "{mode}: the host's loopback service reached without asking: {out}"
        );
    }
}

/// Issue 16, 9: a namespace build's RUN step started 1,200 processes (and
/// took memory and CPU) with nothing to bound it. RUN steps now run under
/// the build's `--pids-limit`, `--memory` and `--cpus` (defaults 1024,
/// 256M, 1), as the build VM is bounded by its memory and vCPUs.
#[test]
fn namespace_build_steps_are_limited() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN for i in $(seq 30); do sleep 2 & done; wait; echo forked-$((10+20))\n",
    )
    .unwrap();
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--mode", "ns", "--network", "none", "--no-cache"];
        args.extend_from_slice(extra);
        args.push(ctx.path().to_str().unwrap());
        vmc(h, &args)
    };
    let o = build(&["--pids-limit", "10"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() && all.contains("can't fork") && !all.contains("forked-30"),
        "thirty processes in a RUN step under --pids-limit 10: {all}"
    );
    // The default limit leaves room for ordinary steps.
    let o = build(&[]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("forked-30"),
        "{o:?}"
    );
    // What the steps write is bounded like a build VM's scratch disk
    // (2 GiB): a step writing more gets ENOSPC and the build fails.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo a-small-step > /small\n\
         RUN dd if=/dev/zero of=/big bs=1M count=2100 && echo wrote-$((2000+100))\n",
    )
    .unwrap();
    let o = build(&[]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            && all.contains("No space left on device")
            && !all.contains("wrote-2100"),
        "a RUN step wrote 2100 MiB: {all}"
    );
    // Its disk is gone with the build.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(h.to_str().unwrap()),
        "a mount of the build is left: {mounts}"
    );
}

/// Issue 16, 5 (in part): `--cap-add` and `--cap-drop` with Docker's rules,
/// in namespace mode; `vmc exec` gets the container's set. In a microVM they
/// are refused with the reason (the guest kernel is the boundary).
#[test]
fn capabilities_are_added_and_dropped_as_in_docker() {
    if !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let cap_eff = "grep CapEff /proc/self/status | cut -f2; chown 1 /etc/passwd 2>/dev/null && echo chown-ok || echo chown-denied";
    let run = |extra: &[&str]| ns_sh(h, extra, "busybox", cap_eff);
    assert_eq!(
        run(&[]),
        "00000000a80425fb\nchown-ok\n",
        "Docker's defaults"
    );
    assert_eq!(
        run(&["--cap-drop", "CHOWN"]),
        "00000000a80425fa\nchown-denied\n"
    );
    assert_eq!(
        run(&["--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE"]),
        "0000000000000400\nchown-denied\n"
    );
    assert_eq!(
        run(&["--cap-add", "SYS_ADMIN"]),
        "00000000a82425fb\nchown-ok\n"
    );
    // vmc exec gets the container's set.
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--cap-drop",
            "ALL",
            "--name",
            "capless",
            "busybox",
            "sleep",
            "1000",
        ],
    ));
    assert_eq!(
        ok(&vmc(h, &["exec", "capless", "sh", "-c", cap_eff])),
        "0000000000000000\nchown-denied\n"
    );
    ok(&vmc(h, &["rm", "-f", "capless"]));
    for (args, want) in [
        (
            vec!["--mode", "ns", "--cap-add", "NOPE"],
            "unknown capability 'NOPE'",
        ),
        (vec!["--cap-drop", "ALL"], "apply to namespace mode"),
    ] {
        let mut all = vec!["run", "--rm"];
        all.extend(args);
        all.extend(["busybox", "true"]);
        let o = vmc(h, &all);
        assert_eq!(o.status.code(), Some(125), "{o:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(want), "{o:?}");
    }
}

/// Issue 16, 5: namespace containers had no seccomp filter: one added a
/// key to the host root's keyring and `unshare -U` worked. Now Docker's
/// default profile applies to containers, `vmc exec` and build steps;
/// `--security-opt seccomp=unconfined` lifts it and `seccomp=FILE.json`
/// replaces it.
#[test]
fn namespace_containers_get_dockers_seccomp_profile() {
    if !is_root() {
        return;
    }
    let home = common::TestHome::new();
    let h = home.path();
    // A static probe that adds a key to its user's keyring (and takes it
    // away again at once if that worked).
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("keyprobe.c"),
        "#include <stdio.h>\n#include <errno.h>\n#include <string.h>\n#include <unistd.h>\n\
         #include <sys/syscall.h>\n\
         int main(void) {\n\
           long k = syscall(SYS_add_key, \"user\", \"vmc-keyprobe\", \"x\", 1, -4);\n\
           if (k < 0) { printf(\"refused: %s\\n\", strerror(errno)); return 0; }\n\
           syscall(SYS_keyctl, 21 /* KEYCTL_INVALIDATE */, k);\n\
           printf(\"added\\n\");\n\
           return 0;\n\
         }\n",
    )
    .unwrap();
    let st = std::process::Command::new("cc")
        .args(["-static", "-O", "-o"])
        .arg(ctx.path().join("keyprobe"))
        .arg(ctx.path().join("keyprobe.c"))
        .status()
        .expect("a C compiler (cc) for the probe");
    assert!(st.success(), "cc -static keyprobe.c");
    std::fs::remove_file(ctx.path().join("keyprobe.c")).unwrap();
    let tar = common::busybox_tar(&h.join("busybox.tar"));
    ok(&vmc(h, &["import", tar.to_str().unwrap(), "busybox"]));
    // The build step itself is filtered, as BuildKit's are.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY keyprobe /bin/\nRUN grep '^Seccomp:' /proc/self/status > /seccomp-in-build\n",
    )
    .unwrap();
    ok(&vmc(
        h,
        &[
            "build",
            "--mode",
            "ns",
            "-t",
            "probe",
            ctx.path().to_str().unwrap(),
        ],
    ));
    let probe = "grep '^Seccomp:' /proc/self/status; cat /seccomp-in-build; keyprobe; \
                 unshare -U true 2>/dev/null && echo unshare-U-ok || echo unshare-U-refused; \
                 linux32 uname -m";
    let run = |extra: &[&str]| ns_sh(h, extra, "probe", probe);
    assert_eq!(
        run(&[]),
        "Seccomp:\t2\nSeccomp:\t2\nrefused: Operation not permitted\nunshare-U-refused\ni686\n",
        "Docker's default profile (personality(PER_LINUX32) is allowed)"
    );
    // Unconfined: the probe works (and cleans up), so the refusal above is
    // the filter's.
    assert_eq!(
        run(&["--security-opt", "seccomp=unconfined"]),
        "Seccomp:\t0\nSeccomp:\t2\nadded\nunshare-U-ok\ni686\n"
    );
    // CAP_SYS_ADMIN brings the namespace calls back, as Docker's profile says.
    assert!(run(&["--cap-add", "SYS_ADMIN"]).contains("unshare-U-ok"));
    // A profile of the user's: everything but mkdir, which fails EACCES.
    let profile = ctx.path().join("nomkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let mkdir = |name: &str| {
        format!("mkdir /x 2>&1 | grep -o 'Permission denied'; touch /y && echo touch-ok; grep '^Seccomp:' /proc/self/status; : {name}")
    };
    let out = ns_sh(h, &["--security-opt", &opt], "probe", &mkdir("run"));
    assert_eq!(out, "Permission denied\ntouch-ok\nSeccomp:\t2\n");
    // vmc exec gets the container's filter (the profile as it was read
    // when the container was made, even if the file changes).
    ok(&vmc(
        h,
        &[
            "run",
            "-d",
            "--mode",
            "ns",
            "--network",
            "none",
            "--security-opt",
            &opt,
            "--name",
            "filtered",
            "probe",
            "sleep",
            "1000",
        ],
    ));
    std::fs::write(&profile, "{}").unwrap();
    let out = ok(&vmc(h, &["exec", "filtered", "sh", "-c", &mkdir("exec")]));
    assert_eq!(out, "Permission denied\ntouch-ok\nSeccomp:\t2\n");
    ok(&vmc(h, &["rm", "-f", "filtered"]));
    // Bad options: one line each, exit 125, nothing made.
    for (args, want) in [
        (
            vec!["--mode", "ns", "--security-opt", opt.as_str()],
            "seccomp profile: not a profile",
        ),
        (
            vec![
                "--mode",
                "ns",
                "--security-opt",
                "seccomp=/nonexistent.json",
            ],
            "seccomp profile /nonexistent.json: No such file",
        ),
        (
            vec!["--mode", "ns", "--security-opt", "apparmor=docker-default"],
            "is not supported",
        ),
        (
            vec!["--security-opt", "seccomp=/etc/hostname"],
            "applies to namespace mode",
        ),
    ] {
        let mut a = vec!["run", "--rm"];
        a.extend(args.iter().copied());
        a.extend(["probe", "true"]);
        let o = vmc(h, &a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{a:?}: {o:?}");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{a:?}: {err}"
        );
    }
    assert_eq!(ok(&vmc(h, &["ps", "-a", "-q"])), "");
}
