//! Warm start: guests restored from one snapshot are independent (own disks,
//! own randomness), concurrent first runs build the snapshot once, and a
//! corrupted (state or memory) or mismatched snapshot is refused and rebuilt.

mod common;

use std::path::Path;
use std::process::Command;

use common::{kernel, kvm_available, rootfs, snapshots, TestVm};
use vmc_proto::GuestMsg;

/// A copy of the busybox rootfs with a marker file.
fn marked_rootfs(dir: &Path, marker: &str) -> std::path::PathBuf {
    let out = dir.join(format!("rootfs-{marker}"));
    let st = Command::new("cp")
        .arg("-a")
        .arg(rootfs())
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(out.join("marker"), marker).unwrap();
    out
}

#[test]
fn two_restored_guests_have_their_own_disks_and_randomness() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ra, rb) = (
        marked_rootfs(dir.path(), "A"),
        marked_rootfs(dir.path(), "B"),
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| TestVm::boot_rootfs(&ra, 1, 256));
        let b = s.spawn(|| TestVm::boot_rootfs(&rb, 1, 256));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        a.vm.restored() && b.vm.restored(),
        "both restored from the snapshot"
    );
    let script = "cat /marker; echo; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                  echo written-by-$(cat /marker) > /shared-name; cat /shared-name";
    let (oa, ob) = std::thread::scope(|s| {
        let ja = s.spawn(|| a.sh(script));
        let jb = s.spawn(|| b.sh(script));
        (ja.join().unwrap(), jb.join().unwrap())
    });
    let (la, lb): (Vec<String>, Vec<String>) = (
        oa.stdout_str().lines().map(String::from).collect(),
        ob.stdout_str().lines().map(String::from).collect(),
    );
    assert_eq!(la[0], "A", "{oa:?}");
    assert_eq!(lb[0], "B", "{ob:?}");
    assert_eq!(la[1].len(), 32);
    assert_ne!(la[1], lb[1], "restored guests must not share random state");
    assert_eq!(la[2], "written-by-A");
    assert_eq!(lb[2], "written-by-B");
    // The guest clock was set from the host's at restore.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest: u64 = a.sh("date +%s").stdout_str().trim().parse().unwrap();
    assert!(guest.abs_diff(now) < 60, "guest {guest}, host {now}");
}

fn run_vmc(home: &Path, snaps: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", home)
        .env("VMC_SNAPSHOTS", snaps)
        .args(["run", "--rm", "--rootfs"])
        .arg(rootfs())
        .args(["--", "echo", "ok"])
        .output()
        .unwrap()
}

#[test]
fn first_runs_build_one_snapshot_and_bad_ones_are_rebuilt() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let snaps = home.path().join("snapshots");
    // Two concurrent first runs: one builds, the other waits on the lock.
    let (o1, o2) = std::thread::scope(|s| {
        let a = s.spawn(|| run_vmc(home.path(), &snaps));
        let b = s.spawn(|| run_vmc(home.path(), &snaps));
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&o1, &o2] {
        assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{o:?}");
        assert!(o.status.success());
    }
    let entries: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(entries.len(), 1, "exactly one snapshot, no leftovers");
    let snap = entries[0].path();

    // Corrupt it: the next run warns, rebuilds, and still works.
    let state = snap.join("state.bin");
    let mut data = std::fs::read(&state).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&state, &data).unwrap();
    let o = run_vmc(home.path(), &snaps);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
    assert!(
        err.contains("warm-start snapshot") && err.contains("rebuilding"),
        "{err}"
    );
    assert!(
        vmc::vmm::snapshot::VmState::read(&snap).is_ok(),
        "rebuilt in place"
    );
    assert_eq!(
        std::fs::read_dir(&snaps)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .count(),
        1
    );

    // Corrupt its memory image (one page of the guest kernel's text, at 16
    // MiB): refused by the seal in state.bin, rebuilt, and the run works
    // (restored from that image, the guest would crash or spin).
    use std::os::unix::fs::FileExt;
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snap.join("memory.img"))
        .unwrap();
    let mut page = vec![0u8; 4096];
    memory.read_exact_at(&mut page, 16 << 20).unwrap();
    assert!(page.iter().any(|&b| b != 0), "the kernel is at 16 MiB");
    page.iter_mut().for_each(|b| *b ^= 0xff);
    memory.write_all_at(&page, 16 << 20).unwrap();
    drop(memory);
    let o = run_vmc(home.path(), &snaps);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
    assert!(
        err.contains("memory.img is corrupted") && err.contains("rebuilding"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one warning: {err}");
}

#[test]
fn a_mismatched_snapshot_is_refused_before_anything_runs() {
    if !kvm_available() {
        return;
    }
    // This build's shared snapshot (the store may also hold other builds'
    // snapshots, in formats of their own), presented under a wrong key.
    let (good, _, _) = shared_snapshot();
    let state = vmc::vmm::snapshot::VmState::read(&good).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.erofs");
    std::fs::write(&agent, b"").unwrap();
    let cfg = |vsock: &Path| placeholder_config(dir.path(), &agent, vsock, state.mem_size);
    let err = vmc::vmm::restore(cfg(&dir.path().join("v1")), &good, "some-other-key")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not some-other-key"), "{err}");
    let mut wrong_size = cfg(&dir.path().join("v2"));
    wrong_size.mem_size *= 2;
    let err = vmc::vmm::restore(wrong_size, &good, &state.key)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("MiB"), "{err}");
}

/// The layout of a snapshot's 1-vCPU VM with empty image and scratch disks
/// in `dir` (as when the snapshot was made) and `agent` as its root disk.
fn placeholder_config(dir: &Path, agent: &Path, vsock: &Path, memory: u64) -> vmc::vmm::VmConfig {
    let (img, scratch) = (dir.join("i"), dir.join("s"));
    std::fs::write(&img, b"").unwrap();
    std::fs::write(&scratch, b"").unwrap();
    vmc::runtime::microvm::vm_config(
        &kernel(),
        agent,
        &img,
        &scratch,
        vsock,
        1,
        memory,
        None,
        vmc::runtime::microvm::unplugged().unwrap(),
        None,
    )
}

/// The shared warm-start snapshot of a 1-vCPU, 256 MiB guest, as `vmc run`
/// would restore it: (directory, key, agent disk).
fn shared_snapshot() -> (std::path::PathBuf, String, std::path::PathBuf) {
    let agent = vmc::disk::agent_disk(
        &vmc::assets::guest_binary().unwrap(),
        &vmc::runtime::vmc_home().join("cache"),
    )
    .unwrap();
    let kernel = kernel();
    let spec = vmc::runtime::snapshot::SnapshotSpec {
        kernel: &kernel,
        agent_disk: &agent,
        cpus: 1,
        memory: 256 << 20,
        backend: vmc::vmm::Backend::host(),
    };
    let (dir, key) = vmc::runtime::snapshot::ensure(&snapshots(), &spec, false).unwrap();
    (dir, key, agent)
}

/// A wait on `vm` bounded by its progress, as vmc's own waits are.
fn watch(
    vm: &vmc::vmm::RunningVm,
) -> impl FnMut() -> Result<(), vmc::runtime::agent::AgentError> + '_ {
    let mut dog = vmc::vmm::progress::Watchdog::new(std::time::Duration::from_secs(120));
    move || vmc::runtime::microvm::verdict(vm.judge(&mut dog))
}

#[test]
fn snapshots_are_taken_of_an_idle_guest() {
    if !kvm_available() {
        return;
    }
    let (dir, _, _) = shared_snapshot();
    let state = vmc::vmm::snapshot::VmState::read(&dir).unwrap();
    let report = vmc::vmm::snapshot::report::report(&dir).unwrap();
    assert!(
        state.vcpus.iter().all(|v| v.halted()),
        "every vCPU halted:\n{report}"
    );
    assert!(
        state.devices.iter().all(|d| d.interrupt_status == 0),
        "every interrupt acknowledged:\n{report}"
    );
}

#[test]
fn a_snapshot_taken_while_an_interrupt_was_in_flight_restores_and_answers() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    use vmc::runtime::agent::AgentConn;
    let (shared, key, agent) = shared_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |vsock: &Path| placeholder_config(dir.path(), &agent, vsock, 256 << 20);
    // A guest restored from the shared snapshot answers, then idles.
    let v1 = dir.path().join("v1.sock");
    let vm = vmc::vmm::restore(cfg(&v1), &shared, &key).unwrap();
    AgentConn::connect(&v1, vmc_proto::AGENT_PORT, &mut watch(&vm))
        .expect("the restored guest answers")
        .close();
    // Its vCPUs are paused (their state saved) before the vsock device
    // queues a connection request and raises its interrupt: the snapshot
    // then holds what it would hold had the host kernel not yet injected
    // the interrupt (irqfd injection is asynchronous): the device's status
    // bit set, the used ring advanced, no vector pending in the LAPIC.
    let t0 = std::time::Instant::now();
    let vcpus = loop {
        let vcpus = vm.pause().unwrap();
        if vcpus.iter().all(|v| v.halted()) && !vm.interrupts_pending() {
            break vcpus;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "the guest never went idle"
        );
        vm.resume();
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut request = std::os::unix::net::UnixStream::connect(&v1).unwrap();
    request
        .write_all(format!("CONNECT {}\n", vmc_proto::AGENT_PORT).as_bytes())
        .unwrap();
    let t0 = std::time::Instant::now();
    while !vm.interrupts_pending() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the vsock device never raised its interrupt"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let inflight = dir.path().join("inflight");
    std::fs::create_dir(&inflight).unwrap();
    vm.save(&inflight, &key, vcpus).unwrap();
    vm.stop();
    vm.wait();
    drop(request);
    let state = vmc::vmm::snapshot::VmState::read(&inflight).unwrap();
    let lost = vmc::vmm::snapshot::report::owed_interrupts(&state);
    // What `vmc system inspect-snapshot` prints for it: a LOST: line.
    let report = vmc::vmm::snapshot::report::report(&inflight).unwrap();
    assert!(
        !lost.is_empty(),
        "the saved state has an interrupt raised but not pending:\n{report}"
    );
    assert!(
        report.lines().any(|l| l.starts_with("LOST: device ")),
        "inspect-snapshot names the lost interrupt:\n{report}"
    );
    // Restored, the guest gets that interrupt again and answers a new
    // connection (without it, EVENT_IDX keeps the device from ever
    // interrupting the guest for that queue again: the guest sleeps forever).
    let v2 = dir.path().join("v2.sock");
    let vm = vmc::vmm::restore(cfg(&v2), &inflight, &key).unwrap();
    let answer = {
        let mut w = watch(&vm);
        AgentConn::connect(&v2, vmc_proto::AGENT_PORT, &mut w)
            .and_then(|mut c| c.request(&vmc::runtime::microvm::MicroVm::refresh_msg(), &mut w))
    };
    vm.stop();
    vm.wait();
    assert_eq!(
        answer.expect("the guest restored from the in-flight snapshot answers"),
        GuestMsg::Refreshed
    );
}

#[test]
fn a_snapshot_whose_guest_hangs_is_set_aside_and_the_run_retried_cold() {
    if !kvm_available() {
        return;
    }
    // A copy of the shared snapshot in a store of its own, with the vsock
    // device's IOAPIC pin masked: its interrupts never reach the restored
    // guest, which then waits for ever for a connection, halted.
    let (shared, key, _) = shared_snapshot();
    let home = tempfile::tempdir().unwrap();
    let snaps = home.path().join("snapshots");
    let bad = snaps.join(&key);
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["memory.img", "spec.txt"] {
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(shared.join(f))
            .arg(bad.join(f))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let mut state = vmc::vmm::snapshot::VmState::read(&shared).unwrap();
    let vsock = state
        .devices
        .iter()
        .position(|d| d.device_type == vmc::devices::virtio::TYPE_VSOCK)
        .unwrap();
    let pin = vmc::vmm::memory::VIRTIO_IRQ_BASE as usize + vsock;
    let ioapic = state.irqchips.iter_mut().find(|c| c.chip_id == 2).unwrap();
    // SAFETY: chip 2 is the IOAPIC, so the union holds a kvm_ioapic_state;
    // a redirection entry is a plain u64 and bit 16 masks it.
    unsafe { ioapic.chip.ioapic.redirtbl[pin].bits |= 1 << 16 };
    state.write(&bad).unwrap();

    let o = run_vmc(home.path(), &snaps);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{err}");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("did not answer"))
        .collect();
    assert_eq!(warnings.len(), 1, "one line says so: {err}");
    assert!(
        warnings[0].contains(&bad.display().to_string())
            && warnings[0].contains("retrying with a cold boot"),
        "{err}"
    );
    let aside: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".quarantine-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the snapshot moved aside");
    assert!(
        warnings[0].contains(&aside[0].display().to_string()),
        "{err}"
    );
    assert!(!bad.exists(), "no later run restores it");
    // The hung guest's own state is kept beside it, for inspect-snapshot.
    let hung = vmc::vmm::snapshot::report::report(&aside[0].join("hung")).unwrap();
    assert!(
        hung.contains(&format!("pin {pin} vector")) && hung.contains("masked"),
        "{hung}"
    );

    // The next run makes a new snapshot (checked by its trial restore) and
    // restores it without a word.
    let o = run_vmc(home.path(), &snaps);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{err}");
    assert!(!err.contains("did not answer"), "{err}");
    let remade = vmc::vmm::snapshot::VmState::read(&bad).unwrap();
    assert!(vmc::vmm::snapshot::report::owed_interrupts(&remade).is_empty());
}
