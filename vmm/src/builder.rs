//! Building the machine shared by a cold boot and a snapshot restore: the KVM
//! VM with its irqchip, guest memory slots, the legacy devices, the virtio
//! devices on their mmio windows (ioeventfds, irqfds), and finally the vCPU
//! and event-loop threads.

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device_manager::{self, SharedDevice};
use super::exit::ExitState;
use super::memory::{COM1_IRQ, COM1_PORT};
use super::running::RunningVm;
use super::seccomp::ThreadKind;
use super::{base_cmdline, event_loop, kvm_err, progress, setup_err, vcpu, VmConfig, VmmError};
use crate::devices::bus::Bus;
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{Mem, Token};

/// A VM with memory and devices, before its vCPUs run.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: Mem,
    pub exit: Arc<ExitState>,
    pub epoll: Arc<Epoll>,
    pub pio: Bus,
    pub mmio: Bus,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub devices: Vec<SharedDevice>,
    pub loop_devices: Vec<event_loop::LoopDevice>,
    /// vmc's kernel command line for these devices (used by a cold boot).
    pub cmdline: Vec<String>,
    pub msr_list: Arc<Vec<u32>>,
    pub guest_profile: Option<std::path::PathBuf>,
    pub confinement: Option<Arc<super::Confinement>>,
}

/// Creates the VM, registers `mem`, and attaches the devices of `cfg`
/// (taking them and the console out of it).
pub fn build(kvm: Kvm, cfg: &mut VmConfig, mem: Mem) -> Result<Machine, VmmError> {
    let max_vcpus = kvm
        .get_max_vcpus()
        .min(super::boot::mptable::MAX_CPUS as usize) as u8;
    if cfg.vcpus == 0 || cfg.vcpus > max_vcpus {
        return Err(VmmError::Vcpus {
            vcpus: cfg.vcpus,
            max: max_vcpus,
        });
    }
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set TSS address"))?;
    // In-kernel PIC, IOAPIC and LAPICs. No PIT: the guest keeps time with
    // kvm-clock and the LAPIC timer, and KVM's PIT costs 10-15 ms of teardown.
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    register_memory(&vm, &mem)?;
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
    let mut cmdline = base_cmdline(cfg.console.is_some(), cfg.backend);
    if let Some(out) = cfg.console.take() {
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

    let attached = device_manager::attach(
        &vm,
        &epoll,
        &mem,
        &mut mmio,
        std::mem::take(&mut cfg.devices),
    )?;
    cmdline.extend(attached.cmdline);
    let msr_list = Arc::new(
        kvm.get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
    );
    Ok(Machine {
        kvm,
        vm,
        mem,
        exit,
        epoll,
        pio,
        mmio,
        transports: attached.transports,
        devices: attached.devices,
        loop_devices: attached.loop_devices,
        cmdline,
        msr_list,
        guest_profile: cfg.guest_profile.take(),
        confinement: cfg.confinement.take(),
    })
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
        // SAFETY: the region is a live mapping owned by `mem`, which the
        // RunningVm keeps until after the VM fd is closed.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(())
}

/// Starts the event loop and one thread per vCPU. With a confinement, the
/// process enters its jail first (everything is open by now), and each
/// thread installs its seccomp filter and then waits at a gate that opens
/// once the calling thread has installed its own: no guest instruction runs
/// before every filter is in place.
pub fn launch(m: Machine, vcpu_fds: Vec<VcpuFd>) -> Result<RunningVm, VmmError> {
    vcpu::install_kick_handler().map_err(setup_err)?;
    // The profile's file is opened now: a jailed VMM opens nothing later.
    let profile_file = match &m.guest_profile {
        Some(p) => Some(std::fs::File::create(p).map_err(setup_err)?),
        None => None,
    };
    let confine = m.confinement.clone();
    if let Some(c) = &confine {
        (c.before)().map_err(VmmError::Setup)?;
        if let Some(j) = &c.jail {
            super::jail::enter(j).map_err(VmmError::Setup)?;
        }
        if let Some(f) = &c.filters {
            f.prepare(c.report_fd).map_err(VmmError::Setup)?;
        }
    }
    let gate = Arc::new(std::sync::Barrier::new(vcpu_fds.len() + 2));
    // Each thread's first steps: its filter, then the gate. A thread whose
    // filter fails stops the VM (after the gate, which counts on it).
    let enter = {
        let (confine, gate, exit) = (confine.clone(), gate.clone(), m.exit.clone());
        move |kind: ThreadKind, name: &str| -> bool {
            let applied = super::apply_filter(&confine, kind, name);
            gate.wait();
            match applied {
                Ok(()) => {
                    super::seccomp::probe(kind);
                    true
                }
                Err(e) => {
                    exit.signal(super::VmExit::Crashed(e));
                    false
                }
            }
        }
    };
    // Each thread reports its id, so that the VM's progress can be read from
    // the scheduler's account of it.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel::<i32>();
    let report_tid = |tx: &std::sync::mpsc::Sender<i32>| {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
    };
    let event_loop = {
        let epoll = m.epoll.clone();
        let devices = m.loop_devices;
        let tx = tid_tx.clone();
        let enter = enter.clone();
        std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                report_tid(&tx);
                drop(tx);
                if enter(ThreadKind::Events, "vmm-events") {
                    event_loop::run(epoll, devices)
                }
            })
            .map_err(setup_err)?
    };
    let loop_tid = tid_rx.recv().map_err(setup_err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(vcpu::PauseCtl::default());
    // Debugging aid: sample the boot vCPU's RIP at 1 kHz into a file.
    let profile = m.guest_profile.map(|p| (p, vcpu::Samples::default()));
    let mut vcpus = Vec::new();
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let ctx = vcpu::VcpuCtx {
            id,
            pio: m.pio.clone(),
            mmio: m.mmio.clone(),
            stop: stop.clone(),
            exit: m.exit.clone(),
            pause: pause.clone(),
            msr_list: m.msr_list.clone(),
            samples: profile.as_ref().filter(|_| id == 0).map(|(_, s)| s.clone()),
        };
        let tx = tid_tx.clone();
        let enter = enter.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                report_tid(&tx);
                drop(tx);
                if enter(ThreadKind::Vcpu, &format!("vcpu{id}")) {
                    vcpu::run(fd, ctx)
                }
            })
            .map_err(setup_err)?;
        vcpus.push(h);
    }
    drop(tid_tx);
    let vcpu_tids = tid_rx.iter().take(vcpus.len()).collect::<Vec<_>>();
    let threads = progress::Threads::new(std::process::id(), vcpu_tids, vec![loop_tid]);
    if profile.is_some() {
        let (thread, stop) = (vcpus[0].as_pthread_t(), stop.clone());
        let confine = confine.clone();
        std::thread::spawn(move || {
            if super::apply_filter(&confine, ThreadKind::Main, "vmm-profile").is_err() {
                return;
            }
            vcpu::profile_sampler(thread, stop, std::time::Duration::from_millis(1))
        });
    }
    // The calling thread's own filter, then the gate: the vCPUs run.
    if let Err(e) = super::apply_filter(&confine, ThreadKind::Main, "vmm") {
        m.exit.signal(super::VmExit::Crashed(e));
    }
    gate.wait();
    let profile = profile.zip(profile_file).map(|((_, s), f)| (s, f));
    Ok(RunningVm::new(
        m.vm,
        m.mem,
        m.exit,
        stop,
        pause,
        vcpus,
        event_loop,
        m.transports,
        m.devices,
        profile,
        threads,
    ))
}
