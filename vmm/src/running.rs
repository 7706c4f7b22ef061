//! A running VM: waiting for it, stopping it, and snapshotting it.

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::exit::{ExitState, VmExit};
use super::snapshot::{self, SnapshotError, VmState};
use super::{memory, progress, vcpu};
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
    profile: Option<(vcpu::Samples, std::fs::File)>,
    threads: progress::Threads,
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
        profile: Option<(vcpu::Samples, std::fs::File)>,
        threads: progress::Threads,
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
            threads,
            vm,
            mem,
        }
    }

    /// Samples the VM's threads through `threads` from now on (a jailed VMM
    /// reads its threads' files through descriptors the host opened).
    pub fn set_threads(&mut self, threads: progress::Threads) {
        self.threads = threads;
    }

    /// What the VM's threads have done so far (see [`progress`]).
    pub fn activity(&self) -> progress::Activity {
        self.threads.sample()
    }

    /// The verdict of `dog` on the VM now: ended, working or hung.
    pub fn judge(&self, dog: &mut progress::Watchdog) -> progress::Verdict {
        dog.judge(self.is_running(), || self.activity())
    }

    /// Asks the VM to stop (the vCPUs are kicked out of the guest).
    pub fn stop(&self) {
        self.exit.signal(VmExit::Stopped);
    }

    /// A handle that can stop the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(StopperKind::Here(self.exit.clone()))
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        self.event_loop.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// The eventfd that becomes readable once the VM is stopping.
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.exit.eventfd())
    }

    /// Where guest RAM is mapped in this process.
    pub fn guest_starts(&self) -> Vec<u64> {
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
        if let Some((samples, mut file)) = self.profile.take() {
            let s = samples.lock().unwrap_or_else(|e| e.into_inner());
            let text: String = s.iter().map(|rip| format!("{rip:x}\n")).collect();
            let _ = std::io::Write::write_all(&mut file, text.as_bytes());
        }
    }

    /// Pauses the VM once its guest is quiescent and writes a snapshot
    /// (`state.bin`, `memory.img`) into `dir`; the VM stays paused (stop it
    /// afterwards). Open vsock connections must be closed first.
    ///
    /// Quiescent means: no vsock connection open, every interrupt the
    /// devices raised acknowledged by the guest, and every vCPU halted (HLT)
    /// when paused. A guest paused in the middle of work restores correctly
    /// too (see `vmm::restore`), but an idle one restores into the same idle
    /// state every time, with no work half done. The waits are bounded by
    /// the guest's progress (`progress::Watchdog`); a guest that never goes
    /// idle is snapshotted as it is after [`QUIESCE_ATTEMPTS`].
    pub fn snapshot(&self, dir: &Path, key: &str) -> Result<(), SnapshotError> {
        self.snapshot_into(snapshot::Files::create(dir)?, key)
    }

    /// [`Self::snapshot`] into `files` (opened by whoever may write there:
    /// a jailed VMM opens nothing itself).
    pub fn snapshot_into(&self, files: snapshot::Files, key: &str) -> Result<(), SnapshotError> {
        let mut dog = progress::Watchdog::new(Duration::from_secs(60));
        let mut attempts = 0;
        loop {
            self.wait_quiescent(&mut dog)?;
            let vcpus = self.pause()?;
            let transports = self.lock_transports();
            let devices = self.lock_devices();
            attempts += 1;
            let idle = vcpus.iter().all(|v| v.halted())
                && !transports.iter().any(|t| t.interrupt_pending())
                && devices.iter().all(|d| d.connection_count() == 0);
            if idle || attempts >= QUIESCE_ATTEMPTS {
                if !idle {
                    log::debug!("snapshot: the guest never went idle; taken while it works");
                }
                return self.write_state(files, key, vcpus, &transports, &devices);
            }
            // Caught between two pieces of work: let it finish.
            drop(devices);
            drop(transports);
            self.resume();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes a snapshot of the VM as it is: `vcpus` is what [`Self::pause`]
    /// returned (the VM stays paused). Unlike [`Self::snapshot`] this does
    /// not wait for the guest to be idle.
    pub fn save(
        &self,
        dir: &Path,
        key: &str,
        vcpus: Vec<snapshot::VcpuState>,
    ) -> Result<(), SnapshotError> {
        self.save_into(snapshot::Files::create(dir)?, key, vcpus)
    }

    /// [`Self::save`] into `files`.
    pub fn save_into(
        &self,
        files: snapshot::Files,
        key: &str,
        vcpus: Vec<snapshot::VcpuState>,
    ) -> Result<(), SnapshotError> {
        let transports = self.lock_transports();
        let devices = self.lock_devices();
        self.write_state(files, key, vcpus, &transports, &devices)
    }

    fn lock_transports(&self) -> Vec<MutexGuard<'_, MmioTransport>> {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn lock_devices(&self) -> Vec<MutexGuard<'_, dyn VirtioDevice + 'static>> {
        self.devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Whether a device raised an interrupt the guest has not acknowledged.
    pub fn interrupts_pending(&self) -> bool {
        self.lock_transports().iter().any(|t| t.interrupt_pending())
    }

    /// Writes `state.bin` and `memory.img`. The caller holds every transport
    /// and device lock, which keeps the event loop from touching guest
    /// memory or queues meanwhile, and the vCPUs are paused.
    fn write_state(
        &self,
        mut files: snapshot::Files,
        key: &str,
        vcpus: Vec<snapshot::VcpuState>,
        transports: &[MutexGuard<'_, MmioTransport>],
        devices: &[MutexGuard<'_, dyn VirtioDevice + 'static>],
    ) -> Result<(), SnapshotError> {
        let devices: Vec<_> = transports
            .iter()
            .zip(devices)
            .map(|(t, d)| t.snapshot_of(&**d))
            .collect();
        let memory = snapshot::dump_memory_into(&self.mem, &files.memory)?;
        let state = VmState {
            key: key.to_string(),
            mem_size: self.mem.iter().map(|r| r.len()).sum(),
            memory,
            vcpus,
            irqchips: snapshot::save_irqchips(&self.vm)?,
            clock: self.vm.get_clock().map_err(|source| SnapshotError::Kvm {
                what: "get clock",
                source,
            })?,
            devices,
        };
        state.write_into(&mut files.state)
    }

    /// Waits until no vsock connection is open, no interrupt is
    /// unacknowledged and the vCPU threads sleep (a halted guest), while the
    /// guest makes progress.
    fn wait_quiescent(&self, dog: &mut progress::Watchdog) -> Result<(), SnapshotError> {
        let mut last_look = Instant::now();
        loop {
            let connections: usize = self
                .devices
                .iter()
                .map(|d| {
                    d.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .connection_count()
                })
                .sum();
            let pending = self.transports.iter().any(|t| {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .interrupt_pending()
            });
            let activity = self.activity();
            if connections == 0 && !pending && activity.vcpus_asleep {
                return Ok(());
            }
            if last_look.elapsed() >= Duration::from_millis(100) {
                last_look = Instant::now();
                match dog.observe(last_look, activity) {
                    progress::Verdict::Working => {}
                    // Halted with a connection still open: it will not close it.
                    progress::Verdict::Hung(why) if connections > 0 => {
                        return Err(SnapshotError::Pause(format!(
                            "vsock connections are still open and the guest is hung ({why})"
                        )))
                    }
                    // Halted, only an interrupt pending: quiescent enough.
                    progress::Verdict::Hung(_) if activity.vcpus_asleep => return Ok(()),
                    progress::Verdict::Hung(why) => {
                        return Err(SnapshotError::Pause(format!(
                            "the guest does not go idle ({why})"
                        )))
                    }
                    progress::Verdict::Ended => {
                        return Err(SnapshotError::Pause("the VM stopped".into()))
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops every vCPU out of the guest and keeps it there (until
    /// [`Self::resume`]); returns their states, each saved by its own thread.
    pub fn pause(&self) -> Result<Vec<snapshot::VcpuState>, SnapshotError> {
        self.pause.request(self.vcpus.len());
        // Bounded by the threads' progress, not by wall time: on a loaded
        // host a kicked vCPU may wait long for a CPU to leave the guest on
        // (it counts as busy meanwhile); one that sits idle without
        // stopping, or runs on for the budget, is stuck.
        let mut dog = progress::Watchdog::new(Duration::from_secs(10));
        let saved = loop {
            self.kick_vcpus();
            if let Some(s) = self.pause.wait_saved(Duration::from_millis(20)) {
                break s;
            }
            if !self.is_running() {
                return Err(SnapshotError::Pause(
                    "the vCPUs did not stop: the VM ended".into(),
                ));
            }
            if let progress::Verdict::Hung(why) = dog.observe(Instant::now(), self.activity()) {
                return Err(SnapshotError::Pause(format!(
                    "the vCPUs did not stop: {why}"
                )));
            }
        };
        saved.into_iter().collect()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.pause.resume();
    }
}

/// How often [`RunningVm::snapshot`] pauses a guest that turns out to be in
/// the middle of work before it takes it as it is.
pub const QUIESCE_ATTEMPTS: usize = 50;

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

/// Stops a VM from anywhere (in this process, or in a VMM process).
#[derive(Clone)]
pub struct Stopper(StopperKind);

#[derive(Clone)]
enum StopperKind {
    Here(Arc<ExitState>),
    Process(Arc<std::os::fd::OwnedFd>),
}

impl Stopper {
    /// Stops the VM of the VMM process whose control socket is `ctl`.
    pub(crate) fn process(ctl: Arc<std::os::fd::OwnedFd>) -> Stopper {
        Stopper(StopperKind::Process(ctl))
    }

    pub fn stop(&self) {
        match &self.0 {
            StopperKind::Here(e) => e.signal(VmExit::Stopped),
            StopperKind::Process(ctl) => crate::process::send_stop(ctl),
        }
    }
}
