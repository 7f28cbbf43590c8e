//! Where a template comes from, as the operator names it: a local path or a URI.
//!
//! - a plain path or `file:///path`: a local file or block device;
//! - `http://`, `https://`, `s3://`, `nfs://`, `nbd://`, `nbd+unix://`: the built-in
//!   sources of [`crate::builtin`];
//! - any other scheme: a handler executable named after the scheme
//!   ([`crate::handler`]).
//!
//! The URI in every message has its credentials and query removed, so errors never
//! leak secrets.

use std::path::PathBuf;
use std::sync::Arc;

use thinline_format::storage::percent_decode;
use thinline_format::{FileStorage, Storage};
use tokio::runtime::Handle;

use crate::builtin::{self, BUILT_IN_SCHEMES};
use crate::redact::redact;
use crate::{Error, RemoteConfig, Result, handler};

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
            Source::Remote(uri) => builtin::open_storage(uri, config, handle),
            Source::Handler { scheme, uri } => handler::attach(scheme, uri, config, handle),
        }
    }
}

/// The scheme of `spec` if it is a URI (`scheme://…`).
fn scheme(spec: &str) -> Option<&str> {
    let (scheme, _) = spec.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(scheme)
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
