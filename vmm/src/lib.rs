//! vmc's virtual machine monitor: a KVM VM with guest RAM, the guest kernel and
//! initramfs, legacy devices (i8042, optional serial console), virtio-mmio
//! devices, one thread per vCPU and one event-loop thread.
//!
//! Configuration is data ([`VmConfig`]); [`start`] builds the live VM from it
//! and returns a [`RunningVm`] to wait on or stop. Nothing here knows about
//! images or containers.

pub mod backend;
pub mod boot;
mod builder;
mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod jail;
pub mod memory;
pub mod process;
pub mod progress;
mod running;
pub mod seccomp;
pub mod snapshot;
pub mod uds;
pub mod vcpu;

use std::io::Write;
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::ConfigChange;
pub use backend::Backend;
pub use device_manager::DeviceConfig;
pub use exit::VmExit;
use memory::{IRQ_MAX, VIRTIO_IRQ_BASE};
pub use running::{RunningVm, Stopper};
use snapshot::{SnapshotError, VmState};

/// Smallest guest accepted: the kernel alone occupies 16-30 MiB.
pub const MIN_MEMORY: u64 = 64 << 20;

/// A disk attached to the VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial number the guest sees (GET_ID), at most 20 bytes.
    pub id: String,
}

/// Everything needed to build a VM: built with [`VmConfig::new`] and its
/// `with_*` methods, turned into a live VM by [`start`] or [`restore`].
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_size: u64,
    pub kernel: PathBuf,
    pub initrd: Option<Vec<u8>>,
    /// Extra kernel command-line words (after vmc's own).
    pub cmdline: Vec<String>,
    /// The virtio devices. Their order is the snapshot ABI: device `i` sits
    /// on mmio window `i` with IRQ `VIRTIO_IRQ_BASE + i`, and a snapshot
    /// restores only onto the same kinds in the same order.
    pub devices: Vec<DeviceConfig>,
    /// Kernel console (8250 on ttyS0) output; None leaves the UART out entirely.
    pub console: Option<Box<dyn Write + Send>>,
    /// The host's backend ([`Backend::host`]): the guest's command line
    /// depends on it.
    pub backend: Backend,
    /// Debugging aid: sample the boot vCPU's RIP at 1 kHz and write the
    /// samples to this file when the VM ends.
    pub guest_profile: Option<PathBuf>,
    /// The jail and seccomp filters the VMM process enters between building
    /// the VM and running it (see [`process`]); None runs it as it is.
    pub confinement: Option<std::sync::Arc<Confinement>>,
}

/// How a VMM process confines itself once its VM is built: its jail, and
/// its threads' filters (violations reported on `report_fd`).
pub struct Confinement {
    pub jail: Option<jail::JailSpec>,
    pub filters: Option<seccomp::Filters>,
    pub report_fd: i32,
    /// Called before the jail is entered (the process's other setup
    /// threads must be done by then: capabilities are per thread).
    pub before: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

impl Confinement {
    /// Installs `kind`'s filter on the calling thread (named `name` in a
    /// violation report), if there are filters.
    fn apply(&self, kind: seccomp::ThreadKind, name: &str) -> Result<(), String> {
        match &self.filters {
            Some(f) => f.apply(kind, name),
            None => Ok(()),
        }
    }
}

/// [`Confinement::apply`] for a VM that may have none.
fn apply_filter(
    c: &Option<std::sync::Arc<Confinement>>,
    kind: seccomp::ThreadKind,
    name: &str,
) -> Result<(), String> {
    c.as_ref().map_or(Ok(()), |c| c.apply(kind, name))
}

impl VmConfig {
    /// A VM with `vcpus` vCPUs, `mem_size` bytes of RAM and `kernel`, no
    /// devices, no console, on this host's backend.
    pub fn new(kernel: &Path, vcpus: u8, mem_size: u64) -> VmConfig {
        VmConfig {
            vcpus,
            mem_size,
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: Vec::new(),
            devices: Vec::new(),
            console: None,
            backend: Backend::host(),
            guest_profile: None,
            confinement: None,
        }
    }

    /// Adds a device after those already there.
    pub fn with_device(mut self, device: DeviceConfig) -> VmConfig {
        self.devices.push(device);
        self
    }

    /// Appends words to the kernel command line.
    pub fn with_cmdline<S: Into<String>>(mut self, words: impl IntoIterator<Item = S>) -> VmConfig {
        self.cmdline.extend(words.into_iter().map(Into::into));
        self
    }

    /// The host socket path of the vsock device, if there is one.
    pub fn vsock_uds(&self) -> Option<&Path> {
        self.devices.iter().find_map(|d| match d {
            DeviceConfig::Vsock { uds, .. } => Some(uds.as_path()),
            _ => None,
        })
    }

    /// Sends the kernel console to `out`.
    pub fn with_console(mut self, out: Box<dyn Write + Send>) -> VmConfig {
        self.console = Some(out);
        self
    }
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
    #[error("--memory {0}: a microVM needs at least {min} MiB", min = MIN_MEMORY >> 20)]
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
    /// The VMM process was killed by its seccomp filter (the message names
    /// the call and the thread).
    #[error("{0}")]
    Seccomp(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(crate) fn setup_err(e: impl std::fmt::Display) -> VmmError {
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

/// Refuses guest memory (bytes) below [`MIN_MEMORY`]: `vmc run` and `vmc
/// build` check `--memory` with it before anything starts, and [`start`]
/// again.
pub fn check_memory(bytes: u64) -> Result<(), VmmError> {
    if bytes < MIN_MEMORY {
        return Err(VmmError::MemoryTooSmall(bytes));
    }
    Ok(())
}

/// Boots a VM from its kernel as described by `cfg`.
pub fn start(mut cfg: VmConfig) -> Result<RunningVm, VmmError> {
    let kvm = open_kvm()?;
    check_memory(cfg.mem_size)?;
    let mem = memory::create(cfg.mem_size)
        .map_err(|e| VmmError::Memory(cfg.mem_size >> 20, e.to_string()))?;
    let m = builder::build(kvm, &mut cfg, mem)?;

    let kernel = boot::load_kernel(&m.mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(data) => Some(boot::load_initrd(&m.mem, cfg.mem_size, kernel.end, data)?),
        None => None,
    };
    let mut cmdline = m.cmdline.clone();
    cmdline.extend(cfg.cmdline.iter().cloned());
    let cmdline = boot::cmdline(&cmdline)?;
    boot::configure(&m.mem, &kernel, &cmdline, initrd, cfg.mem_size, cfg.vcpus)?;

    let base_cpuid = m
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let mut vcpu_fds = Vec::new();
    for id in 0..cfg.vcpus {
        let vcpu =
            m.vm.create_vcpu(id as u64)
                .map_err(kvm_err("create vCPU"))?;
        vcpu.set_cpuid2(&boot::cpu::vcpu_cpuid(&base_cpuid, id, cfg.vcpus))
            .map_err(kvm_err("set CPUID"))?;
        boot::cpu::setup_msrs(&vcpu)?;
        boot::cpu::setup_fpu(&vcpu)?;
        boot::cpu::setup_lapic(&vcpu)?;
        if id == 0 {
            boot::cpu::setup_sregs(&m.mem, &vcpu, kernel.mode)?;
            boot::cpu::setup_regs(&vcpu, kernel.mode, kernel.entry)?;
        }
        vcpu_fds.push(vcpu);
    }
    builder::launch(m, vcpu_fds)
}

/// Restores the snapshot in `dir` with the devices of `cfg` (same kinds and
/// order as when the snapshot was taken; the disks' files may differ). The
/// kernel and command line in `cfg` are not used. `key` must match the one the
/// snapshot was written with.
pub fn restore(mut cfg: VmConfig, dir: &Path, key: &str) -> Result<RunningVm, VmmError> {
    let kvm = open_kvm()?;
    let state = VmState::read(dir)?;
    let invalid = |why: String| VmmError::Snapshot(SnapshotError::Invalid(why));
    if state.key != key {
        return Err(invalid(format!("it was made for {}, not {key}", state.key)));
    }
    if state.mem_size != cfg.mem_size || state.vcpus.len() != cfg.vcpus as usize {
        return Err(invalid(format!(
            "it has {} vCPUs and {} MiB, the VM {} and {} MiB",
            state.vcpus.len(),
            state.mem_size >> 20,
            cfg.vcpus,
            cfg.mem_size >> 20
        )));
    }
    let mem = snapshot::map_memory(
        &dir.join("memory.img"),
        &memory::ram_regions(cfg.mem_size),
        Some(&state.memory),
    )?;
    let m = builder::build(kvm, &mut cfg, mem)?;
    if m.transports.len() != state.devices.len() {
        return Err(invalid(format!(
            "it has {} devices, the VM {}",
            state.devices.len(),
            m.transports.len()
        )));
    }
    let mut changed = Vec::new();
    for (t, s) in m.transports.iter().zip(&state.devices) {
        let change = t
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(s)
            .map_err(|e| invalid(e.to_string()))?;
        changed.push(change == ConfigChange::Changed);
    }
    let mut vcpu_fds = Vec::new();
    for (id, vs) in state.vcpus.iter().enumerate() {
        let vcpu =
            m.vm.create_vcpu(id as u64)
                .map_err(kvm_err("create vCPU"))?;
        vs.restore(&vcpu)?;
        vcpu_fds.push(vcpu);
    }
    snapshot::restore_vm(&m.vm, &state)?;
    let vm = builder::launch(m, vcpu_fds)?;
    // A device's configuration may have changed (a disk's size: the
    // snapshot had empty placeholders); an interrupt or a queue notification
    // in flight at snapshot time must not be lost.
    for ((t, s), changed) in vm.transports().iter().zip(&state.devices).zip(changed) {
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        if changed && s.active {
            t.config_changed();
        } else if t.redeliver_interrupt() {
            log::debug!(
                "restore: device {} had an unacknowledged interrupt",
                s.device_type
            );
        }
        t.kick_queues();
    }
    Ok(vm)
}

/// vmc's own command line: quiet, reset via the i8042, no probing of absent
/// hardware, plus what the backend needs.
pub fn base_cmdline(console: bool, backend: Backend) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's `--memory`: "at least 64M" for a VM, as `vmc run` and
    /// `vmc build` check it (and `start` again).
    #[test]
    fn guest_memory_below_64_mib_is_refused() {
        // (`--memory 64M` parses to this: cli's tests.)
        check_memory(64 << 20).unwrap();
        check_memory(256 << 20).unwrap();
        for small in [(64 << 20) - 1, 63 << 20, 0] {
            let e = check_memory(small).unwrap_err();
            assert!(matches!(e, VmmError::MemoryTooSmall(b) if b == small));
            assert_eq!(
                e.to_string(),
                format!("--memory {small}: a microVM needs at least 64 MiB")
            );
        }
    }
}
