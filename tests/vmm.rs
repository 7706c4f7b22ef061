//! The VMM with a purpose-built guest of a few dozen bytes (it boots in
//! milliseconds): PVH loading, port and MMIO exits, the serial console, the
//! i8042 reset, SMP setup, and no leaked descriptors or threads across runs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::kvm_available;
use vmc::bench::tiny_guest;
use vmc::vmm::{self, DeviceConfig, VmConfig, VmExit};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn config(
    kernel: &std::path::Path,
    vcpus: u8,
    console: Capture,
    vsock: Option<(u64, std::path::PathBuf)>,
) -> VmConfig {
    let mut c = VmConfig::new(kernel, vcpus, 64 << 20).with_console(Box::new(console));
    if let Some((cid, uds)) = vsock {
        c = c.with_device(DeviceConfig::Vsock { cid, uds });
    }
    c.with_device(DeviceConfig::Rng)
}

/// The tests here count the process's descriptors and threads: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn tiny_guest_prints_reads_mmio_and_resets() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(
        &kernel,
        tiny_guest::elf(b"hello from the tiny guest\n", true),
    )
    .unwrap();
    let console = Capture::default();
    let vm = vmm::start(config(&kernel, 2, console.clone(), None)).unwrap();
    assert_eq!(vm.wait(), VmExit::Reset);
    // The first virtio-mmio device (virtio-rng here) answers the magic "virt".
    assert_eq!(
        String::from_utf8_lossy(&console.0.lock().unwrap()),
        "hello from the tiny guest\nvirt\n"
    );
}

#[test]
fn repeated_vms_leak_no_descriptors_threads_or_sockets() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_guest::elf(b"x", false)).unwrap();
    // Every kind of device a container's VM has: vsock, rng, a disk (read-
    // write, with its file), and a network device whose backend socket the
    // test holds the other end of (as passt would).
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let run = |i: usize| {
        let sock = dir.path().join(format!("v{i}.sock"));
        let (vmm_end, backend_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let cfg = config(&kernel, 1, Capture::default(), Some((3, sock.clone())))
            .with_device(DeviceConfig::Block(vmm::DiskConfig {
                path: disk.clone(),
                read_only: false,
                id: "scratch".into(),
            }))
            .with_device(DeviceConfig::Net {
                mac: [0x02, 0, 0, 0, 0, 1],
                backend: vmm_end,
            });
        let vm = vmm::start(cfg).unwrap();
        assert_eq!(vm.wait(), VmExit::Reset);
        drop(backend_end);
        std::fs::remove_file(&sock).unwrap();
    };
    run(0); // warm-up: one-time allocations (signal handler, caches)
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 1..=10 {
        run(i);
    }
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    // A VM stopped from outside (not by its guest) tears down the same way.
    let endless = dir.path().join("endless.elf");
    std::fs::write(&endless, tiny_guest::elf_halting(b"")).unwrap();
    let vm = vmm::start(config(&endless, 2, Capture::default(), None)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(vm.is_running());
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
    assert_eq!(count("/proc/self/fd"), fds);
    assert_eq!(count("/proc/self/task"), threads);
}
