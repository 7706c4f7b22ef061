//! Test support shared by the unit and integration tests: skips that the
//! harness can count (defined in the guest crate, which the guest agent's
//! tests share).

pub use vmc_guest::testing::{ci, root, skip};
