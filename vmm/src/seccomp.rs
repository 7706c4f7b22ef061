//! The VMM's seccomp filters, one per kind of thread: each vCPU thread, the
//! event-loop thread and the main (control) thread installs its own
//! allow-list of exactly the system calls it makes once the VM runs, with
//! argument filters where a call is broad (ioctl numbers, mmap and mprotect
//! without PROT_EXEC, fcntl commands, signals only to this process).
//! Nothing opens a file or a socket after setup: `openat` and `socket` are on
//! no list.
//!
//! A call outside a thread's list traps (SIGSYS); the handler writes
//! `NR THREAD` to the report descriptor and makes the one call a second,
//! process-wide filter kills for, so that the process dies of SIGSYS and the
//! host can say which call in which thread did it. In `Log` mode a call
//! outside the list is allowed and logged by the kernel instead (a debugging
//! aid, never the default).
//!
//! Built with `seccompiler` (rust-vmm's, as Firecracker's filters are).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThreadKind {
    /// A vCPU thread (KVM_RUN, the buses, device activation).
    Vcpu,
    /// The event-loop thread (queues, disks, sockets).
    Events,
    /// The main thread: the host's control requests (stop, snapshot).
    Main,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Events => "events",
            ThreadKind::Main => "main",
        }
    }

    pub fn parse(s: &str) -> Option<ThreadKind> {
        [ThreadKind::Vcpu, ThreadKind::Events, ThreadKind::Main]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// What a call outside a thread's list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// The process dies of SIGSYS (after reporting the call). The default.
    Kill,
    /// The call goes through and the kernel logs it (debugging).
    Log,
}

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
/// Set a descriptor (non-)blocking: std's `set_nonblocking` on sockets.
const FIONBIO: u64 = 0x5421;

/// The call the SIGSYS handler makes to have the process killed: on no
/// allow-list, and the only call of the process-wide kill filter.
const KILL_MARKER: i64 = libc::SYS_kexec_load;

/// The filters of one VMM process.
pub struct Filters {
    kill: BpfProgram,
    vcpu: BpfProgram,
    events: BpfProgram,
    main: BpfProgram,
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .unwrap_or_else(|e| unreachable!("argument {arg} is in range: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).unwrap_or_else(|e| unreachable!("a rule has conditions: {e}"))
}

/// `nr` with `arg` equal to one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)]))
        .collect()
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every VMM thread does: memory it manages (never executable),
/// locks, signals to itself, time, reads and writes on descriptors it holds,
/// and ending.
fn common() -> Rules {
    let mut r = Rules::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_rt_sigreturn,
        // The kernel's continuation of a sleep a stop interrupted (`vmc
        // pause`'s SIGSTOP, then SIGCONT).
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mremap,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_epoll_ctl,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
    ] {
        r.insert(nr, vec![]);
    }
    // Anonymous memory and mappings of descriptors already open, never
    // executable: no new code in the VMM.
    let no_exec = || {
        vec![rule(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )])]
    };
    r.insert(libc::SYS_mmap, no_exec());
    r.insert(libc::SYS_mprotect, no_exec());
    // Signals to this process's own threads only (the vCPU kick,
    // pthread_kill): the VMM is PID 1 of its own PID namespace, and its
    // getpid() is checked when the filter is built.
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    r.insert(libc::SYS_tgkill, one_of(0, &[me]));
    // F_GETFL/F_SETFL (non-blocking), F_GETFD/F_SETFD (close-on-exec) and
    // F_DUPFD_CLOEXEC (std's try_clone).
    r.insert(
        libc::SYS_fcntl,
        one_of(
            1,
            &[
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        ),
    );
    r
}

fn allow(r: &mut Rules, nrs: &[i64]) {
    for &nr in nrs {
        r.insert(nr, vec![]);
    }
}

/// ioctl with one of `requests` (any descriptor: seccomp cannot see which
/// file a descriptor is, so the request numbers are the filter).
fn ioctls(r: &mut Rules, requests: &[u64]) {
    r.insert(libc::SYS_ioctl, one_of(1, requests));
}

/// Socket I/O on descriptors already open (vsock's host sockets, passt's).
fn socket_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
        ],
    );
}

fn vcpu_rules() -> Rules {
    let mut r = common();
    // A device activated or reset by the guest (on the vCPU that wrote its
    // status) registers or drops its backend's descriptors and sockets.
    socket_io(&mut r);
    allow(&mut r, &[libc::SYS_pread64, libc::SYS_pwrite64]);
    ioctls(
        &mut r,
        &[
            KVM_RUN() as u64,
            // A pause saves each vCPU's state on its own thread.
            KVM_GET_REGS() as u64,
            KVM_GET_SREGS() as u64,
            KVM_GET_MSRS() as u64,
            KVM_GET_LAPIC() as u64,
            KVM_GET_MP_STATE() as u64,
            KVM_GET_VCPU_EVENTS() as u64,
            KVM_GET_DEBUGREGS() as u64,
            KVM_GET_XSAVE() as u64,
            KVM_GET_XCRS() as u64,
            KVM_GET_CPUID2() as u64,
            FIONBIO,
        ],
    );
    r
}

fn events_rules() -> Rules {
    let mut r = common();
    socket_io(&mut r);
    allow(
        &mut r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            // The disks.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_lseek,
            // vsock: the host's connections to the guest.
            libc::SYS_accept4,
        ],
    );
    ioctls(&mut r, &[FIONBIO]);
    r
}

fn main_rules() -> Rules {
    let mut r = common();
    allow(
        &mut r,
        &[
            // The control socket (with the snapshot files' descriptors).
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Its threads' stat files (pread), snapshots into the files the
            // host opened.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fsync,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_mincore,
        ],
    );
    ioctls(
        &mut r,
        &[KVM_GET_IRQCHIP() as u64, KVM_GET_CLOCK() as u64, FIONBIO],
    );
    r
}

/// A program doing `matched` for the calls of `rules` and `mismatch` for
/// the rest.
fn compile(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp on {}: {e}", std::env::consts::ARCH))?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|e| format!("building a seccomp filter: {e}"))
}

impl Filters {
    /// The filters for this process (call it in the process that runs them:
    /// they name its pid).
    pub fn new(mode: Mode) -> Result<Filters, String> {
        let mismatch = match mode {
            Mode::Kill => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        };
        let kill = compile(
            [(KILL_MARKER, vec![])].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::KillProcess,
        )?;
        Ok(Filters {
            kill,
            vcpu: compile(vcpu_rules(), mismatch.clone(), SeccompAction::Allow)?,
            events: compile(events_rules(), mismatch.clone(), SeccompAction::Allow)?,
            main: compile(main_rules(), mismatch, SeccompAction::Allow)?,
        })
    }

    /// Installs the SIGSYS reporter (writing to `report`) and the
    /// process-wide kill filter, which every thread started afterwards
    /// inherits. Call on the main thread before the VMM's threads start.
    pub fn prepare(&self, report: i32) -> Result<(), String> {
        REPORT_FD.store(report, Ordering::SeqCst);
        // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO
        // signature; the handler is async-signal-safe (raw write and syscall).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(format!(
                    "installing the SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        seccompiler::apply_filter(&self.kill).map_err(|e| format!("seccomp: {e}"))
    }

    /// Installs `kind`'s filter on the calling thread, named `name` in a
    /// violation report.
    pub fn apply(&self, kind: ThreadKind, name: &str) -> Result<(), String> {
        let mut n = [0u8; 16];
        let len = name.len().min(15);
        n[..len].copy_from_slice(&name.as_bytes()[..len]);
        THREAD_NAME.with(|c| c.set(n));
        let prog = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Events => &self.events,
            ThreadKind::Main => &self.main,
        };
        seccompiler::apply_filter(prog).map_err(|e| format!("seccomp ({name}): {e}"))
    }
}

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Offset of `si_syscall` in a SIGSYS siginfo_t on 64-bit Linux: after
/// si_signo, si_errno, si_code, padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo_t; si_syscall is an int at
    // this offset on the 64-bit ABIs vmc builds for.
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut buf = [0u8; 48];
    let mut len = 0;
    let mut digits = [0u8; 12];
    let (mut v, mut d) = (nr.unsigned_abs(), 0);
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    buf[len] = b' ';
    len += 1;
    let name = THREAD_NAME.with(|c| c.get());
    for &b in name.iter().take_while(|&&b| b != 0) {
        buf[len] = b;
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // SAFETY: write and syscall are async-signal-safe; buf holds len bytes.
    unsafe {
        libc::write(fd, buf.as_ptr().cast(), len);
        libc::syscall(KILL_MARKER, 0, 0, 0, 0);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// Parses a violation report line (`NR THREAD`).
pub fn parse_report(line: &str) -> Option<(i64, String)> {
    let (nr, thread) = line.trim().split_once(' ')?;
    Some((nr.parse().ok()?, thread.to_string()))
}

/// Test-only: the forbidden call a thread makes when probed
/// (`VMC_TEST_SECCOMP_PROBE`): opening a host file.
#[cfg(feature = "test-hooks")]
pub fn probe(kind: ThreadKind) {
    let wanted = std::env::var("VMC_TEST_SECCOMP_PROBE").ok();
    if wanted.as_deref().and_then(ThreadKind::parse) == Some(kind) {
        // SAFETY: a NUL-terminated path; the call is expected to be killed.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/hostname".as_ptr(),
                libc::O_RDONLY,
            )
        };
    }
}

#[cfg(not(feature = "test-hooks"))]
pub fn probe(_: ThreadKind) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_reports_parse() {
        Filters::new(Mode::Kill).unwrap();
        Filters::new(Mode::Log).unwrap();
        assert_eq!(parse_report("257 vcpu0\n"), Some((257, "vcpu0".into())));
        assert_eq!(parse_report("garbage"), None);
    }

    #[test]
    fn no_list_allows_opening_files_making_sockets_or_the_kill_marker() {
        for (name, rules) in [
            ("vcpu", vcpu_rules()),
            ("events", events_rules()),
            ("main", main_rules()),
        ] {
            for nr in [
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_socket,
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
                KILL_MARKER,
            ] {
                assert!(!rules.contains_key(&nr), "{name} allows syscall {nr}");
            }
        }
    }
}
