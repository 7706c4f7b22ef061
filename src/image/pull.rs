//! `vmc pull`: an image from an OCI or Docker registry (the distribution API)
//! into the store, with the `oci-client` crate on a current-thread tokio
//! runtime that lives only as long as the pull.
//!
//! The reference's manifest is fetched first. An image index (or Docker
//! manifest list) is resolved to its linux/amd64 image. Manifests are read
//! up to `MAX_JSON` bytes and checked against their digest: the registry's
//! `Docker-Content-Digest` and, for `name@sha256:...`, the digest asked for.
//! Then the config and each layer missing from the store are streamed into
//! it, each blob verified against its digest and size on the way in (one
//! longer or shorter than announced never enters the store); compressed
//! layers (gzip, zstd) are stored as they are, with their media types.
//! Finally the image is checked as `vmc load` checks one (the config's diff
//! ids are those of the layers, after decompression) and named.
//!
//! The registry's own manifest and config bytes are kept, so the image id
//! (config digest) and, for OCI manifests, the manifest digest are the
//! registry's. Docker-format manifests get an OCI manifest written for the
//! same config and layers, as `vmc load` does for docker-archives.
//!
//! A failed pull names nothing: blobs it stored stay unreferenced until
//! `vmc rmi`/gc removes them, and a name is only ever pointed at a complete,
//! checked image. Only anonymous pulls are supported (no credentials).

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{
    OciDescriptor, OciImageIndex, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use oci_spec::image::{Descriptor, Digest, ImageManifest, MediaType};

use super::archive::{
    is_plain_oci, kind, Blob, Checker, Kind, DOCKER_CONFIG, LAYER_TYPES, MAX_ENTRY, MAX_JSON,
    MAX_LAYERS,
};
use super::store::{digest_of, ref_name, Store, StoreError, StoredImage};
use super::{ImageError, Reference};

/// How long connecting to the registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the registry may stay silent in the middle of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// The manifest media types asked for.
const ACCEPT: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];
/// Longest part of a registry's own error text quoted in a message.
const MAX_QUOTE: usize = 200;
/// Most of an error answer's body read (its text is quoted, shortened).
const MAX_ERROR_BODY: usize = 64 << 10;

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Speak plain http to the registry (https otherwise).
    pub insecure: bool,
    /// Show a progress bar per download on stderr (for a terminal).
    pub progress: bool,
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub image: StoredImage,
    /// The digest the reference resolved to in the registry (of the image
    /// index for a multi-platform image), as `sha256:<hex>`.
    pub digest: String,
    /// The name the image got (`None` for a pull by digest alone).
    pub name: Option<String>,
    /// Whether the store already had the image under that name.
    pub up_to_date: bool,
}

/// The registry side of a pull: the client, its runtime, and how to word
/// problems.
struct Remote {
    rt: tokio::runtime::Runtime,
    client: oci_client::Client,
    /// For manifests, whose size oci-client does not bound.
    http: reqwest::Client,
    auth: RegistryAuth,
    /// The reference as oci-client spells it.
    reference: oci_client::Reference,
    /// The registry as given (`127.0.0.1:5000`, `docker.io`).
    host: String,
    /// The reference as the user gave it, for messages.
    shown: String,
    repository: String,
    insecure: bool,
}

impl Remote {
    fn new(r: &Reference, insecure: bool) -> Result<Remote, ImageError> {
        // rustls needs a crypto provider; installing one fails harmlessly
        // when an earlier pull in this process did it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::Registry(format!("cannot start the registry client: {e}")))?;
        let reference = match (&r.tag, &r.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                r.registry.clone(),
                r.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (None, Some(d)) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.clone(),
            ),
            (t, None) => oci_client::Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".to_string()),
            ),
        };
        let protocol = if insecure {
            ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| ImageError::Registry(format!("cannot set up the registry client: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("vmc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ImageError::Registry(format!("cannot set up the registry client: {e}")))?;
        Ok(Remote {
            rt,
            client,
            http,
            auth: RegistryAuth::Anonymous,
            reference,
            host: r.registry.clone(),
            shown: match r.digest {
                None => r.store_name(),
                Some(_) => r.to_string(),
            },
            repository: r.repository.clone(),
            insecure,
        })
    }

    /// The raw manifest (or index) at `digest`, or at the reference itself,
    /// with its digest (checked by oci-client against the registry's
    /// `Docker-Content-Digest` and against a digest in the reference).
    fn manifest(&self, digest: Option<&str>) -> Result<(Vec<u8>, Digest), ImageError> {
        let reference = match digest {
            Some(d) => self.reference.clone_with_digest(d.to_string()),
            None => self.reference.clone(),
        };
        let (body, got) = self.rt.block_on(self.get_manifest(&reference))?;
        // Checked once more here: a pull by digest must get exactly that.
        let computed = digest_of(&body);
        let want = digest.or(reference.digest());
        if let Some(want) = want {
            if computed.to_string() != want {
                return Err(self.bad(format!(
                    "the registry sent a manifest whose digest is {computed}, not {want}: \
                     the registry's content does not match the digest asked for"
                )));
            }
        }
        if got.starts_with("sha256:") && got != computed.to_string() {
            return Err(self.bad(format!(
                "the registry says its manifest is {got}, but its content is {computed}"
            )));
        }
        Ok((body.to_vec(), computed))
    }

    /// GETs a manifest, reading at most `MAX_JSON` bytes of it (oci-client's
    /// `pull_manifest_raw` would read any length into memory first); returns
    /// it and the registry's `Docker-Content-Digest`, if any. oci-client
    /// still does the (anonymous) token dance.
    async fn get_manifest(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let token = self
            .client
            .auth(reference, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.error(e))?;
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            if self.insecure { "http" } else { "https" },
            reference.resolve_registry(),
            reference.repository(),
            reference.digest().or(reference.tag()).unwrap_or("latest")
        );
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPT.join(", "));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let mut res = request.send().await.map_err(|e| self.error(e.into()))?;
        let status = res.status();
        let got = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let too_big = || {
            self.bad(format!(
                "its manifest has more than the {} MiB allowed",
                MAX_JSON >> 20
            ))
        };
        let ok = status == reqwest::StatusCode::OK;
        if ok && res.content_length().is_some_and(|n| n > MAX_JSON) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| self.error(e.into()))? {
            if !ok && body.len() + chunk.len() > MAX_ERROR_BODY {
                break; // enough to quote
            }
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_JSON {
                return Err(too_big());
            }
        }
        if ok {
            return Ok((body, got));
        }
        // What oci-client makes of an answer other than 200.
        let e = match status.as_u16() {
            401 => OciDistributionError::UnauthorizedError { url },
            code @ 400..=499 => match serde_json::from_slice::<OciEnvelope>(&body) {
                Ok(envelope) => OciDistributionError::RegistryError { envelope, url },
                Err(_) => OciDistributionError::ServerError {
                    code,
                    url,
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            },
            code => OciDistributionError::ServerError {
                code,
                url,
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        };
        Err(self.error(e))
    }

    /// Opens the download of a blob.
    fn blob(&self, d: &Descriptor) -> Result<SizedStream, ImageError> {
        let od = OciDescriptor {
            media_type: d.media_type().to_string(),
            digest: d.digest().to_string(),
            size: i64::try_from(d.size()).unwrap_or(i64::MAX),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.pull_blob_stream(&self.reference, &od))
            .map_err(|e| self.error(e))
    }

    /// A problem with what the registry holds for the reference.
    fn bad(&self, msg: impl Display) -> ImageError {
        if self.shown.starts_with(&format!("{}/", self.host)) {
            ImageError::Registry(format!("{}: {msg}", self.shown))
        } else {
            ImageError::Registry(format!("{} (from {}): {msg}", self.shown, self.host))
        }
    }

    /// An oci-client error, worded for the user in one line.
    fn error(&self, e: OciDistributionError) -> ImageError {
        let host = &self.host;
        let what = &self.shown;
        let repo = &self.repository;
        let msg = match &e {
            OciDistributionError::RequestError(r) => self.request_error(r),
            OciDistributionError::RegistryError { envelope, .. } => match envelope.errors.first() {
                Some(first) => {
                    let said = quote(&first.message);
                    match &first.code {
                        OciErrorCode::ManifestUnknown => format!(
                            "manifest unknown: {what} is not in the registry \
                                 (check the name and the tag or digest)"
                        ),
                        OciErrorCode::NameUnknown => format!(
                            "repository {repo} is not in registry {host} (check the image name)"
                        ),
                        OciErrorCode::Unauthorized | OciErrorCode::Denied => format!(
                            "registry {host} refused access to {repo}: {said} \
                                 (vmc pull supports anonymous pulls only)"
                        ),
                        OciErrorCode::Toomanyrequests => {
                            format!("registry {host} is limiting pulls: {said} (try again later)")
                        }
                        OciErrorCode::BlobUnknown => format!(
                            "registry {host} lacks a blob of {what}: {said} \
                                 (the image is incomplete there; push it again)"
                        ),
                        code => format!("registry {host} refused {what}: {code:?}: {said}"),
                    }
                }
                None => format!("registry {host} refused {what} without saying why"),
            },
            OciDistributionError::ServerError { code, message, .. } => {
                let said = quote(message);
                match code {
                    404 => format!(
                        "manifest unknown: {what} is not in the registry \
                         (check the name and the tag or digest)"
                    ),
                    400 if self.insecure && message.contains("HTTPS") => {
                        format!("registry {host} serves https, not plain http: drop --insecure")
                    }
                    _ => format!("registry {host} answered HTTP {code} for {what}: {said}"),
                }
            }
            OciDistributionError::UnauthorizedError { .. } => format!(
                "registry {host} requires authentication for {repo} \
                 (vmc pull supports anonymous pulls only)"
            ),
            OciDistributionError::AuthenticationFailure(m) => format!(
                "registry {host}: anonymous authentication for {repo} failed: {}",
                quote(m)
            ),
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => {
                return self.bad(format!(
                    "the registry sent content that does not match its digest \
                     (expected {expected}, got {actual})"
                ))
            }
            OciDistributionError::DigestError(d) => {
                return self.bad(format!("the registry sent an unusable digest: {d}"))
            }
            OciDistributionError::UnsupportedMediaTypeError(t) => {
                return self.bad(format!("not a container image but a {t}"))
            }
            other => format!("pulling {what} from {host}: {}", quote(&other.to_string())),
        };
        ImageError::Registry(msg)
    }

    /// A failed HTTP exchange, worded for the user.
    fn request_error(&self, r: &reqwest::Error) -> String {
        let host = &self.host;
        let cause = quote(&innermost(r));
        if r.is_timeout() {
            return format!("registry {host} did not answer in time ({cause})");
        }
        if !r.is_connect() {
            return format!("registry {host}: {cause}");
        }
        if refused(r) {
            let hint = if self.insecure {
                "is it running?"
            } else {
                "is it running? plain http needs --insecure"
            };
            return format!("cannot reach registry {host}: connection refused ({hint})");
        }
        if self.insecure {
            format!("cannot reach registry {host}: {cause}")
        } else {
            format!(
                "cannot reach registry {host} over https: {cause} \
                 (a registry serving plain http needs --insecure)"
            )
        }
    }
}

/// The message of the deepest cause of `e`.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether a connection was refused somewhere in the causes of `e`.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// Text from elsewhere as part of a one-line message.
fn quote(s: &str) -> String {
    let one: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_QUOTE)
        .collect();
    if one.is_empty() {
        "(no reason given)".to_string()
    } else {
        one
    }
}

/// A blob download as a `Read`, driven on the pull's runtime; counts bytes
/// and refuses more than the descriptor announced.
struct Download<'a> {
    rt: &'a tokio::runtime::Runtime,
    stream: SizedStream,
    chunk: bytes::Bytes,
    got: u64,
    limit: u64,
    bar: Option<&'a ProgressBar>,
    /// Why the download failed, to tell it from a failing store.
    failed: Option<String>,
}

impl Download<'_> {
    fn fail(&mut self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.failed = Some(msg.clone());
        io::Error::new(kind, msg)
    }

    /// The end of a download of other than the announced length: before
    /// the blob is complete, so that it never enters the store.
    fn short(&mut self) -> io::Error {
        let msg = format!(
            "the registry sent {} bytes, not the {} announced",
            self.got, self.limit
        );
        self.fail(io::ErrorKind::InvalidData, msg)
    }
}

impl Read for Download<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None if self.got != self.limit => return Err(self.short()),
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    let digest = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>());
                    let msg = match digest {
                        // A short body fails its digest too; its length says more.
                        Some(_) if self.got < self.limit => return Err(self.short()),
                        Some(oci_client::errors::DigestError::VerificationError {
                            actual, ..
                        }) => format!(
                            "its content does not match its digest (got {actual}): \
                             the registry sent corrupted data"
                        ),
                        _ if self.got < self.limit => format!(
                            "the download stopped after {} of the {} bytes announced: {}",
                            self.got,
                            self.limit,
                            innermost(&e)
                        ),
                        _ => format!("download failed: {}", innermost(&e)),
                    };
                    return Err(self.fail(e.kind(), msg));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        self.got += n as u64;
        if self.got > self.limit {
            let msg = format!(
                "the registry sent more than the {} bytes announced",
                self.limit
            );
            return Err(self.fail(io::ErrorKind::InvalidData, msg));
        }
        if let Some(b) = self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

/// The first 12 hex digits of a digest, as Docker shows layers.
fn short(d: &Digest) -> String {
    d.digest().chars().take(12).collect()
}

/// Streams the blob `d` into the store unless it is there already; returns
/// it and whether it was downloaded.
fn fetch(
    store: &Store,
    remote: &Remote,
    d: &Descriptor,
    what: &str,
    progress: bool,
) -> Result<(Blob, bool), ImageError> {
    if store.has_blob(d.digest()) {
        let size = std::fs::metadata(store.blob_path(d.digest()))
            .map(|m| m.len())
            .unwrap_or(0);
        if size == d.size() {
            return Ok((
                Blob {
                    digest: d.digest().clone(),
                    size,
                },
                false,
            ));
        }
    }
    if d.size() > MAX_ENTRY {
        return Err(remote.bad(format!(
            "{what} {} claims {} bytes, more than the {} GiB allowed",
            d.digest(),
            d.size(),
            MAX_ENTRY >> 30
        )));
    }
    let stream = remote.blob(d)?;
    let bar = progress.then(|| {
        let b = ProgressBar::new(d.size());
        b.set_style(
            ProgressStyle::with_template("{prefix}: Downloading [{bar:25}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(short(d.digest()));
        b
    });
    let mut download = Download {
        rt: &remote.rt,
        stream,
        chunk: bytes::Bytes::new(),
        got: 0,
        limit: d.size(),
        bar: bar.as_ref(),
        failed: None,
    };
    let result = store.put_blob(&mut download, Some(d.digest()));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let (digest, size) = match result {
        Ok(x) => x,
        Err(e) => {
            return Err(match download.failed {
                Some(why) => remote.bad(format!("{what} {}: {why}", d.digest())),
                None => match e {
                    StoreError::DigestMismatch { expected, got } => remote.bad(format!(
                        "{what} {expected}: its content does not match its digest \
                         (got {got}): the registry sent corrupted data"
                    )),
                    e => e.into(),
                },
            })
        }
    };
    if size != d.size() {
        return Err(remote.bad(format!(
            "{what} {digest} has {size} bytes, its descriptor says {}",
            d.size()
        )));
    }
    Ok((Blob { digest, size }, true))
}

/// The image manifest of the reference: the manifest itself, or the
/// linux/amd64 entry of the index it names. Returns its bytes and digest
/// and the digest the reference resolved to.
fn resolve(remote: &Remote) -> Result<(Vec<u8>, Digest, Digest), ImageError> {
    let (body, digest) = remote.manifest(None)?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| remote.bad(format!("its manifest is not JSON: {e}")))?;
    let media = v["mediaType"].as_str().map(MediaType::from);
    let is_index = match &media {
        Some(m) => kind(m) == Kind::Index,
        None => v.get("manifests").is_some(),
    };
    if !is_index {
        return Ok((body, digest.clone(), digest));
    }
    let index: OciImageIndex = serde_json::from_slice(&body)
        .map_err(|e| remote.bad(format!("its image index cannot be read: {e}")))?;
    let chosen = linux_amd64_resolver(&index.manifests);
    if let Some(d) = chosen.as_deref().filter(|d| !d.starts_with("sha256:")) {
        return Err(remote.bad(format!(
            "its linux/amd64 manifest is {d}: vmc supports sha256 digests only"
        )));
    }
    let Some(chosen) = chosen else {
        let platforms: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|m| m.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        return Err(remote.bad(format!(
            "no linux/amd64 image in its index (it has: {})",
            if platforms.is_empty() {
                "no platforms".to_string()
            } else {
                platforms.join(", ")
            }
        )));
    };
    let (mbody, mdigest) = remote.manifest(Some(&chosen))?;
    Ok((mbody, mdigest, digest))
}

/// Checks that the manifest describes a container image vmc can run.
fn check_manifest(remote: &Remote, m: &ImageManifest) -> Result<(), ImageError> {
    if let Some(d) = std::iter::once(m.config())
        .chain(m.layers())
        .find(|d| d.digest().algorithm().to_string() != "sha256")
    {
        return Err(remote.bad(format!(
            "blob {} has a {} digest: vmc supports sha256 digests only",
            d.digest(),
            d.digest().algorithm()
        )));
    }
    let config_type = m.config().media_type().to_string();
    if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
        return Err(remote.bad(format!(
            "not a container image: its config is {config_type}"
        )));
    }
    if m.config().size() > MAX_JSON {
        return Err(remote.bad(format!(
            "its config has {} bytes, more than the {} MiB allowed",
            m.config().size(),
            MAX_JSON >> 20
        )));
    }
    if m.layers().len() > MAX_LAYERS {
        return Err(remote.bad(format!(
            "{} layers, more than the {MAX_LAYERS} allowed",
            m.layers().len()
        )));
    }
    if let Some(l) = m
        .layers()
        .iter()
        .find(|l| !LAYER_TYPES.contains(&l.media_type().to_string().as_str()))
    {
        return Err(remote.bad(format!(
            "layer {} has media type {}, which vmc cannot unpack",
            l.digest(),
            l.media_type()
        )));
    }
    Ok(())
}

/// Pulls `reference` into the store and names it (unless it names only a
/// digest). Progress lines go to `out`, Docker's way.
pub fn pull(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    out: &mut dyn Write,
) -> Result<Pulled, ImageError> {
    let remote = Remote::new(reference, opts.insecure)?;
    let _w = store.writer()?; // no gc while blobs arrive unnamed
    let (body, manifest_digest, resolved) = resolve(&remote)?;
    let manifest = ImageManifest::from_reader(&body[..])
        .map_err(|e| remote.bad(format!("{manifest_digest} is not an image manifest: {e}")))?;
    check_manifest(&remote, &manifest)?;
    let manifest_desc = Descriptor::new(
        manifest
            .media_type()
            .clone()
            .unwrap_or(MediaType::ImageManifest),
        body.len() as u64,
        manifest_digest.clone(),
    );
    let plain = is_plain_oci(&manifest_desc, &manifest);
    let label = match (&reference.tag, &reference.digest) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "latest".to_string(),
    };
    let say = |out: &mut dyn Write, line: String| {
        // A closed stdout must not fail a pull that worked.
        let _ = writeln!(out, "{line}");
    };
    say(
        out,
        format!("{label}: Pulling from {}", reference.familiar_name()),
    );

    let listed = |d: &Digest| -> Result<bool, ImageError> {
        Ok(store.index()?.manifests().iter().any(|e| e.digest() == d))
    };
    // An OCI manifest the store lists already needs no download at all.
    let complete = plain
        && listed(&manifest_digest)?
        && std::iter::once(manifest.config())
            .chain(manifest.layers())
            .all(|d| store.has_blob(d.digest()));
    let (config, layers) = if complete {
        let blob = |d: &Descriptor| Blob {
            digest: d.digest().clone(),
            size: d.size(),
        };
        (
            blob(manifest.config()),
            manifest.layers().iter().map(blob).collect::<Vec<_>>(),
        )
    } else {
        let (config, _) = fetch(store, &remote, manifest.config(), "config", false)?;
        let mut layers = Vec::with_capacity(manifest.layers().len());
        for l in manifest.layers() {
            let (blob, downloaded) = fetch(store, &remote, l, "layer", opts.progress)?;
            let status = if downloaded {
                "Pull complete"
            } else {
                "Already exists"
            };
            say(out, format!("{}: {status}", short(l.digest())));
            layers.push(blob);
        }
        (config, layers)
    };

    let mut checker = Checker::new(store, |msg| remote.bad(msg));
    let stored = if plain {
        let (d, size) = store.put_blob(&body[..], Some(&manifest_digest))?;
        Descriptor::new(MediaType::ImageManifest, size, d)
    } else {
        checker.write_manifest(&config, &layers)?
    };
    // Images the store lists were checked when they were added.
    if !listed(stored.digest())? {
        checker.check_image(&config, &layers)?;
    }

    let name = reference.tag_name();
    let index = store.index()?;
    let up_to_date = index.manifests().iter().any(|e| {
        e.digest() == stored.digest()
            && match &name {
                Some(n) => ref_name(e) == Some(n.as_str()),
                None => true,
            }
    });
    match &name {
        Some(n) => store.tag(n, &stored)?,
        None => store.add_unnamed(&stored)?,
    }
    let image = store
        .images()?
        .into_iter()
        .find(|i| i.manifest_digest == *stored.digest())
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "image {} was removed while it was being pulled",
                stored.digest()
            ))
        })?;

    say(out, format!("Digest: {resolved}"));
    let shown = name
        .clone()
        .unwrap_or_else(|| format!("{}@{resolved}", reference.familiar_name()));
    if up_to_date {
        say(out, format!("Status: Image is up to date for {shown}"));
    } else {
        say(out, format!("Status: Downloaded newer image for {shown}"));
    }
    Ok(Pulled {
        image,
        digest: resolved.to_string(),
        name,
        up_to_date,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_one_bounded_line() {
        assert_eq!(quote("a\n  b\tc"), "a b c");
        assert_eq!(quote(""), "(no reason given)");
        assert_eq!(quote(&"x".repeat(1000)).len(), MAX_QUOTE);
    }

    #[test]
    fn a_refused_connection_is_found_among_the_causes() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "client error (Connect)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(refused(&e));
        assert_eq!(
            innermost(&e),
            io::Error::from(io::ErrorKind::ConnectionRefused).to_string()
        );
        assert!(!refused(&Outer(io::Error::other("tls"))));
    }

    #[test]
    fn unreachable_registries_fail_in_one_line() {
        // Nothing listens on port 1 of the loopback address.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for insecure in [false, true] {
            let r = Reference::parse("127.0.0.1:1/test/app:1").unwrap();
            let opts = PullOptions {
                insecure,
                progress: false,
            };
            let err = pull(&store, &r, &opts, &mut io::sink())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("cannot reach registry 127.0.0.1:1: connection refused"),
                "{err}"
            );
            assert_eq!(err.contains("--insecure"), !insecure, "{err}");
            assert_eq!(err.lines().count(), 1);
        }
        assert!(store.images().unwrap().is_empty());
    }
}
