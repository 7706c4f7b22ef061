//! The image store end to end: import, list, inspect, tag, run, rmi; the store
//! read by skopeo and umoci; bad input refused without damage.

mod common;

use std::path::Path;
use std::process::Command;

use common::{kvm_available, ok, rootfs, vmc};

/// The busybox rootfs as a gzip tarball.
fn tarball(dir: &Path) -> std::path::PathBuf {
    tar_of(&rootfs(), dir.join("busybox.tar.gz"))
}

/// `src`'s contents as a tar at `out`, compressed as its suffix says.
fn tar_of(src: &Path, out: std::path::PathBuf) -> std::path::PathBuf {
    let st = Command::new("tar")
        .arg("-C")
        .arg(src)
        .arg("-caf")
        .arg(&out)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn import_list_inspect_tag_and_remove() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let tar = tarball(h);
    let id = ok(&vmc(h, &["import", tar.to_str().unwrap(), "bb:1"]));
    assert!(id.trim().starts_with("sha256:"));
    let list = ok(&vmc(h, &["images"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("bb ") && l.contains(" 1 ")),
        "{list}"
    );
    ok(&vmc(h, &["tag", "bb:1", "other/name:two"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&vmc(h, &["inspect", "other/name:two"]))).unwrap();
    assert_eq!(v[0]["Id"].as_str().unwrap(), id.trim());
    let tags: Vec<&str> = v[0]["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tags.contains(&"bb:1") && tags.contains(&"other/name:two"));
    let short = &id.trim()["sha256:".len()..][..12];
    assert_eq!(ok(&vmc(h, &["images", "-q"])).trim(), short);

    // skopeo and umoci read the store as the OCI layout it is.
    let o = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:bb:1", h.display()))
        .output()
        .expect("skopeo is installed by make setup");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(
        s["Architecture"],
        "amd64",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = h.join("unpacked");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:bb:1", h.display()))
        .arg(&out)
        .output()
        .expect("umoci is installed by make setup");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("rootfs/bin/busybox").is_file());

    // Removing one name keeps the image; removing the last removes it and its blobs.
    assert!(ok(&vmc(h, &["rmi", "bb:1"])).contains("Untagged: bb:1"));
    assert!(ok(&vmc(h, &["rmi", "other/name:two"])).contains("Deleted:"));
    assert!(ok(&vmc(h, &["images", "-q"])).trim().is_empty());
    assert_eq!(
        std::fs::read_dir(h.join("blobs/sha256")).unwrap().count(),
        0,
        "garbage collected"
    );
}

#[test]
fn a_run_from_an_image_uses_its_disk_and_blocks_rmi() {
    if !kvm_available() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let tar = tarball(h);
    ok(&vmc(h, &["import", tar.to_str().unwrap(), "bb"]));
    let out = ok(&vmc(
        h,
        &[
            "run",
            "bb",
            "sh",
            "-c",
            "cat /etc/passwd | head -1; echo $HOSTNAME | wc -c",
        ],
    ));
    assert_eq!(out, "root:x:0:0:root:/root:/bin/sh\n13\n");
    // The image's root disk: built once, by digest, and reused.
    let disks = || -> Vec<(String, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(h.join("cache/disks"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".erofs"))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().ino())
            })
            .collect()
    };
    let first = disks();
    assert_eq!(first.len(), 1, "{first:?}");
    // A relative command path is found from the working directory, as execve does.
    let out = ok(&vmc(
        h,
        &["run", "--rm", "-w", "/bin", "bb", "./echo", "relative"],
    ));
    assert_eq!(out, "relative\n");
    assert_eq!(disks(), first, "the same disk, not rebuilt");
    // The container (no --rm) still holds the image.
    let o = vmc(h, &["rmi", "bb"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("used by a container"));
    ok(&vmc(h, &["rmi", "-f", "bb"]));
}

#[test]
fn bad_imports_and_unknown_images_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let junk = h.join("junk.tar");
    std::fs::write(
        &junk,
        b"this is not a tar archive at all, not even close.....",
    )
    .unwrap();
    let o = vmc(h, &["import", junk.to_str().unwrap(), "x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125));
    assert!(err.contains("not a valid tar archive"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
    assert_eq!(
        std::fs::read_dir(h.join("blobs/sha256")).unwrap().count(),
        0,
        "nothing stored"
    );
    for args in [
        &["run", "--rm", "nosuchimage"][..],
        &["inspect", "nosuchimage"],
        &["rmi", "nosuchimage"],
    ] {
        let o = vmc(h, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        if args[0] == "run" && !Path::new("/dev/kvm").exists() {
            // Without KVM, `run` names the missing /dev/kvm first.
            vmc::testing::skip("no /dev/kvm: `run nosuchimage` is not checked");
            continue;
        }
        assert!(
            err.contains("no such image: nosuchimage"),
            "{args:?}: {err}"
        );
    }
    // A bad target name, from an image that exists: refused for the name,
    // and nothing tagged.
    let tar = tarball(h);
    ok(&vmc(h, &["import", tar.to_str().unwrap(), "bb:1"]));
    let before = ok(&vmc(h, &["images"]));
    let o = vmc(h, &["tag", "bb:1", "Bad Name"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("invalid image reference 'Bad Name'"),
        "the target name is what is refused: {err}"
    );
    assert_eq!(ok(&vmc(h, &["images"])), before, "nothing tagged");
}

#[test]
fn save_then_load_round_trips_and_skopeo_reads_the_archive() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let tar = tarball(h);
    let id = ok(&vmc(h, &["import", tar.to_str().unwrap(), "bb:1"]));
    let archive = h.join("bb.tar");
    ok(&vmc(h, &["save", "-o", archive.to_str().unwrap(), "bb:1"]));
    let o = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(manifest["config"]["digest"].as_str().unwrap(), id.trim());

    // A fresh store loads it under the same name and id.
    let other = tempfile::tempdir().unwrap();
    let out = ok(&vmc(
        other.path(),
        &["load", "-i", archive.to_str().unwrap()],
    ));
    assert_eq!(out.trim(), "Loaded image: bb:1");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&vmc(other.path(), &["inspect", "bb:1"]))).unwrap();
    assert_eq!(v[0]["Id"].as_str().unwrap(), id.trim());

    // A truncated archive is refused in one line and leaves the store as it was.
    let data = std::fs::read(&archive).unwrap();
    let cut = h.join("cut.tar");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let third = tempfile::tempdir().unwrap();
    let o = vmc(third.path(), &["load", "-i", cut.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(ok(&vmc(third.path(), &["images", "-q"])).trim().is_empty());
}

/// Archives made by skopeo (the tool people have instead of `docker save`):
/// a docker-archive and an OCI archive of an image in our store, each loaded
/// into a fresh store and run.
#[test]
fn archives_made_by_skopeo_load_and_run() {
    if !common::is_root() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let tar = tarball(h);
    ok(&vmc(h, &["import", tar.to_str().unwrap(), "bb:1"]));
    for (transport, file) in [("docker-archive", "docker.tar"), ("oci-archive", "oci.tar")] {
        let out = h.join(file);
        let o = Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci:{}:bb:1", h.display()))
            .arg(format!("{transport}:{}:made/by-skopeo:2", out.display()))
            .output()
            .expect("skopeo is installed by make setup");
        assert!(o.status.success(), "{o:?}");
        let fresh = tempfile::tempdir().unwrap();
        let loaded = ok(&vmc(fresh.path(), &["load", "-i", out.to_str().unwrap()]));
        assert_eq!(loaded, "Loaded image: made/by-skopeo:2\n", "{transport}");
        let name = "made/by-skopeo:2";
        let ran = ok(&vmc(
            fresh.path(),
            &["run", "--rm", "--mode", "ns", name, "echo", transport],
        ));
        assert_eq!(ran, format!("{transport}\n"));
    }
}

/// Every blob an image in the store at `home` refers to exists and matches
/// its digest; returns how many images were checked.
fn check_store(home: &Path) -> usize {
    use sha2::Digest;
    let blob = |digest: &str| -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let data = std::fs::read(home.join("blobs/sha256").join(hex))
            .unwrap_or_else(|e| panic!("blob {digest} missing: {e}"));
        assert_eq!(
            format!("{:x}", sha2::Sha256::digest(&data)),
            hex,
            "blob {digest} does not match its content"
        );
        data
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    for m in manifests {
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        blob(manifest["config"]["digest"].as_str().unwrap());
        for l in manifest["layers"].as_array().unwrap() {
            blob(l["digest"].as_str().unwrap());
        }
    }
    manifests.len()
}

/// Garbage collection (each `vmc rmi` runs one) in one process while other
/// processes import images: no import loses a blob to it. The writers hold a
/// shared lock for their whole operation and the collector an exclusive one
/// (flock, so it holds across processes, which the store's unit tests with
/// threads cannot show).
#[test]
fn garbage_collection_in_one_process_never_takes_another_ones_blobs() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_path_buf();
    // Images of different content, so that no blob is shared between the
    // ones being removed and the ones being imported.
    let tars: Vec<std::path::PathBuf> = (0..12)
        .map(|i| {
            let d = home.path().join(format!("src{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("file"), format!("content {i}\n").repeat(1000)).unwrap();
            tar_of(&d, home.path().join(format!("img{i}.tar")))
        })
        .collect();
    // Six to remove, imported first.
    for (i, t) in tars.iter().enumerate().take(6) {
        ok(&vmc(
            &h,
            &["import", t.to_str().unwrap(), &format!("old{i}")],
        ));
    }
    std::thread::scope(|s| {
        let importer = s.spawn(|| {
            for (i, t) in tars.iter().enumerate().skip(6) {
                ok(&vmc(
                    &h,
                    &["import", t.to_str().unwrap(), &format!("new{i}")],
                ));
            }
        });
        let remover = s.spawn(|| {
            for i in 0..6 {
                ok(&vmc(&h, &["rmi", &format!("old{i}")]));
            }
        });
        importer.join().unwrap();
        remover.join().unwrap();
    });
    assert_eq!(check_store(&h), 6, "the six new images, complete");
    let list = ok(&vmc(&h, &["images"]));
    for i in 6..12 {
        assert!(list.contains(&format!("new{i} ")), "{list}");
    }
    // And the removed images' blobs are gone.
    let blobs = std::fs::read_dir(h.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 6 * 3, "a layer, a config and a manifest per image");
}
