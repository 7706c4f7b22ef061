//! Why a VM stopped, and the one place that records it.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset line or a KVM reset event): a clean exit.
    Reset,
    /// The host stopped it.
    Stopped,
    /// Something went wrong; the message says what.
    Crashed(String),
    /// The VMM process made a system call its seccomp filter forbids; the
    /// message names the call and the thread.
    Seccomp(String),
}

/// The exit reason (first one wins) and the eventfd that wakes the event loop.
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<ExitState> {
        Ok(ExitState {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already set, and wakes the event loop.
    pub fn signal(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The eventfd to watch (and to hand to the i8042 as its reset line).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The recorded reason; a bare eventfd write (the i8042) means a reset.
    pub fn reason(&self) -> VmExit {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(VmExit::Reset)
    }
}
