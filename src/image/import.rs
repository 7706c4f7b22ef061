//! `vmc import`: a plain root filesystem tarball (e.g. from `mmdebstrap`)
//! becomes a one-layer image. The tarball is stored as its layer blob as it
//! is (plain, gzip or zstd); its diff id is computed over the uncompressed
//! stream while the tar is checked entry by entry.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use oci_spec::image::{
    Arch, Descriptor, HistoryBuilder, ImageConfigurationBuilder, MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use super::store::{rfc3339_now, Store, StoredImage};
use super::{layer, ImageError};

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The sha256 of everything read so far, as `sha256:<hex>`.
    pub fn digest(self) -> String {
        let hex: String = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The media type of a layer blob from its first bytes.
pub fn layer_media_type(path: &Path) -> Result<MediaType, ImageError> {
    let mut f = BufReader::new(File::open(path).map_err(ImageError::io(path))?);
    let head = f.fill_buf().map_err(ImageError::io(path))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        MediaType::ImageLayerGzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        MediaType::ImageLayerZstd
    } else {
        MediaType::ImageLayer
    })
}

/// Why a layer blob was refused by [`verified_diff_id`].
#[derive(Debug, thiserror::Error)]
pub enum LayerRefused {
    #[error("cannot read it: {0}")]
    Io(std::io::Error),
    #[error("it is not a valid tar archive ({0})")]
    NotTar(std::io::Error),
    #[error("it is empty, not a tar archive")]
    Empty,
    #[error("{0}; it could never be unpacked")]
    Entry(layer::LayerError),
}

/// Reads the layer blob at `path` whole (decompressed), checks that it is a
/// tar archive whose every entry would unpack (`layer::verify`), and returns
/// its diff id: the sha256 of the uncompressed stream.
pub fn verified_diff_id(path: &Path) -> Result<String, LayerRefused> {
    let f = File::open(path).map_err(LayerRefused::Io)?;
    let mut h = HashingReader::new(layer::decompress(f).map_err(LayerRefused::NotTar)?);
    match layer::verify(&mut h, layer::Limits::default()) {
        Ok(_) => {}
        Err(layer::LayerError::Read(e)) => return Err(LayerRefused::NotTar(e)),
        Err(e) => return Err(LayerRefused::Entry(e)),
    }
    // Trailing padding after the end-of-archive blocks belongs to the stream too.
    std::io::copy(&mut h, &mut std::io::sink()).map_err(LayerRefused::NotTar)?;
    if h.count == 0 {
        return Err(LayerRefused::Empty);
    }
    Ok(h.digest())
}

/// [`verified_diff_id`] of a tarball given to `vmc import`.
pub fn diff_id(path: &Path) -> Result<String, ImageError> {
    verified_diff_id(path).map_err(|e| match e {
        LayerRefused::Io(e) => ImageError::io(path)(e),
        LayerRefused::NotTar(_) | LayerRefused::Empty => ImageError::Invalid(format!(
            "{}: {e}; give a root filesystem tarball, plain or compressed with gzip or zstd",
            path.display()
        )),
        LayerRefused::Entry(_) => {
            ImageError::Invalid(format!("{}: {e}; the image is refused", path.display()))
        }
    })
}

/// Imports the tarball at `path` as an image named `name` (`name:tag`).
pub fn import_rootfs(
    store: &Store,
    path: &Path,
    name: Option<&str>,
) -> Result<StoredImage, ImageError> {
    let _w = store.writer()?;
    let diff = diff_id(path)?;
    let media = layer_media_type(path)?;
    let (digest, size) = store.put_blob(File::open(path).map_err(ImageError::io(path))?, None)?;
    let now = rfc3339_now();
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .created(now.clone())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff])
                .build()
                .map_err(|e| ImageError::Invalid(e.to_string()))?,
        )
        .history(vec![HistoryBuilder::default()
            .created(now)
            .created_by(format!("vmc import {}", path.display()))
            .build()
            .map_err(|e| ImageError::Invalid(e.to_string()))?])
        .build()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    let layer = Descriptor::new(media, size, digest);
    Ok(store.commit(&config, vec![layer], name)?)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::image::store::digest_of;

    /// A small root filesystem tar: a directory and a file.
    fn rootfs_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
        let data = b"imported\n";
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, "etc/hello", &data[..]).unwrap();
        b.into_inner().unwrap()
    }

    /// The same tar plain, gzip- and zstd-compressed, written under `dir`.
    fn three_forms(dir: &Path, tar: &[u8]) -> [(std::path::PathBuf, MediaType); 3] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap();
        let forms = [
            ("rootfs.tar", tar.to_vec(), MediaType::ImageLayer),
            (
                "rootfs.tgz",
                gz.finish().unwrap(),
                MediaType::ImageLayerGzip,
            ),
            (
                "rootfs.tar.zst",
                zstd::encode_all(tar, 3).unwrap(),
                MediaType::ImageLayerZstd,
            ),
        ];
        forms.map(|(name, bytes, media)| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            (p, media)
        })
    }

    #[test]
    fn media_types_follow_the_content_and_diff_ids_the_uncompressed_tar() {
        let dir = tempfile::tempdir().unwrap();
        let tar = rootfs_tar();
        let want = digest_of(&tar).to_string();
        for (p, media) in three_forms(dir.path(), &tar) {
            assert_eq!(layer_media_type(&p).unwrap(), media, "{}", p.display());
            assert_eq!(diff_id(&p).unwrap(), want, "{}", p.display());
        }
        // Not a tar, and nothing at all, are refused by name.
        let junk = dir.path().join("junk.zst");
        std::fs::write(&junk, zstd::encode_all(&[7u8; 1000][..], 3).unwrap()).unwrap();
        let e = diff_id(&junk).unwrap_err().to_string();
        assert!(
            e.contains("junk.zst") && e.contains("not a valid tar"),
            "{e}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(diff_id(&empty)
            .unwrap_err()
            .to_string()
            .contains("is empty"));
    }

    #[test]
    fn imports_store_the_tarball_as_it_is_with_its_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let tar = rootfs_tar();
        for (i, (p, media)) in three_forms(dir.path(), &tar).into_iter().enumerate() {
            let name = format!("rootfs:{i}");
            let img = import_rootfs(&store, &p, Some(&name)).unwrap();
            assert_eq!(img.names, std::slice::from_ref(&name));
            let layers = img.manifest.layers();
            assert_eq!(layers.len(), 1);
            assert_eq!(layers[0].media_type(), &media, "{name}");
            // The blob is the file as given, compressed or not.
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(layers[0].digest(), &digest_of(&bytes), "{name}");
            assert_eq!(layers[0].size(), bytes.len() as u64);
            assert_eq!(store.read_blob(layers[0].digest()).unwrap(), bytes);
            assert_eq!(
                img.config.rootfs().diff_ids(),
                &[digest_of(&tar).to_string()],
                "{name}"
            );
        }
        assert_eq!(store.images().unwrap().len(), 3);
    }
}
