//! Image references as Docker spells them: `name[:tag][@digest]`, where the
//! name may start with a registry host (`localhost:5000/app`). Docker Hub
//! names are shown in their familiar form (`alpine`, not
//! `docker.io/library/alpine`).

use std::fmt;

/// The default registry of unqualified names.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (with port), e.g. `docker.io`, `localhost:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/alpine`, `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` when given.
    pub digest: Option<String>,
}

/// Why a reference is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference '{0}': {1}")]
pub struct ReferenceError(pub String, pub &'static str);

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        && c.chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphanumeric())
        && c.chars()
            .last()
            .is_some_and(|ch| ch.is_ascii_alphanumeric())
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
        && !t.starts_with(['.', '-'])
}

impl Reference {
    /// Parses `s`; a missing tag stays `None` (see [`Reference::tag_or_latest`]).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let err = |why| ReferenceError(s.to_string(), why);
        if s.is_empty() {
            return Err(err("empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| err("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                {
                    return Err(err(
                        "the digest must be sha256: and 64 lowercase hex digits",
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = rest.split_at(last_slash + i);
                (n, Some(t[1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(err(
                    "tags are letters, digits, '.', '_' and '-' (at most 128)",
                ));
            }
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        let registry = if parts.len() > 1
            && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
        {
            parts.remove(0).to_string()
        } else {
            DEFAULT_REGISTRY.to_string()
        };
        if registry.chars().any(|c| c.is_ascii_uppercase()) || registry.is_empty() {
            return Err(err("invalid registry host"));
        }
        if parts.is_empty() || !parts.iter().all(|p| valid_component(p)) {
            return Err(err(
                "names are lowercase letters, digits and separators ('.', '_', '-', '/')",
            ));
        }
        let mut repository = parts.join("/");
        if registry == DEFAULT_REGISTRY && parts.len() == 1 {
            repository = format!("library/{repository}");
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag, `latest` when none was given.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// The name as Docker shows it: no `docker.io/` and no `library/`.
    pub fn familiar_name(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            format!("{}/{}", self.registry, self.repository)
        }
    }

    /// `familiar_name:tag`: what the store records as the image's name.
    pub fn store_name(&self) -> String {
        format!("{}:{}", self.familiar_name(), self.tag_or_latest())
    }

    /// The store name an image fetched by this reference gets: `None` when it
    /// names only a digest (`app@sha256:...`), which names no tag, as with
    /// `docker pull`.
    pub fn tag_name(&self) -> Option<String> {
        if self.digest.is_some() && self.tag.is_none() {
            return None;
        }
        Some(self.store_name())
    }

    /// The reference in full, registry included (`docker.io/library/alpine:latest`,
    /// `localhost:5000/app@sha256:...`): what a registry is asked for. A
    /// missing tag is `latest` unless a digest is given.
    pub fn remote_name(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        match (&self.tag, &self.digest) {
            (Some(t), _) => s.push_str(&format!(":{t}")),
            (None, None) => s.push_str(":latest"),
            (None, Some(_)) => {}
        }
        if let Some(d) = &self.digest {
            s.push_str(&format!("@{d}"));
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.familiar_name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names_are_normalised_and_shown_familiar() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(r.store_name(), "alpine:latest");
        let r = Reference::parse("docker.io/library/node:20-slim").unwrap();
        assert_eq!(r.store_name(), "node:20-slim");
        let r = Reference::parse("team/app:v1").unwrap();
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.store_name(), "team/app:v1");
    }

    #[test]
    fn registry_hosts_and_ports_are_not_tags() {
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.tag, None);
        assert_eq!(r.store_name(), "localhost:5000/app:latest");
        let r = Reference::parse("127.0.0.1:5000/a/b:2.0").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "a/b", Some("2.0"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("app@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
    }

    #[test]
    fn registry_references_keep_host_repository_tag_and_digest() {
        let r = Reference::parse("localhost:5000/busybox:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "busybox", Some("1"))
        );
        assert_eq!(r.tag_name().as_deref(), Some("localhost:5000/busybox:1"));
        assert_eq!(r.remote_name(), "localhost:5000/busybox:1");

        let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let r = Reference::parse(&format!("127.0.0.1:5999/test/bb@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5999", "test/bb", None)
        );
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.tag_name(), None, "a digest alone names no tag");
        assert_eq!(r.remote_name(), format!("127.0.0.1:5999/test/bb@{d}"));

        let r = Reference::parse(&format!("registry.example.com/a/b/c:v2@{d}")).unwrap();
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(
            r.tag_name().as_deref(),
            Some("registry.example.com/a/b/c:v2")
        );

        // Docker Hub: the full name is what the registry is asked for.
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.remote_name(), "docker.io/library/busybox:latest");
        assert_eq!(r.tag_name().as_deref(), Some("busybox:latest"));
        // A first component without '.', ':' or "localhost" is a path, not a host.
        let r = Reference::parse("myhost/app:1").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "myhost/app");
        assert!(Reference::parse("localhost:5000/Busy:1").is_err());
        assert!(Reference::parse("localhost:5000/").is_err());
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            "",
            "UPPER",
            "a::b",
            "app:",
            "app:-x",
            "-app",
            "app@sha256:zz",
            "a//b",
            "app@md5:00",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }
}
