//! Looking things up inside the container root before the fork: files
//! (openat2 with RESOLVE_IN_ROOT), the executable as execve will find it,
//! and the cleaned working directory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::SpawnError;
use crate::sys::{check, cstr};
use vmc_proto::StartFailure;

pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

pub(super) fn read_in_root(root: &OwnedFd, path: &str) -> String {
    open_in_root(root, path, libc::O_RDONLY as u64)
        .map(|fd| std::io::read_to_string(std::fs::File::from(fd)).unwrap_or_default())
        .unwrap_or_default()
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
        let Ok(fd) = open_in_root(root, &in_root, libc::O_PATH as u64) else {
            continue;
        };
        // SAFETY: stat is plain data filled by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open; st is a valid out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            continue;
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0 {
            return Ok(c);
        }
        denied.get_or_insert(c);
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
/// `..` at the root stays at the root.
pub(super) fn clean_path(p: &str) -> String {
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
