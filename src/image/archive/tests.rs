use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use oci_spec::image::{Arch, Descriptor, ImageConfigurationBuilder, MediaType, Os, RootFsBuilder};

use super::save::header;
use super::*;
use crate::image::disk::unpack_image;
use crate::image::layer::Whiteouts;
use crate::image::store::{digest_of, Store, StoreError, StoredImage};
use crate::image::ImageError;

const HELLO: &[u8] = b"hello from a loaded image\n";

/// A tar (in memory) of regular files.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Commits a one-layer image (`etc/hello`) named `name`.
fn make_image(store: &Store, name: &str) -> StoredImage {
    let layer = tar_of(&[("etc/hello", HELLO)]);
    let (ld, ls) = store.put_bytes(&layer).unwrap();
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![ld.to_string()])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let l = Descriptor::new(MediaType::ImageLayer, ls, ld);
    store.commit(&config, vec![l], Some(name)).unwrap()
}

fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

/// The content of `etc/hello` once the image is unpacked.
fn unpacked_hello(store: &Store, img: &StoredImage) -> Vec<u8> {
    let root = tempfile::tempdir().unwrap();
    unpack_image(store, img, root.path(), Whiteouts::Apply).unwrap();
    fs::read(root.path().join("etc/hello")).unwrap()
}

/// Whether `tool` is installed; tests that need it are skipped otherwise.
fn have(tool: &str) -> bool {
    let found = Path::new("/usr/bin").join(tool).exists();
    if !found {
        // CI installs every peer (scripts/deps.sh): a skip there would hide a failure.
        crate::testing::skip(&format!(
            "{tool} is not installed (scripts/deps.sh installs it)"
        ));
    }
    found
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn save_then_load_round_trips() {
    let (dir, a) = fresh();
    let img = make_image(&a, "app:1");
    a.tag(
        "app:latest",
        &Descriptor::new(
            MediaType::ImageManifest,
            img.manifest_size,
            img.manifest_digest.clone(),
        ),
    )
    .unwrap();
    let out = dir.path().join("app.tar");
    save(&a, &["app:1".to_string(), "app".to_string()], &out).unwrap();
    let leftovers = fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 2, "the store and the archive, no temporary file");

    let (_d, b) = fresh();
    let loaded = load(&b, &out).unwrap();
    assert_eq!(loaded.len(), 1, "one image, two names");
    let got = b.resolve("app:1").unwrap();
    assert_eq!(got.id(), img.id());
    assert_eq!(
        got.manifest_digest, img.manifest_digest,
        "manifest kept as is"
    );
    let mut names = got.names.clone();
    names.sort();
    assert_eq!(names, ["app:1", "app:latest"]);
    assert_eq!(unpacked_hello(&b, &got), HELLO);

    // Loading again changes nothing; a compressed archive (gzip, zstd)
    // loads the same.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&fs::read(&out).unwrap()).unwrap();
    let gz_path = dir.path().join("app.tar.gz");
    fs::write(&gz_path, gz.finish().unwrap()).unwrap();
    assert_eq!(load(&b, &gz_path).unwrap()[0].id(), img.id());
    let zst_path = dir.path().join("app.tar.zst");
    fs::write(
        &zst_path,
        zstd::encode_all(&fs::read(&out).unwrap()[..], 3).unwrap(),
    )
    .unwrap();
    assert_eq!(load(&b, &zst_path).unwrap()[0].id(), img.id());
    assert_eq!(b.images().unwrap().len(), 1);
    // Into a fresh store, the zstd archive alone gives the same image.
    let (_z, z) = fresh();
    let got = load(&z, &zst_path).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), img.id());
    assert_eq!(got[0].manifest_digest, img.manifest_digest);
    assert_eq!(unpacked_hello(&z, &got[0]), HELLO);

    // Saving is deterministic.
    let again = dir.path().join("again.tar");
    save(&a, &["app:1".to_string(), "app".to_string()], &again).unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
}

#[test]
fn images_saved_by_id_load_without_a_name() {
    let (dir, a) = fresh();
    let img = make_image(&a, "app:1");
    let out = dir.path().join("byid.tar");
    save(&a, &[img.short_id()], &out).unwrap();
    let (_d, b) = fresh();
    let loaded = load(&b, &out).unwrap();
    assert_eq!(loaded.len(), 1);
    assert!(loaded[0].names.is_empty());
    assert_eq!(b.images().unwrap().len(), 1, "kept although unnamed");
    assert_eq!(b.resolve(&img.id()).unwrap().id(), img.id());
    assert!(matches!(
        save(&a, &["nope:1".to_string()], &dir.path().join("x.tar")),
        Err(ImageError::Store(StoreError::NotFound(_)))
    ));
    assert!(!dir.path().join("x.tar").exists());
}

#[test]
fn docker_archives_written_by_skopeo_load() {
    if !have("skopeo") {
        return;
    }
    let (dir, a) = fresh();
    let img = make_image(&a, "app:1");
    let oci = dir.path().join("app.oci.tar");
    save(&a, &["app:1".to_string()], &oci).unwrap();
    let docker = dir.path().join("app.docker.tar");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &format!("oci-archive:{}:app:1", oci.display()),
        &format!("docker-archive:{}:app:1", docker.display()),
    ]));
    let (_d, b) = fresh();
    let loaded = load(&b, &docker).unwrap();
    assert_eq!(loaded.len(), 1);
    let got = b.resolve("app:1").unwrap();
    assert_eq!(got.names, ["app:1"]);
    assert_eq!(got.id(), img.id(), "the config is stored as it is");
    assert_eq!(unpacked_hello(&b, &got), HELLO);
}

#[test]
fn skopeo_and_umoci_read_saved_archives() {
    if !have("skopeo") || !have("umoci") {
        return;
    }
    let (dir, a) = fresh();
    make_image(&a, "app:1");
    let out = dir.path().join("app.tar");
    save(&a, &["app:1".to_string()], &out).unwrap();
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "inspect",
        &format!("oci-archive:{}:app:1", out.display()),
    ]));
    let layout = dir.path().join("layout");
    fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&out)
        .arg("-C")
        .arg(&layout));
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:app:1", layout.display()),
        &bundle.display().to_string(),
    ]));
    assert_eq!(fs::read(bundle.join("rootfs/etc/hello")).unwrap(), HELLO);
}

/// An OCI layout tar whose manifest blob has the wrong content.
fn tampered_oci() -> Vec<u8> {
    let manifest = br#"{"schemaVersion":2}"#;
    let d = digest_of(manifest);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{}}}]}}"#,
        manifest.len()
    );
    let blob = format!("blobs/sha256/{}", d.digest());
    tar_of(&[
        ("oci-layout", OCI_LAYOUT),
        ("index.json", index.as_bytes()),
        (&blob, b"something else"),
    ])
}

/// A docker-archive whose layers are the given files.
fn docker_archive(layers: &[&str], files: &[(&str, &[u8])], diff_ids: &[String]) -> Vec<u8> {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let manifest = serde_json::json!([
        {"Config": "c.json", "RepoTags": ["bad:1"], "Layers": layers}
    ])
    .to_string();
    let mut all: Vec<(&str, &[u8])> = vec![
        ("manifest.json", manifest.as_bytes()),
        ("c.json", config.as_bytes()),
    ];
    all.extend_from_slice(files);
    tar_of(&all)
}

#[test]
fn bad_archives_are_refused_and_add_no_image() {
    let (dir, store) = fresh();
    make_image(&store, "app:1");
    let mut random = Vec::with_capacity(4096);
    let mut x: u32 = 0x1234_5678;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push(x as u8);
    }
    let layer = tar_of(&[("etc/hello", HELLO)]);
    let right = vec![digest_of(&layer).to_string()];
    let wrong = vec![digest_of(b"other").to_string()];
    // A layer that can never unpack: its whiteout names `..`.
    let hostile = tar_of(&[(".wh...", b"")]);
    let hostile_id = vec![digest_of(&hostile).to_string()];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "hostile-layer",
            docker_archive(&["l.tar"], &[("l.tar", &hostile)], &hostile_id),
            "a whiteout must name one entry of its directory",
        ),
        ("random", random, "not a tar archive"),
        (
            "no-manifest",
            tar_of(&[("hello.txt", b"hi")]),
            "no manifest.json or index.json",
        ),
        (
            "missing-layer",
            docker_archive(&["l/layer.tar"], &[], &right),
            "refers to l/layer.tar, which is not in the archive",
        ),
        (
            "escaping-layer",
            docker_archive(&["../../etc/passwd"], &[], &right),
            "which is not in the archive",
        ),
        (
            "wrong-diff-id",
            docker_archive(&["l.tar"], &[("l.tar", &layer)], &wrong),
            "but the config says",
        ),
        ("tampered-blob", tampered_oci(), "does not match its digest"),
    ];
    let blobs = || {
        let mut v: Vec<_> = fs::read_dir(dir.path().join("store/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = blobs();
    for (name, data, want) in cases {
        let p = dir.path().join(name);
        fs::write(&p, data).unwrap();
        let err = load(&store, &p).expect_err(name).to_string();
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.starts_with(&p.display().to_string()), "{name}: {err}");
        assert_eq!(store.images().unwrap().len(), 1, "{name} added an image");
        // Issue 16, 10: what a failed load stored goes with it.
        assert_eq!(blobs(), before, "{name} left blobs behind");
    }
    // The same docker-archive with the right diff id loads, its layer
    // found through a link as old `docker save` archives have them.
    let mut data = docker_archive(&["x/layer.tar"], &[("l.tar", &layer)], &right);
    data.truncate(data.len() - 1024); // drop the end-of-archive blocks
    let mut b = tar::Builder::new(data);
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "x/layer.tar", "../l.tar").unwrap();
    let p = dir.path().join("good");
    fs::write(&p, b.into_inner().unwrap()).unwrap();
    assert_eq!(load(&store, &p).unwrap()[0].names, ["bad:1"]);
    assert_eq!(store.images().unwrap().len(), 2);
}
