//! Unpacking image layers (tar, optionally gzip or zstd) into a directory,
//! safely: layers are hostile input and vmc runs as root.
//!
//! Every path is resolved inside the target with `openat2(RESOLVE_IN_ROOT)`
//! (symlinks in the tree point inside it, as they would in the container), and
//! every file is created with `*at` calls relative to its parent's descriptor,
//! never following the final component. Entries with `..` are refused;
//! absolute paths are taken relative to the target; hard links resolve inside
//! it; device nodes are skipped; sizes and entry counts are bounded.
//!
//! OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are either applied (deleting
//! from what earlier layers unpacked into the same directory: a merged root
//! filesystem) or converted to overlayfs's format (a 0/0 character device,
//! the `trusted.overlay.opaque` xattr: a lower layer for overlayfs).

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

mod admit;

pub use admit::verify;
use admit::{admit, Admitted, Whiteout};

/// What to do with whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Delete what they hide (layers unpacked in order into one directory).
    Apply,
    /// Write them as overlayfs whiteouts (each layer in its own directory).
    Overlay,
    /// None: every entry is a plain file of its name, no xattr is set and
    /// set-id bits are dropped (`vmc cp`: a container's files on the host,
    /// or the host's in a container, are data, not a layer).
    Plain,
}

/// Bounds on what a layer may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_file: u64,
    pub max_total: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file: 16 << 30,
            max_total: 64 << 30,
            max_entries: 4 << 20,
        }
    }
}

/// What was unpacked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    /// Device nodes and other entries left out.
    pub skipped: Vec<String>,
}

/// Errors unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry '{path}' is refused: {why}")]
    Hostile { path: String, why: &'static str },
    #[error("layer entry '{path}': {source}")]
    Io { path: String, source: io::Error },
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("the layer exceeds the limit of {0}")]
    TooLarge(String),
}

fn io_at(path: &str) -> impl Fn(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_string(),
        source,
    }
}

/// Wraps `r` in a gzip or zstd decoder when its first bytes say so.
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let head = br.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// openat2(dirfd, path, flags, RESOLVE_IN_ROOT).
fn open_in_root(root: RawFd, path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let p = cstr(if path.as_os_str().is_empty() {
        b"."
    } else {
        path.as_os_str().as_bytes()
    })?;
    // SAFETY: open_how is plain data; zero is valid for unused fields.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: p is NUL-terminated; how is a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Normalises an entry path: `.` and a leading `/` are dropped, `..` refused.
fn clean(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("it contains '..'"),
            Component::Prefix(_) => return Err("it has a path prefix"),
        }
    }
    Ok(out)
}

/// The directory `dir` inside the root, created (0755, root-owned) if
/// missing. A dangling symlink on the way has its target created, inside the
/// root, as the container would see it.
fn ensure_dir(root: RawFd, dir: &Path) -> io::Result<OwnedFd> {
    ensure_dir_depth(root, dir, 0)
}

fn ensure_dir_depth(root: RawFd, dir: &Path, depth: usize) -> io::Result<OwnedFd> {
    const MAX_LINKS: usize = 40;
    match open_in_root(root, dir, libc::O_PATH | libc::O_DIRECTORY) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    if depth > MAX_LINKS {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    let mut cur = open_in_root(root, Path::new(""), libc::O_PATH | libc::O_DIRECTORY)?;
    let mut sofar = PathBuf::new();
    for comp in dir.components() {
        let parent = sofar.clone();
        sofar.push(comp);
        match open_in_root(root, &sofar, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => {
                cur = fd;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let name = cstr(comp.as_os_str().as_bytes())?;
        if let Some(target) = read_link_at(cur.as_raw_fd(), &name) {
            // Where the dangling link points, inside the root.
            let base = if target.is_absolute() {
                PathBuf::new()
            } else {
                parent
            };
            let mut resolved = PathBuf::new();
            for c in base.join(&target).components() {
                match c {
                    Component::Normal(n) => resolved.push(n),
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    _ => {}
                }
            }
            ensure_dir_depth(root, &resolved, depth + 1)?;
        } else {
            // SAFETY: cur is a directory fd; name is NUL-terminated.
            let r = unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) };
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::last_os_error());
            }
        }
        cur = open_in_root(root, &sofar, libc::O_PATH | libc::O_DIRECTORY)?;
    }
    Ok(cur)
}

/// The target of `name` in `dir` if it is a symlink.
fn read_link_at(dir: RawFd, name: &CString) -> Option<PathBuf> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: dir open, name NUL-terminated, buf valid for its length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// lstat of `name` in `dir`.
fn stat_at(dir: RawFd, name: &CString) -> Option<libc::stat> {
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: dir is open; name NUL-terminated; st a valid out pointer.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    (r == 0).then_some(st)
}

/// Removes `name` in `dir`, recursively if it is a directory, never following
/// symlinks (it works through the directory descriptor, not a path).
fn remove_at(dir: RawFd, name: &CString) -> io::Result<()> {
    let Some(st) = stat_at(dir, name) else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        // SAFETY: dir open, name NUL-terminated.
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) })?;
        return Ok(());
    }
    // SAFETY: as above; O_NOFOLLOW refuses a symlink swapped in meanwhile.
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh descriptor we own.
    let sub = unsafe { OwnedFd::from_raw_fd(fd) };
    clear_dir(sub.as_raw_fd(), &HashSet::new(), Path::new(""))?;
    // SAFETY: dir open, name NUL-terminated.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) })?;
    Ok(())
}

/// Removes every entry of the directory `dir` (whose path in the tree is
/// `at`) except those in `keep`.
fn clear_dir(dir: RawFd, keep: &HashSet<PathBuf>, at: &Path) -> io::Result<()> {
    let names: Vec<CString> = {
        // SAFETY: dup gives fdopendir its own descriptor to own and close.
        let dup = check(unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: dup is a directory descriptor; on success the DIR owns it.
        let d = unsafe { libc::fdopendir(dup) };
        if d.is_null() {
            // SAFETY: fdopendir failed, so dup is still ours to close.
            unsafe { libc::close(dup) };
            return Err(io::Error::last_os_error());
        }
        // SAFETY: d is a valid DIR until closedir; entries are copied out.
        unsafe { libc::rewinddir(d) };
        let mut out = Vec::new();
        loop {
            // SAFETY: d is valid.
            let e = unsafe { libc::readdir(d) };
            if e.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated within the dirent.
            let n = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                out.push(n.to_owned());
            }
        }
        // SAFETY: d is valid and closed once.
        unsafe { libc::closedir(d) };
        out
    };
    for n in names {
        let child = at.join(std::ffi::OsStr::from_bytes(n.to_bytes()));
        if !keep.contains(&child) {
            remove_at(dir, &n)?;
        }
    }
    Ok(())
}

struct Unpacker {
    root: OwnedFd,
    mode: Whiteouts,
    limits: Limits,
    /// Paths this layer created (an opaque whiteout keeps them).
    created: HashSet<PathBuf>,
    /// Directories whose mode and mtime are set at the end: children change
    /// the mtime, and a read-only directory (0555, as Fedora's /usr/bin) must
    /// stay writable while its entries arrive when unpacking without root.
    /// Each is known by its inode (device, number) as created: a later
    /// entry may replace the path by a symlink, which must not redirect the
    /// mode to another directory (the target's root included).
    dir_times: Vec<(PathBuf, i64, u32, (u64, u64))>,
    stats: Stats,
    /// `vmc cp`: every entry must be `top` or below it (what a container
    /// sends names nothing else of the destination).
    top: Option<PathBuf>,
    /// `vmc cp`: every entry's owner, whatever the tar says.
    owner: Option<(u32, u32)>,
}

/// Unpacks the tar stream `reader` (already decompressed) into `target`.
pub fn unpack<R: Read>(
    reader: R,
    target: &Path,
    mode: Whiteouts,
    limits: Limits,
) -> Result<Stats, LayerError> {
    let root = File::open(target)
        .map(OwnedFd::from)
        .map_err(io_at(&target.display().to_string()))?;
    unpack_fd(reader, root, mode, limits)
}

/// [`unpack`] into the directory open as `root` (every entry resolved
/// inside it).
pub fn unpack_fd<R: Read>(
    reader: R,
    root: OwnedFd,
    mode: Whiteouts,
    limits: Limits,
) -> Result<Stats, LayerError> {
    unpack_with(reader, root, mode, limits, None, None)
}

/// `vmc cp`'s unpacking (entries as plain files, see [`Whiteouts::Plain`])
/// into the directory open as `root`: every entry, and every hard link's
/// target, must be `top` or below it, and every entry is owned by `owner`
/// when given (a tar from a container says what it likes).
pub fn unpack_copy<R: Read>(
    reader: R,
    root: OwnedFd,
    top: &str,
    owner: Option<(u32, u32)>,
) -> Result<Stats, LayerError> {
    unpack_with(
        reader,
        root,
        Whiteouts::Plain,
        Limits::default(),
        Some(PathBuf::from(top)),
        owner,
    )
}

fn unpack_with<R: Read>(
    reader: R,
    root: OwnedFd,
    mode: Whiteouts,
    limits: Limits,
    top: Option<PathBuf>,
    owner: Option<(u32, u32)>,
) -> Result<Stats, LayerError> {
    let mut u = Unpacker {
        root,
        mode,
        limits,
        created: HashSet::new(),
        dir_times: Vec::new(),
        stats: Stats::default(),
        top,
        owner,
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(LayerError::Read)? {
        let entry = entry.map_err(LayerError::Read)?;
        u.entry(entry)?;
    }
    // Deepest and latest first: a directory's children before it, and of
    // two entries for one directory the later one wins.
    let mut done = HashSet::new();
    for (path, mtime, mode, made) in std::mem::take(&mut u.dir_times).into_iter().rev() {
        if !done.insert(made) {
            continue;
        }
        let Ok(fd) = open_in_root(
            u.root.as_raw_fd(),
            &path,
            libc::O_RDONLY | libc::O_DIRECTORY,
        ) else {
            continue;
        };
        if identity(fd.as_raw_fd()) != Some(made) {
            continue; // replaced since (by a symlink, or removed and remade)
        }
        let mode = if u.mode == Whiteouts::Plain {
            mode & !0o7000
        } else {
            allowed_mode(mode)
        };
        // SAFETY: fd is open.
        unsafe { libc::fchmod(fd.as_raw_fd(), mode) };
        set_times(fd.as_raw_fd(), mtime);
    }
    Ok(u.stats)
}

/// The mode an entry gets: without root the file stays the user's, and a
/// set-id bit would make it run as that user for anyone who can reach the
/// store.
fn allowed_mode(mode: u32) -> u32 {
    if crate::host::rootless() {
        mode & !0o6000
    } else {
        mode
    }
}

/// The (device, inode) of an open file.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: an all-zero stat is a valid value for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is a valid stat buffer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

fn set_times(fd: RawFd, mtime: i64) {
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: fd is open; times is a valid array of two timespecs.
    unsafe { libc::futimens(fd, times.as_ptr()) };
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), LayerError> {
        let Some(Admitted {
            path,
            shown,
            name,
            whiteout,
        }) = admit(&mut self.stats, &self.limits, &mut entry)?
        else {
            return Ok(()); // the root directory itself
        };
        if let Some(top) = &self.top {
            if !path.starts_with(top) {
                return Err(LayerError::Hostile {
                    path: shown,
                    why: "an entry outside what was asked for",
                });
            }
            if let Ok(Some(target)) = entry.link_name() {
                let hard = entry.header().entry_type() == tar::EntryType::Link;
                if hard && !clean(&target).is_ok_and(|t| t.starts_with(top)) {
                    return Err(LayerError::Hostile {
                        path: shown,
                        why: "a hard link to outside what was asked for",
                    });
                }
            }
        }
        let parent_path = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let header = entry.header().clone();
        let parent = ensure_dir(self.root.as_raw_fd(), &parent_path).map_err(io_at(&shown))?;
        let pfd = parent.as_raw_fd();
        let cname = cstr(name.as_bytes()).map_err(io_at(&shown))?;

        let whiteout = if self.mode == Whiteouts::Plain {
            Whiteout::None
        } else {
            whiteout
        };
        match whiteout {
            Whiteout::None => {}
            Whiteout::Opaque => return self.opaque(pfd, &parent_path, &shown),
            Whiteout::Of(hidden) => {
                let hidden_c = cstr(hidden.as_bytes()).map_err(io_at(&shown))?;
                return match self.mode {
                    Whiteouts::Apply | Whiteouts::Plain => {
                        remove_at(pfd, &hidden_c).map_err(io_at(&shown))
                    }
                    Whiteouts::Overlay => {
                        let _ = remove_at(pfd, &hidden_c);
                        // SAFETY: pfd open; hidden_c NUL-terminated; a 0/0 char device is overlayfs's whiteout.
                        check(unsafe { libc::mknodat(pfd, hidden_c.as_ptr(), libc::S_IFCHR, 0) })
                            .map(|_| ())
                            .map_err(io_at(&shown))
                    }
                };
            }
        }

        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = self.owner.unwrap_or((
            header.uid().unwrap_or(0) as libc::uid_t,
            header.gid().unwrap_or(0) as libc::gid_t,
        ));
        let mtime = header.mtime().unwrap_or(0) as i64;
        let existing = stat_at(pfd, &cname);
        let is_dir_now = existing.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if existing.is_some() && !(kind.is_dir() && is_dir_now) {
            remove_at(pfd, &cname).map_err(io_at(&shown))?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !is_dir_now {
                    // SAFETY: pfd open; cname NUL-terminated.
                    check(unsafe { libc::mkdirat(pfd, cname.as_ptr(), 0o700) })
                        .map_err(io_at(&shown))?;
                }
                // SAFETY: as above; O_NOFOLLOW: never a symlink.
                let fd = check(unsafe {
                    libc::openat(
                        pfd,
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                })
                .map_err(io_at(&shown))?;
                // SAFETY: fresh descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // Its own mode comes at the end (see dir_times).
                self.own(fd.as_raw_fd(), uid, gid, mode | 0o700, &shown)?;
                self.xattrs(fd.as_raw_fd(), &mut entry);
                let made = identity(fd.as_raw_fd())
                    .ok_or_else(|| io_at(&shown)(std::io::Error::last_os_error()))?;
                self.dir_times.push((path.clone(), mtime, mode, made));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // SAFETY: pfd open; cname NUL-terminated; O_EXCL|O_NOFOLLOW create a new file only.
                let fd = check(unsafe {
                    libc::openat(
                        pfd,
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                })
                .map_err(io_at(&shown))?;
                // SAFETY: fresh descriptor we own.
                let mut f = unsafe { File::from_raw_fd(fd) };
                let n = self.copy(&mut entry, &mut f, &shown)?;
                self.stats.bytes += n;
                self.own(f.as_raw_fd(), uid, gid, mode, &shown)?;
                self.xattrs(f.as_raw_fd(), &mut entry);
                set_times(f.as_raw_fd(), mtime);
            }
            tar::EntryType::Symlink => {
                let target =
                    entry
                        .link_name()
                        .map_err(LayerError::Read)?
                        .ok_or(LayerError::Hostile {
                            path: shown.clone(),
                            why: "a symlink without a target",
                        })?;
                let t = cstr(target.as_os_str().as_bytes()).map_err(io_at(&shown))?;
                // SAFETY: both strings NUL-terminated; the link is created, never followed.
                check(unsafe { libc::symlinkat(t.as_ptr(), pfd, cname.as_ptr()) })
                    .map_err(io_at(&shown))?;
                // SAFETY: AT_SYMLINK_NOFOLLOW changes the link itself.
                unsafe { libc::fchownat(pfd, cname.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
                let ts = libc::timespec {
                    tv_sec: mtime as libc::time_t,
                    tv_nsec: 0,
                };
                // SAFETY: valid timespecs; AT_SYMLINK_NOFOLLOW.
                unsafe {
                    libc::utimensat(
                        pfd,
                        cname.as_ptr(),
                        [ts, ts].as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
            }
            tar::EntryType::Link => {
                let target =
                    entry
                        .link_name()
                        .map_err(LayerError::Read)?
                        .ok_or(LayerError::Hostile {
                            path: shown.clone(),
                            why: "a hard link without a target",
                        })?;
                let tpath = clean(&target).map_err(|why| LayerError::Hostile {
                    path: shown.clone(),
                    why,
                })?;
                let tname = tpath.file_name().ok_or(LayerError::Hostile {
                    path: shown.clone(),
                    why: "a hard link to the root directory",
                })?;
                let tparent = open_in_root(
                    self.root.as_raw_fd(),
                    tpath.parent().unwrap_or(Path::new("")),
                    libc::O_PATH | libc::O_DIRECTORY,
                )
                .map_err(io_at(&shown))?;
                let tn = cstr(tname.as_bytes()).map_err(io_at(&shown))?;
                // SAFETY: both dirs open, names NUL-terminated; flags 0: a symlink target is linked, not followed.
                check(unsafe {
                    libc::linkat(tparent.as_raw_fd(), tn.as_ptr(), pfd, cname.as_ptr(), 0)
                })
                .map_err(io_at(&shown))?;
            }
            tar::EntryType::Fifo if self.mode == Whiteouts::Plain => {
                // Not data: a fifo would block whoever reads it.
                self.stats.skipped.push(shown);
                return Ok(());
            }
            tar::EntryType::Fifo => {
                // SAFETY: pfd open; cname NUL-terminated.
                check(unsafe { libc::mknodat(pfd, cname.as_ptr(), libc::S_IFIFO | mode, 0) })
                    .map_err(io_at(&shown))?;
                // SAFETY: as above.
                unsafe { libc::fchownat(pfd, cname.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // Device nodes give a container access to host devices: left out.
                self.stats.skipped.push(shown);
                return Ok(());
            }
            _ => {
                self.stats.skipped.push(shown);
                return Ok(());
            }
        }
        self.created.insert(path);
        Ok(())
    }

    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        f: &mut File,
        shown: &str,
    ) -> Result<u64, LayerError> {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(LayerError::Read)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            // Counted as written, not as the header says: a sparse entry
            // of a few bytes can expand to its whole apparent size.
            if total > self.limits.max_file {
                return Err(LayerError::TooLarge(format!(
                    "{} bytes for '{shown}'",
                    self.limits.max_file
                )));
            }
            if self.stats.bytes + total > self.limits.max_total {
                return Err(LayerError::TooLarge(format!(
                    "{} bytes in all",
                    self.limits.max_total
                )));
            }
            f.write_all(&buf[..n]).map_err(io_at(shown))?;
        }
    }

    fn own(
        &self,
        fd: RawFd,
        uid: libc::uid_t,
        gid: libc::gid_t,
        mode: u32,
        shown: &str,
    ) -> Result<(), LayerError> {
        // SAFETY: fd is open; chown before chmod (chown clears set-id bits).
        if let Err(e) = check(unsafe { libc::fchown(fd, uid, gid) }) {
            // Without root, files stay the unpacking user's, which rootless
            // namespace mode maps to the container's root (EPERM outside its
            // user namespace, EINVAL inside for an owner it does not map).
            let refused = matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL));
            if !refused || !crate::host::rootless() {
                return Err(io_at(shown)(e));
            }
        }
        let mode = if self.mode == Whiteouts::Plain {
            mode & !0o6000
        } else {
            allowed_mode(mode)
        };
        // SAFETY: as above.
        check(unsafe { libc::fchmod(fd, mode) }).map_err(io_at(shown))?;
        Ok(())
    }

    /// Applies PAX xattrs: `user.*` and `security.capability` only; trusted.*
    /// (overlayfs's own namespace) and anything else is left out.
    fn xattrs<R: Read>(&self, fd: RawFd, entry: &mut tar::Entry<'_, R>) {
        if self.mode == Whiteouts::Plain {
            return;
        }
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if !(name.starts_with("user.") || name == "security.capability") {
                continue;
            }
            let (Ok(n), v) = (cstr(name.as_bytes()), ext.value_bytes()) else {
                continue;
            };
            // SAFETY: fd open; name NUL-terminated; value pointer/len from a slice.
            unsafe { libc::fsetxattr(fd, n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        }
    }

    fn opaque(&mut self, pfd: RawFd, dir: &Path, shown: &str) -> Result<(), LayerError> {
        match self.mode {
            // Not a whiteout there: never reached.
            Whiteouts::Plain => Ok(()),
            Whiteouts::Apply => {
                // Hide what lower layers put here, keep what this layer added.
                // SAFETY: reopening the parent (an O_PATH fd) for reading its entries.
                let fd = check(unsafe {
                    libc::openat(
                        pfd,
                        c".".as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                })
                .map_err(io_at(shown))?;
                // SAFETY: fresh descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                clear_dir(fd.as_raw_fd(), &self.created, dir).map_err(io_at(shown))
            }
            Whiteouts::Overlay => {
                // SAFETY: as above.
                let fd = check(unsafe {
                    libc::openat(
                        pfd,
                        c".".as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                })
                .map_err(io_at(shown))?;
                // SAFETY: fresh descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: fd open; name and value are valid for the call.
                check(unsafe {
                    libc::fsetxattr(
                        fd.as_raw_fd(),
                        // Rootless namespace mode mounts overlayfs with
                        // userxattr (and cannot set trusted.* at all).
                        if crate::host::rootless() {
                            c"user.overlay.opaque".as_ptr()
                        } else {
                            c"trusted.overlay.opaque".as_ptr()
                        },
                        b"y".as_ptr().cast(),
                        1,
                        0,
                    )
                })
                .map(|_| ())
                .map_err(io_at(shown))
            }
        }
    }
}

#[cfg(test)]
mod tests;
