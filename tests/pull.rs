//! `vmc pull` against a real registry on the loopback address (Debian's
//! `docker-registry`, filled with skopeo from an image `vmc save` wrote), and
//! against a fake one that lies about digests. Nothing here leaves 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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
        Self::start_with(false)
    }

    /// A registry serving https with a self-signed certificate for
    /// 127.0.0.1 (made with openssl): one no client trusts.
    fn start_tls() -> Registry {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            let o = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .expect("openssl for a test certificate");
            assert!(o.status.success(), "openssl req: {o:?}");
            yml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        std::fs::write(&config, yml).unwrap();
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

/// `vmc run IMAGE` pulls an image the store lacks, Docker's way: the
/// pull's lines on stderr (stdout is the container's), `--pull
/// missing|always|never`; `VMC_INSECURE_REGISTRIES` lets a plain-http
/// registry be used without `--insecure` (the Docker daemon's
/// `insecure-registries`). In namespace mode: the pull is the same for a
/// microVM run.
#[test]
fn run_pulls_a_missing_image() {
    if !tools() || !common::is_root() {
        return;
    }
    let reg = Registry::start();
    let src = tempfile::tempdir().unwrap();
    let (archive, id) = saved_busybox(src.path());
    reg.push(&archive, "test/bb:1", &[]);
    let image = format!("{}/test/bb:1", reg.host());
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let run = |pull: &str| {
        common::vmc_command(h)
            .env(
                "VMC_INSECURE_REGISTRIES",
                format!("localhost:1,{}", reg.host()),
            )
            .args(["run", "--rm", "--mode", "ns", "--pull", pull, &image])
            .args(["echo", "hi"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run("never");
    assert_eq!(o.status.code(), Some(125));
    assert!(fails(&o).contains(&format!("no such image: {image}")));

    let o = run("missing");
    assert_eq!(ok(&o), "hi\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(&format!(
            "Unable to find image '{image}' locally\n1: Pulling from {}/test/bb\n",
            reg.host()
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!("Status: Downloaded newer image for {image}\n")),
        "{err}"
    );
    assert_eq!(inspect(h, &image)["Id"], id.as_str());

    let o = run("missing");
    assert_eq!(ok(&o), "hi\n");
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run("always");
    assert_eq!(ok(&o), "hi\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.ends_with(&format!("Status: Image is up to date for {image}\n")),
        "{err}"
    );
    // Without the setting, plain http needs --insecure, as before.
    let o = vmc(h, &["pull", &image]);
    assert!(fails(&o).contains("needs --insecure"), "{}", fails(&o));
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

/// One request the fake registry got: its path (without the query) and
/// its Authorization header.
struct Request {
    path: String,
    auth: Option<String>,
    /// The fake registry's own port, for URLs it hands out.
    port: u16,
}

/// What the fake registry answers to one request.
enum Reply {
    /// 200 with this content type and body.
    Ok(&'static str, Vec<u8>),
    /// These bytes as they are, then the connection closed: any status,
    /// headers that lie, a body cut short.
    Raw(Vec<u8>),
    /// This status (`200 OK`, `503 Service Unavailable`), then `len` zeros
    /// until they are all sent or the client goes, with a Content-Length if
    /// `announced` (else the close ends it); how many were sent goes to the
    /// channel.
    Flood {
        status: &'static str,
        len: u64,
        announced: bool,
        done: mpsc::Sender<u64>,
    },
}

/// An HTTP/1.1 answer that closes its connection.
fn http(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A fake registry on 127.0.0.1: one request per connection, answered by
/// `handler`; serves a bounded number of connections and gives up on a
/// client that stops reading or writing. Returns its port and the paths
/// asked for, in order.
fn fake_server(
    handler: impl Fn(&Request) -> Reply + Send + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(200) {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            // A TLS ClientHello (record type 22) gets what Go's http server
            // answers to a request it cannot parse, as docker-registry would.
            if reader.fill_buf().is_ok_and(|b| b.first() == Some(&0x16)) {
                let _ = conn.write_all(&http("400 Bad Request", &[], b"400 Bad Request"));
                continue;
            }
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut auth = None;
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(n) if n > 2 => {}
                    _ => break,
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        auth = Some(v.trim().to_string());
                    }
                }
            }
            let target = request.split_whitespace().nth(1).unwrap_or("/");
            let path = target.split('?').next().unwrap_or("/").to_string();
            log.lock().unwrap().push(path.clone());
            match handler(&Request { path, auth, port }) {
                Reply::Ok(ctype, body) => {
                    let _ = conn.write_all(&http("200 OK", &[("Content-Type", ctype)], &body));
                }
                Reply::Raw(bytes) => {
                    let _ = conn.write_all(&bytes);
                }
                Reply::Flood {
                    status,
                    len,
                    announced,
                    done,
                } => {
                    let length = if announced {
                        format!("Content-Length: {len}\r\n")
                    } else {
                        String::new()
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
                         {length}Connection: close\r\n\r\n"
                    );
                    let mut sent = 0u64;
                    if conn.write_all(head.as_bytes()).is_ok() {
                        let zeros = vec![0u8; 1 << 16];
                        while sent < len {
                            let n = zeros.len().min((len - sent) as usize);
                            if conn.write_all(&zeros[..n]).is_err() {
                                break;
                            }
                            sent += n as u64;
                        }
                    }
                    let _ = done.send(sent);
                }
            }
        }
    });
    (port, requests)
}

/// Routes of a registry: (end of the request path, content type, body).
type Routes = Vec<(String, &'static str, Vec<u8>)>;

/// The answer of a registry holding `routes`: the body of the first route
/// whose path ends the request path, 404 otherwise.
fn route(routes: &Routes, path: &str) -> Reply {
    match routes.iter().find(|(p, _, _)| path.ends_with(p.as_str())) {
        Some((_, t, b)) => Reply::Ok(t, b.clone()),
        None if path == "/v2/" => Reply::Ok("application/json", b"{}".to_vec()),
        None => Reply::Raw(http(
            "404 Not Found",
            &[("Content-Type", "application/json")],
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
        )),
    }
}

/// A fake registry that serves `routes` and nothing else.
fn fake_registry(routes: Routes) -> u16 {
    fake_server(move |r| route(&routes, &r.path)).0
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A gzip-compressed layer holding the file `name`, and its diff id.
fn gzip_layer_of(name: &str, data: &[u8]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, data).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), sha(&tar))
}

/// A gzip-compressed layer holding `etc/hello`, and its diff id.
fn gzip_layer() -> (Vec<u8>, String) {
    gzip_layer_of("etc/hello", b"hello from a registry\n")
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const BLOB: &str = "application/octet-stream";

/// An image config for layers with these diff ids.
fn config_for(diff_ids: &[&str]) -> Vec<u8> {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes()
}

/// An OCI manifest for a config of `config_size` bytes at `config` and
/// gzip layers given as (digest, size): the sizes are whatever a test wants
/// the registry to claim.
fn oci_manifest(config: &str, config_size: u64, layers: &[(String, u64)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": size,
            })
        })
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": config_size,
        },
        "layers": layers,
    })
    .to_string()
    .into_bytes()
}

/// A good image, `x/app:good`, that every store of the failure tests holds
/// before the failing pull, so that "as it was" is a store with an image in
/// it. Its config is reused by the failing manifests: a pull that fails on a
/// layer then has nothing new to keep.
struct Good {
    routes: Routes,
    config: Vec<u8>,
}

fn good_image() -> Good {
    let (layer, diff_id) = gzip_layer();
    let config = config_for(&[&diff_id]);
    let manifest = oci_manifest(
        &sha(&config),
        config.len() as u64,
        &[(sha(&layer), layer.len() as u64)],
    );
    Good {
        routes: vec![
            ("/manifests/good".into(), OCI_MANIFEST, manifest),
            (format!("/blobs/{}", sha(&config)), BLOB, config.clone()),
            (format!("/blobs/{}", sha(&layer)), BLOB, layer),
        ],
        config,
    }
}

impl Good {
    /// A manifest with the good image's config and these layers.
    fn manifest(&self, layers: &[(String, u64)]) -> Vec<u8> {
        oci_manifest(&sha(&self.config), self.config.len() as u64, layers)
    }
}

/// A store holding `x/app:good`, pulled from the fake registry at `port`.
fn seeded(port: u16) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    ok(&vmc(
        home.path(),
        &[
            "pull",
            "--insecure",
            &format!("127.0.0.1:{port}/x/app:good"),
        ],
    ));
    home
}

/// Every path under `home` with its size and sha256 (`dir` for a
/// directory): the whole store, lock files and stray temporary files
/// included.
fn store_snapshot(home: &Path) -> BTreeMap<PathBuf, (u64, String)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, String)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel, (0, "dir".into()));
                walk(base, &p, out);
            } else if m.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, format!("-> {}", target.display())));
            } else {
                let data = std::fs::read(&p).unwrap();
                out.insert(rel, (m.len(), format!("{:x}", Sha256::digest(&data))));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(home, home, &mut out);
    out
}

/// What changed between two snapshots, one line per path.
fn store_diff(
    before: &BTreeMap<PathBuf, (u64, String)>,
    after: &BTreeMap<PathBuf, (u64, String)>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (p, v) in after {
        match before.get(p) {
            None => d.push(format!("+ {}", p.display())),
            Some(old) if old != v => d.push(format!("~ {}", p.display())),
            Some(_) => {}
        }
    }
    for p in before.keys().filter(|p| !after.contains_key(*p)) {
        d.push(format!("- {}", p.display()));
    }
    d.sort();
    d
}

/// Runs `vmc pull --insecure <image>` that must fail; returns its one-line
/// error after checking that the store at `home` is exactly as it was.
fn pull_fails(home: &Path, image: &str) -> String {
    pull_fails_with(home, &["pull", "--insecure", image])
}

fn pull_fails_with(home: &Path, args: &[&str]) -> String {
    let before = store_snapshot(home);
    let err = fails(&vmc(home, args));
    assert_eq!(
        store_diff(&before, &store_snapshot(home)),
        Vec::<String>::new(),
        "the store as it was after: {err}"
    );
    err
}

#[test]
fn content_that_does_not_match_its_digest_is_refused() {
    let good = good_image();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    // The same length, other content.
    let forged =
        br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = oci_manifest(&sha(config), config.len() as u64, &[]);
    // A layer served with one byte changed.
    let (layer, _) = gzip_layer_of("etc/other", b"another layer\n");
    let mut flipped = layer.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut routes = good.routes.clone();
    routes.extend([
        ("/manifests/1".into(), OCI_MANIFEST, manifest.clone()),
        (
            format!("/manifests/{}", sha(b"another manifest")),
            OCI_MANIFEST,
            manifest,
        ),
        (format!("/blobs/{}", sha(config)), BLOB, forged.to_vec()),
        (
            "/manifests/layer".into(),
            OCI_MANIFEST,
            good.manifest(&[(sha(&layer), layer.len() as u64)]),
        ),
        (format!("/blobs/{}", sha(&layer)), BLOB, flipped),
    ]);
    let port = fake_registry(routes);
    let home = seeded(port);
    let h = home.path();

    // The manifest is not the one the digest names.
    let r = format!("127.0.0.1:{port}/x/app@{}", sha(b"another manifest"));
    let err = pull_fails(h, &r);
    assert!(err.contains("does not match"), "{err}");

    // The config blob is not what the manifest says.
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:1"));
    assert!(
        err.contains(&format!(
            "config {}: its content does not match its digest",
            sha(config)
        )),
        "{err}"
    );
    assert!(err.contains("corrupted"), "{err}");

    // Nor is the layer.
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:layer"));
    assert!(
        err.contains(&format!(
            "layer {}: its content does not match its digest",
            sha(&layer)
        )),
        "{err}"
    );
    assert!(err.contains("corrupted"), "{err}");
}

#[test]
fn blobs_longer_or_shorter_than_their_descriptor_are_refused() {
    let good = good_image();
    let (layer, _) = gzip_layer_of("etc/two", b"a layer of some length\n");
    let (n, d) = (layer.len() as u64, sha(&layer));
    let (half, _) = gzip_layer_of("etc/half", b"a layer served in half\n");
    let mut routes = good.routes.clone();
    routes.extend([
        // The blob is the one the digest names; the manifest's size is not.
        (
            "/manifests/long".into(),
            OCI_MANIFEST,
            good.manifest(&[(d.clone(), n - 10)]),
        ),
        (
            "/manifests/short".into(),
            OCI_MANIFEST,
            good.manifest(&[(d.clone(), n + 10)]),
        ),
        (format!("/blobs/{d}"), BLOB, layer.clone()),
        // The registry serves the first half of the blob, whole as far as
        // HTTP goes.
        (
            "/manifests/half".into(),
            OCI_MANIFEST,
            good.manifest(&[(sha(&half), half.len() as u64)]),
        ),
        (
            format!("/blobs/{}", sha(&half)),
            BLOB,
            half[..half.len() / 2].to_vec(),
        ),
    ]);
    let port = fake_registry(routes);
    let home = seeded(port);
    let h = home.path();

    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:long"));
    assert!(
        err.contains(&format!(
            "layer {d}: the registry sent more than the {} bytes announced",
            n - 10
        )),
        "{err}"
    );
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:short"));
    assert!(
        err.contains(&format!(
            "layer {d}: the registry sent {n} bytes, not the {} announced",
            n + 10
        )),
        "{err}"
    );
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:half"));
    assert!(
        err.contains(&format!(
            "layer {}: the registry sent {} bytes, not the {} announced",
            sha(&half),
            half.len() / 2,
            half.len()
        )),
        "{err}"
    );
}

#[test]
fn a_connection_dropped_in_the_middle_of_a_blob_fails_cleanly() {
    let good = good_image();
    let (layer, _) = gzip_layer_of("etc/cut", &[7u8; 4096]);
    let d = sha(&layer);
    let mut routes = good.routes.clone();
    routes.push((
        "/manifests/cut".into(),
        OCI_MANIFEST,
        good.manifest(&[(d.clone(), layer.len() as u64)]),
    ));
    let blob = format!("/blobs/{d}");
    let cut = {
        // Headers announcing the whole blob, half of it, then the close.
        let mut r = http("200 OK", &[("Content-Type", BLOB)], &layer);
        r.truncate(r.len() - layer.len() / 2);
        r
    };
    let port = fake_server(move |r| {
        if r.path.ends_with(&blob) {
            return Reply::Raw(cut.clone());
        }
        route(&routes, &r.path)
    })
    .0;
    let home = seeded(port);
    let err = pull_fails(home.path(), &format!("127.0.0.1:{port}/x/app:cut"));
    assert!(
        err.contains(&format!(
            "layer {d}: the download stopped after {} of the {} bytes announced",
            layer.len() / 2,
            layer.len()
        )),
        "{err}"
    );
    assert!(err.contains("end of file"), "{err}");
}

/// A registry's 401 answer, with this `WWW-Authenticate` challenge if any.
fn unauthorized(challenge: Option<&str>) -> Vec<u8> {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(c) = challenge {
        headers.push(("WWW-Authenticate", c));
    }
    http(
        "401 Unauthorized",
        &headers,
        br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    )
}

#[test]
fn refused_access_is_named_and_an_anonymous_token_is_fetched() {
    let good = good_image();
    let routes = good.routes.clone();

    // A registry that answers 401 for a manifest, without a challenge, and
    // 403 DENIED for another.
    let plain = unauthorized(None);
    let port = fake_server({
        let routes = routes.clone();
        move |r| {
            if r.path.ends_with("/manifests/private") {
                return Reply::Raw(plain.clone());
            }
            if r.path.ends_with("/manifests/denied") {
                return Reply::Raw(http(
                    "403 Forbidden",
                    &[("Content-Type", "application/json")],
                    br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
                ));
            }
            route(&routes, &r.path)
        }
    })
    .0;
    let home = seeded(port);
    let h = home.path();
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:private"));
    assert!(
        err.contains(&format!(
            "registry 127.0.0.1:{port} requires authentication for x/app \
             (vmc pull supports anonymous pulls only)"
        )),
        "{err}"
    );
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:denied"));
    assert!(
        err.contains(&format!(
            "registry 127.0.0.1:{port} refused access to x/app: \
             requested access to the resource is denied"
        )),
        "{err}"
    );

    // A registry with token auth, as Docker Hub: every request without the
    // token gets a challenge naming the token endpoint, which hands out an
    // anonymous token while `grant` is set.
    let grant = Arc::new(AtomicBool::new(true));
    let (port, log) = fake_server({
        let grant = grant.clone();
        move |r| {
            if r.path == "/token" {
                if grant.load(Ordering::SeqCst) {
                    return Reply::Ok("application/json", br#"{"token":"t0k"}"#.to_vec());
                }
                return Reply::Raw(unauthorized(None));
            }
            if r.auth.as_deref() != Some("Bearer t0k") {
                let challenge = format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake""#,
                    r.port
                );
                return Reply::Raw(unauthorized(Some(&challenge)));
            }
            route(&routes, &r.path)
        }
    });
    // vmc pull has no credentials, but takes the anonymous token, once,
    // for every request of the pull.
    let home = seeded(port);
    let blobs: Vec<String> = good.routes[1..]
        .iter()
        .map(|(p, _, _)| format!("/v2/x/app{p}"))
        .collect();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "/v2/",
            "/token",
            "/v2/x/app/manifests/good",
            &blobs[0],
            &blobs[1]
        ],
    );
    grant.store(false, Ordering::SeqCst);
    let err = pull_fails(home.path(), &format!("127.0.0.1:{port}/x/app:good"));
    assert!(
        err.contains(&format!(
            "registry 127.0.0.1:{port}: anonymous authentication for x/app failed: "
        )),
        "{err}"
    );
    assert!(err.contains("authentication required"), "{err}");
}

#[test]
fn blob_downloads_follow_redirects_without_the_token() {
    let good = good_image();
    // A CDN on another port serves the blobs, noting the Authorization
    // header of every request.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (cdn, cdn_log) = fake_server({
        let routes = good.routes.clone();
        let seen = seen.clone();
        move |r| {
            seen.lock().unwrap().push(r.auth.clone());
            route(&routes, &r.path)
        }
    });
    // The registry wants its token and sends blob downloads to the CDN.
    let (port, log) = fake_server({
        let routes = good.routes.clone();
        move |r| {
            if r.path == "/token" {
                return Reply::Ok("application/json", br#"{"token":"t0k"}"#.to_vec());
            }
            if r.auth.as_deref() != Some("Bearer t0k") {
                let challenge = format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake""#,
                    r.port
                );
                return Reply::Raw(unauthorized(Some(&challenge)));
            }
            if r.path.contains("/blobs/") {
                let to = format!("http://127.0.0.1:{cdn}/cdn{}", r.path);
                return Reply::Raw(http("307 Temporary Redirect", &[("Location", &to)], b""));
            }
            route(&routes, &r.path)
        }
    });
    let home = seeded(port);
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains("/blobs/"))
            .count(),
        2,
        "{:?}",
        log.lock().unwrap()
    );
    assert_eq!(cdn_log.lock().unwrap().len(), 2);
    assert_eq!(*seen.lock().unwrap(), [None, None], "no token for the CDN");
    let image = format!("127.0.0.1:{port}/x/app:good");
    assert_eq!(
        inspect(home.path(), &image)["Id"],
        sha(&good.config).as_str()
    );
}

/// A server on 127.0.0.1 that answers every connection with `reply`, not
/// reading what the client sent, and closes it.
fn blunt_server(reply: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().take(50).flatten() {
            let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
            let _ = conn.write_all(reply);
        }
    });
    port
}

#[test]
fn https_problems_name_the_fix() {
    let good = good_image();
    let port = fake_registry(good.routes.clone());
    let home = seeded(port);
    let h = home.path();

    // The fake registry speaks plain http: https fails and names --insecure.
    let image = format!("127.0.0.1:{port}/x/app:good");
    let err = pull_fails_with(h, &["pull", &image]);
    assert!(
        err.contains(&format!(
            "cannot reach registry 127.0.0.1:{port} over https:"
        )),
        "{err}"
    );
    assert!(
        err.contains("(a registry serving plain http needs --insecure)"),
        "{err}"
    );

    // Endpoints that speak no TLS at all: one says something else, one
    // hangs up.
    for reply in [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b""] {
        let port = blunt_server(reply);
        let err = pull_fails_with(h, &["pull", &format!("127.0.0.1:{port}/x/app:1")]);
        assert!(
            err.contains(&format!(
                "cannot reach registry 127.0.0.1:{port} over https:"
            )),
            "{err}"
        );
    }

    // --insecure against an https registry: Go's answer to plain http on a
    // TLS port.
    let port = fake_server(|_| {
        Reply::Raw(http(
            "400 Bad Request",
            &[],
            b"Client sent an HTTP request to an HTTPS server.\n",
        ))
    })
    .0;
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:1"));
    assert!(
        err.contains(&format!(
            "registry 127.0.0.1:{port} serves https, not plain http: drop --insecure"
        )),
        "{err}"
    );
}

#[test]
fn a_failed_pull_names_nothing_and_keeps_only_verified_blobs() {
    let good = good_image();
    let (first, first_diff) = gzip_layer_of("etc/first", b"the first layer\n");
    let (second, second_diff) = gzip_layer_of("etc/second", b"the second layer\n");
    let config = config_for(&[&first_diff, &second_diff]);
    let manifest = oci_manifest(
        &sha(&config),
        config.len() as u64,
        &[
            (sha(&first), first.len() as u64),
            (sha(&second), second.len() as u64),
        ],
    );
    let mut routes = good.routes.clone();
    routes.extend([
        ("/manifests/two".into(), OCI_MANIFEST, manifest),
        (format!("/blobs/{}", sha(&config)), BLOB, config.clone()),
        (format!("/blobs/{}", sha(&first)), BLOB, first.clone()),
    ]);
    // The second layer is corrupt until the registry is fixed.
    let fixed = Arc::new(AtomicBool::new(false));
    let second_path = format!("/blobs/{}", sha(&second));
    let port = fake_server({
        let fixed = fixed.clone();
        let second = second.clone();
        move |r| {
            if r.path.ends_with(&second_path) {
                let mut body = second.clone();
                if !fixed.load(Ordering::SeqCst) {
                    *body.last_mut().unwrap() ^= 1;
                }
                return Reply::Ok(BLOB, body);
            }
            route(&routes, &r.path)
        }
    })
    .0;
    let home = seeded(port);
    let h = home.path();
    let image = format!("127.0.0.1:{port}/x/app:two");

    let before = store_snapshot(h);
    let err = fails(&vmc(h, &["pull", "--insecure", &image]));
    assert!(
        err.contains(&format!(
            "layer {}: its content does not match",
            sha(&second)
        )),
        "{err}"
    );
    // What README.md says: a failed pull names nothing (index.json is as it
    // was) and keeps the blobs it verified, the config and the first layer,
    // for the next pull; no temporary file, nothing of the second layer.
    let after = store_snapshot(h);
    let hex = |b: &[u8]| format!("{:x}", Sha256::digest(b));
    let mut kept = vec![
        format!("+ blobs/sha256/{}", hex(&config)),
        format!("+ blobs/sha256/{}", hex(&first)),
    ];
    kept.sort();
    assert_eq!(store_diff(&before, &after), kept);
    for b in [&config, &first] {
        let p = Path::new("blobs/sha256").join(hex(b));
        assert_eq!(after[&p], (b.len() as u64, hex(b)), "verified: {p:?}");
    }
    assert_eq!(ok(&vmc(h, &["images", "-q"])).lines().count(), 1);

    // Once the registry is fixed, the next pull takes the kept layer.
    fixed.store(true, Ordering::SeqCst);
    let out = ok(&vmc(h, &["pull", "--insecure", &image]));
    let short = |b: &[u8]| hex(b)[..12].to_string();
    assert!(
        out.contains(&format!("{}: Already exists", short(&first))),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}: Pull complete", short(&second))),
        "{out}"
    );
    assert_eq!(inspect(h, &image)["Id"], sha(&config).as_str());
}

/// Waits (bounded) for a flooding route to report how much it sent.
fn flooded(done: &mpsc::Receiver<u64>) -> u64 {
    done.recv_timeout(Duration::from_secs(120))
        .expect("the flood ends once vmc hangs up")
}

/// How much a flooding answer sends: far more than any bound, so that
/// reading it all and refusing it afterwards shows.
const FLOOD: u64 = 512 << 20;
/// Each refusal of a flood must come within the first 64 MiB sent (the
/// largest bound, 8 MiB, plus what the sockets buffer).
const READ_AT_MOST: u64 = 64 << 20;

#[test]
fn oversized_manifests_and_blobs_are_refused_while_reading() {
    let good = good_image();
    let mut routes = good.routes.clone();
    let flood_blob = sha(b"a flood");
    routes.extend([
        (
            "/manifests/flood-layer".into(),
            OCI_MANIFEST,
            good.manifest(&[(flood_blob.clone(), 1000)]),
        ),
        // Bounds checked on the manifest's word, before any download.
        (
            "/manifests/big-config".into(),
            OCI_MANIFEST,
            oci_manifest(&sha(b"a big config"), 9 << 20, &[]),
        ),
        (
            "/manifests/big-layer".into(),
            OCI_MANIFEST,
            good.manifest(&[(sha(b"a big layer"), 65 << 30)]),
        ),
    ]);
    let (tx, done) = mpsc::channel();
    let flood_path = format!("/blobs/{flood_blob}");
    let (port, log) = fake_server(move |r| {
        let announced = !r.path.ends_with("/manifests/endless");
        if r.path.ends_with("/manifests/huge") || !announced || r.path.ends_with(&flood_path) {
            return Reply::Flood {
                status: "200 OK",
                len: FLOOD,
                announced,
                done: tx.clone(),
            };
        }
        route(&routes, &r.path)
    });
    let home = seeded(port);
    let h = home.path();

    // With a Content-Length and without one (the close ends the body).
    for tag in ["huge", "endless"] {
        let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:{tag}"));
        assert!(
            err.contains(&format!(
                "127.0.0.1:{port}/x/app:{tag}: its manifest has more than the 8 MiB allowed"
            )),
            "{err}"
        );
        let sent = flooded(&done);
        assert!(sent < READ_AT_MOST, "{sent} bytes of manifest read");
    }

    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:flood-layer"));
    assert!(
        err.contains(&format!(
            "layer {flood_blob}: the registry sent more than the 1000 bytes announced"
        )),
        "{err}"
    );
    let sent = flooded(&done);
    assert!(sent < READ_AT_MOST, "{sent} bytes of layer read");

    let asked = log.lock().unwrap().len();
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:big-config"));
    assert!(
        err.contains(&format!(
            "its config has {} bytes, more than the 8 MiB allowed",
            9 << 20
        )),
        "{err}"
    );
    let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:big-layer"));
    assert!(
        err.contains(&format!(
            "layer {} claims {} bytes, more than the 64 GiB allowed",
            sha(b"a big layer"),
            65u64 << 30
        )),
        "{err}"
    );
    let blobs: Vec<String> = log.lock().unwrap()[asked..]
        .iter()
        .filter(|p| p.contains("/blobs/"))
        .cloned()
        .collect();
    assert!(blobs.is_empty(), "refused before downloading: {blobs:?}");
}

#[test]
fn token_replies_and_error_bodies_are_bounded_while_reading() {
    let good = good_image();
    let mut routes = good.routes.clone();
    // Layers whose download the registry refuses with an endless body, with
    // a Content-Length and without one.
    let refused = [sha(b"refused, announced"), sha(b"refused, endless")];
    for (tag, d) in ["refused", "refused-endless"].iter().zip(&refused) {
        routes.push((
            format!("/manifests/{tag}"),
            OCI_MANIFEST,
            good.manifest(&[(d.clone(), 1000)]),
        ));
    }
    // A registry with token auth whose token endpoint hands out a token
    // (`GRANT`) or floods its 200 reply, with a Content-Length or without.
    const GRANT: u8 = 0;
    const ANNOUNCED: u8 = 1;
    const ENDLESS: u8 = 2;
    let token_reply = Arc::new(AtomicU8::new(GRANT));
    let (tx, done) = mpsc::channel();
    let port = fake_server({
        let token_reply = token_reply.clone();
        move |r| {
            let flood = |status, announced| Reply::Flood {
                status,
                len: FLOOD,
                announced,
                done: tx.clone(),
            };
            if r.path == "/token" {
                return match token_reply.load(Ordering::SeqCst) {
                    GRANT => Reply::Ok("application/json", br#"{"token":"t0k"}"#.to_vec()),
                    reply => flood("200 OK", reply == ANNOUNCED),
                };
            }
            if r.auth.as_deref() != Some("Bearer t0k") {
                let challenge = format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake""#,
                    r.port
                );
                return Reply::Raw(unauthorized(Some(&challenge)));
            }
            if let Some(i) = refused.iter().position(|d| r.path.ends_with(d.as_str())) {
                return flood("503 Service Unavailable", i == 0);
            }
            route(&routes, &r.path)
        }
    })
    .0;
    let home = seeded(port);
    let h = home.path();

    // The refusal is quoted from the body's first 64 KiB, the rest unread.
    for tag in ["refused", "refused-endless"] {
        let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:{tag}"));
        assert!(
            err.contains(&format!(
                "registry 127.0.0.1:{port} answered HTTP 503 for 127.0.0.1:{port}/x/app:{tag}: \
                 (no reason given)"
            )),
            "{err}"
        );
        let sent = flooded(&done);
        assert!(sent < READ_AT_MOST, "{sent} bytes of error body read");
    }

    // A token reply longer than 64 KiB is refused.
    for reply in [ANNOUNCED, ENDLESS] {
        token_reply.store(reply, Ordering::SeqCst);
        let err = pull_fails(h, &format!("127.0.0.1:{port}/x/app:good"));
        assert!(
            err.contains(&format!(
                "registry 127.0.0.1:{port}: its anonymous token reply for x/app has more \
                 than the 64 KiB allowed"
            )),
            "{err}"
        );
        let sent = flooded(&done);
        assert!(sent < READ_AT_MOST, "{sent} bytes of token reply read");
    }
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

/// A registry behind TLS whose certificate nobody vouches for (self-signed):
/// the pull is refused with one line naming the certificate problem, and
/// `--insecure` (plain http) against it is named as such; the store is as
/// it was either way.
#[test]
fn a_registry_with_an_untrusted_certificate_is_refused() {
    if !tools() {
        return;
    }
    let reg = Registry::start_tls();
    let src = tempfile::tempdir().unwrap();
    let (archive, _) = saved_busybox(src.path());
    reg.push(&archive, "test/bb:1", &[]);
    let image = format!("{}/test/bb:1", reg.host());
    let home = tempfile::tempdir().unwrap();
    // The first pull makes the store (and its lock files): compared from
    // then on.
    let err = fails(&vmc(home.path(), &["pull", &image]));
    assert_eq!(err, pull_fails_with(home.path(), &["pull", &image]));
    assert!(
        err.contains(&format!(
            "cannot reach registry {} over https: its certificate is not trusted",
            reg.host()
        )) && err.contains("add the registry's CA there"),
        "{err}"
    );
    let err = pull_fails_with(home.path(), &["pull", "--insecure", &image]);
    assert!(
        err.contains(&format!(
            "registry {} serves https, not plain http: drop --insecure",
            reg.host()
        )),
        "{err}"
    );
}
