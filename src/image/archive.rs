//! `vmc load` and `vmc save`: images to and from single-file archives.
//!
//! Two archive formats are read, plain or compressed with gzip or zstd:
//!
//! * **docker-archive**, as written by `docker save` and
//!   `skopeo copy ... docker-archive:`: a tar with a top-level
//!   `manifest.json`, an array of `{"Config", "RepoTags", "Layers"}` whose
//!   strings are paths inside the tar. The config is a JSON file (its sha256
//!   is the image id), each layer a tar (`<id>/layer.tar`, `<hex>.tar` or,
//!   since Docker 25, `blobs/sha256/<hex>`; links between them are followed).
//!   The config and layers are stored as they are, so the image id stays the
//!   same, and an OCI manifest is written for them.
//! * **OCI archive**, as written by `skopeo copy ... oci-archive:` and
//!   `vmc save`: a tarred OCI image layout (`oci-layout`, `index.json`,
//!   `blobs/sha256/<hex>`). Every image `index.json` lists is loaded (from a
//!   nested image index, the linux/amd64 image, else the first); its name is
//!   the `io.containerd.image.name` or `org.opencontainers.image.ref.name`
//!   annotation when that is an image reference. Manifests are kept as they
//!   are when they are plain OCI image manifests, so digests survive a
//!   save/load round trip.
//!
//! An archive with both `manifest.json` and `index.json` (Docker 25 and
//! later) is read as a docker-archive: its `RepoTags` are full names, while
//! its `index.json` names images by tag only.
//!
//! Archives are hostile input. Entries arrive in any order (`manifest.json`
//! may come last), so loading makes two passes: the first streams every file
//! of the tar into the store as a blob (never into memory; files named
//! `blobs/sha256/<hex>` must match that digest) and keeps only the small
//! top-level documents; the second assembles and checks the images: every
//! referenced file is present, sizes and digests match, configs parse, the
//! config's diff ids are those of the (uncompressed) layers. Only when every
//! image checks out are they added to the index, so a failed load adds no
//! image (blobs it stored are unreferenced; `gc` removes them). Nothing is
//! ever written outside the store, and only through its API.
//!
//! `save` writes an OCI archive of the images given, with deterministic tar
//! headers, atomically (temporary file next to the output, then rename); it
//! is readable by `skopeo` (`oci-archive:FILE:NAME`), by `umoci` once
//! untarred, and by `load`.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, Digest, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest,
    ImageManifestBuilder, MediaType, Os,
};
use serde::Deserialize;

use super::import::{layer_media_type, HashingReader};
use super::layer;
use super::store::{Store, StoreError, StoredImage, REF_NAME};
use super::{ImageError, Reference};

/// Largest JSON document read into memory (`manifest.json`, `index.json`,
/// manifests, configs).
pub(crate) const MAX_JSON: u64 = 8 << 20;
/// Largest file an archive may hold (as [`layer::Limits`] bounds a layer).
pub(crate) const MAX_ENTRY: u64 = 64 << 30;
/// Most entries an archive may hold.
const MAX_ENTRIES: usize = 1 << 20;
/// Most images an archive may hold.
const MAX_IMAGES: usize = 4096;
/// Most layers an image may have.
pub(crate) const MAX_LAYERS: usize = 1000;
/// Most links followed to find a file.
const MAX_LINK_HOPS: usize = 16;
/// Deepest nesting of image indexes followed.
const MAX_NESTING: usize = 4;

/// The annotation containerd and BuildKit put the full image name in (their
/// `org.opencontainers.image.ref.name` is only the tag).
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Docker's media types, which its manifests and lists may carry.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Layer media types vmc can unpack (it detects the compression itself).
pub(crate) const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
/// The `oci-layout` file of a saved archive.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Top-level documents kept in memory by the first pass.
const DOCKER_MANIFEST_JSON: &str = "manifest.json";
const INDEX_JSON: &str = "index.json";
const OCI_LAYOUT_FILE: &str = "oci-layout";

// ---------------------------------------------------------------------------
// Loading, first pass: the archive's files become blobs.
// ---------------------------------------------------------------------------

/// A file of the archive (or a download), now a blob in the store.
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// What the first pass found in the archive.
#[derive(Default)]
struct Contents {
    /// Regular files by normalised path.
    files: HashMap<String, Blob>,
    /// Symbolic and hard links: normalised path to normalised target.
    links: HashMap<String, String>,
    /// The top-level documents (`manifest.json`, `index.json`, `oci-layout`).
    docs: HashMap<&'static str, Vec<u8>>,
}

impl Contents {
    /// The file at `name` (a path inside the archive), following links.
    fn file(&self, name: &str) -> Option<&Blob> {
        let mut name = normalize("", name);
        for _ in 0..=MAX_LINK_HOPS {
            if let Some(b) = self.files.get(&name) {
                return Some(b);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }
}

/// `name` as a relative path without `.`, `..` or empty components, taken
/// relative to the directory `base`; `..` never climbs above the top.
fn normalize(base: &str, name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let start = if name.starts_with('/') { "" } else { base };
    for c in start.split('/').chain(name.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The directory part of a normalised path.
fn parent(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// The digest a file named `blobs/sha256/<hex>` must have.
fn named_digest(name: &str) -> Option<Digest> {
    let hex = name.strip_prefix("blobs/sha256/")?;
    format!("sha256:{hex}").parse().ok()
}

/// Files of old `docker save` archives that nothing refers to.
fn is_legacy_metadata(name: &str) -> bool {
    name == "repositories"
        || (name.matches('/').count() == 1
            && (name.ends_with("/json") || name.ends_with("/VERSION")))
}

/// A reader that remembers the error its input failed with, to tell a
/// damaged archive from a failing store.
struct Watch<R> {
    inner: R,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Watch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.failed = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

/// An error about the archive at `archive`.
fn invalid(archive: &Path, msg: impl Display) -> ImageError {
    ImageError::Invalid(format!("{}: {msg}", archive.display()))
}

/// Clears a progress bar when the work it shows ends, however it ends.
struct ClearOnDrop(Option<indicatif::ProgressBar>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Streams the archive's entries into the store.
fn scan(store: &Store, archive: &Path) -> Result<Contents, ImageError> {
    let file = File::open(archive).map_err(ImageError::io(archive))?;
    // A progress bar over the archive's bytes when stderr is a terminal.
    let bar = std::io::IsTerminal::is_terminal(&io::stderr()).then(|| {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template("Loading [{bar:25}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
    });
    let _clear = ClearOnDrop(bar.clone());
    let file: Box<dyn Read> = match &bar {
        Some(b) => Box::new(b.wrap_read(file)),
        None => Box::new(file),
    };
    let reader = layer::decompress(file).map_err(ImageError::io(archive))?;
    let mut tar = tar::Archive::new(reader);
    let mut contents = Contents::default();
    let bad_tar = |n: usize, e: io::Error| match n {
        0 => invalid(
            archive,
            format!("not a docker-archive or OCI archive: not a tar archive ({e})"),
        ),
        _ => invalid(
            archive,
            format!("the archive is damaged or truncated after {n} entries ({e})"),
        ),
    };
    for (n, entry) in tar.entries().map_err(|e| bad_tar(0, e))?.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(invalid(
                archive,
                format!("more than {MAX_ENTRIES} entries, refused"),
            ));
        }
        let entry = entry.map_err(|e| bad_tar(n, e))?;
        add_entry(store, archive, &mut contents, entry)?;
    }
    Ok(contents)
}

/// Records one tar entry: a link, a top-level document or a blob.
fn add_entry<R: Read>(
    store: &Store,
    archive: &Path,
    contents: &mut Contents,
    entry: tar::Entry<'_, R>,
) -> Result<(), ImageError> {
    // Names that are not UTF-8 cannot be referred to from JSON: skip them.
    let Some(name) = entry
        .path()
        .ok()
        .and_then(|p| p.to_str().map(|s| normalize("", s)))
    else {
        return Ok(());
    };
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        let target = entry.link_name().ok().flatten();
        if let Some(target) = target.as_deref().and_then(Path::to_str) {
            // Hard link targets are archive paths; symlinks are relative.
            let base = if kind.is_symlink() { parent(&name) } else { "" };
            let target = normalize(base, target);
            contents.links.insert(name, target);
        }
        return Ok(());
    }
    if !kind.is_file() || name.is_empty() {
        return Ok(()); // directories, devices...: nothing a format refers to
    }
    let doc = [DOCKER_MANIFEST_JSON, INDEX_JSON, OCI_LAYOUT_FILE]
        .into_iter()
        .find(|d| *d == name);
    if let Some(doc) = doc {
        let data = read_document(archive, &name, entry)?;
        contents.docs.insert(doc, data);
    } else if !is_legacy_metadata(&name) {
        let blob = store_entry(store, archive, &name, entry)?;
        contents.files.insert(name, blob);
    }
    Ok(())
}

/// Reads a small document into memory.
fn read_document<R: Read>(archive: &Path, name: &str, entry: R) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::new();
    entry
        .take(MAX_JSON + 1)
        .read_to_end(&mut data)
        .map_err(|e| invalid(archive, format!("reading {name}: {e}")))?;
    if data.len() as u64 > MAX_JSON {
        return Err(invalid(
            archive,
            format!("{name} is larger than {} MiB, refused", MAX_JSON >> 20),
        ));
    }
    Ok(data)
}

/// Streams a file into the store, checking it against its name when that
/// is a digest.
fn store_entry<R: Read>(
    store: &Store,
    archive: &Path,
    name: &str,
    entry: tar::Entry<'_, R>,
) -> Result<Blob, ImageError> {
    if entry.size() > MAX_ENTRY {
        return Err(invalid(
            archive,
            format!(
                "{name} claims {} bytes, more than the {} GiB allowed",
                entry.size(),
                MAX_ENTRY >> 30
            ),
        ));
    }
    let expect = named_digest(name);
    let mut watch = Watch {
        inner: entry,
        failed: None,
    };
    match store.put_blob(&mut watch, expect.as_ref()) {
        Ok((digest, size)) => Ok(Blob { digest, size }),
        Err(e) => Err(match watch.failed {
            Some(read) => invalid(archive, format!("reading {name}: {read}")),
            None => match e {
                StoreError::DigestMismatch { expected, got } => invalid(
                    archive,
                    format!("{name} does not match its digest {expected} (got {got}): the archive is corrupted"),
                ),
                e => e.into(),
            },
        }),
    }
}

// ---------------------------------------------------------------------------
// Loading, second pass: assembling and checking images.
// ---------------------------------------------------------------------------

/// An image ready to be listed in the index.
struct Prepared {
    manifest: Descriptor,
    names: Vec<String>,
}

/// One image of a docker-archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// The second pass's state.
struct Loader<'a> {
    archive: &'a Path,
    contents: Contents,
    check: Checker<'a>,
}

impl Loader<'_> {
    fn invalid(&self, msg: impl Display) -> ImageError {
        invalid(self.archive, msg)
    }

    /// A file named by a docker-archive's `manifest.json`.
    fn docker_file(&self, name: &str) -> Result<Blob, ImageError> {
        self.contents.file(name).cloned().ok_or_else(|| {
            self.invalid(format!(
                "manifest.json refers to {name}, which is not in the archive"
            ))
        })
    }

    /// The blob a descriptor of an OCI layout refers to, checked against it.
    fn oci_blob(&self, d: &Descriptor) -> Result<Blob, ImageError> {
        let key = format!("blobs/{}/{}", d.digest().algorithm(), d.digest().digest());
        let blob = self.contents.file(&key).ok_or_else(|| {
            self.invalid(format!(
                "blob {} is not in the archive ({key} is missing)",
                d.digest()
            ))
        })?;
        if blob.digest != *d.digest() {
            return Err(self.invalid(format!(
                "{key} does not match its digest (got {}): the archive is corrupted or uses an unsupported digest algorithm",
                blob.digest
            )));
        }
        if blob.size != d.size() {
            return Err(self.invalid(format!(
                "blob {} has {} bytes, its descriptor says {}",
                d.digest(),
                blob.size,
                d.size()
            )));
        }
        Ok(blob.clone())
    }

    /// The images of a docker-archive.
    fn docker_images(&mut self, doc: &[u8]) -> Result<Vec<Prepared>, ImageError> {
        let entries: Vec<DockerEntry> = serde_json::from_slice(doc).map_err(|e| {
            self.invalid(format!(
                "manifest.json is not a docker-archive manifest: {e}"
            ))
        })?;
        if entries.len() > MAX_IMAGES {
            return Err(self.invalid(format!(
                "more than {MAX_IMAGES} images in manifest.json, refused"
            )));
        }
        let mut out = Vec::new();
        for e in &entries {
            let config = self.docker_file(&e.config)?;
            let layers = e
                .layers
                .iter()
                .map(|l| self.docker_file(l))
                .collect::<Result<Vec<_>, _>>()?;
            self.check.check_image(&config, &layers)?;
            let names = e
                .repo_tags
                .iter()
                .flatten()
                .map(|t| {
                    store_name(t).ok_or_else(|| {
                        self.invalid(format!("invalid RepoTag '{t}' in manifest.json"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let manifest = self.check.write_manifest(&config, &layers)?;
            out.push(Prepared { manifest, names });
        }
        Ok(out)
    }

    /// The images of an OCI archive.
    fn oci_images(&mut self, doc: &[u8]) -> Result<Vec<Prepared>, ImageError> {
        if let Some(layout) = self.contents.docs.get(OCI_LAYOUT_FILE) {
            let v: serde_json::Value = serde_json::from_slice(layout)
                .map_err(|e| self.invalid(format!("oci-layout is not JSON: {e}")))?;
            if !v["imageLayoutVersion"].is_string() {
                return Err(self.invalid("oci-layout has no imageLayoutVersion"));
            }
        }
        let index = ImageIndex::from_reader(doc)
            .map_err(|e| self.invalid(format!("index.json is not an OCI image index: {e}")))?;
        if index.manifests().len() > MAX_IMAGES {
            return Err(self.invalid(format!(
                "more than {MAX_IMAGES} entries in index.json, refused"
            )));
        }
        let mut out = Vec::new();
        for entry in index.manifests() {
            let Some(m) = self.pick_manifest(entry, 0)? else {
                log::warn!(
                    "{}: skipping {} ({}): not a container image",
                    self.archive.display(),
                    entry.digest(),
                    entry.media_type()
                );
                continue;
            };
            if let Some(manifest) = self.oci_image(&m)? {
                out.push(Prepared {
                    manifest,
                    names: entry_name(entry).into_iter().collect(),
                });
            }
        }
        Ok(out)
    }

    /// The image manifest `d` refers to: `d` itself, or the linux/amd64 (else
    /// the first) entry of the image index it refers to. `None` when it is
    /// neither (an artifact).
    fn pick_manifest(
        &self,
        d: &Descriptor,
        depth: usize,
    ) -> Result<Option<Descriptor>, ImageError> {
        match kind(d.media_type()) {
            Kind::Manifest => return Ok(Some(d.clone())),
            Kind::Other => return Ok(None),
            Kind::Index => {}
        }
        if depth >= MAX_NESTING {
            return Err(self.invalid(format!("image indexes nested more than {MAX_NESTING} deep")));
        }
        let data = self.check.json_blob(&self.oci_blob(d)?, "image index")?;
        let index = ImageIndex::from_reader(&data[..])
            .map_err(|e| self.invalid(format!("{} is not an image index: {e}", d.digest())))?;
        let wanted = |e: &&Descriptor| {
            kind(e.media_type()) != Kind::Other
                && e.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        };
        let entries = index.manifests();
        match entries.iter().find(wanted).or(entries.first()) {
            Some(e) => self.pick_manifest(e, depth + 1),
            None => Err(self.invalid(format!("image index {} is empty", d.digest()))),
        }
    }

    /// Checks the image of the manifest `m`; returns the descriptor of the
    /// manifest to list: `m` when it is a plain OCI image manifest, else an
    /// OCI manifest written for its config and layers. `None` when its
    /// config is not an image configuration (an artifact).
    fn oci_image(&mut self, m: &Descriptor) -> Result<Option<Descriptor>, ImageError> {
        let data = self.check.json_blob(&self.oci_blob(m)?, "manifest")?;
        let manifest = ImageManifest::from_reader(&data[..])
            .map_err(|e| self.invalid(format!("{} is not an image manifest: {e}", m.digest())))?;
        let config_type = manifest.config().media_type().to_string();
        if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
            log::warn!(
                "{}: skipping {}: its config is {config_type}, not an image configuration",
                self.archive.display(),
                m.digest()
            );
            return Ok(None);
        }
        if let Some(l) = manifest
            .layers()
            .iter()
            .find(|l| !LAYER_TYPES.contains(&l.media_type().to_string().as_str()))
        {
            return Err(self.invalid(format!(
                "layer {} of {} has media type {}, which vmc cannot unpack",
                l.digest(),
                m.digest(),
                l.media_type()
            )));
        }
        let config = self.oci_blob(manifest.config())?;
        let layers = manifest
            .layers()
            .iter()
            .map(|l| self.oci_blob(l))
            .collect::<Result<Vec<_>, _>>()?;
        self.check.check_image(&config, &layers)?;
        if is_plain_oci(m, &manifest) {
            return Ok(Some(Descriptor::new(
                MediaType::ImageManifest,
                m.size(),
                m.digest().clone(),
            )));
        }
        self.check.write_manifest(&config, &layers).map(Some)
    }
}

/// Checks images assembled from blobs of the store (loaded from an archive
/// or pulled from a registry) and writes their manifests. Problems are
/// worded by `invalid`, which says where the image came from.
pub(crate) struct Checker<'a> {
    store: &'a Store,
    invalid: Box<dyn Fn(String) -> ImageError + 'a>,
    /// Diff ids (sha256 of the uncompressed tar) of layers already checked.
    diff_ids: HashMap<Digest, String>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(store: &'a Store, invalid: impl Fn(String) -> ImageError + 'a) -> Self {
        Checker {
            store,
            invalid: Box::new(invalid),
            diff_ids: HashMap::new(),
        }
    }

    fn invalid(&self, msg: impl Display) -> ImageError {
        (self.invalid)(msg.to_string())
    }

    /// The content of a JSON blob, bounded in size.
    pub(crate) fn json_blob(&self, blob: &Blob, what: &str) -> Result<Vec<u8>, ImageError> {
        if blob.size > MAX_JSON {
            return Err(self.invalid(format!(
                "{what} {} has {} bytes, more than the {} MiB allowed",
                blob.digest,
                blob.size,
                MAX_JSON >> 20
            )));
        }
        Ok(self.store.read_blob(&blob.digest)?)
    }

    /// The diff id of a layer blob: the sha256 of its uncompressed content.
    fn diff_id(&mut self, blob: &Blob) -> Result<String, ImageError> {
        if let Some(d) = self.diff_ids.get(&blob.digest) {
            return Ok(d.clone());
        }
        // Read whole even when uncompressed (its diff id is then its digest):
        // every entry is checked as unpacking would check it.
        let p = self.store.blob_path(&blob.digest);
        let id = crate::image::import::verified_diff_id(&p)
            .map_err(|e| self.invalid(format!("layer {}: {e}", blob.digest)))?;
        self.diff_ids.insert(blob.digest.clone(), id.clone());
        Ok(id)
    }

    /// Checks that `config` is an image configuration whose diff ids are
    /// those of `layers`, in order.
    pub(crate) fn check_image(&mut self, config: &Blob, layers: &[Blob]) -> Result<(), ImageError> {
        let data = self.json_blob(config, "config")?;
        let cfg = ImageConfiguration::from_reader(&data[..]).map_err(|e| {
            self.invalid(format!(
                "config {} is not an image configuration: {e}",
                config.digest
            ))
        })?;
        let want = cfg.rootfs().diff_ids();
        if layers.len() > MAX_LAYERS {
            return Err(self.invalid(format!(
                "image {} has {} layers, more than the {MAX_LAYERS} allowed",
                config.digest,
                layers.len()
            )));
        }
        if want.len() != layers.len() {
            return Err(self.invalid(format!(
                "image {} has {} layers but its config lists {} diff ids",
                config.digest,
                layers.len(),
                want.len()
            )));
        }
        for (layer, want) in layers.iter().zip(want) {
            let got = self.diff_id(layer)?;
            if got != *want {
                return Err(self.invalid(format!(
                    "layer {} of image {} uncompresses to {got}, but the config says {want}",
                    layer.digest, config.digest
                )));
            }
        }
        Ok(())
    }

    /// Writes an OCI manifest for `config` and `layers` (stored as they are;
    /// layer media types from their first bytes); returns its descriptor.
    pub(crate) fn write_manifest(
        &self,
        config: &Blob,
        layers: &[Blob],
    ) -> Result<Descriptor, ImageError> {
        let mut descs = Vec::with_capacity(layers.len());
        for l in layers {
            let media = layer_media_type(&self.store.blob_path(&l.digest))?;
            descs.push(Descriptor::new(media, l.size, l.digest.clone()));
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config.size,
                config.digest.clone(),
            ))
            .layers(descs)
            .build()
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let json = manifest
            .to_string()
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let (digest, size) = self.store.put_bytes(json.as_bytes())?;
        Ok(Descriptor::new(MediaType::ImageManifest, size, digest))
    }
}

/// What a descriptor's media type says it points to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Index,
    Other,
}

pub(crate) fn kind(media: &MediaType) -> Kind {
    match media {
        MediaType::ImageManifest => Kind::Manifest,
        MediaType::ImageIndex => Kind::Index,
        MediaType::Other(s) if s == DOCKER_MANIFEST => Kind::Manifest,
        MediaType::Other(s) if s == DOCKER_LIST => Kind::Index,
        _ => Kind::Other,
    }
}

/// Whether the manifest can be listed as it is: OCI media types throughout.
pub(crate) fn is_plain_oci(d: &Descriptor, m: &ImageManifest) -> bool {
    let oci_layer = |l: &Descriptor| {
        matches!(
            l.media_type(),
            MediaType::ImageLayer | MediaType::ImageLayerGzip | MediaType::ImageLayerZstd
        )
    };
    *d.media_type() == MediaType::ImageManifest
        && m.media_type()
            .as_ref()
            .is_none_or(|t| *t == MediaType::ImageManifest)
        && *m.config().media_type() == MediaType::ImageConfig
        && m.layers().iter().all(oci_layer)
}

/// The store name (`name:tag`) of an image reference; `None` when it is not
/// one, or names only a digest.
fn store_name(s: &str) -> Option<String> {
    Reference::parse(s).ok()?.tag_name()
}

/// The name an OCI archive gives the image of an `index.json` entry.
fn entry_name(d: &Descriptor) -> Option<String> {
    let a = d.annotations().as_ref()?;
    let raw = a.get(CONTAINERD_NAME).or_else(|| a.get(REF_NAME))?;
    let name = store_name(raw);
    if name.is_none() {
        log::warn!(
            "image {} is named '{raw}', which is not an image reference: loaded without a name",
            d.digest()
        );
    }
    name
}

/// Merges entries for the same manifest, keeping the archive's order.
fn merge(prepared: Vec<Prepared>) -> Vec<Prepared> {
    let mut out: Vec<Prepared> = Vec::new();
    for p in prepared {
        match out
            .iter_mut()
            .find(|o| o.manifest.digest() == p.manifest.digest())
        {
            Some(o) => {
                for n in p.names {
                    if !o.names.contains(&n) {
                        o.names.push(n);
                    }
                }
            }
            None => out.push(p),
        }
    }
    out
}

/// Lists the images in the index and returns them as stored.
fn register(store: &Store, prepared: &[Prepared]) -> Result<Vec<StoredImage>, ImageError> {
    for p in prepared {
        if p.names.is_empty() {
            store.add_unnamed(&p.manifest)?;
        }
        for n in &p.names {
            store.tag(n, &p.manifest)?;
        }
    }
    let mut all: HashMap<Digest, StoredImage> = store
        .images()?
        .into_iter()
        .map(|i| (i.manifest_digest.clone(), i))
        .collect();
    prepared
        .iter()
        .map(|p| {
            all.remove(p.manifest.digest()).ok_or_else(|| {
                ImageError::Invalid(format!(
                    "image {} was removed while it was being loaded",
                    p.manifest.digest()
                ))
            })
        })
        .collect()
}

/// Loads every image of the docker-archive or OCI archive at `path` (plain,
/// gzip or zstd) into the store; returns them in the archive's order.
pub fn load(store: &Store, path: &Path) -> Result<Vec<StoredImage>, ImageError> {
    let r = load_locked(store, path);
    // What a failed load stored goes, and so do the archive's files no
    // image refers to (each entry is stored as it streams by); its writer
    // lock is released by now.
    let _ = store.gc_if_idle();
    r
}

fn load_locked(store: &Store, path: &Path) -> Result<Vec<StoredImage>, ImageError> {
    let _w = store.writer()?;
    let contents = scan(store, path)?;
    let mut loader = Loader {
        archive: path,
        contents,
        check: Checker::new(store, move |msg| invalid(path, msg)),
    };
    let docs = &loader.contents.docs;
    let prepared = if let Some(doc) = docs.get(DOCKER_MANIFEST_JSON).cloned() {
        loader.docker_images(&doc)?
    } else if let Some(doc) = docs.get(INDEX_JSON).cloned() {
        loader.oci_images(&doc)?
    } else {
        return Err(invalid(
            path,
            "not a docker-archive or OCI archive: no manifest.json or index.json",
        ));
    };
    if prepared.is_empty() {
        return Err(invalid(path, "the archive holds no container image"));
    }
    register(store, &merge(prepared))
}

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
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
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

/// Writes an OCI archive of `images` (names, ids or id prefixes) to `out`,
/// atomically. Each image is listed once per name given, annotated with that
/// name in its store form (`alpine` becomes `alpine:latest`) unless it was
/// given by id; each blob is written once.
pub fn save(store: &Store, images: &[String], out: &Path) -> Result<(), ImageError> {
    if images.is_empty() {
        return Err(ImageError::Invalid("no image to save".to_string()));
    }
    let _w = store.writer()?; // no gc while blobs are read
    let (index, blobs) = plan(store, images)?;
    let index = index
        .to_string()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
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
        let w = write_layout(store, BufWriter::new(f), index.as_bytes(), &blobs, out)?;
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use oci_spec::image::{ImageConfigurationBuilder, RootFsBuilder};

    use super::*;
    use crate::image::disk::unpack_image;
    use crate::image::layer::Whiteouts;
    use crate::image::store::digest_of;

    const HELLO: &[u8] = b"hello from a loaded image\n";

    /// A tar (in memory) of regular files.
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Commits a one-layer image (`etc/hello`) named `name`.
    fn make_image(store: &Store, name: &str) -> StoredImage {
        let layer = tar_of(&[("etc/hello", HELLO)]);
        let (ld, ls) = store.put_bytes(&layer).unwrap();
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![ld.to_string()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let l = Descriptor::new(MediaType::ImageLayer, ls, ld);
        store.commit(&config, vec![l], Some(name)).unwrap()
    }

    fn fresh() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    /// The content of `etc/hello` once the image is unpacked.
    fn unpacked_hello(store: &Store, img: &StoredImage) -> Vec<u8> {
        let root = tempfile::tempdir().unwrap();
        unpack_image(store, img, root.path(), Whiteouts::Apply).unwrap();
        fs::read(root.path().join("etc/hello")).unwrap()
    }

    /// Whether `tool` is installed; tests that need it are skipped otherwise.
    fn have(tool: &str) -> bool {
        let found = Path::new("/usr/bin").join(tool).exists();
        if !found {
            // CI installs every peer (scripts/deps.sh): a skip there would hide a failure.
            crate::testing::skip(&format!(
                "{tool} is not installed (scripts/deps.sh installs it)"
            ));
        }
        found
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn save_then_load_round_trips() {
        let (dir, a) = fresh();
        let img = make_image(&a, "app:1");
        a.tag(
            "app:latest",
            &Descriptor::new(
                MediaType::ImageManifest,
                img.manifest_size,
                img.manifest_digest.clone(),
            ),
        )
        .unwrap();
        let out = dir.path().join("app.tar");
        save(&a, &["app:1".to_string(), "app".to_string()], &out).unwrap();
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 2, "the store and the archive, no temporary file");

        let (_d, b) = fresh();
        let loaded = load(&b, &out).unwrap();
        assert_eq!(loaded.len(), 1, "one image, two names");
        let got = b.resolve("app:1").unwrap();
        assert_eq!(got.id(), img.id());
        assert_eq!(
            got.manifest_digest, img.manifest_digest,
            "manifest kept as is"
        );
        let mut names = got.names.clone();
        names.sort();
        assert_eq!(names, ["app:1", "app:latest"]);
        assert_eq!(unpacked_hello(&b, &got), HELLO);

        // Loading again changes nothing; a compressed archive (gzip, zstd)
        // loads the same.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&fs::read(&out).unwrap()).unwrap();
        let gz_path = dir.path().join("app.tar.gz");
        fs::write(&gz_path, gz.finish().unwrap()).unwrap();
        assert_eq!(load(&b, &gz_path).unwrap()[0].id(), img.id());
        let zst_path = dir.path().join("app.tar.zst");
        fs::write(
            &zst_path,
            zstd::encode_all(&fs::read(&out).unwrap()[..], 3).unwrap(),
        )
        .unwrap();
        assert_eq!(load(&b, &zst_path).unwrap()[0].id(), img.id());
        assert_eq!(b.images().unwrap().len(), 1);
        // Into a fresh store, the zstd archive alone gives the same image.
        let (_z, z) = fresh();
        let got = load(&z, &zst_path).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id(), img.id());
        assert_eq!(got[0].manifest_digest, img.manifest_digest);
        assert_eq!(unpacked_hello(&z, &got[0]), HELLO);

        // Saving is deterministic.
        let again = dir.path().join("again.tar");
        save(&a, &["app:1".to_string(), "app".to_string()], &again).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
    }

    #[test]
    fn images_saved_by_id_load_without_a_name() {
        let (dir, a) = fresh();
        let img = make_image(&a, "app:1");
        let out = dir.path().join("byid.tar");
        save(&a, &[img.short_id()], &out).unwrap();
        let (_d, b) = fresh();
        let loaded = load(&b, &out).unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(loaded[0].names.is_empty());
        assert_eq!(b.images().unwrap().len(), 1, "kept although unnamed");
        assert_eq!(b.resolve(&img.id()).unwrap().id(), img.id());
        assert!(matches!(
            save(&a, &["nope:1".to_string()], &dir.path().join("x.tar")),
            Err(ImageError::Store(StoreError::NotFound(_)))
        ));
        assert!(!dir.path().join("x.tar").exists());
    }

    #[test]
    fn docker_archives_written_by_skopeo_load() {
        if !have("skopeo") {
            return;
        }
        let (dir, a) = fresh();
        let img = make_image(&a, "app:1");
        let oci = dir.path().join("app.oci.tar");
        save(&a, &["app:1".to_string()], &oci).unwrap();
        let docker = dir.path().join("app.docker.tar");
        run(Command::new("skopeo").args([
            "--insecure-policy",
            "copy",
            &format!("oci-archive:{}:app:1", oci.display()),
            &format!("docker-archive:{}:app:1", docker.display()),
        ]));
        let (_d, b) = fresh();
        let loaded = load(&b, &docker).unwrap();
        assert_eq!(loaded.len(), 1);
        let got = b.resolve("app:1").unwrap();
        assert_eq!(got.names, ["app:1"]);
        assert_eq!(got.id(), img.id(), "the config is stored as it is");
        assert_eq!(unpacked_hello(&b, &got), HELLO);
    }

    #[test]
    fn skopeo_and_umoci_read_saved_archives() {
        if !have("skopeo") || !have("umoci") {
            return;
        }
        let (dir, a) = fresh();
        make_image(&a, "app:1");
        let out = dir.path().join("app.tar");
        save(&a, &["app:1".to_string()], &out).unwrap();
        run(Command::new("skopeo").args([
            "--insecure-policy",
            "inspect",
            &format!("oci-archive:{}:app:1", out.display()),
        ]));
        let layout = dir.path().join("layout");
        fs::create_dir(&layout).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&out)
            .arg("-C")
            .arg(&layout));
        let bundle = dir.path().join("bundle");
        run(Command::new("umoci").args([
            "unpack",
            "--image",
            &format!("{}:app:1", layout.display()),
            &bundle.display().to_string(),
        ]));
        assert_eq!(fs::read(bundle.join("rootfs/etc/hello")).unwrap(), HELLO);
    }

    /// An OCI layout tar whose manifest blob has the wrong content.
    fn tampered_oci() -> Vec<u8> {
        let manifest = br#"{"schemaVersion":2}"#;
        let d = digest_of(manifest);
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{}}}]}}"#,
            manifest.len()
        );
        let blob = format!("blobs/sha256/{}", d.digest());
        tar_of(&[
            ("oci-layout", OCI_LAYOUT),
            ("index.json", index.as_bytes()),
            (&blob, b"something else"),
        ])
    }

    /// A docker-archive whose layers are the given files.
    fn docker_archive(layers: &[&str], files: &[(&str, &[u8])], diff_ids: &[String]) -> Vec<u8> {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let manifest = serde_json::json!([
            {"Config": "c.json", "RepoTags": ["bad:1"], "Layers": layers}
        ])
        .to_string();
        let mut all: Vec<(&str, &[u8])> = vec![
            ("manifest.json", manifest.as_bytes()),
            ("c.json", config.as_bytes()),
        ];
        all.extend_from_slice(files);
        tar_of(&all)
    }

    #[test]
    fn bad_archives_are_refused_and_add_no_image() {
        let (dir, store) = fresh();
        make_image(&store, "app:1");
        let mut random = Vec::with_capacity(4096);
        let mut x: u32 = 0x1234_5678;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            random.push(x as u8);
        }
        let layer = tar_of(&[("etc/hello", HELLO)]);
        let right = vec![digest_of(&layer).to_string()];
        let wrong = vec![digest_of(b"other").to_string()];
        // A layer that can never unpack: its whiteout names `..`.
        let hostile = tar_of(&[(".wh...", b"")]);
        let hostile_id = vec![digest_of(&hostile).to_string()];
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "hostile-layer",
                docker_archive(&["l.tar"], &[("l.tar", &hostile)], &hostile_id),
                "a whiteout must name one entry of its directory",
            ),
            ("random", random, "not a tar archive"),
            (
                "no-manifest",
                tar_of(&[("hello.txt", b"hi")]),
                "no manifest.json or index.json",
            ),
            (
                "missing-layer",
                docker_archive(&["l/layer.tar"], &[], &right),
                "refers to l/layer.tar, which is not in the archive",
            ),
            (
                "escaping-layer",
                docker_archive(&["../../etc/passwd"], &[], &right),
                "which is not in the archive",
            ),
            (
                "wrong-diff-id",
                docker_archive(&["l.tar"], &[("l.tar", &layer)], &wrong),
                "but the config says",
            ),
            ("tampered-blob", tampered_oci(), "does not match its digest"),
        ];
        let blobs = || {
            let mut v: Vec<_> = fs::read_dir(dir.path().join("store/blobs/sha256"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let before = blobs();
        for (name, data, want) in cases {
            let p = dir.path().join(name);
            fs::write(&p, data).unwrap();
            let err = load(&store, &p).expect_err(name).to_string();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.starts_with(&p.display().to_string()), "{name}: {err}");
            assert_eq!(store.images().unwrap().len(), 1, "{name} added an image");
            // Issue 16, 10: what a failed load stored goes with it.
            assert_eq!(blobs(), before, "{name} left blobs behind");
        }
        // The same docker-archive with the right diff id loads, its layer
        // found through a link as old `docker save` archives have them.
        let mut data = docker_archive(&["x/layer.tar"], &[("l.tar", &layer)], &right);
        data.truncate(data.len() - 1024); // drop the end-of-archive blocks
        let mut b = tar::Builder::new(data);
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "x/layer.tar", "../l.tar").unwrap();
        let p = dir.path().join("good");
        fs::write(&p, b.into_inner().unwrap()).unwrap();
        assert_eq!(load(&store, &p).unwrap()[0].names, ["bad:1"]);
        assert_eq!(store.images().unwrap().len(), 2);
    }

    #[test]
    fn archive_paths_are_normalised_inside_the_archive() {
        assert_eq!(normalize("", "./a//b/./c"), "a/b/c");
        assert_eq!(normalize("", "/../../etc/passwd"), "etc/passwd");
        assert_eq!(normalize("x/y", "../l.tar"), "x/l.tar");
        assert_eq!(normalize("x", "/abs"), "abs");
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("c"), "");
        assert!(named_digest(&format!("blobs/sha256/{}", "a".repeat(64))).is_some());
        assert!(named_digest("blobs/sha256/xyz").is_none());
    }
}
