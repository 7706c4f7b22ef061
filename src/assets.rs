//! Where vmc finds its runtime assets (the guest kernel and the guest agent),
//! and the initramfs it builds from the agent for every VM.
//!
//! Lookup: an explicit path (flag or environment), else the assets directory
//! `$VMC_ASSETS`, else `$XDG_DATA_HOME/vmc`, else `~/.local/share/vmc`, which is
//! where `make setup` (kernels/build.sh and the guest build) installs them.

use std::path::{Path, PathBuf};

/// Errors locating or reading assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "no guest kernel at {0}: build and install it with `make kernel` (or pass --kernel PATH)"
    )]
    NoKernel(String),
    #[error("no guest agent at {0}: build and install it with `make guest` (or set VMC_GUEST)")]
    NoGuest(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The directory holding the installed kernel and agent.
pub fn assets_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMC_ASSETS") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmc"),
        _ => home().join(".local/share/vmc"),
    }
}

/// The guest kernel: `explicit` if given, else the installed one.
pub fn kernel(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    let p = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| assets_dir().join("vmlinux"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(AssetError::NoKernel(p.display().to_string()))
    }
}

/// The guest agent binary: `$VMC_GUEST`, else the installed one.
pub fn guest_binary() -> Result<PathBuf, AssetError> {
    let p = std::env::var_os("VMC_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| assets_dir().join("vmc-guest"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(AssetError::NoGuest(p.display().to_string()))
    }
}

/// The initramfs: an uncompressed newc cpio holding `/init` (the agent), the
/// mount points it needs, `/dev/console` and `/dev/null`. Uncompressed because
/// decompression runs slowly under software virtualisation, and built in
/// memory per VM because it is a single copy of a ~1 MiB file.
pub fn initramfs(agent: &Path) -> Result<Vec<u8>, AssetError> {
    let data = std::fs::read(agent).map_err(|source| AssetError::Read {
        path: agent.display().to_string(),
        source,
    })?;
    let mut w = CpioWriter::default();
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        w.entry(d, 0o040_755, 0, &[]);
    }
    w.entry("dev/console", 0o020_600, (5 << 8) | 1, &[]);
    // Without a console the kernel starts init with fds 0-2 closed, and Rust's
    // runtime aborts unless it can open /dev/null in their place.
    w.entry("dev/null", 0o020_666, (1 << 8) | 3, &[]);
    w.entry("init", 0o100_755, 0, &data);
    Ok(w.finish())
}

/// Writes the "newc" cpio format (what the kernel's initramfs unpacker reads).
#[derive(Default)]
struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    /// `rdev` is major << 8 | minor for device nodes.
    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040_000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn initramfs_is_a_cpio_that_cpio_lists() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF fake agent").unwrap();
        let img = initramfs(&agent).unwrap();
        assert_eq!(&img[..6], b"070701");
        assert_eq!(img.len() % 4, 0);
        let mut child = Command::new("cpio")
            .args(["-t", "-v"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cpio(1) is installed by make setup");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&img).unwrap();
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("init"), "{listing}");
        assert!(listing
            .lines()
            .any(|l| l.starts_with("crw") && l.contains("dev/console")));
        assert!(listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.contains(" 15 ")));
    }

    #[test]
    fn missing_assets_name_the_fix() {
        let e = kernel(Some(Path::new("/nonexistent/vmlinux"))).unwrap_err();
        assert!(e.to_string().contains("make kernel"));
    }
}
