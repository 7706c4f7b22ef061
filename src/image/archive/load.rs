//! Loading an archive (`vmc load`) in two passes: the first streams the
//! archive's files into the store as blobs, the second assembles, checks and
//! registers the images (see the module above for the formats read).

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use oci_spec::image::{Arch, Descriptor, Digest, ImageIndex, ImageManifest, MediaType, Os};
use serde::Deserialize;

use super::super::layer;
use super::super::store::{Store, StoreError, StoredImage, REF_NAME};
use super::super::{ImageError, Reference};
use super::{
    is_plain_oci, kind, Blob, Checker, Kind, CONTAINERD_NAME, DOCKER_CONFIG, DOCKER_MANIFEST_JSON,
    INDEX_JSON, LAYER_TYPES, MAX_ENTRIES, MAX_ENTRY, MAX_IMAGES, MAX_JSON, MAX_LINK_HOPS,
    MAX_NESTING, OCI_LAYOUT_FILE,
};

// ---------------------------------------------------------------------------
// Loading, first pass: the archive's files become blobs.
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

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
