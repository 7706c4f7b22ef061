//! Looking things up inside the container root before the fork: files
//! (openat2 with RESOLVE_IN_ROOT), the executable as execve will find it,
//! and the cleaned working directory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::SpawnError;
use crate::sys::{check, cstr};
use vmc_proto::StartFailure;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Opens `path` inside `root` (symlinks resolve within the root) as O_PATH.
pub(super) fn open_in_root(root: &OwnedFd, path: &str, flags: u64) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: open_how is plain data; all-zero is valid (and required for unused fields).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags | libc::O_CLOEXEC as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: p is NUL-terminated and how is a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: openat2 returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `path` inside `root` (symlinks and `..` resolve within
/// the root) for reading.
pub fn open_dir_in_root(root: &OwnedFd, path: &str) -> io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    open_in_root(
        root,
        if rel.is_empty() { "." } else { rel },
        (libc::O_RDONLY | libc::O_DIRECTORY) as u64,
    )
}

/// Opens `path` inside `root` (symlinks and `..` resolve within the root)
/// as an O_PATH descriptor: a mount point to mount through
/// `/proc/self/fd`.
pub fn open_path_in_root(root: &OwnedFd, path: &str) -> io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    open_in_root(
        root,
        if rel.is_empty() { "." } else { rel },
        libc::O_PATH as u64,
    )
}

/// The most bytes of a root's /etc/passwd or /etc/group read: an image's
/// could be any size, and namespace mode reads it on the host.
pub const MAX_ID_FILE: u64 = 4 << 20;

/// The first [`MAX_ID_FILE`] bytes of a file in the root (invalid UTF-8
/// replaced), or nothing when it cannot be read.
pub(super) fn read_in_root(root: &OwnedFd, path: &str) -> String {
    let mut buf = Vec::new();
    match open_in_root(root, path, libc::O_RDONLY as u64) {
        Ok(fd) => {
            let _ = io::Read::read_to_end(
                &mut io::Read::take(std::fs::File::from(fd), MAX_ID_FILE),
                &mut buf,
            );
        }
        Err(_) => return String::new(),
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// [`read_in_root`] for a root given by its path (empty when the root
/// cannot be opened).
pub fn read_in_root_path(root: &std::path::Path, path: &str) -> String {
    match std::fs::File::open(root) {
        Ok(f) => read_in_root(&OwnedFd::from(f), path),
        Err(_) => String::new(),
    }
}

/// The names in `dir` of the root at `root` that resolve (symlinks within
/// the root) to an executable regular file, as [`resolve_executable`] would
/// find them; an error when `dir` holds more than `max` entries.
pub fn executables_in(root: &std::path::Path, dir: &str, max: usize) -> io::Result<Vec<String>> {
    let root = OwnedFd::from(std::fs::File::open(root)?);
    let d = open_in_root(&root, dir, (libc::O_RDONLY | libc::O_DIRECTORY) as u64)?;
    let mut names = Vec::new();
    for (n, entry) in std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))?.enumerate() {
        if n >= max {
            return Err(io::Error::other(format!(
                "{dir} has more than {max} entries"
            )));
        }
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if executable_in_root(&root, &format!("{dir}/{name}")) == Some(true) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// `spec`'s executable and identity found from what is known of its root
/// without reading it: its passwd and group files and `is_executable(dir,
/// name)`, which answers for the PATH directories it knows (`None`: an
/// unknown directory). `None` when the root itself is needed (a command
/// with a `/`, a relative PATH entry before the match, an unknown
/// directory, user or group, or no match): the agent then looks in the
/// root, and reports what is wrong as it always does.
pub fn resolve_ahead(
    spec: &vmc_proto::ProcessSpec,
    passwd: &str,
    group: &str,
    is_executable: impl Fn(&str, &str) -> Option<bool>,
) -> Option<vmc_proto::Resolved> {
    let prog = spec.args.first()?;
    if prog.contains('/') || prog.is_empty() {
        return None;
    }
    let user = crate::user::resolve(&spec.user, passwd, group).ok()?;
    for dir in path_var(&spec.env).split(':') {
        if !dir.starts_with('/') {
            return None;
        }
        let dir = dir.trim_end_matches('/');
        if is_executable(dir, prog)? {
            return Some(vmc_proto::Resolved {
                path: format!("{dir}/{prog}"),
                uid: user.uid,
                gid: user.gid,
                groups: user.groups,
                home: user.home,
            });
        }
    }
    None
}

/// Whether `path` in the root (symlinks resolved within it) is an
/// executable regular file; `None` when it cannot be found.
fn executable_in_root(root: &OwnedFd, path: &str) -> Option<bool> {
    let fd = open_in_root(root, path, libc::O_PATH as u64).ok()?;
    // SAFETY: stat is plain data filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0)
}

/// The PATH a process with environment `env` searches: its last `PATH=`,
/// else [`DEFAULT_PATH`].
pub(super) fn path_var(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Looks up argv\[0\] as execvp would, but inside `root`.
/// Finds `prog` as execve will (relative paths from the working directory
/// `cwd`, where the child execs), checking inside the container's root.
pub(super) fn resolve_executable(
    root: &OwnedFd,
    prog: &str,
    path_var: &str,
    cwd: &str,
) -> Result<String, SpawnError> {
    let not_found = || SpawnError {
        kind: StartFailure::NotFound,
        message: if prog.contains('/') {
            format!("exec: \"{prog}\": stat {prog}: no such file or directory")
        } else {
            format!("exec: \"{prog}\": executable file not found in $PATH")
        },
    };
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.to_string()]
    } else {
        path_var
            .split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
            .collect()
    };
    let mut denied = None;
    for c in candidates {
        let in_root = if c.starts_with('/') {
            c.clone()
        } else {
            format!("{}/{c}", cwd.trim_end_matches('/'))
        };
        match executable_in_root(root, &in_root) {
            Some(true) => return Ok(c),
            Some(false) => {
                denied.get_or_insert(c);
            }
            None => {}
        }
    }
    match denied {
        Some(c) => Err(SpawnError {
            kind: StartFailure::CannotExecute,
            message: format!("exec: \"{c}\": permission denied"),
        }),
        None => Err(not_found()),
    }
}

/// Lexically cleans an absolute path: no `.`, `..` or empty components;
/// `..` at the root stays at the root (also how a build records WORKDIR).
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}
