//! How a container started on the host is confined ([`Isolation`], its
//! [`RootOp`]s and seccomp programs), and that description turned, before
//! the fork, into the C strings the child uses ([`PreparedIsolation`]).

use std::ffi::CString;
use std::io;

use crate::sys::cstr;

/// One step of preparing a container's root in the child, before it pivots
/// into it (namespace mode). The paths of `Mkdir`, `Touch`, a `Symlink`'s
/// link and a `Mount`'s target are inside the root, absolute as the
/// container sees them (`/dev/pts`), and resolve inside it (openat2 with
/// RESOLVE_IN_ROOT): a symlink of the image (`/etc -> /some/host/dir`) never
/// leads a step out onto the host. A `Mount`'s source is a host path unless
/// `source_in_root`; a `Write`'s path is a host path.
#[derive(Debug, Clone)]
pub enum RootOp {
    Mkdir(String, u32),
    /// mount(2); `optional` steps may fail (a path the image lacks).
    Mount {
        source: String,
        /// The source is a path inside the root (a bind of a part of it).
        source_in_root: bool,
        target: String,
        fstype: String,
        flags: libc::c_ulong,
        data: String,
        optional: bool,
    },
    Symlink {
        target: String,
        link: String,
    },
    /// An empty file to bind-mount onto.
    Touch(String),
    /// Write `data` to an existing file (joining a cgroup: `0` to its
    /// `cgroup.procs`).
    Write {
        path: String,
        data: String,
    },
}

/// How a container started on the host is confined (namespace mode). The
/// microVM needs none of this: the VM is the boundary.
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// Namespaces for the new process (`CLONE_NEWPID | CLONE_NEWUTS | ...`);
    /// with CLONE_NEWPID the workload is PID 1 of its namespace.
    pub clone_flags: libc::c_int,
    /// Root preparation, run in the child's own mount namespace.
    pub ops: Vec<RootOp>,
    pub hostname: Option<String>,
    /// Bring the loopback interface up (a new network namespace has it down).
    pub loopback_up: bool,
    /// Capabilities kept (bit n = capability n); all others are dropped from
    /// the bounding, permitted and effective sets (the inheritable set is
    /// emptied).
    pub keep_caps: Option<u64>,
    pub no_new_privs: bool,
    /// Already in the container's mount namespace, at its root (`vmc exec`
    /// after setns): no new mount namespace, no pivot.
    pub in_root: bool,
    /// The child is not dumpable until it execs the workload: a process of
    /// the container cannot open its /proc/PID/exe (vmc's binary) or
    /// ptrace it meanwhile. (Not in a user namespace vmc made: there the
    /// parent would lose access to the child's /proc files.)
    pub non_dumpable: bool,
    /// The process lives on when its parent ends (an OCI runtime's
    /// container, waited for by whoever adopts it); otherwise it is killed
    /// with its parent, vmc's supervisor (PR_SET_PDEATHSIG).
    pub outlives_parent: bool,
    /// seccomp filters installed, in order, right before the workload's
    /// execve (with `no_new_privs`, which they require); the kernel applies
    /// all of them to every system call and the most restrictive answer wins.
    pub seccomp: Vec<SeccompProgram>,
}

/// One classic-BPF seccomp program (see seccomp(2)), compiled by the caller.
#[derive(Clone, Default)]
pub struct SeccompProgram(pub Vec<libc::sock_filter>);

impl std::fmt::Debug for SeccompProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeccompProgram({} instructions)", self.0.len())
    }
}

/// Docker's default capability set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP.
pub const DOCKER_DEFAULT_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// The highest capability number the kernel may know (CAP_LAST_CAP is 40 in 6.x).
pub(super) const MAX_CAP: u32 = 63;

/// A [`RootOp`] as the child carries it out, allocated before the fork.
/// In-root paths are relative to the root (`dev/pts`), split into their
/// directory (`dir`, "" for the root itself) and last `name`.
pub(super) struct PreparedOp {
    pub(super) kind: u8, // 0 mkdir, 1 mount, 2 symlink, 3 touch, 4 write
    /// mkdir, touch, symlink: the directory and name of the path in the root;
    /// mount: the target and (in root) source; write: the host path in `a`.
    pub(super) a: CString,
    pub(super) b: CString,
    pub(super) dir: CString,
    pub(super) name: CString,
    /// mount: fstype and data; symlink: the link's content in `c`.
    pub(super) c: CString,
    pub(super) d: CString,
    pub(super) flags: libc::c_ulong,
    pub(super) mode: u32,
    pub(super) optional: bool,
    pub(super) source_in_root: bool,
    /// The step in words, for a report of its failure (read by the parent).
    pub(super) what: String,
}

/// `path` inside the root, relative to it: `/dev/pts` -> `dev/pts`.
fn in_root(path: &str) -> io::Result<CString> {
    let rel = path.trim_start_matches('/');
    cstr(if rel.is_empty() { "." } else { rel })
}

/// The directory and last name of a path in the root; the name must be an
/// ordinary one.
fn split_in_root(path: &str) -> io::Result<(CString, CString)> {
    let rel = path.trim_start_matches('/').trim_end_matches('/');
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    if matches!(name, "" | "." | "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{path}' does not name an entry of the root"),
        ));
    }
    Ok((cstr(if dir.is_empty() { "." } else { dir })?, cstr(name)?))
}

pub(super) struct PreparedIsolation {
    pub(super) clone_flags: libc::c_int,
    /// unshare(CLONE_NEWCGROUP) after the root ops (which join cgroups).
    pub(super) cgroupns: bool,
    pub(super) ops: Vec<PreparedOp>,
    pub(super) hostname: Option<CString>,
    pub(super) loopback_up: bool,
    pub(super) keep_caps: Option<u64>,
    pub(super) no_new_privs: bool,
    pub(super) in_root: bool,
    pub(super) non_dumpable: bool,
    pub(super) outlives_parent: bool,
    pub(super) seccomp: Vec<SeccompProgram>,
}

pub(super) fn prepare_isolation(iso: &Isolation) -> io::Result<PreparedIsolation> {
    // Without no_new_privs the kernel takes a filter only from a process
    // with CAP_SYS_ADMIN, which the child has dropped by then.
    if !iso.seccomp.is_empty() && !iso.no_new_privs {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a seccomp filter needs no_new_privs",
        ));
    }
    if let Some(p) = iso
        .seccomp
        .iter()
        .find(|p| p.0.is_empty() || p.0.len() > 4096)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a seccomp program of {} instructions (1 to 4096)",
                p.0.len()
            ),
        ));
    }
    let empty = || CString::new("").expect("no NUL");
    let op = |kind: u8| PreparedOp {
        kind,
        a: empty(),
        b: empty(),
        dir: empty(),
        name: empty(),
        c: empty(),
        d: empty(),
        flags: 0,
        mode: 0,
        optional: false,
        source_in_root: false,
        what: String::new(),
    };
    let ops = iso
        .ops
        .iter()
        .map(|o| {
            Ok(match o {
                RootOp::Mkdir(p, mode) => {
                    let (dir, name) = split_in_root(p)?;
                    PreparedOp {
                        dir,
                        name,
                        mode: *mode,
                        what: format!("making the directory {p}"),
                        ..op(0)
                    }
                }
                RootOp::Mount {
                    source,
                    source_in_root,
                    target,
                    fstype,
                    flags,
                    data,
                    optional,
                } => PreparedOp {
                    a: in_root(target)?,
                    b: if *source_in_root {
                        in_root(source)?
                    } else {
                        cstr(source)?
                    },
                    c: cstr(fstype)?,
                    d: cstr(data)?,
                    flags: *flags,
                    optional: *optional,
                    source_in_root: *source_in_root,
                    what: if source.is_empty() {
                        format!("remounting {target}")
                    } else {
                        format!("mounting {source} at {target}")
                    },
                    ..op(1)
                },
                RootOp::Symlink { target, link } => {
                    let (dir, name) = split_in_root(link)?;
                    PreparedOp {
                        dir,
                        name,
                        c: cstr(target)?,
                        optional: true,
                        ..op(2)
                    }
                }
                RootOp::Write { path, data } => PreparedOp {
                    what: format!("writing {path}"),
                    a: cstr(path)?,
                    b: CString::new(data.as_bytes()).map_err(io::Error::other)?,
                    ..op(4)
                },
                RootOp::Touch(p) => {
                    let (dir, name) = split_in_root(p)?;
                    PreparedOp {
                        dir,
                        name,
                        mode: 0o644,
                        optional: true,
                        what: format!("making the file {p}"),
                        ..op(3)
                    }
                }
            })
        })
        .collect::<io::Result<_>>()?;
    Ok(PreparedIsolation {
        // A new cgroup namespace is made in the child once it has joined
        // its cgroups (the first ops), so that they are its root, as in
        // Docker; made at clone time, the root would be vmc's cgroup.
        clone_flags: iso.clone_flags & !libc::CLONE_NEWCGROUP,
        cgroupns: iso.clone_flags & libc::CLONE_NEWCGROUP != 0,
        ops,
        hostname: iso.hostname.as_deref().map(cstr).transpose()?,
        loopback_up: iso.loopback_up,
        keep_caps: iso.keep_caps,
        no_new_privs: iso.no_new_privs,
        in_root: iso.in_root,
        non_dumpable: iso.non_dumpable,
        outlives_parent: iso.outlives_parent,
        seccomp: iso.seccomp.clone(),
    })
}
