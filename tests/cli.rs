//! The `vmc` command line end to end: real boots for stdio, exit codes and
//! signals; bad input checked before anything boots.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{kernel, kvm_available, rootfs, vmc_command as vmc};

fn containers_left(home: &Path) -> usize {
    std::fs::read_dir(home.join("containers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn run_pipes_stdin_separates_output_and_returns_the_exit_code() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let mut child = vmc(home.path())
        .args(["run", "--rm", "--rootfs"])
        .arg(rootfs())
        .args(["--", "sh", "-c", "cat; echo to-stderr >&2; exit 7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(containers_left(home.path()), 0, "--rm leaves no state");
}

/// The first form's flags through the binary: `--cpus` and `--memory`
/// size the VM (the size tests/vm.rs uses, so its snapshot serves), the
/// workload is PID 1 (its own SIGKILL does not end it), a command killed by
/// SIGKILL is 137, a missing command 127 with Docker's message on stderr.
#[test]
fn cpus_memory_and_exit_codes_through_the_binary() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = vmc(home.path())
        .args(["run", "--rm", "--cpus", "2", "--memory", "512M", "--rootfs"])
        .arg(rootfs())
        .args([
            "--",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; \
             kill -9 $$; echo survived; sh -c 'kill -9 $$'; exit $?",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"2"), "{out:?}");
    let kib: u64 = lines.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
    assert!((400_000..=524_288).contains(&kib), "MemTotal {kib} kB");
    // PID 1 of the container's PID namespace ignores a SIGKILL from inside
    // it (as in Docker); its child is killed, and the shell exits as it did.
    assert_eq!(lines.get(2), Some(&"survived"), "{out:?}");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let out = vmc(home.path())
        .args(["run", "--rm", "--cpus", "2", "--memory", "512M", "--rootfs"])
        .arg(rootfs())
        .args(["--", "no-such-command"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exec: \"no-such-command\": executable file not found in $PATH"),
        "{err}"
    );
    assert_eq!(containers_left(home.path()), 0);
}

/// `--debug` boots cold with the kernel's console on stderr (the only
/// way to see a guest that does not come up); `--cold` without it boots
/// quietly. One cold boot each (tens of seconds under kvm_pvm).
#[test]
fn debug_shows_the_kernel_console_and_cold_boots_quietly() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    for (flag, console) in [("--debug", true), ("--cold", false)] {
        let out = vmc(home.path())
            .args(["run", "--rm", flag, "--rootfs"])
            .arg(rootfs())
            .args(["--", "echo", "up"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n", "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains("Linux version"), console, "{flag}: {err}");
    }
}

#[test]
fn sigterm_to_vmc_reaches_the_workload() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let mut child = vmc(home.path())
        .args(["run", "--rm", "--rootfs"])
        .arg(rootfs())
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(lines.next().unwrap().unwrap(), "got TERM");
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

/// Runs vmc expecting a one-line error that mentions `needle`.
fn expect_error(home: &Path, args: &[&str], needle: &str) {
    let out = vmc(home).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_one_line_error() {
    let home = tempfile::tempdir().unwrap();
    let r = rootfs();
    let r = r.to_str().unwrap();
    expect_error(
        home.path(),
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--rootfs",
            r,
            "--",
            "true",
        ],
        "no guest kernel at /nonexistent/vmlinux",
    );
    expect_error(
        home.path(),
        &[
            "run",
            "--kernel",
            "/etc/passwd",
            "--rootfs",
            r,
            "--",
            "true",
        ],
        "/etc/passwd is not a Linux kernel",
    );
    expect_error(
        home.path(),
        &["run", "--rootfs", "/nonexistent/rootfs", "--", "true"],
        "--rootfs /nonexistent/rootfs: no such directory",
    );
    expect_error(
        home.path(),
        &["run", "--memory", "0", "--rootfs", r, "--", "true"],
        "--memory 0",
    );
    expect_error(
        home.path(),
        &["run", "--cpus", "0", "--rootfs", r, "--", "true"],
        "--cpus",
    );
    expect_error(
        home.path(),
        &["run", "--memory", "12q", "--rootfs", r, "--", "true"],
        "unknown unit",
    );
    assert_eq!(
        containers_left(home.path()),
        0,
        "failed runs leave no state"
    );
}

/// A Docker flag vmc does not have is named as Docker names it, exit 125,
/// before anything runs: never read as the image (`no such image: -v`).
#[test]
fn unknown_docker_flags_are_named() {
    let home = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (
            &["run", "--device", "/dev/sda", "busybox", "true"][..],
            "--device",
        ),
        (&["run", "--rm", "--gpus=all", "busybox"], "--gpus"),
        (&["create", "--ipc", "host", "busybox"], "--ipc"),
        (&["run", "-d", "--privileged", "busybox"], "--privileged"),
        (&["exec", "--detach-keys", "x", "c", "ls"], "--detach-keys"),
        (&["build", "--squash", "."], "--squash"),
    ] {
        let out = vmc(home.path()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("vmc: unknown flag: {flag}\n"),
            "{args:?}"
        );
    }
    assert_eq!(containers_left(home.path()), 0);
}

/// An unprivileged user without access to /dev/kvm gets one line naming it.
/// The user is `nobody`, and /dev/kvm is a 0600 root-owned node (bound over
/// the real one in a mount namespace of the child's own), so that the test
/// runs the same on hosts whose /dev/kvm is world-accessible.
#[test]
fn no_access_to_dev_kvm_is_named() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vmc::testing::skip("needs root (to drop to an unprivileged user)");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        vmc::testing::skip("no /dev/kvm on this machine");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let dev = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", home.path())
        .arg("run")
        .arg("--kernel")
        .arg(kernel())
        .arg("--rootfs")
        .arg(rootfs())
        .args(["--", "true"]);
    common::device_over(&mut cmd, dev.path(), c"/dev/kvm", (10, 232), 0o600);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("no permission to open /dev/kvm"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn version_and_help_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vmc "));
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "--rootfs",
        "--cpus",
        "--memory",
        "--kernel",
        "--debug",
        "--rm",
        "exit code",
    ] {
        assert!(help.contains(needle), "run --help lacks {needle}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .arg("help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for verb in ["run", "build", "exec", "logs", "bench", "system"] {
        assert!(help.contains(verb), "vmc help lacks {verb}: {help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .arg("info")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("backend: "));
}

/// `vmc system prune` removes what no run can use (a snapshot without its
/// inputs recorded, an old agent disk) and `--all` everything; the store's
/// images are not touched.
#[test]
fn system_prune_removes_stale_snapshots() {
    let home = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let prune = |args: &[&str]| -> String {
        let o = vmc(home.path())
            .env("VMC_SNAPSHOTS", snaps.path())
            .args(["system", "prune"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let old = snaps.path().join("0123456789abcdef0123");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("memory.img"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(snaps.path().join("0123456789abcdef0123.lock"), b"").unwrap();
    let cache = home.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("agent-0000000000000000.erofs"), b"old").unwrap();
    // Agent disks being made: by a live process (this test's), kept; by a
    // dead one, removed.
    let live = format!(".agent-0000000000000000.{}.abcd.erofs", std::process::id());
    std::fs::write(cache.join(&live), b"").unwrap();
    std::fs::write(
        cache.join(".agent-0000000000000000.999999999.ef.erofs"),
        b"",
    )
    .unwrap();
    let out = prune(&[]);
    assert!(
        out.starts_with("removed 1 snapshot(s) (1.0 MiB) and 2 cached agent disk(s)"),
        "{out}"
    );
    assert!(cache.join(&live).exists());
    assert_eq!(std::fs::read_dir(snaps.path()).unwrap().count(), 0);
    assert!(!cache.join("agent-0000000000000000.erofs").exists());

    // A snapshot and an agent disk of the current kernel, agent and build:
    // kept by prune, removed by prune --all.
    let agent = vmc::disk::agent_disk_path(&vmc::assets::guest_binary().unwrap(), &cache).unwrap();
    std::fs::write(&agent, b"current").unwrap();
    let k = kernel();
    let spec = vmc::runtime::snapshot::SnapshotSpec {
        kernel: &k,
        agent_disk: &agent,
        cpus: 1,
        memory: 256 << 20,
        backend: vmc::vmm::Backend::host(),
    };
    let current = snaps.path().join(spec.key());
    std::fs::create_dir_all(&current).unwrap();
    std::fs::write(
        current.join(vmc::runtime::snapshot::SPEC_FILE),
        spec.describe(),
    )
    .unwrap();
    let out = prune(&[]);
    assert!(
        out.starts_with("removed 0 snapshot(s) (0.0 MiB) and 0 cached agent disk(s)"),
        "{out}"
    );
    assert!(current.is_dir() && agent.is_file(), "current ones kept");
    let out = prune(&["--all"]);
    assert!(
        out.starts_with("removed 1 snapshot(s)") && out.contains("and 1 cached agent disk(s)"),
        "{out}"
    );
    assert!(!current.exists() && !agent.exists(), "--all removed them");
    assert!(
        cache.join(&live).exists(),
        "a disk being made is kept even by --all"
    );
}

/// The phase lines of a `--timings` table on stderr, by name.
fn timing_phases(stderr: &str) -> Vec<String> {
    let table = stderr
        .split_once("vmc: timings\n")
        .unwrap_or_else(|| panic!("no timings table: {stderr}"))
        .1;
    table
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with(' '))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len().saturating_sub(2)].join(" ")
        })
        .collect()
}

#[test]
fn timings_show_where_a_run_and_an_exec_spend_their_time_in_both_modes() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let json = home.path().join("timings.json");
    for mode in ["vm", "ns"] {
        let out = vmc(home.path())
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--timings",
                "--mode",
                mode,
            ])
            .arg("--rootfs")
            .arg(rootfs())
            .args(["--", "echo", "up"])
            .env("VMC_TIMINGS", &json)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n", "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        let phases = timing_phases(&err);
        let want: &[&str] = match mode {
            "vm" => &[
                "prepare",
                "disks",
                "agent connect",
                "mount",
                "start",
                "first output",
                "exit",
            ],
            _ => &["prepare", "mount", "start", "exit"],
        };
        for p in want {
            assert!(phases.iter().any(|x| x == p), "{mode}: no phase {p}: {err}");
        }
        if mode == "vm" {
            // The agent's own steps, under the phase they belong to.
            assert!(phases.iter().any(|x| x.starts_with("vmm ")), "{err}");
            assert!(err.contains("in the guest: thread "), "{err}");
            assert!(err.contains("overlay "), "{err}");
            assert!(err.contains("fork+exec "), "{err}");
        }
        // VMC_TIMINGS: the same phases as JSON, for the bench.
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let names: Vec<&str> = doc["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"mount"), "{mode}: {doc}");
        if mode == "vm" {
            assert!(names.contains(&"mount/overlay"), "{doc}");
        }
        assert!(doc["total_ms"].as_f64().unwrap() > 0.0, "{doc}");
        std::fs::remove_file(&json).unwrap();

        // vmc exec --timings in a running container.
        let name = format!("timed-{mode}");
        let out = vmc(home.path())
            .args([
                "run",
                "-d",
                "--network",
                "none",
                "--mode",
                mode,
                "--name",
                &name,
            ])
            .arg("--rootfs")
            .arg(rootfs())
            .args(["--", "sleep", "1000"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {out:?}");
        let out = vmc(home.path())
            .args(["exec", "--timings", &name, "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {out:?}");
        let phases = timing_phases(&String::from_utf8_lossy(&out.stderr));
        assert!(phases.iter().any(|p| p == "exit"), "{mode}: {phases:?}");
        if mode == "vm" {
            assert!(phases.iter().any(|p| p == "agent connect"), "{phases:?}");
            assert!(phases.iter().any(|p| p == "start"), "{phases:?}");
        }
        let rm = vmc(home.path()).args(["rm", "-f", &name]).output().unwrap();
        assert!(rm.status.success(), "{rm:?}");
    }
    // A detached run has no one to print them to.
    let out = vmc(home.path())
        .args(["run", "-d", "--timings", "--rootfs"])
        .arg(rootfs())
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--timings reports an attached run"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `--rm`: the container's writable layer is a tmpfs in the guest's memory
/// (at most half of it); a kept container writes to its 2 GiB disk.
#[test]
fn an_rm_containers_writable_layer_is_in_memory_and_a_kept_ones_on_its_disk() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    for rm in [true, false] {
        let mut cmd = vmc(home.path());
        cmd.args(["run", "--network", "none", "--memory", "256m"]);
        if rm {
            cmd.arg("--rm");
        }
        let out = cmd
            .arg("--rootfs")
            .arg(rootfs())
            .args(["--", "df", "-k", "/"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let kib: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("df: {text}"));
        if rm {
            assert!(kib <= 128 * 1024, "--rm: {kib} KiB: {text}");
        } else {
            assert!(kib > 1024 * 1024, "kept: {kib} KiB: {text}");
        }
    }
    assert_eq!(containers_left(home.path()), 1);
}

/// Waits until the ready snapshot of an image of the store `home` is made
/// under `ready` by the background process a run started (`vmc
/// __make-ready`), for as long as such a process lives; fails with the
/// reason it recorded if it failed.
fn wait_for_ready_snapshot(ready: &Path, home: &Path) {
    let home = home.display().to_string();
    let made = || {
        std::fs::read_dir(ready).ok()?.flatten().find_map(|e| {
            // Not a maker's work in progress (`.KEY.tmp.*`): published.
            if e.file_name().to_string_lossy().starts_with('.') {
                return None;
            }
            let spec = std::fs::read_to_string(e.path().join("spec.txt")).ok()?;
            (spec.contains(&home) && e.path().join("state.bin").is_file()).then_some(())
        })
    };
    let mut idle_checks = 0;
    while made().is_none() {
        if !vmc::runtime::snapshot::makers_running() {
            idle_checks += 1;
            assert!(
                idle_checks < 3,
                "no ready snapshot was made; recorded failures: {:?}",
                std::fs::read_dir(ready)
                    .map(|d| d
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".failed"))
                        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            );
        } else {
            idle_checks = 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// An image that arrives in the store gets its ready snapshot made in the
/// background: its first `--rm` run restores it, and only sets the root up.
#[test]
fn an_imported_image_is_ready_for_its_first_run() {
    if !kvm_available() {
        return;
    }
    let home = common::TestHome::new();
    let tar = common::busybox_tar(&home.path().join("busybox.tar"));
    let o = vmc(home.path())
        .args(["import", tar.to_str().unwrap(), "fresh"])
        .env("VMC_READY_SNAPSHOTS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    wait_for_ready_snapshot(&common::snapshots().join("ready"), home.path());
    let o = vmc(home.path())
        .args(["run", "--rm", "--network", "none", "--timings", "fresh"])
        .args(["echo", "first"])
        .env("VMC_READY_SNAPSHOTS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "first\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("overlay "), "{err}");
    assert!(err.contains("in the guest: etc files "), "{err}");
}

/// A microVM container's first start takes its executable and user from
/// the image's lookup index, made with its disk: the agent reads nothing to
/// find them. What the index cannot answer (a missing command) and `vmc
/// exec` (the container may have changed its files) are looked up in the
/// guest, as before.
#[test]
fn a_first_start_is_resolved_from_the_images_index_and_an_exec_in_the_guest() {
    if !kvm_available() {
        return;
    }
    let home = common::store_with_busybox();
    let run = |args: &[&str]| {
        vmc(home.path())
            .args(["run", "--rm", "--network", "none", "--timings"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&["-u", "nobody", "busybox", "id"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in the guest: resolved ahead "), "{err}");
    let o = run(&["busybox", "nosuch"]);
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exec: \"nosuch\": executable file not found in $PATH"),
        "{err}"
    );
    assert!(!err.contains("resolved ahead"), "{err}");

    let o = vmc(home.path())
        .args(["run", "-d", "--network", "none", "--name", "looked-up"])
        .args(["busybox", "sleep", "1000"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let o = vmc(home.path())
        .args(["exec", "--timings", "-u", "nobody", "looked-up", "id", "-u"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "65534\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in the guest: resolve "), "{err}");
    let rm = vmc(home.path())
        .args(["rm", "-f", "looked-up"])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{rm:?}");
}

/// `--start=parked`: the first run has its process parked in a snapshot
/// (made in the background), exec'd and stopped at its entry; later runs
/// of the same command restore it and let it run. Its stdin, output and
/// exit code come through as in any run, and, as the README says, the
/// restored copies share the process's ASLR layout (here the vDSO's
/// address in its auxv), which fresh starts do not.
#[test]
fn parked_starts_run_the_parked_process_whose_copies_share_its_layout() {
    if !kvm_available() {
        return;
    }
    let home = common::store_with_busybox();
    let script = "read line; echo \"got $line\"; od -An -tx8 /proc/$$/auxv | head -1; exit 3";
    let run = |parked: bool| {
        let mut c = vmc(home.path());
        c.args(["run", "--rm", "-i", "--network", "none", "--timings"]);
        if parked {
            c.arg("--start=parked");
        }
        let mut child = c
            .args(["busybox", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        assert_eq!(lines[0], "got hello");
        (
            lines[1].to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No parked snapshot yet: started fresh, and one is made.
    let (_, first) = run(true);
    assert!(!first.contains("in the guest: resume"), "{first}");
    wait_for_ready_snapshot(&common::snapshots().join("ready"), home.path());
    let (auxv1, second) = run(true);
    let (auxv2, third) = run(true);
    for err in [&second, &third] {
        assert!(err.contains("in the guest: resume"), "{err}");
    }
    assert_eq!(auxv1, auxv2, "parked copies share the process's layout");
    let (fresh1, _) = run(false);
    let (fresh2, _) = run(false);
    assert_ne!(fresh1, fresh2, "fresh starts get their own layout");

    let o = vmc(home.path())
        .args(["run", "--start=parked", "busybox", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--start=parked is for a --rm run"), "{err}");
}

/// `--rm` runs of an image: the first marks it, the second leaves the making
/// of its ready snapshot (root mounted) to a background process once it is
/// over, and from then on runs restore that and only set the container up.
/// Each restored run is its own container: its hostname and /etc/hosts,
/// nothing written by an earlier run, its own randomness.
#[test]
fn rm_runs_of_an_image_restore_its_ready_snapshot_each_as_its_own_container() {
    if !kvm_available() {
        return;
    }
    let home = common::store_with_busybox();
    let script = "cat /etc/hostname; grep db /etc/hosts; ls /mine 2>/dev/null || echo clean; \
                  touch /mine; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo";
    let run = |n: usize| {
        let out = vmc(home.path())
            .args(["run", "--rm", "--network", "none", "--timings"])
            .args(["--hostname", &format!("run{n}")])
            .args(["--add-host", &format!("db:10.0.0.{n}")])
            .args(["busybox", "sh", "-c", script])
            .env("VMC_READY_SNAPSHOTS", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "run {n}: {out:?}");
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(lines.len(), 4, "run {n}: {lines:?}");
        assert_eq!(lines[0], format!("run{n}"));
        assert_eq!(lines[1], format!("10.0.0.{n}\tdb"));
        assert_eq!(lines[2], "clean", "run {n} sees an earlier run's file");
        (
            lines[3].clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, first) = run(1);
    let (_, second) = run(2);
    let ready = common::snapshots().join("ready");
    wait_for_ready_snapshot(&ready, home.path());
    let (random3, third) = run(3);
    let (random4, fourth) = run(4);
    // The first two mount the root; the later ones restore the ready
    // snapshot and only set the root up.
    for err in [&first, &second] {
        assert!(err.contains("overlay "), "{err}");
    }
    for err in [&third, &fourth] {
        assert!(!err.contains("overlay "), "{err}");
        assert!(err.contains("in the guest: etc files "), "{err}");
    }
    assert_ne!(
        random3, random4,
        "two restores of one snapshot share randomness"
    );
}
