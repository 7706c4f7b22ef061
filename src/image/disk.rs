//! The read-only root disk of an image for VM mode: its layers unpacked in
//! order (whiteouts applied) into a temporary directory, made into an EROFS
//! image, cached by the layers' chain id (images sharing all layers share the
//! disk). Built without mounting anything; the unpacked tree is removed.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::import::HashingReader;
use super::layer::{self, Limits, Whiteouts};
use super::store::{Store, StoredImage};
use super::ImageError;

/// The OCI chain id of a list of diff ids.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = match diff_ids.first() {
        Some(d) => d.clone(),
        None => return "sha256:empty".to_string(),
    };
    for d in &diff_ids[1..] {
        let h = Sha256::digest(format!("{chain} {d}").as_bytes());
        chain = format!(
            "sha256:{}",
            h.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    chain
}

/// Unpacks every layer of `img` into `dir`, checking each blob's digest.
pub fn unpack_image(
    store: &Store,
    img: &StoredImage,
    dir: &Path,
    mode: Whiteouts,
) -> Result<(), ImageError> {
    for l in img.manifest.layers() {
        let p = store.blob_path(l.digest());
        let f = File::open(&p).map_err(ImageError::io(&p))?;
        let mut h = HashingReader::new(f);
        {
            let r = layer::decompress(&mut h).map_err(ImageError::io(&p))?;
            let stats = layer::unpack(r, dir, mode, Limits::default())?;
            if !stats.skipped.is_empty() {
                log::info!(
                    "layer {}: left out {} device nodes or special entries",
                    l.digest(),
                    stats.skipped.len()
                );
            }
        }
        std::io::copy(&mut h, &mut std::io::sink()).map_err(ImageError::io(&p))?;
        if h.digest() != l.digest().to_string() {
            return Err(ImageError::Store(super::StoreError::Damaged(format!(
                "layer {} does not match its digest",
                l.digest()
            ))));
        }
    }
    Ok(())
}

/// Each layer of `img` unpacked on its own (whiteouts as overlayfs
/// whiteouts) under `cache/layers/<digest>`, once, for namespace mode's
/// overlay; returned bottom layer first. Unpacking goes to a temporary
/// directory renamed into place, so a crash never leaves half a layer.
pub fn layer_dirs(
    store: &Store,
    img: &StoredImage,
    cache: &Path,
) -> Result<Vec<PathBuf>, ImageError> {
    let base = cache.join("layers");
    fs::create_dir_all(&base).map_err(ImageError::io(&base))?;
    let mut out = Vec::new();
    for l in img.manifest.layers() {
        let dir = base.join(l.digest().digest());
        if !dir.is_dir() {
            let tmp = base.join(format!(
                ".tmp-{}-{}",
                l.digest().digest(),
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).map_err(ImageError::io(&tmp))?;
            let p = store.blob_path(l.digest());
            let f = File::open(&p).map_err(ImageError::io(&p))?;
            let mut h = HashingReader::new(f);
            {
                let r = layer::decompress(&mut h).map_err(ImageError::io(&p))?;
                layer::unpack(r, &tmp, Whiteouts::Overlay, Limits::default())?;
            }
            std::io::copy(&mut h, &mut std::io::sink()).map_err(ImageError::io(&p))?;
            if h.digest() != l.digest().to_string() {
                let _ = fs::remove_dir_all(&tmp);
                return Err(ImageError::Store(super::StoreError::Damaged(format!(
                    "layer {} does not match its digest",
                    l.digest()
                ))));
            }
            if let Err(e) = fs::rename(&tmp, &dir) {
                let _ = fs::remove_dir_all(&tmp);
                if !dir.is_dir() {
                    return Err(ImageError::io(&dir)(e));
                }
            }
        }
        out.push(dir);
    }
    Ok(out)
}

/// The image's EROFS root disk, built on first use into `cache`.
pub fn root_disk(store: &Store, img: &StoredImage, cache: &Path) -> Result<PathBuf, ImageError> {
    let chain = chain_id(img.config.rootfs().diff_ids());
    let dir = cache.join("disks");
    let out = dir.join(format!("{}.erofs", chain.trim_start_matches("sha256:")));
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
    let lock_path = dir.join(format!("{}.lock", chain.trim_start_matches("sha256:")));
    let lock = File::create(&lock_path).map_err(ImageError::io(&lock_path))?;
    // SAFETY: flock on our own descriptor; concurrent builders of the same disk wait.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if out.is_file() {
        return Ok(out);
    }
    let tag = &crate::host::new_id()[..12];
    let tree = dir.join(format!(".tree-{tag}"));
    let tmp = dir.join(format!(".disk-{tag}.erofs"));
    let result = (|| {
        fs::create_dir_all(&tree).map_err(ImageError::io(&tree))?;
        unpack_image(store, img, &tree, Whiteouts::Apply)?;
        crate::disk::build_erofs(&tree, &tmp)?;
        // Before the disk: a disk in place has its index (or never will).
        let env = img.config.config().as_ref().and_then(|c| c.env().clone());
        let index = super::lookup::index_path(&out);
        if let Err(e) = super::lookup::Lookup::of_tree(&tree, &env.unwrap_or_default()).save(&index)
        {
            log::warn!("{}: {e}", index.display());
        }
        fs::rename(&tmp, &out).map_err(ImageError::io(&out))
    })();
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_file(&tmp);
    result.map(|_| out)
}

/// An EROFS disk holding an empty root directory, for `FROM scratch`
/// builds; built once into `cache`.
pub fn empty_disk(cache: &Path) -> Result<PathBuf, ImageError> {
    let dir = cache.join("disks");
    let out = dir.join("empty.erofs");
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
    let tag = &crate::host::new_id()[..12];
    let tree = dir.join(format!(".tree-{tag}"));
    let tmp = dir.join(format!(".disk-{tag}.erofs"));
    let result = (|| {
        fs::create_dir_all(&tree).map_err(ImageError::io(&tree))?;
        crate::disk::build_erofs(&tree, &tmp)?;
        fs::rename(&tmp, &out).map_err(ImageError::io(&out))
    })();
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_file(&tmp);
    result.map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        assert_eq!(chain_id(std::slice::from_ref(&a)), a);
        let ab = chain_id(&[a.clone(), b.clone()]);
        let want = format!(
            "sha256:{}",
            Sha256::digest(b"sha256:aaaa sha256:bbbb")
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        );
        assert_eq!(ab, want);
        assert_ne!(ab, chain_id(&[b, a]));
    }
}
