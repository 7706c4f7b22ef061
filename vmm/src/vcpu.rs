//! vCPU threads: run KVM_RUN, dispatch port and MMIO exits to the buses, and
//! turn resets, shutdowns and errors into a VM exit reason.
//!
//! The exit dispatch is a pure function over the buses so it can be tested
//! without KVM. A stopping VMM kicks each vCPU thread with a real-time signal
//! whose handler sets `immediate_exit` in the thread's kvm_run, so a vCPU
//! about to enter the guest returns at once instead of missing the kick.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::exit::{ExitState, VmExit};
use super::snapshot::{SnapshotError, VcpuState};
use crate::devices::bus::Bus;

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Stop(VmExit),
}

/// KVM_SYSTEM_EVENT types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Handles one exit. Unclaimed port reads return all ones (an empty ISA bus);
/// unclaimed MMIO reads return zeros; unclaimed writes are dropped.
pub fn dispatch(exit: VcpuExit, pio: &Bus, mmio: &Bus) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(port as u64, data) {
                data.fill(0xff);
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(port as u64, data);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            Next::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {
            Next::Continue
        }
        VcpuExit::Shutdown => Next::Stop(VmExit::Crashed(
            "the guest triple-faulted (CPU shutdown)".into(),
        )),
        VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _) => Next::Stop(VmExit::Reset),
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _) => Next::Stop(VmExit::Reset),
        VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH, _) => {
            Next::Stop(VmExit::Crashed("the guest reported a crash".into()))
        }
        VcpuExit::InternalError => Next::Stop(VmExit::Crashed(
            "KVM internal error: the virtualisation backend could not emulate a guest instruction"
                .into(),
        )),
        VcpuExit::FailEntry(reason, cpu) => Next::Stop(VmExit::Crashed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x} on cpu {cpu})"
        ))),
        other => Next::Stop(VmExit::Crashed(format!("unexpected vCPU exit {other:?}"))),
    }
}

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at this thread's kvm_run->immediate_exit, mapped for
        // as long as the thread's VcpuFd lives (the pointer is cleared first).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (process-wide, idempotent).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Guest instruction pointers sampled while profiling (see [`profile_sampler`]).
pub type Samples = Arc<std::sync::Mutex<Vec<u64>>>;

/// Pausing vCPUs for a snapshot: each vCPU thread, once out of KVM_RUN with
/// any pending I/O completed, saves its own state here and waits.
#[derive(Default)]
pub struct PauseCtl {
    state: std::sync::Mutex<PauseState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    saved: Vec<Option<Result<VcpuState, SnapshotError>>>,
}

impl PauseCtl {
    /// Asks `count` vCPUs to pause (the caller then kicks them).
    pub fn request(&self, count: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = true;
        st.saved = (0..count).map(|_| None).collect();
    }

    fn requested(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requested
    }

    /// Waits until every vCPU saved its state, up to `timeout`.
    pub fn wait_saved(
        &self,
        timeout: std::time::Duration,
    ) -> Option<Vec<Result<VcpuState, SnapshotError>>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.saved.iter().all(Option::is_some) {
                return Some(st.saved.iter_mut().filter_map(Option::take).collect());
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            st = self
                .cv
                .wait_timeout(st, left.min(std::time::Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = false;
        self.cv.notify_all();
    }

    fn park(&self, id: usize, vcpu: &VcpuFd, msr_list: &[u32], stop: &AtomicBool) {
        let saved = VcpuState::save(vcpu, msr_list);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = st.saved.get_mut(id) {
            *slot = Some(saved);
        }
        self.cv.notify_all();
        while st.requested && !stop.load(Ordering::SeqCst) {
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a vCPU thread shares with the VMM.
pub struct VcpuCtx {
    pub id: usize,
    pub pio: Bus,
    pub mmio: Bus,
    pub stop: Arc<AtomicBool>,
    pub exit: Arc<ExitState>,
    pub pause: Arc<PauseCtl>,
    pub msr_list: Arc<Vec<u32>>,
    /// With samples, every kick records the guest RIP.
    pub samples: Option<Samples>,
}

/// One vCPU's thread body.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuCtx) {
    let ptr: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
    while !ctx.stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(e) => {
                if let Next::Stop(reason) = dispatch(e, &ctx.pio, &ctx.mmio) {
                    if let VmExit::Crashed(_) = reason {
                        log::debug!("vCPU registers: {:?}", vcpu.get_regs());
                    }
                    ctx.exit.signal(reason);
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if let (Some(s), Ok(regs)) = (&ctx.samples, vcpu.get_regs()) {
                    s.lock().unwrap_or_else(|e| e.into_inner()).push(regs.rip);
                }
                if ctx.pause.requested() {
                    ctx.pause.park(ctx.id, &vcpu, &ctx.msr_list, &ctx.stop);
                }
            }
            Err(e) => {
                ctx.exit
                    .signal(VmExit::Crashed(format!("KVM_RUN failed: {e}")));
                break;
            }
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

/// Kicks `thread` out of the guest every `period` until `stop`, so that its
/// vCPU loop samples the guest RIP: a sampling profiler of the guest kernel
/// (enabled with `VMC_GUEST_PROFILE=FILE`).
pub fn profile_sampler(
    thread: libc::pthread_t,
    stop: Arc<AtomicBool>,
    period: std::time::Duration,
) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(period);
        // SAFETY: the vCPU thread outlives this loop (stop is set before it is joined).
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::bus::BusDevice;

    struct Byte(u8, Vec<u8>);
    impl BusDevice for Byte {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.1.extend_from_slice(d);
        }
    }

    #[test]
    fn port_and_mmio_exits_reach_the_buses() {
        let dev = Arc::new(Mutex::new(Byte(0x42, Vec::new())));
        let mut pio = Bus::default();
        pio.insert(dev.clone(), 0x60, 5).unwrap();
        let mmio = Bus::default();
        let mut d = [0u8; 1];
        assert_eq!(
            dispatch(VcpuExit::IoIn(0x64, &mut d), &pio, &mmio),
            Next::Continue
        );
        assert_eq!(d[0], 0x42);
        assert_eq!(
            dispatch(VcpuExit::IoIn(0x80, &mut d), &pio, &mmio),
            Next::Continue
        );
        assert_eq!(d[0], 0xff, "empty port");
        dispatch(VcpuExit::IoOut(0x64, &[0xfe]), &pio, &mmio);
        assert_eq!(dev.lock().unwrap().1, vec![0xfe]);
        let mut m = [9u8; 4];
        dispatch(VcpuExit::MmioRead(0xd000_0000, &mut m), &pio, &mmio);
        assert_eq!(m, [0; 4], "empty mmio");
    }

    #[test]
    fn resets_and_faults_stop_the_vm() {
        let (pio, mmio) = (Bus::default(), Bus::default());
        assert_eq!(
            dispatch(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, &[]), &pio, &mmio),
            Next::Stop(VmExit::Reset)
        );
        assert!(matches!(
            dispatch(VcpuExit::Shutdown, &pio, &mmio),
            Next::Stop(VmExit::Crashed(_))
        ));
        assert!(matches!(
            dispatch(VcpuExit::InternalError, &pio, &mmio),
            Next::Stop(VmExit::Crashed(m)) if m.contains("emulate")
        ));
        assert_eq!(dispatch(VcpuExit::Hlt, &pio, &mmio), Next::Continue);
    }
}
