//! `vmc pull`: an image from an OCI or Docker registry (the distribution API)
//! into the store, with reqwest on a current-thread tokio runtime that lives
//! only as long as the pull (and the `oci-client` crate's types).
//!
//! Every HTTP body is read with a bound, while it arrives: the anonymous
//! token reply (64 KiB), manifests (`MAX_JSON`), the body of an error answer
//! (its first `MAX_ERROR_BODY` bytes, quoted, the rest left unread) and
//! blobs (their descriptor's size).
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

use std::cell::OnceCell;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use oci_client::client::linux_amd64_resolver;
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{
    OciImageIndex, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
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
/// Longest token reply accepted (Docker Hub's are a few KiB).
const MAX_TOKEN: usize = 64 << 10;

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

/// The registry side of a pull: the HTTP client, its runtime, the token,
/// and how to word problems.
///
/// Every request is vmc's own, on one reqwest client, so that every body is
/// read with a bound while it arrives: oci-client's `Client` reads token
/// replies and error bodies whole into memory before looking at them, however
/// long the registry makes them. oci-client's types (references, error
/// values, manifests) are still used.
struct Remote {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    /// The anonymous bearer token: fetched by the first request of the pull
    /// and sent with every one after it; `None` inside for a registry that
    /// asks for none.
    token: OnceCell<Option<String>>,
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
        // reqwest's default redirect policy is kept: registries send blob
        // downloads on to a CDN, and a redirect to another host, port or
        // scheme drops the Authorization header (the token stays with the
        // registry).
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("vmc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ImageError::Registry(format!("cannot set up the registry client: {e}")))?;
        Ok(Remote {
            rt,
            http,
            token: OnceCell::new(),
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

    /// `https://HOST` (`http://` with `--insecure`), Docker Hub's name
    /// resolved to the host that serves it.
    fn base(&self) -> String {
        format!(
            "{}://{}",
            if self.insecure { "http" } else { "https" },
            self.reference.resolve_registry()
        )
    }

    /// The raw manifest (or index) at `digest`, or at the reference itself,
    /// with its digest (checked against the registry's
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

    /// GETs a manifest, reading at most `MAX_JSON` bytes of it; returns it
    /// and the registry's `Docker-Content-Digest`, if any.
    async fn get_manifest(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let url = format!(
            "{}/v2/{}/manifests/{}",
            self.base(),
            reference.repository(),
            reference.digest().or(reference.tag()).unwrap_or("latest")
        );
        let mut res = self.get(&url, Some(&ACCEPT.join(", "))).await?;
        if res.status() != reqwest::StatusCode::OK {
            return Err(self.refusal(res, url).await);
        }
        let got = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        match read_all(&mut res, MAX_JSON)
            .await
            .map_err(|e| self.error(e.into()))?
        {
            Some(body) => Ok((body, got)),
            None => Err(self.bad(format!(
                "its manifest has more than the {} MiB allowed",
                MAX_JSON >> 20
            ))),
        }
    }

    /// Opens the download of a blob: the registry's 200 answer, whose body
    /// is left to `Download` to read.
    fn blob(&self, d: &Descriptor) -> Result<reqwest::Response, ImageError> {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            self.base(),
            self.reference.repository(),
            d.digest()
        );
        self.rt.block_on(async {
            let res = self.get(&url, None).await?;
            if res.status() != reqwest::StatusCode::OK {
                return Err(self.refusal(res, url).await);
            }
            Ok(res)
        })
    }

    /// Sends a GET to the registry with the pull's token (fetched first if
    /// this is the pull's first request); the answer's body is not read.
    async fn get(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, ImageError> {
        let token = match self.token.get() {
            Some(t) => t,
            None => {
                let t = self.fetch_token().await?;
                // A current-thread runtime and one request at a time: the
                // cell is still empty here.
                self.token.get_or_init(|| t)
            }
        };
        let mut request = self.http.get(url);
        if let Some(a) = accept {
            request = request.header(reqwest::header::ACCEPT, a);
        }
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().await.map_err(|e| self.error(e.into()))
    }

    /// The distribution API's anonymous token dance: `GET /v2/`, and if
    /// that is answered with a Bearer challenge, a GET of the challenge's
    /// realm for a pull token of the repository. `None` for a registry that
    /// challenges with no Bearer realm (or not at all): its requests go
    /// without a token, and a refusal names what the registry says then.
    async fn fetch_token(&self) -> Result<Option<String>, ImageError> {
        let url = format!("{}/v2/", self.base());
        let res = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.error(e.into()))?;
        // Only the headers matter: the body is dropped unread, which closes
        // the connection.
        let challenge = res
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(bearer_challenge);
        drop(res);
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let host = &self.host;
        let repo = &self.repository;
        let mut realm = reqwest::Url::parse(&challenge.realm).map_err(|e| {
            ImageError::Registry(format!(
                "registry {host}: its token endpoint {} is not a URL ({e})",
                quote(&challenge.realm)
            ))
        })?;
        // A pull of this repository is what is asked for, whatever scope
        // the challenge names (one to `GET /v2/` names none).
        realm.query_pairs_mut().append_pair(
            "scope",
            &format!("repository:{}:pull", self.reference.repository()),
        );
        if let Some(s) = &challenge.service {
            realm.query_pairs_mut().append_pair("service", s);
        }
        let mut res = self
            .http
            .get(realm)
            .send()
            .await
            .map_err(|e| self.error(e.into()))?;
        if res.status() != reqwest::StatusCode::OK {
            let (body, _) = read_prefix(&mut res, MAX_ERROR_BODY)
                .await
                .map_err(|e| self.error(e.into()))?;
            return Err(self.error(OciDistributionError::AuthenticationFailure(
                String::from_utf8_lossy(&body).into_owned(),
            )));
        }
        let Some(body) = read_all(&mut res, MAX_TOKEN as u64)
            .await
            .map_err(|e| self.error(e.into()))?
        else {
            return Err(ImageError::Registry(format!(
                "registry {host}: its anonymous token reply for {repo} has more than \
                 the {} KiB allowed",
                MAX_TOKEN >> 10
            )));
        };
        /// The token endpoint's answer: `token`, or OAuth2's `access_token`
        /// (the distribution spec allows either; `token` wins when both
        /// are given).
        #[derive(serde::Deserialize)]
        struct Reply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let reply: Reply = serde_json::from_slice(&body).map_err(|e| {
            ImageError::Registry(format!(
                "registry {host}: its anonymous token reply for {repo} cannot be read: {}",
                quote(&e.to_string())
            ))
        })?;
        match reply.token.or(reply.access_token) {
            Some(t) => Ok(Some(t)),
            None => Err(ImageError::Registry(format!(
                "registry {host}: its anonymous token reply for {repo} holds no token"
            ))),
        }
    }

    /// The error an answer other than 200 (to a manifest or blob GET)
    /// stands for: the registry's reason from at most `MAX_ERROR_BODY`
    /// bytes of its body (enough to quote; the rest is left unread), made
    /// into the values oci-client makes of such answers and worded by
    /// `error`.
    async fn refusal(&self, mut res: reqwest::Response, url: String) -> ImageError {
        let status = res.status();
        let body = match read_prefix(&mut res, MAX_ERROR_BODY).await {
            Ok((body, _)) => body,
            Err(e) => return self.error(e.into()),
        };
        let text = || String::from_utf8_lossy(&body).into_owned();
        let e = match status.as_u16() {
            401 => OciDistributionError::UnauthorizedError { url },
            code @ 400..=499 => match serde_json::from_slice::<OciEnvelope>(&body) {
                Ok(envelope) => OciDistributionError::RegistryError { envelope, url },
                Err(_) => OciDistributionError::ServerError {
                    code,
                    url,
                    message: text(),
                },
            },
            code => OciDistributionError::ServerError {
                code,
                url,
                message: text(),
            },
        };
        self.error(e)
    }

    /// A problem with what the registry holds for the reference.
    fn bad(&self, msg: impl Display) -> ImageError {
        if self.shown.starts_with(&format!("{}/", self.host)) {
            ImageError::Registry(format!("{}: {msg}", self.shown))
        } else {
            ImageError::Registry(format!("{} (from {}): {msg}", self.shown, self.host))
        }
    }

    /// A failed request or a registry's refusal (as the error values
    /// oci-client has for them), worded for the user in one line.
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
        } else if bad_certificate(r) {
            format!(
                "cannot reach registry {host} over https: its certificate is not trusted: \
                 {cause} (vmc trusts the system's certificate authorities: add the \
                 registry's CA there)"
            )
        } else {
            format!(
                "cannot reach registry {host} over https: {cause} \
                 (a registry serving plain http needs --insecure)"
            )
        }
    }
}

/// `e` and its causes, stepping into the error an `io::Error` wraps (its
/// `source()` skips that one: TLS errors arrive wrapped twice).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| match c.downcast_ref::<io::Error>() {
        Some(io) => io.get_ref().map(|w| w as _),
        None => c.source(),
    })
}

/// Whether TLS refused the server's certificate somewhere in the causes of `e`.
fn bad_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|c| {
        matches!(
            c.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        )
    })
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
    causes(e).any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::ConnectionRefused)
    })
}

/// Text from elsewhere as part of a one-line message: runs of white space
/// and control characters (a registry's text could hold terminal escapes or
/// NULs) become one space.
fn quote(s: &str) -> String {
    let one: String = s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
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

/// Reads `res`'s body up to `limit` bytes and stops there, the rest left
/// unread (dropping the answer then closes its connection); returns what
/// was read and whether that was all of it.
async fn read_prefix(
    res: &mut reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// `res`'s whole body, or `None` if it is longer than `limit` bytes: said
/// so by its Content-Length, or found while reading (by the chunk that
/// goes past the limit, which is not kept).
async fn read_all(
    res: &mut reqwest::Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if res.content_length().is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let (body, whole) = read_prefix(res, limit).await?;
    Ok(whole.then_some(body))
}

/// The realm and service of a Bearer challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: Option<String>,
}

/// The first Bearer challenge with a realm in a `WWW-Authenticate` value
/// (RFC 9110, section 11.6.1): `Bearer realm="https://auth.example/token",
/// service="registry.example",scope="..."`, possibly after or before
/// challenges of other schemes in the same value. vmc parses it itself
/// because it makes its own requests, to bound every body it reads
/// (oci-client, which parses challenges too, reads bodies whole).
///
/// The value is a comma-separated list in which a challenge starts with its
/// scheme (a token followed by space or the end, not by `=`) and goes on
/// with `name=value` parameters, a value being a token or a quoted string
/// (which may hold commas, and backslash escapes).
fn bearer_challenge(value: &str) -> Option<Challenge> {
    /// A token ends at space, a comma or `=` (looser than RFC 9110's tchar,
    /// which is enough to find the parameters vmc needs).
    fn token(s: &str) -> (&str, &str) {
        let end = s.find([' ', '\t', ',', '=']).unwrap_or(s.len());
        s.split_at(end)
    }
    /// A quoted string's content, unescaped, and what follows its closing
    /// quote; `None` if it is never closed.
    fn quoted(s: &str) -> Option<(String, &str)> {
        let mut out = String::new();
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Some((out, &s[i + 1..])),
                '\\' => out.push(chars.next()?.1),
                c => out.push(c),
            }
        }
        None
    }
    let space = |c: char| c == ' ' || c == '\t';
    // The scheme of the challenge being read, and its realm and service.
    let mut bearer = false;
    let mut realm = None;
    let mut service = None;
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches(|c| space(c) || c == ',');
        if rest.is_empty() {
            break;
        }
        let (name, after) = token(rest);
        let after = after.trim_start_matches(space);
        let Some(v) = after.strip_prefix('=') else {
            // A scheme: the end of the challenge before it.
            if bearer && realm.is_some() {
                break;
            }
            bearer = name.eq_ignore_ascii_case("bearer");
            (realm, service) = (None, None);
            rest = after;
            continue;
        };
        let v = v.trim_start_matches(space);
        let (text, next) = match v.strip_prefix('"') {
            Some(q) => quoted(q)?,
            None => {
                let (t, next) = token(v);
                (t.to_string(), next)
            }
        };
        rest = next;
        if !bearer {
            continue;
        }
        if name.eq_ignore_ascii_case("realm") {
            realm = Some(text);
        } else if name.eq_ignore_ascii_case("service") {
            service = Some(text);
        }
    }
    match (bearer, realm) {
        (true, Some(realm)) => Some(Challenge { realm, service }),
        _ => None,
    }
}

/// A blob download as a `Read`, driven on the pull's runtime; counts bytes
/// and refuses more than the descriptor announced (the store checks the
/// digest of what it gets).
struct Download<'a> {
    rt: &'a tokio::runtime::Runtime,
    /// The registry's 200 answer, its body read chunk by chunk.
    res: reqwest::Response,
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
            match self.rt.block_on(self.res.chunk()) {
                Ok(None) if self.got != self.limit => return Err(self.short()),
                Ok(None) => return Ok(0),
                Ok(Some(b)) => self.chunk = b,
                Err(e) => {
                    let msg = if self.got < self.limit {
                        format!(
                            "the download stopped after {} of the {} bytes announced: {}",
                            self.got,
                            self.limit,
                            innermost(&e)
                        )
                    } else {
                        format!("download failed: {}", innermost(&e))
                    };
                    let kind = if e.is_timeout() {
                        io::ErrorKind::TimedOut
                    } else {
                        io::ErrorKind::Other
                    };
                    return Err(self.fail(kind, msg));
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
    let res = remote.blob(d)?;
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
        res,
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
        assert_eq!(quote("\x1b[2Jno\0\0clear"), "[2Jno clear");
        assert_eq!(quote("\0\0\0"), "(no reason given)");
    }

    #[test]
    fn bearer_challenges_are_parsed_with_quoted_parameters() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            bearer_challenge(hub),
            Some(Challenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        // Commas and escapes inside quotes, space around `=`, any case, a
        // token value, and another scheme's challenge before and after.
        let v = r#"Basic realm="a, b", BEARER Service = "s\"1" , Realm="https://x/t?a=1,b=2", error=insufficient_scope, Negotiate abc=="#;
        assert_eq!(
            bearer_challenge(v),
            Some(Challenge {
                realm: "https://x/t?a=1,b=2".into(),
                service: Some("s\"1".into()),
            })
        );
        assert_eq!(
            bearer_challenge("bearer realm=https://x/t"),
            Some(Challenge {
                realm: "https://x/t".into(),
                service: None,
            })
        );
        // No Bearer challenge, none with a realm, an unclosed quote.
        for v in [
            r#"Basic realm="registry""#,
            r#"Bearer service="s""#,
            r#"Bearer realm="https://x/t"#,
            "Bearer",
            "",
            "==,,",
        ] {
            assert_eq!(bearer_challenge(v), None, "{v}");
        }
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
