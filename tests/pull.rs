//! `vmc pull` against a real registry on the loopback address (Debian's
//! `docker-registry`, filled with skopeo from an image `vmc save` wrote), and
//! against a fake one that lies about digests. Nothing here leaves 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kvm_available, ok, vmc};
use sha2::{Digest as _, Sha256};

const REGISTRY: &str = "/usr/bin/docker-registry";
const SKOPEO: &str = "/usr/bin/skopeo";

/// The one-line error of a failed vmc command (exit code 125).
fn fails(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("vmc: "), "{err}");
    err
}

/// Whether the registry and skopeo are installed; under CI=true they must be
/// (scripts/deps.sh installs them), elsewhere the test is skipped.
fn tools() -> bool {
    let missing: Vec<&str> = [REGISTRY, SKOPEO]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    vmc::testing::skip(&format!(
        "{missing:?} not installed (scripts/deps.sh installs them)"
    ));
    false
}

/// A free TCP port on the loopback address.
/// `docker-registry serve` on 127.0.0.1, storing into a temporary
/// directory; killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start docker-registry");
        let mut r = Registry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + common::PATIENCE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = r.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = r.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("docker-registry exited ({st}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry does not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes the OCI archive `archive` as `repo:tag` with skopeo.
    fn push(&self, archive: &Path, repo_tag: &str, extra: &[&str]) {
        let o = Command::new(SKOPEO)
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Imports the busybox root filesystem (an uncompressed tar) as `bb:1` into
/// the store at `home` and saves it as an OCI archive; returns the archive
/// and the image id.
fn saved_busybox(home: &Path) -> (PathBuf, String) {
    let tar = common::busybox_tar(&home.join("busybox.tar"));
    let id = ok(&vmc(home, &["import", tar.to_str().unwrap(), "bb:1"]))
        .trim()
        .to_string();
    let archive = home.join("img.tar");
    ok(&vmc(
        home,
        &["save", "-o", archive.to_str().unwrap(), "bb:1"],
    ));
    (archive, id)
}

fn inspect(home: &Path, image: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&ok(&vmc(home, &["inspect", image]))).unwrap();
    v[0].clone()
}

/// `index.json` and the blob names of the store at `home`.
fn store_state(home: &Path) -> (String, Vec<String>) {
    let index = std::fs::read_to_string(home.join("index.json")).unwrap_or_default();
    let mut blobs: Vec<String> = std::fs::read_dir(home.join("blobs/sha256"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    blobs.sort();
    (index, blobs)
}

/// The stored manifest (JSON) of the image named `name`.
fn stored_manifest(home: &Path, name: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in index.json: {index}"))
        .clone();
    let hex = entry["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    serde_json::from_slice(&std::fs::read(home.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

#[test]
fn pulls_from_a_local_registry_by_tag_and_by_digest() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let src = tempfile::tempdir().unwrap();
    let (archive, id) = saved_busybox(src.path());
    reg.push(&archive, "test/bb:1", &[]);
    let image = format!("{}/test/bb:1", reg.host());

    // A fresh store pulls it: Docker's lines, the original id.
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let o = vmc(h, &["pull", "--insecure", &image]);
    let out = ok(&o);
    assert!(
        o.stderr.is_empty(),
        "no progress bars or logs when stderr is not a terminal: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("1: Pulling from {}/test/bb", reg.host()).as_str()),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.ends_with(": Pull complete")),
        "{out}"
    );
    let digest = lines
        .iter()
        .find_map(|l| l.strip_prefix("Digest: "))
        .unwrap_or_else(|| panic!("no digest line: {out}"))
        .to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("Status: Downloaded newer image for {image}").as_str()),
        "{out}"
    );
    let list = ok(&vmc(h, &["images"]));
    let short = &id["sha256:".len()..][..12];
    assert!(
        list.lines()
            .any(|l| l.starts_with(&format!("{}/test/bb ", reg.host()))
                && l.contains(" 1 ")
                && l.contains(short)),
        "{list}"
    );
    let v = inspect(h, &image);
    assert_eq!(
        v["Id"],
        id.as_str(),
        "the registry's config, so the same id"
    );
    assert_eq!(v["RepoTags"][0], image.as_str());
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(
        v["ManifestDigest"],
        digest.as_str(),
        "the registry's manifest"
    );

    // Again: nothing to download (no layer pulled), up to date.
    let out = ok(&vmc(h, &["pull", "--insecure", &image]));
    assert!(!out.contains("Pull complete"), "{out}");
    assert!(
        out.contains(&format!("Status: Image is up to date for {image}")),
        "{out}"
    );
    assert_eq!(ok(&vmc(h, &["images", "-q"])).lines().count(), 1);

    // By digest, into a fresh store: no name, same image; -q prints the id only.
    let by_digest = format!("{}/test/bb@{digest}", reg.host());
    let other = tempfile::tempdir().unwrap();
    let out = ok(&vmc(other.path(), &["pull", "--insecure", &by_digest]));
    assert!(
        out.contains(&format!("Status: Downloaded newer image for {by_digest}")),
        "{out}"
    );
    assert_eq!(
        inspect(other.path(), &id)["RepoTags"],
        serde_json::json!([])
    );
    assert!(ok(&vmc(other.path(), &["images"])).contains("<none>"));
    let out = ok(&vmc(other.path(), &["pull", "-q", "--insecure", &image]));
    assert_eq!(out, format!("{id}\n"), "-q prints the id and nothing else");
    assert_eq!(inspect(other.path(), &image)["Id"], id.as_str());
    // The digest of an image the store has is up to date.
    let out = ok(&vmc(h, &["pull", "--insecure", &by_digest]));
    assert!(out.contains("Status: Image is up to date"), "{out}");

    // Failures: one line, exit 125, the store as it was.
    let before = store_state(h);
    let err = fails(&vmc(h, &["pull", &image]));
    assert!(err.contains("--insecure"), "{err}");
    let err = fails(&vmc(
        h,
        &[
            "pull",
            "--insecure",
            &format!("{}/test/bb:nope", reg.host()),
        ],
    ));
    assert!(err.contains("manifest unknown"), "{err}");
    assert!(err.contains("test/bb:nope"), "{err}");
    let err = fails(&vmc(
        h,
        &["pull", "--insecure", &format!("{}/test/none:1", reg.host())],
    ));
    assert!(err.contains("test/none"), "{err}");
    let zeros = format!("{}/test/bb@sha256:{}", reg.host(), "0".repeat(64));
    let err = fails(&vmc(h, &["pull", "--insecure", &zeros]));
    assert!(err.contains("manifest unknown"), "{err}");
    let closed = format!("127.0.0.1:{}", free_port());
    let err = fails(&vmc(h, &["pull", &format!("{closed}/test/bb:1")]));
    assert!(
        err.contains(&format!(
            "cannot reach registry {closed}: connection refused (is it running? plain http needs --insecure)"
        )),
        "{err}"
    );
    let err = fails(&vmc(h, &["pull", "--insecure", "127.0.0.1:5000/Bad:1"]));
    assert!(err.contains("invalid image reference"), "{err}");
    assert_eq!(store_state(h), before, "failed pulls change nothing");
}

#[test]
fn compressed_layers_are_stored_as_served_and_run() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let src = tempfile::tempdir().unwrap();
    let (archive, id) = saved_busybox(src.path());
    reg.push(
        &archive,
        "test/bb:gz",
        &["--dest-compress", "--dest-compress-format", "gzip"],
    );
    let image = format!("{}/test/bb:gz", reg.host());
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    ok(&vmc(h, &["pull", "--insecure", &image]));
    assert_eq!(inspect(h, &image)["Id"], id.as_str(), "diff ids match");
    let m = stored_manifest(h, &image);
    let layer = &m["layers"][0];
    assert_eq!(
        layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
        "{m}"
    );
    let hex = layer["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let blob = std::fs::read(h.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(&blob[..2], &[0x1f, 0x8b], "stored compressed");
    assert_eq!(
        format!("{:x}", Sha256::digest(&blob)),
        hex,
        "stored as served"
    );
    // The store stays an OCI layout skopeo reads.
    let o = Command::new(SKOPEO)
        .arg("inspect")
        .arg(format!("oci:{}:{image}", h.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    if kvm_available() {
        let out = ok(&vmc(
            h,
            &["run", "--rm", &image, "sh", "-c", "head -1 /etc/passwd"],
        ));
        assert_eq!(out, "root:x:0:0:root:/root:/bin/sh\n");
    }
}

/// A fake registry on 127.0.0.1 that answers every GET with the body of the
/// first route whose path ends the request path (404 otherwise); serves a
/// bounded number of connections.
fn fake_registry(routes: Vec<(String, &'static str, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(200) {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(n) if n > 2 => {}
                    _ => break,
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let found = routes.iter().find(|(p, _, _)| path.ends_with(p.as_str()));
            let (status, ctype, body) = match found {
                Some((_, t, b)) => ("200 OK", *t, b.clone()),
                None if path == "/v2/" => ("200 OK", "application/json", b"{}".to_vec()),
                None => (
                    "404 Not Found",
                    "application/json",
                    br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#.to_vec(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    port
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

#[test]
fn content_that_does_not_match_its_digest_is_refused() {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    // The same length, other content.
    let forged =
        br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
        sha(config),
        config.len()
    );
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let port = fake_registry(vec![
        ("/manifests/1".into(), oci, manifest.clone().into_bytes()),
        (
            format!("/manifests/{}", sha(b"another manifest")),
            oci,
            manifest.clone().into_bytes(),
        ),
        (
            format!("/blobs/{}", sha(config)),
            "application/json",
            forged.to_vec(),
        ),
    ]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();

    // The manifest is not the one the digest names.
    let r = format!("127.0.0.1:{port}/x/app@{}", sha(b"another manifest"));
    let err = fails(&vmc(h, &["pull", "--insecure", &r]));
    assert!(err.contains("does not match"), "{err}");

    // The config blob is not what the manifest says.
    let err = fails(&vmc(
        h,
        &["pull", "--insecure", &format!("127.0.0.1:{port}/x/app:1")],
    ));
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(err.contains("corrupted"), "{err}");
    assert!(ok(&vmc(h, &["images", "-q"])).trim().is_empty());
    let (index, _) = store_state(h);
    assert!(!index.contains("x/app"), "nothing named: {index}");
}

/// A gzip-compressed layer holding `etc/hello`, and its diff id.
fn gzip_layer() -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    let data = b"hello from a registry\n";
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "etc/hello", &data[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), sha(&tar))
}

#[test]
fn docker_manifests_and_multi_platform_indexes_are_pulled() {
    const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    let (layer, diff_id) = gzip_layer();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": sha(config.as_bytes()),
        },
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": layer.len(),
            "digest": sha(&layer),
        }],
    })
    .to_string();
    let entry = |digest: String, arch: &str| {
        serde_json::json!({
            "mediaType": DOCKER_MANIFEST,
            "size": 100,
            "digest": digest,
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let list = |entries: Vec<serde_json::Value>| {
        serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries})
            .to_string()
    };
    let multi = list(vec![
        entry(sha(b"an arm64 manifest"), "arm64"),
        entry(sha(manifest.as_bytes()), "amd64"),
    ]);
    let arm_only = list(vec![entry(sha(b"an arm64 manifest"), "arm64")]);
    let port = fake_registry(vec![
        (
            "/manifests/multi".into(),
            DOCKER_LIST,
            multi.clone().into_bytes(),
        ),
        ("/manifests/arm".into(), DOCKER_LIST, arm_only.into_bytes()),
        (
            "/manifests/single".into(),
            DOCKER_MANIFEST,
            manifest.clone().into_bytes(),
        ),
        (
            format!("/manifests/{}", sha(manifest.as_bytes())),
            DOCKER_MANIFEST,
            manifest.clone().into_bytes(),
        ),
        (
            format!("/blobs/{}", sha(config.as_bytes())),
            "application/octet-stream",
            config.clone().into_bytes(),
        ),
        (
            format!("/blobs/{}", sha(&layer)),
            "application/octet-stream",
            layer.clone(),
        ),
    ]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let image = format!("127.0.0.1:{port}/x/app:multi");

    // The index resolves to its linux/amd64 image; the digest shown is the index's.
    let out = ok(&vmc(h, &["pull", "--insecure", &image]));
    assert!(
        out.contains(&format!("Digest: {}", sha(multi.as_bytes()))),
        "{out}"
    );
    let v = inspect(h, &image);
    assert_eq!(
        v["Id"],
        sha(config.as_bytes()).as_str(),
        "the registry's config"
    );
    assert_eq!(v["Config"]["Cmd"], serde_json::json!(["sh"]));
    // A Docker manifest is stored as an OCI one for the same config and layers.
    let m = stored_manifest(h, &image);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(m["layers"][0]["digest"], sha(&layer).as_str());
    let out = ok(&vmc(h, &["pull", "--insecure", &image]));
    assert!(out.contains("Status: Image is up to date"), "{out}");

    // The same image under another tag: a new name, nothing downloaded.
    let single = format!("127.0.0.1:{port}/x/app:single");
    let out = ok(&vmc(h, &["pull", "--insecure", &single]));
    assert!(!out.contains("Pull complete"), "{out}");
    assert!(out.contains("Already exists"), "{out}");
    assert_eq!(inspect(h, &single)["Id"], v["Id"]);
    assert_eq!(ok(&vmc(h, &["images", "-q"])).lines().count(), 1);

    let before = store_state(h);
    let err = fails(&vmc(
        h,
        &["pull", "--insecure", &format!("127.0.0.1:{port}/x/app:arm")],
    ));
    assert!(err.contains("no linux/amd64 image"), "{err}");
    assert!(err.contains("linux/arm64"), "{err}");
    assert_eq!(store_state(h), before);
}
