//! What a registry sends that a pull parses before it trusts anything:
//! the manifest or image index a reference names, the anonymous token
//! reply, and `WWW-Authenticate` challenges. Plain functions over bytes
//! already read with a bound, with no I/O, so that the `registry` fuzz
//! target (`vmc::fuzzing::registry`) drives exactly what a pull runs.
//! Their errors are the reason alone; the caller names the registry.

use oci_client::client::linux_amd64_resolver;
use oci_client::manifest::OciImageIndex;
use oci_spec::image::{ImageManifest, MediaType};

use super::super::archive::{kind, Kind, DOCKER_CONFIG, LAYER_TYPES, MAX_JSON, MAX_LAYERS};

/// What a manifest GET of a reference answered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Top {
    /// An image manifest: the body is the image's.
    Manifest,
    /// An image index (or Docker manifest list): the digest of its
    /// linux/amd64 manifest, to be fetched next.
    Index(String),
}

/// Tells an image manifest from an index (by its `mediaType`, or, for an
/// OCI document without one, by a `manifests` list), and picks an index's
/// linux/amd64 entry.
pub(super) fn top(body: &[u8]) -> Result<Top, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("its manifest is not JSON: {e}"))?;
    let is_index = match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => kind(&MediaType::from(m)) == Kind::Index,
        None => v.get("manifests").is_some(),
    };
    if !is_index {
        return Ok(Top::Manifest);
    }
    let index: OciImageIndex =
        serde_json::from_slice(body).map_err(|e| format!("its image index cannot be read: {e}"))?;
    match linux_amd64_resolver(&index.manifests) {
        Some(d) if d.starts_with("sha256:") => Ok(Top::Index(d)),
        Some(d) => Err(format!(
            "its linux/amd64 manifest is {d}: vmc supports sha256 digests only"
        )),
        None => {
            let platforms: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            Err(format!(
                "no linux/amd64 image in its index (it has: {})",
                if platforms.is_empty() {
                    "no platforms".to_string()
                } else {
                    platforms.join(", ")
                }
            ))
        }
    }
}

/// The image manifest in `body` (whose digest is `digest`), if it
/// describes a container image vmc can run: sha256 digests, an image
/// config of at most `MAX_JSON` bytes, at most `MAX_LAYERS` layers of
/// types vmc unpacks.
pub(super) fn image_manifest(body: &[u8], digest: &str) -> Result<ImageManifest, String> {
    let m = ImageManifest::from_reader(body)
        .map_err(|e| format!("{digest} is not an image manifest: {e}"))?;
    if let Some(d) = std::iter::once(m.config())
        .chain(m.layers())
        .find(|d| d.digest().algorithm().to_string() != "sha256")
    {
        return Err(format!(
            "blob {} has a {} digest: vmc supports sha256 digests only",
            d.digest(),
            d.digest().algorithm()
        ));
    }
    let config_type = m.config().media_type().to_string();
    if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
        return Err(format!(
            "not a container image: its config is {config_type}"
        ));
    }
    if m.config().size() > MAX_JSON {
        return Err(format!(
            "its config has {} bytes, more than the {} MiB allowed",
            m.config().size(),
            MAX_JSON >> 20
        ));
    }
    if m.layers().len() > MAX_LAYERS {
        return Err(format!(
            "{} layers, more than the {MAX_LAYERS} allowed",
            m.layers().len()
        ));
    }
    if let Some(l) = m
        .layers()
        .iter()
        .find(|l| !LAYER_TYPES.contains(&l.media_type().to_string().as_str()))
    {
        return Err(format!(
            "layer {} has media type {}, which vmc cannot unpack",
            l.digest(),
            l.media_type()
        ));
    }
    Ok(m)
}

/// The token in a token endpoint's answer: `token`, or OAuth2's
/// `access_token` (the distribution spec allows either; `token` wins when
/// both are given). The error completes "its anonymous token reply ...".
pub(super) fn token_reply(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        token: Option<String>,
        access_token: Option<String>,
    }
    let reply: Reply = serde_json::from_slice(body)
        .map_err(|e| format!("cannot be read: {}", super::http::quote(&e.to_string())))?;
    reply
        .token
        .or(reply.access_token)
        .ok_or_else(|| "holds no token".to_string())
}

/// The realm and service of a Bearer challenge.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Challenge {
    pub(super) realm: String,
    pub(super) service: Option<String>,
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
pub(super) fn bearer_challenge(value: &str) -> Option<Challenge> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A seed of the `registry` fuzz target.
    fn seed(name: &str) -> Vec<u8> {
        // The run-time value: a test binary reused from a clone elsewhere
        // (a shared target directory) still reads this checkout's seeds.
        let root = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        std::fs::read(format!("{root}/fuzz/corpus/registry/{name}")).unwrap()
    }

    fn sha(s: &str) -> String {
        super::super::super::store::digest_of(s.as_bytes()).to_string()
    }

    /// The fuzz seeds are what registries send, and parse as a pull needs:
    /// indexes resolve to their linux/amd64 entry, manifests of images
    /// pass, anything else is refused with its reason.
    #[test]
    fn registry_answers_are_told_apart_and_checked() {
        assert_eq!(top(&seed("oci-index.json")), Ok(Top::Index(sha("amd"))));
        assert_eq!(top(&seed("docker-list.json")), Ok(Top::Index(sha("amd2"))));
        assert_eq!(
            top(&seed("index-no-media-type.json")),
            Err("no linux/amd64 image in its index (it has: linux/riscv64)".into())
        );
        for m in ["oci-manifest.json", "docker-manifest.json", "artifact.json"] {
            assert_eq!(top(&seed(m)), Ok(Top::Manifest), "{m}");
        }
        let m = image_manifest(&seed("oci-manifest.json"), "d").unwrap();
        assert_eq!(m.layers().len(), 3);
        let m = image_manifest(&seed("docker-manifest.json"), "d").unwrap();
        assert_eq!(m.config().digest().to_string(), sha("dconfig"));
        let e = image_manifest(&seed("artifact.json"), "d").unwrap_err();
        assert_eq!(
            e,
            "not a container image: its config is application/vnd.cncf.helm.config.v1+json"
        );
        assert!(top(b"{")
            .unwrap_err()
            .starts_with("its manifest is not JSON"));
        let e = image_manifest(&seed("oci-index.json"), "sha256:1").unwrap_err();
        assert!(e.starts_with("sha256:1 is not an image manifest"), "{e}");
    }

    #[test]
    fn token_replies_give_token_or_access_token() {
        assert_eq!(
            token_reply(&seed("token.json")),
            Ok("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into())
        );
        assert_eq!(token_reply(&seed("access-token.json")), Ok("abc".into()));
        assert_eq!(token_reply(b"{}"), Err("holds no token".into()));
        let e = token_reply(b"<html>\n\x1b[31m").unwrap_err();
        assert!(e.starts_with("cannot be read: "), "{e}");
        assert!(!e.contains('\n') && !e.contains('\x1b'), "{e}");
    }

    #[test]
    fn bearer_challenges_are_parsed_with_quoted_parameters() {
        let hub = String::from_utf8(seed("challenge-hub")).unwrap();
        assert_eq!(
            bearer_challenge(&hub),
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
}
