//! Issue 19: the VMM of every VM runs jailed. These tests read what the
//! kernel says of a running VMM (its ids, capabilities, no_new_privs,
//! seccomp state per thread, root, namespaces, cgroups) and make each kind
//! of VMM thread try a forbidden system call through the test-only hook
//! (`VMC_TEST_SECCOMP_PROBE`, compiled into the test build by the
//! `test-hooks` feature): the VMM dies of SIGSYS and vmc says which call in
//! which thread.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{is_root, kvm_available, ok, store_with_busybox, vmc, vmc_command};

/// `Field:` of a /proc status file, its value trimmed.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

#[test]
fn a_running_vmm_is_jailed_unprivileged_without_capabilities_and_filtered_per_thread() {
    if !kvm_available() || !is_root() {
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
            "j",
            "--network",
            "none",
            "busybox",
            "sleep",
            "600",
        ],
    ));
    let inspect: serde_json::Value = serde_json::from_str(&ok(&vmc(h, &["inspect", "j"]))).unwrap();
    let conf = &inspect[0]["VmmConfinement"];
    let pid = conf["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no VMM in {inspect}"));
    let uid = conf["uid"].as_u64().unwrap();
    let proc_dir = format!("/proc/{pid}");

    let status = std::fs::read_to_string(format!("{proc_dir}/status")).unwrap();
    // Real, effective, saved and filesystem uids and gids: the VM's own,
    // not root.
    assert_ne!(uid, 0);
    for name in ["Uid", "Gid"] {
        let ids: Vec<u64> = field(&status, name)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(ids, [uid; 4], "{name} of the VMM: {status}");
    }
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            u64::from_str_radix(&field(&status, caps), 16).unwrap(),
            0,
            "{caps}"
        );
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "Seccomp"), "2");
    // Every thread filtered: the process-wide kill filter and its own.
    for t in std::fs::read_dir(format!("{proc_dir}/task"))
        .unwrap()
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap();
        assert_eq!(field(&s, "Seccomp"), "2", "thread {}", field(&s, "Name"));
        assert!(field(&s, "Seccomp_filters").parse::<u32>().unwrap() >= 2);
        assert_eq!(u64::from_str_radix(&field(&s, "CapEff"), 16).unwrap(), 0);
    }

    // Its root is its per-VM jail: an empty directory; the host's files
    // are not there to open.
    let jail = Path::new(conf["jail"].as_str().unwrap());
    let (root, dir) = (
        std::fs::metadata(format!("{proc_dir}/root/")).unwrap(),
        std::fs::metadata(jail).unwrap(),
    );
    assert_eq!((root.dev(), root.ino()), (dir.dev(), dir.ino()));
    assert_eq!(
        std::fs::read_dir(format!("{proc_dir}/root/"))
            .unwrap()
            .count(),
        0
    );
    for host_file in ["etc/passwd", "proc/self", "dev/kvm", "sys/kernel"] {
        assert!(!Path::new(&format!("{proc_dir}/root/{host_file}")).exists());
    }
    // Its own namespaces.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("{proc_dir}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns} namespace"
        );
    }
    // Its cgroups, with a memory limit of the guest's size and a bounded
    // overhead.
    let cgroups = std::fs::read_to_string(format!("{proc_dir}/cgroup")).unwrap();
    assert!(cgroups.contains("vmc-vmm-"), "{cgroups}");
    let limits = std::fs::read_to_string(format!("{proc_dir}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().any(|w| w == "0"), "{core}");

    // And the container works through it.
    assert_eq!(ok(&vmc(h, &["exec", "j", "echo", "in"])), "in\n");
    let info = ok(&vmc(h, &["info"]));
    assert!(info.contains("vmm: jailed"), "{info}");
    ok(&vmc(h, &["rm", "-f", "j"]));
    assert!(
        !Path::new(&proc_dir).exists(),
        "the VMM outlived its container"
    );
}

#[test]
fn a_forbidden_syscall_in_any_vmm_thread_kills_the_vmm_and_vmc_names_it() {
    if !kvm_available() || !is_root() {
        return;
    }
    let home = store_with_busybox();
    let h = home.path();
    // The warm-start snapshot exists (made by an unprobed run), so that
    // only the probed run's own VMM meets the probe.
    assert_eq!(
        ok(&vmc(
            h,
            &["run", "--rm", "--network", "none", "busybox", "echo", "ok"]
        )),
        "ok\n"
    );
    for (probe, thread) in [("main", "vmm"), ("events", "vmm-events"), ("vcpu", "vcpu0")] {
        let o = vmc_command(h)
            .env("VMC_TEST_SECCOMP_PROBE", probe)
            .args(["run", "--rm", "--network", "none", "busybox", "echo", "no"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{probe}: {err}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("no"));
        let want = format!(
            "the VMM was stopped by its seccomp filter: syscall {} (openat) in thread {thread}",
            libc::SYS_openat
        );
        assert_eq!(err.trim_end(), format!("vmc: {want}"), "{probe}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
