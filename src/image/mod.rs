//! Images: the OCI store, references, layers, imports and the root disks
//! built from them. Nothing here knows about containers.

pub mod archive;
pub mod disk;
pub mod extras;
pub mod import;
pub mod layer;
pub mod lookup;
pub mod pull;
pub mod reference;
pub mod store;

pub use reference::Reference;
pub use store::{Store, StoreError, StoredImage};

/// Errors handling images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A registry could not be reached, refused or sent something wrong.
    #[error("{0}")]
    Registry(String),
}

impl ImageError {
    pub(crate) fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
