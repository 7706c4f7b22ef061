//! `vmc bench`: the report's shape, never its timings. One `--quick` run
//! over every default scenario in ns, vm, crun (when installed) and a peer
//! (chroot into the image root); `--from` and `--compare` on its JSON; an interrupted
//! benchmark removes its sandboxes; bad input fails with one clear line.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_root, kvm_available, ok, store_with_busybox, vmc};

fn bench(home: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["bench"];
    a.extend_from_slice(args);
    vmc(home, &a)
}

fn err_line(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "succeeded: {o:?}");
    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

#[test]
fn quick_report_has_every_scenario_in_every_runtime() {
    if !kvm_available() || !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let crun = Path::new("/usr/bin/crun").exists();
    if !crun {
        vmc::testing::skip(
            "crun is not installed (scripts/deps.sh installs it): its column is not checked",
        );
    }
    let qemu = Path::new("/usr/bin/qemu-system-x86_64").exists();
    if !qemu {
        vmc::testing::skip(
            "qemu-system-x86 is not installed (scripts/deps.sh installs it): the VM peer's column is not checked",
        );
    }
    let (json, md, svg) = (h.join("r.json"), h.join("r.md"), h.join("r.svg"));
    let o = bench(
        h,
        &[
            "--quick",
            // A peer: chroot into the image root with the host's /dev.
            "--peer",
            "chroot=unshare -m sh -c 'mount --rbind /dev \"$VMC_BENCH_ROOTFS/dev\" && exec chroot \"$VMC_BENCH_ROOTFS\" \"$0\" \"$@\"'",
            "--json",
            json.to_str().unwrap(),
            "--markdown",
            md.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
    );
    let stdout = ok(&o);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    // Header: the machine, both kernels, the backend, the version.
    let m = &r["machine"];
    assert!(m["cores"].as_u64().unwrap() >= 1, "{m}");
    for k in ["cpu", "host_kernel", "guest_kernel", "backend"] {
        assert!(!m[k].as_str().unwrap().is_empty(), "{k}: {m}");
    }
    assert_ne!(m["guest_kernel"], "unknown");
    assert_eq!(r["vmc_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r["quick"], true);
    let mut runtimes = vec!["ns", "vm"];
    if crun {
        runtimes.push("crun");
    }
    if qemu {
        runtimes.push("qemu");
    }
    runtimes.push("chroot");
    assert_eq!(r["runtimes"], serde_json::json!(runtimes));

    // No runtime failed anywhere: the only notes are about what crun
    // cannot do or how it was made to run here.
    for n in r["notes"].as_array().unwrap() {
        let n = n.as_str().unwrap();
        assert!(
            n.starts_with("crun: ") || (!qemu && n.starts_with("qemu: not installed")),
            "a failure: {n}"
        );
    }

    // Every scenario has rows; every result is a coherent summary.
    let rows = r["rows"].as_array().unwrap();
    let find = |scenario: &str, metric: &str| {
        rows.iter()
            .find(|x| x["scenario"] == scenario && x["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {scenario}/{metric}: {rows:?}"))
    };
    let has = |row: &serde_json::Value, rts: &[&str]| {
        let res = row["results"].as_object().unwrap();
        let mut got: Vec<&str> = res.keys().map(String::as_str).collect();
        got.sort();
        let mut want = rts.to_vec();
        want.sort();
        assert_eq!(got, want, "{row}");
    };
    let mut long_lived = vec!["ns", "vm"];
    if crun {
        long_lived.push("crun");
    }
    let mut all = long_lived.clone();
    all.push("chroot");
    // The QEMU peer restores its saved guest and has its shell answer.
    let mut starts = all.clone();
    if qemu {
        starts.push("qemu");
    }
    for metric in ["start to first output", "start to exit"] {
        has(find("start", metric), &starts);
    }
    has(find("start", "vm only: start to vCPUs running"), &["vm"]);
    has(find("exec", "exec round trip"), &long_lived);
    has(
        find("memory", "host memory per idle sandbox (PSS)"),
        &long_lived,
    );
    has(
        find("memory", "vm only: VMM overhead (PSS minus guest)"),
        &["vm"],
    );
    has(find("density N=2", "all started"), &long_lived);
    has(find("density N=2", "PSS of all sandboxes"), &long_lived);
    has(find("cpu", "arithmetic loop"), &all);
    has(find("syscall", "time per syscall"), &all);
    has(find("disk", "write + fsync"), &all);
    has(find("disk", "read back (page cache)"), &all);
    for metric in [
        "1 MiB file read, volume",
        "find over the tree, volume",
        "1 MiB file read, own root",
        "find over the tree, own root",
    ] {
        has(find("volume", metric), &long_lived);
    }
    for metric in ["round trip, 1 byte", "host to sandbox", "sandbox to host"] {
        has(find("port", metric), &["ns", "vm"]);
    }
    for metric in [
        "sandbox to host, outbound",
        "round trip, 1 byte, outbound connection",
    ] {
        has(find("net", metric), &["ns", "vm"]);
    }
    has(
        find("vmm", "vm only: tiny PVH guest, start to reset"),
        &["vm"],
    );
    assert!(
        !rows.iter().any(|x| x["scenario"] == "boot"),
        "--quick leaves cold boot out"
    );
    for row in rows {
        for (rt, s) in row["results"].as_object().unwrap() {
            let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{rt} {k}: {row}"));
            assert!(s["n"].as_u64().unwrap() >= 1, "{row}");
            assert!(
                f("min") <= f("median") && f("median") <= f("max") && f("p90") <= f("max"),
                "{rt}: {row}"
            );
            assert!(f("min") >= 0.0, "{row}");
        }
    }
    // Five echoes per run in port and net.
    let port_rtt = &find("port", "round trip, 1 byte")["results"]["vm"];
    assert_eq!(port_rtt["n"], 5);

    // The markdown went to stdout and to the file; the SVG has a bar per
    // result.
    let md = std::fs::read_to_string(&md).unwrap();
    assert_eq!(stdout, md);
    let head = format!(
        "| scenario | metric | unit | n | {} | vm/ns |{}",
        runtimes.join(" | "),
        if qemu { " vm/qemu |" } else { "" }
    );
    assert!(md.contains(&head), "{md}");
    assert!(
        md.contains("backend ") && md.contains("guest kernel "),
        "{md}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    let bars: usize = rows
        .iter()
        .map(|x| x["results"].as_object().unwrap().len())
        .sum();
    assert_eq!(svg.matches("<title>").count(), bars);

    // Nothing left behind: no container, no mount of the image root.
    assert_eq!(ok(&vmc(h, &["ps", "-aq"])).trim(), "");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains("vmc-bench-"), "{mounts}");

    // --from and --compare: the same report compares as unchanged; an older
    // one where vm was twice as slow shows vm better by half.
    let o = bench(
        h,
        &[
            "--from",
            json.to_str().unwrap(),
            "--compare",
            json.to_str().unwrap(),
        ],
    );
    let cmp = ok(&o);
    assert!(cmp.contains("### Changes since"), "{cmp}");
    assert!(
        cmp.contains("| start | start to exit (ms) | ns |") && cmp.contains("+0.0% (same) |"),
        "{cmp}"
    );
    let mut old = r.clone();
    for row in old["rows"].as_array_mut().unwrap() {
        if row["metric"] == "start to exit" {
            let m = row["results"]["vm"]["median"].as_f64().unwrap();
            row["results"]["vm"]["median"] = serde_json::json!(m * 2.0);
        }
    }
    let old_path = h.join("old.json");
    std::fs::write(&old_path, old.to_string()).unwrap();
    let cmp = ok(&bench(
        h,
        &[
            "--from",
            json.to_str().unwrap(),
            "--compare",
            old_path.to_str().unwrap(),
        ],
    ));
    let line = cmp
        .lines()
        .find(|l| l.starts_with("| start | start to exit (ms) | vm |"))
        .unwrap_or_else(|| panic!("{cmp}"));
    assert!(line.ends_with("| -50.0% (better) |"), "{line}");
}

#[test]
fn interrupted_bench_removes_its_sandboxes() {
    if !kvm_available() || !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .env("VMC_SNAPSHOTS", common::snapshots())
        .args(["bench", "--no-crun", "--runs", "1000", "exec"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both idle sandboxes (ns and vm) running.
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let ps = ok(&vmc(h, &["ps", "-q"]));
        if ps.lines().count() == 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the bench never started two sandboxes"
        );
        assert!(child.try_wait().unwrap().is_none(), "the bench ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted, removing its sandboxes"),
        "{out:?}"
    );
    assert_eq!(ok(&vmc(h, &["ps", "-aq"])).trim(), "");
}

#[test]
fn bad_input_is_one_clear_line() {
    let home = store_with_busybox();
    let h = home.path();
    let e = err_line(&bench(h, &["nosuch"]));
    assert!(
        e.contains("unknown scenario 'nosuch'") && e.contains("start, boot"),
        "{e}"
    );
    let e = err_line(&bench(
        h,
        &[
            "--compare",
            "/nonexistent.json",
            "--from",
            "/nonexistent.json",
        ],
    ));
    assert!(
        e.contains("cannot read the benchmark report /nonexistent.json"),
        "{e}"
    );
    let junk = h.join("junk.json");
    std::fs::write(&junk, "{\"not\": \"a report\"}").unwrap();
    let e = err_line(&bench(h, &["--from", junk.to_str().unwrap()]));
    assert!(e.contains("is not a vmc bench JSON report"), "{e}");
    let e = err_line(&bench(h, &["--peer", "vm=true", "start"]));
    assert!(e.contains("invalid --peer name 'vm'"), "{e}");
    let e = err_line(&bench(h, &["--image", "nosuch:latest", "start"]));
    assert!(
        e.contains("image 'nosuch:latest' is not in the store"),
        "{e}"
    );
    // Nothing was started or stored.
    assert_eq!(ok(&vmc(h, &["ps", "-aq"])).trim(), "");
}
