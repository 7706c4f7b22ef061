//! Disk images, built without mounting anything: the guest's root
//! disk holding the agent, a read-only EROFS image of a root filesystem
//! directory (mkfs.erofs), and an empty ext4 scratch disk for the container's
//! writable layer (mkfs.ext4); and, for namespace builds, such a disk mounted
//! through a loop device ([`LoopMount`]).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Errors building disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{tool} is not installed: install it with `apt-get install {package}` (or run `make setup`)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed on {path}: {detail}")]
    Failed {
        tool: &'static str,
        path: String,
        detail: String,
    },
}

fn run(
    tool: &'static str,
    package: &'static str,
    path: &Path,
    cmd: &mut Command,
) -> Result<(), DiskError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DiskError::MissingTool { tool, package }
        } else {
            DiskError::Failed {
                tool,
                path: path.display().to_string(),
                detail: e.to_string(),
            }
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let detail = lines
        .iter()
        .find(|l| l.contains("rror") || l.contains("invalid") || l.contains("No such"))
        .or(lines.last())
        .unwrap_or(&"no error output")
        .to_string();
    Err(DiskError::Failed {
        tool,
        path: path.display().to_string(),
        detail,
    })
}

/// Builds a read-only EROFS image of `dir` at `out` (ownership, modes,
/// symlinks, hard links, device nodes and xattrs preserved).
pub fn build_erofs(dir: &Path, out: &Path) -> Result<(), DiskError> {
    run(
        "mkfs.erofs",
        "erofs-utils",
        dir,
        Command::new("mkfs.erofs").arg("--quiet").arg(out).arg(dir),
    )
}

/// Where [`agent_disk`] keeps the disk of `agent` (named by its content).
pub fn agent_disk_path(agent: &Path, cache: &Path) -> Result<PathBuf, DiskError> {
    let failed = |detail: String| DiskError::Failed {
        tool: "sha256",
        path: agent.display().to_string(),
        detail,
    };
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(agent).map_err(|e| failed(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(cache.join(format!("agent-{digest}.erofs")))
}

/// The guest's own root disk: a small EROFS image with the agent as `/init`
/// and the mount points it needs, built once per agent binary and cached in
/// `cache` as `agent-<sha256 prefix>.erofs`. The kernel mounts it as `/`, so the
/// agent is paged in from disk on demand instead of being copied out of an
/// initramfs by the guest CPU, which is slow under software virtualisation.
pub fn agent_disk(agent: &Path, cache: &Path) -> Result<PathBuf, DiskError> {
    let failed = |detail: String| DiskError::Failed {
        tool: "mkfs.erofs",
        path: agent.display().to_string(),
        detail,
    };
    let out = agent_disk_path(agent, cache)?;
    if out.is_file() {
        return Ok(out);
    }
    let digest = out
        .file_stem()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("agent-"))
        .unwrap_or("")
        .to_string();
    std::fs::create_dir_all(cache).map_err(|e| failed(e.to_string()))?;
    let tag = format!(
        "{}.{}",
        std::process::id(),
        crate::host::new_id().get(..8).unwrap_or("")
    );
    let staging = cache.join(format!(".agent-{digest}.{tag}"));
    let tmp = cache.join(format!(".agent-{digest}.{tag}.erofs"));
    let result = (|| {
        for d in ["dev", "proc", "sys", "run", "tmp"] {
            std::fs::create_dir_all(staging.join(d)).map_err(|e| failed(e.to_string()))?;
        }
        let init = staging.join("init");
        std::fs::copy(agent, &init).map_err(|e| failed(e.to_string()))?;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| failed(e.to_string()))?;
        run(
            "mkfs.erofs",
            "erofs-utils",
            &staging,
            Command::new("mkfs.erofs")
                .args(["--quiet", "--all-root"])
                .arg(&tmp)
                .arg(&staging),
        )?;
        std::fs::rename(&tmp, &out).map_err(|e| failed(e.to_string()))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&tmp);
    result.map(|_| out)
}

/// Creates an empty, sparse ext4 filesystem of `size` bytes at `out`, without
/// a journal (the scratch layer is per container) and with lazily
/// initialised inode tables so creation writes only a few MiB.
pub fn build_scratch(out: &Path, size: u64) -> Result<(), DiskError> {
    let f = crate::host::private_file(out, false).map_err(|e| DiskError::Failed {
        tool: "mkfs.ext4",
        path: out.display().to_string(),
        detail: e.to_string(),
    })?;
    f.set_len(size).map_err(|e| DiskError::Failed {
        tool: "mkfs.ext4",
        path: out.display().to_string(),
        detail: e.to_string(),
    })?;
    drop(f);
    run(
        "mkfs.ext4",
        "e2fsprogs",
        out,
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-O",
                "^has_journal,^metadata_csum",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "-m",
                "0",
                "-L",
                "vmc-scratch",
            ])
            .arg(out),
    )
}

/// Checks a kept scratch disk before a container's next run (`e2fsck -p`:
/// it has no journal, and a VM that was killed left it unclean), mending
/// what is safe to mend. The guest's kernel is not given a filesystem its
/// own checks would trip over.
pub fn check_scratch(disk: &Path) -> Result<(), DiskError> {
    let out = Command::new("e2fsck")
        .args(["-p", "-f"])
        .arg(disk)
        .output()
        .map_err(|e| DiskError::Failed {
            tool: "e2fsck",
            path: disk.display().to_string(),
            detail: e.to_string(),
        })?;
    // 0: clean; 1: errors mended (e2fsck(8)).
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(DiskError::Failed {
            tool: "e2fsck",
            path: disk.display().to_string(),
            detail: format!(
                "the container's writable layer is damaged ({}); remove the container",
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&out.stderr).lines())
                    .last()
                    .unwrap_or("no output")
            ),
        }),
    }
}

/// A filesystem image mounted through a loop device; unmounted on drop,
/// and the loop device (set to clear itself) is then free again.
///
/// Written here with the loop ioctls (loop(4)): the maintained crate
/// (`loopdev`) generates its bindings with bindgen at build time, which
/// would need libclang for four ioctls.
pub struct LoopMount {
    target: PathBuf,
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

impl LoopMount {
    /// Attaches `image` to a free loop device and mounts it (an ext4
    /// filesystem) at `target` with `flags`.
    pub fn ext4(image: &Path, target: &Path, flags: libc::c_ulong) -> std::io::Result<LoopMount> {
        use std::os::fd::AsRawFd;
        // Checked before anything is attached (mount(2) takes it as text).
        let target_s = target
            .to_str()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let rw = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
        let file = rw(image)?;
        let ctl = rw(Path::new("/dev/loop-control"))?;
        // Another process may take the free device first: then ask again.
        let mut tries = 0;
        let (dev, dev_file) = loop {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let path = format!("/dev/loop{n}");
            let dev = rw(Path::new(&path))?;
            // SAFETY: LOOP_SET_FD takes the backing file's descriptor.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, file.as_raw_fd()) };
            if r == 0 {
                break (path, dev);
            }
            let e = std::io::Error::last_os_error();
            tries += 1;
            if e.raw_os_error() != Some(libc::EBUSY) || tries == 10 {
                return Err(e);
            }
        };
        // Detaches the device this call attached, on a failure after it.
        let detach = |e: std::io::Error| {
            // SAFETY: LOOP_CLR_FD takes no argument.
            unsafe { libc::ioctl(dev_file.as_raw_fd(), LOOP_CLR_FD) };
            e
        };
        // SAFETY: LoopInfo64 is plain data; all-zero is valid.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        info.flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_SET_STATUS64 reads a loop_info64.
        let r = unsafe { libc::ioctl(dev_file.as_raw_fd(), LOOP_SET_STATUS64, &info) };
        if r < 0 {
            return Err(detach(std::io::Error::last_os_error()));
        }
        vmc_spawn::sys::mount(Some(&dev), target_s, Some("ext4"), flags, None).map_err(detach)?;
        // Mounted: the device clears itself once unmounted and closed.
        Ok(LoopMount {
            target: target.to_path_buf(),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Ok(c) = vmc_spawn::sys::cstr(&self.target) {
            // SAFETY: umount2 on a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_disks_are_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scratch.img");
        build_scratch(&p, 1 << 30).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.len(), 1 << 30);
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        let sb = std::fs::read(&p).unwrap();
        assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "ext4 magic");
    }

    #[test]
    fn the_agent_disk_is_built_once_per_agent_binary() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent v1").unwrap();
        let cache = dir.path().join("cache");
        let a = agent_disk(&agent, &cache).unwrap();
        let b = agent_disk(&agent, &cache).unwrap();
        assert_eq!(a, b);
        let img = std::fs::read(&a).unwrap();
        assert_eq!(
            &img[1024..1028],
            &0xe0f5_e1e2u32.to_le_bytes(),
            "EROFS magic"
        );
        std::fs::write(&agent, b"\x7fELF agent v2").unwrap();
        let c = agent_disk(&agent, &cache).unwrap();
        assert_ne!(a, c, "a new agent gets a new disk");
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "no staging leftovers: {left:?}");
    }

    #[test]
    fn erofs_of_a_missing_directory_fails_with_the_tools_message() {
        let dir = tempfile::tempdir().unwrap();
        match build_erofs(&dir.path().join("nope"), &dir.path().join("x.erofs")) {
            Err(DiskError::Failed { tool, .. }) => assert_eq!(tool, "mkfs.erofs"),
            other => panic!("expected mkfs.erofs to fail, got {other:?}"),
        }
    }
}
