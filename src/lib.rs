//! vmc: Docker's workflow with a microVM boundary.
//!
//! Data flows one way: CLI -> runtime -> (vmm + devices) -> guest. Nothing
//! below `runtime` knows about the CLI; nothing in `vmm` or `devices` knows
//! about images or containers.

pub mod assets;
pub mod bench;
pub mod build;
pub mod cli;
pub mod devices;
pub mod disk;
pub mod image;
pub mod runtime;
#[doc(hidden)]
pub mod testing;
pub mod uds;
pub mod vmm;
