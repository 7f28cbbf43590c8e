//! Where a template comes from, as the operator names it: a local path or a URI.
//!
//! - a plain path or `file:///path`: a local file or block device;
//! - `http://`, `https://`, `s3://`, `nfs://`, `nbd://`, `nbd+unix://`: the built-in
//!   remote sources of [`crate::remote`];
//! - any other scheme: a handler executable named after the scheme
//!   ([`crate::remote::handler`]).
//!
//! The URI in every message has its credentials and query removed, so errors never
//! leak secrets.

use std::path::PathBuf;
use std::sync::Arc;

use thinline_format::storage::percent_decode;
use thinline_format::{FileStorage, Storage};
use tokio::runtime::Handle;

use crate::remote::fetch::FetchEngine;
use crate::remote::storage::{RemoteStorage, block_on};
use crate::remote::{self, BUILT_IN_SCHEMES, RemoteConfig};
use crate::{Error, Result};

/// A parsed template location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file or block device.
    File(PathBuf),
    /// An object of a built-in remote source (`http`, `https`, `s3`, `nfs`, `nbd`).
    Remote(String),
    /// A URI of another scheme, resolved by the handler executable named `scheme`.
    Handler {
        /// The scheme, lower case.
        scheme: String,
        /// The whole URI.
        uri: String,
    },
}

impl Source {
    /// The location as shown in messages and reports (credentials and query removed).
    pub fn shown(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Remote(uri) | Source::Handler { uri, .. } => redact(uri),
        }
    }

    /// Opens the location as a storage the format code can read. Remote reads run on
    /// the runtime behind `handle`; call this from a thread that is not one of its
    /// workers (the main thread or the blocking pool).
    pub fn open(&self, config: &Arc<RemoteConfig>, handle: &Handle) -> Result<Arc<dyn Storage>> {
        match self {
            Source::File(path) => Ok(FileStorage::open(path)?),
            Source::Remote(uri) => open_remote(uri, config, handle),
            Source::Handler { scheme, uri } => remote::handler::attach(scheme, uri, config, handle),
        }
    }
}

/// Opens a built-in remote object and puts a fetch engine in front of it.
pub(crate) fn open_remote(
    uri: &str,
    config: &Arc<RemoteConfig>,
    handle: &Handle,
) -> Result<Arc<dyn Storage>> {
    let owned = uri.to_owned();
    let cfg = Arc::clone(config);
    let backend =
        block_on(handle, async move { remote::open(&owned, &cfg).await }).ok_or_else(|| {
            Error::UnsupportedSource {
                uri: redact(uri),
                reason: "the async runtime is shutting down".to_owned(),
            }
        })??;
    let engine = FetchEngine::new(backend, config);
    Ok(Arc::new(RemoteStorage::new(
        engine,
        handle.clone(),
        Arc::clone(config),
    )))
}

/// The scheme of `spec` if it is a URI (`scheme://…`).
fn scheme(spec: &str) -> Option<&str> {
    let (scheme, _) = spec.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(scheme)
}

/// `uri` without user information, query or fragment, for messages.
///
/// Whatever stands between `://` and the *last* `@` is credentials, whether or not the
/// URI parses: a password may hold `/`, `?` or `#` (`http://alice:pa/ss@host/x`), which
/// a URI parser would take for the start of the path, query or fragment. When a `?` or
/// `#` comes before that `@`, either the password or the query holds it, and nothing
/// after the scheme is shown. Over-redacting an odd URI is fine; showing a secret is not.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let after_credentials = match rest.rfind('@') {
        Some(at) if rest[..at].contains(['?', '#']) => return format!("{scheme}://<redacted>"),
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let shown = after_credentials.split(['?', '#']).next().unwrap_or("");
    format!("{scheme}://{shown}")
}

/// The parts of `uri` that [`redact`] hides (user information, password, query and
/// fragment), for scrubbing them from text a third party printed (a handler's stderr).
pub fn secrets(uri: &str) -> Vec<&str> {
    let Some((_, rest)) = uri.split_once("://") else {
        return Vec::new();
    };
    let mut secrets = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        secrets.push(userinfo);
        if let Some((_, password)) = userinfo.split_once(':') {
            secrets.push(password);
        }
    }
    if let Some(q) = rest.find(['?', '#']) {
        secrets.push(&rest[q + 1..]);
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// Parses a template location: a plain path or a URI.
pub fn parse(spec: &str) -> Result<Source> {
    let Some(scheme) = scheme(spec) else {
        return Ok(Source::File(PathBuf::from(spec)));
    };
    let refuse = |reason: &str| Error::UnsupportedSource {
        uri: redact(spec),
        reason: reason.to_owned(),
    };
    let lower = scheme.to_ascii_lowercase();
    if BUILT_IN_SCHEMES.contains(&lower.as_str()) {
        return Ok(Source::Remote(spec.to_owned()));
    }
    if lower != "file" {
        return Ok(Source::Handler {
            scheme: lower,
            uri: spec.to_owned(),
        });
    }
    let rest = &spec[scheme.len() + 3..];
    if rest.contains(['?', '#']) {
        return Err(refuse("file URIs take no query or fragment"));
    }
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !(host.is_empty() || host.eq_ignore_ascii_case("localhost")) {
        return Err(refuse(&format!(
            "file URIs name local files; the host {host:?} is not this machine"
        )));
    }
    if path.is_empty() {
        return Err(refuse("the URI has no path"));
    }
    let path = percent_decode(path).ok_or_else(|| refuse("a %-escape in the path is malformed"))?;
    Ok(Source::File(PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_and_file_uris_are_local_files() {
        assert_eq!(parse("disk.img").unwrap(), Source::File("disk.img".into()));
        assert_eq!(
            parse("/srv/a=b.img").unwrap(),
            Source::File("/srv/a=b.img".into())
        );
        assert_eq!(
            parse("file:///srv/t.qcow2").unwrap(),
            Source::File("/srv/t.qcow2".into())
        );
        assert_eq!(
            parse("file://localhost/srv/my%20disk.vmdk").unwrap(),
            Source::File("/srv/my disk.vmdk".into())
        );
    }

    #[test]
    fn remote_and_handler_schemes_are_recognised_and_shown_without_secrets() {
        let s = parse("https://user:secret@example.com/t.qcow2?X-Amz-Signature=abc").unwrap();
        assert!(matches!(s, Source::Remote(_)));
        assert_eq!(s.shown(), "https://example.com/t.qcow2");
        assert!(matches!(
            parse("S3://bucket/key").unwrap(),
            Source::Remote(_)
        ));
        assert!(matches!(
            parse("nbd+unix:///x?socket=/run/a.sock").unwrap(),
            Source::Remote(_)
        ));
        assert_eq!(
            parse("smb://u:p@filer/share/t.vhd").unwrap(),
            Source::Handler {
                scheme: "smb".into(),
                uri: "smb://u:p@filer/share/t.vhd".into()
            }
        );
    }

    #[test]
    fn passwords_with_delimiters_are_never_shown() {
        for (uri, shown) in [
            ("http://alice:pa/ss@host/t.raw", "http://host/t.raw"),
            ("http://alice:pa?ss@host/t.raw", "http://<redacted>"),
            ("http://alice:pa#ss@host/t.raw", "http://<redacted>"),
            ("https://a:b@c@host:8443/t?sig=x#f", "https://host:8443/t"),
            (
                "https://host/t?X-Amz-Signature=abc@def",
                "https://<redacted>",
            ),
            ("nbd+unix:///e?socket=/run/s", "nbd+unix:///e"),
            ("/local/path", "/local/path"),
        ] {
            assert_eq!(redact(uri), shown, "{uri}");
        }
        for secret in ["pa/ss", "pa?ss", "pa#ss"] {
            let uri = format!("http://alice:{secret}@host/x");
            assert!(!redact(&uri).contains("ss"), "{uri}: {}", redact(&uri));
        }
    }

    #[test]
    fn bad_file_uris_are_refused() {
        for bad in [
            "file://otherhost/x",
            "file://",
            "file:///x?y",
            "file:///bad%zz",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
