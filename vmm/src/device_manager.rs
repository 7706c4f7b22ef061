//! The virtio devices of a VM: what each [`DeviceConfig`] becomes, and how
//! the devices are attached in list order, each on its own mmio window, IRQ,
//! ioeventfds and event-loop tokens. The order is the snapshot ABI (see
//! [`super::VmConfig::devices`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use super::{event_loop, kvm_err, setup_err, DiskConfig, VmmError};
use crate::devices::bus::Bus;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{EventRegistry, Interrupt, Mem, Token, VirtioDevice};

/// One virtio device of a VM.
#[derive(Debug)]
pub enum DeviceConfig {
    /// A virtio-blk disk (an empty id becomes `vmc<index>`).
    Block(DiskConfig),
    /// A virtio-vsock device with guest CID `cid`, whose host side listens
    /// and connects on Unix sockets at `uds` (Firecracker's scheme).
    Vsock { cid: u64, uds: PathBuf },
    /// A virtio-rng device fed by the host's getrandom.
    Rng,
    /// A virtio-net device with this MAC whose frames go through `backend`
    /// (to passt; a socket whose peer is gone makes a cable-less NIC).
    Net { mac: [u8; 6], backend: UnixStream },
    /// A virtio-fs device (tag `vmc`) whose FUSE requests go to a file
    /// server at the other end of `backend` (a SEQPACKET socket); without
    /// one every request is refused (a VM with no volumes).
    Fs { backend: Option<OwnedFd> },
}

/// A virtio device shared by its transport and the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

impl DeviceConfig {
    /// Makes the device (opens its files and sockets).
    fn create(self, index: usize) -> Result<SharedDevice, VmmError> {
        Ok(match self {
            DeviceConfig::Block(d) => {
                let id = if d.id.is_empty() {
                    format!("vmc{index}")
                } else {
                    d.id
                };
                Arc::new(Mutex::new(Block::open(&d.path, d.read_only, &id)?))
            }
            DeviceConfig::Vsock { cid, uds } => {
                let v = Vsock::new(cid, &uds).map_err(|source| VmmError::Vsock {
                    path: uds.display().to_string(),
                    source,
                })?;
                Arc::new(Mutex::new(v))
            }
            DeviceConfig::Rng => Arc::new(Mutex::new(Rng::default())),
            DeviceConfig::Net { mac, backend } => {
                Arc::new(Mutex::new(Net::new(mac, backend).map_err(setup_err)?))
            }
            DeviceConfig::Fs { backend } => {
                Arc::new(Mutex::new(Fs::new(backend).map_err(setup_err)?))
            }
        })
    }
}

/// The attached devices: what the vCPUs, the event loop and snapshots use.
pub struct Attached {
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub devices: Vec<SharedDevice>,
    pub loop_devices: Vec<event_loop::LoopDevice>,
    /// The `virtio_mmio.device=` words that tell a cold-booted kernel where
    /// the devices are.
    pub cmdline: Vec<String>,
}

/// Creates the devices of `configs` and attaches them in order: device `i`
/// on mmio window `i` of `mmio`, with IRQ `VIRTIO_IRQ_BASE + i` (an irqfd)
/// and one ioeventfd per queue watched by `epoll`.
pub fn attach(
    vm: &VmFd,
    epoll: &Arc<Epoll>,
    mem: &Mem,
    mmio: &mut Bus,
    configs: Vec<DeviceConfig>,
) -> Result<Attached, VmmError> {
    let mut out = Attached {
        transports: Vec::new(),
        devices: Vec::new(),
        loop_devices: Vec::new(),
        cmdline: Vec::new(),
    };
    for (i, config) in configs.into_iter().enumerate() {
        let irq = VIRTIO_IRQ_BASE + i as u32;
        if irq > IRQ_MAX {
            return Err(VmmError::TooManyDevices);
        }
        let dev = config.create(i)?;
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
            let token = Token::Queue {
                dev: i as u8,
                queue: q as u16,
            };
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token.encode()),
                )
                .map_err(setup_err)?;
            loop_evts.push(evt.try_clone().map_err(setup_err)?);
            evts.push(evt);
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dev.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            EventRegistry::new(epoll.clone(), i as u8),
            evts,
        )));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)
            .map_err(setup_err)?;
        out.transports.push(transport);
        out.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        out.loop_devices.push(event_loop::LoopDevice {
            device: dev.clone(),
            queue_evts: loop_evts,
        });
        out.devices.push(dev);
    }
    Ok(out)
}
