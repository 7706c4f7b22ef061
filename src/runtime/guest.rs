//! What every microVM of vmc has, shared by the runtime's VMs and the
//! warm-start snapshots they are restored from: the device layout (the
//! snapshot ABI), the guest's time budgets, the message that refreshes a
//! restored guest, and how a wait on a guest ends.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use vmc_proto::HostMsg;

use super::agent::AgentError;
use super::RuntimeError;
use crate::vmm::progress::{Threads, Verdict, Watchdog};
use crate::vmm::{DeviceConfig, DiskConfig, VmConfig, VmExit};

/// Guest CID of every VM (each VM has its own vsock device and host socket).
pub const GUEST_CID: u64 = 3;
/// Size of the sparse scratch disk (the container's writable layer).
pub const SCRATCH_SIZE: u64 = 2 << 30;

/// The guest's names of the image and scratch disks (the agent's own disk
/// is the first, `/dev/vda`; the order is `vm_config`'s).
pub const IMAGE_DEV: &str = "/dev/vdb";
pub const SCRATCH_DEV: &str = "/dev/vdc";

/// The guest's network interface (the VM's one virtio-net device).
pub const NET_IF: &str = "eth0";

/// Whole 512-byte sectors of a disk image file (what the guest will see).
pub fn sectors(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() / 512).unwrap_or(0)
}
/// vCPU time a guest may spend booting to its agent before it is declared
/// hung (software virtualisation needs tens of seconds, hardware well under
/// one). Waits are bounded by the guest's progress: a halted, silent guest is
/// declared hung after `vmm::progress::QUIET_LIMIT`, however loaded the host.
pub const BOOT_CPU: Duration = Duration::from_secs(300);
/// vCPU time a guest may spend answering one request (mount, start, ...).
pub const ANSWER_CPU: Duration = Duration::from_secs(120);
/// How long the guest may take to reset itself after its process exited
/// (after that it is stopped: nothing of it is needed any more).
pub const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// The VM layout shared by cold boots, snapshot creation and restores (a
/// restore needs the same devices in the same order): the agent's root disk,
/// the image disk, the scratch disk, vsock, rng, net, fs. The network and
/// file-sharing devices are always there (the snapshot's guest has probed
/// them); `net` and `fs` are their backends.
#[allow(clippy::too_many_arguments)]
pub fn vm_config(
    kernel: &Path,
    agent_disk: &Path,
    image: &Path,
    scratch: &Path,
    vsock: &Path,
    cpus: u8,
    memory: u64,
    console: Option<Box<dyn Write + Send>>,
    net: std::os::unix::net::UnixStream,
    fs: Option<std::os::fd::OwnedFd>,
) -> VmConfig {
    // The agent's disk is the guest's root; extra parameters (VMC_KERNEL_ARGS)
    // are for experiments and debugging.
    let mut cmdline: Vec<String> = ["root=/dev/vda", "ro", "rootfstype=erofs", "init=/init"]
        .map(String::from)
        .to_vec();
    if let Some(extra) = &crate::host::knobs().kernel_args {
        cmdline.extend(extra.split_whitespace().map(String::from));
    }
    let disk = |path: &Path, read_only, id: &str| {
        DeviceConfig::Block(DiskConfig {
            path: path.to_path_buf(),
            read_only,
            id: id.into(),
        })
    };
    let mut vm = VmConfig::new(kernel, cpus, memory)
        .with_cmdline(cmdline)
        .with_device(disk(agent_disk, true, "vmc-agent"))
        .with_device(disk(image, true, "vmc-image"))
        .with_device(disk(scratch, false, "vmc-scratch"))
        .with_device(DeviceConfig::Vsock {
            cid: GUEST_CID,
            uds: vsock.to_path_buf(),
        })
        .with_device(DeviceConfig::Rng)
        .with_device(DeviceConfig::Net {
            mac: GUEST_MAC,
            backend: net,
        })
        // Always there, as the network device is (the snapshot's guest has
        // probed it); with volumes, its file server is `fs`.
        .with_device(DeviceConfig::Fs { backend: fs });
    vm.console = console;
    vm.guest_profile = crate::host::knobs().guest_profile.clone();
    vm
}

/// The guest NIC's hardware address (locally administered). passt learns
/// it from the guest's frames; every VM may use the same one, each behind
/// its own passt.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x63, 0x00, 0x01];

/// A network backend that is not connected: a socket whose peer is closed
/// (the device drops what the guest sends; nothing arrives).
pub fn unplugged() -> std::io::Result<std::os::unix::net::UnixStream> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    Ok(a)
}

/// The refresh message for a restored guest: host time and 64 fresh bytes.
pub fn refresh_msg() -> HostMsg {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut entropy = vec![0u8; 64];
    let mut done = 0;
    while done < entropy.len() {
        // SAFETY: the pointer and length describe the unfilled tail of entropy.
        let n = unsafe {
            libc::getrandom(entropy[done..].as_mut_ptr().cast(), entropy.len() - done, 0)
        };
        if n > 0 {
            done += n as usize;
        }
    }
    HostMsg::Refresh {
        realtime_ns: now,
        entropy,
    }
}

/// `progress`, but failing with [`AgentError::Interrupted`] once
/// `cancelled` says so.
pub fn or_cancelled<'a>(
    cancelled: &'a dyn Fn() -> bool,
    mut progress: impl FnMut() -> Result<(), AgentError> + 'a,
) -> impl FnMut() -> Result<(), AgentError> + 'a {
    move || {
        if cancelled() {
            return Err(AgentError::Interrupted);
        }
        progress()
    }
}

/// A watch over the VM run by process `pid` (a container's supervisor, or
/// this process), from its threads' names (`vcpuN`, `vmm-events`), allowing
/// [`ANSWER_CPU`] of vCPU time.
pub fn process_watch(pid: u32) -> impl FnMut() -> Result<(), AgentError> {
    let threads = Threads::of_process(pid);
    let mut dog = Watchdog::new(ANSWER_CPU);
    move || verdict(dog.observe(std::time::Instant::now(), threads.sample()))
}

/// A watchdog's verdict as the result of a wait's check.
pub fn verdict(v: Verdict) -> Result<(), AgentError> {
    match v {
        Verdict::Working => Ok(()),
        Verdict::Ended => Err(AgentError::VmStopped),
        Verdict::Hung(why) => Err(AgentError::Hung(why)),
    }
}

/// The error for a wait that failed, given how the VM then ended (a crash
/// says more than the closed connection it caused).
pub fn ended(e: AgentError, exit: VmExit) -> RuntimeError {
    match (e, exit) {
        (_, VmExit::Seccomp(why)) => RuntimeError::VmmKilled(why),
        (
            AgentError::VmStopped | AgentError::Frame(_) | AgentError::ClosedEarly,
            VmExit::Crashed(why),
        ) => RuntimeError::VmCrashed(why),
        (e, _) => e.into(),
    }
}
