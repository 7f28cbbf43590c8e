//! Where a template comes from, as the operator names it: a local path or a URI.
//!
//! Local files are served today, named by a plain path or a `file:///path` URI.
//! Remote schemes (`http`, `https`, `s3`, `nfs`, `nbd`, …) are recognised and refused
//! with a clear error until their sources exist; the URI in every message has its
//! credentials and query removed, so errors never leak secrets.

use std::path::PathBuf;

use thinline_format::storage::percent_decode;

use crate::{Error, Result};

/// A parsed template location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file or block device.
    File(PathBuf),
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
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

/// Parses a template location: a plain path, or a `file://` URI.
pub fn parse(spec: &str) -> Result<Source> {
    let Some(scheme) = scheme(spec) else {
        return Ok(Source::File(PathBuf::from(spec)));
    };
    let refuse = |reason: &str| Error::UnsupportedSource {
        uri: redact(spec),
        reason: reason.to_owned(),
    };
    if !scheme.eq_ignore_ascii_case("file") {
        return Err(refuse(&format!(
            "the {scheme:?} scheme is not supported yet; serve a local file (a path or file:///path)"
        )));
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
    fn other_schemes_and_bad_file_uris_are_refused_without_secrets() {
        let e = parse("https://user:secret@example.com/t.qcow2?X-Amz-Signature=abc").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("https://example.com/t.qcow2"), "{msg}");
        assert!(msg.contains("not supported yet"), "{msg}");
        assert!(
            !msg.contains("secret") && !msg.contains("Signature"),
            "{msg}"
        );
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
