//! One real microVM (2 vCPUs, 512 MiB) serves every check in this file: a Linux
//! boot costs tens of seconds under software virtualisation, a process in a
//! booted guest only seconds.

mod common;

use std::sync::OnceLock;

use common::{kvm_available, rootfs, tree_fingerprint, TestVm};
use vmc::runtime::ProcessSpec;
use vmc_proto::{ExitStatus, StartFailure};

fn vm() -> Option<&'static TestVm> {
    static VM: OnceLock<TestVm> = OnceLock::new();
    // Asked every time, so that each test that cannot run records its skip.
    if !kvm_available() {
        return None;
    }
    Some(VM.get_or_init(|| TestVm::boot(2, 512)))
}

fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        cwd: "/".into(),
        ..Default::default()
    }
}

#[test]
fn stdout_and_stderr_stay_separate_and_exit_codes_propagate() {
    let Some(vm) = vm() else { return };
    let o = vm.sh("echo out; echo err >&2; exit 7");
    assert_eq!(o.stdout_str(), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    assert_eq!(o.status, Ok(ExitStatus::Code(7)));
    assert_eq!(vm.run(spec(&["true"]), None).code(), 0);
}

#[test]
fn a_missing_command_is_127_with_dockers_message() {
    let Some(vm) = vm() else { return };
    let o = vm.run(spec(&["no-such-command", "x"]), None);
    let Err((kind, msg)) = &o.status else {
        panic!("started: {o:?}")
    };
    assert_eq!(*kind, StartFailure::NotFound);
    assert_eq!(o.code(), 127);
    assert!(
        msg.contains("exec: \"no-such-command\": executable file not found in $PATH"),
        "{msg}"
    );
    let o = vm.run(spec(&["/etc/passwd"]), None);
    assert_eq!(o.code(), 126, "{o:?}");
}

#[test]
fn death_by_signal_is_128_plus_the_signal() {
    let Some(vm) = vm() else { return };
    let o = vm.sh("kill -9 $$");
    assert_eq!(o.status, Ok(ExitStatus::Signal(9)));
    assert_eq!(o.code(), 137);
}

#[test]
fn stdin_is_piped_to_the_process() {
    let Some(vm) = vm() else { return };
    let o = vm.run(spec(&["cat"]), Some(b"hello\nworld\n"));
    assert_eq!(o.stdout_str(), "hello\nworld\n");
    assert_eq!(o.code(), 0);
    // Without stdin the process reads end of file at once.
    let o = vm.run(spec(&["cat"]), None);
    assert_eq!((o.stdout.len(), o.code()), (0, 0));
}

#[test]
fn cpus_and_memory_are_what_was_asked() {
    let Some(vm) = vm() else { return };
    assert_eq!(vm.run(spec(&["nproc"]), None).stdout_str(), "2\n");
    let o = vm.sh("grep MemTotal /proc/meminfo");
    let kib: u64 = o
        .stdout_str()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!((400 << 10..=512 << 10).contains(&kib), "MemTotal {kib} kB");
}

#[test]
fn a_mebibyte_of_stdout_arrives_byte_exact() {
    let Some(vm) = vm() else { return };
    let o = vm.run(spec(&["seq", "1", "200000"]), None);
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 1 << 20);
    assert_eq!(o.stdout.len(), expected.len());
    if let Some(i) = o
        .stdout
        .iter()
        .zip(expected.as_bytes())
        .position(|(a, b)| a != b)
    {
        let lo = i.saturating_sub(40);
        panic!(
            "content differs at byte {i}: got {:?}, expected {:?}",
            String::from_utf8_lossy(&o.stdout[lo..(i + 40).min(o.stdout.len())]),
            &expected[lo..(i + 40).min(expected.len())]
        );
    }
    // And the other way: 1 MiB through stdin, hashed in the guest.
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let o = vm.run(spec(&["sha256sum"]), Some(&data));
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        o.stdout_str().split_whitespace().next(),
        Some(want.as_str())
    );
}

#[test]
fn writes_land_in_the_scratch_disk_and_the_rootfs_is_untouched() {
    let Some(vm) = vm() else { return };
    let before = tree_fingerprint(&rootfs());
    let o =
        vm.sh("echo data > /newfile && rm /bin/ls && mkdir -p /var/x && echo y > /var/x/f && sync");
    assert_eq!(o.code(), 0, "{o:?}");
    // A later process in the same container sees the changes.
    let o = vm.sh("cat /newfile /var/x/f; test -e /bin/ls || echo ls-gone");
    assert_eq!(o.stdout_str(), "data\ny\nls-gone\n");
    assert_eq!(
        before,
        tree_fingerprint(&rootfs()),
        "the rootfs directory changed"
    );
    assert!(!rootfs().join("newfile").exists());
}

#[test]
fn user_workdir_env_and_hostname_are_applied() {
    let Some(vm) = vm() else { return };
    let o = vm.run(
        ProcessSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "id -u; id -g; pwd; echo $FOO; hostname".into(),
            ],
            env: vec!["FOO=bar baz".into()],
            cwd: "/tmp/work/dir".into(),
            user: "nobody".into(),
            ..Default::default()
        },
        None,
    );
    assert_eq!(
        o.stdout_str(),
        format!("65534\n65534\n/tmp/work/dir\nbar baz\n{}\n", vm.hostname)
    );
    let o = vm.run(
        ProcessSpec {
            user: "no-such-user".into(),
            ..spec(&["true"])
        },
        None,
    );
    assert!(
        matches!(&o.status, Err((StartFailure::Setup, m)) if m.contains("unable to find user"))
    );
}

#[test]
fn orphans_are_reaped_by_the_agent() {
    let Some(vm) = vm() else { return };
    // The background sleep outlives its shell and is re-parented to PID 1;
    // once it ends, its /proc entry must go (a zombie keeps it, state Z).
    let o = vm.sh("sleep 1 </dev/null >/dev/null 2>&1 & echo $!");
    let pid: u32 = o.stdout_str().trim().parse().expect("the orphan's pid");
    common::eventually(
        &format!("orphan {pid} to be reaped (a zombie stays in /proc)"),
        || {
            let o = vm.sh(&format!("cat /proc/{pid}/stat 2>/dev/null || echo gone"));
            (o.stdout_str().trim() == "gone").then_some(())
        },
    );
}

#[test]
fn the_guest_has_entropy_and_a_loopback_interface() {
    let Some(vm) = vm() else { return };
    let o = vm.sh("cat /sys/class/misc/hw_random/rng_current; head -c 16 /dev/hwrng | wc -c; cat /sys/class/net/lo/operstate");
    assert_eq!(o.stdout_str(), "virtio_rng.0\n16\nunknown\n", "{o:?}");
}

/// What the README says of the machine a container gets: a 2 GiB scratch
/// disk; no serial port (the UART and its driver exist only with
/// `--debug`); and under kvm_pvm's native mode every process
/// is told not to use AVX through `GLIBC_TUNABLES` unless it sets its own
/// (on hardware virtualisation nothing is set), and the guest kernel has
/// ERMS and FSRM hidden (its copies then avoid byte-wise `rep movsb`).
#[test]
fn the_vm_has_the_documented_scratch_disk_uart_and_glibc_tunables() {
    let Some(vm) = vm() else { return };
    let o = vm.sh(
        "for d in /sys/block/vd*; do echo \"${d##*/} $(cat $d/size) $(cat $d/ro)\"; done; \
         grep -c serial /proc/tty/drivers; \
         echo \"fast strings: $(grep -o -w -e erms -e fsrm /proc/cpuinfo | sort -u | tr '\\n' ' ')\"; \
         echo \"[$GLIBC_TUNABLES]\"",
    );
    assert_eq!(o.code(), 0, "{o:?}");
    let out = o.stdout_str();
    assert!(
        out.lines().any(|l| l.ends_with(" 4194304 0")),
        "no writable disk of 2 GiB (4194304 sectors): {out}"
    );
    assert!(
        out.contains("\n0\nfast strings: "),
        "a serial driver without --debug: {out}"
    );
    let tunables = out.lines().last().unwrap_or_default();
    if vmc::vmm::backend::Backend::host().needs_pvm_quirks() {
        assert!(
            tunables.starts_with("[glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX,-AVX2,"),
            "{out}"
        );
        assert!(out.contains("\nfast strings: \n"), "{out}");
    } else {
        assert_eq!(tunables, "[]", "{out}");
    }
    // A process that sets its own keeps it.
    let mut own = spec(&["sh", "-c", "echo \"[$GLIBC_TUNABLES]\""]);
    own.env = vec!["GLIBC_TUNABLES=glibc.malloc.check=0".into()];
    let o = vm.run(own, None);
    assert_eq!(o.stdout_str(), "[glibc.malloc.check=0]\n", "{o:?}");
}
