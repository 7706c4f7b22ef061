//! Unix socket paths of any length. `sun_path` holds 108 bytes, and a VM's
//! socket under a long `$VMC_HOME` (a rootless user's
//! `~/.local/share/vmc/containers/<64-hex id>/vsock.sock`) does not fit. A
//! longer path is reached through its directory: opened `O_PATH`, then named
//! as `/proc/self/fd/<fd>/<file name>`, which the kernel resolves to the same
//! directory.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest path that fits `sun_path` with its terminating NUL.
const SUN_PATH_MAX: usize = 107;

fn via_dir<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    if short.as_os_str().len() > SUN_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket file name too long: {}", path.display()),
        ));
    }
    let r = f(&short);
    drop(dir);
    r
}

/// Binds a listening socket at `path`, however long.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    via_dir(path, |p| UnixListener::bind(p))
}

/// Connects to the socket at `path`, however long.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    via_dir(path, |p| UnixStream::connect(p))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn sockets_deeper_than_sun_path_bind_and_connect() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("vsock.sock");
        assert!(path.as_os_str().len() > 108);
        assert!(
            UnixListener::bind(&path).is_err(),
            "too long for bind(2) as is"
        );
        let l = bind(&path).unwrap();
        assert!(path.exists(), "the socket file is where it was asked for");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hi").unwrap();
        });
        let mut c = connect(&path).unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        t.join().unwrap();
        // Short paths go as they are.
        let short = base.path().join("s.sock");
        let _l = bind(&short).unwrap();
        connect(&short).unwrap();
    }
}
