//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz on nightly: `make
//! fuzz`) and for the test that replays their corpora and every crash found
//! so far on stable (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, as
//! a hostile image, build context or guest would hand them over, and must
//! return: no panic, no hang, no allocation beyond the bounds vmc enforces.

use std::io::Cursor;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The targets by name (the directory names under `fuzz/corpus` and
/// `fuzz/artifacts`, and the fuzz binaries' names).
pub const TARGETS: &[(&str, Target)] = &[
    ("dockerfile", dockerfile),
    ("dockerignore", dockerignore),
    ("host_frames", host_frames),
    ("guest_frames", guest_frames),
    ("layer", layer),
    ("archive", archive),
    ("vmm_control", vmm_control),
];

/// What the host decodes from a (compromised) jailed VMM process: one
/// control message, its texts made safe to print.
pub fn vmm_control(data: &[u8]) {
    crate::vmm::process::fuzz_from_vmm(data);
}

/// The Dockerfile front end: parsing and its checks.
pub fn dockerfile(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::build::dockerfile::parse(text);
    }
}

/// `.dockerignore`: the first part (up to a NUL byte) is the file, the
/// lines after it are context paths asked about.
pub fn dockerignore(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (file, paths) = text.split_once('\0').unwrap_or((&text, ""));
    crate::build::context::check_ignore(file, paths.lines());
}

/// What the host decodes from a guest agent: `GuestMsg` frames, through the
/// streaming decoder (attached runs) and the blocking reader.
pub fn host_frames(data: &[u8]) {
    frames::<vmc_proto::GuestMsg>(data);
}

/// What the guest agent decodes from the host: `HostMsg` frames.
pub fn guest_frames(data: &[u8]) {
    frames::<vmc_proto::HostMsg>(data);
}

fn frames<T: for<'de> serde::Deserialize<'de>>(data: &[u8]) {
    let mut d = vmc_proto::FrameDecoder::default();
    // Fed in two parts: a frame split across reads is the usual case.
    let (a, b) = data.split_at(data.len() / 2);
    d.feed(a);
    while let Ok(Some(_)) = d.next_frame::<T>() {}
    d.feed(b);
    while let Ok(Some(_)) = d.next_frame::<T>() {}
    let mut r = Cursor::new(data);
    while vmc_proto::read_frame::<_, T>(&mut r).is_ok() {}
}

/// A fresh directory under the temporary directory, removed by the caller.
fn scratch(what: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "vmc-fuzz-{what}-{}-{}",
        std::process::id(),
        crate::host::new_id()
    ));
    std::fs::create_dir(&dir).ok().map(|_| dir)
}

/// A docker-archive or OCI archive (`vmc load`) loaded into an empty store.
pub fn archive(data: &[u8]) {
    let Some(dir) = scratch("archive") else {
        return;
    };
    let tar = dir.join("in.tar");
    if std::fs::write(&tar, data).is_ok() {
        if let Ok(store) = crate::image::Store::open(&dir.join("store")) {
            let _ = crate::image::archive::load(&store, &tar);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layer tar (plain, gzip or zstd) unpacked both ways (whiteouts
/// applied, and as overlayfs whiteouts) into a fresh directory, with small
/// bounds.
pub fn layer(data: &[u8]) {
    use crate::image::layer::{decompress, unpack, Limits, Whiteouts};
    let limits = Limits {
        max_file: 1 << 20,
        max_total: 4 << 20,
        max_entries: 2_000,
    };
    for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
        let Some(dir) = scratch("layer") else {
            return;
        };
        if let Ok(r) = decompress(Cursor::new(data)) {
            let _ = unpack(r, &dir, mode, limits);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
