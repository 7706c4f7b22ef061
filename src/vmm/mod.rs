//! The virtual machine monitor: a KVM VM with guest RAM, the guest kernel and
//! initramfs, legacy devices (i8042, optional serial console), virtio-mmio
//! devices, one thread per vCPU and one event-loop thread.
//!
//! Configuration is data ([`VmConfig`]); [`start`] builds the live VM from it
//! and returns a [`RunningVm`] to wait on or stop. Nothing here knows about
//! images or containers.

pub mod backend;
pub mod boot;
pub mod event_loop;
pub mod exit;
pub mod memory;
pub mod vcpu;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{EventRegistry, Interrupt, Mem, Token, VirtioDevice};
pub use backend::Backend;
use exit::ExitState;
pub use exit::VmExit;
use memory::{COM1_IRQ, COM1_PORT, IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// Smallest guest accepted: the kernel alone occupies 16-30 MiB.
pub const MIN_MEMORY: u64 = 64 << 20;

/// A disk attached to the VM.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial number the guest sees (GET_ID), at most 20 bytes.
    pub id: String,
}

/// Everything needed to build a VM.
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_size: u64,
    pub kernel: PathBuf,
    pub initrd: Option<Vec<u8>>,
    /// Extra kernel command-line words (after vmc's own).
    pub cmdline: Vec<String>,
    pub disks: Vec<DiskConfig>,
    /// Guest CID and host Unix socket of the vsock device.
    pub vsock: Option<(u64, PathBuf)>,
    pub rng: bool,
    /// Kernel console (8250 on ttyS0) output; None leaves the UART out entirely.
    pub console: Option<Box<dyn Write + Send>>,
    pub backend: Backend,
}

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    KvmUnavailable(String),
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{vcpus} vCPUs: between 1 and {max} are supported here")]
    Vcpus { vcpus: u8, max: u8 },
    #[error("--memory {0} MiB: at least {min} MiB is needed", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] boot::cpu::CpuError),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error("vsock socket {path}: {source}")]
    Vsock {
        path: String,
        source: std::io::Error,
    },
    #[error("too many devices: IRQs {VIRTIO_IRQ_BASE}..={IRQ_MAX} are used up")]
    TooManyDevices,
    #[error("VMM setup: {0}")]
    Setup(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn setup_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}

/// Opens /dev/kvm with an error that says how to fix the usual problems.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| {
        VmmError::KvmUnavailable(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: enable virtualisation (load kvm_intel or kvm_amd) or run on a host with KVM".into(),
            libc::EACCES | libc::EPERM => "no permission to open /dev/kvm: run as root or add your user to the kvm group".into(),
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}

/// A started VM.
pub struct RunningVm {
    profile: Option<(PathBuf, vcpu::Samples)>,
    exit: Arc<ExitState>,
    stop: Arc<AtomicBool>,
    vcpus: Vec<JoinHandle<()>>,
    event_loop: Option<JoinHandle<()>>,
    // Field order: the VM goes before the memory it maps.
    _vm: VmFd,
    _mem: Mem,
}

impl RunningVm {
    /// Asks the VM to stop (the vCPUs are kicked out of the guest).
    pub fn stop(&self) {
        self.exit.signal(VmExit::Stopped);
    }

    /// Resident KiB of guest RAM (pages the guest touched).
    pub fn guest_rss_kib(&self) -> u64 {
        let starts: Vec<u64> = self
            ._mem
            .iter()
            .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .map(|p| p as u64)
            .collect();
        memory::resident_kib(&starts)
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        self.event_loop.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits up to `timeout` for the VM to end by itself, then stops it.
    pub fn wait_or_stop(self, timeout: std::time::Duration) -> VmExit {
        let deadline = std::time::Instant::now() + timeout;
        while self.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.is_running() {
            self.stop();
        }
        self.wait()
    }

    /// A handle that can stop the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.exit.clone())
    }

    /// Waits for the VM to end and tears it down.
    pub fn wait(mut self) -> VmExit {
        if let Some(h) = self.event_loop.take() {
            let _ = h.join();
        }
        self.shutdown();
        self.exit.reason()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in &self.vcpus {
            // SAFETY: pthread_kill on a thread we spawned and have not joined yet.
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
        }
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
        if let Some((path, samples)) = self.profile.take() {
            let s = samples.lock().unwrap_or_else(|e| e.into_inner());
            let text: String = s.iter().map(|rip| format!("{rip:x}\n")).collect();
            let _ = std::fs::write(path, text);
        }
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

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn start(cfg: VmConfig) -> Result<RunningVm, VmmError> {
    let kvm = open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus().min(boot::mptable::MAX_CPUS as usize) as u8;
    if cfg.vcpus == 0 || cfg.vcpus > max_vcpus {
        return Err(VmmError::Vcpus {
            vcpus: cfg.vcpus,
            max: max_vcpus,
        });
    }
    if cfg.mem_size < MIN_MEMORY {
        return Err(VmmError::MemoryTooSmall(cfg.mem_size >> 20));
    }
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set TSS address"))?;
    // In-kernel PIC, IOAPIC and LAPICs. No PIT: the guest keeps time with
    // kvm-clock and the LAPIC timer, and KVM's PIT costs 10-15 ms of teardown.
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;

    let mem = memory::create(cfg.mem_size)
        .map_err(|e| VmmError::Memory(cfg.mem_size >> 20, e.to_string()))?;
    register_memory(&vm, &mem)?;

    let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(data) => Some(boot::load_initrd(&mem, cfg.mem_size, kernel.end, data)?),
        None => None,
    };

    let exit = Arc::new(ExitState::new().map_err(setup_err)?);
    let epoll = Arc::new(Epoll::new().map_err(setup_err)?);
    epoll
        .ctl(
            ControlOperation::Add,
            exit.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, Token::Exit.encode()),
        )
        .map_err(setup_err)?;

    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let reset = exit.eventfd().try_clone().map_err(setup_err)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(reset))), 0x60, 5)
        .map_err(setup_err)?;
    let mut cmdline: Vec<String> = base_cmdline(cfg.console.is_some(), cfg.backend);
    if let Some(out) = cfg.console {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err)?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("register serial irqfd"))?;
        pio.insert(
            Arc::new(Mutex::new(SerialDevice::new(irq, out))),
            COM1_PORT as u64,
            8,
        )
        .map_err(setup_err)?;
    }

    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let id = if d.id.is_empty() {
            format!("vmc{i}")
        } else {
            d.id.clone()
        };
        devices.push(Arc::new(Mutex::new(Block::open(
            &d.path,
            d.read_only,
            &id,
        )?)));
    }
    if let Some((cid, path)) = &cfg.vsock {
        let v = Vsock::new(*cid, path).map_err(|source| VmmError::Vsock {
            path: path.display().to_string(),
            source,
        })?;
        devices.push(Arc::new(Mutex::new(v)));
    }
    if cfg.rng {
        devices.push(Arc::new(Mutex::new(Rng::default())));
    }
    let mut loop_devices = Vec::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let irq = VIRTIO_IRQ_BASE + i as u32;
        if irq > IRQ_MAX {
            return Err(VmmError::TooManyDevices);
        }
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err)?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(kvm_err("register irqfd"))?;
        let nqueues = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        let mut evts = Vec::new();
        let mut loop_evts = Vec::new();
        for q in 0..nqueues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err)?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(kvm_err("register ioeventfd"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(
                        EventSet::IN,
                        Token::Queue {
                            dev: i as u8,
                            queue: q as u16,
                        }
                        .encode(),
                    ),
                )
                .map_err(setup_err)?;
            loop_evts.push(evt.try_clone().map_err(setup_err)?);
            evts.push(evt);
        }
        let transport = MmioTransport::new(
            dev.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            EventRegistry::new(epoll.clone(), i as u8),
            evts,
        );
        mmio.insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)
            .map_err(setup_err)?;
        cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        loop_devices.push(event_loop::LoopDevice {
            device: dev,
            queue_evts: loop_evts,
        });
    }
    cmdline.extend(cfg.cmdline.iter().cloned());
    let cmdline = boot::cmdline(&cmdline)?;
    boot::configure(&mem, &kernel, &cmdline, initrd, cfg.mem_size, cfg.vcpus)?;

    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let mut vcpu_fds = Vec::new();
    for id in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(id as u64).map_err(kvm_err("create vCPU"))?;
        vcpu.set_cpuid2(&boot::cpu::vcpu_cpuid(&base_cpuid, id, cfg.vcpus))
            .map_err(kvm_err("set CPUID"))?;
        boot::cpu::setup_msrs(&vcpu)?;
        boot::cpu::setup_fpu(&vcpu)?;
        boot::cpu::setup_lapic(&vcpu)?;
        if id == 0 {
            boot::cpu::setup_sregs(&mem, &vcpu, kernel.mode)?;
            boot::cpu::setup_regs(&vcpu, kernel.mode, kernel.entry)?;
        }
        vcpu_fds.push(vcpu);
    }

    vcpu::install_kick_handler().map_err(setup_err)?;
    let event_loop = {
        let epoll = epoll.clone();
        std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || event_loop::run(epoll, loop_devices))
            .map_err(setup_err)?
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Debugging aid: sample the boot vCPU's RIP at 1 kHz into a file.
    let profile =
        std::env::var_os("VMC_GUEST_PROFILE").map(|p| (PathBuf::from(p), vcpu::Samples::default()));
    let mut vcpus = Vec::new();
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let (pio, mmio, stop, exit) = (pio.clone(), mmio.clone(), stop.clone(), exit.clone());
        let samples = profile.as_ref().filter(|_| id == 0).map(|(_, s)| s.clone());
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(fd, pio, mmio, stop, exit, samples))
            .map_err(setup_err)?;
        vcpus.push(h);
    }
    if profile.is_some() {
        let (thread, stop) = (vcpus[0].as_pthread_t(), stop.clone());
        std::thread::spawn(move || {
            vcpu::profile_sampler(thread, stop, std::time::Duration::from_millis(1))
        });
    }
    Ok(RunningVm {
        profile,
        exit,
        stop,
        vcpus,
        event_loop: Some(event_loop),
        _vm: vm,
        _mem: mem,
    })
}

/// vmc's own command line: quiet, reset via the i8042, no probing of absent
/// hardware, plus what the backend needs.
fn base_cmdline(console: bool, backend: Backend) -> Vec<String> {
    let mut c: Vec<String> = [
        "reboot=k",
        "panic=-1",
        "clocksource=kvm-clock",
        "tsc=reliable",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if console {
        c.push("console=ttyS0".into());
        c.push("printk.time=1".into());
    } else {
        c.push("quiet".into());
        c.push("8250.nr_uarts=0".into());
    }
    let extra = backend.guest_cmdline();
    if !extra.is_empty() {
        c.extend(extra.split_whitespace().map(String::from));
    }
    c
}

fn register_memory(vm: &VmFd, mem: &Mem) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmmError::Memory(region.len() >> 20, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM (the RunningVm's devices and vCPUs hold clones of it).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(())
}
