//! Build identity: a hash of the host-side source (`src/` and the VMM
//! crate's `vmm/src/`) and of the
//! locked dependency versions, as `VMC_BUILD_ID`. Warm-start snapshots are
//! keyed by it (`runtime::snapshot`): a snapshot holds device and VMM state
//! in this build's layout, so another build makes its own rather than
//! restore one it may read differently. It is the same for every binary
//! built from one tree (vmc, the test binaries), unlike a hash of the
//! executable, so the test suite shares snapshots with the vmc it tests.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let mut list = Vec::new();
    files(&root.join("src"), &mut list);
    files(&root.join("vmm/src"), &mut list);
    list.push(root.join("Cargo.lock"));
    list.sort();
    let mut h = Sha256::new();
    for p in &list {
        let rel = p.strip_prefix(&root).unwrap_or(p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0]);
    }
    let id: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=VMC_BUILD_ID={id}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=vmm/src");
    println!("cargo:rerun-if-changed=Cargo.lock");
}
