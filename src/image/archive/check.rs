//! The [`Checker`]: checks an image assembled from blobs of the store (its
//! config parses, its diff ids are those of its layers) and writes an OCI
//! manifest for it. Used by `vmc load` and `vmc pull`.

use std::collections::HashMap;
use std::fmt::Display;

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageManifestBuilder, MediaType};

use super::super::import::layer_media_type;
use super::super::store::Store;
use super::super::ImageError;
use super::{Blob, MAX_JSON, MAX_LAYERS};

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
