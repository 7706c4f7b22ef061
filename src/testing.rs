//! Test support shared by the unit and integration tests: skips that the
//! harness can count (defined in `vmc-spawn`, which the guest agent's
//! tests share).

pub use vmc_spawn::testing::{ci, root, skip};
