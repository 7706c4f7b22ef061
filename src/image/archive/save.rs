//! Saving images (`vmc save`) as an OCI archive: deterministic tar headers,
//! each blob once and checked as it is written, the file replaced atomically.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};

use super::super::import::HashingReader;
use super::super::store::{Store, StoreError, StoredImage, REF_NAME};
use super::super::{ImageError, Reference};
use super::{INDEX_JSON, OCI_LAYOUT, OCI_LAYOUT_FILE};

// ---------------------------------------------------------------------------
// Saving.
// ---------------------------------------------------------------------------

/// The name to record for `given` when it resolved to `img`: its store name
/// when `given` named the image, `None` when it was an id.
fn saved_name(given: &str, img: &StoredImage) -> Option<String> {
    let r = Reference::parse(given).ok()?;
    if r.digest.is_some() {
        return None;
    }
    let name = r.store_name();
    img.names.contains(&name).then_some(name)
}

/// The index and the blobs (each once, in order) of an archive of `images`.
fn plan(store: &Store, images: &[String]) -> Result<(ImageIndex, Vec<Descriptor>), ImageError> {
    let mut entries: Vec<Descriptor> = Vec::new();
    let mut blobs = Vec::new();
    let mut seen = HashSet::new();
    for given in images {
        let img = store.resolve(given)?;
        let mut d = Descriptor::new(
            MediaType::ImageManifest,
            img.manifest_size,
            img.manifest_digest.clone(),
        );
        if let Some(name) = saved_name(given, &img) {
            d.set_annotations(Some(HashMap::from([(REF_NAME.to_string(), name)])));
        }
        if !entries.contains(&d) {
            entries.push(d.clone());
        }
        let m = &img.manifest;
        for b in [&d, m.config()].into_iter().chain(m.layers()) {
            if seen.insert(b.digest().clone()) {
                blobs.push(b.clone());
            }
        }
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(entries)
        .build()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    Ok((index, blobs))
}

/// A tar header with fixed metadata: owned by root, dated 1970.
pub(super) fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Appends the blob `d` of the store, checking its size and digest.
fn append_blob<W: Write>(
    tar: &mut tar::Builder<W>,
    store: &Store,
    d: &Descriptor,
    out: &Path,
) -> Result<(), ImageError> {
    let damaged = |why: String| ImageError::Store(StoreError::Damaged(why));
    let p = store.blob_path(d.digest());
    let f = File::open(&p).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => damaged(format!("blob {} is missing", d.digest())),
        _ => ImageError::io(&p)(e),
    })?;
    let len = f.metadata().map_err(ImageError::io(&p))?.len();
    if len != d.size() {
        return Err(damaged(format!(
            "blob {} has {len} bytes, its descriptor says {}",
            d.digest(),
            d.size()
        )));
    }
    let mut h = HashingReader::new(f.take(len));
    let mut hdr = header(tar::EntryType::Regular, 0o644, len);
    tar.append_data(
        &mut hdr,
        format!("blobs/sha256/{}", d.digest().digest()),
        &mut h,
    )
    .map_err(ImageError::io(out))?;
    if h.count != len || h.digest() != d.digest().to_string() {
        return Err(damaged(format!("blob {} is corrupted", d.digest())));
    }
    Ok(())
}

/// Writes the OCI layout of `index` and `blobs` as a tar to `w`.
fn write_layout<W: Write>(
    store: &Store,
    w: W,
    index: &[u8],
    blobs: &[Descriptor],
    out: &Path,
) -> Result<W, ImageError> {
    let mut tar = tar::Builder::new(w);
    let file = |data: &[u8]| header(tar::EntryType::Regular, 0o644, data.len() as u64);
    let dir = || header(tar::EntryType::Directory, 0o755, 0);
    let err = ImageError::io(out);
    tar.append_data(&mut file(OCI_LAYOUT), OCI_LAYOUT_FILE, OCI_LAYOUT)
        .map_err(&err)?;
    tar.append_data(&mut file(index), INDEX_JSON, index)
        .map_err(&err)?;
    tar.append_data(&mut dir(), "blobs/", io::empty())
        .map_err(&err)?;
    tar.append_data(&mut dir(), "blobs/sha256/", io::empty())
        .map_err(&err)?;
    for b in blobs {
        append_blob(&mut tar, store, b, out)?;
    }
    tar.into_inner().map_err(&err)
}

/// The archive of `images` written through `w`, under the store's writer
/// lock (no gc while blobs are read); `out` names it in errors.
fn write_images<W: Write>(
    store: &Store,
    images: &[String],
    w: W,
    out: &Path,
) -> Result<W, ImageError> {
    if images.is_empty() {
        return Err(ImageError::Invalid("no image to save".to_string()));
    }
    let _w = store.writer()?;
    let (index, blobs) = plan(store, images)?;
    let index = index
        .to_string()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    write_layout(store, w, index.as_bytes(), &blobs, out)
}

/// Writes the OCI archive of `images` to `w` (`vmc save` without `-o`:
/// stdout), the same bytes as [`save`] writes to a file.
pub fn save_to(store: &Store, images: &[String], w: impl Write) -> Result<(), ImageError> {
    let out = Path::new("stdout");
    let mut w = write_images(store, images, BufWriter::new(w), out)?;
    w.flush().map_err(ImageError::io(out))
}

/// Writes an OCI archive of `images` (names, ids or id prefixes) to `out`,
/// atomically. Each image is listed once per name given, annotated with that
/// name in its store form (`alpine` becomes `alpine:latest`) unless it was
/// given by id; each blob is written once.
pub fn save(store: &Store, images: &[String], out: &Path) -> Result<(), ImageError> {
    let file_name = out
        .file_name()
        .ok_or_else(|| ImageError::Invalid(format!("{} is not a file name", out.display())))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        &crate::host::new_id()[..8]
    ));
    let result = (|| {
        let f = File::create_new(&tmp).map_err(ImageError::io(&tmp))?;
        let w = write_images(store, images, BufWriter::new(f), out)?;
        let f = w
            .into_inner()
            .map_err(|e| ImageError::io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(ImageError::io(&tmp))?;
        fs::rename(&tmp, out).map_err(ImageError::io(out))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ImageError::io(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
