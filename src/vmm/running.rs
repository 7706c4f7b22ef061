//! A running VM: waiting for it, stopping it, and snapshotting it.

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::exit::{ExitState, VmExit};
use super::snapshot::{self, SnapshotError, VmState};
use super::{memory, vcpu};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{Mem, VirtioDevice};

/// A started VM.
pub struct RunningVm {
    exit: Arc<ExitState>,
    stop: Arc<AtomicBool>,
    pause: Arc<vcpu::PauseCtl>,
    vcpus: Vec<JoinHandle<()>>,
    event_loop: Option<JoinHandle<()>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    profile: Option<(PathBuf, vcpu::Samples)>,
    // Field order matters on drop: the VM goes before the memory it maps.
    vm: VmFd,
    mem: Mem,
}

impl RunningVm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        vm: VmFd,
        mem: Mem,
        exit: Arc<ExitState>,
        stop: Arc<AtomicBool>,
        pause: Arc<vcpu::PauseCtl>,
        vcpus: Vec<JoinHandle<()>>,
        event_loop: JoinHandle<()>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
        profile: Option<(PathBuf, vcpu::Samples)>,
    ) -> RunningVm {
        RunningVm {
            exit,
            stop,
            pause,
            vcpus,
            event_loop: Some(event_loop),
            transports,
            devices,
            profile,
            vm,
            mem,
        }
    }

    /// Asks the VM to stop (the vCPUs are kicked out of the guest).
    pub fn stop(&self) {
        self.exit.signal(VmExit::Stopped);
    }

    /// A handle that can stop the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.exit.clone())
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        self.event_loop.as_ref().is_some_and(|h| !h.is_finished())
    }

    fn guest_starts(&self) -> Vec<u64> {
        self.mem
            .iter()
            .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .map(|p| p as u64)
            .collect()
    }

    /// Resident KiB of guest RAM (pages the guest touched).
    pub fn guest_rss_kib(&self) -> u64 {
        memory::resident_kib(&self.guest_starts())
    }

    /// KiB of guest RAM this VM alone holds: pages it wrote (for a restored
    /// VM, its copies of the snapshot's shared pages).
    pub fn guest_private_dirty_kib(&self) -> u64 {
        memory::smaps_kib(&self.guest_starts(), "Private_Dirty")
    }

    /// The device transports, in mmio order (for restore fix-ups).
    pub(super) fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Waits up to `timeout` for the VM to end by itself, then stops it.
    pub fn wait_or_stop(self, timeout: Duration) -> VmExit {
        let deadline = Instant::now() + timeout;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.is_running() {
            self.stop();
        }
        self.wait()
    }

    /// Waits for the VM to end and tears it down.
    pub fn wait(mut self) -> VmExit {
        if let Some(h) = self.event_loop.take() {
            let _ = h.join();
        }
        self.shutdown();
        self.exit.reason()
    }

    fn kick_vcpus(&self) {
        for h in &self.vcpus {
            // SAFETY: pthread_kill on a thread we spawned and have not joined yet.
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.pause.resume();
        self.kick_vcpus();
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
        if let Some((path, samples)) = self.profile.take() {
            let s = samples.lock().unwrap_or_else(|e| e.into_inner());
            let text: String = s.iter().map(|rip| format!("{rip:x}\n")).collect();
            let _ = std::fs::write(path, text);
        }
    }

    /// Pauses the VM and writes a snapshot (`state.bin`, `memory.img`) into
    /// `dir`; the VM stays paused (stop it afterwards). Open vsock
    /// connections must be closed first: waits up to `quiesce` for them to go.
    pub fn snapshot(&self, dir: &Path, key: &str, quiesce: Duration) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + quiesce;
        while self.devices.iter().any(|d| {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .connection_count()
                > 0
        }) {
            if Instant::now() > deadline {
                return Err(SnapshotError::Pause(
                    "vsock connections are still open".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.pause.request(self.vcpus.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        let saved = loop {
            self.kick_vcpus();
            if let Some(s) = self.pause.wait_saved(Duration::from_millis(20)) {
                break s;
            }
            if Instant::now() > deadline || !self.is_running() {
                return Err(SnapshotError::Pause("the vCPUs did not stop".into()));
            }
        };
        let vcpus = saved
            .into_iter()
            .collect::<Result<Vec<_>, String>>()
            .map_err(SnapshotError::Invalid)?;
        // Holding every transport and device lock keeps the event loop from
        // touching guest memory or queues while they are saved.
        let transports: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let device_locks: Vec<_> = self
            .devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let devices: Vec<_> = transports
            .iter()
            .zip(&device_locks)
            .map(|(t, d)| t.snapshot_of(&**d))
            .collect();
        let state = VmState {
            key: key.to_string(),
            mem_size: self.mem.iter().map(|r| r.len()).sum(),
            vcpus,
            irqchips: snapshot::save_irqchips(&self.vm)?,
            clock: self.vm.get_clock().map_err(|source| SnapshotError::Kvm {
                what: "get clock",
                source,
            })?,
            devices,
        };
        snapshot::dump_memory(&self.mem, &dir.join("memory.img"))?;
        drop(device_locks);
        drop(transports);
        state.write(dir)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.event_loop.is_some() || !self.vcpus.is_empty() {
            self.stop();
            if let Some(h) = self.event_loop.take() {
                let _ = h.join();
            }
            self.shutdown();
        }
    }
}

/// Stops a VM from anywhere.
#[derive(Clone)]
pub struct Stopper(Arc<ExitState>);

impl Stopper {
    pub fn stop(&self) {
        self.0.signal(VmExit::Stopped);
    }
}
