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
//!
//! The work is split by direction: `load.rs` reads archives (both passes),
//! `save.rs` writes them, and `check.rs` holds the [`Checker`] that loading
//! and `vmc pull` share. This file keeps what they all use: the limits, the
//! media types and what a descriptor points to.

use oci_spec::image::{Descriptor, Digest, ImageManifest, MediaType};

mod check;
mod load;
mod save;

pub(crate) use check::Checker;
pub use load::load;
pub use save::{save, save_to};

/// Largest JSON document read into memory (`manifest.json`, `index.json`,
/// manifests, configs).
pub(crate) const MAX_JSON: u64 = 8 << 20;
/// Largest file an archive may hold (as
/// [`layer::Limits`](super::layer::Limits) bounds a layer).
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

/// A file of the archive (or a download), now a blob in the store.
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub digest: Digest,
    pub size: u64,
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

#[cfg(test)]
mod tests;
