//! The VMM process's jail, entered once its VM is built (every file,
//! device and socket it needs is open) and before any vCPU runs.
//!
//! The namespaces (mount, PID, IPC, UTS, network, and a user namespace when
//! vmc runs rootless) come from the clone that started the process
//! ([`super::process`]); here the process
//! * makes its mounts private and pivots into its per-VM directory, an empty
//!   directory mounted read-only, nosuid, nodev, noexec, with the host's tree
//!   detached: no /proc, /sys, /dev or /etc of the host, nothing to open;
//! * sets its limits (RLIMIT_NOFILE, RLIMIT_NPROC with a uid of its own,
//!   RLIMIT_CORE 0);
//! * drops every capability (bounding, ambient, permitted, effective,
//!   inheritable) and becomes its unprivileged uid and gid (as root: the
//!   VM's own ids; rootless: the invoking user, root only of its own user
//!   namespace and without capabilities there either);
//! * sets no_new_privs and makes itself non-dumpable.
//!
//! Seccomp filters come after, per thread ([`super::seccomp`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where and as whom the VMM runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailSpec {
    /// The per-VM directory that becomes the root (kept empty).
    pub root: PathBuf,
    /// The uid and gid to become; None when rootless (the user namespace
    /// maps only the invoking user, as root of the namespace).
    pub ids: Option<(u32, u32)>,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_NPROC (with a uid of its own: its threads).
    pub nproc: Option<u64>,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

static ENTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is in its jail (where no host path resolves).
/// Makes directory `root` (a mount point) this process's root, with the
/// old root detached: nothing above it can be reached again, not even by
/// `..` from a descriptor opened before (as the kernel stops `..` at a
/// process's root). The process must be in a mount namespace of its own.
pub fn pivot_into(root: &std::ffi::CStr) -> std::io::Result<()> {
    let ok = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: chdir/pivot_root/umount2 on NUL-terminated paths.
    unsafe {
        ok(libc::chdir(root.as_ptr()))?;
        ok(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        ok(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        ok(libc::chdir(c"/".as_ptr()))
    }
}

/// A SEQPACKET socket pair, both ends close-on-exec: one message per
/// write, kept whole (the control protocol, the virtio-fs server).
pub fn seqpacket_pair() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

pub fn entered() -> bool {
    ENTERED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Enters the jail (call on the only thread of the process).
pub fn enter(spec: &JailSpec) -> Result<(), String> {
    ENTERED.store(true, std::sync::atomic::Ordering::Relaxed);
    let root = CString::new(spec.root.as_os_str().as_bytes())
        .map_err(|_| "the jail path has a NUL byte".to_string())?;
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them.
    unsafe {
        check(
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making the mounts private",
        )?;
        check(
            libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ),
            "binding the jail directory",
        )?;
        pivot_into(&root).map_err(|e| format!("entering the jail: {e}"))?;
        // The mount's atime flags as they are: in a user namespace
        // (rootless) they are locked, and a remount must keep them.
        let mut st: libc::statvfs = std::mem::zeroed();
        check(libc::statvfs(c"/".as_ptr(), &mut st), "statvfs /")?;
        let mut atime = 0;
        for (st_flag, ms_flag) in [
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ] {
            if st.f_flag & st_flag != 0 {
                atime |= ms_flag;
            }
        }
        check(
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC
                    | atime,
                std::ptr::null(),
            ),
            "making the jail read-only",
        )?;
    }
    let limit = |res, n: u64, what| {
        let l = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: l is a valid rlimit.
        check(unsafe { libc::setrlimit(res, &l) }, what)
    };
    limit(libc::RLIMIT_NOFILE, spec.nofile, "RLIMIT_NOFILE")?;
    limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    if let Some(n) = spec.nproc {
        limit(libc::RLIMIT_NPROC, n, "RLIMIT_NPROC")?;
    }
    drop_privileges(spec.ids)
}

fn drop_privileges(ids: Option<(u32, u32)>) -> Result<(), String> {
    // SAFETY: prctl, setgroups, setres[ug]id and capset with valid
    // arguments; the cap structs live across the call.
    unsafe {
        // The bounding set, while CAP_SETPCAP is still held: every
        // capability this kernel knows (prctl fails past the last).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(os_err("dropping the capability bounding set"));
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
            "clearing ambient capabilities",
        )?;
        if let Some((uid, gid)) = ids {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
        }
        // Whatever is left (rootless: root of the user namespace).
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let hdr = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [Data::default(); 2];
        check(
            libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) as libc::c_int,
            "dropping capabilities",
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "no_new_privs",
        )?;
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")?;
    }
    Ok(())
}
