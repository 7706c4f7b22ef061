//! The image store: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) at `$VMC_HOME`, readable by skopeo and umoci. Image
//! names are the `org.opencontainers.image.ref.name` annotation of their
//! manifest's index entry (`name:tag`), so `skopeo inspect oci:$VMC_HOME:app:1`
//! finds them. An image's id is its config digest, as in Docker.
//!
//! Blobs are content-addressed and written atomically (temporary file,
//! fsync, rename) after their digest is checked. `index.json` is rewritten
//! atomically under an exclusive lock. Writers hold a shared "gc" lock for
//! their whole operation, so garbage collection (exclusive) never removes the
//! blobs of an image that is still being assembled.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
};
use sha2::{Digest as _, Sha256};

use super::reference::Reference;

/// The annotation naming an image in the index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("no such image: {0} (build it, pull it, load it or import it first)")]
    NotFound(String),
    #[error("image reference '{0}' matches more than one image; give more of the id")]
    Ambiguous(String),
    #[error("blob {expected} does not match its content (got {got}): the input is corrupted")]
    DigestMismatch { expected: String, got: String },
    #[error("the image store is damaged: {0} (remove the broken image with vmc rmi -f)")]
    Damaged(String),
    #[error(transparent)]
    Reference(#[from] super::reference::ReferenceError),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The names (`name:tag`) that point at this manifest.
    pub names: Vec<String>,
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// Docker's HEALTHCHECK and ONBUILD, beside the OCI config.
    pub extras: super::extras::Extras,
}

impl StoredImage {
    /// The image id (config digest), as `sha256:<hex>`.
    pub fn id(&self) -> String {
        self.manifest.config().digest().to_string()
    }

    /// The first 12 hex digits of the id.
    pub fn short_id(&self) -> String {
        let id = self.id();
        id.trim_start_matches("sha256:").chars().take(12).collect()
    }

    /// Sum of the layer blobs' sizes.
    pub fn size(&self) -> u64 {
        self.manifest.layers().iter().map(|l| l.size()).sum()
    }
}

/// A held flock; released on drop.
pub struct Lock {
    _file: File,
}

/// The OCI layout on disk.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// sha256 of `data` as an OCI digest.
pub fn digest_of(data: &[u8]) -> Digest {
    hex_digest(&Sha256::digest(data))
}

fn hex_digest(bytes: &[u8]) -> Digest {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
        .parse()
        .expect("a sha256 digest is well formed")
}

/// Writes `data` to `path` atomically: temporary file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    // A bare file name's parent is "": the current directory.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        &crate::host::new_id()[..8]
    ));
    let result = (|| {
        // 0600: the store and container state are vmc's alone.
        let mut f = crate::host::private_file(&tmp, false)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl Store {
    /// Opens (creating if needed) the layout at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let s = Store {
            root: root.to_path_buf(),
        };
        fs::create_dir_all(s.blobs_dir()).map_err(io_err(root))?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&layout))?;
        }
        // The store is its user's alone (an older vmc made it 0755).
        crate::host::private_dir(root).map_err(io_err(root))?;
        let index = root.join("index.json");
        if !index.exists() {
            let _l = s.lock("index", true)?;
            if !index.exists() {
                write_atomic(&index, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#)
                    .map_err(io_err(&index))?;
            }
        }
        Ok(s)
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// Path of a blob.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.digest())
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<Lock, StoreError> {
        self.lock_with(name, exclusive, true)
            .map(|l| l.expect("a blocking lock is granted"))
    }

    /// The lock `name`; `None` when `wait` is false and someone holds it.
    fn lock_with(
        &self,
        name: &str,
        exclusive: bool,
        wait: bool,
    ) -> Result<Option<Lock>, StoreError> {
        let p = self.root.join(format!(".vmc-{name}.lock"));
        let f = File::create(&p).map_err(io_err(&p))?;
        let mut op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        // SAFETY: flock on a descriptor we own; blocks until granted unless LOCK_NB.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            let e = io::Error::last_os_error();
            if !wait && e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(io_err(&p)(e));
        }
        Ok(Some(Lock { _file: f }))
    }

    /// Held by every operation that adds blobs, until its image is named.
    pub fn writer(&self) -> Result<Lock, StoreError> {
        self.lock("gc", false)
    }

    /// Streams `reader` into a blob, hashing on the way; the blob appears only
    /// if complete and (when `expect` is given) matching.
    pub fn put_blob<R: Read>(
        &self,
        mut reader: R,
        expect: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        if let Some(d) = expect {
            if self.has_blob(d) {
                // Still consume the input so that archives stay in sync.
                io::copy(&mut reader, &mut io::sink()).map_err(io_err(&self.root))?;
                let size = fs::metadata(self.blob_path(d))
                    .map_err(io_err(&self.root))?
                    .len();
                return Ok((d.clone(), size));
            }
        }
        let dir = self.blobs_dir();
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            &crate::host::new_id()[..8]
        ));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut size = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(io_err(&tmp))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                size += n as u64;
            }
            f.sync_all().map_err(io_err(&tmp))?;
            let got = hex_digest(&h.finalize());
            if let Some(e) = expect {
                if *e != got {
                    return Err(StoreError::DigestMismatch {
                        expected: e.to_string(),
                        got: got.to_string(),
                    });
                }
            }
            fs::rename(&tmp, self.blob_path(&got)).map_err(io_err(&tmp))?;
            Ok((got, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores `data` as a blob.
    pub fn put_bytes(&self, data: &[u8]) -> Result<(Digest, u64), StoreError> {
        self.put_blob(data, Some(&digest_of(data)))
    }

    /// Reads a blob, checking its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(d);
        let data = fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Damaged(format!("blob {d} is missing")),
            _ => io_err(&p)(e),
        })?;
        let got = digest_of(&data);
        if &got != d {
            return Err(StoreError::Damaged(format!("blob {d} is corrupted")));
        }
        Ok(data)
    }

    /// The index.
    pub fn index(&self) -> Result<ImageIndex, StoreError> {
        let p = self.root.join("index.json");
        let data = fs::read(&p).map_err(io_err(&p))?;
        ImageIndex::from_reader(&data[..])
            .map_err(|e| StoreError::Damaged(format!("index.json: {e}")))
    }

    /// Changes the index's entries under the index lock.
    fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<(), StoreError> {
        let _l = self.lock("index", true)?;
        let mut index = self.index()?;
        let mut entries = index.manifests().clone();
        f(&mut entries);
        index.set_manifests(entries);
        let data = index
            .to_string()
            .map_err(|e| StoreError::Damaged(e.to_string()))?;
        let p = self.root.join("index.json");
        write_atomic(&p, data.as_bytes()).map_err(io_err(&p))
    }

    /// Points `name` (`name:tag`) at the manifest `m`; any image it named
    /// before stays in the store untagged, unless it has other names.
    pub fn tag(&self, name: &str, m: &Descriptor) -> Result<(), StoreError> {
        let mut d = Descriptor::new(MediaType::ImageManifest, m.size(), m.digest().clone());
        d.set_annotations(Some(HashMap::from([(
            REF_NAME.to_string(),
            name.to_string(),
        )])));
        self.update_index(|entries| {
            entries.retain(|e| ref_name(e) != Some(name));
            // An unnamed entry for the same manifest is replaced by the named one.
            entries.retain(|e| !(ref_name(e).is_none() && e.digest() == m.digest()));
            entries.push(d);
        })
    }

    /// Lists the manifest `m` in the index without a name (an image shown as
    /// `<none>`), unless an entry, named or not, already lists it.
    pub fn add_unnamed(&self, m: &Descriptor) -> Result<(), StoreError> {
        let d = Descriptor::new(MediaType::ImageManifest, m.size(), m.digest().clone());
        self.update_index(|entries| {
            if !entries.iter().any(|e| e.digest() == d.digest()) {
                entries.push(d);
            }
        })
    }

    /// Removes the name; the manifest stays reachable if other names or an
    /// unnamed entry keep it. Returns whether the name existed.
    pub fn untag(&self, name: &str) -> Result<bool, StoreError> {
        let mut found = false;
        self.update_index(|entries| {
            let before = entries.len();
            entries.retain(|e| ref_name(e) != Some(name));
            found = entries.len() != before;
        })?;
        Ok(found)
    }

    /// Removes every index entry of the manifest.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<(), StoreError> {
        self.update_index(|entries| entries.retain(|e| e.digest() != digest))
    }

    /// Writes config and manifest for `layers` and names the image. The same
    /// config and layers always give the same digests.
    pub fn commit(
        &self,
        config: &ImageConfiguration,
        layers: Vec<Descriptor>,
        name: Option<&str>,
    ) -> Result<StoredImage, StoreError> {
        self.commit_with(config, &super::extras::Extras::default(), layers, name)
    }

    /// [`Store::commit`] with Docker's config fields beyond the OCI spec.
    pub fn commit_with(
        &self,
        config: &ImageConfiguration,
        extras: &super::extras::Extras,
        layers: Vec<Descriptor>,
        name: Option<&str>,
    ) -> Result<StoredImage, StoreError> {
        let mut value =
            serde_json::to_value(config).map_err(|e| StoreError::Damaged(e.to_string()))?;
        extras.add_to(&mut value);
        let cfg = canonical_json(&value)?;
        let (cd, cs) = self.put_bytes(cfg.as_bytes())?;
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(MediaType::ImageConfig, cs, cd))
            .layers(layers)
            .build()
            .map_err(|e| StoreError::Damaged(e.to_string()))?;
        let mj = canonical_json(&manifest)?;
        let (md, ms) = self.put_bytes(mj.as_bytes())?;
        let desc = Descriptor::new(MediaType::ImageManifest, ms, md.clone());
        match name {
            Some(n) => self.tag(n, &desc)?,
            None => self.add_unnamed(&desc)?,
        }
        self.load(&md, ms)
    }

    fn load(&self, md: &Digest, size: u64) -> Result<StoredImage, StoreError> {
        let manifest = ImageManifest::from_reader(&self.read_blob(md)?[..])
            .map_err(|e| StoreError::Damaged(format!("manifest {md}: {e}")))?;
        let blob = self.read_blob(manifest.config().digest())?;
        let config = ImageConfiguration::from_reader(&blob[..])
            .map_err(|e| StoreError::Damaged(format!("config of {md}: {e}")))?;
        let extras = super::extras::Extras::from_config_blob(&blob);
        let names = self
            .index()?
            .manifests()
            .iter()
            .filter(|e| e.digest() == md)
            .filter_map(|e| ref_name(e).map(String::from))
            .collect();
        Ok(StoredImage {
            names,
            manifest_digest: md.clone(),
            manifest_size: size,
            manifest,
            config,
            extras,
        })
    }

    /// Every image (one per manifest), in index order.
    pub fn images(&self) -> Result<Vec<StoredImage>, StoreError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in self.index()?.manifests() {
            if seen.insert(e.digest().clone()) {
                out.push(self.load(e.digest(), e.size())?);
            }
        }
        Ok(out)
    }

    /// Finds an image by `name[:tag]`, by id or id prefix, or by manifest digest.
    pub fn resolve(&self, s: &str) -> Result<StoredImage, StoreError> {
        let index = self.index()?;
        if let Ok(r) = Reference::parse(s) {
            if r.digest.is_none() {
                let name = r.store_name();
                if let Some(e) = index
                    .manifests()
                    .iter()
                    .find(|e| ref_name(e) == Some(name.as_str()))
                {
                    return self.load(e.digest(), e.size());
                }
            }
        }
        let hex = s.trim_start_matches("sha256:");
        if hex.len() >= 4 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut found: Vec<StoredImage> = Vec::new();
            for img in self.images()? {
                let id = img.id();
                let md = img.manifest_digest.to_string();
                if id.trim_start_matches("sha256:").starts_with(hex)
                    || md.trim_start_matches("sha256:").starts_with(hex)
                {
                    found.push(img);
                }
            }
            match found.len() {
                1 => return Ok(found.remove(0)),
                0 => {}
                _ => return Err(StoreError::Ambiguous(s.to_string())),
            }
        }
        Err(StoreError::NotFound(s.to_string()))
    }

    /// Removes blobs no manifest in the index refers to; returns how many.
    pub fn gc(&self) -> Result<usize, StoreError> {
        let _g = self.lock("gc", true)?;
        self.gc_locked()
    }

    /// After a failed import, load or pull: removes what it stored (every
    /// blob no image or build cache entry refers to), unless another writer
    /// is at work, in which case a later collection will. A failure leaves
    /// nothing behind, without waiting on anyone for long.
    ///
    /// The lock is tried for up to half a second: a writer's shared lock
    /// also lives, for a moment, in any child this process forks while it
    /// holds it (until the child's exec closes the descriptor), and such a
    /// fork by another thread is no writer at work.
    pub fn gc_if_idle(&self) -> Result<Option<usize>, StoreError> {
        for _ in 0..50 {
            if let Some(_g) = self.lock_with("gc", true, false)? {
                return self.gc_locked().map(Some);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(None)
    }

    fn gc_locked(&self) -> Result<usize, StoreError> {
        let mut keep = HashSet::new();
        for e in self.index()?.manifests() {
            keep.insert(e.digest().digest().to_string());
            if let Ok(data) = self.read_blob(e.digest()) {
                if let Ok(m) = ImageManifest::from_reader(&data[..]) {
                    keep.insert(m.config().digest().digest().to_string());
                    for l in m.layers() {
                        keep.insert(l.digest().digest().to_string());
                    }
                }
            }
        }
        // Build cache entries (cache/build/*.json) refer to layers of their own.
        if let Ok(entries) = fs::read_dir(self.root.join("cache").join("build")) {
            for e in entries.flatten() {
                let parsed = fs::read(e.path())
                    .ok()
                    .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok());
                if let Some(v) = parsed {
                    collect_digests(&v, &mut keep);
                }
            }
        }
        let mut removed = 0;
        let dir = self.blobs_dir();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Every `sha256:<hex>` string in a JSON document, as its hex.
fn collect_digests(v: &serde_json::Value, out: &mut HashSet<String>) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(hex) = s.strip_prefix("sha256:") {
                out.insert(hex.to_string());
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_digests(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_digests(x, out)),
        _ => {}
    }
}

/// The name annotation of an index entry.
pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

/// Now as RFC 3339 UTC (what OCI's `created` fields hold).
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// JSON with object keys sorted: oci-spec keeps labels and annotations in
/// HashMaps, whose order changes from process to process, and a digest must
/// not.
pub fn canonical_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_value(v)
        .and_then(|v| serde_json::to_string(&v))
        .map_err(|e| StoreError::Damaged(e.to_string()))
}

#[cfg(test)]
mod tests {
    use oci_spec::image::{ImageConfigurationBuilder, RootFsBuilder};

    use super::*;

    fn config(diff: &str) -> ImageConfiguration {
        ImageConfigurationBuilder::default()
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff.to_string()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1795840459), "2026-11-28T04:34:19Z");
    }

    #[test]
    fn images_are_committed_named_resolved_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(dir.path().join("oci-layout").is_file());
        let (ld, ls) = s.put_bytes(b"layer bytes").unwrap();
        let layer = Descriptor::new(MediaType::ImageLayer, ls, ld.clone());
        let img = s
            .commit(&config(ld.as_ref()), vec![layer], Some("app:1"))
            .unwrap();
        assert_eq!(img.names, vec!["app:1".to_string()]);
        assert_eq!(s.resolve("app:1").unwrap().id(), img.id());
        assert_eq!(s.resolve(&img.short_id()).unwrap().id(), img.id());
        assert!(matches!(s.resolve("app:2"), Err(StoreError::NotFound(_))));
        assert!(
            matches!(s.resolve("app"), Err(StoreError::NotFound(_))),
            "app means app:latest"
        );
        s.tag(
            "app:latest",
            &Descriptor::new(
                MediaType::ImageManifest,
                img.manifest_size,
                img.manifest_digest.clone(),
            ),
        )
        .unwrap();
        assert_eq!(s.resolve("app").unwrap().names.len(), 2);
        assert_eq!(s.images().unwrap().len(), 1, "one image, two names");
        // Unreferenced blobs go, referenced ones stay.
        let (junk, _) = s.put_bytes(b"junk").unwrap();
        assert_eq!(s.gc().unwrap(), 1);
        assert!(!s.has_blob(&junk) && s.has_blob(&ld));
        assert!(s.untag("app:1").unwrap() && s.untag("app:latest").unwrap());
        assert!(s.images().unwrap().is_empty());
        assert_eq!(s.gc().unwrap(), 3, "layer, config and manifest");
    }

    #[test]
    fn unnamed_entries_are_added_once_and_give_way_to_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (ld, ls) = s.put_bytes(b"layer").unwrap();
        let layer = Descriptor::new(MediaType::ImageLayer, ls, ld.clone());
        let img = s.commit(&config(ld.as_ref()), vec![layer], None).unwrap();
        let m = Descriptor::new(
            MediaType::ImageManifest,
            img.manifest_size,
            img.manifest_digest.clone(),
        );
        s.add_unnamed(&m).unwrap();
        assert_eq!(s.index().unwrap().manifests().len(), 1, "listed once");
        s.tag("app:1", &m).unwrap();
        s.add_unnamed(&m).unwrap();
        let index = s.index().unwrap();
        assert_eq!(index.manifests().len(), 1, "the name replaced it");
        assert_eq!(ref_name(&index.manifests()[0]), Some("app:1"));
    }

    #[test]
    fn blobs_are_verified_on_the_way_in_and_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let wrong = digest_of(b"other");
        assert!(matches!(
            s.put_blob(&b"data"[..], Some(&wrong)),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!s.has_blob(&wrong));
        assert_eq!(
            std::fs::read_dir(s.blobs_dir()).unwrap().count(),
            0,
            "no temporary leftovers"
        );
        let (d, _) = s.put_bytes(b"data").unwrap();
        std::fs::write(s.blob_path(&d), b"tampered").unwrap();
        assert!(matches!(s.read_blob(&d), Err(StoreError::Damaged(_))));
    }

    #[test]
    fn concurrent_writers_keep_index_json_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        std::thread::scope(|sc| {
            for t in 0..8 {
                let s = s.clone();
                sc.spawn(move || {
                    for i in 0..10 {
                        let (ld, ls) = s.put_bytes(format!("layer {t} {i}").as_bytes()).unwrap();
                        let l = Descriptor::new(MediaType::ImageLayer, ls, ld.clone());
                        s.commit(&config(ld.as_ref()), vec![l], Some(&format!("img{t}:{i}")))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(s.images().unwrap().len(), 80);
    }
}
