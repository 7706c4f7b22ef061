//! Replays every fuzz corpus file and every crash found so far
//! (`fuzz/corpus/TARGET/*`, `fuzz/artifacts/TARGET/*`) through the fuzz
//! targets' entry points, on stable Rust: what once broke a target stays
//! fixed. `make fuzz` (nightly, cargo-fuzz) grows the corpora.

use std::path::Path;

mod common;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_corpus_file_and_crash_replays_without_a_panic() {
    let fuzz = common::repo().join("fuzz");
    for (name, target) in vmc::fuzzing::TARGETS {
        let corpus = files(&fuzz.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seeds");
        for f in corpus
            .iter()
            .chain(&files(&fuzz.join("artifacts").join(name)))
        {
            let data = std::fs::read(f).unwrap();
            let replay = std::panic::catch_unwind(|| target(&data));
            assert!(replay.is_ok(), "{name}: {} panics", f.display());
        }
    }
}

/// The frame seeds are real sessions: they decode, so the fuzzer starts
/// from valid frames of today's protocol (a protocol change that leaves
/// them stale fails here).
#[test]
fn the_frame_seeds_decode_as_the_protocol_stands() {
    let fuzz = common::repo().join("fuzz/corpus");
    let count = |data: &[u8], f: fn(&mut &[u8]) -> bool| {
        let mut r = data;
        let mut n = 0;
        while f(&mut r) {
            n += 1;
        }
        n
    };
    let host = std::fs::read(fuzz.join("host_frames/session")).unwrap();
    let guest = std::fs::read(fuzz.join("guest_frames/session")).unwrap();
    let guest_msgs = count(&host, |r| {
        vmc_proto::read_frame::<_, vmc_proto::GuestMsg>(r).is_ok()
    });
    let host_msgs = count(&guest, |r| {
        vmc_proto::read_frame::<_, vmc_proto::HostMsg>(r).is_ok()
    });
    assert_eq!((guest_msgs, host_msgs), (8, 8));
}

/// The archive seeds are archives `vmc load` takes: a docker-archive and an
/// OCI layout, one image each.
#[test]
fn the_archive_seeds_load() {
    let fuzz = common::repo().join("fuzz/corpus/archive");
    for seed in ["docker.tar", "oci.tar"] {
        let home = tempfile::tempdir().unwrap();
        let store = vmc::image::Store::open(&home.path().join("store")).unwrap();
        let images = vmc::image::archive::load(&store, &fuzz.join(seed)).unwrap();
        assert_eq!(images.len(), 1, "{seed}");
    }
}
