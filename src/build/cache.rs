//! The build cache: for every step, the image state (config and layers) it
//! produced, under a key chaining the parent's key, the instruction and the
//! content of copied files. Entries live in `$VMC_HOME/cache/build/`; the
//! store's garbage collection keeps the blobs they refer to.

use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What a step produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub config: ImageConfiguration,
    pub layers: Vec<Descriptor>,
    /// HEALTHCHECK and ONBUILD (older entries have none).
    #[serde(default)]
    pub extras: crate::image::extras::Extras,
}

/// The cache directory.
pub struct Cache {
    dir: PathBuf,
}

/// The next key in the chain.
pub fn chain(parent: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    for p in parts {
        h.update(b"\n");
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Cache {
    /// The cache of the store at `store_root`.
    pub fn new(store_root: &Path) -> Cache {
        Cache {
            dir: cache_dir(store_root),
        }
    }

    /// The entry for `key`, if any (and readable).
    pub fn get(&self, key: &str) -> Option<Entry> {
        let data = std::fs::read(self.dir.join(format!("{key}.json"))).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Records an entry (atomically; a failure only loses the cache entry).
    pub fn put(&self, key: &str, e: &Entry) {
        if std::fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        if let Ok(data) = serde_json::to_vec(e) {
            let _ = crate::image::store::write_atomic(&self.dir.join(format!("{key}.json")), &data);
        }
    }
}

/// Where build cache entries of the store at `store_root` are kept.
pub fn cache_dir(store_root: &Path) -> PathBuf {
    store_root.join("cache").join("build")
}
