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
//!
//! This file holds the pull itself (resolving the reference, downloading
//! blobs into the store, checking and naming the image); `http.rs` the
//! registry client (its requests, the token dance, bounded bodies),
//! `parse.rs` what is parsed of the registry's answers and `errors.rs` how
//! failures are worded.

use std::io::{self, Read, Write};

use indicatif::{ProgressBar, ProgressStyle};
use oci_spec::image::{Descriptor, Digest, MediaType};

use super::archive::{is_plain_oci, Blob, Checker, MAX_ENTRY};
use super::store::{ref_name, Store, StoreError, StoredImage};
use super::{ImageError, Reference};
use errors::innermost;
use http::Remote;
use parse::Top;

mod errors;
mod http;
mod parse;

/// A registry's answers as the `registry` fuzz target hands them over:
/// every parser a pull runs on them, fed the same bytes.
#[doc(hidden)]
pub fn fuzz_registry(data: &[u8]) {
    let _ = parse::top(data);
    let _ = parse::image_manifest(data, "sha256:0");
    let _ = parse::token_reply(data);
    let text = String::from_utf8_lossy(data);
    let _ = parse::bearer_challenge(&text);
    let _ = http::quote(&text);
}

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
    match parse::top(&body).map_err(|why| remote.bad(why))? {
        Top::Manifest => Ok((body, digest.clone(), digest)),
        Top::Index(chosen) => {
            let (mbody, mdigest) = remote.manifest(Some(&chosen))?;
            Ok((mbody, mdigest, digest))
        }
    }
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
    let manifest =
        parse::image_manifest(&body, manifest_digest.as_ref()).map_err(|why| remote.bad(why))?;
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
