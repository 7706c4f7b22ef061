//! The registry side of a pull: [`Remote`], vmc's own HTTP client for the
//! distribution API (manifests, blobs, the anonymous token dance), every
//! body read with a bound while it arrives (what it reads is parsed in
//! `parse.rs`).

use std::cell::OnceCell;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciEnvelope};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_spec::image::{Descriptor, Digest};

use super::super::archive::MAX_JSON;
use super::super::store::digest_of;
use super::super::{ImageError, Reference};
use super::parse::{bearer_challenge, token_reply};

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
/// Most of an error answer's body read (its text is quoted, shortened).
const MAX_ERROR_BODY: usize = 64 << 10;
/// Longest token reply accepted (Docker Hub's are a few KiB).
const MAX_TOKEN: usize = 64 << 10;

/// The registry side of a pull: the HTTP client, its runtime, the token,
/// and how to word problems.
///
/// Every request is vmc's own, on one reqwest client, so that every body is
/// read with a bound while it arrives: oci-client's `Client` reads token
/// replies and error bodies whole into memory before looking at them, however
/// long the registry makes them. oci-client's types (references, error
/// values, manifests) are still used.
pub(super) struct Remote {
    pub(super) rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    /// The anonymous bearer token: fetched by the first request of the pull
    /// and sent with every one after it; `None` inside for a registry that
    /// asks for none.
    token: OnceCell<Option<String>>,
    /// The reference as oci-client spells it.
    reference: oci_client::Reference,
    /// The registry as given (`127.0.0.1:5000`, `docker.io`).
    pub(super) host: String,
    /// The reference as the user gave it, for messages.
    pub(super) shown: String,
    pub(super) repository: String,
    pub(super) insecure: bool,
}

impl Remote {
    pub(super) fn new(r: &Reference, insecure: bool) -> Result<Remote, ImageError> {
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
            insecure: insecure
                || crate::host::knobs()
                    .insecure_registries
                    .contains(&r.registry),
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
    pub(super) fn manifest(&self, digest: Option<&str>) -> Result<(Vec<u8>, Digest), ImageError> {
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
    pub(super) fn blob(&self, d: &Descriptor) -> Result<reqwest::Response, ImageError> {
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
        match token_reply(&body) {
            Ok(t) => Ok(Some(t)),
            Err(why) => Err(ImageError::Registry(format!(
                "registry {host}: its anonymous token reply for {repo} {why}"
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

/// Longest part of a registry's own error text quoted in a message.
pub(super) const MAX_QUOTE: usize = 200;

/// Text from elsewhere as part of a one-line message: runs of white space
/// and control characters (a registry's text could hold terminal escapes or
/// NULs) become one space.
pub(super) fn quote(s: &str) -> String {
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
