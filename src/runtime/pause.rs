//! `vmc pause`/`vmc unpause`: a running container's processes stopped where
//! they are, and let go again. Namespace mode freezes the container's cgroup
//! (the freezer: v1's `freezer.state`, v2's `cgroup.freeze`), as Docker
//! does. A microVM's VMM process is stopped with SIGSTOP, which takes every
//! vCPU out of the guest and keeps it out (a signal interrupts `KVM_RUN`)
//! and holds the device threads too: the guest stops as a whole, its clock
//! catching up when it resumes (kvmclock follows the host's). SIGSTOP needs
//! no cgroup, so this works without root as well; SIGKILL still ends a
//! stopped VMM.

use std::path::Path;
use std::time::{Duration, Instant};

use super::state::{Container, Status};

/// What stops a pause or an unpause.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is already paused")]
    AlreadyPaused(String),
    #[error("container {0} is not paused")]
    NotPaused(String),
    #[error("container {0} has no freezer cgroup to pause it with (namespace mode without root has no cgroups; run as root)")]
    NoFreezer(String),
    #[error("container {0}: its VMM runs inside its supervisor (VMC_JAIL=0), which pausing would stop too")]
    Unjailed(String),
    #[error("container {id}: {source}")]
    Cgroup {
        id: String,
        source: super::cgroup::CgroupError,
    },
    #[error("container {id}: the VMM's threads did not stop")]
    Stuck { id: String },
}

/// The mark of a paused container in its state directory.
const PAUSED: &str = "paused";

fn short(c: &Container) -> String {
    c.state.id.chars().take(12).collect()
}

/// Whether `c` (its status fresh) is paused.
pub fn is_paused(c: &Container) -> bool {
    c.state.status == Status::Running && c.dir.join(PAUSED).exists()
}

/// How the container is held: the VMM's pid, or its freezer cgroup.
enum Hold {
    Vmm(u32),
    Freezer(std::path::PathBuf),
}

fn hold(c: &Container) -> Result<Hold, PauseError> {
    match c.state.mode {
        super::Mode::Vm => {
            let vmm = super::jail::Confinement::of_container(&c.dir)
                .filter(|v| is_vmm(v.pid))
                .ok_or_else(|| PauseError::Unjailed(short(c)))?;
            Ok(Hold::Vmm(vmm.pid))
        }
        super::Mode::Ns => {
            let dirs = super::cgroup::listed(&c.dir.join("cgroups"));
            super::cgroup::freezer_of(&dirs)
                .map(Hold::Freezer)
                .ok_or_else(|| PauseError::NoFreezer(short(c)))
        }
    }
}

/// Whether `pid` is still a VMM process (named `vmm`).
pub fn is_vmm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "vmm")
}

/// Whether every thread of `pid` is stopped (state `T`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('T' | 't')))
    })
}

/// Stops the VMM `pid` with SIGSTOP and waits until every thread of it
/// is stopped; one whose threads do not stop within a minute is let go
/// again (false).
pub fn stop_vmm(pid: u32) -> bool {
    // SAFETY: kill with a pid the caller checked to be a VMM's.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all_stopped(pid) {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Whether `pid` is a VMM stopped as a whole (paused).
pub fn vmm_stopped(pid: u32) -> bool {
    is_vmm(pid) && all_stopped(pid)
}

/// `vmc pause`.
pub fn pause(c: &mut Container) -> Result<(), PauseError> {
    if c.refresh() != Status::Running {
        return Err(PauseError::NotRunning(short(c)));
    }
    if is_paused(c) {
        return Err(PauseError::AlreadyPaused(short(c)));
    }
    match hold(c)? {
        Hold::Freezer(dir) => {
            super::cgroup::set_frozen(&dir, true).map_err(|source| PauseError::Cgroup {
                id: short(c),
                source,
            })?
        }
        Hold::Vmm(pid) => {
            if !stop_vmm(pid) {
                return Err(PauseError::Stuck { id: short(c) });
            }
        }
    }
    let _ = std::fs::write(c.dir.join(PAUSED), b"");
    Ok(())
}

/// `vmc unpause`.
pub fn unpause(c: &mut Container) -> Result<(), PauseError> {
    c.refresh();
    if !is_paused(c) {
        return Err(PauseError::NotPaused(short(c)));
    }
    resume(c)
}

fn resume(c: &Container) -> Result<(), PauseError> {
    match hold(c)? {
        Hold::Freezer(dir) => {
            super::cgroup::set_frozen(&dir, false).map_err(|source| PauseError::Cgroup {
                id: short(c),
                source,
            })?
        }
        // SAFETY: kill with a pid just checked to be the VMM's.
        Hold::Vmm(pid) => unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGCONT);
        },
    }
    let _ = std::fs::remove_file(c.dir.join(PAUSED));
    Ok(())
}

/// Lets a paused container go before it is stopped or killed (a frozen
/// process cannot act on a signal); nothing if it is not paused.
pub fn thaw_for_end(c: &Container) {
    if c.dir.join(PAUSED).exists() {
        let _ = resume(c);
    }
}

/// Forgets a pause of a container whose run ended (its processes are gone).
pub fn forget(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PAUSED));
}
