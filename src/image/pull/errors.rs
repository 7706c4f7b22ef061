//! How a pull's failures are worded for the user, each in one line: the
//! registry's refusals (as oci-client's error values), failed connections
//! (with a hint: `--insecure`, an untrusted certificate) and text quoted
//! from the registry.

use std::fmt::Display;
use std::io;

use oci_client::errors::{OciDistributionError, OciErrorCode};

use super::super::ImageError;
use super::http::{quote, Remote};

impl Remote {
    /// A problem with what the registry holds for the reference.
    pub(super) fn bad(&self, msg: impl Display) -> ImageError {
        if self.shown.starts_with(&format!("{}/", self.host)) {
            ImageError::Registry(format!("{}: {msg}", self.shown))
        } else {
            ImageError::Registry(format!("{} (from {}): {msg}", self.shown, self.host))
        }
    }

    /// A failed request or a registry's refusal (as the error values
    /// oci-client has for them), worded for the user in one line.
    pub(super) fn error(&self, e: OciDistributionError) -> ImageError {
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
pub(super) fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::pull::http::MAX_QUOTE;

    #[test]
    fn quoted_text_is_one_bounded_line() {
        assert_eq!(quote("a\n  b\tc"), "a b c");
        assert_eq!(quote(""), "(no reason given)");
        assert_eq!(quote(&"x".repeat(1000)).len(), MAX_QUOTE);
        assert_eq!(quote("\x1b[2Jno\0\0clear"), "[2Jno clear");
        assert_eq!(quote("\0\0\0"), "(no reason given)");
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
}
