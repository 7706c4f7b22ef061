//! Where vmc finds its runtime assets: the guest kernel and the guest agent.
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
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The directory holding the installed kernel and agent.
pub fn assets_dir() -> PathBuf {
    if let Some(d) = &crate::host::knobs().assets {
        return d.clone();
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
    let p = crate::host::knobs()
        .guest
        .clone()
        .unwrap_or_else(|| assets_dir().join("vmc-guest"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(AssetError::NoGuest(p.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_assets_name_the_fix() {
        let e = kernel(Some(Path::new("/nonexistent/vmlinux"))).unwrap_err();
        assert!(e.to_string().contains("make kernel"));
    }
}
