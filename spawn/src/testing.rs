//! Support for the test suite, shared by the unit tests and the integration
//! tests (`tests/`): a skipped test says so loudly, and the harness
//! (`scripts/test.sh`) counts it apart from the passes. It lives here, in
//! the crate both vmc and its guest agent build on, so that the tests of
//! both report skips the same way.
//!
//! libtest has no "skipped" outcome: a test that returns early passes. So
//! every skip goes through [`skip`], which refuses under `CI=true` (where
//! every test that can run must run), prints the reason, and appends a line
//! to the file named by `VMC_TEST_SKIPS` for the harness to report.

use std::io::Write;

/// Whether this is a CI run (`CI=true`), where nothing may skip.
pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Records that the calling test skips (all or part of) its checks because
/// of `reason`; panics under `CI=true`.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| match n.rsplit_once('-') {
            // Cargo names test executables `NAME-HASH`.
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => n,
        })
        .unwrap_or_default();
    assert!(
        !ci(),
        "CI=true but {binary}::{test} would skip ({reason}): under CI every test runs"
    );
    eprintln!("SKIPPED {binary}::{test}: {reason}");
    if let Some(path) = std::env::var_os("VMC_TEST_SKIPS") {
        let line = format!("{binary}::{test}: {reason}\n");
        // One write of a short line to a file opened for appending: lines
        // from tests running at once do not interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Whether the calling test can do what only root can (mount, unshare,
/// chown, switch user); records a skip otherwise. Use as
/// `if !testing::root() { return; }` at the start of such a test.
pub fn root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip("needs root (namespaces, mounts, ownership)");
    false
}
