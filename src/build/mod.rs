//! `vmc build`: Dockerfiles to images, with every RUN step inside a microVM.

pub mod cache;
pub mod context;
pub mod dockerfile;
pub mod exec;
pub mod words;

pub use exec::{build, BuildError, BuildOptions};
