//! Disk images for VM mode, built without mounting anything: a read-only EROFS
//! image of a root filesystem directory (mkfs.erofs) and an empty ext4
//! scratch disk for the container's writable layer (mkfs.ext4).

use std::path::Path;
use std::process::Command;

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

/// Creates an empty, sparse ext4 filesystem of `size` bytes at `out`, without
/// a journal (the scratch layer is per container) and with lazily
/// initialised inode tables so creation writes only a few MiB.
pub fn build_scratch(out: &Path, size: u64) -> Result<(), DiskError> {
    let f = std::fs::File::create(out).map_err(|e| DiskError::Failed {
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
                "^has_journal",
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
    fn erofs_of_a_missing_directory_fails_with_the_tools_message() {
        let dir = tempfile::tempdir().unwrap();
        match build_erofs(&dir.path().join("nope"), &dir.path().join("x.erofs")) {
            Err(DiskError::Failed { tool, .. }) => assert_eq!(tool, "mkfs.erofs"),
            other => panic!("expected mkfs.erofs to fail, got {other:?}"),
        }
    }
}
