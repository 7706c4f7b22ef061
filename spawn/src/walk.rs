//! Walking a tree inside a container root by descriptors (`vmc cp`): each
//! step is an `openat` with O_NOFOLLOW from the directory opened before,
//! never a path the kernel walks again, so a container that swaps a
//! directory for a symlink while it is read cannot lead the walk out of
//! its root (Docker's CVE-2018-15664). Shared by the host (namespace mode)
//! and the guest agent (a microVM), each writing the entries as a tar.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use crate::sys::{check, cstr};

/// One entry met by [`walk`].
pub struct Entry<'a> {
    /// Its name in the archive: the top name, then the path below it.
    pub name: &'a str,
    pub stat: &'a libc::stat,
    /// A regular file, opened for reading.
    pub file: Option<File>,
    /// A symlink's target.
    pub link: Option<CString>,
}

/// How deep a walk may go (paths are bounded by PATH_MAX long before).
const MAX_DEPTH: usize = 1024;

fn stat_at(dir: libc::c_int, name: &CStr, follow: bool) -> io::Result<libc::stat> {
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: an all-zero stat is valid for fstatat to fill; name is NUL-terminated.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            dir,
            name.as_ptr(),
            &mut st,
            flags | libc::AT_EMPTY_PATH,
        ))?;
        Ok(st)
    }
}

fn open_at(dir: libc::c_int, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: openat on a NUL-terminated name; the result is checked.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The content of symlink `name` in directory `dir`.
pub fn read_link_at(dir: libc::c_int, name: &CStr) -> io::Result<CString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat into a buffer of the length given.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    cstr(OsStr::from_bytes(&buf))
}

/// Walks `path` inside the directory tree `root` (symlinks along the path
/// resolve within it; the last one too with `follow`), calling `f` for it
/// and, for a directory, everything below it (parents first), named from
/// `top`. Device nodes, fifos and sockets are passed with their stat only.
pub fn walk(
    root: &OwnedFd,
    path: &str,
    follow: bool,
    top: &str,
    f: &mut dyn FnMut(Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let clean = crate::clean_path(&format!("/{path}"));
    let (parent, name) = match clean.rsplit_once('/') {
        Some((p, n)) if !n.is_empty() => (if p.is_empty() { "/" } else { p }, n),
        _ => ("/", ""),
    };
    let dir = crate::open_path_in_root(root, parent)?;
    if name.is_empty() {
        // The root itself.
        let d = open_at(root.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
        return visit(d.as_raw_fd(), c"", top, false, 0, f);
    }
    let name = cstr(name)?;
    if follow {
        // Resolved inside the root, as any path of it.
        let target = crate::open_path_in_root(root, &clean)?;
        return visit(target.as_raw_fd(), c"", top, true, 0, f);
    }
    visit(dir.as_raw_fd(), &name, top, false, 0, f)
}

/// `name` in `dir` (or `dir` itself for an empty name, with `follow` for a
/// descriptor of a path already resolved).
fn visit(
    dir: libc::c_int,
    name: &CStr,
    shown: &str,
    follow: bool,
    depth: usize,
    f: &mut dyn FnMut(Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("the tree is too deep"));
    }
    let st = stat_at(dir, name, follow)?;
    let open_name: &CStr = if name.is_empty() { c"." } else { name };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            let d = if name.is_empty() {
                // Reopened for reading (the descriptor may be O_PATH).
                open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?
            } else {
                open_at(
                    dir,
                    open_name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                )?
            };
            f(Entry {
                name: shown,
                stat: &st,
                file: None,
                link: None,
            })?;
            let mut names: Vec<Vec<u8>> =
                std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))?
                    .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                    .collect::<io::Result<_>>()?;
            names.sort();
            for n in names {
                let child = format!("{shown}/{}", String::from_utf8_lossy(&n));
                let c = CString::new(n).map_err(io::Error::other)?;
                visit(d.as_raw_fd(), &c, &child, false, depth + 1, f)?;
            }
            Ok(())
        }
        libc::S_IFREG => {
            // Non-blocking: a file swapped for a fifo since the stat must
            // not hang the copy; the descriptor must be the file stat saw.
            let file = if name.is_empty() {
                // A resolved O_PATH descriptor: reopened through /proc.
                let p = cstr(format!("/proc/self/fd/{dir}"))?;
                open_at(libc::AT_FDCWD, &p, libc::O_RDONLY | libc::O_NONBLOCK)?
            } else {
                open_at(
                    dir,
                    open_name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                )?
            };
            let now = stat_at(file.as_raw_fd(), c"", false)?;
            if now.st_mode & libc::S_IFMT != libc::S_IFREG
                || (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
            {
                return Err(io::Error::other(format!("{shown} changed while copied")));
            }
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
            let file = File::from(file);
            f(Entry {
                name: shown,
                stat: &st,
                file: Some(file),
                link: None,
            })
        }
        libc::S_IFLNK => {
            let link = read_link_at(dir, name)?;
            f(Entry {
                name: shown,
                stat: &st,
                file: None,
                link: Some(link),
            })
        }
        _ => f(Entry {
            name: shown,
            stat: &st,
            file: None,
            link: None,
        }),
    }
}

/// A reader that gives exactly `left` bytes: the file's, then zeros if it
/// shrank while read (a tar entry's size is fixed once its header is out).
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: io::Read> io::Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes `path` of the tree `root` to `out` as a tar whose top entry is
/// named `top` (see [`walk`]); `owner` replaces every entry's uid and gid
/// (`vmc cp` without `-a`). Device nodes, fifos and sockets are left out.
pub fn write_tar(
    root: &OwnedFd,
    path: &str,
    follow: bool,
    top: &str,
    owner: Option<(u32, u32)>,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    walk(root, path, follow, top, &mut |e| {
        let st = e.stat;
        let mut h = tar::Header::new_gnu();
        h.set_mode(st.st_mode & 0o7777);
        let (uid, gid) = owner.unwrap_or((st.st_uid, st.st_gid));
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mtime(st.st_mtime.max(0) as u64);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", e.name), io::empty())
            }
            libc::S_IFREG => {
                h.set_entry_type(tar::EntryType::Regular);
                let size = st.st_size.max(0) as u64;
                h.set_size(size);
                let file = e
                    .file
                    .ok_or_else(|| io::Error::other("a file not opened"))?;
                b.append_data(
                    &mut h,
                    e.name,
                    Exact {
                        inner: file,
                        left: size,
                    },
                )
            }
            libc::S_IFLNK => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let target = e.link.unwrap_or_default();
                b.append_link(&mut h, e.name, OsStr::from_bytes(target.as_bytes()))
            }
            _ => Ok(()),
        }
    })?;
    b.finish()
}
