//! Device models: the buses, the legacy PC devices and virtio.

pub mod bus;
pub mod legacy;
pub mod virtio;
